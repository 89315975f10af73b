"""Shared fixtures for the data-layer tests: small synthetic shards."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, Iterable

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from d2m_dist.data.shards import ShardWriterConfig, make_shards


def png_bytes(h: int, w: int, value: int = 128, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(value)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    arr = rng.integers(0, 255, size=shape, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, samples: Iterable[Dict[str, bytes]]) -> Path:
    """A shard with exactly these members (no validation), as broken as the test wants."""
    with wds.TarWriter(str(path), encoder=False, mtime=0) as w:
        for s in samples:
            w.write(s)
    return path


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    """40 digits samples over 8 shards (5 each); keys 000000000..000000039 = digit index."""
    out = tmp_path_factory.mktemp("digits")
    return make_shards("digits", ShardWriterConfig(out_dir=str(out), max_samples=5, limit=40))
