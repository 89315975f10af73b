"""What one distillation step consumes, and what the student's sparsity buys in time.

The architecture comes from a config (``meta:flux1-dev`` or a model folder), the
weights are random (timing does not depend on their values; routing of random
routers is near-uniform, the balanced case the load loss aims for). Two parts
(``parts=train,inference``, both by default):

**train** — samples/s a GPU can train at, for the data-headroom check:

* the teacher's forward at full depth, bf16 (as stages 1-3 run it on GPU);
* at a reduced depth with the same mix of double and single blocks (FLUX.1-dev:
  19 double + 38 single -> 1 + 2), the teacher's forward, the teacher's forward +
  backward as a dense fine-tune would run it (every parameter trainable), and the
  stage-2 student's forward + backward (routed experts and routers trainable); both
  trainees hold fp32 weights under bf16 autocast on CUDA, as DeepSpeed's
  ``torch_autocast`` runs them, and take the same loss (mean squared output). The
  student's row gives its time over the dense fine-tune's beside the ratio of their
  forward FLOPs (what a token activates). The backward is not in that FLOPs ratio:
  the student's frozen parts (attention, shared experts, modulation) get no weight
  gradients, so its training step can undercut its forward ratio; the GFLOPs column
  gives each row's counted forward + backward FLOPs for that comparison;
* the full step, estimated as the full-depth teacher forward times
  ``1 + student/teacher`` from the reduced pair: block costs scale with depth,
  and both models see the same tokens.

The full-depth teacher forward alone is a strict lower bound on a step's time
(every step runs it), so ``batch / teacher forward`` bounds the consumption from
above; the estimate is the realistic figure. The optimizer step and the
gradient reduction are left out (they do not scale with the batch).

**inference** — whole-model forward latency (eval, no grad; bf16 weights under bf16
autocast on CUDA with the routers in fp32 as the layers keep them, fp32 on CPU) at
``depth=reduced`` (default) or ``full``: the teacher, the student with the spec on
every FFN site at the spec's top-k (MoE-L for 1S12E2A), and that student with the
Mixture of Blocks of the MoE-S preset (:data:`MOE_S_MOB`, kappa of every m grouped
blocks run per sample, skipped blocks cost nothing at inference). At a depth other
than the preset's 19 + 38 the preset's grouping is scaled (:func:`mob_at_depth`),
which the row's label spells out.

FLOPs: counted, not derived. :func:`model_flops` runs the very forward that is
timed (same inputs, routing and dtype) under torch's ``FlopCounterMode``, which
counts matrix products and attention exactly from their shapes (elementwise work,
norms and routing softmaxes are not counted), with two formulas added for what it
misses: ``_grouped_mm`` (the grouped expert kernel on sm90+, forward and backward)
and CPU flash attention. tests/bench/test_step.py checks the counts against a
hand count of every matrix product of a small FLUX, dense and 1S4E2A.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from d2m_dist.bench.common import Row, fmt, median_time
from d2m_dist.config import ConfigError, MoBConfig, MoBGroupConfig, MoEConfig
from d2m_dist.models.flux import FluxInputs, build_flux, call_flux, load_flux_config
from d2m_dist.models.mob import MoBGroup, apply_mob
from d2m_dist.models.moe import moe_layers, set_top_k
from d2m_dist.models.precision import bf16_autocast
from d2m_dist.models.spec import MoESpec, select_sites
from d2m_dist.models.surgery import convert_to_moe
from d2m_dist.parallel.dist import pick_device

COLUMNS = ["what", "depth", "batch", "tokens", "GFLOPs", "median ms", "samples/s", "time vs teacher",
           "fwd FLOPs vs teacher"]
PARTS = ("train", "inference")
MOE_L_SPEC = "1S12E2A"
# MoE-S = MoE-L plus this Mixture of Blocks (configs/presets/flux-dev/stage3.yaml with
# flux-dev-moe-s/stage3.yaml; tests/bench/test_step.py checks they agree), laid out for
# FLUX.1-dev's 19 double + 38 single blocks (PRESET_DEPTH)
MOE_S_MOB = MoBConfig(enabled=True, alpha=0.5, double=MoBGroupConfig(first=0, last=17, m=2, kappa=1),
                      single=MoBGroupConfig(first=0, last=23, m=2, kappa=1))
PRESET_DEPTH = (19, 38)


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


# ----------------------------------------------------------------------------- FLOPs


def _grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``_grouped_mm(a, b, offs)``: a [M, K] or [G, M, K], b [K, N] or [G, K, N]; ``offs`` splits
    the one dimension that is not batched (M, K or N) into the G groups, so each of its
    entries meets one group's matrix: 2 M K N in all (G times that when both are batched)."""
    rows_by_k = math.prod(a_shape) if len(a_shape) == 2 or len(b_shape) == 3 else math.prod(a_shape[1:])
    return 2 * rows_by_k * b_shape[-1]


