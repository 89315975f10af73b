"""The offline text encoder's caption cache: the disk copy equals a fresh encoding and stands in for the encoder."""

from __future__ import annotations

import pytest
import torch

from d2m_dist.digits import text_encoder as te


def test_disk_cache_round_trip(tmp_path, monkeypatch):
    captions = ["a handwritten digit seven", ""]
    monkeypatch.delenv("D2M_TEXT_CACHE", raising=False)
    te._encode.cache_clear()
    fresh = te.encode_captions(captions, 8)

    monkeypatch.setenv("D2M_TEXT_CACHE", str(tmp_path))
    te._encode.cache_clear()
    written = te.encode_captions(captions, 8)
    assert len(list(tmp_path.glob("*.pt"))) == 1 and not list(tmp_path.glob("*.tmp*"))
    for a, b in zip(fresh, written):
        assert torch.equal(a, b)

    # a new process (memory cache empty) without the encoder reads the disk copy
    te._encode.cache_clear()
    def no_encoder():
        raise RuntimeError("the encoder was loaded")

    monkeypatch.setattr(te, "load_text_encoder", no_encoder)
    cached = te.encode_captions(captions, 8)
    for a, b in zip(fresh, cached):
        assert torch.equal(a, b)
    te._encode.cache_clear()
    with pytest.raises(RuntimeError, match="encoder was loaded"):  # another max_tokens is another entry: the encoder is needed
        te.encode_captions(captions, 9)
    te._encode.cache_clear()


def test_damaged_cache_entry_is_recomputed(tmp_path, monkeypatch):
    monkeypatch.setenv("D2M_TEXT_CACHE", str(tmp_path))
    te._encode.cache_clear()
    good = te.encode_captions(["a handwritten digit one"], 4)
    entry = next(tmp_path.glob("*.pt"))
    entry.write_bytes(b"not a tensor file")
    te._encode.cache_clear()
    again = te.encode_captions(["a handwritten digit one"], 4)
    assert torch.equal(good[0], again[0]) and torch.equal(good[1], again[1])
    assert entry.stat().st_size > 100
    te._encode.cache_clear()


def test_encodings_are_fp32_inside_a_bf16_autocast_region(monkeypatch):
    monkeypatch.delenv("D2M_TEXT_CACHE", raising=False)
    te._encode.cache_clear()
    plain = te.encode_captions(["a handwritten digit two"], 8)
    te._encode.cache_clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = te.encode_captions(["a handwritten digit two"], 8)
    te._encode.cache_clear()
    assert inside[0].dtype == torch.float32
    assert torch.equal(plain[0], inside[0]) and torch.equal(plain[1], inside[1])
