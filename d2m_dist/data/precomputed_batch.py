"""A batch of the precomputed stream as model inputs: packed latents, text embeddings, guidance.

``d2m precompute`` stores unpacked latents ``[C, h, w]`` and text embeddings per
sample; the stage trainer, stage-0 calibration and the sample grids read them
through :func:`precomputed_flow_batch`, and :func:`check_batch_shapes` turns data
made for another model into one line instead of a matrix-product error.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from d2m_dist.config import ConfigError
from d2m_dist.models.flow import FlowBatch
from d2m_dist.models.flux import latent_image_ids, pack_latents


def precomputed_flow_batch(b: Dict, guidance: Optional[float]):
    """A batch of the precomputed stream (``latent`` [B, C, h, w], embeddings) as a packed FlowBatch."""
    latents = torch.as_tensor(b["latent"]).float()
    _, _, h, w = latents.shape
    embeds = torch.as_tensor(b["prompt_embeds"]).float()
    return FlowBatch(
        latents=pack_latents(latents), prompt_embeds=embeds, pooled=torch.as_tensor(b["pooled"]).float(),
        img_ids=latent_image_ids(h // 2, w // 2), txt_ids=torch.zeros(embeds.shape[1], 3),
        guidance=None if guidance is None else torch.full((latents.shape[0],), float(guidance)),
    )


def check_batch_shapes(batch, model_config, source: str) -> None:
    """A clear one-line error when precomputed data does not fit the model (instead of a matmul error)."""
    have = {"latent channels x 4 (packed)": batch.latents.shape[-1],
            "prompt_embeds width": batch.prompt_embeds.shape[-1], "pooled width": batch.pooled.shape[-1]}
    want = {"latent channels x 4 (packed)": model_config.in_channels,
            "prompt_embeds width": model_config.joint_attention_dim,
            "pooled width": model_config.pooled_projection_dim}
    for name, value in have.items():
        if value != want[name]:
            raise ConfigError(f"{source}: {name} is {value}, the model takes {want[name]} "
                              f"(shards precomputed for another model?)")
