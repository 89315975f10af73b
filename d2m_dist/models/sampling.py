"""Euler sampling of a rectified-flow FLUX transformer, with classifier-free guidance.

The model predicts the velocity ``v = e - z`` of ``x_t = (1 - t) z + t e``
(FLUX convention, t = 1 is noise), so ``dx/dt = v`` and one Euler step from
``t_i`` to ``t_{i+1} < t_i`` is ``x += (t_{i+1} - t_i) v``. Any module callable
through :func:`~d2m_dist.models.flux.call_flux` can be sampled: the dense
teacher, a converted student, or a test double.

Also here: the pixel-space "latents" of models that work without a VAE (the
digits preset), where an image's pixels are packed 2x2 exactly as FLUX packs VAE
latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from d2m_dist.models.flow import resolution_shift, shift_timesteps
from d2m_dist.models.flux import (
    FluxInputs,
    call_flux,
    latent_image_ids,
    pack_latents,
    unpack_latents,
)


@dataclass
class SamplerConfig:
    steps: int = 20
    # Classifier-free guidance: v = v_u + scale (v_c - v_u) with the empty caption
    # as the unconditional branch. 1.0 means one conditional call per step, no CFG.
    guidance_scale: float = 1.0
    # FLUX's resolution-dependent time shift of the schedule (as FluxPipeline does).
    shift: bool = False
    # The value fed to the model's guidance embedding (FLUX.1-dev is
    # guidance-distilled and takes e.g. 3.5); None for models built without one.
    embedded_guidance: Optional[float] = 1.0
    seed: int = 0


def timestep_schedule(steps: int, image_tokens: int, shift: bool) -> torch.Tensor:
    """``steps + 1`` times from 1 (noise) down to 0 (data), optionally FLUX-shifted."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if shift:
        inner = t[1:-1]  # the shift maps 0 -> 0 and 1 -> 1; skip the endpoints' 1/0
        t[1:-1] = shift_timesteps(inner, resolution_shift(image_tokens))
    return t


@torch.no_grad()
def euler_sample(
    model: torch.nn.Module,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    *,
    grid: tuple[int, int],
    channels: int,
    cfg: Optional[SamplerConfig] = None,
    uncond_embeds: Optional[torch.Tensor] = None,
    uncond_pooled: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Packed latents ``[B, grid_h * grid_w, channels]`` at t = 0.

    ``grid`` is the packed token grid (latent height / 2, latent width / 2).
    ``uncond_embeds``/``uncond_pooled`` (``[1, ...]`` or ``[B, ...]``, the empty
    caption's encoding) are required when ``cfg.guidance_scale != 1``. The start
    noise comes from ``torch.Generator().manual_seed(cfg.seed)`` unless given,
    drawn as FluxPipeline draws it, so a seed fixes the output and gives the pipeline's.
    """
    cfg = cfg or SamplerConfig()
    batch, txt_len = prompt_embeds.shape[:2]
    gh, gw = grid
    param = next(model.parameters(), None)
    device = param.device if param is not None else prompt_embeds.device
    dtype = param.dtype if param is not None else prompt_embeds.dtype

    if noise is None:
        # drawn on the CPU (the same on any device), unpacked and then packed, as diffusers' FluxPipeline
        # draws it: a seed gives the pipeline's noise
        gen = torch.Generator().manual_seed(cfg.seed)
        noise = pack_latents(torch.randn(batch, channels // 4, 2 * gh, 2 * gw, generator=gen))
    x = noise.to(device=device, dtype=torch.float32)

    use_cfg = cfg.guidance_scale != 1.0
    embeds, pool = prompt_embeds, pooled
    if use_cfg:
        if uncond_embeds is None or uncond_pooled is None:
            raise ValueError("guidance_scale != 1 needs the empty caption's uncond_embeds and uncond_pooled")
        # one model call on [cond; uncond] instead of two
        embeds = torch.cat([prompt_embeds, uncond_embeds.expand(batch, -1, -1)])
        pool = torch.cat([pooled, uncond_pooled.expand(batch, -1)])
    rows = embeds.shape[0]
    embeds, pool = embeds.to(device=device, dtype=dtype), pool.to(device=device, dtype=dtype)
    img_ids = latent_image_ids(gh, gw).to(device)
    txt_ids = torch.zeros(txt_len, 3, device=device)
    guidance = None
    if cfg.embedded_guidance is not None:
        guidance = torch.full((rows,), float(cfg.embedded_guidance), device=device)

    times = timestep_schedule(cfg.steps, gh * gw, cfg.shift)
    for t_cur, t_next in zip(times[:-1].tolist(), times[1:].tolist()):
        x_in = torch.cat([x, x]) if use_cfg else x
        inputs = FluxInputs(
            hidden_states=x_in.to(dtype),
            encoder_hidden_states=embeds,
            pooled_projections=pool,
            timestep=torch.full((rows,), t_cur, device=device),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
        )
        v = call_flux(model, inputs).float()
        if use_cfg:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + cfg.guidance_scale * (v_cond - v_uncond)
        x = x + (t_next - t_cur) * v
    return x


# ----------------------------------------------------------------------------- pixel-space latents


def pixels_to_latents(images: torch.Tensor) -> torch.Tensor:
    """Images ``[B, H, W]`` (one channel) or ``[B, C, H, W]`` -> packed ``[B, HW/4, 4C]``.

    For models trained on pixels directly (no VAE): the image plays the latent's
    role and FLUX's 2x2 packing turns each 2x2 patch into one token.
    """
    if images.dim() == 3:
        images = images[:, None]
    if images.shape[-1] % 2 or images.shape[-2] % 2:
        raise ValueError(f"image sides must be even for 2x2 packing, got {tuple(images.shape[-2:])}")
    return pack_latents(images.contiguous())


def latents_to_pixels(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pixels_to_latents`: ``[B, C, H, W]``, or ``[B, H, W]`` when C = 1."""
    images = unpack_latents(packed.contiguous(), height, width)
    return images[:, 0] if images.shape[1] == 1 else images


def uint8_to_unit(images) -> torch.Tensor:
    """0..255 pixels (array or tensor) -> float32 in [-1, 1], the range pixel-space models train on."""
    return torch.as_tensor(images).float() / 127.5 - 1.0


def unit_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`uint8_to_unit`, clipping what a sampler overshoots."""
    return ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
