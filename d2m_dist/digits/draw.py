"""Images of a digits-preset teacher's task from any model callable through call_flux.

Captions are encoded by the preset's MiniLM encoder at the card's caption
length; classifier-free guidance uses the empty caption as the unconditional
branch, exactly as training dropped captions. The start noise of the whole
batch is drawn once from the sampler's seed (as :func:`euler_sample` draws it)
and then cut into chunks, so a teacher and a student asked for the same
captions and seed start from identical noise whatever the chunk size.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from d2m_dist.digits.card import PretrainConfig
from d2m_dist.digits.text_encoder import empty_caption_encoding, encode_captions
from d2m_dist.models.flux import pack_latents
from d2m_dist.models.sampling import SamplerConfig, euler_sample, latents_to_pixels

CHUNK = 256  # images per sampler call: bounds activation memory on a laptop


def start_noise(count: int, card: PretrainConfig, seed: int) -> torch.Tensor:
    """Packed noise ``[count, tokens, channels]``: euler_sample's draw for a batch of ``count``."""
    gh, gw = card.grid
    gen = torch.Generator().manual_seed(seed)
    return pack_latents(torch.randn(count, card.pixel_channels, 2 * gh, 2 * gw, generator=gen))


@torch.no_grad()
def draw(model: torch.nn.Module, captions: Sequence[str], card: PretrainConfig, sampler: SamplerConfig,
         noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Images ``[B, C, H, W]`` in (about) [-1, 1], one per caption (C = the task's pixel channels)."""
    if noise is None:
        noise = start_noise(len(captions), card, sampler.seed)
    unique = sorted(set(captions))  # each caption encoded once (and cached once), then indexed
    index = {c: i for i, c in enumerate(unique)}
    rows = torch.as_tensor([index[c] for c in captions])
    embeds, pooled = encode_captions(unique, card.max_tokens)
    embeds, pooled = embeds[rows], pooled[rows]
    empty_embeds, empty_pooled = empty_caption_encoding(card.max_tokens)
    was_training = model.training
    model.eval()
    out = []
    try:
        for lo in range(0, len(captions), CHUNK):
            hi = lo + CHUNK
            packed = euler_sample(model, embeds[lo:hi], pooled[lo:hi], grid=card.grid, channels=card.latent_channels,
                                  cfg=sampler, uncond_embeds=empty_embeds, uncond_pooled=empty_pooled,
                                  noise=noise[lo:hi])
            pixels = latents_to_pixels(packed.cpu(), card.image_size, card.image_size)
            out.append(pixels if pixels.dim() == 4 else pixels[:, None])
    finally:
        model.train(was_training)
    return torch.cat(out)
