"""Input contracts for raw samples: image bytes and captions, checked before anything expensive happens.

Every check here raises :class:`~d2m_dist.data.errors.SkipSample` with a named
reason, so that ``d2m shards make``, ``d2m precompute`` and the training stream
skip and count a bad sample the same way.

Images
------
An image is a JPEG, PNG or WebP *by content* (the member or file name may lie).
Its header is parsed first, without decoding pixels: the byte size, the
declared pixel count and the format are checked there, so that a 110 KB PNG
declaring 30000 x 30000 pixels is refused before 900 MB are allocated. Pillow's
own guard (``Image.MAX_IMAGE_PIXELS``, a module global, which warns above 89 MP
and raises above 179 MP) is switched off while *we* parse and decode, and put
back afterwards: our limit decides, and it has been checked before any decode.

Decoding takes the first frame (animated WebP and APNG), applies the EXIF
orientation, scales 16-bit grey to 8 bits and composites transparency over
white (a transparent pixel's colour is whatever the encoder left there, often
black): the result is always 8-bit RGB.

Captions
--------
A caption is UTF-8 text of at most ``max_caption_bytes``. Bytes that are not
UTF-8 are skipped (``caption_not_utf8``) rather than decoded with replacement
characters: a mis-encoded caption trains the text conditioning on garbage, and
the count tells the user their data has an encoding problem. NUL and other
control characters (tabs and newlines excepted) become spaces; a caption that
is then blank is missing.
"""

from __future__ import annotations

import io
import json
import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional

import numpy as np
from PIL import Image

from d2m_dist.data.errors import (
    BAD_JSON,
    CAPTION_NOT_TEXT,
    CAPTION_NOT_UTF8,
    CAPTION_TOO_LONG,
    CORRUPT_IMAGE,
    EMPTY_IMAGE,
    FILE_TOO_LARGE,
    IMAGE_TOO_LARGE,
    NOT_AN_IMAGE,
    UNSUPPORTED_FORMAT,
    DataError,
    SkipSample,
)

# FLUX trains at about 1 MP. 8192 x 8192 (67 MP) admits every camera photo up to
# medium format (a 61 MP full-frame sensor is 9504 x 6336 = 60 MP) and decodes to
# at most 201 MB of RGB in a worker; 12000 x 12000 (144 MP, 432 MB decoded and
# seconds of work to end up as 1 MP) is refused.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
# A JPEG at the pixel limit is 10-30 MB; a PNG photo that large can exceed this
# and is then counted. Raw bytes wait in shuffle and bucket buffers (up to
# shuffle_buffer samples per worker), so the bound is also a memory bound.
DEFAULT_MAX_IMAGE_BYTES = 64 << 20
# T5 reads at most 512 tokens (~2-3 KB of English); long VLM captions are 1-2 KB.
# 16 KiB is 8x what the encoder can use: anything longer is a web page, not a caption.
DEFAULT_MAX_CAPTION_BYTES = 16 << 10
# d2m shards make / d2m precompute stop when more than this share of their input is skipped.
DEFAULT_MAX_SKIPPED_FRACTION = 0.5

# Pillow's format name -> the member extension a shard stores it under
IMAGE_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # MPO: multi-picture JPEG (cameras)
# File extensions of images that are not accepted: counted as unsupported_format, not silently ignored
OTHER_IMAGE_EXTENSIONS = {".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".jp2", ".j2k",
                          ".ico", ".tga", ".ppm", ".pgm", ".pbm", ".pnm", ".svg", ".psd", ".dds", ".exr", ".hdr"}


@dataclass(frozen=True)
class RawLimits:
    """Per-sample limits on raw input (see the module docstring for the defaults' reasons)."""

    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES

    @classmethod
    def of(cls, cfg: Any) -> "RawLimits":
        """The limits of a config that has the three fields (StreamConfig, ShardWriterConfig, PrecomputeConfig)."""
        limits = cls(int(cfg.max_image_pixels), int(cfg.max_image_bytes), int(cfg.max_caption_bytes))
        bad = [f"{k}={v}" for k, v in vars(limits).items() if v < 1]
        if bad:
            raise DataError(f"input limits must be positive: {', '.join(bad)}")
        return limits


