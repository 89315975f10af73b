"""Rectified-flow inputs for FLUX: timestep sampling, noising, velocity targets.

FLUX convention: ``x_t = (1 - t) z + t e`` with ``t`` in [0, 1] (t = 1 is pure
noise) and velocity target ``e - z``. Training timesteps are logit-normal and
shifted by resolution, ``t' = e^mu / (e^mu + 1/t - 1)`` with ``mu`` linear in the
image token count (diffusers' ``calculate_shift`` defaults), as FLUX trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from d2m_dist.models.flux import FluxInputs


@dataclass
class FlowBatch:
    """Clean training data for one step (already encoded and packed)."""

    latents: torch.Tensor  # [B, N_img, C] packed clean latents
    prompt_embeds: torch.Tensor  # [B, N_txt, J]
    pooled: torch.Tensor  # [B, P]
    img_ids: torch.Tensor  # [N_img, 3]
    txt_ids: torch.Tensor  # [N_txt, 3]
    guidance: Optional[torch.Tensor] = None  # [B]
    # global position of this batch in its calibration/training sequence; seeds its
    # noise so that the rank that happens to process it does not matter
    index: Optional[int] = None

    @property
    def size(self) -> int:
        return self.latents.shape[0]

    def to(self, device=None, dtype=None) -> "FlowBatch":
        def mv(t):
            if t is None:
                return None
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            return t.to(device) if device is not None else t

        return FlowBatch(mv(self.latents), mv(self.prompt_embeds), mv(self.pooled), self.img_ids.to(device),
                         self.txt_ids.to(device), mv(self.guidance), self.index)


def resolution_shift(image_tokens: int, base_tokens: int = 256, max_tokens: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's mu for an image of ``image_tokens`` packed tokens."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (image_tokens - base_tokens)


def shift_timesteps(t: torch.Tensor, mu: float) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def sample_timesteps(batch: int, image_tokens: int, generator: torch.Generator, shift: bool = True) -> torch.Tensor:
    t = torch.sigmoid(torch.randn(batch, generator=generator))
    if shift:
        t = shift_timesteps(t, resolution_shift(image_tokens))
    return t.clamp(1e-4, 1 - 1e-4)


def noised_inputs(batch: FlowBatch, generator: torch.Generator, shift: bool = True,
                  timesteps: Optional[torch.Tensor] = None) -> Tuple[FluxInputs, torch.Tensor]:
    """(model inputs at a sampled t, or at ``timesteps`` [B] when given; velocity target)."""
    z = batch.latents
    noise = torch.randn(z.shape, generator=generator, dtype=torch.float32).to(z)
    if timesteps is None:
        timesteps = sample_timesteps(z.shape[0], z.shape[1], generator, shift)
    t = timesteps.to(z.device)
    tt = t.to(z.dtype)[:, None, None]
    x_t = (1 - tt) * z + tt * noise
    inputs = FluxInputs(
        hidden_states=x_t,
        encoder_hidden_states=batch.prompt_embeds,
        pooled_projections=batch.pooled,
        timestep=t,
        img_ids=batch.img_ids,
        txt_ids=batch.txt_ids,
        guidance=batch.guidance,
    )
    return inputs, noise - z
