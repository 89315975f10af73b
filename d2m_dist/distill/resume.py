"""The stage trainer's whole state in a checkpoint, and back into any layout.

Saved: every trainable parameter's fp32 master weights and Adam moments as ranges
of the global tensors (routed experts by global id), Adam's step, the LR
scheduler's position, the EMA, the trainer's counters and history, the tracking
run id, each rank's data position and RNG states. Frozen parameters come back
from the stage's init folder.

Restored into the engine the current launch built, whatever its world size,
ep_size or ZeRO stage: each rank reads its own ranges (:mod:`d2m_dist.ckpt`).
When the layout is the one the checkpoint was written in, every rank also gets
its exact data position and RNG states back, and the run continues bitwise as if
uninterrupted. When it is not, the data position is redistributed by the batch
source (``load_elastic_state``) and RNGs are reseeded from (seed, step, rank):
nothing the trainer draws depends on them (batches and noise come from their own
generators), so they matter only for reproducibility of that one resume.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Dict, List

import numpy as np
import torch

from d2m_dist.ckpt.checkpoint import CheckpointDir, CheckpointError, CheckpointReader, FragmentWriter, capture_rng, restore_rng
from d2m_dist.ckpt.fragments import (
    adam_step,
    ensure_adam_state,
    local_fragment,
    placements,
    refresh_model_weights,
    set_local_fragment,
    trainable,
)

log = logging.getLogger("d2m_dist.train")


def save_checkpoint(ckpt: CheckpointDir, *, step: int, engine, ema, batches, counters: Dict[str, Any],
                    layout: Dict[str, int], rank: int) -> None:
    """Collective. ``counters``: the trainer's JSON-able state (step, history, run id...)."""
    model = engine.module
    places = placements(model)
    ensure_adam_state(engine)  # links ZeRO's fragments to Adam's state (and creates it before any step)
    writer = FragmentWriter()
    for name, p in trainable(model):
        fragment = local_fragment(p)
        if fragment is not None:
            start, values = fragment
            for kind, t in values.items():
                writer.add(name, kind, places[name].offset + start, t)
    if ema is not None:
        ema.write(writer, places, rank, layout["ep_size"])
    rank_meta = {"data": batches.state_dict(), "rng": capture_rng(writer)}
    scheduler = engine.lr_scheduler
    meta = {**counters, "layout": layout, "adam_step": adam_step(engine),
            "scheduler": {"last_epoch": scheduler.last_epoch, "step_count": getattr(scheduler, "_step_count", 0)},
            "shapes": {name: list(places[name].global_shape) for name, _ in trainable(model)}}
    ckpt.save(step, meta, rank_meta, writer)


def load_checkpoint(reader: CheckpointReader, *, engine, ema, batches, layout: Dict[str, int], rank: int,
                    seed: int) -> Dict[str, Any]:
    """Collective (ZeRO gathers the refreshed weights). Returns the saved counters."""
    meta = reader.meta
    saved = meta["layout"]
    same_layout = saved == layout
    if not same_layout:
        log.warning("elastic resume: %s was written with world_size %d, ep_size %d, ZeRO-%d; continuing with "
                    "world_size %d, ep_size %d, ZeRO-%d", reader.folder, saved["world_size"], saved["ep_size"],
                    saved["zero_stage"], layout["world_size"], layout["ep_size"], layout["zero_stage"])
    model = engine.module
    places = placements(model)
    missing = [n for n, _ in trainable(model) if not reader.has(n, "fp32")]
    if missing:
        raise CheckpointError(f"checkpoint {reader.folder}: no state for {missing[0]} (it trains now but did not "
                              f"when the checkpoint was written: same trainable groups, or start afresh)")
    ensure_adam_state(engine, step=int(meta["adam_step"]))
    for name, p in trainable(model):
        offset = places[name].offset  # where this rank's local tensor sits in the global one (experts)
        set_local_fragment(p, lambda kind, start, numel, name=name, offset=offset:
                           reader.read(name, kind, offset + start, numel))
    refresh_model_weights(engine)
    _restore_scheduler(engine.lr_scheduler, int(meta["scheduler"]["last_epoch"]), int(meta["scheduler"]["step_count"]))
    engine.global_steps = int(meta.get("step", 0))
    if ema is not None:
        ema.read(reader, places)
    own = reader.rank_meta(rank) if same_layout else None
    # the data layout can change on its own (data.num_workers, batch_size, mode) at the same world size
    if own is not None and own["data"].get("layout") == batches.state_dict().get("layout"):
        batches.load_state_dict(own["data"])
    else:
        batches.load_elastic_state([reader.rank_meta(r)["data"] for r in range(reader.world_size)])
    if own is not None:
        restore_rng(reader, rank, own["rng"])
    else:
        derived = seed * 1_000_003 + int(meta.get("step", 0)) * 131 + rank
        torch.manual_seed(derived)
        random.seed(derived)
        np.random.seed(derived % 2**32)
    return meta


def _restore_scheduler(scheduler, last_epoch: int, step_count: int) -> None:
    """A LambdaLR at ``last_epoch``: every group's rate from its own base rate (group counts may differ by layout)."""
    scheduler.last_epoch = last_epoch
    scheduler._step_count = step_count
    lrs: List[float] = [base * fn(last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def export_plan(model, init_names: Dict[int, str], storage: torch.dtype) -> List[List[Any]]:
    """Every tensor of the student in order: [name, storage dtype, global shape, source], for ``d2m ckpt export``.

    Source "trained": the checkpoint's fragments; "init:<name>": that tensor of the init folder (frozen
    weights are not checkpointed). Routers (MoE and MoB) are stored in fp32, as the portable format has them.
    """
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    places = placements(model)
    plan = []
    for name, p in model.named_parameters():
        dtype = "fp32" if ".router." in name else names[storage]
        source = "trained" if p.requires_grad else f"init:{init_names.get(id(p), '?')}"
        plan.append([name, dtype, list(places[name].global_shape), source])
    return plan
