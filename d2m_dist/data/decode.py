"""Sample formats: how a webdataset sample becomes part of a batch.

A format works in two steps, so that the expensive part runs only for batches
that are actually delivered:

* ``prepare(sample)`` is cheap: it validates the sample (raising
  :class:`SkipSample` with a reason), reads only what grouping needs (an image
  header for its size, a ``.npy`` header for its shape) and returns a
  :class:`Prepared` that still holds the raw bytes. Raw bytes are what waits in
  bucket buffers, which keeps worker memory at compressed size.
* ``collate(items, handler)`` fully decodes one batch of prepared samples, which
  all share a group, and stacks them. A sample that still fails here (an image
  whose header parses but whose pixel data is cut) goes to ``handler`` and is
  left out of the batch.

When a resumed stream regenerates the batches an earlier run consumed, it runs
``prepare`` only, which for images means header parsing, not decoding.

Formats are looked up by the config's ``kind``; :func:`register_format` adds one.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from d2m_dist.data.buckets import Bucket, check_buckets, fit_to_bucket, nearest_bucket
from d2m_dist.data.errors import (
    BAD_ARRAY,
    EMPTY_IMAGE,
    MISSING_CAPTION,
    MISSING_FIELD,
    MISSING_IMAGE,
    NOT_AN_IMAGE,
    DataError,
    SkipSample,
)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
PRECOMPUTED_KEYS = ("latent.npy", "prompt_embeds.npy", "pooled.npy")


@dataclass
class Prepared:
    """A validated sample, not yet decoded."""

    key: str
    group: Hashable  # samples with equal groups can be stacked into one batch
    caption: str
    original_size: Tuple[int, int]  # (h, w) of the source image
    members: Dict[str, bytes] = field(default_factory=dict)


class SampleFormat:
    """Interface of a sample format (see the module docstring)."""

    def prepare(self, sample: Dict[str, Any]) -> Prepared:
        raise NotImplementedError

    def collate(self, items: List[Prepared], handler: Callable[[BaseException], bool]) -> Optional[Dict[str, Any]]:
        raise NotImplementedError


class RawImageFormat(SampleFormat):
    """``jpg|png|webp`` + ``txt|json`` samples, resized and centre-cropped into buckets.

    Batches: ``image`` (float32 [B, 3, H, W] in [-1, 1], or uint8 [B, H, W, 3]
    with ``image_format="uint8"``), ``caption`` (list of str), ``key`` (list),
    ``original_size`` (int64 [B, 2], h and w before resizing) and ``bucket``
    (index into the bucket list).
    """

    def __init__(self, buckets: Sequence[Sequence[int]], image_format: str = "float"):
        if image_format not in ("float", "uint8"):
            raise DataError(f"image_format {image_format!r} is not 'float' or 'uint8'")
        self.buckets: List[Bucket] = check_buckets(buckets)
        self.image_format = image_format

    def prepare(self, sample: Dict[str, Any]) -> Prepared:
        key, url = sample.get("__key__"), sample.get("__url__")
        ext = next((e for e in IMAGE_KEYS if e in sample), None)
        if ext is None:
            raise SkipSample(MISSING_IMAGE, f"members {sorted(k for k in sample if not k.startswith('__'))}", key, url)
        data = sample[ext]
        if not data:
            raise SkipSample(EMPTY_IMAGE, f"{ext} has 0 bytes", key, url)
        caption = caption_of(sample)
        if not caption:
            raise SkipSample(MISSING_CAPTION, "no txt member and no json caption", key, url)
        try:
            with Image.open(io.BytesIO(data)) as im:  # lazy: reads the header only
                width, height = im.size
                orientation = im.getexif().get(0x0112, 1)
        except _PIL_ERRORS as exn:
            if _png_declares_no_pixels(data):  # PIL refuses a 0x0 PNG instead of opening it
                raise SkipSample(EMPTY_IMAGE, f"{ext} header declares 0 pixels", key, url) from None
            raise SkipSample(NOT_AN_IMAGE, f"{ext}: {exn}", key, url) from None
        if width == 0 or height == 0:
            raise SkipSample(EMPTY_IMAGE, f"{ext} is {width}x{height}", key, url)
        if orientation in (5, 6, 7, 8):  # EXIF rotation by 90 degrees: bucket by the upright shape
            width, height = height, width
        return Prepared(key, nearest_bucket(height, width, self.buckets), caption, (height, width), {"image": data})

    def collate(self, items, handler):
        bucket = items[0].group
        arrays, kept = [], []
        for it in items:
            try:
                with Image.open(io.BytesIO(it.members["image"])) as im:
                    im = ImageOps.exif_transpose(im).convert("RGB")
                    arrays.append(np.asarray(fit_to_bucket(im, self.buckets[bucket])))
                kept.append(it)
            except _PIL_ERRORS as exn:
                handler(SkipSample(NOT_AN_IMAGE, f"decode failed: {exn}", it.key))
        if not kept:
            return None
        images = torch.from_numpy(np.stack(arrays))  # [B, H, W, 3] uint8
        if self.image_format == "float":
            images = images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()
        return {
            "image": images,
            "caption": [it.caption for it in kept],
            "key": [it.key for it in kept],
            "original_size": torch.tensor([it.original_size for it in kept], dtype=torch.int64),
            "bucket": bucket,
        }


class PrecomputedFormat(SampleFormat):
    """``latent.npy`` + ``prompt_embeds.npy`` + ``pooled.npy`` (+ ``txt``, ``json``) samples.

    Batches: ``latent``, ``prompt_embeds``, ``pooled`` (stacked tensors of the
    stored dtype), ``caption`` (list, "" when absent), ``key`` and
    ``original_size`` (int64 [B, 2]; from json ``original_size`` [h, w] or
    ``height``/``width``, else -1). Samples are grouped by their array shapes, so
    latents precomputed at several resolutions batch like buckets.
    """

    def prepare(self, sample):
        key, url = sample.get("__key__"), sample.get("__url__")
        missing = [k for k in PRECOMPUTED_KEYS if k not in sample]
        if missing:
            raise SkipSample(MISSING_FIELD, f"no {', '.join(missing)}", key, url)
        try:
            shapes = tuple(npy_shape(sample[k]) for k in PRECOMPUTED_KEYS)
        except ValueError as exn:
            raise SkipSample(BAD_ARRAY, str(exn), key, url) from None
        meta = _json_member(sample)
        size = meta.get("original_size") or [meta.get("height", -1), meta.get("width", -1)]
        members = {k: sample[k] for k in PRECOMPUTED_KEYS}
        return Prepared(key, shapes, caption_of(sample) or "", (int(size[0]), int(size[1])), members)

    def collate(self, items, handler):
        arrays: Dict[str, List[np.ndarray]] = {k: [] for k in PRECOMPUTED_KEYS}
        kept = []
        for it in items:
            try:
                loaded = {k: np.load(io.BytesIO(it.members[k]), allow_pickle=False) for k in PRECOMPUTED_KEYS}
            except (ValueError, OSError, EOFError) as exn:
                handler(SkipSample(BAD_ARRAY, str(exn), it.key))
                continue
            for k, a in loaded.items():
                arrays[k].append(a)
            kept.append(it)
        if not kept:
            return None
        batch: Dict[str, Any] = {k.removesuffix(".npy"): torch.from_numpy(np.stack(v)) for k, v in arrays.items()}
        batch.update(
            caption=[it.caption for it in kept],
            key=[it.key for it in kept],
            original_size=torch.tensor([it.original_size for it in kept], dtype=torch.int64),
        )
        return batch


FormatFactory = Callable[..., SampleFormat]
_FORMATS: Dict[str, FormatFactory] = {
    "raw": lambda cfg: RawImageFormat(cfg.buckets, cfg.image_format),
    "precomputed": lambda cfg: PrecomputedFormat(),
}


def register_format(kind: str, factory: FormatFactory) -> None:
    """Make ``kind`` usable in ``StreamConfig.kind``; ``factory(stream_config)`` builds the format."""
    _FORMATS[kind] = factory


def make_format(cfg) -> SampleFormat:
    if cfg.kind not in _FORMATS:
        raise DataError(f"data kind {cfg.kind!r} is not one of {sorted(_FORMATS)}")
    return _FORMATS[cfg.kind](cfg)


def caption_of(sample: Dict[str, Any]) -> Optional[str]:
    """The ``txt`` member, else the json ``caption``; None when blank or absent."""
    txt = sample.get("txt")
    if txt:
        text = txt.decode("utf-8", errors="replace") if isinstance(txt, bytes) else str(txt)
        if text.strip():
            return text.strip()
    caption = _json_member(sample).get("caption")
    return caption.strip() if isinstance(caption, str) and caption.strip() else None


def npy_shape(data: bytes) -> Tuple[int, ...]:
    """The shape in a ``.npy`` header, without reading the array (ValueError if malformed)."""
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, _ = reader(f)
    return tuple(shape)


def _png_declares_no_pixels(data: bytes) -> bool:
    """A PNG whose IHDR chunk says width or height 0."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n") or len(data) < 24 or data[12:16] != b"IHDR":
        return False
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return width == 0 or height == 0


def _json_member(sample: Dict[str, Any]) -> Dict[str, Any]:
    raw = sample.get("json")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _pil_errors():
    # DecompressionBombError is not an OSError; SyntaxError and ValueError come
    # from some plugins on malformed headers.
    return (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


_PIL_ERRORS = _pil_errors()
