"""Shared fixtures: a small digits teacher and its stage-0 student, built once per session."""

from __future__ import annotations

import os

import pytest

import d2m_dist.digits  # noqa: F401  (registers the embedded preset the tests use, as the CLI does)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """A 0.35M-parameter FLUX-architecture teacher trained briefly (200 steps) on the digits, in diffusers format."""
    from d2m_dist.digits.card import PretrainConfig
    from d2m_dist.digits.teacher import pretrain, save_teacher

    root = tmp_path_factory.mktemp("digits_teacher")
    cfg = PretrainConfig(steps=200, batch_size=32, progress=False)
    save_teacher(pretrain(cfg).ema, root, cfg)
    return root


@pytest.fixture(scope="session")
def digits_student(digits_teacher, tmp_path_factory):
    """Its stage-0 student at 1S4E2A on every site (Taylor-contiguous, digits calibration)."""
    from d2m_dist.config import CalibrationConfig, ConvertConfig, MoEConfig, TeacherConfig
    from d2m_dist.convert.pipeline import run_convert

    out = tmp_path_factory.mktemp("stage0") / "student"
    cfg = ConvertConfig(teacher=TeacherConfig(path=str(digits_teacher)), moe=MoEConfig(spec="1S4E2A"),
                        calibration=CalibrationConfig(source="digits", num_batches=2, batch_size=16), output=str(out))
    return run_convert(cfg)


TINY_DIGITEVAL = dict(task="digiteval", num_layers=1, num_single_layers=2, num_attention_heads=1,
                      attention_head_dim=16, axes_dims_rope=[4, 6, 6], max_tokens=10, steps=30, batch_size=16,
                      warmup_steps=5, progress=False)


@pytest.fixture(scope="session")
def digiteval_teacher(tmp_path_factory):
    """A tiny DigitEval teacher (16x16 RGB canvases, 64 tokens of 12 channels), 30 steps: shapes, not quality."""
    from d2m_dist.digits.card import PretrainConfig
    from d2m_dist.digits.teacher import pretrain, save_teacher

    root = tmp_path_factory.mktemp("digiteval_teacher")
    cfg = PretrainConfig(**TINY_DIGITEVAL)
    save_teacher(pretrain(cfg).ema, root, cfg)
    return root


@pytest.fixture(scope="session")
def digiteval_student(digiteval_teacher, tmp_path_factory):
    """Its stage-0 student at 1S4E2A on every site (calibrated on DigitEval compositions)."""
    from d2m_dist.config import CalibrationConfig, ConvertConfig, MoEConfig, TeacherConfig
    from d2m_dist.convert.pipeline import run_convert

    out = tmp_path_factory.mktemp("digiteval_stage0") / "student"
    cfg = ConvertConfig(teacher=TeacherConfig(path=str(digiteval_teacher)), moe=MoEConfig(spec="1S4E2A"),
                        calibration=CalibrationConfig(source="digits", num_batches=2, batch_size=8), output=str(out))
    return run_convert(cfg)


@pytest.fixture(scope="session")
def digits_latent_shards(tmp_path_factory):
    """Precomputed shards shaped for the digits teacher (1x8x8 pixel latents, 8 MiniLM tokens of 384):
    4 shards of 12 samples, random values, in ``d2m precompute``'s format. Returns their brace pattern."""
    from tests.tiny import write_precomputed_shards

    return write_precomputed_shards(tmp_path_factory.mktemp("digits_shards"), shards=4, per_shard=12,
                                    latent=(1, 8, 8), text_tokens=8, dim=384)
