"""Activation bytes of a training step, measured on a narrow, short twin of the student and scaled up.

What autograd keeps for the backward depends on details no formula keeps up with:
which weights train (a frozen linear layer keeps no input), what attention,
norms, rotary embeddings, the router and the expert dispatch save. So the
estimate runs the real code: the student rebuilt with one attention head (width
``D_twin = head_dim``) on ``1/g`` of the image and text tokens (their ratio kept),
the stage's trainable set applied, one sample through its forward under
``saved_tensors_hooks`` (and bf16 autocast when the run uses it: the residual
stream, norms and modulation stay fp32, matrix products save bf16), counting each
saved storage once and leaving out the parameters. Nearly all of it is linear in
width and in tokens (token-by-width tensors; flash attention keeps ``L``
statistics, not ``L^2``), so the twin's bytes times ``(D / D_twin) * g * batch`` are
the model's; per-token scalars (norm statistics, router logits) are the part that
does not scale with the width, small at FLUX's. Under autocast every weight whose
module's input needs a gradient is also saved as a bf16 copy (autocast caches no
cast of a frozen weight): those are counted at full size, once per micro-batch.

The teacher's block outputs that the feature loss compares stay alive too, ``L D``
per tapped block in the teacher's dtype. With activation checkpointing a block
keeps only its input, and one block's whole set exists while it is recomputed.
tests/plan/test_memory.py compares the estimate with the tensors a real training
step saves (CPU, fp32).
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
from d2m_dist.models.moe import ExpertStack
from d2m_dist.models.precision import bf16_autocast
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


def _saved_bytes(model: nn.Module, inputs: FluxInputs, bf16: bool) -> Tuple[int, List[int], List[str]]:
    """(bytes the forward saves, the same per top-level block, the modules whose weights autocast copies).

    Parameters are left out, and so are their bf16 copies (they do not scale with tokens: counted at full
    size by the caller, from the names of the modules whose input needed a gradient).
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_numels = {p.numel() for p in model.parameters()}
    seen: Dict[int, int] = {}
    marks: List[int] = []
    copied: List[str] = []

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        copy = bf16 and t.dtype == torch.bfloat16 and s.nbytes() // 2 in weight_numels
        if ptr not in params and ptr not in seen and not copy:
            seen[ptr] = s.nbytes()
        return t

    def needs_input_grad(name):
        def hook(module, args):
            if bf16 and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
                copied.append(name)
        return hook

    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    handles = [b.register_forward_hook(lambda *_: marks.append(sum(seen.values()))) for b in blocks]
    handles += [m.register_forward_pre_hook(needs_input_grad(n)) for n, m in model.named_modules()
                if type(m) is nn.Linear or isinstance(m, ExpertStack)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), bf16_autocast("cpu", bf16):
            out = call_flux(model, inputs)
            out.float().pow(2).mean()  # the loss's own saved tensor
    finally:
        for h in handles:
            h.remove()
    per_block = [b - a for a, b in zip([0] + marks[:-1], marks)]
    return sum(seen.values()), per_block, sorted(set(copied))


def twin_activations(twin: nn.Module, teacher_config: Dict, image_tokens: int, text_tokens: int,
                     guidance: bool, bf16: bool) -> Tuple[float, float, List[str]]:
    """(bytes per sample of the full-size student, its largest block's, the modules whose weights are copied)."""
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
    total, per_block, copied = _saved_bytes(twin, inputs, bf16)
    scale = teacher_config["num_attention_heads"] * g  # D / D_twin times the token divisor
    return total * scale, max(per_block) * scale, copied


def activation_estimate(twin: nn.Module, student: nn.Module, teacher_config: Dict, image_tokens: int,
                        text_tokens: int, batch: int, ep: int, bf16: bool, teacher_bytes: int,
                        feature_blocks: int) -> Dict[str, Dict[str, int]]:
    """Per rank and micro-batch, with and without activation checkpointing: the student's saved tensors, the
    bf16 weight copies autocast saves for them (once per micro-batch, whatever its size), the teacher's features."""
    total, largest, copied = twin_activations(twin, teacher_config, image_tokens, text_tokens,
                                              bool(teacher_config.get("guidance_embeds")), bf16)
    modules = dict(student.named_modules())
    experts = {id(p) for m in student.modules() if isinstance(m, ExpertStack) for p in m.parameters()}
    weights = 0
    for name in copied:
        for p in modules[name].parameters(recurse=False):
            if p.dim() > 1:
                weights += 2 * p.numel() // (ep if id(p) in experts else 1)
    dim = teacher_config["num_attention_heads"] * teacher_config["attention_head_dim"]
    features = batch * feature_blocks * (image_tokens + text_tokens) * dim * teacher_bytes
    # with checkpointing a block keeps its input (the residual stream: fp32 whatever the autocast)
    n_blocks = len(student.transformer_blocks) + len(student.single_transformer_blocks)
    inputs_kept = n_blocks * (image_tokens + text_tokens) * dim * FP32
    return {
        "without_ckpt": {"student": int(batch * total), "weight_copies": weights, "teacher_features": features},
        "with_ckpt": {"student": int(batch * (inputs_kept + largest)), "weight_copies": weights,
                      "teacher_features": features},
    }
