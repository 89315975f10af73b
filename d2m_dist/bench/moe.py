"""One FFN site: the dense FFN against its MoE replacement, ours and DeepSpeed's, same weights.

What a converted site costs next to the FFN it replaces, and next to the stock
alternative. At width D (hidden 4 D, FLUX's GELU(tanh) FFN) and T tokens, in one
process, with the same weights throughout:

* ``dense``: the dense FFN the student replaces, assembled from the MoE layer's own
  neurons (shared expert's, then each routed expert's; :func:`dense_from_moe`), so
  the layer with unit gates reproduces it exactly;
* ``ours``: :class:`~d2m_dist.models.moe.MoEFeedForward` (shared expert, top-k
  routed experts, dropless) with the expert kernel it picks itself (grouped
  matmuls on CPU and on bf16 sm90+ GPUs), and ``ours-loop``: the same layer with
  one matmul per expert (``ExpertStack`` kernel ``loop``), the evidence for that pick;
* ``ds-dropless`` and ``ds-cf1.25``: DeepSpeed's stock ``deepspeed.moe.layer.MoE``
  (ep_size 1) holding our routed experts (one module per expert) and our router
  weights in its gate, with our shared expert and output bias added in front so
  that it does our layer's work; dropless, and with capacity factor 1.25 (tokens
  over an expert's capacity dropped). DeepSpeed computes every expert on a buffer
  of fixed capacity: dropless, the busiest expert's load for every expert (padded
  rows are computed too); with a capacity factor, ``ceil(1.25 k T / n)`` rows
  each, whatever the load. Its second expert is chosen by argmax, not by its
  default Gumbel sampling (``top2_2nd_expert_sampling``, applied in eval mode as
  well), so it routes every token as ours does and dropless both do the same
  useful work.

Modes: ``forward`` (eval, no grad: inference) and ``forward+backward`` (train mode,
loss = mean squared output, every weight and the input take gradients, as a site
inside a network being trained; gradients cleared between repetitions). fp32 on
CPU; bf16 weights and activations on CUDA, routers in fp32 as the layers keep
them.

Timing: after ``warmup`` rounds, each of ``repeats`` rounds runs every variant once
in turn (:func:`~d2m_dist.bench.common.interleaved_times`), so drift hits all
alike; the table gives the median and its ratio to the dense FFN's.

FLOPs: the spec's activated-FLOPs limit, ``(shared + k * expert width) / 4 D``
(0.375 for 1S12E2A), the ratio a perfect MoE would reach (:func:`flops_limit`),
and as a cross-check each variant's forward FLOPs over the dense forward's,
counted by torch's dispatcher on the very forward that is timed
(:func:`~d2m_dist.bench.step.model_flops`, which also counts the grouped expert
kernel used on CUDA). Ours counts its router on top of the limit (n / 8 D more);
DeepSpeed's rows count the capacity buffers' padding (dropless) or miss the
dropped tokens (capacity factor).
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from d2m_dist.bench.common import Row, fmt, interleaved_times
from d2m_dist.bench.step import model_flops
from d2m_dist.config import ConfigError
from d2m_dist.models.moe import MoEFeedForward, SharedExpert
from d2m_dist.models.spec import MoESpec, SiteShape
from d2m_dist.parallel.dist import init_distributed, pick_device, remove_shm_buffers

COLUMNS = ["D", "tokens", "dtype", "mode", "variant", "median ms", "vs dense", "fwd FLOPs vs dense", "FLOPs limit"]
MODES = ("forward", "forward+backward")
CAPACITY_FACTOR = 1.25
# DeepSpeed variants and their capacity factor (None: dropless)
DEEPSPEED = {"ds-dropless": None, f"ds-cf{CAPACITY_FACTOR:g}": CAPACITY_FACTOR}
VARIANTS = ("dense", "ours", "ours-loop", *DEEPSPEED)
# what init_distributed sets for a world of one, restored afterwards
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE")


def flops_limit(shape: SiteShape) -> float:
    """Forward FLOPs of a perfect MoE over the dense FFN's: the share of hidden neurons a token activates."""
    return shape.activated_width / shape.hidden


# ----------------------------------------------------------------------------- the variants


class DenseFFN(nn.Module):
    """FLUX's FFN: ``fc2(gelu_tanh(fc1(x)))``, both with bias."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _expert_weights(layer: MoEFeedForward, j: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routed expert ``j``'s (up weight [w, D], up bias [w], down weight [D, w])."""
    e = layer.experts
    return e.w1[j], e.b1[j], e.w2[j]


