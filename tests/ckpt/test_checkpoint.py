"""The checkpoint folder on its own (one process): fragments, atomic save, refusal of foreign files, RNG."""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from d2m_dist.ckpt.checkpoint import (
    LATEST,
    CheckpointDir,
    CheckpointError,
    CheckpointReader,
    FragmentWriter,
    capture_rng,
    restore_rng,
)


def _save(ckpt: CheckpointDir, step: int, w: torch.Tensor, cuts=(4,)) -> Path:
    """``w`` stored as fragments cut at ``cuts`` (as ZeRO partitions would cut it)."""
    writer = FragmentWriter()
    bounds = [0, *cuts, w.numel()]
    for lo, hi in zip(bounds, bounds[1:]):
        writer.add("w", "fp32", lo, w.reshape(-1)[lo:hi])
    return ckpt.save(step, {"step": step}, {"data": {"at": step}}, writer)


def test_reads_any_range_across_fragments(tmp_path):
    w = torch.arange(10, dtype=torch.float32) * 1.5
    folder = _save(CheckpointDir(tmp_path), 3, w, cuts=(4, 7))
    reader = CheckpointReader(folder)
    assert reader.meta["step"] == 3 and reader.world_size == 1 and reader.rank_meta(0) == {"data": {"at": 3}}
    assert torch.equal(reader.read("w", "fp32", 2, 6), w[2:8])  # spans all three fragments
    assert torch.equal(reader.read("w", "fp32", 0, 10), w)
    with pytest.raises(CheckpointError, match="holds 2 of the 4 elements"):
        reader.read("w", "fp32", 8, 4)
    with pytest.raises(CheckpointError, match="holds 0 of the 1 elements of exp_avg"):
        reader.read("w", "exp_avg", 0, 1)


def test_save_is_atomic_keeps_the_newest_and_resaves_a_step(tmp_path):
    ckpt = CheckpointDir(tmp_path, keep=2)
    for step in (1, 2, 3):
        _save(ckpt, step, torch.full((5,), float(step)))
    assert ckpt.tags() == ["step_2", "step_3"] and ckpt.latest() == "step_3"
    _save(ckpt, 3, torch.full((5,), 9.0))  # a signal right after a periodic save of the same step
    assert torch.equal(ckpt.open().read("w", "fp32", 0, 5), torch.full((5,), 9.0))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    # crashes leave a temporary folder (killed mid-save) and a complete newer tag that `latest` never
    # named (killed between the rename and `latest`): the next save removes the first, and never
    # counts the second against the checkpoint it just wrote
    (tmp_path / ".tmp-step_7").mkdir()
    shutil.copytree(tmp_path / "step_3", tmp_path / "step_9")
    _save(CheckpointDir(tmp_path, keep=1), 4, torch.full((5,), 4.0))
    assert ckpt.latest() == "step_4" and ckpt.tags() == ["step_4", "step_9"]
    assert torch.equal(ckpt.open().read("w", "fp32", 0, 5), torch.full((5,), 4.0))
    assert not (tmp_path / ".tmp-step_7").exists()
    (tmp_path / LATEST).write_text("step_11\n")
    with pytest.raises(CheckpointError, match="step_11 named by"):
        ckpt.latest()


class _Planted:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_foreign_and_pickled_files_are_refused_unread(tmp_path):
    folder = _save(CheckpointDir(tmp_path), 1, torch.ones(6))
    evidence = tmp_path / "pwned"
    rank_file = folder / "rank_00000.safetensors"
    rank_file.write_bytes(pickle.dumps(_Planted(str(evidence))))
    with pytest.raises(CheckpointError, match="rank_00000.safetensors: unreadable"):
        CheckpointReader(folder)
    save_file({"x": torch.ones(2)}, str(rank_file))  # valid safetensors, not ours
    with pytest.raises(CheckpointError, match="unreadable \\(not written by d2m\\)"):
        CheckpointReader(folder)
    (folder / "d2m_checkpoint.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(CheckpointError, match="is not 'd2m-checkpoint' 1"):
        CheckpointReader(folder)
    (folder / "d2m_checkpoint.json").unlink()
    (folder / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps(_Planted(str(evidence))))
    with pytest.raises(CheckpointError, match="pickled files \\(mp_rank_00_model_states.pt"):
        CheckpointReader(folder)
    assert not evidence.exists()


def test_rng_states_round_trip(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    writer = FragmentWriter()
    writer.add("w", "fp32", 0, torch.zeros(1))
    py_np = capture_rng(writer)
    want = (torch.rand(3), random.random(), np.random.rand())
    folder = CheckpointDir(tmp_path).save(1, {}, {"rng": py_np}, writer)
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    reader = CheckpointReader(folder)
    restore_rng(reader, 0, json.loads(json.dumps(reader.rank_meta(0)["rng"])))
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]


def test_crashed_saves_temporary_folders_are_removed_at_start(tmp_path):
    ckpt = CheckpointDir(tmp_path / "checkpoints")
    assert ckpt.remove_temporaries() == []  # no folder yet
    _save(ckpt, 2, torch.ones(3))
    (tmp_path / "checkpoints" / ".tmp-step_4").mkdir()  # killed mid-save
    (tmp_path / "checkpoints" / ".tmp-step_4" / "rank_00000.safetensors").write_bytes(b"partial")
    assert ckpt.remove_temporaries() == [tmp_path / "checkpoints" / ".tmp-step_4"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [LATEST, "step_2"]
