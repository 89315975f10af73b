"""``d2m plan``: the request, the table on the terminal, the JSON."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from d2m_dist.config import ConfigError
from d2m_dist.models.flops import image_tokens
from d2m_dist.plan.inventory import plan_inputs
from d2m_dist.plan.layouts import Cluster, candidate_layouts, rank_layouts
from d2m_dist.plan.traffic import Rates, Tokens

_UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str, what: str) -> int:
    """``80GB``, ``80GiB``, ``1TB``: binary units either way (an "80 GB" GPU holds 80 GiB)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"{what} {text!r}: expected a size like 80GB or 1TB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass
class PlanRequest:
    config: str
    stage: int
    nodes: int
    gpus_per_node: int
    gpu_mem: str
    host_mem: str = "1TB"
    ep: Optional[int] = None
    zero: Optional[int] = None
    teacher: Optional[str] = None
    batch: Optional[int] = None  # None: the stage config's data.batch_size
    resolution: int = 1024
    text_tokens: int = 512
    act_ckpt: Optional[bool] = None
    rates: Rates = Rates()
    overrides: Sequence[str] = ()


def _check(req: PlanRequest) -> None:
    positive = {"--nodes": req.nodes, "--gpus-per-node": req.gpus_per_node, "--resolution": req.resolution,
                "--tflops": req.rates.tflops, "--intra-gbps": req.rates.intra_gbps,
                "--inter-gbps": req.rates.inter_gbps, "--pcie-gbps": req.rates.pcie_gbps}
    if req.batch is not None:
        positive["--batch"] = req.batch
    for flag, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{flag} {value}: must be > 0")
    if req.text_tokens < 0:
        raise ConfigError(f"--text-tokens {req.text_tokens}: must be >= 0")


def run_plan(req: PlanRequest) -> Dict:
    _check(req)
    cluster = Cluster(req.nodes, req.gpus_per_node, parse_bytes(req.gpu_mem, "--gpu-mem"),
                      parse_bytes(req.host_mem, "--host-mem"), req.rates)
    if cluster.gpu_mem <= 0 or cluster.host_mem <= 0:
        raise ConfigError("--gpu-mem and --host-mem must be > 0")
    try:
        tokens = Tokens(image_tokens(req.resolution, req.resolution), req.text_tokens)
    except ValueError as exc:
        raise ConfigError(f"--resolution {req.resolution}: {exc}") from None
    planned = plan_inputs(req.config, req.stage, req.overrides)
    batch = req.batch if req.batch is not None else planned.stage.data.batch_size
    layouts = candidate_layouts(planned, cluster, batch, req.ep, req.zero, req.teacher, req.act_ckpt)
    plans = rank_layouts(planned, cluster, tokens, layouts)
    return {
        "config": req.config, "stage": planned.stage.stage, "recipe": planned.recipe.summary,
        "precision": "bf16 autocast" if planned.bf16 else "fp32", "grad_accum": planned.stage.optim.grad_accum,
        "cluster": {"nodes": req.nodes, "gpus_per_node": req.gpus_per_node, "gpu_mem": cluster.gpu_mem,
                    "host_mem_per_node": cluster.host_mem, "rates": req.rates.__dict__},
        "resolution": req.resolution, "image_tokens": tokens.image, "text_tokens": tokens.text,
        "layouts": [p.as_dict() for p in plans],
        "best": plans[0].as_dict() if plans and plans[0].fits else None,
    }


def _gib(n: float) -> str:
    return f"{n / 2**30:6.1f}"


def format_plan(result: Dict, top: int = 12) -> List[str]:
    c = result["cluster"]
    lines = [f"stage {result['stage']} ({result['recipe']}) of {result['config']}",
             f"{c['nodes']} node(s) x {c['gpus_per_node']} GPUs of {c['gpu_mem'] / 2**30:.0f} GiB, host "
             f"{c['host_mem_per_node'] / 2**30:.0f} GiB per node; {result['resolution']}px = {result['image_tokens']} "
             f"image + {result['text_tokens']} text tokens; {result['precision']}; per micro-batch "
             f"(grad_accum {result['grad_accum']} repeats compute and all_to_alls, not gradient traffic)", ""]
    head = ("layout", "fits", "img/s", "step s", "GiB/GPU", "params", "grads", "optim", "teacher", "acts",
            "buffers", "a2a GB", "grad GB")
    lines.append(" | ".join(head))
    for p in result["layouts"][:top]:
        g = p["gpu_bytes"]
        lay = p["layout"]
        name = f"ep {lay['ep']} Z{lay['zero']} {lay['teacher']} b{lay['batch']}{' ckpt' if lay['act_ckpt'] else ''}"
        t = p["traffic_bytes_per_step"]
        row = (name, "yes" if p["fits"] else "NO", f"{p['images_per_s']:.2f}", f"{p['seconds']['step']:.2f}",
               _gib(p["gpu_total"]), _gib(g["student_params_experts"] + g["student_params_rest"]),
               _gib(g["grads_experts"] + g["grads_rest"]), _gib(g["optimizer_experts"] + g["optimizer_rest"]),
               _gib(g["teacher"]), _gib(g["activations"] + g["weight_copies"] + g["teacher_features"]),
               _gib(g["comm_buffers"]),
               f"{t['moe_all_to_all'] / 1e9:.2f}", f"{(t['grad_reduce'] + t['param_gather']) / 1e9:.2f}")
        lines.append(" | ".join(row))
        if not p["fits"]:
            lines.append(f"    does not fit: {p['overflow']}")
    if len(result["layouts"]) > top:
        lines.append(f"... {len(result['layouts']) - top} more layouts in --json")
    best = result["best"]
    lines.append("")
    if best:
        lay = best["layout"]
        lines.append(f"best: parallel.ep_size={lay['ep']} parallel.zero_stage={lay['zero']} "
                     f"teacher.placement={lay['teacher']} data.batch_size={lay['batch']}"
                     f"{' (activation checkpointing: not in the trainer yet)' if lay['act_ckpt'] else ''}"
                     f" -- {best['images_per_s']:.1f} images/s estimated")
    else:
        lines.append("no layout fits: more GPUs, a smaller --batch, --act-ckpt (planned only: the trainer does "
                     "not checkpoint activations yet) or GPUs with more memory")
    a = result["layouts"][0]["activations"] if result["layouts"] else None
    if a:
        lines.append(f"activations per GPU (student, bf16 weight copies, teacher features), first layout: "
                     f"{a['without_ckpt'] / 2**30:.1f} GiB without checkpointing, {a['with_ckpt'] / 2**30:.1f} GiB with")
    return lines


