"""Mixture of Blocks: forward compute against the number of active blocks kappa.

A FLUX-architecture model whose single-stream blocks form groups of m; for each
kappa the same batch runs with kappa of m blocks per group active. Reports
exact FLOPs (dispatcher count) and median wall time, both relative to kappa = m.
"""

from __future__ import annotations

import copy
from typing import List

import torch

from d2m_dist.bench.common import Row, flops, fmt, median_time
from d2m_dist.config import MoBConfig, MoBGroupConfig
from d2m_dist.models.flux import FluxInputs, build_flux, call_flux, latent_image_ids
from d2m_dist.models.mob import apply_mob

BENCH_CONFIG = {
    "attention_head_dim": 32, "axes_dims_rope": [8, 12, 12], "guidance_embeds": True, "in_channels": 16,
    "joint_attention_dim": 64, "num_attention_heads": 4, "num_layers": 2, "num_single_layers": 8,
    "patch_size": 1, "pooled_projection_dim": 32,
}


def bench_inputs(batch: int, side: int, txt: int, cfg=BENCH_CONFIG) -> FluxInputs:
    g = torch.Generator().manual_seed(0)
    return FluxInputs(
        torch.randn(batch, side * side, cfg["in_channels"], generator=g),
        torch.randn(batch, txt, cfg["joint_attention_dim"], generator=g),
        torch.randn(batch, cfg["pooled_projection_dim"], generator=g),
        torch.rand(batch, generator=g), latent_image_ids(side, side), torch.zeros(txt, 3),
        torch.full((batch,), 3.5),
    )


def run(m: int = 4, batch: int = 16, side: int = 16, txt: int = 16, repeats: int = 7) -> List[Row]:
    torch.manual_seed(0)
    dense = build_flux(BENCH_CONFIG).eval()
    x = bench_inputs(batch, side, txt)
    rows: List[Row] = []
    base_flops = base_time = None
    for kappa in range(m, 0, -1):
        model = apply_mob(copy.deepcopy(dense), MoBConfig(enabled=True, single=MoBGroupConfig(m=m, kappa=kappa), gate="one"))
        with torch.no_grad():
            f = flops(lambda: call_flux(model, x))
            t = median_time(lambda: call_flux(model, x), repeats=repeats)
        base_flops, base_time = base_flops or f, base_time or t
        rows.append({"kappa": kappa, "m": m, "GFLOPs": fmt(f / 1e9), "FLOPs vs kappa=m": fmt(f / base_flops),
                     "median ms": fmt(t * 1e3), "time vs kappa=m": fmt(t / base_time)})
    return rows
