"""Stage 0: dense FLUX teacher -> portable MoE student folder.

Order of work, so that bad input fails before anything expensive runs:
validate config -> resolve every site's spec against the teacher's shapes ->
check the output folder -> load the teacher -> Taylor calibration (if the
strategy needs it; distributed when torch.distributed is up) -> partition and
router init -> surgery -> MoB -> atomic write (rank 0).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.distributed as dist

from d2m_dist.config import ConfigError, ConvertConfig, to_dict
from d2m_dist.convert.calibration import calibration_batches, check_calibration_source
from d2m_dist.convert.partition import init_router, needs_scores, partition_site
from d2m_dist.convert.taylor import taylor_scores
from d2m_dist.distill.teacher import FrozenTeacher
from d2m_dist.models.diffusers_student import diffusers_folder, write_diffusers_student
from d2m_dist.models.flow import FlowBatch
from d2m_dist.models.flux import load_teacher
from d2m_dist.models.mob import apply_mob
from d2m_dist.models.portable import StudentMeta, full_state_dict, write_student
from d2m_dist.models.spec import select_sites
from d2m_dist.models.surgery import SitePartition, convert_to_moe, dense_ffn
from d2m_dist.models.teacher_identity import check_teacher_weights, teacher_fingerprint
from d2m_dist.parallel.dist import pick_device

log = logging.getLogger("d2m_dist.convert")


def compute_partitions(teacher, specs, cfg: ConvertConfig, scores: Optional[Dict[str, torch.Tensor]]):
    gen = torch.Generator().manual_seed(cfg.partition.seed)
    parts: Dict[str, SitePartition] = {}
    for site, spec in specs.items():
        dense = dense_ffn(teacher, site)
        shape = spec.resolve(dense.dim, dense.hidden, site)
        cpu_dense = type(dense)(dense.w1.detach().cpu(), dense.b1.detach().cpu(), dense.w2.detach().cpu(), None)
        part = partition_site(
            shape, cfg.partition.strategy, scores=None if scores is None else scores[site],
            dense=cpu_dense, generator=gen, cluster_iters=cfg.partition.cluster_iters,
        )
        part.router = init_router(cpu_dense, part, cfg.partition.router_init, gen)
        parts[site] = part
    return parts


def run_convert(
    cfg: ConvertConfig,
    batches: Optional[Iterable[FlowBatch]] = None,
    *,
    group=None,
    progress: Optional[Callable[[int, float], None]] = None,
) -> Optional[Path]:
    """Convert; returns the output folder on the writing rank, None elsewhere.

    ``batches``: calibration batches, the same sequence on every rank (each scores its
    share); default: the source named in ``cfg.calibration``.
    """
    cfg.validate()
    check_calibration_source(cfg)
    rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
    out = Path(cfg.output)
    for folder in (out, diffusers_folder(out)) if cfg.export_diffusers else (out,):
        if folder.exists() and not cfg.overwrite:
            raise ConfigError(f"output {folder} already exists (set overwrite=true to replace it)")

    # Shapes first (meta teacher: no weights read yet), so a bad spec fails in seconds.
    meta_teacher = load_teacher(cfg.teacher, meta=True)
    c = meta_teacher.config
    check_teacher_weights(cfg.teacher.path, dict(c))
    specs = select_sites(cfg.moe, c.num_layers, c.num_single_layers)
    for site, spec in specs.items():
        dense = dense_ffn(meta_teacher, site)
        spec.resolve(dense.dim, dense.hidden, site)
    apply_mob(convert_to_moe(meta_teacher, specs, cfg.moe), cfg.mob)
    del meta_teacher

    device = pick_device(cfg.device)
    scores = None
    t0 = time.time()
    if needs_scores(cfg.partition.strategy):
        # where the teacher lives (resident, ZeRO-3 sharded or offloaded) is the teacher object's
        # business; the scores need gradients through it, so the scorer calls it directly
        teacher = FrozenTeacher(cfg.teacher, device, micro_batch=cfg.calibration.batch_size)
        if batches is None:
            batches = calibration_batches(teacher.config, cfg)
        scorer = taylor_scores(teacher.model, batches, list(specs), seed=cfg.calibration.seed, group=group,
                               progress=progress)
        scores = scorer.scores
        del teacher
        log.info("taylor scores from %d calibration batches in %.1fs", scorer.batches, time.time() - t0)
    if rank != 0:
        return None
    teacher = load_teacher(cfg.teacher)  # whole weights, on CPU: the surgery copies rows and columns
    parts = compute_partitions(teacher, specs, cfg, scores)
    student = convert_to_moe(teacher, specs, cfg.moe, parts)
    apply_mob(student, cfg.mob)
    meta = StudentMeta(
        base_model={k: v for k, v in dict(teacher.config).items() if not k.startswith("_") or k == "_class_name"},
        moe=to_dict(cfg.moe),
        site_specs={s: str(sp) for s, sp in specs.items()},
        mob=to_dict(cfg.mob),
        dtype=cfg.teacher.dtype,
        extra={"stage": 0, "partition": to_dict(cfg.partition), "calibration": to_dict(cfg.calibration),
               "teacher": str(cfg.teacher.path),
               # stage starts compare it with their teacher's (d2m_dist/models/teacher_identity.py)
               "teacher_fingerprint": teacher_fingerprint(cfg.teacher.path)},
    )
    state = {k: v.cpu() for k, v in full_state_dict(student).items()}
    written = write_student(out, state, meta, parts, overwrite=cfg.overwrite)
    if cfg.export_diffusers:
        write_diffusers_student(written, diffusers_folder(written), overwrite=cfg.overwrite)
    return written