@torch.no_grad()
def dense_from_moe(layer: MoEFeedForward) -> DenseFFN:
    """The dense FFN ``layer`` splits: hidden neurons the shared expert's, then each routed expert's."""
    s = layer.shape
    parts = [_expert_weights(layer, j) for j in range(s.num_experts)]
    if layer.shared is not None:
        parts.insert(0, (layer.shared.fc1.weight, layer.shared.fc1.bias, layer.shared.fc2.weight))
    dense = DenseFFN(s.dim, s.hidden).to(dtype=layer.experts.w1.dtype, device=layer.experts.w1.device)
    dense.fc1.weight.copy_(torch.cat([w1 for w1, _, _ in parts]))
    dense.fc1.bias.copy_(torch.cat([b1 for _, b1, _ in parts]))
    dense.fc2.weight.copy_(torch.cat([w2 for _, _, w2 in parts], dim=1))
    if layer.bias is not None:
        dense.fc2.bias.copy_(layer.bias)
    else:
        dense.fc2.bias.zero_()
    return dense


class DeepSpeedSite(nn.Module):
    """DeepSpeed's stock MoE layer holding ``layer``'s routed experts and router, plus its shared expert and bias.

    ``y = bias + shared(x) + deepspeed_moe(x)``. Needs torch.distributed (and DeepSpeed's
    communication layer) initialised: the layer creates its ``ep_size_1`` groups.
    """

    def __init__(self, layer: MoEFeedForward, capacity_factor: Optional[float]):
        super().__init__()
        from deepspeed.moe.layer import MoE  # lazy: seconds to import, only these variants need it

        s = layer.shape
        self.shared = copy.deepcopy(layer.shared)
        self.bias = copy.deepcopy(layer.bias)
        cf = 1.0 if capacity_factor is None else capacity_factor
        # DeepSpeed's expert module: the same GELU(tanh) MLP without output bias as our experts
        self.moe = MoE(s.dim, SharedExpert(s.dim, s.expert_width), num_experts=s.num_experts, ep_size=1, k=s.top_k,
                       capacity_factor=cf, eval_capacity_factor=cf, drop_tokens=capacity_factor is not None,
                       top2_2nd_expert_sampling=False)
        self.moe.set_deepspeed_parallelism()
        with torch.no_grad():
            self.gate.weight.copy_(layer.router.weight)
            for j, expert in enumerate(self.experts):
                w1, b1, w2 = _expert_weights(layer, j)
                expert.fc1.weight.copy_(w1)
                expert.fc1.bias.copy_(b1)
                expert.fc2.weight.copy_(w2)

    @property
    def gate(self) -> nn.Linear:
        return self.moe.deepspeed_moe.gate.wg

    @property
    def experts(self) -> nn.ModuleList:
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.moe(x)[0]  # (output, aux loss, expert counts)
        if self.shared is not None:
            y = y + self.shared(x)
        return y + self.bias if self.bias is not None else y


def _cast_(model: nn.Module, device: torch.device, dtype: torch.dtype, fp32: Sequence[nn.Module]) -> nn.Module:
    """``model`` moved to ``device`` in ``dtype``, the modules ``fp32`` kept in fp32 (never rounded through ``dtype``)."""
    keep = {id(p) for m in fp32 for p in m.parameters()}
    for p in model.parameters():
        p.data = p.data.to(device=device, dtype=torch.float32 if id(p) in keep else dtype)
    return model


def build_variants(shape: SiteShape, names: Sequence[str], device: torch.device,
                   dtype: torch.dtype) -> Dict[str, nn.Module]:
    """The dense FFN (always: the FLOPs baseline) and the variants ``names``, all from one random MoE layer."""
    torch.manual_seed(0)
    ours = MoEFeedForward(shape)
    models: Dict[str, nn.Module] = {"dense": dense_from_moe(ours)}
    for name in names:
        if name in DEEPSPEED:
            site = DeepSpeedSite(ours, DEEPSPEED[name])
            models[name] = _cast_(site, device, dtype, [site.gate])
    if "ours-loop" in names:  # the same layer with the per-expert loop instead of the kernel auto picks
        loop = copy.deepcopy(ours)
        loop.experts.set_kernel("loop")
        models["ours-loop"] = _cast_(loop, device, dtype, [loop.router])
    if "ours" in names:
        models["ours"] = ours
    _cast_(ours, device, dtype, [ours.router])
    _cast_(models["dense"], device, dtype, [])
    return {name: models[name] for name in VARIANTS if name in models}


# ----------------------------------------------------------------------------- the benchmark


