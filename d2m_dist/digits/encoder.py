"""The digits preset's precompute encoder (``d2m precompute encoder=digits``).

No VAE: the "latent" is the 8x8 image itself, one channel in [-1, 1] (the
convention of :mod:`d2m_dist.models.sampling`), and text comes from the offline
MiniLM package (:mod:`d2m_dist.digits.text_encoder`).
"""

from __future__ import annotations

from typing import Optional

from d2m_dist.data.encoders import Encoder, EncoderSpec, check_buckets, luma
from d2m_dist.data.errors import DataError
from d2m_dist.digits.text_encoder import encode_captions, load_text_encoder
from d2m_dist.models.sampling import uint8_to_unit


class DigitsEncoder(Encoder):
    """Pixel-space latents ``[B, 1, H, W]`` in [-1, 1] and MiniLM text embeddings."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        load_text_encoder()  # fail here, before the first shard, if the package is broken

    def encode(self, images, captions, generator):
        latents = uint8_to_unit(luma(images))[:, None]
        embeds, pooled = encode_captions(captions, self.max_tokens)
        return latents, embeds, pooled


def digits_encoder_spec(model_path: Optional[str], buckets, max_tokens: Optional[int], compute_dtype: str,
                        sampling: str) -> EncoderSpec:
    if model_path:
        raise DataError(f"encoder 'digits' works in pixel space and takes no model_path (got {model_path!r})")
    resolved = check_buckets(buckets if buckets is not None else [[8, 8]], multiple=2, why="2x2 latent packing")
    tokens = 8 if max_tokens is None else max_tokens  # "[CLS] a handwritten digit seven [SEP]" is 7 tokens
    settings = {"encoder": "digits", "max_tokens": tokens, "buckets": [list(b) for b in resolved]}
    return EncoderSpec("digits", resolved, tokens, settings, lambda device: DigitsEncoder(tokens))