def _cpu_flash_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _extra_formulas() -> Dict:
    aten = torch.ops.aten
    out = {}
    for name, fn in (("_grouped_mm", _grouped_mm_flop),
                     ("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash_flop),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_backward_flop)):
        if hasattr(aten, name):  # op names of this torch build
            out[getattr(aten, name)] = fn
    return out


def model_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn``: torch's ``FlopCounterMode`` (matrix products and attention,
    exact from the shapes) plus grouped matmuls and CPU flash attention, which it leaves out."""
    with FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as counter:
        fn()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------- models


def _teacher(config: Dict, device, bf16: bool) -> nn.Module:
    model = build_flux(config, meta=True)
    return _materialise(model, device, torch.bfloat16 if bf16 else torch.float32).eval().requires_grad_(False)


def _dense_trainee(config: Dict, device) -> nn.Module:
    """The teacher as a dense fine-tune trains it: fp32 weights, every parameter trainable."""
    return _materialise(build_flux(config, meta=True), device, torch.float32).train().requires_grad_(True)


def _convert(config: Dict, spec: str, mob: Optional[MoBConfig] = None) -> nn.Module:
    moe = MoEConfig(spec=spec)
    model = build_flux(config, meta=True)
    model = convert_to_moe(model, select_sites(moe, config["num_layers"], config["num_single_layers"]), moe)
    return apply_mob(model, mob) if mob is not None else model


def _student(config: Dict, spec: str, device) -> nn.Module:
    model = _materialise(_convert(config, spec), device, torch.float32).train()
    model.requires_grad_(False)
    for _, layer in moe_layers(model):  # stage 2: routed experts and routers train
        layer.experts.requires_grad_(True)
        layer.router.requires_grad_(True)
    set_top_k(model, MoESpec.parse(spec).top_k)
    return model


def _inference_student(config: Dict, spec: str, mob: Optional[MoBConfig], device, bf16: bool) -> nn.Module:
    """An exported student as inference runs it: bf16 weights on CUDA, MoE and MoB routers fp32."""
    model = _materialise(_convert(config, spec, mob), device, torch.bfloat16 if bf16 else torch.float32)
    for _, layer in moe_layers(model):
        layer.router.float()
    for group in model.modules():
        if isinstance(group, MoBGroup):
            group.router.float()
    set_top_k(model, MoESpec.parse(spec).top_k)
    return model.eval().requires_grad_(False)


def mob_at_depth(mob: MoBConfig, num_double: int, num_single: int,
                 preset_depth: Tuple[int, int] = PRESET_DEPTH) -> MoBConfig:
    """``mob`` (laid out for ``preset_depth``) for a model with other block counts.

    Each stream keeps the share of its blocks that the preset groups, rounded to whole
    groups of the same m and kappa, starting at the same relative place; a stream
    where not one group fits is left ungrouped. At the preset's own depth the result
    is ``mob`` itself (FLUX.1-dev 19 + 38: double 9 groups of 2, single 12; at 1 + 2:
    no double group, one single group of 2).
    """
    out = dataclasses.replace(mob, double=None, single=None)
    for stream, n, n_ref in (("double", num_double, preset_depth[0]), ("single", num_single, preset_depth[1])):
        g = getattr(mob, stream)
        if g is None:
            continue
        last = g.last if g.last >= 0 else n_ref + g.last
        groups = min(round((last - g.first + 1) * n / (n_ref * g.m)), n // g.m)
        if groups < 1:
            continue
        first = min(round(g.first * n / n_ref), n - groups * g.m)
        setattr(out, stream, MoBGroupConfig(first=first, last=first + groups * g.m - 1, m=g.m, kappa=g.kappa))
    out.enabled = mob.enabled and (out.double is not None or out.single is not None)
    return out


def mob_label(mob: MoBConfig) -> str:
    parts = [f"{s} {(g.last - g.first + 1) // g.m}x{g.m} kappa {g.kappa}"
             for s, g in (("double", mob.double), ("single", mob.single)) if g is not None]
    return "MoB " + ", ".join(parts) if mob.enabled and parts else "no MoB group fits this depth"


# ----------------------------------------------------------------------------- the benchmark


def _parts(parts: Union[str, Sequence[str]]) -> List[str]:
    names = [p.strip() for p in parts.split(",")] if isinstance(parts, str) else list(parts)
    bad = [p for p in names if p not in PARTS]
    if bad or not names:
        raise ConfigError(f"bench step: parts must be a comma list of {', '.join(PARTS)}, got {parts!r}")
    return names


def run(teacher: str = "meta:flux1-dev", spec: str = MOE_L_SPEC, batch: int = 1, image_tokens: int = 4096,
        text_tokens: int = 512, repeats: int = 5, device: str = "auto",
        parts: Union[str, Sequence[str]] = "train,inference", depth: str = "reduced") -> List[Row]:
    """Rows of :data:`COLUMNS`; ``depth`` (full | reduced) is the inference part's."""
    which = _parts(parts)
    if depth not in ("full", "reduced"):
        raise ConfigError(f"bench step: depth must be full or reduced, got {depth!r}")
    dev = pick_device(device)
    bf16 = dev.type == "cuda"
    full_cfg = load_flux_config(teacher)
    x = random_inputs(full_cfg, batch, image_tokens, text_tokens, dev)
    bench = _Bench(x, dev, bf16, batch, image_tokens + text_tokens, repeats)
    if "train" in which:
        _train_part(bench, full_cfg, spec)
    if "inference" in which:
        _inference_part(bench, full_cfg if depth == "full" else reduced_depth(full_cfg), spec)
    return bench.rows


class _Bench:
    def __init__(self, x: FluxInputs, dev: torch.device, bf16: bool, batch: int, tokens: int, repeats: int):
        self.x, self.dev, self.bf16, self.batch, self.tokens, self.repeats = x, dev, bf16, batch, tokens, repeats
        self.rows: List[Row] = []

    def forward(self, model: nn.Module) -> None:
        with torch.no_grad(), bf16_autocast(self.dev.type, self.bf16):
            call_flux(model, self.x)

    def forward_backward(self, model: nn.Module) -> None:
        with bf16_autocast(self.dev.type, self.bf16):
            out = call_flux(model, self.x)
        out.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    def time(self, fn: Callable[[], object]) -> float:
        return median_time(fn, repeats=self.repeats, warmup=1)

    def row(self, what: str, cfg: Dict, seconds: float, flops: Optional[int] = None,
            time_ratio: Optional[float] = None, flops_ratio: Optional[float] = None) -> Row:
        r = {"what": what, "depth": f"{cfg['num_layers']}+{cfg['num_single_layers']}", "batch": self.batch,
             "tokens": self.tokens, "GFLOPs": "" if flops is None else fmt(flops / 1e9, 4),
             "median ms": fmt(seconds * 1e3, 4), "samples/s": fmt(self.batch / seconds, 4),
             "time vs teacher": "" if time_ratio is None else fmt(time_ratio, 3),
             "fwd FLOPs vs teacher": "" if flops_ratio is None else fmt(flops_ratio, 3)}
        self.rows.append(r)
        return r

    def release(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()


def _train_part(b: _Bench, full_cfg: Dict, spec: str) -> None:
    small_cfg = reduced_depth(full_cfg)

    model = _teacher(full_cfg, b.dev, b.bf16)
    fwd = functools.partial(b.forward, model)
    t_full, f_full = b.time(fwd), model_flops(fwd)
    del model, fwd
    b.release()
    b.row("teacher forward (a step's lower bound)", full_cfg, t_full, f_full)

    model = _teacher(small_cfg, b.dev, b.bf16)
    fwd = functools.partial(b.forward, model)
    t_small, f_small = b.time(fwd), model_flops(fwd)
    del model, fwd
    b.row("teacher forward", small_cfg, t_small, f_small)

    measured = {}
    for name, build in (("teacher", lambda: _dense_trainee(small_cfg, b.dev)),
                        ("student", lambda: _student(small_cfg, spec, b.dev))):
        model = build()
        step = functools.partial(b.forward_backward, model)
        # forward FLOPs under the trainee's own autocast (what a token activates), then the step's
        measured[name] = (b.time(step), model_flops(functools.partial(b.forward, model)), model_flops(step))
        del model, step
        b.release()
    (t_dense, fwd_dense, step_dense), (t_student, fwd_student, step_student) = measured["teacher"], measured["student"]
    b.row("teacher forward+backward (dense fine-tune)", small_cfg, t_dense, step_dense)
    b.row(f"student {spec} forward+backward", small_cfg, t_student, step_student,
          time_ratio=t_student / t_dense, flops_ratio=fwd_student / fwd_dense)
    r = b.row("full step, estimated", full_cfg, t_full * (1 + t_student / t_small))
    if b.dev.type == "cuda":
        r["what"] += f" (peak {torch.cuda.max_memory_allocated() / 2**30:.0f} GiB)"


def _inference_part(b: _Bench, cfg: Dict, spec: str) -> None:
    mob = mob_at_depth(MOE_S_MOB, cfg["num_layers"], cfg["num_single_layers"])
    moe_l = f"{spec} on every site" + (" (MoE-L)" if spec == MOE_L_SPEC else "")
    moe_s = f"{spec} + {mob_label(mob)}" + (" (MoE-S)" if spec == MOE_L_SPEC else "")
    teacher_t = teacher_f = None
    for what, build in (("teacher", lambda: _teacher(cfg, b.dev, b.bf16)),
                        (moe_l, lambda: _inference_student(cfg, spec, None, b.dev, b.bf16)),
                        (moe_s, lambda: _inference_student(cfg, spec, mob, b.dev, b.bf16))):
        model = build()
        fwd = functools.partial(b.forward, model)
        t, f = b.time(fwd), model_flops(fwd)
        del model, fwd
        b.release()
        if teacher_t is None:
            teacher_t, teacher_f = t, f
            b.row("inference: teacher forward", cfg, t, f)
        else:
            b.row(f"inference: student {what} forward", cfg, t, f, time_ratio=t / teacher_t,
                  flops_ratio=f / teacher_f)
