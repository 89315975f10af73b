"""StudentEMA on a plain (unsharded) model: the average, its checkpoint state, its checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

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


def test_ema_state_round_trip_and_mismatch():
    m = _model()
    a = StudentEMA(m, decay=0.5)
    with torch.no_grad():
        m[0].bias.fill_(2.0)
    a.update()
    b = StudentEMA(_model(), decay=0.5)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(b.shadow[k], a.shadow[k]) for k in a.shadow)
    with pytest.raises(ValueError, match="no EMA state"):
        b.load_state_dict(None)
    with pytest.raises(ValueError, match="other parameters"):
        StudentEMA(nn.Linear(3, 4), 0.5).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="same world size"):
        StudentEMA(nn.Sequential(nn.Linear(3, 5)), 0.5).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="decay"):
        StudentEMA(m, 1.0)
