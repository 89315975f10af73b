"""Tapping block outputs of the teacher and the student during their forward passes.

Every entry of a FLUX transformer's two block lists (a block, or a MoB group in
the student) returns ``(encoder_hidden_states, hidden_states)``; its feature is
both streams concatenated over tokens. Taps are keyed by the dense index of the
entry's last block, ``double.<i>`` / ``single.<i>``, so a student MoB group's
output lines up with the teacher's block at the end of that group.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Tuple

import torch
from torch import nn

from d2m_dist.models.mob import group_last_blocks

STREAMS = (("double", "transformer_blocks"), ("single", "single_transformer_blocks"))


def tap_points(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(key, module) for every entry of both block lists."""
    points = []
    for stream, attr in STREAMS:
        entries = getattr(model, attr)
        for entry, last in zip(entries, group_last_blocks(model, attr)):
            points.append((f"{stream}.{last}", entry))
    return points


@contextmanager
def tapped(model: nn.Module, *, detach: bool) -> Iterator[Dict[str, torch.Tensor]]:
    """Collect block-list outputs of ``model`` during the ``with`` body.

    ``detach`` for the teacher: features are kept without any graph.
    """
    feats: Dict[str, torch.Tensor] = {}

    def hook(key):
        def fn(module, args, output):
            enc, hid = output
            f = torch.cat([enc, hid], dim=1)
            feats[key] = f.detach() if detach else f

        return fn

    handles = [m.register_forward_hook(hook(k)) for k, m in tap_points(model)]
    try:
        yield feats
    finally:
        for h in handles:
            h.remove()
