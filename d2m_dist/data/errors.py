"""Data errors, skipped-sample accounting and the webdataset exception handler.

Two kinds of problems exist in the data layer:

* a problem that makes the whole job meaningless (no input, no shard matches a
  URL pattern, too few shards for the ranks x workers) is a :class:`DataError`,
  raised with a one-line message *before* any work starts;
* a problem with one sample or one shard inside a long run (truncated tar, bytes
  that are not an image, no caption, an empty image) must not stop training: the
  sample is skipped, counted per reason in a :class:`SkipCounter`, and warned
  about on the ``d2m_dist.data`` logger. :class:`SkipHandler` is the webdataset
  ``handler=`` hook that does this.
"""

from __future__ import annotations

import logging
import tarfile
from collections import Counter
from typing import Dict, Iterable, Mapping, Optional

import torch.distributed as dist

log = logging.getLogger("d2m_dist.data")

# Reasons a sample or shard is skipped. Stable strings: they are keys of the
# counts that end up in logs, manifests and resume state.
TRUNCATED_TAR = "truncated_tar"  # a shard's tar stream ended early (counted once per shard)
UNREADABLE_SHARD = "unreadable_shard"  # a shard could not be opened at all
DUPLICATE_FILE = "duplicate_file"  # two members of one sample share an extension
MISSING_IMAGE = "missing_image"  # no jpg/png/webp member
EMPTY_IMAGE = "empty_image"  # 0 bytes, or a decoded size of 0 x 0
NOT_AN_IMAGE = "not_an_image"  # bytes whose header PIL cannot parse
MISSING_CAPTION = "missing_caption"  # no txt member, no json "caption", or a blank one
MISSING_FIELD = "missing_field"  # precomputed sample without one of its arrays
BAD_ARRAY = "bad_array"  # a .npy member that does not parse
MISSING_FILE = "missing_file"  # shard writer: a listed image path does not exist
# input contracts (d2m_dist.data.validate, PrecomputedFormat)
IMAGE_TOO_LARGE = "image_too_large"  # the header declares more pixels than max_image_pixels (decompression bombs)
FILE_TOO_LARGE = "file_too_large"  # image bytes over max_image_bytes
UNSUPPORTED_FORMAT = "unsupported_format"  # an image, but not JPEG, PNG or WebP (GIF, BMP, TIFF, ...)
CORRUPT_IMAGE = "corrupt_image"  # the header parses, the pixel data does not (cut off, damaged)
CAPTION_TOO_LONG = "caption_too_long"  # caption over max_caption_bytes
CAPTION_NOT_UTF8 = "caption_not_utf8"  # caption bytes that are not UTF-8
CAPTION_NOT_TEXT = "caption_not_text"  # a json or table caption that is a number, list, ...
BAD_JSON = "bad_json"  # json member or sidecar that does not parse, is not an object, or has malformed fields
DOTTED_KEY = "dotted_key"  # member names with a dot in the key: webdataset splits names at the first dot
UNREADABLE_FILE = "unreadable_file"  # shard writer: an image file that exists but cannot be read
BAD_SHAPE = "bad_shape"  # a precomputed array of the wrong rank or size for the contract / the model
BAD_DTYPE = "bad_dtype"  # a precomputed array that is not little-endian float16/float32
NON_FINITE = "non_finite"  # a precomputed array holding NaN or inf


class DataError(ValueError):
    """A data problem reported to the user as one line, raised before work starts."""