def _forward(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


def _forward_backward(model: nn.Module, x: torch.Tensor) -> None:
    model(x).float().pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    x.grad = None


@contextlib.contextmanager
def deepspeed_world(device: torch.device) -> Iterator[None]:
    """The process group DeepSpeed's MoE layer needs (its groups are made on it).

    A group the caller made is adopted and left as found (DeepSpeed's communication
    layer wraps it); otherwise a world of one is made here (gloo on CPU, NCCL on CUDA)
    and torn down on exit, with the environment variables it set.
    """
    import deepspeed.comm  # lazy: seconds to import, only the DeepSpeed variants need it

    created = not dist.is_initialized()
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    init_distributed(device.type)
    if not created:
        yield
        return
    addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    try:
        yield
    finally:
        # through DeepSpeed: it also forgets its expert groups, which would outlive the group otherwise
        deepspeed.comm.destroy_process_group()
        if device.type == "cpu":
            remove_shm_buffers(addr, port)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _names(text: Union[str, Sequence[str]], allowed: Sequence[str], what: str) -> List[str]:
    if isinstance(text, str):
        names = list(allowed) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    else:
        names = list(text)
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ConfigError(f"bench moe: {what} must be 'all' or a comma list of {', '.join(allowed)}, got {text!r}")
    return [n for n in allowed if n in names]


def _dims(dims: Union[str, Sequence[int]]) -> List[int]:
    try:
        out = [int(d) for d in dims.split(",")] if isinstance(dims, str) else [int(d) for d in dims]
    except ValueError:
        raise ConfigError(f"bench moe: dims must be a comma list of widths, got {dims!r}") from None
    if not out or any(d < 1 for d in out):
        raise ConfigError(f"bench moe: dims must be positive widths, got {dims!r}")
    return out


def run(dims: Union[str, Sequence[int]] = (1024, 3072), tokens: int = 4096, spec: str = "1S12E2A",
        repeats: int = 5, warmup: int = 1, device: str = "auto",
        modes: Union[str, Sequence[str]] = "forward,forward+backward",
        variants: Union[str, Sequence[str]] = "all") -> List[Row]:
    """Rows of :data:`COLUMNS`, one per width, mode and variant."""
    widths, which_modes, which = _dims(dims), _names(modes, MODES, "modes"), _names(variants, VARIANTS, "variants")
    if tokens < 1 or repeats < 1 or warmup < 0:
        raise ConfigError("bench moe: tokens and repeats must be >= 1, warmup >= 0")
    parsed = MoESpec.parse(spec)
    shapes = [parsed.resolve(d, 4 * d) for d in widths]  # bad widths fail before anything runs
    dev = pick_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    needs_ds = any(n in DEEPSPEED for n in which)
    if needs_ds and parsed.top_k < 1:
        raise ConfigError(f"bench moe: DeepSpeed's layer routes to k >= 1 experts, spec {spec} has k = 0")
    rows: List[Row] = []
    with deepspeed_world(dev) if needs_ds else contextlib.nullcontext():
        for shape in shapes:
            rows += _site(shape, tokens, which, which_modes, repeats, warmup, dev, dtype)
    return rows


def _site(shape: SiteShape, tokens: int, which: List[str], modes: List[str], repeats: int, warmup: int,
          dev: torch.device, dtype: torch.dtype) -> List[Row]:
    models = build_variants(shape, which, dev, dtype)
    x = torch.randn(1, tokens, shape.dim, generator=torch.Generator().manual_seed(1)).to(dev, dtype)
    for m in models.values():
        m.eval()
    fwd_flops = {name: model_flops(lambda m=m: _forward(m, x)) for name, m in models.items()}
    limit = flops_limit(shape)
    rows: List[Row] = []
    for mode in modes:
        train = mode == "forward+backward"
        xin = x.detach().clone().requires_grad_(train)
        step = _forward_backward if train else _forward
        for m in models.values():
            m.train(train)
        times = interleaved_times({n: (lambda m=models[n]: step(m, xin)) for n in which}, repeats=repeats,
                                  warmup=warmup)
        medians = {n: statistics.median(t) for n, t in times.items()}
        for n in which:
            rows.append({
                "D": shape.dim, "tokens": tokens, "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
                "mode": mode, "variant": n, "median ms": fmt(medians[n] * 1e3, 4),
                "vs dense": fmt(medians[n] / medians["dense"], 3) if "dense" in medians else "",
                "fwd FLOPs vs dense": fmt(fwd_flops[n] / fwd_flops["dense"], 4),
                "FLOPs limit": fmt(1.0 if n == "dense" else limit, 4),
            })
    del models
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows
