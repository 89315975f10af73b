"""Stage-0 calibration batches: the sources the Taylor scores are computed on.

``calibration.source`` names one: ``random`` (Gaussian latents and embeddings of
the teacher's shapes, for smoke runs), ``shards`` (the first batches of a fixed-order
epoch over precomputed shards), or one a preset registers (``digits``:
:mod:`d2m_dist.digits`). Every source yields the same sequence on every rank;
the scorer shares it out (``convert/taylor.py``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, Iterator

import torch

from d2m_dist.config import ConfigError, ConvertConfig
from d2m_dist.data.errors import DataError
from d2m_dist.data.precomputed_batch import check_batch_shapes, precomputed_flow_batch
from d2m_dist.data.stream import expand_shard_urls, fixed_order_stream
from d2m_dist.models.flow import FlowBatch
from d2m_dist.models.flux import latent_image_ids

log = logging.getLogger("d2m_dist.convert")

# (the teacher's diffusers config, the conversion config) -> the calibration batches, in order
CalibrationSource = Callable[[Any, ConvertConfig], Iterable[FlowBatch]]
CALIBRATION_SOURCES: Dict[str, CalibrationSource] = {}


def register_calibration_source(name: str, source: CalibrationSource) -> None:
    CALIBRATION_SOURCES[name] = source


def check_calibration_source(cfg: ConvertConfig) -> None:
    """One line, before any weights are read, for a source that does not exist or has no shards."""
    c = cfg.calibration
    if c.source not in CALIBRATION_SOURCES:
        raise ConfigError(f"calibration.source: '{c.source}' is not one of {', '.join(sorted(CALIBRATION_SOURCES))}")
    if c.source == "shards":
        try:
            expand_shard_urls(c.urls)
        except DataError as exc:
            raise ConfigError(f"calibration: {exc}") from None


def calibration_batches(model_config: Any, cfg: ConvertConfig) -> Iterable[FlowBatch]:
    return CALIBRATION_SOURCES[cfg.calibration.source](model_config, cfg)


def random_batches(model_config, cfg) -> Iterator[FlowBatch]:
    """Gaussian latents and text embeddings of the teacher's shapes (smoke runs, tests)."""
    c = cfg.calibration
    side = int(round(c.image_tokens ** 0.5))
    if side * side != c.image_tokens:
        raise ConfigError(f"calibration.image_tokens={c.image_tokens} is not a square grid")
    for i in range(c.num_batches):
        g = torch.Generator().manual_seed(c.seed * 7919 + i)
        yield FlowBatch(
            latents=torch.randn(c.batch_size, c.image_tokens, model_config.in_channels, generator=g),
            prompt_embeds=torch.randn(c.batch_size, c.text_tokens, model_config.joint_attention_dim, generator=g),
            pooled=torch.randn(c.batch_size, model_config.pooled_projection_dim, generator=g),
            img_ids=latent_image_ids(side, side),
            txt_ids=torch.zeros(c.text_tokens, 3),
            guidance=torch.full((c.batch_size,), c.guidance) if model_config.guidance_embeds else None,
            index=i,
        )


def shard_batches(model_config, cfg: ConvertConfig) -> Iterator[FlowBatch]:
    """The first ``num_batches`` batches of an unshuffled epoch over the precomputed shards.

    Every rank reads the same sequence (one reader, fixed order) and keeps its
    share by index, so the scores do not depend on the world size.
    """
    c = cfg.calibration
    stream = fixed_order_stream(c.urls, c.batch_size, seed=c.seed)
    guidance = c.guidance if model_config.guidance_embeds else None
    n = 0
    for b in stream:
        if n == c.num_batches:
            return
        batch = precomputed_flow_batch(b, guidance)
        if n == 0:
            check_batch_shapes(batch, model_config, f"calibration.urls {c.urls}")
        batch.index = n
        yield batch
        n += 1
    if n < c.num_batches:
        log.warning("calibration: the shards held %d batches of %d, fewer than num_batches=%d", n, c.batch_size,
                    c.num_batches)


register_calibration_source("random", random_batches)
register_calibration_source("shards", shard_batches)
