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
import math
import tokenize
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from d2m_dist.data.buckets import Bucket, check_buckets, fit_to_bucket, nearest_bucket
from d2m_dist.data.errors import (
    BAD_ARRAY,
    BAD_DTYPE,
    BAD_JSON,
    BAD_SHAPE,
    DOTTED_KEY,
    MISSING_CAPTION,
    MISSING_FIELD,
    MISSING_IMAGE,
    NON_FINITE,
    DataError,
    SkipSample,
)
from d2m_dist.data.validate import (
    RawLimits,
    caption_from_bytes,
    caption_from_value,
    decode_image,
    parse_json_object,
    read_image_header,
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
    info: Any = None  # what prepare learnt that collate needs (the image header)
    url: Optional[str] = None


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

    Each sample is checked against ``limits`` and the contracts of
    :mod:`d2m_dist.data.validate` in ``prepare`` (header only); pixel data that
    does not decode is found in ``collate``.
    """

    def __init__(self, buckets: Sequence[Sequence[int]], image_format: str = "float",
                 limits: Optional[RawLimits] = None):
        if image_format not in ("float", "uint8"):
            raise DataError(f"image_format {image_format!r} is not 'float' or 'uint8'")
        self.buckets: List[Bucket] = check_buckets(buckets)
        self.image_format = image_format
        self.limits = limits or RawLimits()

    def prepare(self, sample: Dict[str, Any]) -> Prepared:
        key, url = sample.get("__key__"), sample.get("__url__")
        ext = next((e for e in IMAGE_KEYS if e in sample), None)
        if ext is None:
            members = sorted(k for k in sample if not k.startswith("__"))
            dotted = [m for m in members if "." in m and m.rsplit(".", 1)[1] in IMAGE_KEYS]
            if dotted:
                raise SkipSample(DOTTED_KEY, f"members {[f'{key}.{m}' for m in dotted]}: webdataset splits member "
                                 f"names at the first dot, so the key is {key!r}", key, url)
            raise SkipSample(MISSING_IMAGE, f"members {members}", key, url)
        header = read_image_header(sample[ext], self.limits, key, url)
        caption = raw_caption(sample, self.limits, key, url)
        return Prepared(key, nearest_bucket(header.height, header.width, self.buckets), caption,
                        (header.height, header.width), {"image": sample[ext]}, header, url)

    def collate(self, items, handler):
        bucket = items[0].group
        arrays, kept = [], []
        for it in items:
            try:
                image = decode_image(it.members["image"], it.info, it.key)
            except SkipSample as exn:
                exn.url = it.url
                handler(exn)
                continue
            arrays.append(np.asarray(fit_to_bucket(image, self.buckets[bucket])))
            kept.append(it)
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


@dataclass(frozen=True)
class PrecomputedContract:
    """What a precomputed sample must be to feed a model; None: any size.

    Always: ``latent`` [C, h, w] with even h and w (consumers pack 2x2 patches),
    ``prompt_embeds`` [T, D], ``pooled`` [D], no dimension 0, little-endian
    float16 or float32, data as long as the header says, finite values.
    """

    latent_channels: Optional[int] = None
    prompt_embeds_width: Optional[int] = None
    pooled_width: Optional[int] = None

    @classmethod
    def for_model(cls, model_config: Any) -> "PrecomputedContract":
        """From a diffusers FLUX config (a dict or an attribute-style config): ``in_channels`` is
        latent channels x 4 (2x2 patches packed), ``joint_attention_dim`` and ``pooled_projection_dim``."""
        def value(name: str) -> int:
            v = model_config[name] if isinstance(model_config, Mapping) else getattr(model_config, name)
            return int(v)

        return cls(value("in_channels") // 4, value("joint_attention_dim"), value("pooled_projection_dim"))

    def check(self, name: str, shape: Tuple[int, ...], key: Optional[str] = None, url: Optional[str] = None) -> None:
        """SkipSample ``bad_shape`` when array ``name`` (a PRECOMPUTED_KEYS member) does not fit."""
        layout, want = _ARRAY_LAYOUT[name], {"latent.npy": (0, self.latent_channels),
                                             "prompt_embeds.npy": (1, self.prompt_embeds_width),
                                             "pooled.npy": (0, self.pooled_width)}[name]
        problem = None
        if len(shape) != len(layout):
            problem = f"is {list(shape)}, not [{', '.join(layout)}]"
        elif 0 in shape:
            problem = f"is {list(shape)}, empty"
        elif want[1] is not None and shape[want[0]] != want[1]:
            problem = f"is {list(shape)}: {layout[want[0]]} = {shape[want[0]]}, the model takes {want[1]}"
        elif name == "latent.npy" and (shape[1] % 2 or shape[2] % 2):
            problem = f"is {list(shape)}: h and w must be even (2x2 patches are packed)"
        if problem:
            raise SkipSample(BAD_SHAPE, f"{name} {problem}", key, url)


_ARRAY_LAYOUT = {"latent.npy": ("C", "h", "w"), "prompt_embeds.npy": ("T", "D"), "pooled.npy": ("D",)}
ARRAY_DTYPES = (np.dtype("<f2"), np.dtype("<f4"))


class PrecomputedFormat(SampleFormat):
    """``latent.npy`` + ``prompt_embeds.npy`` + ``pooled.npy`` (+ ``txt``, ``json``) samples.

    Batches: ``latent``, ``prompt_embeds``, ``pooled`` (stacked tensors of the
    stored dtype), ``caption`` (list, "" when absent), ``key`` and
    ``original_size`` (int64 [B, 2]; from json ``original_size`` [h, w] or
    ``height``/``width``, else -1). Samples are grouped by their array shapes
    and dtypes, so latents precomputed at several resolutions batch like buckets.

    Every array is checked against ``contract`` (:class:`PrecomputedContract`):
    shapes and dtypes from the ``.npy`` headers in ``prepare``, finiteness after
    loading in ``collate``.
    """

    def __init__(self, contract: Optional[PrecomputedContract] = None):
        self.contract = contract or PrecomputedContract()

    def prepare(self, sample):
        key, url = sample.get("__key__"), sample.get("__url__")
        missing = [k for k in PRECOMPUTED_KEYS if k not in sample]
        if missing:
            raise SkipSample(MISSING_FIELD, f"no {', '.join(missing)}", key, url)
        shapes, dtypes = [], []
        for name in PRECOMPUTED_KEYS:
            shape, dtype = _checked_npy_header(name, sample[name], key, url)
            self.contract.check(name, shape, key, url)
            shapes.append(shape)
            dtypes.append(dtype.str)
        meta = parse_json_object(sample["json"], key, url) if "json" in sample else {}
        members = {k: sample[k] for k in PRECOMPUTED_KEYS}
        return Prepared(key, (tuple(shapes), tuple(dtypes)), _informational_caption(sample, meta),
                        _original_size(meta, key, url), members, None, url)

    def collate(self, items, handler):
        arrays: Dict[str, List[np.ndarray]] = {k: [] for k in PRECOMPUTED_KEYS}
        kept = []
        for it in items:
            try:
                loaded = {k: np.load(io.BytesIO(it.members[k]), allow_pickle=False) for k in PRECOMPUTED_KEYS}
            except (ValueError, OSError, EOFError) as exn:
                handler(SkipSample(BAD_ARRAY, str(exn), it.key, it.url))
                continue
            bad = [k for k, a in loaded.items() if not np.isfinite(a).all()]
            if bad:  # one NaN would make the whole step's loss non-finite
                handler(SkipSample(NON_FINITE, f"{', '.join(bad)} hold NaN or inf", it.key, it.url))
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
    "raw": lambda cfg: RawImageFormat(cfg.buckets, cfg.image_format, RawLimits.of(cfg)),
    "precomputed": lambda cfg: PrecomputedFormat(PrecomputedContract(cfg.latent_channels, cfg.prompt_embeds_width,
                                                                     cfg.pooled_width)),
}


def register_format(kind: str, factory: FormatFactory) -> None:
    """Make ``kind`` usable in ``StreamConfig.kind``; ``factory(stream_config)`` builds the format."""
    _FORMATS[kind] = factory


def make_format(cfg) -> SampleFormat:
    if cfg.kind not in _FORMATS:
        raise DataError(f"data kind {cfg.kind!r} is not one of {sorted(_FORMATS)}")
    return _FORMATS[cfg.kind](cfg)


def raw_caption(sample: Dict[str, Any], limits: RawLimits, key: Optional[str] = None,
                url: Optional[str] = None) -> str:
    """The ``txt`` member, else the json ``caption``; SkipSample when neither holds usable text.

    A ``json`` member must be a JSON object even when ``txt`` holds the caption:
    a writer that broke one member may have broken the others.
    """
    meta = parse_json_object(sample["json"], key, url) if "json" in sample else {}
    caption = None
    txt = sample.get("txt")
    if txt is not None:
        caption = (caption_from_bytes(txt, limits, key, url) if isinstance(txt, bytes)
                   else caption_from_value(txt, limits, key, url))
    if caption is None:  # no txt, or a blank one
        caption = caption_from_value(meta.get("caption"), limits, key, url)
    if caption is None:
        raise SkipSample(MISSING_CAPTION, "no txt member and no json caption, or blank ones", key, url)
    return caption


def _npy_header(data: bytes) -> Tuple[Tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) from a ``.npy`` header (ValueError if malformed)."""
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = reader(f)
    return tuple(int(n) for n in shape), dtype, f.tell()


def _checked_npy_header(name: str, data: bytes, key, url) -> Tuple[Tuple[int, ...], np.dtype]:
    try:
        shape, dtype, offset = _npy_header(data)
    # numpy parses the header as a Python literal (tokenize, then ast): a mangled one raises any of these
    except (ValueError, EOFError, TypeError, SyntaxError, tokenize.TokenError) as exn:
        raise SkipSample(BAD_ARRAY, f"{name}: {type(exn).__name__}: {exn}", key, url) from None
    if dtype not in ARRAY_DTYPES or dtype.byteorder == ">":
        raise SkipSample(BAD_DTYPE, f"{name} is {dtype.str}, not little-endian float16 or float32", key, url)
    # checked before np.load, which allocates what the header declares before it reads
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - offset != expected:
        raise SkipSample(BAD_ARRAY, f"{name} holds {len(data) - offset} data bytes, its header declares {expected}",
                         key, url)
    return shape, dtype


def _informational_caption(sample: Dict[str, Any], meta: Dict[str, Any]) -> str:
    """A precomputed sample's caption: metadata only (its embeddings are what trains), so read leniently."""
    txt = sample.get("txt")
    if isinstance(txt, bytes) and txt.strip():
        return txt.decode("utf-8", errors="replace").strip()
    caption = meta.get("caption")
    return caption.strip() if isinstance(caption, str) else ""


def _original_size(meta: Dict[str, Any], key, url) -> Tuple[int, int]:
    size = meta.get("original_size") or [meta.get("height", -1), meta.get("width", -1)]
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError, OverflowError):  # OverflowError: json Infinity
        raise SkipSample(BAD_JSON, f"json original_size/height/width {size!r} are not two integers", key,
                         url) from None
    return h, w
