"""DeepSpeed engines for the student (ZeRO-2/3, expert parallelism) and the frozen teacher (ZeRO-3).

Expert parallelism with our own MoE layer (docs/DECISIONS.md has the evidence):

1. the expert-parallel groups are DeepSpeed's own ``ep_size_<n>`` groups (so that its
   ZeRO optimizer reduces expert gradients in the matching expert-data-parallel
   groups); the student is split over them by ``parallel/expert_parallel.py``;
2. DeepSpeed recognises MoE layers only by ``isinstance(m, deepspeed.moe.layer.MoE)``,
   so each MoE layer's class is switched to a subclass of it with DeepSpeed's MoE
   class as a marker base (its ``__init__`` never runs; one such class per layer
   class) and the attributes the engine reads; expert parameters carry
   ``allreduce=False`` and their group name, so ZeRO reduces them only inside their
   expert-data-parallel group;
3. state-dict hooks present the stacked experts as DeepSpeed's per-expert modules
   (DeepSpeed's own MoE code expects them); our checkpoints do not go through
   DeepSpeed (:mod:`d2m_dist.ckpt`), they store each rank's fragments of the
   global tensors, experts by global id;
4. frozen parameters are left out of checkpoints (DeepSpeed's frozen copy would be
   rank 0's experts for every rank); they come back from the init weights.

This room knows no model class: an expert layer is any module with the
``parallel/expert_parallel.ExpertLayer`` attributes.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups
from torch import nn

from d2m_dist.config import StageConfig
from d2m_dist.parallel.dist import DistInfo
from d2m_dist.parallel.expert_parallel import EXPERT_WEIGHTS, expert_layers

DS_EXPERT_PREFIX = "deepspeed_moe.experts.deepspeed_experts."


def expert_group(ep_size: int):
    """DeepSpeed's expert-parallel group for ``ep_size`` (created on first use); None for ep_size 1."""
    if ep_size == 1:
        return None
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name)


def _set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
    # the engine calls this on every MoE layer; our groups exist already (expert_group)
    if use_data_before_expert_parallel_:
        raise ValueError("d2m builds expert groups with the expert-then-data layout")


_MARKED: Dict[type, type] = {}  # layer class -> its DeepSpeed-marked subclass, made once


def _marked_class(cls: type) -> type:
    """``cls`` as DeepSpeed's engine sees it: a subclass with DeepSpeed's MoE as marker base."""
    if issubclass(cls, DeepSpeedMoE):
        return cls
    if cls not in _MARKED:
        _MARKED[cls] = type(f"DeepSpeed{cls.__name__}", (DeepSpeedMoE, cls),
                            {"forward": cls.forward, "set_deepspeed_parallelism": _set_deepspeed_parallelism,
                             "__doc__": f"{cls.__name__} marked as a DeepSpeed MoE layer (parallel/deepspeed_setup.py)"})
    return _MARKED[cls]


def _split_experts(module, state_dict, prefix, local_metadata):
    for w in EXPERT_WEIGHTS:
        key = f"{prefix}experts.{w}"
        if key in state_dict:
            stacked = state_dict.pop(key)
            for j in range(stacked.shape[0]):
                state_dict[f"{prefix}{DS_EXPERT_PREFIX}{j}.{w}"] = stacked[j]


def _stack_experts(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    for w in EXPERT_WEIGHTS:
        keys = [f"{prefix}{DS_EXPERT_PREFIX}{j}.{w}" for j in range(module.experts.num_local)]
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}experts.{w}"] = torch.stack([state_dict.pop(k) for k in keys])


def adopt_moe_layers(model: nn.Module, ep_size: int) -> None:
    """Make every MoE layer of ``model`` an expert-parallel layer DeepSpeed manages (ep_size > 1)."""
    if ep_size == 1:
        return
    name = f"ep_size_{ep_size}"
    for _, m in expert_layers(model):
        if not isinstance(m, DeepSpeedMoE):
            m.__class__ = _marked_class(type(m))  # same instance and parameters; only DeepSpeed's view changes
            m.expert_group_name = name
            m.num_local_experts = m.experts.num_local
            m.enable_expert_tensor_parallelism = False
            m.use_residual = False
            for p in m.experts.parameters():
                p.allreduce = False
                p.group_name = name
            m.register_state_dict_post_hook(_split_experts)
            m.register_load_state_dict_pre_hook(_stack_experts)


def use_bf16(cfg: StageConfig, info: DistInfo) -> bool:
    if cfg.precision == "auto":
        return info.device.type == "cuda"
    return cfg.precision == "bf16"


