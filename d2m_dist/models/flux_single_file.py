"""Loading an original single-file FLUX checkpoint (``flux1-dev.safetensors`` layout).

diffusers ships ``convert_flux_transformer_checkpoint_to_diffusers`` for this,
but it hard-codes FLUX.1-dev's width (3072) and MLP ratio, so it cannot load the
small FLUX-architecture models our tests and the digits preset build. This
module does the same key mapping with widths read from the tensors; tests check
that on a FLUX.1-dev-shaped checkpoint it produces exactly diffusers' keys and
shapes, and that it round-trips values on small models.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict

import torch
from safetensors import safe_open

from d2m_dist.models.flux_config import (
    FLUX1_DEV_CONFIG,
    TeacherLoadError,
    check_safetensors_extent,
)

# original prefix -> diffusers prefix, for the parts that are plain renames
_RENAMES = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
_DOUBLE_RENAMES = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
}
_SINGLE_RENAMES = {
    "modulation.lin": "norm.linear",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
    "linear2": "proj_out",
}


def is_original_flux(keys) -> bool:
    keys = set(keys)
    return any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys)


def _swap_scale_shift(t: torch.Tensor) -> torch.Tensor:
    # the original final layer orders (shift, scale); diffusers' AdaLayerNormContinuous (scale, shift)
    shift, scale = t.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def _rename(key: str, table: Dict[str, str]) -> str | None:
    for old, new in table.items():
        if key == old:
            return new
        if key.startswith(old + "."):
            return new + key[len(old):]
    return None


def original_to_diffusers(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map an original FLUX state dict to diffusers' ``FluxTransformer2DModel`` keys."""
    sd = {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()}
    out: Dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        m = re.match(r"(double_blocks|single_blocks)\.(\d+)\.(.+)", key)
        if m is None:
            if key.startswith("final_layer.adaLN_modulation.1."):
                out["norm_out.linear." + key.rsplit(".", 1)[1]] = _swap_scale_shift(t)
                continue
            new = _rename(key, _RENAMES)
            if new is None:
                raise TeacherLoadError(f"unexpected key {key!r} in an original FLUX checkpoint")
            out[new] = t
            continue
        kind, i, rest = m.group(1), m.group(2), m.group(3)
        if kind == "double_blocks":
            prefix = f"transformer_blocks.{i}."
            qkv = re.match(r"(img|txt)_attn\.qkv\.(weight|bias)", rest)
            if qkv:
                names = ("to_q", "to_k", "to_v") if qkv.group(1) == "img" else ("add_q_proj", "add_k_proj", "add_v_proj")
                for name, part in zip(names, t.chunk(3, dim=0)):
                    out[f"{prefix}attn.{name}.{qkv.group(2)}"] = part
                continue
            new = _rename(rest, _DOUBLE_RENAMES)
        else:
            prefix = f"single_transformer_blocks.{i}."
            lin1 = re.match(r"linear1\.(weight|bias)", rest)
            if lin1:
                # linear1 stacks q, k, v (D rows each) and the MLP up-projection (the rest)
                dim = sd[f"single_blocks.{i}.linear2.weight"].shape[0]
                q, k, v, mlp = torch.split(t, [dim, dim, dim, t.shape[0] - 3 * dim], dim=0)
                for name, part in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", mlp)):
                    out[f"{prefix}{name}.{lin1.group(1)}"] = part
                continue
            new = _rename(rest, _SINGLE_RENAMES)
        if new is None:
            raise TeacherLoadError(f"unexpected key {key!r} in an original FLUX checkpoint")
        out[prefix + new] = t
    return out


def infer_config(sd: Dict[str, torch.Tensor], head_dim: int | None = None) -> Dict:
    """A diffusers config for an original-layout state dict (diffusers keys).

    Widths and block counts come from the tensors; the head split and rope axes
    are not recorded in the weights: FLUX.1-dev's (head_dim 128, axes 16/56/56)
    unless the caller gives a config.
    """
    dim = sd["x_embedder.weight"].shape[0]
    head_dim = head_dim or FLUX1_DEV_CONFIG["attention_head_dim"]
    cfg = dict(FLUX1_DEV_CONFIG)
    cfg.update(
        in_channels=sd["x_embedder.weight"].shape[1],
        joint_attention_dim=sd["context_embedder.weight"].shape[1],
        pooled_projection_dim=sd["time_text_embed.text_embedder.linear_1.weight"].shape[1],
        num_layers=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")),
        num_single_layers=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")),
        guidance_embeds=any(k.startswith("time_text_embed.guidance_embedder") for k in sd),
        attention_head_dim=head_dim,
        num_attention_heads=dim // head_dim,
    )
    return cfg


_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def read_original_checkpoint(path: Path, *, meta: bool = False) -> Dict[str, torch.Tensor]:
    """The checkpoint's tensors; with ``meta``, meta tensors of the right shapes (header only)."""
    check_safetensors_extent(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if not is_original_flux(keys):
                raise TeacherLoadError(f"teacher {path}: not a FLUX checkpoint (no double_blocks.* keys)")
            if meta:
                out = {}
                for k in keys:
                    sl = f.get_slice(k)
                    out[k] = torch.empty(sl.get_shape(), dtype=_ST_DTYPES.get(sl.get_dtype(), torch.float32), device="meta")
                return out
            return {k: f.get_tensor(k) for k in keys}
    except TeacherLoadError:
        raise
    except Exception as exc:
        raise TeacherLoadError(f"teacher weights {path}: unreadable ({str(exc).splitlines()[0]})") from None