def check_skipped_fraction(value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise DataError(f"max_skipped_fraction must be in [0, 1], got {value}")


def too_many_skipped(skipped: int, kept: int, max_fraction: float) -> bool:
    """More than ``max_fraction`` of the ``skipped + kept`` samples were skipped."""
    return skipped > max_fraction * (skipped + kept)


# ----------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageHeader:
    width: int  # upright: after the EXIF orientation
    height: int
    format: str  # Pillow's name: JPEG, MPO, PNG or WEBP
    orientation: int  # EXIF orientation tag, 1 when absent or unreadable


_EXIF_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Re-entrant: a caller may hold it around a header read and a decode.
_PIL_GUARD_LOCK = threading.RLock()


@contextmanager
def _our_pixel_limit_decides() -> Iterator[None]:
    """Pillow's decompression-bomb guard off, restored on exit (see the module docstring).

    Image.MAX_IMAGE_PIXELS is process-global; the lock keeps two of our own
    threads from restoring each other's value. Nothing else in a data worker or
    in precompute opens images meanwhile.
    """
    with _PIL_GUARD_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def read_image_header(data: bytes, limits: RawLimits, key: Optional[str] = None,
                      url: Optional[str] = None) -> ImageHeader:
    """Size, format and orientation from the header alone, every limit checked (SkipSample otherwise)."""
    if not data:
        raise SkipSample(EMPTY_IMAGE, "image has 0 bytes", key, url)
    if len(data) > limits.max_image_bytes:
        raise SkipSample(FILE_TOO_LARGE, f"image has {len(data)} bytes, max_image_bytes is {limits.max_image_bytes}",
                         key, url)
    try:
        with _our_pixel_limit_decides(), Image.open(io.BytesIO(data)) as im:  # lazy: parses the header only
            width, height, fmt = im.width, im.height, str(im.format)
            orientation = _orientation(im)
    except MemoryError:
        raise
    except Exception as exn:  # a verdict on the bytes: see _pil_failure
        if _png_declares_no_pixels(data):  # Pillow refuses a 0x0 PNG instead of opening it
            raise SkipSample(EMPTY_IMAGE, "PNG header declares 0 pixels", key, url) from None
        raise SkipSample(NOT_AN_IMAGE, _pil_failure(exn), key, url) from None
    if width == 0 or height == 0:
        raise SkipSample(EMPTY_IMAGE, f"image is {width}x{height}", key, url)
    if width * height > limits.max_image_pixels:
        raise SkipSample(IMAGE_TOO_LARGE, f"{fmt} header declares {width}x{height} = {width * height} pixels, "
                         f"max_image_pixels is {limits.max_image_pixels}", key, url)
    if fmt not in IMAGE_FORMATS:
        raise SkipSample(UNSUPPORTED_FORMAT, f"content is {fmt}, not JPEG, PNG or WebP", key, url)
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: callers see the upright shape
        width, height = height, width
    return ImageHeader(width, height, fmt, orientation)


def decode_image(data: bytes, header: ImageHeader, key: Optional[str] = None) -> Image.Image:
    """The upright 8-bit RGB first frame of an image whose header passed :func:`read_image_header`."""
    with _our_pixel_limit_decides():
        try:
            im = Image.open(io.BytesIO(data))
            im.load()  # the first frame; raises on cut or damaged pixel data
        except MemoryError:
            raise
        except Exception as exn:  # a verdict on the bytes: see _pil_failure
            raise SkipSample(CORRUPT_IMAGE, _pil_failure(exn), key) from None
        with im:
            try:
                rgb = _to_rgb(im)
            except ValueError as exn:  # a mode Pillow cannot convert (none of JPEG, PNG or WebP's should be)
                raise SkipSample(CORRUPT_IMAGE, f"mode {im.mode}: {exn}", key) from None
    method = _TRANSPOSE.get(header.orientation)
    return rgb.transpose(method) if method is not None else rgb


def check_image_pixels(data: bytes, header: ImageHeader, key: Optional[str] = None) -> None:
    """Cheap pixel-data check without decoding: a PNG's chunks must be complete with valid CRCs.

    (``Image.verify`` walks PNG chunks without inflating them; Pillow verifies
    nothing for JPEG and WebP, whose damage the decoder finds later.)
    """
    if header.format != "PNG":
        return
    try:
        with _our_pixel_limit_decides(), Image.open(io.BytesIO(data)) as im:
            im.verify()
    except MemoryError:
        raise
    except Exception as exn:  # a verdict on the bytes: see _pil_failure
        raise SkipSample(CORRUPT_IMAGE, _pil_failure(exn), key) from None


def _orientation(im: Image.Image) -> int:
    # A PNG keeps its eXIf chunk anywhere, and Pillow's getexif() decodes the
    # whole image to find one after the pixel data: a header read must not.
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block leaves the pixels usable, unrotated
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grey: convert("L") would clip, not scale
        values = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)
        im = Image.fromarray((values >> 8).astype(np.uint8), "L")
    if "A" in im.mode or "a" in im.mode or "transparency" in im.info:  # alpha, or a palette/tRNS transparent colour
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _pil_failure(exn: BaseException) -> str:
    """Why Pillow gave up on untrusted bytes, as one line.

    Pillow documents OSError and ValueError, but its plugins raise SyntaxError,
    struct.error, IndexError, KeyError, TypeError and more on malformed files;
    only Pillow code runs inside the guarded blocks, so whatever it raises is a
    verdict on the bytes, not a bug of ours.
    """
    text = str(exn).splitlines()[0] if str(exn) else ""
    return f"{type(exn).__name__}: {text}" if text else type(exn).__name__


