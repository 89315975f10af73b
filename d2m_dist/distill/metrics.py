"""Training metrics from the MoE and MoB layers' last forward.

Per MoE layer: fraction of routed tokens per expert (global ids), its
coefficient of variation and max/mean ratio (1.0 = perfect balance), router
entropy, dropped tokens. Per MoB group: fraction of samples that ran each block.
Counts are summed over the data-parallel ranks first, so every rank reports the
global picture.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist
from torch import nn

from d2m_dist.models.mob import MoBGroup
from d2m_dist.models.moe import MoEFeedForward


def expert_load(model: nn.Module, device: torch.device) -> Dict[str, Dict[str, float]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoEFeedForward) and m.tokens_per_expert is not None]
    if not layers:
        return {}
    counts = torch.stack([m.tokens_per_expert.to(device=device, dtype=torch.float64) for _, m in layers])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    out = {}
    for (name, m), c in zip(layers, counts):
        frac = c / c.sum().clamp_min(1)
        mean = frac.mean()
        out[name] = {
            "max_over_mean": float(frac.max() / mean),
            "cv": float(frac.std(unbiased=False) / mean),
            "entropy": float(m.router_entropy) if m.router_entropy is not None else float("nan"),
            "dropped": float(m.dropped_tokens),
            **{f"e{e}": float(f) for e, f in enumerate(frac)},
        }
    return out


def block_usage(model: nn.Module) -> Dict[str, list]:
    return {n: g.usage.tolist() for n, g in model.named_modules() if isinstance(g, MoBGroup) and g.usage is not None}


def flatten_metrics(load: Dict[str, Dict[str, float]], usage: Dict[str, list]) -> Dict[str, float]:
    flat: Dict[str, float] = {}
    for name, stats in load.items():
        for k, v in stats.items():
            flat[f"moe/{name}/{k}"] = v
    if load:
        flat["moe/max_over_mean_worst"] = max(s["max_over_mean"] for s in load.values())
    for name, u in usage.items():
        for j, v in enumerate(u):
            flat[f"mob/{name}/block{j}"] = v
    return flat
