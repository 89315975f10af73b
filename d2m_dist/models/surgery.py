"""Student surgery: replace FFN sites of a ``FluxTransformer2DModel`` with MoE layers.

Site names: ``double.<i>.ff`` and ``double.<i>.ff_context`` (image and text FFN
of double-stream block i) and ``single.<i>.mlp`` (the fused MLP of single-stream
block i). A single-stream block computes
``gate * proj_out(cat[attn, gelu(proj_mlp(x))])``; its ``proj_out`` is split
exactly into the attention out-projection (columns ``[:D]``, which keeps the one
shared bias) and the MLP down-projection (columns ``[D:]``, no bias), so the MLP
becomes an ordinary FFN site.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
from torch import nn

from d2m_dist.config import MoEConfig
from d2m_dist.models.mob import MoBGroup
from d2m_dist.models.moe import MoEFeedForward
from d2m_dist.models.spec import MoESpec, SiteShape


@dataclass
class DenseFFN:
    """A dense FFN site's weights: ``y = w2 @ gelu(w1 @ x + b1) + b2``."""

    w1: torch.Tensor  # [H, D]
    b1: torch.Tensor  # [H]
    w2: torch.Tensor  # [D, H]
    b2: Optional[torch.Tensor]  # [D]; None for single-stream sites (the bias stays with attn_out)

    @property
    def dim(self) -> int:
        return self.w1.shape[1]

    @property
    def hidden(self) -> int:
        return self.w1.shape[0]


@dataclass
class SitePartition:
    """Which dense neurons become which expert (the provenance of a site)."""

    shared: torch.Tensor  # [Hs] dense neuron indices of the shared expert
    experts: torch.Tensor  # [n, He] dense neuron indices, row = global expert id
    router: Optional[torch.Tensor] = None  # [n, D] initial router weight

    def check(self, hidden: int) -> None:
        allidx = torch.cat([self.shared.reshape(-1), self.experts.reshape(-1)])
        if allidx.numel() != hidden or not torch.equal(allidx.sort().values, torch.arange(hidden)):
            raise ValueError("site partition is not a permutation of the dense neurons")


# ----------------------------------------------------------------------------- reading dense sites


def parse_site(site: str):
    stream, idx, kind = site.split(".")
    return stream, int(idx), kind


def dense_ffn(model: nn.Module, site: str) -> DenseFFN:
    """The dense weights of ``site`` in an unconverted FLUX transformer (views, no copies)."""
    stream, i, kind = parse_site(site)
    if stream == "double":
        ff = getattr(model.transformer_blocks[i], kind)
        up, down = ff.net[0].proj, ff.net[2]
        return DenseFFN(up.weight, up.bias, down.weight, down.bias)
    block = model.single_transformer_blocks[i]
    d = block.proj_out.weight.shape[0]
    return DenseFFN(block.proj_mlp.weight, block.proj_mlp.bias, block.proj_out.weight[:, d:], None)


# ----------------------------------------------------------------------------- the converted single block


class MoESingleTransformerBlock(nn.Module):
    """A FLUX single-stream block whose fused MLP is an MoE layer.

    Same call signature and outputs as diffusers' ``FluxSingleTransformerBlock``;
    ``attn_out`` is ``proj_out[:, :D]`` with the block's bias, ``mlp`` the MoE layer
    built from ``proj_mlp`` and ``proj_out[:, D:]``.
    """

    def __init__(self, dense: FluxSingleTransformerBlock, mlp: MoEFeedForward):
        super().__init__()
        d = dense.proj_out.weight.shape[0]
        self.norm = dense.norm
        self.attn = dense.attn
        self.attn_out = nn.Linear(d, d, dtype=dense.proj_out.weight.dtype, device=dense.proj_out.weight.device)
        with torch.no_grad():
            if not dense.proj_out.weight.is_meta:
                self.attn_out.weight.copy_(dense.proj_out.weight[:, :d])
                self.attn_out.bias.copy_(dense.proj_out.bias)
        self.mlp = mlp

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        text_seq_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        residual = hidden_states
        norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
        attn_output = self.attn(
            hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {})
        )
        # proj_out(cat[a, m]) == attn_out(a) + W_down m: the split is exact
        hidden_states = residual + gate.unsqueeze(1) * (self.attn_out(attn_output) + self.mlp(norm_hidden_states))
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


# ----------------------------------------------------------------------------- building MoE layers


def build_moe_layer(
    shape: SiteShape, cfg: MoEConfig, *, out_bias: bool, dtype, device
) -> MoEFeedForward:
    return MoEFeedForward(
        shape,
        out_bias=out_bias,
        renormalize=cfg.renormalize,
        z_loss_coeff=cfg.z_loss_coeff,
        capacity_factor=cfg.capacity_factor,
        dtype=dtype,
        device=device,
    )


@torch.no_grad()
def fill_from_dense(layer: MoEFeedForward, dense: DenseFFN, part: SitePartition) -> None:
    """Copy the dense rows/columns that ``part`` names into ``layer`` (its local experts only)."""
    part.check(dense.hidden)
    if layer.shared is not None:
        layer.shared.fc1.weight.copy_(dense.w1[part.shared])
        layer.shared.fc1.bias.copy_(dense.b1[part.shared])
        layer.shared.fc2.weight.copy_(dense.w2[:, part.shared])
    ids = torch.tensor(list(layer.global_expert_ids))
    idx = part.experts[ids]  # [n_local, He]
    layer.experts.w1.copy_(dense.w1[idx])
    layer.experts.b1.copy_(dense.b1[idx])
    layer.experts.w2.copy_(dense.w2[:, idx].permute(1, 0, 2))
    if layer.bias is not None:
        layer.bias.copy_(dense.b2)
    if part.router is not None:
        layer.router.weight.copy_(part.router.float())


def convert_to_moe(
    model: nn.Module,
    specs: Dict[str, MoESpec],
    cfg: MoEConfig,
    partitions: Optional[Dict[str, SitePartition]] = None,
) -> nn.Module:
    """Replace every site in ``specs`` by an MoE layer, in place.

    With ``partitions`` the layers take the dense weights (conversion); without,
    they are only shaped (rebuilding a student before loading its weights).
    """
    for site, spec in specs.items():
        stream, i, kind = parse_site(site)
        dense = dense_ffn(model, site)
        shape = spec.resolve(dense.dim, dense.hidden, site)
        dtype, device = dense.w1.dtype, dense.w1.device
        layer = build_moe_layer(shape, cfg, out_bias=stream == "double", dtype=dtype, device=device)
        if partitions is not None:
            fill_from_dense(layer, dense, partitions[site])
        if stream == "double":
            setattr(model.transformer_blocks[i], kind, layer)
        else:
            model.single_transformer_blocks[i] = MoESingleTransformerBlock(model.single_transformer_blocks[i], layer)
    return model


def moe_layer_at(model: nn.Module, site: str) -> MoEFeedForward:
    stream, i, kind = parse_site(site)
    if stream == "double":
        return getattr(_unwrap_block(model.transformer_blocks, i), kind)
    return _unwrap_block(model.single_transformer_blocks, i).mlp


def _unwrap_block(blocks: Any, i: int):
    """Block i of a stream, looking through Mixture-of-Blocks groups."""
    k = 0
    for entry in blocks:
        members = entry.blocks if isinstance(entry, MoBGroup) else [entry]
        for b in members:
            if k == i:
                return b
            k += 1
    raise IndexError(f"block {i} out of range")
