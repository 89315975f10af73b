"""Bytes per rank of a training layout, from the model's parameter list and DeepSpeed's rules.

The student's state follows what :mod:`d2m_dist.parallel.deepspeed_setup` builds and
what DeepSpeed 0.19 allocates for it (read from its source, checked against live
engines in tests/plan/test_memory.py):

* the student's module is fp32 (bf16 is autocast), its experts split over ``ep``;
* **ZeRO-1/2**: every rank holds the whole (local) module. Trainable parameters are
  flattened per optimizer group into one buffer padded to a multiple of
  ``2 x dp`` elements (``nccl_start_alignment_factor``), the module's tensors become
  views of it. Groups: the dense parameters (data-parallel over the world) and,
  with ``ep > 1``, the experts in chunks of at most 178,956,971 elements
  (``split_params_into_different_moe_groups_for_optimizer``), data-parallel over
  ``world / ep``. Each rank owns ``padded / dp`` of a group: an fp32 master copy
  and Adam's two moments (12 bytes per element), and the gradients of every
  parameter that overlaps its share (``grads_in_partition``, whole parameters);
  a 5e8-element fp32 gradient staging bucket per communication dtype (under bf16
  autocast ``nn.Linear`` weights reduce in bf16, the rest in fp32: two buckets);
* **ZeRO-3**: every parameter is cut into ``ceil(n / world)``-element partitions
  (the last padded); parameters of at most 100,000 elements also stay whole on
  every rank (``param_persistence_threshold``); trainable partitions get an fp32
  master, two moments and an fp32 gradient partition;
* the teacher: whole in its dtype (``resident``), ZeRO-3 partitions with no
  persistence (``sharded``), or those partitions in host memory (``offload``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Sequence

# DeepSpeed 0.19.8 constants (deepspeed/runtime/zero/*.py, deepspeed/moe/utils.py)
ALIGNMENT_FACTOR = 2  # stage_1_and_2.py: nccl_start_alignment_factor
MOE_MAX_GROUP_SIZE = 178956971  # moe/utils.py: split_params_into_different_moe_groups_for_optimizer
PERSISTENCE_THRESHOLD = 100_000  # ZeRO-3 param_persistence_threshold (DeepSpeed's default; our student keeps it)
REDUCE_BUCKET_ELEMENTS = 500_000_000  # reduce_bucket_size: one staging buffer per gradient communication dtype
ADAM_BYTES = 12  # fp32 master + exp_avg + exp_avg_sq, per trainable element a rank owns
FP32 = 4


@dataclass(frozen=True)
class Param:
    """One student parameter as DeepSpeed sees it on a rank."""

    name: str
    numel: int  # elements on this rank's module (an expert stack: this rank's experts only)
    expert: bool
    trainable: bool
    # owned by exactly an nn.Linear/ConvNd: under bf16 autocast DeepSpeed reduces its gradient in bf16
    # (runtime/torch_autocast.init_autocast_params), everything else in fp32
    linear: bool = False


@dataclass
class Split:
    """Bytes of one kind, the experts apart from the rest."""

    experts: int = 0
    rest: int = 0

    @property
    def total(self) -> int:
        return self.experts + self.rest

    def add(self, expert: bool, nbytes: int) -> None:
        if expert:
            self.experts += nbytes
        else:
            self.rest += nbytes


@dataclass
class StudentState:
    params: Split = field(default_factory=Split)
    grads: Split = field(default_factory=Split)
    optimizer: Split = field(default_factory=Split)
    comm_buffers: int = 0  # ZeRO-1/2 gradient staging buckets, allocated at the first backward

    def as_dict(self) -> Dict[str, int]:
        out = {}
        for kind in ("params", "grads", "optimizer"):
            s: Split = getattr(self, kind)
            out.update({f"{kind}_experts": s.experts, f"{kind}_rest": s.rest, kind: s.total})
        out["comm_buffers"] = self.comm_buffers
        return out


def padded(numel: int, dp: int) -> int:
    """A ZeRO-1/2 flat group's length: ``numel`` rounded up to a multiple of 2 x dp."""
    unit = ALIGNMENT_FACTOR * dp
    return math.ceil(numel / unit) * unit


