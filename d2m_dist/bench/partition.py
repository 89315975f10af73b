"""Partition quality: how close is the freshly converted student (no training) to the dense teacher?

For a trained teacher and each partition strategy, at top-k (default 2) with the
configured router init, on held-out batches (never the calibration ones):

* ``ffn rel err``: mean over FFN sites of ||MoE(x) - FFN(x)|| / ||FFN(x)|| with x
  the teacher's real inputs to that site;
* ``velocity rel err``: the whole student's velocity prediction against the
  teacher's on the same noised inputs.

Lower is better; the random strategy is the baseline (mean over seeds).
"""

from __future__ import annotations

import copy
from typing import Dict, Iterable, List, Sequence

import torch

from d2m_dist.bench.common import Row, fmt
from d2m_dist.config import ConvertConfig, MoEConfig, PartitionConfig, TeacherConfig
from d2m_dist.convert.partition import needs_scores
from d2m_dist.convert.pipeline import compute_partitions
from d2m_dist.convert.taylor import taylor_scores
from d2m_dist.models.flow import FlowBatch, noised_inputs
from d2m_dist.models.flux import call_flux, load_teacher
from d2m_dist.models.moe import set_top_k
from d2m_dist.models.spec import select_sites
from d2m_dist.models.surgery import convert_to_moe, moe_layer_at, parse_site


def capture_site_inputs(teacher, sites: Sequence[str], inputs) -> Dict[str, torch.Tensor]:
    """The activations entering each dense FFN site during one teacher forward."""
    captured: Dict[str, torch.Tensor] = {}
    hooks = []
    for site in sites:
        stream, i, kind = parse_site(site)
        mod = getattr(teacher.transformer_blocks[i], kind) if stream == "double" else teacher.single_transformer_blocks[i].proj_mlp
        hooks.append(mod.register_forward_pre_hook(lambda m, args, site=site: captured.__setitem__(site, args[0].detach())))
    try:
        with torch.no_grad():
            call_flux(teacher, inputs)
    finally:
        for h in hooks:
            h.remove()
    return captured


def dense_site_output(teacher, site: str, x: torch.Tensor) -> torch.Tensor:
    stream, i, kind = parse_site(site)
    if stream == "double":
        return getattr(teacher.transformer_blocks[i], kind)(x)
    block = teacher.single_transformer_blocks[i]
    d = block.proj_out.weight.shape[0]
    return torch.nn.functional.linear(block.act_mlp(block.proj_mlp(x)), block.proj_out.weight[:, d:])


def evaluate(teacher, student, sites, batches: Iterable[FlowBatch], seed: int) -> Dict[str, float]:
    ffn_err, vel_num, vel_den = [], 0.0, 0.0
    for i, batch in enumerate(batches):
        inputs, _ = noised_inputs(batch, torch.Generator().manual_seed(10_000 + seed * 101 + i))
        acts = capture_site_inputs(teacher, sites, inputs)
        with torch.no_grad():
            for site in sites:
                want = dense_site_output(teacher, site, acts[site])
                got = moe_layer_at(student, site)(acts[site])
                ffn_err.append(((got - want).norm() / want.norm()).item())
            want_v, got_v = call_flux(teacher, inputs), call_flux(student, inputs)
        vel_num += (got_v - want_v).pow(2).sum().item()
        vel_den += want_v.pow(2).sum().item()
    return {"ffn": sum(ffn_err) / len(ffn_err), "velocity": (vel_num / vel_den) ** 0.5}


def run(
    teacher_path: str,
    calibration: List[FlowBatch],
    held_out: List[FlowBatch],
    *,
    spec: str = "1S12E2A",
    top_k: int = 2,
    strategies: Sequence[str] = ("taylor-contiguous", "taylor-roundrobin", "cluster", "random"),
    random_seeds: Sequence[int] = (0, 1, 2),
    router_init: str = "mean_w1",
) -> List[Row]:
    teacher = load_teacher(TeacherConfig(path=teacher_path))
    c = teacher.config
    moe = MoEConfig(spec=spec)
    specs = select_sites(moe, c.num_layers, c.num_single_layers)
    sites = list(specs)
    scores = taylor_scores(teacher, calibration, sites).scores
    rows: List[Row] = []
    for strategy in strategies:
        seeds = random_seeds if strategy == "random" else (0,)
        results = []
        for seed in seeds:
            cfg = ConvertConfig(teacher=TeacherConfig(path=teacher_path), moe=moe,
                                partition=PartitionConfig(strategy=strategy, router_init=router_init, seed=seed),
                                output="bench")
            parts = compute_partitions(teacher, specs, cfg, scores if needs_scores(strategy) else None)
            student = convert_to_moe(copy.deepcopy(teacher), specs, moe, parts)
            set_top_k(student, top_k)
            results.append(evaluate(teacher, student, sites, held_out, seed=0))
        rows.append({
            "strategy": strategy + (f" (mean of {len(seeds)} seeds)" if len(seeds) > 1 else ""),
            "spec": spec, "k": top_k,
            "ffn rel err": fmt(sum(r["ffn"] for r in results) / len(results), 4),
            "velocity rel err": fmt(sum(r["velocity"] for r in results) / len(results), 4),
            "_ffn": sum(r["ffn"] for r in results) / len(results),
            "_velocity": sum(r["velocity"] for r in results) / len(results),
        })
    return rows
