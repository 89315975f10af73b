"""StudentEMA on a plain (unsharded) model: the average, its checkpoint state, its checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from d2m_dist.ckpt.checkpoint import CheckpointDir, CheckpointError, FragmentWriter
from d2m_dist.ckpt.fragments import placements
from d2m_dist.distill.ema import StudentEMA


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    m[1].requires_grad_(False)  # frozen: not averaged
    return m


def test_ema_follows_the_recurrence_and_skips_frozen():
    m = _model()
    ema = StudentEMA(m, decay=0.75)
    assert set(ema.shadow) == {"0.weight", "0.bias"}
    expected = m[0].weight.detach().clone()
    for i in range(3):
        with torch.no_grad():
            m[0].weight.add_(float(i + 1))
        ema.update()
        expected = 0.75 * expected + 0.25 * m[0].weight.detach()
    torch.testing.assert_close(ema.shadow["0.weight"], expected)
    full = ema.full_state_dict()
    torch.testing.assert_close(full["0.weight"], expected)
    assert not torch.equal(full["0.weight"], m[0].weight.detach())


def _checkpoint(tmp_path, ema: StudentEMA, model):
    """The EMA written into a real checkpoint folder, and its reader."""
    writer = FragmentWriter()
    ema.write(writer, placements(model), rank=0, ep_size=1)
    ckpt = CheckpointDir(tmp_path / "ckpt")
    ckpt.save(1, {"step": 1}, {}, writer)
    return ckpt.open()


def test_ema_checkpoint_round_trip_and_mismatch(tmp_path):
    m = _model()
    a = StudentEMA(m, decay=0.5)
    with torch.no_grad():
        m[0].bias.fill_(2.0)
    a.update()
    reader = _checkpoint(tmp_path, a, m)
    b = StudentEMA(_model(), decay=0.5)
    b.read(reader, placements(m))
    assert all(torch.equal(b.shadow[k], a.shadow[k]) for k in a.shadow)
    empty = CheckpointDir(tmp_path / "none")
    empty.save(1, {"step": 1}, {}, FragmentWriter())
    with pytest.raises(CheckpointError, match="no EMA"):
        b.read(empty.open(), placements(m))
    other = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="no EMA of 1.weight"):
        StudentEMA(other, 0.5).read(reader, placements(other))
    wider = nn.Sequential(nn.Linear(3, 5))
    with pytest.raises(CheckpointError, match="holds 12 of the 15 elements"):
        StudentEMA(wider, 0.5).read(reader, placements(wider))
    with pytest.raises(ValueError, match="decay"):
        StudentEMA(m, 1.0)
