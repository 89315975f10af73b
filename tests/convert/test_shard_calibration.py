"""Stage-0 calibration on precomputed shards: fixed-order batches, plumbed into the Taylor scores."""

from __future__ import annotations

import pytest
import torch

from d2m_dist.config import CalibrationConfig, ConfigError, ConvertConfig, MoEConfig, TeacherConfig
from d2m_dist.convert.calibration import shard_batches
from d2m_dist.convert.pipeline import run_convert
from d2m_dist.data.stream import ShardStream, StreamConfig
from d2m_dist.models.flux import load_teacher, pack_latents
from d2m_dist.models.portable import read_provenance
from tests.tiny import save_tiny_teacher, write_precomputed_shards

LATENT, TXT, DIM, POOLED = (4, 4, 4), 5, 24, 12  # the tiny teacher: in_channels 16 = 4 x 4 packed


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    save_tiny_teacher(root / "teacher")
    urls = write_precomputed_shards(root / "shards", shards=2, per_shard=5, latent=LATENT, text_tokens=TXT, dim=DIM,
                                    pooled_dim=POOLED)
    return root, urls


def _cfg(root, urls, out, **cal):
    cal = {"source": "shards", "urls": urls, "num_batches": 3, "batch_size": 2, **cal}
    return ConvertConfig(teacher=TeacherConfig(path=str(root / "teacher")), moe=MoEConfig(spec="1S4E2A"),
                         calibration=CalibrationConfig(**cal), output=str(out), device="cpu")


def test_batches_are_the_stream_in_a_fixed_order(setup, tmp_path):
    root, urls = setup
    model_config = load_teacher(TeacherConfig(path=str(root / "teacher")), meta=True).config
    a = list(shard_batches(model_config, _cfg(root, urls, tmp_path / "o")))
    b = list(shard_batches(model_config, _cfg(root, urls, tmp_path / "o")))
    assert [x.index for x in a] == [0, 1, 2] and all(x.size == 2 for x in a)
    direct = iter(ShardStream(StreamConfig(urls=urls, kind="precomputed", batch_size=2, rank=0, world_size=1,
                                           num_workers=0, shuffle_buffer=0)))
    for x, y in zip(a, b):
        raw = next(direct)
        assert torch.equal(x.latents, y.latents) and torch.equal(x.prompt_embeds, y.prompt_embeds)
        assert torch.equal(x.latents, pack_latents(torch.as_tensor(raw["latent"]).float()))
        assert torch.equal(x.prompt_embeds, torch.as_tensor(raw["prompt_embeds"]).float())
        assert x.guidance.tolist() == [3.5, 3.5]


def test_convert_scores_come_from_the_shards(setup, tmp_path):
    root, urls = setup
    from_source = run_convert(_cfg(root, urls, tmp_path / "a"))
    model_config = load_teacher(TeacherConfig(path=str(root / "teacher")), meta=True).config
    given = list(shard_batches(model_config, _cfg(root, urls, tmp_path / "b")))
    from_batches = run_convert(_cfg(root, urls, tmp_path / "b"), batches=given)
    random_source = run_convert(_cfg(root, urls, tmp_path / "c", source="random", image_tokens=4, text_tokens=TXT))
    pa, pb, pc = (read_provenance(p) for p in (from_source, from_batches, random_source))
    assert all(torch.equal(pa[s].experts, pb[s].experts) and torch.equal(pa[s].shared, pb[s].shared) for s in pa)
    assert any(not torch.equal(pa[s].experts, pc[s].experts) for s in pa)


def test_bad_calibration_urls(setup, tmp_path):
    root, urls = setup
    with pytest.raises(ConfigError, match="calibration.urls must name"):
        run_convert(_cfg(root, None, tmp_path / "o"))
    with pytest.raises(ConfigError, match="calibration: data urls .* match no existing shard"):
        run_convert(_cfg(root, str(tmp_path / "x-{000000..000001}.tar"), tmp_path / "o"))
    wrong = write_precomputed_shards(tmp_path / "wrong", latent=(16, 4, 4), text_tokens=TXT, dim=DIM,
                                     pooled_dim=POOLED)
    with pytest.raises(ConfigError, match="latent channels x 4 .* is 64, the model takes 16"):
        run_convert(_cfg(root, wrong, tmp_path / "o"))
    assert not (tmp_path / "o").exists()
