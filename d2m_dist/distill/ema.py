"""Exponential moving average of the student's trainable weights, sharded like the weights.

Each rank averages only what it holds: under ZeRO-3 (stage 1) its partition of
each parameter (``ds_tensor``), under expert parallelism its local experts, and
the replicated rest in full. The shadow lives in fp32 next to the weights, is
saved with each checkpoint as ranges of the global tensors (so a resume in another
layout slices it anew), and is assembled into full tensors only for the export
(a collective call).

Frozen parameters are not averaged: they never change, so their EMA is the
parameter itself.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist
from torch import nn

from d2m_dist.ckpt.checkpoint import CheckpointError, CheckpointReader, FragmentWriter
from d2m_dist.ckpt.fragments import Placement
from d2m_dist.models.moe import MoEFeedForward


def _zero3_partitioned(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor") and hasattr(p, "ds_numel")


class StudentEMA:
    def __init__(self, model: nn.Module, decay: float, ep_group=None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.ep_group = ep_group
        self.params: Dict[str, nn.Parameter] = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # parameters whose local tensor is this rank's slice of the expert stack (global ids by rank)
        self.expert_local = {
            f"{name}.experts.{w}"
            for name, m in model.named_modules()
            if isinstance(m, MoEFeedForward) and m.experts.num_local != m.num_experts
            for w, _ in m.experts.named_parameters()
        }
        self.shadow: Dict[str, torch.Tensor] = {n: self._local(p).detach().float().clone()
                                                for n, p in self.params.items()}

    @staticmethod
    def _local(p: nn.Parameter) -> torch.Tensor:
        return p.ds_tensor if _zero3_partitioned(p) else p.data

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: shadow <- decay * shadow + (1 - decay) * weights."""
        for n, p in self.params.items():
            self.shadow[n].lerp_(self._local(p).float(), 1.0 - self.decay)

    # -- checkpointing: ranges of the global tensors, any layout ------------------------

    def write(self, writer: FragmentWriter, places: Dict[str, Placement], rank: int, ep_size: int) -> None:
        """This rank's share, written once over all ranks: ZeRO-3 partitions by every rank, expert
        shards by the first expert-parallel group (ranks 0..ep_size-1), replicated tensors by rank 0."""
        for n, p in self.params.items():
            t = self.shadow[n]
            if _zero3_partitioned(p):
                start = dist.get_rank(p.ds_process_group) * t.numel()
                numel = min(t.numel(), p.ds_numel - start)
                if numel > 0:
                    writer.add(n, "ema", start, t.reshape(-1)[:numel])
            elif n in self.expert_local:
                if rank < ep_size:
                    writer.add(n, "ema", places[n].offset, t)
            elif rank == 0:
                writer.add(n, "ema", 0, t)

    def read(self, reader: CheckpointReader, places: Dict[str, Placement]) -> None:
        """This rank's shadows from a checkpoint written in any layout."""
        for n, p in self.params.items():
            if not reader.has(n, "ema"):
                raise CheckpointError(f"checkpoint {reader.folder}: no EMA of {n} (written with ema.enabled=false, "
                                      f"or with other trainable parameters)")
            t = self.shadow[n]
            if _zero3_partitioned(p):
                start = dist.get_rank(p.ds_process_group) * t.numel()
                numel = min(t.numel(), p.ds_numel - start)
                flat = torch.zeros(t.numel(), dtype=t.dtype)
                if numel > 0:
                    flat[:numel] = reader.read(n, "ema", start, numel)
                t.copy_(flat.view_as(t))
            else:
                t.copy_(reader.read(n, "ema", places[n].offset, places[n].numel).view_as(t))

    # -- export -----------------------------------------------------------------------

    @torch.no_grad()
    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """Full EMA tensors on CPU, named like the model's parameters. Collective."""
        out: Dict[str, torch.Tensor] = {}
        for n, p in self.params.items():
            t = self.shadow[n]
            if _zero3_partitioned(p):
                group = getattr(p, "ds_process_group", None)
                parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
                dist.all_gather(parts, t.contiguous(), group=group)
                t = torch.cat(parts)[: p.ds_numel].view(p.ds_shape)
            elif n in self.expert_local and self.ep_group is not None:
                parts = [torch.empty_like(t) for _ in range(dist.get_world_size(self.ep_group))]
                dist.all_gather(parts, t.contiguous(), group=self.ep_group)
                t = torch.cat(parts)
            out[n] = t.to(p.dtype).cpu()
        return out
