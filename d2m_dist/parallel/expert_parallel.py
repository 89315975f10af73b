"""Expert parallelism as one explicit step on a built student.

A student is built with every expert on every rank (``models/``). Before its
weights are loaded (on the meta device: nothing is allocated) or after (the
full stacks are copied down to the slice and freed), :func:`apply_expert_parallel`
turns each MoE layer into an expert-parallel one:

* the expert stacks keep only this rank's experts: rank ``r`` of the group of
  size ``p`` owns global experts ``r * n/p .. (r + 1) * n/p - 1``;
* the layer's ``expert_offset`` records the global id of its first expert
  (checkpoints and exports store experts by global id);
* the layer's dispatcher becomes the all-to-all one (``parallel/dispatch.py``).

This room knows no model class: an expert layer is any module with the
:class:`ExpertLayer` attributes (``models/moe.MoEFeedForward`` has them).
"""

from __future__ import annotations

from typing import Iterator, Protocol, Tuple

import torch.distributed as dist
from torch import nn

from d2m_dist.config import ConfigError
from d2m_dist.parallel.dispatch import AllToAllDispatcher

EXPERT_WEIGHTS = ("w1", "b1", "w2")  # the stacked expert tensors, first dimension = expert


class ExpertLayer(Protocol):
    """What expert parallelism needs from an MoE layer."""

    experts: nn.Module  # this rank's expert stack: parameters w1, b1, w2 stacked by local expert
    num_experts: int  # over all ranks
    expert_offset: int  # global id of this rank's first expert
    dispatcher: object  # moves rows to their experts and back (parallel/dispatch.py)


def expert_layers(model: nn.Module) -> Iterator[Tuple[str, ExpertLayer]]:
    """(name, layer) for every module with the :class:`ExpertLayer` attributes."""
    for name, m in model.named_modules():
        if all(hasattr(m, a) for a in ("experts", "num_experts", "expert_offset", "dispatcher")):
            yield name, m  # type: ignore[misc]


def apply_expert_parallel(model: nn.Module, group) -> int:
    """Split every MoE layer's experts over the ranks of ``group``; returns the number of layers split.

    ``group`` None (or of size 1) leaves the model as it is.
    """
    if group is None or dist.get_world_size(group) == 1:
        return 0
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    layers = list(expert_layers(model))
    for name, layer in layers:
        if layer.num_experts % size:
            raise ConfigError(f"ep_size {size} does not divide the {layer.num_experts} experts of {name}",
                              everywhere=True)
        if layer.experts.w1.shape[0] != layer.num_experts:
            raise ValueError(f"{name}: its experts are split already")
        if any(hasattr(p, "allreduce") for p in layer.experts.parameters()):
            # new Parameter objects would lose DeepSpeed's expert marks: its engine would then
            # average different experts over the ranks as if they were one dense weight
            raise ValueError(f"{name}: split experts before DeepSpeed adopts the layer, not after")
    for _, layer in layers:
        local = layer.num_experts // size
        ids = slice(rank * local, (rank + 1) * local)
        for w in EXPERT_WEIGHTS:
            full = getattr(layer.experts, w)
            # a copy, so that the full stack's storage is freed (a view would keep it)
            part = full.detach()[ids].clone()
            setattr(layer.experts, w, nn.Parameter(part, requires_grad=full.requires_grad))
        layer.expert_offset = rank * local
        layer.dispatcher = AllToAllDispatcher(group, layer.num_experts)
    return len(layers)
