"""Training metrics from the MoE and MoB layers' last forward.

Per MoE layer: fraction of routed tokens per expert (global ids), its
coefficient of variation and max/mean ratio (1.0 = perfect balance), router
entropy, dropped assignments. Per MoB group: fraction of samples that ran each
block. Counts are summed over the data-parallel ranks first, so every rank
reports the global picture; both functions are collective and must be called on
every rank at the same step (the layer lists are the model's, identical on all
ranks, whatever each rank's forward happened to run).
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist
from torch import nn

from d2m_dist.models.mob import MoBGroup
from d2m_dist.models.moe import MoEFeedForward


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def expert_load(model: nn.Module, device: torch.device) -> Dict[str, Dict[str, float]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoEFeedForward)]
    if not layers:
        return {}
    rows = []  # per layer: counts [n], tokens, entropy sum, dropped
    for _, m in layers:
        s = m.stats
        if s is None:
            rows.append(torch.zeros(m.num_experts + 3, dtype=torch.float64, device=device))
        else:
            extra = torch.tensor([s.tokens, float(s.entropy_sum), s.dropped], dtype=torch.float64, device=device)
            rows.append(torch.cat([s.counts.to(device=device, dtype=torch.float64), extra]))
    flat = _sum_over_ranks(torch.cat(rows))
    out = {}
    for (name, m), row in zip(layers, flat.split([m.num_experts + 3 for _, m in layers])):
        counts, tokens, entropy_sum, dropped = row[:-3], float(row[-3]), float(row[-2]), float(row[-1])
        if tokens == 0:
            continue  # routed nothing anywhere this step (top-k 0, or skipped by every sample)
        frac = counts / counts.sum().clamp_min(1)
        mean = frac.mean()
        out[name] = {
            "max_over_mean": float(frac.max() / mean),
            "cv": float(frac.std(unbiased=False) / mean),
            "entropy": entropy_sum / tokens,
            "dropped": dropped,
            **{f"e{e}": float(f) for e, f in enumerate(frac)},
        }
    return out


def block_usage(model: nn.Module, device: torch.device) -> Dict[str, list]:
    groups = [(n, g) for n, g in model.named_modules() if isinstance(g, MoBGroup)]
    if not groups:
        return {}
    rows = []  # per group: samples that ran each block [m], samples
    for _, g in groups:
        if g.usage_counts is None:
            rows.append(torch.zeros(g.m + 1, dtype=torch.float64, device=device))
        else:
            rows.append(torch.cat([g.usage_counts.to(device=device, dtype=torch.float64),
                                   torch.tensor([float(g.samples)], dtype=torch.float64, device=device)]))
    flat = _sum_over_ranks(torch.cat(rows))
    out = {}
    for (name, g), row in zip(groups, flat.split([g.m + 1 for _, g in groups])):
        if row[-1] > 0:
            out[name] = (row[:-1] / row[-1]).tolist()
    return out


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