class SkipSample(Exception):
    """Raised by decode stages for one bad sample; :class:`SkipHandler` counts it."""

    def __init__(self, reason: str, detail: str = "", key: Optional[str] = None, url: Optional[str] = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.key = key
        self.url = url


class SkipCounter:
    """Counts of skipped samples per reason; mergeable across workers and ranks."""

    def __init__(self, counts: Optional[Mapping[str, int]] = None):
        self.counts: Counter = Counter(dict(counts or {}))
        self._mark: Counter = Counter(self.counts)

    def add(self, reason: str, n: int = 1) -> int:
        """Count ``n`` more skips for ``reason``; returns the new count."""
        self.counts[reason] += n
        return self.counts[reason]

    def merge(self, other: "SkipCounter | Mapping[str, int]") -> "SkipCounter":
        """Add another counter's (or a plain dict's) counts into this one, in place."""
        counts = other.counts if isinstance(other, SkipCounter) else other
        for reason, n in counts.items():
            if n:
                self.counts[reason] += int(n)
        return self

    @classmethod
    def merged(cls, counters: Iterable["SkipCounter | Mapping[str, int]"]) -> "SkipCounter":
        out = cls()
        for c in counters:
            out.merge(c)
        return out

    def take_delta(self) -> Dict[str, int]:
        """The counts added since the previous call (used to ship counts from workers)."""
        delta = {r: n - self._mark.get(r, 0) for r, n in self.counts.items() if n != self._mark.get(r, 0)}
        self._mark = Counter(self.counts)
        return delta

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> Dict[str, int]:
        return {r: int(n) for r, n in sorted(self.counts.items()) if n}

    def __getitem__(self, reason: str) -> int:
        return self.counts.get(reason, 0)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SkipCounter):
            return self.as_dict() == other.as_dict()
        if isinstance(other, Mapping):
            return self.as_dict() == {r: n for r, n in other.items() if n}
        return NotImplemented

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"


def gather_skip_counts(counter: SkipCounter, group=None) -> SkipCounter:
    """The counts summed over all ranks (a no-op without an initialised process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SkipCounter(counter.counts)
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, counter.as_dict(), group=group)
    return SkipCounter.merged(gathered)


def classify(exn: BaseException) -> Optional[str]:
    """The skip reason for an exception raised inside the data pipeline, or None (a bug)."""
    if isinstance(exn, SkipSample):
        return exn.reason
    # tarfile raises ReadError ("unexpected end of data", "truncated header",
    # "empty header") for a cut-off stream; some readers end with a bare EOFError.
    if isinstance(exn, (tarfile.TarError, EOFError)):
        return TRUNCATED_TAR
    if isinstance(exn, OSError):  # gopen failed: missing file, permission, broken pipe
        return UNREADABLE_SHARD
    if isinstance(exn, ValueError) and "duplicate file name" in str(exn):  # group_by_keys
        return DUPLICATE_FILE
    return None


class SkipHandler:
    """A webdataset ``handler=`` hook: count the skip, warn (rate-limited), continue.

    Exceptions that are not data problems (see :func:`classify`) are re-raised:
    swallowing a ``TypeError`` from our own code would turn a bug into silently
    missing data.

    ``on_truncated()`` is called when a shard turns out to be cut off, so the
    stream can drop the half-read sample that webdataset would flush; it returns
    False when that shard was already reported.
    ``quiet`` silences warnings (not counts) while a resumed stream regenerates
    batches that an earlier run already consumed and reported.
    """

    def __init__(self, counter: SkipCounter, warn_limit: int = 10, where: str = "", on_truncated=None):
        self.counter = counter
        self.warn_limit = warn_limit
        self.where = where
        self.on_truncated = on_truncated
        self.quiet = False

    def __call__(self, exn: BaseException) -> bool:
        reason = classify(exn)
        if reason is None:
            raise exn
        # webdataset may report one cut-off shard twice (once from reading the
        # member, once from the next header): count the shard once.
        if reason == TRUNCATED_TAR and self.on_truncated is not None and not self.on_truncated():
            return True
        n = self.counter.add(reason)
        if not self.quiet and (n <= self.warn_limit or _is_power_of_ten(n)):
            more = " (further warnings for this reason are rate-limited)" if n == self.warn_limit else ""
            log.warning("skipped %s%s: %s [%s total]%s", reason, self.where, _describe(exn), n, more)
        return True


def _is_power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


def _describe(exn: BaseException) -> str:
    if isinstance(exn, SkipSample):
        where = " ".join(x for x in (exn.key and f"sample {exn.key}", exn.url and f"in {exn.url}") if x)
        return f"{where}: {exn.detail}" if exn.detail else where
    # webdataset appends the stream object and url to exn.args; the first arg is the message
    args = [a for a in getattr(exn, "args", ()) if isinstance(a, str)]
    return f"{type(exn).__name__}: " + " @ ".join(args) if args else repr(exn)
