"""The embedded "digits" set: scikit-learn's bundled 8x8 handwritten digits with captions.

Raw records for ``d2m shards make digits``, and the in-memory training set the
teacher, calibration and the trainer's digits batches draw from (pixel space:
an 8x8 image in [-1, 1] packed 2x2 into 16 tokens of 4 channels, as FLUX packs
VAE latents).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from d2m_dist.data.shards import SourceRecord
from d2m_dist.digits.card import PretrainConfig
from d2m_dist.digits.text_encoder import empty_caption_encoding, encode_captions
from d2m_dist.models.flow import FlowBatch
from d2m_dist.models.flux import latent_image_ids
from d2m_dist.models.sampling import pixels_to_latents, uint8_to_unit

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_caption(label: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


def load_digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 [1797, 8, 8] in 0..255, labels int64 [1797]); no download."""
    # lazy: scikit-learn's import costs about a second, and only the digits data needs it
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


def scan_digits(limit: Optional[int] = None) -> List[SourceRecord]:
    """The embedded 8x8 digits as PNG bytes; the json member also holds the label."""
    images, labels = load_digits_arrays()
    n = len(images) if limit is None else min(limit, len(images))
    records = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(images[i], mode="L").save(buf, format="PNG")
        label = int(labels[i])
        meta = {"label": label, "source": f"digits/{i}"}
        records.append(SourceRecord(digit_caption(label), data=buf.getvalue(), ext="png", meta=meta))
    return records


@dataclass
class DigitsTrainingSet:
    """All real digits, encoded once: the whole set is a few hundred kB (the "digits" task)."""

    latents: torch.Tensor  # [N, 16, 4] packed pixels in [-1, 1]
    labels: torch.Tensor  # [N]
    caption_embeds: torch.Tensor  # [10, T, 384], row = digit
    caption_pooled: torch.Tensor  # [10, 384]
    empty_embeds: torch.Tensor  # [1, T, 384]
    empty_pooled: torch.Tensor  # [1, 384]

    def sample(self, cfg: PretrainConfig, gen: torch.Generator) -> FlowBatch:
        """A random batch of ``cfg.batch_size`` real digits, captions dropped at ``cfg.caption_dropout``."""
        idx = torch.randint(self.latents.shape[0], (cfg.batch_size,), generator=gen)
        labels = self.labels[idx]
        return captioned_batch(self.latents[idx], self.caption_embeds[labels], self.caption_pooled[labels],
                               (self.empty_embeds, self.empty_pooled), cfg, gen)


def digit_captions() -> List[str]:
    return [digit_caption(d) for d in range(len(DIGIT_WORDS))]


def digits_training_set(max_tokens: int) -> DigitsTrainingSet:
    images, labels = load_digits_arrays()
    embeds, pooled = encode_captions(digit_captions(), max_tokens)
    empty_embeds, empty_pooled = empty_caption_encoding(max_tokens)
    return DigitsTrainingSet(
        latents=pixels_to_latents(uint8_to_unit(images)),
        labels=torch.as_tensor(labels),
        caption_embeds=embeds,
        caption_pooled=pooled,
        empty_embeds=empty_embeds,
        empty_pooled=empty_pooled,
    )


def captioned_batch(latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
                    empty: Tuple[torch.Tensor, torch.Tensor], cfg: PretrainConfig, gen: torch.Generator) -> FlowBatch:
    """Packed images with their captions' encodings, each caption replaced by the empty one at
    ``cfg.caption_dropout`` (drawn from ``gen``), as the teacher of ``cfg`` is fed."""
    batch = latents.shape[0]
    drop = torch.rand(batch, generator=gen) < cfg.caption_dropout
    embeds, pooled = embeds.clone(), pooled.clone()
    embeds[drop] = empty[0]
    pooled[drop] = empty[1]
    return FlowBatch(
        latents=latents,
        prompt_embeds=embeds,
        pooled=pooled,
        img_ids=latent_image_ids(*cfg.grid),
        txt_ids=torch.zeros(cfg.max_tokens, 3),
        guidance=torch.full((batch,), cfg.embedded_guidance) if cfg.guidance_embeds else None,
    )


def sample_batch(data, cfg: PretrainConfig, gen: torch.Generator) -> FlowBatch:
    """A random training batch of ``data`` (a task's training set, :func:`d2m_dist.digits.tasks.training_set`)."""
    return data.sample(cfg, gen)
