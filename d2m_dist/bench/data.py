"""Read rate of the precomputed stream: samples/s that ShardStream delivers to a training step.

Two sets, both written to a temporary folder first:

* ``digits``: the embedded 1797 digits as raw shards, run through
  :func:`~d2m_dist.data.precompute.precompute` (pixel latents [1, 8, 8], MiniLM
  embeddings [8, 384], pooled [384], float32);
* ``flux-shaped``: synthetic samples with FLUX.1 [dev] shapes at 1024x1024 in
  float16 (latent [16, 128, 128], T5 embeddings [512, 4096], CLIP pooled [768]),
  random values, written directly (running the real encoders is not the point:
  only what the trainer reads is timed).

Each pass is one full epoch of a fresh ``iter(stream)``, so DataLoader worker
start-up is included, as it is at every epoch of training. The shards were just
written, so they are read from the page cache: this is the decode + collate
rate, an upper bound for a cold disk or a network filesystem.
"""

from __future__ import annotations

import io
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import webdataset as wds

import d2m_dist.digits  # noqa: F401  (registers the digits shard source and precompute encoder)
from d2m_dist.bench.common import Row, fmt
from d2m_dist.data.precompute import PrecomputeConfig, precompute
from d2m_dist.data.shards import (
    ShardWriterConfig,
    brace_pattern,
    make_shards,
    shard_name,
)
from d2m_dist.data.stream import ShardStream, StreamConfig

# FLUX.1 [dev] at 1024x1024: 16 latent channels at 1/8 resolution, T5-XXL (4096 wide,
# max_sequence_length 512) and CLIP-L pooled (768).
FLUX_SHAPES = {"latent.npy": (16, 128, 128), "prompt_embeds.npy": (512, 4096), "pooled.npy": (768,)}


def run(passes: int = 3, workers: int = 2, digits_batch: int = 64, flux_batch: int = 4, digits_shards: int = 16,
        flux_samples: int = 64, flux_shards: int = 4, root: Optional[str] = None) -> List[Row]:
    """One row per set: median samples/s (and MB/s of array payload) over ``passes`` epochs."""
    with tempfile.TemporaryDirectory(prefix="d2m-bench-data-", dir=root) as tmp:
        digits_url = _digits_set(Path(tmp) / "digits", digits_shards)
        flux_url = _flux_shaped_set(Path(tmp) / "flux", flux_samples, flux_shards)
        return [
            _measure("digits", digits_url, digits_batch, workers, passes),
            _measure("flux-shaped 1024px", flux_url, flux_batch, workers, passes),
        ]


def _digits_set(folder: Path, shards: int) -> str:
    raw = make_shards("digits", ShardWriterConfig(out_dir=str(folder / "raw"), max_samples=math.ceil(1797 / shards)))
    return precompute(PrecomputeConfig(inputs=raw.url, out_dir=str(folder / "pre"), batch_size=64)).manifest.url


def _flux_shaped_set(folder: Path, samples: int, shards: int) -> str:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per_shard = math.ceil(samples / shards)
    for s in range(shards):
        with wds.TarWriter(str(folder / shard_name("flux", s)), encoder=False, mtime=0) as tar:
            for i in range(s * per_shard, min(samples, (s + 1) * per_shard)):
                sample: Dict[str, bytes] = {"__key__": f"{i:09d}", "txt": b"a synthetic caption",
                                            "json": b'{"original_size": [1024, 1024]}'}
                for name, shape in FLUX_SHAPES.items():
                    sample[name] = _npy(rng.standard_normal(shape, dtype=np.float32).astype(np.float16))
                tar.write(sample)
    return str(folder / brace_pattern("flux", shards))


def _measure(name: str, url: str, batch: int, workers: int, passes: int) -> Row:
    stream = ShardStream(StreamConfig(urls=url, kind="precomputed", batch_size=batch, num_workers=workers,
                                      rank=0, world_size=1, shuffle_buffer=0))
    rates, shapes, per_sample = [], "", 0.0
    for _ in range(passes):
        t0 = time.perf_counter()
        n, nbytes, first = _epoch(stream)
        rates.append(n / (time.perf_counter() - t0))
        shapes, per_sample = first, nbytes / n
    rate = statistics.median(rates)
    return {"set": name, "sample": shapes, "MB/sample": fmt(per_sample / 1e6), "samples": n, "batch": batch,
            "workers": workers, "median samples/s": fmt(rate), "MB/s": fmt(rate * per_sample / 1e6),
            "passes (samples/s)": ", ".join(fmt(r) for r in rates)}


def _epoch(stream: ShardStream) -> Tuple[int, int, str]:
    n = nbytes = 0
    shapes = ""
    for batch in stream:
        arrays = [batch[k] for k in ("latent", "prompt_embeds", "pooled")]
        n += arrays[0].shape[0]
        nbytes += sum(a.numel() * a.element_size() for a in arrays)
        shapes = shapes or " ".join(f"{k} {list(a.shape[1:])} {str(a.dtype).removeprefix('torch.')}"
                                    for k, a in zip(("latent", "embeds", "pooled"), arrays))
    return n, nbytes, shapes


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()
