"""FLOPs of one forward pass of a FLUX transformer or a converted student, counted from its modules.

Nothing is run and no FLUX number is written down: the count walks the model
(built on the meta device if need be) and multiplies each matrix product's shape
by the rows it meets in one forward pass of ``batch`` samples with ``image_tokens``
image and ``text_tokens`` text tokens:

* every ``nn.Linear``: ``rows * in_features * out_features`` multiply-adds (MACs);
  the rows are the image tokens (``x_embedder``, the double blocks' image stream,
  the output projection), the text tokens (``context_embedder``, the text stream),
  both (single-stream blocks), or one per sample (the timestep/guidance/pooled-text
  embedders, the AdaLN modulation and the Mixture-of-Blocks routers, which act on
  per-sample vectors, as diffusers computes them);
* attention: ``QK^T`` and ``AV`` over the joint sequence, ``2 * heads * L^2 * head_dim``;
* an MoE site (:class:`~d2m_dist.models.moe.MoEFeedForward`): its shared expert and
  router on every token, and ``top_k`` of its routed experts per token (all of them
  with ``unit_gates``), as the layer is set at the time of the count (at top-k 0 it
  does not route: no router either);
* a Mixture-of-Blocks group: its router once per sample, and each of its m blocks
  weighted ``kappa / m`` (the share of samples that run it; with ``unit_gates``
  every block and no router).

Biases, norms, activations, softmaxes, RoPE and residual adds are left out, as
torch's ``FlopCounterMode`` leaves them out; FLOPs are 2 per MAC.
tests/models/test_flops.py checks the count against ``FlopCounterMode`` on tiny
models (dense, MoE, MoE + MoB) and on FLUX.1-dev on the meta device, and against a
hand count. Every linear layer and expert stack of the model must be met by the
walk, or the count refuses (a module it does not know would silently cost nothing).

Conventions (:class:`FlopConvention`) change what is counted: attention on or off,
the modulation per sample (what runs) or per token, the text length, FLOPs or MACs.
``docs/DECISIONS.md`` ("FLOPs") says which one reproduces the paper's table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Set

from diffusers.models.attention import FeedForward
from diffusers.models.normalization import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    AdaLayerNormZeroSingle,
)
from diffusers.models.transformers.transformer_flux import (
    FluxAttention,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch import nn

from d2m_dist.models.mob import MoBGroup
from d2m_dist.models.moe import ExpertStack, MoEFeedForward
from d2m_dist.models.surgery import MoESingleTransformerBlock

PARTS = ("embedders", "modulation", "attention_proj", "attention_core", "ffn", "routers")
MODULATION = ("per_sample", "per_token")
_MODULATION_TYPES = (AdaLayerNormZero, AdaLayerNormZeroSingle, AdaLayerNormContinuous)


def image_tokens(height: int = 1024, width: int = 1024, vae_scale: int = 8, patch: int = 2) -> int:
    """Image tokens FLUX sees for a ``height x width`` image: the VAE's 8x downsampling, then 2x2 packing."""
    step = vae_scale * patch
    if height % step or width % step:
        raise ValueError(f"image size {height}x{width} is not a multiple of {step} (VAE {vae_scale}x, patch {patch})")
    return (height // step) * (width // step)


@dataclass(frozen=True)
class FlopConvention:
    """What a FLOPs figure counts, beside the model: one forward pass of one image."""

    name: str = "ours"
    height: int = 1024
    width: int = 1024
    text_tokens: int = 512  # FLUX.1-dev's T5 length (max_sequence_length); 0: no text stream
    attention: bool = True  # QK^T and AV
    modulation: str = "per_sample"  # per_sample: as diffusers computes it; per_token: as if every token did
    flops_per_mac: int = 2  # 2: FLOPs; 1: MACs (what fvcore-style counters call FLOPs)

    @property
    def image_tokens(self) -> int:
        return image_tokens(self.height, self.width)

    def describe(self) -> str:
        mod = "modulation per sample" if self.modulation == "per_sample" else "modulation per token"
        unit = "FLOPs (2/MAC)" if self.flops_per_mac == 2 else "MACs"
        att = "attention QK^T+AV" if self.attention else "no attention products"
        return (f"{self.height}x{self.width} ({self.image_tokens} image tokens), {self.text_tokens} text tokens, "
                f"{att}, {mod}, {unit}, one forward pass")


@dataclass
class FlopReport:
    """MACs of one forward pass by part (:data:`PARTS`), and the FLOPs they make under ``flops_per_mac``."""

    batch: int
    image_tokens: int
    text_tokens: int
    flops_per_mac: int
    macs: Dict[str, float] = field(default_factory=dict)

    @property
    def total_macs(self) -> float:
        return sum(self.macs.values())

    @property
    def flops(self) -> float:
        return self.flops_per_mac * self.total_macs

    @property
    def tflops(self) -> float:
        return self.flops / 1e12

    def by_part(self) -> Dict[str, float]:
        """FLOPs by part."""
        return {k: self.flops_per_mac * self.macs.get(k, 0.0) for k in PARTS}

    def as_dict(self) -> Dict:
        return {**asdict(self), "flops": self.flops}


class _Walk:
    """Adds up MACs while walking the model; remembers every counted matrix so that none is missed."""

    def __init__(self, batch: int, n_img: int, n_txt: int, attention: bool, modulation: str):
        self.batch, self.n_img, self.n_txt = batch, n_img, n_txt
        self.attention, self.modulation = attention, modulation
        self.macs: Dict[str, float] = {k: 0.0 for k in PARTS}
        self.seen: Set[int] = set()

    # -- leaves ------------------------------------------------------------------------

    def linear(self, part: str, layer: nn.Linear, tokens: int, in_features: Optional[int] = None) -> None:
        """``layer`` on ``tokens`` rows per sample (only ``in_features`` of its input columns when given)."""
        self.seen.add(id(layer))
        self.macs[part] += self.batch * tokens * (in_features or layer.in_features) * layer.out_features

    def per_sample(self, part: str, module: nn.Module) -> None:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                self.linear(part, m, 1)

    def adaln(self, norm: nn.Module, tokens: int) -> None:
        """AdaLN modulation: once per sample (what runs), or once per modulated token under ``per_token``."""
        if not isinstance(norm, _MODULATION_TYPES):
            raise TypeError(f"flops: {type(norm).__name__} is not an AdaLN modulation")
        self.linear("modulation", norm.linear, tokens if self.modulation == "per_token" else 1)

    def core(self, attn: FluxAttention, tokens: int) -> None:
        """QK^T and AV over a joint sequence of ``tokens``."""
        if self.attention:
            self.macs["attention_core"] += self.batch * 2 * attn.heads * tokens * tokens * attn.head_dim

    # -- modules -----------------------------------------------------------------------

    def attention_projections(self, attn: FluxAttention, x_tokens: int, ctx_tokens: int) -> None:
        for name in ("to_q", "to_k", "to_v"):
            self.linear("attention_proj", getattr(attn, name), x_tokens)
        if not attn.pre_only:
            self.linear("attention_proj", attn.to_out[0], x_tokens)
        if attn.added_kv_proj_dim is not None:
            for name in ("add_q_proj", "add_k_proj", "add_v_proj"):
                self.linear("attention_proj", getattr(attn, name), ctx_tokens)
            if getattr(attn, "to_add_out", None) is not None:
                self.linear("attention_proj", attn.to_add_out, ctx_tokens)
        self.core(attn, x_tokens + (ctx_tokens if attn.added_kv_proj_dim is not None else 0))

    def ffn(self, ff: nn.Module, tokens: int) -> None:
        if isinstance(ff, MoEFeedForward):
            if ff.shared is not None:
                self.linear("ffn", ff.shared.fc1, tokens)
                self.linear("ffn", ff.shared.fc2, tokens)
            stack: ExpertStack = ff.experts
            self.seen.add(id(stack))
            active = ff.num_experts if ff.unit_gates else ff.top_k
            if active:  # at top-k 0 (the shared expert alone) the layer does not route
                self.linear("routers", ff.router, tokens)
            else:
                self.seen.add(id(ff.router))
            _, width, dim = stack.w1.shape
            # w1 [width, dim] and w2 [dim, width] of each of the `active` experts a token meets
            self.macs["ffn"] += self.batch * tokens * active * 2 * width * dim
        elif isinstance(ff, FeedForward):
            for m in ff.modules():
                if isinstance(m, nn.Linear):
                    self.linear("ffn", m, tokens)
        else:
            raise TypeError(f"flops: unknown feed-forward {type(ff).__name__}")

    def double(self, block: FluxTransformerBlock) -> None:
        self.adaln(block.norm1, self.n_img)
        self.adaln(block.norm1_context, self.n_txt)
        self.attention_projections(block.attn, self.n_img, self.n_txt)
        self.ffn(block.ff, self.n_img)
        self.ffn(block.ff_context, self.n_txt)

    def single(self, block: nn.Module) -> None:
        tokens = self.n_img + self.n_txt
        self.adaln(block.norm, tokens)
        self.attention_projections(block.attn, tokens, 0)
        if isinstance(block, MoESingleTransformerBlock):
            self.linear("attention_proj", block.attn_out, tokens)
            self.ffn(block.mlp, tokens)
        else:  # fused: proj_out acts on cat[attn (D), mlp (4D)]
            d = block.proj_out.out_features
            self.linear("ffn", block.proj_mlp, tokens)
            self.linear("attention_proj", block.proj_out, tokens, in_features=d)
            self.linear("ffn", block.proj_out, tokens, in_features=block.proj_out.in_features - d)

    def block(self, block: nn.Module) -> None:
        if isinstance(block, MoBGroup):
            self.group(block)
        elif isinstance(block, FluxTransformerBlock):
            self.double(block)
        elif isinstance(block, (FluxSingleTransformerBlock, MoESingleTransformerBlock)):
            self.single(block)
        else:
            raise TypeError(f"flops: unknown block {type(block).__name__}")

    def group(self, group: MoBGroup) -> None:
        """Router once per sample; each block weighted kappa/m (with unit gates: every block, no router)."""
        if group.unit_gates:
            self.seen.update(id(m) for m in group.router.modules())
        else:
            self.per_sample("routers", group.router)
        before = dict(self.macs)
        for b in group.blocks:
            self.block(b)
        if not group.unit_gates:
            for k in PARTS:  # kappa * (sum over the m blocks) / m: exact for equal blocks
                self.macs[k] = before[k] + group.kappa * (self.macs[k] - before[k]) / group.m

    def model(self, model: nn.Module) -> None:
        self.linear("embedders", model.x_embedder, self.n_img)
        self.linear("embedders", model.context_embedder, self.n_txt)
        self.per_sample("embedders", model.time_text_embed)
        for b in model.transformer_blocks:
            self.block(b)
        for b in model.single_transformer_blocks:
            self.block(b)
        self.adaln(model.norm_out, self.n_img)
        self.linear("embedders", model.proj_out, self.n_img)
        missed = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, ExpertStack)) and id(m) not in self.seen]
        if missed:
            raise TypeError(f"flops: {len(missed)} matrix modules not counted, e.g. {', '.join(missed[:3])}")


def forward_flops(model: nn.Module, image_tokens: int = 4096, text_tokens: int = 512, *, batch: int = 1,
                  attention: bool = True, modulation: str = "per_sample", flops_per_mac: int = 2) -> FlopReport:
    """MACs and FLOPs of one forward pass of ``model`` (a FLUX transformer, dense or converted, any device)."""
    if modulation not in MODULATION:
        raise ValueError(f"modulation must be one of {', '.join(MODULATION)}, got {modulation!r}")
    if flops_per_mac not in (1, 2):
        raise ValueError(f"flops_per_mac must be 1 (MACs) or 2 (FLOPs), got {flops_per_mac}")
    walk = _Walk(batch, image_tokens, text_tokens, attention, modulation)
    walk.model(model)
    return FlopReport(batch, image_tokens, text_tokens, flops_per_mac, walk.macs)


def convention_flops(model: nn.Module, convention: FlopConvention) -> FlopReport:
    """:func:`forward_flops` of one image under ``convention``."""
    return forward_flops(model, convention.image_tokens, convention.text_tokens, attention=convention.attention,
                         modulation=convention.modulation, flops_per_mac=convention.flops_per_mac)
