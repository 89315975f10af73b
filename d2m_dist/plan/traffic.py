"""Communication and step time of a layout: estimates, with their assumptions named.

Unlike the parameter, gradient and optimizer bytes (:mod:`.memory`, exact), these are
models:

* **activations**: :mod:`.activations` (a traced twin of the student, scaled);
* **communication** (bytes a rank sends per micro-batch): the MoE token exchange,
  dispatch (row and gate in the FFN input's fp32) and combine (the expert output,
  bf16 under autocast) in the forward and their gradients in the backward, per
  site, times the share of rows that leave the rank, ``(ep - 1) / ep``; ZeRO-2's gradient
  reduce-scatter and parameter all-gather of the trained tensors over their
  data-parallel group, ``(dp - 1) / dp`` of 4 bytes each; ZeRO-3's parameter
  all-gathers (forward and backward) and gradient reduce-scatter; a sharded or
  offloaded teacher's all-gather per forward, and an offloaded one's copy from host;
* **step time**: FLOPs (student forward + backward = 3 forwards, teacher 1 forward)
  at ``tflops`` achieved per GPU, plus each traffic over its link (NVLink inside a
  node, the network between nodes), nothing overlapped: an upper bound the flags
  (``--tflops``, ``--intra-gbps``, ``--inter-gbps``, ``--pcie-gbps``) calibrate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Sequence

from torch import nn

from d2m_dist.models.flops import forward_flops
from d2m_dist.models.mob import MoBGroup
from d2m_dist.models.moe import MoEFeedForward
from d2m_dist.plan.memory import FP32, Param


@dataclass(frozen=True)
class Tokens:
    image: int
    text: int

    @property
    def joint(self) -> int:
        return self.image + self.text


@dataclass
class Traffic:
    """Bytes one rank sends per micro-batch (gradient accumulation repeats the all_to_alls, not the rest)."""

    moe_all_to_all: int = 0
    grad_reduce: int = 0
    param_gather: int = 0
    teacher_gather: int = 0
    host_to_device: int = 0

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)


def moe_exchange_bytes(student: nn.Module, t: Tokens, batch: int, ep: int, bf16: bool) -> int:
    """Bytes a rank sends in MoE all_to_alls per micro-batch: per assignment, the dispatch carries the row and its
    gate in the FFN input's dtype (fp32: the residual stream's norm stays fp32 under autocast) and the combine the
    expert's output (bf16 under autocast); the backward sends their gradients, of the same sizes."""
    if ep == 1:
        return 0
    total = 0.0

    def visit(module: nn.Module, rate: float) -> None:
        nonlocal total
        for child in module.children():
            if isinstance(child, MoBGroup):
                for b in child.blocks:
                    visit(b, rate * (1.0 if child.unit_gates else child.kappa / child.m))
            elif isinstance(child, MoEFeedForward):
                k = child.num_experts if child.unit_gates else child.top_k
                tokens = _site_tokens(module, child, t)
                d = child.shape.dim
                per_row = FP32 * (d + 1) + (2 if bf16 else FP32) * d  # dispatch + combine
                total += rate * 2 * batch * tokens * k * per_row  # forward and backward
            else:
                visit(child, rate)

    visit(student, 1.0)
    return int(total * (ep - 1) / ep)


def _site_tokens(parent: nn.Module, layer: MoEFeedForward, t: Tokens) -> int:
    if getattr(parent, "ff", None) is layer:
        return t.image
    if getattr(parent, "ff_context", None) is layer:
        return t.text
    return t.joint


def step_traffic(student: nn.Module, params: Sequence[Param], teacher_numels: Sequence[int], *, t: Tokens,
                 batch: int, world: int, ep: int, zero: int, teacher: str, bf16: bool,
                 teacher_bytes: int) -> Traffic:
    tr = Traffic(moe_all_to_all=moe_exchange_bytes(student, t, batch, ep, bf16))

    def share(dp: int) -> float:
        return (dp - 1) / dp if dp > 1 else 0.0

    if zero == 3:
        everything = sum(p.numel for p in params)
        trained = sum(p.numel for p in params if p.trainable)
        tr.param_gather = int(2 * everything * FP32 * share(world))  # forward and backward
        tr.grad_reduce = int(trained * FP32 * share(world))
    else:
        for p in params:
            if p.trainable:
                dp = world // ep if (p.expert and ep > 1) else world
                tr.grad_reduce += int(p.numel * FP32 * share(dp))
                tr.param_gather += int(p.numel * FP32 * share(dp))
    if teacher in ("sharded", "offload"):
        tr.teacher_gather = int(sum(teacher_numels) * teacher_bytes * share(world))
    if teacher == "offload":
        tr.host_to_device = int(sum(-(-n // world) for n in teacher_numels) * teacher_bytes)
    return tr


@dataclass(frozen=True)
class Rates:
    """What a step-time estimate assumes of the hardware (flags of ``d2m plan``)."""

    tflops: float = 400.0  # achieved bf16 TFLOP/s per GPU (H100 SXM: ~990 peak dense; ~40% achieved)
    intra_gbps: float = 300.0  # GB/s a GPU sends inside a node (NVLink 4: 450 GB/s per direction, ~2/3 reached)
    inter_gbps: float = 40.0  # GB/s a GPU sends to other nodes (400 Gb/s InfiniBand per GPU = 50 GB/s)
    pcie_gbps: float = 25.0  # GB/s host -> GPU (PCIe 5 x16: 64 GB/s peak; pinned, shared by the node's GPUs)


def step_seconds(student: nn.Module, teacher: nn.Module, t: Tokens, batch: int, traffic: Traffic, *, world: int,
                 gpus_per_node: int, ep: int, rates: Rates) -> Dict[str, float]:
    flops = batch * (3 * forward_flops(student, t.image, t.text).flops + forward_flops(teacher, t.image, t.text).flops)
    multi_node = world > gpus_per_node
    ep_spans_nodes = ep > gpus_per_node or gpus_per_node % ep != 0  # a group that straddles a node boundary
    link = (rates.inter_gbps if multi_node else rates.intra_gbps) * 1e9
    out = {
        "compute": flops / (rates.tflops * 1e12),
        "moe_all_to_all": traffic.moe_all_to_all / ((rates.inter_gbps if ep_spans_nodes else rates.intra_gbps) * 1e9),
        "gradients_and_params": (traffic.grad_reduce + traffic.param_gather) / link,
        "teacher": traffic.teacher_gather / link + traffic.host_to_device / (rates.pcie_gbps * 1e9),
    }
    out["step"] = sum(out.values())
    return out