def lr_lambda(cfg: StageConfig):
    o, total = cfg.optim, cfg.steps

    def fn(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.decay == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        if o.decay == "linear":
            return 1.0 - (1.0 - o.min_lr_ratio) * progress
        return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def student_config(cfg: StageConfig, info: DistInfo, stage: int) -> Dict:
    """DeepSpeed's config for the student at ZeRO ``stage`` (the stage recipe decides it)."""
    zero: Dict = {"stage": stage}
    if stage in (1, 2):
        # DeepSpeed's MoE support in ZeRO-1/2 requires both
        zero.update(contiguous_gradients=True, reduce_scatter=True, overlap_comm=False)
    ds = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if use_bf16(cfg, info):
        # fp32 master weights and optimizer; bf16 matrix products inside the engine's forward.
        # Linear weights' gradients are reduced in bf16 (DeepSpeed's comm_dtype), experts' in fp32
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return ds


def _local_expert_copies(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Copies of the expert stacks this rank holds (under expert parallelism they differ by rank)."""
    return {f"{n}.experts.{w}": t.detach().clone() for n, m in expert_layers(model)
            for w, t in m.experts.named_parameters()}


def student_engine(model: nn.Module, cfg: StageConfig, info: DistInfo, zero_stage: int):
    # DeepSpeed's MoE path needs a trainable expert group; with experts frozen (stage 3) the
    # layers stay plain: our all_to_all still routes tokens, no expert gradient exists to reduce
    experts_train = any(p.requires_grad for _, m in expert_layers(model) for p in m.experts.parameters())
    if experts_train:
        adopt_moe_layers(model, cfg.parallel.ep_size)
    # deepspeed.initialize broadcasts every parameter it does not know as an expert from rank 0,
    # frozen ones included: frozen expert shards would all become rank 0's. Put them back after.
    frozen_experts = _local_expert_copies(model) if cfg.parallel.ep_size > 1 and not experts_train else {}
    o = cfg.optim
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": trainable, "name": "dense", "lr": o.lr, "weight_decay": o.weight_decay}]
    if cfg.parallel.ep_size > 1 and experts_train:
        groups = split_params_into_different_moe_groups_for_optimizer(groups[0])
        groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=student_config(cfg, info, zero_stage))
    if frozen_experts:
        params = dict(engine.module.named_parameters())
        with torch.no_grad():
            for name, t in frozen_experts.items():
                params[name].copy_(t)
    return engine


def zero3_inference_engine(model: nn.Module, *, offload: bool, bf16: bool, micro_batch: int, on_gpu: bool):
    """A frozen model as a ZeRO-3 engine without optimizer: weights sharded over ranks, optionally on CPU."""
    zero: Dict = {"stage": 3, "stage3_param_persistence_threshold": 0}
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    ds: Dict = {"train_micro_batch_size_per_gpu": micro_batch, "zero_optimization": zero, "steps_per_print": 10**9}
    if bf16:
        ds["bf16"] = {"enabled": True}
    model.requires_grad_(False).eval()
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds)
    engine.eval()
    return engine


def gather_full_state_dict(model: nn.Module, ep_group: Optional[object]) -> Dict[str, torch.Tensor]:
    """The student's weights with every expert stack complete (global ids), on CPU; collective under EP."""
    params = list(model.named_parameters())
    # ZeRO-3 holds partitions: gather each full tensor (a no-op for ZeRO-1/2); clone, because
    # ZeRO's flat buffers make parameters share storage, which safetensors refuses
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        sd = {n: p.detach().clone().cpu() for n, p in params}
    sd.update({n: b.detach().clone().cpu() for n, b in model.named_buffers()})
    if ep_group is None:
        return sd
    ep = dist.get_world_size(ep_group)
    for name, m in expert_layers(model):
        if m.experts.num_local != m.num_experts:
            for w in EXPERT_WEIGHTS:
                local = getattr(m.experts, w).detach().contiguous()
                parts = [torch.empty_like(local) for _ in range(ep)]
                dist.all_gather(parts, local, group=ep_group)
                sd[f"{name}.experts.{w}"] = torch.cat(parts).cpu()
    return sd


def _nbytes(t: torch.Tensor) -> int:
    # a ZeRO-3 parameter's data is freed between uses; this rank's partition is its ds_tensor
    t = getattr(t, "ds_tensor", t)
    return t.numel() * t.element_size()


def state_bytes(engine) -> Dict[str, int]:
    """What this rank holds for training, in bytes, measured from the live tensors.

    ``expert_weights``: the expert stacks on this rank's module; ``optimizer``: the
    base optimizer's parameters (ZeRO's fp32 partitions) and their state (Adam's
    moments), every group. Expert parallelism divides the first; with one
    expert-data-parallel rank per expert it divides the experts' share of the second.
    """
    experts = sum(_nbytes(p) for _, m in expert_layers(engine.module) for p in m.experts.parameters())
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    optimizer = 0
    for group in base.param_groups:
        for p in group["params"]:
            optimizer += _nbytes(p)
            optimizer += sum(_nbytes(t) for t in base.state.get(p, {}).values()
                             if isinstance(t, torch.Tensor) and t.dim() > 0)
    return {"expert_weights": experts, "optimizer": optimizer}


def _expert_ids(engine) -> set:
    return {id(p) for _, m in expert_layers(engine.module) for p in m.experts.parameters()}


def _tensor_bytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def measured_state(engine) -> Dict[str, int]:
    """Bytes this rank's student engine holds, read from DeepSpeed's own buffers (docs/DECISIONS.md, plan).

    ``params``: the module's weights (ZeRO-1/2: each optimizer group's flat buffer, which the
    trainable parameters are views of, plus the frozen parameters; ZeRO-3: every parameter's
    partition, plus the whole tensor of the ones kept persistent); ``grads``: the gradient
    partition buffer (ZeRO-1/2: between a backward and its step, when it exists); ``optimizer``: the fp32
    partitions and Adam's moments; ``comm_buffers``: the gradient staging buckets. Each but
    the last also split into ``_experts`` and ``_rest``. The planner (:mod:`d2m_dist.plan.memory`)
    predicts the same numbers from the parameter list alone; tests/plan compares them.
    """
    opt = engine.optimizer
    experts = _expert_ids(engine)
    out = {f"{k}_{s}": 0 for k in ("params", "grads", "optimizer") for s in ("experts", "rest")}

    def add(kind: str, expert: bool, nbytes: int) -> None:
        out[f"{kind}_{'experts' if expert else 'rest'}"] += nbytes

    base = getattr(opt, "optimizer", opt)
    if hasattr(opt, "bit16_groups_flat"):  # ZeRO-1/2
        for i, group in enumerate(opt.bit16_groups):
            flat = _tensor_bytes(opt.bit16_groups_flat[i])
            e = sum(p.numel() * p.element_size() for p in group if id(p) in experts)
            moe = base.param_groups[i].get("moe", False)
            add("params", True, flat if moe else e)
            add("params", False, 0 if moe else flat - e)
            held = opt.params_in_partition[i]
            grads_e = sum(p.numel() for p in held if id(p) in experts)
            add("grads", True, grads_e * 4)
            add("grads", False, (sum(p.numel() for p in held) - grads_e) * 4)
            state = [opt.single_partition_of_fp32_groups[i]] + [
                t for t in base.state.get(opt.single_partition_of_fp32_groups[i], {}).values()
                if isinstance(t, torch.Tensor) and t.dim() > 0]
            owned = opt.single_partition_of_fp32_groups[i].numel()
            e_owned = owned if moe else _expert_elements_owned(opt, i, experts)
            nbytes = sum(_tensor_bytes(t) for t in state)
            add("optimizer", True, nbytes * e_owned // owned)
            add("optimizer", False, nbytes - nbytes * e_owned // owned)
        trained = {id(p) for g in opt.bit16_groups for p in g}
        for p in engine.module.parameters():
            if id(p) not in trained:
                add("params", id(p) in experts, _tensor_bytes(p))
        # between a backward and its step the gradients of this rank's share live in the storages the
        # optimizer's averaged_gradients point into (padding included): they are what the rank holds
        storages = {}
        for grads in opt.averaged_gradients.values():
            for t in grads if isinstance(grads, list) else [grads]:
                if t is not None:
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        out["grads_storage"] = sum(storages.values())
        out["comm_buffers"] = sum(_tensor_bytes(b) for bucket in opt.ipg_buckets.values() for b in bucket.buffer)
    else:  # ZeRO-3
        for p in engine.module.parameters():
            whole = _tensor_bytes(p.data) if getattr(p, "ds_persist", False) else 0
            add("params", id(p) in experts, _tensor_bytes(p.ds_tensor) + whole)
            if p.requires_grad:
                add("grads", id(p) in experts, p.ds_tensor.ds_numel * 4)
        buffer = _tensor_bytes(opt.grad_partitions_flat_buffer)
        if buffer != out["grads_experts"] + out["grads_rest"]:
            raise RuntimeError(f"gradient partition buffer holds {buffer} bytes, the partitions {out['grads_experts'] + out['grads_rest']}")
        for i, flat in enumerate(opt.fp32_partitioned_groups_flat):
            state = [flat] + [t for t in base.state.get(flat, {}).values()
                              if isinstance(t, torch.Tensor) and t.dim() > 0]
            nbytes = sum(_tensor_bytes(t) for t in state)
            # a sub-group's flat holds its parameters' partitions in order: split it by their sizes
            members = opt.fp16_partitioned_groups[i]
            owned = sum(t.numel() for t in members)
            e_owned = sum(t.numel() for t, p in zip(members, opt.fp16_groups[i]) if id(p) in experts)
            add("optimizer", True, nbytes * e_owned // max(1, owned))
            add("optimizer", False, nbytes - nbytes * e_owned // max(1, owned))
        out["comm_buffers"] = sum(_tensor_bytes(b.buffer) for b in opt.ipg_buckets.values())
    for kind in ("params", "grads", "optimizer"):
        out[kind] = out[f"{kind}_experts"] + out[f"{kind}_rest"]
    return out


def _expert_elements_owned(opt, i: int, experts: set) -> int:
    """Elements of expert parameters inside this rank's share of ZeRO-1/2 group ``i`` (one group for all)."""
    share = opt.partition_size[i]
    rank = dist.get_rank(group=opt.real_dp_process_group[i])
    lo, hi = rank * share, (rank + 1) * share
    start, count = 0, 0
    for p in opt.round_robin_bit16_groups[i]:
        end = start + p.numel()
        if id(p) in experts:
            count += max(0, min(end, hi) - max(start, lo))
        start = end
    return count
