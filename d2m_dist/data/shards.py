"""Writing webdataset tar shards from image folders, tables and registered sources (the digits set).

Every source is first *scanned* into a list of :class:`SourceRecord` without
touching the output: a missing folder, an unreadable table or an empty input is a
:class:`DataError` and nothing is created. Only then are shards written, each to
a hidden temporary name; when all are complete they are renamed to their final
names and the manifest is written last, so a folder with a manifest is a
finished one. If writing fails part-way, everything this call created is removed.

Shard names are ``{prefix}-{index:06d}.tar``; the set is returned as a brace
pattern (``train-{000000..000012}.tar``) that the training stream expands.

Sample layout (one tar member per extension, webdataset convention)::

    000000042.png   image bytes, copied as they are (jpg, png or webp)
    000000042.txt   caption (UTF-8)
    000000042.json  {"caption", "width", "height", "source", ...sidecar/label fields}

Keys are zero-padded running numbers: a key must not contain a dot (webdataset
splits member names at the first dot), and source file names often do.

Input is checked by the contracts of :mod:`d2m_dist.data.validate` (image
bytes, header-declared pixels, format by content, PNG chunk integrity, caption
text and length); a sample that fails is skipped and counted under its reason
in the manifest's ``skipped``. The extension a sample is stored under comes from
the image's content, so a PNG named ``.jpg`` is stored as ``png``. Files with
other image extensions (``.gif``, ``.bmp``, ``.tiff``, ...) are counted as
``unsupported_format``, not silently left out. When more than
``max_skipped_fraction`` of the input is skipped, nothing is written and the
command fails with one line.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Sized
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import webdataset as wds

from d2m_dist.config import ConfigError
from d2m_dist.data.errors import (
    EMPTY_IMAGE,
    FILE_TOO_LARGE,
    MISSING_CAPTION,
    MISSING_FILE,
    UNREADABLE_FILE,
    UNSUPPORTED_FORMAT,
    DataError,
    SkipCounter,
    SkipHandler,
    SkipSample,
    log,
)
from d2m_dist.data.validate import (
    DEFAULT_MAX_CAPTION_BYTES,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_SKIPPED_FRACTION,
    IMAGE_FORMATS,
    OTHER_IMAGE_EXTENSIONS,
    RawLimits,
    caption_from_bytes,
    caption_from_value,
    check_image_pixels,
    check_skipped_fraction,
    parse_json_object,
    read_image_header,
    too_many_skipped,
)

IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
MANIFEST_SUFFIX = ".manifest.json"


@dataclass
class ShardWriterConfig:
    out_dir: str = "shards"
    prefix: str = "train"
    # A shard is closed before the sample that would exceed either limit. The
    # byte limit counts sample payload bytes (what the members hold); tar adds
    # 512 bytes of header per member, padding, and the end-of-archive record.
    max_samples: int = 10000
    max_bytes: int = 1 << 30
    # Existing {prefix}-*.tar files in out_dir: error (False) or replace (True).
    overwrite: bool = False
    # Open each image header while writing: its format, declared pixels and (PNG) chunk integrity are
    # checked, and what fails is skipped and counted. False: only bytes and captions are checked.
    validate_images: bool = True
    # Write at most this many samples (None: all); handy for smoke tests.
    limit: Optional[int] = None
    # Per-sample input limits (reasons for the defaults: d2m_dist.data.validate). The pixel limit needs
    # validate_images; the byte limit is checked before a file is read.
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES
    # Stop (writing nothing) once more than this share of the input is certain to be skipped.
    max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION

    def validate(self) -> None:
        if self.max_samples < 1 or self.max_bytes < 1:
            raise ConfigError(f"max_samples ({self.max_samples}) and max_bytes ({self.max_bytes}) must be positive")
        try:
            RawLimits.of(self)
            check_skipped_fraction(self.max_skipped_fraction)
        except DataError as exn:
            raise ConfigError(str(exn)) from None


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int  # file size on disk
    payload_bytes: int  # sum of member sizes, the quantity max_bytes bounds


@dataclass
class ShardManifest:
    out_dir: str
    pattern: str  # brace pattern of shard names, relative to out_dir
    shards: List[ShardInfo] = field(default_factory=list)
    total_samples: int = 0
    total_bytes: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The brace URL of all shards, for :class:`~d2m_dist.data.stream.StreamConfig`."""
        return os.path.join(self.out_dir, self.pattern)

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        d.pop("out_dir")  # the manifest must stay valid when the folder is moved
        return d