def optimizer_groups(params: Sequence[Param], world: int, ep: int) -> List[tuple]:
    """``(params, dp)`` of each optimizer group, in DeepSpeed's order (deepspeed_setup.student_engine)."""
    trainable = [p for p in params if p.trainable]
    experts_train = any(p.expert for p in trainable)
    if ep == 1 or not experts_train:
        return [(trainable, world)]
    dense = [p for p in trainable if not p.expert]
    groups = [(dense, world)] if dense else []
    chunk: List[Param] = []
    size = 0
    for p in (p for p in trainable if p.expert):  # greedy chunks, as DeepSpeed cuts them
        if chunk and size + p.numel > MOE_MAX_GROUP_SIZE:
            groups.append((chunk, world // ep))
            chunk, size = [], 0
        chunk.append(p)
        size += p.numel
    if chunk:
        groups.append((chunk, world // ep))
    return groups


def _owned_params(group: Sequence[Param], dp: int, rank: int) -> List[Param]:
    """The parameters of a flat group that overlap ``rank``'s share (grads_in_partition holds them whole)."""
    share = padded(sum(p.numel for p in group), dp) // dp
    lo, hi = rank * share, (rank + 1) * share
    out, start = [], 0
    for p in group:
        end = start + p.numel
        if start < hi and end > lo:
            out.append(p)
        start = end
    return out


def comm_dtypes(params: Sequence[Param], bf16: bool) -> set:
    """The gradient communication dtypes of the trainable parameters (bytes per element)."""
    return {2 if (bf16 and p.linear) else FP32 for p in params if p.trainable}


def zero12_state(params: Sequence[Param], world: int, ep: int, rank: int = 0, bf16: bool = False) -> StudentState:
    """ZeRO-1/2: what global ``rank`` holds. Its index in the dense group is ``rank``; DeepSpeed's
    expert-data-parallel groups are strided (ranks ``r % ep, r % ep + ep, ...``), so there it is ``rank // ep``."""
    s = StudentState()
    for p in params:
        if not p.trainable:
            s.params.add(p.expert, FP32 * p.numel)
    for group, dp in optimizer_groups(params, world, ep):
        if not group:
            continue
        n = sum(p.numel for p in group)
        flat = padded(n, dp)
        expert = group[0].expert and ep > 1  # with ep 1 the experts share the dense group
        index = rank // ep if expert else rank % dp
        if expert or ep > 1 or not any(p.expert for p in group):
            s.params.add(expert, FP32 * flat)
            s.optimizer.add(expert, ADAM_BYTES * flat // dp)
        else:  # one group holding both: its padding and shares split by element count
            e = sum(p.numel for p in group if p.expert)
            s.params.add(True, FP32 * e)
            s.params.add(False, FP32 * (flat - e))
            share = flat // dp
            e_share = _expert_elements_in_share(group, dp, index)
            s.optimizer.add(True, ADAM_BYTES * e_share)
            s.optimizer.add(False, ADAM_BYTES * (share - e_share))
        for p in _owned_params(group, dp, index):
            s.grads.add(p.expert, FP32 * p.numel)
    # contiguous gradients: an fp32 staging bucket per gradient communication dtype
    s.comm_buffers = FP32 * REDUCE_BUCKET_ELEMENTS * len(comm_dtypes(params, bf16))
    return s


def _expert_elements_in_share(group: Sequence[Param], dp: int, rank: int) -> int:
    share = padded(sum(p.numel for p in group), dp) // dp
    lo, hi = rank * share, (rank + 1) * share
    start, count = 0, 0
    for p in group:
        end = start + p.numel
        if p.expert:
            count += max(0, min(end, hi) - max(start, lo))
        start = end
    return count


def partition(numel: int, world: int) -> int:
    """A ZeRO-3 partition's length: ``ceil(numel / world)``."""
    return math.ceil(numel / world)


def zero3_state(params: Sequence[Param], world: int, bf16: bool = False) -> StudentState:
    s = StudentState()
    for p in params:
        part = partition(p.numel, world)
        whole = p.numel if p.numel <= PERSISTENCE_THRESHOLD else 0
        s.params.add(p.expert, FP32 * (part + whole))
        if p.trainable:
            s.optimizer.add(p.expert, ADAM_BYTES * part)
            s.grads.add(p.expert, FP32 * part)
    # contiguous gradients (ZeRO-3's default): a staging bucket in each communication dtype, made with the optimizer
    s.comm_buffers = sum(nbytes * REDUCE_BUCKET_ELEMENTS for nbytes in comm_dtypes(params, bf16))
    return s


def student_state(params: Sequence[Param], world: int, ep: int, zero: int, rank: int = 0,
                  bf16: bool = False) -> StudentState:
    if zero == 3:
        if ep != 1:
            raise ValueError("ZeRO-3 runs with ep 1 (expert shards differ by rank)")
        return zero3_state(params, world, bf16)
    return zero12_state(params, world, ep, rank, bf16)


def worst_rank_state(params: Sequence[Param], world: int, ep: int, zero: int, bf16: bool = False) -> StudentState:
    """The rank holding the most (ZeRO-1/2 shares differ: whole parameters straddle share boundaries)."""
    if zero == 3:
        return student_state(params, world, ep, zero, 0, bf16)
    states = [zero12_state(params, world, ep, r, bf16) for r in range(world)]
    return max(states, key=lambda s: s.params.total + s.grads.total + s.optimizer.total)


@dataclass
class TeacherState:
    device: int  # bytes on each GPU
    host: int  # bytes in host memory, per rank (offload)

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)


def teacher_state(numels: Sequence[int], world: int, placement: str, element_bytes: int) -> TeacherState:
    if placement == "resident":
        return TeacherState(element_bytes * sum(numels), 0)
    shards = element_bytes * sum(partition(n, world) for n in numels)
    return TeacherState(shards, 0) if placement == "sharded" else TeacherState(0, shards)
