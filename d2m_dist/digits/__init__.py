"""The embedded default preset: scikit-learn's real 8x8 digits, a toy FLUX-architecture teacher.

Everything the preset needs beyond the framework lives here: the digits data
(:mod:`.data`), the offline MiniLM text encoder (:mod:`.text_encoder`), the
teacher's card and its pretraining (:mod:`.card`, :mod:`.teacher`), calibration
and training batches (:mod:`.batches`), the precompute encoder (:mod:`.encoder`),
the digit classifier and the evaluation (:mod:`.classifier`, :mod:`.evaluate`).

Importing the package registers the preset with the framework's extension
points, which know nothing of it: ``d2m shards make digits``, ``d2m precompute
encoder=digits``, ``calibration.source=digits``, ``data.source=digits``, and the
digits teacher's guidance value and sample grid, and ``d2m generate`` with a digits
teacher as the pipeline. The CLI imports it; library
users who want the preset import it too.
"""

from d2m_dist.convert.calibration import register_calibration_source
from d2m_dist.data.encoders import register_encoder
from d2m_dist.data.shards import register_shard_source
from d2m_dist.digits.batches import DigitsBatches, digits_batches
from d2m_dist.digits.card import is_digits_teacher, teacher_card
from d2m_dist.digits.data import scan_digits
from d2m_dist.digits.encoder import digits_encoder_spec
from d2m_dist.digits.evaluate import trainer_grid
from d2m_dist.digits.generate import DIGITS_KIND
from d2m_dist.distill.batches import register_batch_source
from d2m_dist.distill.teacher_kinds import TeacherKind, register_teacher_kind
from d2m_dist.eval.generate_kinds import register_pipeline_kind

register_shard_source("digits", scan_digits)
register_encoder("digits", digits_encoder_spec)
register_calibration_source("digits", lambda model_config, cfg: digits_batches(cfg.teacher.path, cfg.calibration))
register_batch_source("digits", lambda cfg, info, model_config, guidance: DigitsBatches(
    cfg.teacher.path, cfg.data.batch_size, info.rank, info.world, cfg.data.seed, cfg.optim.grad_accum))
register_teacher_kind(TeacherKind("digits", is_digits_teacher, lambda path: teacher_card(path).embedded_guidance,
                                  trainer_grid))
register_pipeline_kind(DIGITS_KIND)
