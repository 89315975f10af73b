"""Activation bytes of a training step, measured on a narrow, short twin of the student and scaled up.

What autograd keeps for the backward depends on details no formula keeps up with:
which weights train (a frozen linear layer keeps no input), what attention,
norms, rotary embeddings, the router and the expert dispatch save. So the
estimate runs the real code: the student rebuilt with one attention head (width
``D_twin = head_dim``) on ``1/g`` of the image and text tokens (their ratio kept),
the stage's trainable set applied, one sample through its forward under
``saved_tensors_hooks``, counting each saved storage once and leaving out the
parameters. Nearly all of it is linear in width and in tokens (token-by-width
tensors; flash attention keeps ``L`` statistics, not ``L^2``), so the twin's bytes
times ``(D / D_twin) * g * batch`` are the model's; per-token scalars (norm
statistics, router logits) are the part that does not scale with the width, small
at FLUX's. ``act_bytes / 4`` turns the twin's fp32 into the training's precision
(bf16 autocast keeps most saved tensors in bf16).

The teacher's block outputs that the feature loss compares stay alive too, ``L D``
per tapped block in the teacher's dtype. With activation checkpointing a block
keeps only its input, and one block's whole set exists while it is recomputed.
tests/plan/test_activations.py compares the estimate with the tensors a real
training step saves.
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
from torch import nn

from d2m_dist.config import ConvertConfig, StageConfig
from d2m_dist.distill.stages import StageRecipe, apply_recipe_to_student
from d2m_dist.models.flux import FluxInputs, build_flux, call_flux, latent_image_ids
from d2m_dist.models.mob import apply_mob, mob_groups
from d2m_dist.models.spec import select_sites
from d2m_dist.models.surgery import convert_to_moe

FP32 = 4


def twin_shrink(image_tokens: int, text_tokens: int) -> int:
    """The token divisor g: the twin keeps at least 4 text tokens, and exactly the model's ratio."""
    common = math.gcd(image_tokens, text_tokens) if text_tokens else image_tokens
    return max(1, common // 4)


def build_twin(teacher_config: Dict, convert: ConvertConfig, stage: StageConfig, recipe: StageRecipe) -> nn.Module:
    """The student of ``convert`` at one attention head, the stage's recipe applied (real, small tensors)."""
    config = {**teacher_config, "num_attention_heads": 1}
    torch.manual_seed(0)
    model = build_flux(config)
    c = model.config
    convert_to_moe(model, select_sites(convert.moe, c.num_layers, c.num_single_layers), convert.moe)
    apply_mob(model, convert.mob)
    if stage.mob.enabled and not mob_groups(model):
        apply_mob(model, stage.mob)
    apply_recipe_to_student(model, recipe)
    return model.train()


def _saved_bytes(model: nn.Module, inputs: FluxInputs) -> Tuple[int, List[int]]:
    """(bytes the forward saves for the backward, the same per top-level block), parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: Dict[int, int] = {}
    marks: List[int] = []

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.data_ptr() not in seen:
            seen[s.data_ptr()] = s.nbytes()
        return t

    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    handles = [b.register_forward_hook(lambda *_: marks.append(sum(seen.values()))) for b in blocks]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = call_flux(model, inputs)
            out.float().pow(2).mean()  # the loss's own saved tensor
    finally:
        for h in handles:
            h.remove()
    per_block = [b - a for a, b in zip([0] + marks[:-1], marks)]
    return sum(seen.values()), per_block


def twin_activations(twin: nn.Module, teacher_config: Dict, image_tokens: int, text_tokens: int,
                     guidance: bool) -> Tuple[float, float, float, int]:
    """(bytes per sample, the largest block's, block inputs' sum, g) of the full-size student, in fp32."""
    g = twin_shrink(image_tokens, text_tokens)
    n_img, n_txt = image_tokens // g, text_tokens // g
    side = int(math.isqrt(n_img))
    h, w = (side, n_img // side) if side * (n_img // side) == n_img else (1, n_img)
    c = twin.config
    gen = torch.Generator().manual_seed(0)
    inputs = FluxInputs(
        hidden_states=torch.randn(1, n_img, c.in_channels, generator=gen),
        encoder_hidden_states=torch.randn(1, n_txt, c.joint_attention_dim, generator=gen),
        pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=gen),
        timestep=torch.rand(1, generator=gen), img_ids=latent_image_ids(h, w), txt_ids=torch.zeros(n_txt, 3),
        guidance=torch.full((1,), 3.5) if guidance else None)
    total, per_block = _saved_bytes(twin, inputs)
    width = teacher_config["num_attention_heads"]  # D / D_twin
    scale = width * g
    dim = teacher_config["num_attention_heads"] * teacher_config["attention_head_dim"]
    inputs_kept = len(per_block) * (image_tokens + text_tokens) * dim * FP32
    return total * scale, max(per_block) * scale, inputs_kept, g


def activation_estimate(twin: nn.Module, teacher_config: Dict, image_tokens: int, text_tokens: int, batch: int,
                        act_bytes: int, teacher_bytes: int, feature_blocks: int) -> Dict[str, Dict[str, int]]:
    """Per rank and micro-batch, with and without activation checkpointing: student and teacher features."""
    total, largest, inputs_kept, _ = twin_activations(twin, teacher_config, image_tokens, text_tokens,
                                                      bool(teacher_config.get("guidance_embeds")))
    precision = act_bytes / FP32
    dim = teacher_config["num_attention_heads"] * teacher_config["attention_head_dim"]
    features = batch * feature_blocks * (image_tokens + text_tokens) * dim * teacher_bytes
    return {
        "without_ckpt": {"student": int(batch * total * precision), "teacher_features": features},
        "with_ckpt": {"student": int(batch * (inputs_kept + largest) * precision), "teacher_features": features},
    }
