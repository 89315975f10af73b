"""Each rank's share of the trainable state, as ranges of the global tensors.

ZeRO partitions a parameter's fp32 master copy and its Adam moments over the
data-parallel ranks; expert parallelism splits the stacked experts over the
expert-parallel ranks first. Whatever the layout, the piece a rank holds is a
contiguous range of the parameter's *global* flattened tensor (routed experts
stacked by global expert id). This module reads and writes those pieces through
DeepSpeed's own accessors, without any collective:

* ZeRO-1/2: ``param._hp_mapping`` (the fragment of the flat fp32 partition that
  belongs to this parameter, and where it sits in the parameter);
* ZeRO-3: the local-partition API (``safe_get_local_fp32_param`` and its twins);
  the last rank's partition carries padding, which is dropped on the way out and
  added back on the way in.

A checkpoint stores every rank's fragments; a resume in any layout assembles each
rank's new ranges from them (:mod:`d2m_dist.ckpt.checkpoint`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state, safe_set_local_fp32_param, safe_set_local_optimizer_state
from torch import nn

from d2m_dist.parallel.deepspeed_setup import expert_layers

MOMENTS = ("exp_avg", "exp_avg_sq")  # torch AdamW's per-parameter state, besides its step count
KINDS = ("fp32",) + MOMENTS


@dataclass(frozen=True)
class Placement:
    """Where this rank's full copy of a parameter sits in the global tensor."""

    global_shape: Tuple[int, ...]
    offset: int  # flat offset of the local tensor in the flattened global tensor
    numel: int  # elements of the local tensor

    @property
    def global_numel(self) -> int:
        return math.prod(self.global_shape)


def placements(model: nn.Module) -> Dict[str, Placement]:
    """Every parameter's placement: routed-expert stacks are this rank's slice of the global stack."""
    experts = {f"{n}.experts.{w}": (m.num_experts, m.expert_offset)
               for n, m in expert_layers(model) for w, _ in m.experts.named_parameters()}
    out = {}
    for name, p in model.named_parameters():
        shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)  # ZeRO-3 keeps the full shape here
        numel = math.prod(shape)
        if name in experts:
            n, first = experts[name]
            per_expert = numel // shape[0]
            out[name] = Placement((n,) + shape[1:], first * per_expert, numel)
        else:
            out[name] = Placement(shape, 0, numel)
    return out


def _zero3(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def _zero3_partition(p: nn.Parameter) -> Tuple[int, int]:
    """(start, size) of this rank's padded ZeRO-3 partition of ``p`` in its flattened tensor."""
    size = p.ds_tensor.numel()
    return dist.get_rank(p.ds_process_group) * size, size


def local_fragment(p: nn.Parameter) -> Optional[Tuple[int, Dict[str, torch.Tensor]]]:
    """(start in the local flattened parameter, {kind: 1-D tensor}) of what this rank holds; None if nothing."""
    if _zero3(p):
        start, size = _zero3_partition(p)
        numel = min(size, p.ds_numel - start)
        if numel <= 0:
            return None
        values = {"fp32": safe_get_local_fp32_param(p)}
        values.update({k: safe_get_local_optimizer_state(p, k) for k in MOMENTS})
        return start, {k: v.reshape(-1)[:numel] for k, v in values.items()}
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return None
    address = mapping.lp_fragment_address
    values = {"fp32": mapping.get_hp_fragment()}
    values.update({k: mapping.get_hp_fragment(k) for k in MOMENTS})
    return address.start, {k: v.reshape(-1) for k, v in values.items()}


def set_local_fragment(p: nn.Parameter, read: Callable[[str, int, int], torch.Tensor]) -> None:
    """Write this rank's fragment of ``p``; ``read(kind, start, numel)`` gives a range of the local flattened tensor.

    Only the ranges this rank holds are read, so a resume reads each stored element about once over all ranks.
    """
    if _zero3(p):
        start, size = _zero3_partition(p)
        numel = max(0, min(size, p.ds_numel - start))
        for kind in KINDS:
            part = torch.zeros(size, dtype=torch.float32)  # the last rank's partition ends in padding
            if numel:
                part[:numel] = read(kind, start, numel)
            part = part.to(p.ds_tensor.device)
            if kind == "fp32":
                safe_set_local_fp32_param(p, part)
            else:
                safe_set_local_optimizer_state(p, part, kind)
        return
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return
    address = mapping.lp_fragment_address
    for kind in KINDS:
        target = mapping.get_hp_fragment(None if kind == "fp32" else kind)
        target.data.copy_(read(kind, address.start, address.numel).reshape(target.shape).to(target))


def base_optimizer(engine):
    """The torch optimizer inside DeepSpeed's ZeRO wrapper (it holds the Adam state)."""
    return engine.optimizer.optimizer


def ensure_adam_state(engine, step: Optional[int] = None) -> None:
    """Adam's per-parameter state exists (zero moments where missing; the step count set to
    ``step`` when given), and ZeRO's fragments point at it.

    A fresh engine has no Adam state until its first step; a checkpoint written before
    any step has none either. ZeRO-1/2 links each parameter's view into the state only
    once, after the first step, and then misses groups stepped later (the expert groups):
    linking again here makes every parameter's fragments valid.
    """
    opt = base_optimizer(engine)
    for flat in _flat_partitions(engine):
        state = opt.state[flat]
        for k in MOMENTS:
            if k not in state:
                state[k] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        if step is not None or "step" not in state:
            state["step"] = torch.tensor(float(step or 0), dtype=torch.float32)
    zero = engine.optimizer
    if hasattr(zero, "_hp_optimizer_states_linked"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _flat_partitions(engine):
    """The fp32 flat partitions Adam steps (its state is keyed by them).

    ZeRO-3 empties the torch optimizer's param groups between steps, so they are read from
    the ZeRO optimizer itself."""
    zero = engine.optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return list(zero.fp32_partitioned_groups_flat)
    return [flat for group in base_optimizer(engine).param_groups for flat in group["params"]]


def adam_step(engine) -> int:
    """Adam's step count (every trainable parameter steps together: skipped steps skip all)."""
    opt = base_optimizer(engine)
    for flat in _flat_partitions(engine):
        step = opt.state.get(flat, {}).get("step")
        if step is not None:
            return int(step)
    return 0


def refresh_model_weights(engine) -> None:
    """Copy the fp32 master partitions into the model's parameters (collective within ZeRO's groups)."""
    zero = engine.optimizer
    if hasattr(zero, "update_lp_params"):  # ZeRO-1/2
        zero.update_lp_params()
        return
    # ZeRO-3: each rank's partition of every parameter, from its fp32 master partition
    for sub, fp32 in enumerate(zero.fp32_partitioned_groups_flat):
        if fp32.numel():
            zero.fp16_partitioned_groups_flat[sub].data.copy_(fp32.data)
        for param, view in zip(zero.fp16_partitioned_groups[sub],
                               zero.unflatten(zero.fp16_partitioned_groups_flat[sub], zero.fp16_partitioned_groups[sub])):
            param.data = view.data


def trainable(model: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)