@dataclass
class SourceRecord:
    """One sample to write: image bytes come from ``path`` or ``data``."""

    caption: str
    path: Optional[Path] = None
    data: Optional[bytes] = None
    ext: str = "png"
    meta: Dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- sources


def scan_folder(folder: str | os.PathLike, skips: Optional[SkipCounter] = None,
                limits: Optional[RawLimits] = None) -> List[SourceRecord]:
    """Images in ``folder`` (recursively, sorted) with an ``x.txt`` or ``x.json`` caption sidecar.

    Extensions are matched in any case (``.PNG``). Images without a usable
    caption, and files with an unsupported image extension, are skipped and
    counted (``missing_caption``, ``caption_not_utf8``, ``bad_json``, ``unsupported_format``, ...).
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    skips = skips if skips is not None else SkipCounter()
    limits = limits or RawLimits()
    count = _skip_handler(skips)
    records = []
    wanted = IMAGE_EXTENSIONS.keys() | OTHER_IMAGE_EXTENSIONS  # the others to be counted, not passed over
    for img in sorted(p for p in root.rglob("*") if p.suffix.lower() in wanted and p.is_file()):
        rel = str(img.relative_to(root))
        try:
            if img.suffix.lower() in OTHER_IMAGE_EXTENSIONS:
                raise SkipSample(UNSUPPORTED_FORMAT, f"{img.suffix} files are not taken (JPEG, PNG or WebP)", rel)
            caption, meta = _sidecar_caption(img, limits, rel)
        except SkipSample as exn:
            count(exn)
            continue
        ext = IMAGE_EXTENSIONS[img.suffix.lower()]
        records.append(SourceRecord(caption, path=img, ext=ext, meta={**meta, "source": rel}))
    if not records:
        raise DataError(f"no images with captions found in {root}" + (f" (skipped: {skips.as_dict()})" if skips.total else ""))
    return records


def scan_table(table: str | os.PathLike, skips: Optional[SkipCounter] = None,
               limits: Optional[RawLimits] = None) -> List[SourceRecord]:
    """Rows of a CSV, JSONL or parquet file with an ``image``/``path`` and a ``caption``/``text`` column.

    Relative image paths are relative to the table's folder. Rows whose image is
    missing or not a jpg/png/webp file, or whose caption is blank or not text,
    are skipped and counted.
    """
    path = Path(table)
    if not path.is_file():
        raise DataError(f"table {path} does not exist")
    skips = skips if skips is not None else SkipCounter()
    limits = limits or RawLimits()
    count = _skip_handler(skips)
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"table {path} has no rows")
    img_col = _pick_column(path, rows[0], ("image", "path"))
    cap_col = _pick_column(path, rows[0], ("caption", "text"))
    records = []
    for n, row in enumerate(rows, 1):
        value = row.get(img_col)
        where = f"{path.name} row {n} ({value})"
        img = Path(str(value)) if value not in (None, "") else None
        if img is not None and not img.is_absolute():
            img = path.parent / img
        try:
            if img is None or not img.is_file():
                raise SkipSample(MISSING_FILE, "the image is not an existing file", where)
            if img.suffix.lower() not in IMAGE_EXTENSIONS:
                raise SkipSample(UNSUPPORTED_FORMAT, f"{img.suffix or 'no extension'}: not a jpg, png or webp file",
                                 where)
            caption = caption_from_value(row.get(cap_col), limits, where)
            if caption is None:
                raise SkipSample(MISSING_CAPTION, "the caption is blank", where)
        except SkipSample as exn:
            count(exn)
            continue
        extra = {k: v for k, v in row.items() if k not in (img_col, cap_col) and _jsonable(v)}
        records.append(SourceRecord(caption, path=img, ext=IMAGE_EXTENSIONS[img.suffix.lower()],
                                    meta={**extra, "source": str(value)}))
    if not records:
        raise DataError(f"table {path} lists no existing images with captions (skipped: {skips.as_dict()})")
    return records


# Named record sources besides folders and tables (``d2m shards make NAME``): a preset registers
# its own (the digits preset: ``digits``). A source takes the sample limit and returns its records.
SHARD_SOURCES: Dict[str, Callable[[Optional[int]], List[SourceRecord]]] = {}


def register_shard_source(name: str, records: Callable[[Optional[int]], List[SourceRecord]]) -> None:
    SHARD_SOURCES[name] = records


# ----------------------------------------------------------------------------- writing


def write_shards(
    records: Iterable[SourceRecord], cfg: ShardWriterConfig, skips: Optional[SkipCounter] = None
) -> ShardManifest:
    """Write ``records`` as shards under ``cfg.out_dir``; returns (and saves) the manifest.

    ``skips`` holds what scanning the source already skipped: it counts towards
    ``max_skipped_fraction`` and goes into the manifest.
    """
    cfg.validate()
    limits = RawLimits.of(cfg)
    skips = skips if skips is not None else SkipCounter()
    count = _skip_handler(skips)
    planned = None  # records that will be tried, when known: lets a hopeless run stop early
    if isinstance(records, Sized):
        planned = len(records) if cfg.limit is None else min(len(records), cfg.limit)
    out = Path(cfg.out_dir)
    stale = sorted(out.glob(f"{cfg.prefix}-*.tar")) if out.is_dir() else []
    if stale and not cfg.overwrite:
        raise DataError(f"{out} already holds {cfg.prefix}-*.tar shards (set overwrite to replace them)")
    created_dir = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    writer = _RotatingWriter(out, cfg)
    try:
        written = tried = 0
        for record in _limit(records, cfg.limit):
            tried += 1
            try:
                sample = _encode(record, cfg, limits)
            except SkipSample as exn:
                count(exn)
                # stop as soon as even writing every remaining record could not bring the share below the limit
                if planned is not None and too_many_skipped(skips.total, written + planned - tried,
                                                             cfg.max_skipped_fraction):
                    raise _too_many_skipped(skips, skips.total + planned - tried + written, cfg.max_skipped_fraction,
                                            early=True)
                continue
            sample["__key__"] = f"{written:09d}"
            writer.write(sample)
            written += 1
        writer.close()
        if too_many_skipped(skips.total, written, cfg.max_skipped_fraction):
            raise _too_many_skipped(skips, skips.total + written, cfg.max_skipped_fraction)
        if not writer.shards:
            raise DataError(f"no samples could be written to {out} (all skipped: {skips.as_dict()})")
        # Everything is written: replace the earlier set, if any. Its manifest goes
        # first, so that an interruption here leaves a folder without a manifest
        # (unfinished) rather than a manifest that lies.
        manifest_path = out / (cfg.prefix + MANIFEST_SUFFIX)
        manifest_path.unlink(missing_ok=True)
        writer.commit()
        names = {s.name for s in writer.shards}
        for old in stale:
            if old.name not in names:
                old.unlink()
        manifest = ShardManifest(
            out_dir=str(out),
            pattern=brace_pattern(cfg.prefix, len(writer.shards)),
            shards=writer.shards,
            total_samples=sum(s.samples for s in writer.shards),
            total_bytes=sum(s.bytes for s in writer.shards),
            skipped=skips.as_dict(),
        )
        _atomic_write_text(manifest_path, json.dumps(manifest.to_json(), indent=1))
    except BaseException:
        writer.abort()
        if created_dir:
            shutil.rmtree(out, ignore_errors=True)
        raise
    log.info("wrote %d samples in %d shards to %s", manifest.total_samples, len(manifest.shards), manifest.url)
    return manifest


def make_shards(source: str, cfg: ShardWriterConfig) -> ShardManifest:
    """Dispatch on ``source``: a registered source name (``digits``), an image folder, or a .csv/.jsonl/.parquet table."""
    cfg.validate()
    skips, limits = SkipCounter(), RawLimits.of(cfg)
    if source in SHARD_SOURCES:
        records = SHARD_SOURCES[source](cfg.limit)
    elif Path(source).suffix.lower() in (".csv", ".jsonl", ".parquet") and not Path(source).is_dir():
        records = scan_table(source, skips, limits)
    else:
        records = scan_folder(source, skips, limits)  # a DataError naming the path if it is no folder
    return write_shards(records, cfg, skips)


def read_manifest(path: str | os.PathLike) -> ShardManifest:
    """Load a manifest written by :func:`write_shards` (``out_dir`` is the manifest's folder)."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as exn:
        raise DataError(f"manifest {p} is unreadable: {exn}") from None
    shards = [ShardInfo(**s) for s in d.pop("shards")]
    return ShardManifest(out_dir=str(p.parent), shards=shards, **d)


def brace_pattern(prefix: str, n: int) -> str:
    """``train-{000000..000012}.tar`` for 13 shards (a plain name for one)."""
    if n == 1:
        return shard_name(prefix, 0)
    return f"{prefix}-{{{0:06d}..{n - 1:06d}}}.tar"


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


class _RotatingWriter:
    """wds.TarWriter into hidden temp files, renamed to their final names by :meth:`commit`.

    Not wds.ShardWriter: it decides to rotate *after* a shard already reached its
    size, so shards overshoot max_bytes by up to one sample; here the limit holds.
    Renaming only once every shard is complete means a failure part-way (or an
    interrupted overwrite) never mixes new shards into a folder's old set.
    """

    def __init__(self, out: Path, cfg: ShardWriterConfig):
        self.out, self.cfg = out, cfg
        self.shards: List[ShardInfo] = []
        self._done: List[Path] = []  # temp files of finished shards, parallel to self.shards
        self._committed = 0  # how many of them carry their final name
        self._tar: Optional[wds.TarWriter] = None
        self._tmp: Optional[Path] = None
        self._count = self._payload = 0

    def write(self, sample: Dict[str, Any]) -> None:
        size = sum(len(v) for k, v in sample.items() if not k.startswith("__"))
        full = self._count >= self.cfg.max_samples or self._payload + size > self.cfg.max_bytes
        if self._tar is not None and full:
            self._finish()
        if self._tar is None:
            name = shard_name(self.cfg.prefix, len(self.shards))
            self._tmp = self.out / f".{name}.tmp{os.getpid()}"
            # A fixed integer mtime: the same input gives byte-identical shards, and
            # tarfile adds no PAX header (it does for a float time), so each member
            # costs one 512-byte header. TarWriter ignores its own format= argument.
            self._tar = wds.TarWriter(str(self._tmp), encoder=False, mtime=0)
        self._tar.write(sample)
        self._count += 1
        self._payload += size

    def close(self) -> None:
        if self._tar is not None:
            self._finish()

    def commit(self) -> None:
        """Rename every finished shard to its final name (atomic per file on one filesystem)."""
        for tmp, info in zip(self._done[self._committed :], self.shards[self._committed :]):
            os.replace(tmp, self.out / info.name)
            self._committed += 1

    def abort(self) -> None:
        """Remove the shard in progress and every shard of this writer, renamed or not."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        for i, (tmp, info) in enumerate(zip(self._done, self.shards)):
            (self.out / info.name if i < self._committed else tmp).unlink(missing_ok=True)
        self.shards, self._done, self._tmp, self._committed = [], [], None, 0

    def _finish(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        self._tar = None
        name = shard_name(self.cfg.prefix, len(self.shards))
        self.shards.append(ShardInfo(name, self._count, self._tmp.stat().st_size, self._payload))
        self._done.append(self._tmp)
        self._tmp = None
        self._count = self._payload = 0


def _encode(record: SourceRecord, cfg: ShardWriterConfig, limits: RawLimits) -> Dict[str, Any]:
    """The tar members of one record; SkipSample when it breaks a contract (see the module docstring)."""
    where = str(record.meta.get("source", ""))
    caption = caption_from_value(record.caption, limits, where)  # registered sources are checked like files
    if caption is None:
        raise SkipSample(MISSING_CAPTION, "the caption is blank", where)
    data = record.data if record.data is not None else _read_image_file(record.path, limits, where)  # type: ignore[arg-type]
    if not data:
        raise SkipSample(EMPTY_IMAGE, "image has 0 bytes", where)
    if len(data) > limits.max_image_bytes:
        raise SkipSample(FILE_TOO_LARGE, f"image has {len(data)} bytes, max_image_bytes is {limits.max_image_bytes}",
                         where)
    meta, ext = dict(record.meta), record.ext
    if cfg.validate_images:
        header = read_image_header(data, limits, where)
        check_image_pixels(data, header, where)
        ext = IMAGE_FORMATS[header.format]  # by content: a PNG named .jpg is stored as png
        meta["width"], meta["height"] = header.width, header.height
    meta["caption"] = caption
    return {
        ext: data,
        "txt": caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def _read_image_file(path: Path, limits: RawLimits, where: str) -> bytes:
    """The file's bytes, its size checked before it is read."""
    try:
        size = path.stat().st_size
        if size > limits.max_image_bytes:
            raise SkipSample(FILE_TOO_LARGE, f"file has {size} bytes, max_image_bytes is {limits.max_image_bytes}",
                             where)
        return path.read_bytes()
    except FileNotFoundError:  # gone since the scan
        raise SkipSample(MISSING_FILE, f"{path} no longer exists", where) from None
    except OSError as exn:  # permissions, a folder named like an image, I/O errors
        raise SkipSample(UNREADABLE_FILE, f"{path}: {exn.strerror or exn}", where) from None


def _skip_handler(skips: SkipCounter) -> SkipHandler:
    return SkipHandler(skips, where=" (shards make)")


def _too_many_skipped(skips: SkipCounter, inputs: int, max_fraction: float, early: bool = False) -> DataError:
    return DataError(f"{skips.total} of {inputs} input samples are skipped{' already' if early else ''}, more than "
                     f"max_skipped_fraction={max_fraction} allows ({skips.as_dict()}); nothing was written")


def _limit(records: Iterable[SourceRecord], limit: Optional[int]) -> Iterator[SourceRecord]:
    for i, r in enumerate(records):
        if limit is not None and i >= limit:
            return
        yield r


def _sidecar_caption(img: Path, limits: RawLimits, where: str) -> Tuple[str, Dict[str, Any]]:
    """(caption, other json fields) from ``img``'s ``.txt`` sidecar, else its ``.json`` one; SkipSample when
    neither holds a usable caption. A ``.json`` sidecar must parse even when the ``.txt`` one has the caption."""
    txt, js = img.with_suffix(".txt"), img.with_suffix(".json")
    meta: Dict[str, Any] = {}
    try:
        if js.is_file():
            meta = parse_json_object(js.read_bytes(), where)
        caption = caption_from_bytes(txt.read_bytes(), limits, where) if txt.is_file() else None
    except OSError as exn:
        raise SkipSample(UNREADABLE_FILE, f"caption sidecar: {exn.strerror or exn}", where) from None
    if caption is None:
        caption = caption_from_value(meta.get("caption"), limits, where)
    if caption is None:
        raise SkipSample(MISSING_CAPTION, "no .txt or .json caption sidecar, or a blank one", where)
    return caption, {k: v for k, v in meta.items() if k != "caption"}


def _read_rows(path: Path) -> List[Dict[str, Any]]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        if suffix == ".jsonl":
            rows = []
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        row = json.loads(line)
                        if not isinstance(row, dict):
                            raise ValueError(f"line {n} is not a JSON object")
                        rows.append(row)
            return rows
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq  # lazy: only parquet tables need it, and its import is slow
            except ImportError:
                raise DataError(f"reading {path} needs pyarrow, which is not installed (pip install pyarrow)") from None
            return pq.read_table(path).to_pylist()
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exn:
        first_line = str(exn).splitlines()[0] if str(exn) else type(exn).__name__
        raise DataError(f"table {path} is unreadable: {first_line}") from None
    raise DataError(f"table {path}: unknown format (use .csv, .jsonl or .parquet)")


def _pick_column(path: Path, row: Dict[str, Any], names) -> str:
    for name in names:
        if name in row:
            return name
    raise DataError(f"table {path} has no {' or '.join(repr(n) for n in names)} column (columns: {sorted(row)})")


def _jsonable(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool)) or v is None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
