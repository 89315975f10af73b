"""What one distillation step consumes: samples/s a GPU can train at, for the data-headroom check.

The architecture comes from a config (``meta:flux1-dev`` or a model folder), the
weights are random (timing does not depend on their values; routing of random
routers is near-uniform, the balanced case the load loss aims for):

* the teacher's forward at full depth, bf16 (as stages 1-3 run it on GPU);
* at a reduced depth with the same mix of double and single blocks (FLUX.1-dev:
  19 double + 38 single -> 1 + 2), the teacher's forward and the stage-2
  student's forward + backward (routed experts and routers trainable, fp32
  weights under bf16 autocast, as DeepSpeed's ``torch_autocast`` runs it);
* the full step, estimated as the full-depth teacher forward times
  ``1 + student/teacher`` from the reduced pair: block costs scale with depth,
  and both models see the same tokens.

The full-depth teacher forward alone is a strict lower bound on a step's time
(every step runs it), so ``batch / teacher forward`` bounds the consumption from
above; the estimate is the realistic figure. The optimizer step and the
gradient reduction are left out (they do not scale with the batch).
"""

from __future__ import annotations

import functools
import math
from typing import Dict, List

import torch
from torch import nn

from d2m_dist.bench.common import Row, fmt, median_time
from d2m_dist.config import MoEConfig
from d2m_dist.models.flux import FluxInputs, build_flux, call_flux, load_flux_config
from d2m_dist.models.moe import moe_layers, set_top_k
from d2m_dist.models.precision import bf16_autocast
from d2m_dist.models.spec import MoESpec, select_sites
from d2m_dist.models.surgery import convert_to_moe
from d2m_dist.parallel.dist import pick_device


@torch.no_grad()
def random_init_(model: nn.Module, std: float = 0.02) -> nn.Module:
    """Fill a materialised model: matrices N(0, std), norm scales 1, other vectors 0."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, std)
        elif "norm" in name:
            p.fill_(1.0)
        else:
            p.zero_()
    return model


def _materialise(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    # cast while still on meta: FLUX.1-dev in fp32 (48 GB) would not fit beside its bf16 copy
    return random_init_(model.to(dtype).to_empty(device=device))


def reduced_depth(config: Dict) -> Dict:
    g = math.gcd(config["num_layers"], config["num_single_layers"])
    return {**config, "num_layers": config["num_layers"] // g, "num_single_layers": config["num_single_layers"] // g}


def random_inputs(config: Dict, batch: int, image_tokens: int, text_tokens: int, device) -> FluxInputs:
    g = torch.Generator().manual_seed(0)
    img_ids = torch.zeros(image_tokens, 3)
    side = int(math.isqrt(image_tokens)) or 1
    idx = torch.arange(image_tokens)
    img_ids[:, 1], img_ids[:, 2] = (idx // side).float(), (idx % side).float()
    guidance = torch.full((batch,), 3.5) if config.get("guidance_embeds") else None
    return FluxInputs(
        hidden_states=torch.randn(batch, image_tokens, config["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, text_tokens, config["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=img_ids,
        txt_ids=torch.zeros(text_tokens, 3),
        guidance=guidance,
    ).to(device)


def _teacher(config: Dict, device, bf16: bool) -> nn.Module:
    model = build_flux(config, meta=True)
    return _materialise(model, device, torch.bfloat16 if bf16 else torch.float32).eval().requires_grad_(False)


def _student(config: Dict, spec: str, device) -> nn.Module:
    moe = MoEConfig(spec=spec)
    model = build_flux(config, meta=True)
    model = convert_to_moe(model, select_sites(moe, config["num_layers"], config["num_single_layers"]), moe)
    model = _materialise(model, device, torch.float32).train()
    model.requires_grad_(False)
    for _, layer in moe_layers(model):  # stage 2: routed experts and routers train
        layer.experts.requires_grad_(True)
        layer.router.requires_grad_(True)
    set_top_k(model, MoESpec.parse(spec).top_k)
    return model


def run(teacher: str = "meta:flux1-dev", spec: str = "1S12E2A", batch: int = 1, image_tokens: int = 4096,
        text_tokens: int = 512, repeats: int = 5, device: str = "auto") -> List[Row]:
    dev = pick_device(device)
    bf16 = dev.type == "cuda"
    full_cfg = load_flux_config(teacher)
    small_cfg = reduced_depth(full_cfg)
    x = random_inputs(full_cfg, batch, image_tokens, text_tokens, dev)

    def forward_time(model) -> float:
        def fn():
            with torch.no_grad(), bf16_autocast(dev.type, bf16):
                call_flux(model, x)
        return median_time(fn, repeats=repeats, warmup=1)

    rows: List[Row] = []

    def row(what: str, cfg: Dict, seconds: float) -> None:
        rows.append({"what": what, "depth": f"{cfg['num_layers']}+{cfg['num_single_layers']}", "batch": batch,
                     "tokens": image_tokens + text_tokens, "median ms": fmt(seconds * 1e3, 4),
                     "samples/s": fmt(batch / seconds, 4)})

    model = _teacher(full_cfg, dev, bf16)
    t_full = forward_time(model)
    del model
    _empty_cache(dev)
    row("teacher forward (a step's lower bound)", full_cfg, t_full)

    model = _teacher(small_cfg, dev, bf16)
    t_small = forward_time(model)
    del model
    row("teacher forward", small_cfg, t_small)

    student_step = functools.partial(_forward_backward, _student(small_cfg, spec, dev), x, dev, bf16)
    t_student = median_time(student_step, repeats=repeats, warmup=1)
    del student_step  # and the student it holds
    _empty_cache(dev)
    row(f"student {spec} forward+backward", small_cfg, t_student)
    row("full step, estimated", full_cfg, t_full * (1 + t_student / t_small))
    if dev.type == "cuda":
        rows[-1]["what"] += f" (peak {torch.cuda.max_memory_allocated() / 2**30:.0f} GiB)"
    return rows


def _forward_backward(model: nn.Module, x: FluxInputs, dev: torch.device, bf16: bool) -> None:
    with bf16_autocast(dev.type, bf16):
        out = call_flux(model, x)
    out.float().pow(2).mean().backward()
    model.zero_grad(set_to_none=True)


def _empty_cache(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
