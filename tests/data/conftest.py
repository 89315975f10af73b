"""Shared fixtures for the data-layer tests: small synthetic shards."""

from __future__ import annotations

import io
import struct
import zlib
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


def one_bit_png(side: int) -> bytes:
    """A valid all-black ``side`` x ``side`` 1-bit PNG, tiny on disk: 30000 makes a decompression bomb
    (109 KB declaring 900 MP). Written with zlib row by row: PIL would hold the whole image in memory
    at one byte per pixel to save it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte 0, then the packed bits
    z = zlib.compressobj(9)
    idat = [z.compress(row * min(1000, side - done)) for done in range(0, side, 1000)] + [z.flush()]
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b"")


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


# A model config (the diffusers FLUX keys the data layer reads): 4 latent channels, packed 2x2
SMALL_MODEL = {"in_channels": 16, "joint_attention_dim": 16, "pooled_projection_dim": 12}


def precomputed_sample(key: str, seed: int = 0, latent=None, embeds=None, pooled=None, **members) -> dict:
    """A precomputed sample that fits SMALL_MODEL (latent [4, 2, 2], 3 tokens), with any array replaced
    (an ndarray, or bytes as they are) and any member added or replaced."""
    rng = np.random.default_rng(seed)
    arrays = {
        "latent.npy": rng.standard_normal((4, 2, 2)).astype(np.float32) if latent is None else latent,
        "prompt_embeds.npy": rng.standard_normal((3, 16)).astype(np.float32) if embeds is None else embeds,
        "pooled.npy": rng.standard_normal(12).astype(np.float32) if pooled is None else pooled,
    }
    sample = {"__key__": key, **{k: npy_bytes(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()},
              "txt": f"caption {key}".encode(), "json": b'{"original_size": [16, 16]}'}
    sample.update(members)
    return sample


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


@pytest.fixture(scope="session")
def huge_pngs():
    """{"bomb": 30000 x 30000 (900 MP, over PIL's own error limit), "big": 12000 x 12000 (144 MP, over
    PIL's warning limit only)}: bytes of 1-bit PNGs, built once per session (about half a second)."""
    return {"bomb": one_bit_png(30000), "big": one_bit_png(12000)}
