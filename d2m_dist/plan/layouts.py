"""A layout's bytes per GPU and host, its verdict, its step time; every feasible layout ranked.

A layout is where the stage's state lives on a cluster: ``ep`` (experts split over
ranks), the student's ZeRO stage (2, or 3 with ``ep = 1``), the teacher's placement,
the per-GPU batch and activation checkpointing. :func:`plan_layout` sums what one GPU
and one node's host memory hold (the exact state of :mod:`.memory`, the estimates of
:mod:`.traffic`) and names the first thing that does not fit; :func:`rank_layouts`
tries every ``ep`` that divides the world and every site's expert count, both ZeRO
stages and the three placements, and orders those that fit by estimated images/s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from d2m_dist.config import ConfigError
from d2m_dist.plan.inventory import PlannedStage
from d2m_dist.plan.memory import FP32, teacher_state, worst_rank_state
from d2m_dist.plan.traffic import Rates, Tokens, step_seconds, step_traffic

# what the CUDA context, the allocator's fragmentation and NCCL's own buffers take beyond the tensors
GPU_RESERVE_FRACTION = 0.10


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_mem: int  # bytes
    host_mem: int  # bytes per node
    rates: Rates = field(default_factory=Rates)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Layout:
    ep: int
    zero: int
    teacher: str
    batch: int
    act_ckpt: bool = False

    def name(self) -> str:
        ckpt = " +ckpt" if self.act_ckpt else ""
        return f"ep {self.ep}, ZeRO-{self.zero}, teacher {self.teacher}, batch {self.batch}{ckpt}"


@dataclass
class LayoutPlan:
    layout: Layout
    gpu: Dict[str, int]  # bytes per GPU by item
    host: Dict[str, int]  # bytes per node
    traffic: Dict[str, int]  # bytes a rank sends per step
    seconds: Dict[str, float]
    images_per_s: float
    fits: bool
    overflow: Optional[str]  # the first thing that does not fit, in words
    activations_without_ckpt: int
    activations_with_ckpt: int

    def as_dict(self) -> Dict:
        return {"layout": self.layout.__dict__, "gpu_bytes": self.gpu, "gpu_total": sum(self.gpu.values()),
                "host_bytes_per_node": self.host, "traffic_bytes_per_step": self.traffic, "seconds": self.seconds,
                "images_per_s": self.images_per_s, "fits": self.fits, "overflow": self.overflow,
                "activations": {"without_ckpt": self.activations_without_ckpt,
                                "with_ckpt": self.activations_with_ckpt}}


def check_layout(planned: PlannedStage, cluster: Cluster, layout: Layout) -> None:
    world = cluster.world
    if layout.zero not in (2, 3):
        raise ConfigError(f"--zero {layout.zero}: 2 or 3")
    if layout.teacher not in ("resident", "sharded", "offload"):
        raise ConfigError(f"--teacher {layout.teacher}: resident, sharded or offload")
    if layout.ep < 1 or world % layout.ep:
        raise ConfigError(f"--ep {layout.ep} does not divide the world size {world}")
    bad = sorted({n for n in planned.expert_counts() if n % layout.ep})
    if bad:
        raise ConfigError(f"--ep {layout.ep} does not divide the expert count {bad[0]} of a site")
    if layout.zero == 3 and layout.ep > 1:
        raise ConfigError("ZeRO-3 runs with ep 1 (expert shards differ by rank): --ep 1 or --zero 2")
    if layout.batch < 1:
        raise ConfigError(f"--batch {layout.batch}: must be >= 1")


def plan_layout(planned: PlannedStage, cluster: Cluster, layout: Layout, tokens: Tokens) -> LayoutPlan:
    check_layout(planned, cluster, layout)
    world, g = cluster.world, cluster.gpus_per_node
    bf16, teacher_bytes = planned.bf16, planned.teacher_bytes
    params = planned.params(layout.ep)
    state = worst_rank_state(params, world, layout.ep, layout.zero, bf16)
    teacher = teacher_state(planned.teacher_numels(), world, layout.teacher, teacher_bytes)
    acts = planned.activations(tokens.image, tokens.text, layout.batch, layout.ep)
    chosen = acts["with_ckpt" if layout.act_ckpt else "without_ckpt"]
    trained = sum(p.numel for p in params if p.trainable)
    gpu = {
        "student_params_experts": state.params.experts, "student_params_rest": state.params.rest,
        "optimizer_experts": state.optimizer.experts, "optimizer_rest": state.optimizer.rest,
        "ema": FP32 * trained if planned.stage.ema.enabled else 0,  # an fp32 copy of what trains
        "teacher": teacher.device,
        "activations": chosen["student"], "weight_copies": chosen["weight_copies"],
        "teacher_features": chosen["teacher_features"],
        "grads_experts": state.grads.experts, "grads_rest": state.grads.rest,
        "comm_buffers": state.comm_buffers,
    }
    # every rank first reads the whole (local) fp32 student and the teacher into host memory, then moves the
    # student whole onto its GPU before DeepSpeed flattens or partitions it
    local_student = FP32 * sum(p.numel for p in params)
    teacher_whole = teacher_bytes * sum(planned.teacher_numels())
    host = {"teacher_offload": teacher.host * g, "start_up_loading": g * (local_student + teacher_whole)}
    traffic = step_traffic(planned.student, params, planned.teacher_numels(), t=tokens, batch=layout.batch,
                           world=world, ep=layout.ep, zero=layout.zero, teacher=layout.teacher, bf16=bf16,
                           teacher_bytes=teacher_bytes)
    seconds = step_seconds(planned.student, planned.teacher, tokens, layout.batch, traffic, world=world,
                           gpus_per_node=g, ep=layout.ep, rates=cluster.rates)
    budget = int(cluster.gpu_mem * (1 - GPU_RESERVE_FRACTION))
    overflow = None
    total = sum(gpu.values())
    resident_teacher = teacher_bytes * sum(planned.teacher_numels()) if layout.teacher == "resident" else 0
    if local_student + resident_teacher > budget:
        overflow = (f"GPU memory at start-up: the whole fp32 student ({_gb(local_student)}) goes onto the GPU "
                    f"before ZeRO shards it{' beside the resident teacher' if resident_teacher else ''}")
    elif total > budget:
        largest = max(gpu, key=gpu.get)
        overflow = f"GPU memory: {_gb(total)} of {_gb(budget)} usable; the largest item is {largest} ({_gb(gpu[largest])})"
    elif max(host["teacher_offload"], host["start_up_loading"]) > cluster.host_mem:
        item = max(host, key=host.get)
        overflow = f"host memory: {item} ({_gb(host[item])} of {_gb(cluster.host_mem)} per node)"
    return LayoutPlan(layout, gpu, host, traffic.as_dict(), seconds, world * layout.batch / seconds["step"],
                      overflow is None, overflow, sum(acts["without_ckpt"].values()), sum(acts["with_ckpt"].values()))


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def candidate_layouts(planned: PlannedStage, cluster: Cluster, batch: int, ep: Optional[int] = None,
                      zero: Optional[int] = None, teacher: Optional[str] = None,
                      act_ckpt: Optional[bool] = None) -> List[Layout]:
    if zero == 3 and ep is not None and ep > 1:
        raise ConfigError("ZeRO-3 runs with ep 1 (expert shards differ by rank): --ep 1 or --zero 2")
    counts = planned.expert_counts() or [1]
    common = math.gcd(cluster.world, *counts)
    eps = [ep] if ep is not None else [e for e in range(1, common + 1) if common % e == 0]
    zeros = [zero] if zero is not None else [2, 3]
    teachers = [teacher] if teacher is not None else ["resident", "sharded", "offload"]
    # the trainer does not checkpoint activations yet: such layouts are planned only when asked for
    ckpts = [bool(act_ckpt)]
    return [Layout(e, z, t, batch, c) for e in eps for z in zeros for t in teachers for c in ckpts
            if not (z == 3 and e > 1)]


def rank_layouts(planned: PlannedStage, cluster: Cluster, tokens: Tokens, layouts: List[Layout],
                 **kw) -> List[LayoutPlan]:
    """Every layout planned; those that fit first, fastest first, then the rest by GPU bytes."""
    plans = [plan_layout(planned, cluster, layout, tokens, **kw) for layout in layouts]
    return sorted(plans, key=lambda p: (not p.fits, -p.images_per_s if p.fits else sum(p.gpu.values())))
