"""The frozen teacher: every placement gives the plain model's velocity and block features."""

from __future__ import annotations

import os

import pytest
import torch

from d2m_dist.config import TeacherConfig
from d2m_dist.distill.teacher import FrozenTeacher
from d2m_dist.models.flux import call_flux, load_teacher
from tests.distributed import run_ranks
from tests.tiny import assert_engine_matches_plain, save_tiny_teacher, tiny_inputs


def test_resident_teacher_is_the_plain_model_without_grad(tmp_path):
    save_tiny_teacher(tmp_path / "t")
    cfg = TeacherConfig(path=str(tmp_path / "t"))
    plain, teacher = load_teacher(cfg), FrozenTeacher(cfg, torch.device("cpu"))
    x = tiny_inputs()
    out, feats = teacher.velocity_and_features(x)
    assert torch.equal(out, call_flux(plain, x).detach()) and not out.requires_grad
    assert set(feats) == {"double.0", "double.1", "single.0", "single.1"}
    assert all(not f.requires_grad for f in feats.values())


def test_bf16_teacher_takes_bf16_inputs(tmp_path):
    save_tiny_teacher(tmp_path / "t")
    cfg = TeacherConfig(path=str(tmp_path / "t"), dtype="bf16")
    teacher = FrozenTeacher(cfg, torch.device("cpu"))
    assert teacher.dtype == torch.bfloat16
    want = call_flux(load_teacher(cfg), tiny_inputs().to(dtype=torch.bfloat16))
    assert torch.equal(teacher.velocity(tiny_inputs()), want)  # fp32 inputs are cast, not refused


def _offloaded_teacher_worker(rank, world, teacher_path):
    os.environ["LOCAL_SIZE"] = str(world)
    cfg = TeacherConfig(path=str(teacher_path), placement="offload")
    plain = load_teacher(cfg)
    teacher = FrozenTeacher(cfg, torch.device("cpu"))
    engine = teacher.engine
    assert all(p.ds_tensor.numel() < p.ds_numel or world == 1 for p in engine.module.parameters())
    x = tiny_inputs(seed=rank)
    assert_engine_matches_plain(plain, engine, x)
    out, feats = teacher.velocity_and_features(x)  # the object's own call: the same numbers
    torch.testing.assert_close(out, call_flux(plain, x), rtol=0, atol=1e-6)


@pytest.mark.multiproc
def test_zero3_offloaded_teacher_equals_plain(tmp_path):
    save_tiny_teacher(tmp_path / "t")
    run_ranks(_offloaded_teacher_worker, 2, tmp_path / "t", timeout=300)
