"""diffusers -> original FLUX key layout, to build single-file fixtures (inverse of the loader's map)."""

from typing import Dict

import torch


def diffusers_to_original(sd: Dict[str, torch.Tensor], num_double: int, num_single: int) -> Dict[str, torch.Tensor]:
    sd = dict(sd)
    out = {}
    ren = {
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear",
    }
    for new, old in ren.items():
        for s in ("weight", "bias"):
            if f"{new}.{s}" in sd:
                out[f"{old}.{s}"] = sd.pop(f"{new}.{s}")
    for s in ("weight", "bias"):
        scale, shift = sd.pop(f"norm_out.linear.{s}").chunk(2)
        out[f"final_layer.adaLN_modulation.1.{s}"] = torch.cat([shift, scale])
    for i in range(num_double):
        p, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for s in ("weight", "bias"):
            out[f"{o}img_attn.qkv.{s}"] = torch.cat([sd.pop(f"{p}attn.to_{x}.{s}") for x in "qkv"])
            out[f"{o}txt_attn.qkv.{s}"] = torch.cat([sd.pop(f"{p}attn.add_{x}_proj.{s}") for x in "qkv"])
            for a, b in (("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
                         ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                         ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2"),
                         ("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj")):
                out[f"{o}{b}.{s}"] = sd.pop(f"{p}{a}.{s}")
        for a, b in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                     ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            out[f"{o}{b}.scale"] = sd.pop(f"{p}attn.{a}.weight")
    for i in range(num_single):
        p, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for s in ("weight", "bias"):
            out[f"{o}linear1.{s}"] = torch.cat([sd.pop(f"{p}attn.to_{x}.{s}") for x in "qkv"] + [sd.pop(f"{p}proj_mlp.{s}")])
            out[f"{o}linear2.{s}"] = sd.pop(f"{p}proj_out.{s}")
            out[f"{o}modulation.lin.{s}"] = sd.pop(f"{p}norm.linear.{s}")
        out[f"{o}norm.query_norm.scale"] = sd.pop(f"{p}attn.norm_q.weight")
        out[f"{o}norm.key_norm.scale"] = sd.pop(f"{p}attn.norm_k.weight")
    assert not sd, f"unmapped keys: {list(sd)[:5]}"
    return out