def _png_declares_no_pixels(data: bytes) -> bool:
    """A PNG whose IHDR chunk says width or height 0."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n") or len(data) < 24 or data[12:16] != b"IHDR":
        return False
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return width == 0 or height == 0


# ----------------------------------------------------------------------------- captions and json


def caption_from_bytes(raw: bytes, limits: RawLimits, key: Optional[str] = None,
                       url: Optional[str] = None) -> Optional[str]:
    """A ``txt`` member or sidecar as a caption; None when blank (the caller decides whether that is missing)."""
    if len(raw) > limits.max_caption_bytes:
        raise SkipSample(CAPTION_TOO_LONG, f"caption has {len(raw)} bytes, max_caption_bytes is "
                         f"{limits.max_caption_bytes}", key, url)
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark is not part of the caption
    except UnicodeDecodeError as exn:
        raise SkipSample(CAPTION_NOT_UTF8, f"caption is not UTF-8 ({exn.reason} at byte {exn.start})", key,
                         url) from None
    return clean_caption(text)


def caption_from_value(value: Any, limits: RawLimits, key: Optional[str] = None,
                       url: Optional[str] = None) -> Optional[str]:
    """A caption from a json field or a table cell; None when absent or blank, SkipSample when not text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):  # parquet/pandas nulls
        return None
    if not isinstance(value, str):
        raise SkipSample(CAPTION_NOT_TEXT, f"caption is {type(value).__name__} {str(value)[:40]!r}, not a string",
                         key, url)
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # json "\udcff": a lone surrogate, which no UTF-8 text holds
        raise SkipSample(CAPTION_NOT_UTF8, "caption holds a lone surrogate code point", key, url) from None
    if size > limits.max_caption_bytes:
        raise SkipSample(CAPTION_TOO_LONG, f"caption has {size} bytes, max_caption_bytes is "
                         f"{limits.max_caption_bytes}", key, url)
    return clean_caption(value)


_CONTROL = {c: " " for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F]}


def clean_caption(text: str) -> Optional[str]:
    """Control characters (not tab, newline, CR) as spaces, surrounding space stripped; None when blank."""
    text = text.translate(_CONTROL).strip()
    return text or None


def parse_json_object(raw: bytes | str, key: Optional[str] = None, url: Optional[str] = None) -> Dict[str, Any]:
    """A ``json`` member or sidecar, which must be a JSON object (SkipSample ``bad_json`` otherwise)."""
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exn:  # UnicodeDecodeError is a ValueError; deep nesting recurses
        raise SkipSample(BAD_JSON, f"json does not parse: {str(exn)[:80]}", key, url) from None
    if not isinstance(meta, dict):
        raise SkipSample(BAD_JSON, f"json is a {type(meta).__name__}, not an object", key, url)
    return meta
