"""A batch of the precomputed stream as model inputs: packed latents, text embeddings, guidance.

``d2m precompute`` stores unpacked latents ``[C, h, w]`` and text embeddings per
sample; the stage trainer, stage-0 calibration and the sample grids read them
through :func:`precomputed_flow_batch`.

Data made for another model is one line, not a matrix-product error:
:func:`check_shards_fit_model` is the preflight (a few sample headers of the
first shard, before any engine starts, the same verdict on every rank), while
single samples that do not fit among good ones are skipped and counted by the
stream (``StreamConfig.latent_channels`` etc., :class:`PrecomputedContract`).
:func:`check_batch_shapes` checks one batch (stage-0 calibration).
"""

from __future__ import annotations

import itertools
import tarfile
from typing import Any, Dict, List, Optional

import torch
import webdataset as wds
from webdataset import tariterators

from d2m_dist.config import ConfigError
from d2m_dist.data.decode import PrecomputedContract, PrecomputedFormat
from d2m_dist.data.errors import DataError, SkipSample
from d2m_dist.data.stream import expand_shard_urls
from d2m_dist.models.flow import FlowBatch
from d2m_dist.models.flux import latent_image_ids, pack_latents

# Samples read from the first shard: up to 7 bad ones at its head do not fail a good set. Whole
# samples are read (tar has no index): 8 FLUX samples with 512 fp16 T5 tokens are ~33 MB.
PREFLIGHT_SAMPLES = 8
PREFLIGHT_SHARDS = 3  # shards tried when the first ones yield no sample at all


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


def check_shards_fit_model(urls: str | List[str], model_config: Any) -> None:
    """DataError (one line) when precomputed shards at ``urls`` were made for another model, or are not
    precomputed shards at all.

    Reads the headers of the first few samples of the first shard (the next ones
    when a shard yields none) and checks them against the model's
    :class:`PrecomputedContract`. One sample that fits is enough: a bad sample
    among good ones is the stream's business (a counted skip), a wholly wrong
    data set is an error before training. The shards are read in their listed
    order, so every rank reaches the same verdict.
    """
    shards = expand_shard_urls(urls)
    fmt = PrecomputedFormat(PrecomputedContract.for_model(model_config))
    failures: List[SkipSample] = []
    for url in shards[:PREFLIGHT_SHARDS]:
        for sample in _first_samples(url, PREFLIGHT_SAMPLES):
            try:
                fmt.prepare(sample)
                return
            except SkipSample as exn:
                failures.append(exn)
        if failures:  # this shard had samples, none fitting: a verdict
            break
    if not failures:
        raise DataError(f"data urls {urls!r}: no sample could be read from the first "
                        f"{min(len(shards), PREFLIGHT_SHARDS)} shard(s) (first: {shards[0]})")
    first = failures[0]
    detail = " ".join(first.detail.split())  # one line, whatever numpy put in its message
    raise DataError(f"data urls {urls!r}: none of the first {len(failures)} samples of {first.url} fits the model "
                    f"(sample {first.key}: {first.reason}: {detail}); shards precomputed for another model, or not "
                    f"precomputed shards?")


def _first_samples(url: str, n: int) -> List[dict]:
    """Up to ``n`` whole samples from the start of shard ``url`` (fewer when it is short, cut or unreadable)."""
    try:
        stream = wds.gopen(url, "rb")
    except (OSError, ValueError):  # ValueError: a scheme gopen does not know
        return []
    samples: List[dict] = []
    try:
        # group_by_keys yields a sample once the next key starts (or the shard ends): always whole samples
        members = ({**m, "__url__": url} for m in tariterators.tar_file_iterator(stream))
        for sample in itertools.islice(tariterators.group_by_keys(members), n):
            samples.append(sample)
    except (tarfile.TarError, OSError, EOFError, ValueError):  # cut or damaged: the stream counts it; keep what came
        pass
    finally:
        stream.close()
    return samples
