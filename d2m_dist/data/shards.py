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
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import webdataset as wds
from PIL import Image, UnidentifiedImageError

from d2m_dist.config import ConfigError
from d2m_dist.data.errors import (
    EMPTY_IMAGE,
    MISSING_CAPTION,
    MISSING_FILE,
    NOT_AN_IMAGE,
    DataError,
    SkipCounter,
    log,
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
    # Open each image header while writing and skip (counted) what PIL cannot read.
    validate_images: bool = True
    # Write at most this many samples (None: all); handy for smoke tests.
    limit: Optional[int] = None

    def validate(self) -> None:
        if self.max_samples < 1 or self.max_bytes < 1:
            raise ConfigError(f"max_samples ({self.max_samples}) and max_bytes ({self.max_bytes}) must be positive")


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


def scan_folder(folder: str | os.PathLike, skips: Optional[SkipCounter] = None) -> List[SourceRecord]:
    """Images in ``folder`` (recursively, sorted) with an ``x.txt`` or ``x.json`` caption sidecar.

    Images without a usable caption are skipped and counted as ``missing_caption``.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    skips = skips if skips is not None else SkipCounter()
    records = []
    for img in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        caption, meta = _sidecar_caption(img)
        rel = str(img.relative_to(root))
        if not caption:
            skips.add(MISSING_CAPTION)
            log.warning("skipped %s: %s has no .txt or .json caption", MISSING_CAPTION, img)
            continue
        ext = IMAGE_EXTENSIONS[img.suffix.lower()]
        records.append(SourceRecord(caption, path=img, ext=ext, meta={**meta, "source": rel}))
    if not records:
        raise DataError(f"no images with captions found in {root}")
    return records


def scan_table(table: str | os.PathLike, skips: Optional[SkipCounter] = None) -> List[SourceRecord]:
    """Rows of a CSV, JSONL or parquet file with an ``image``/``path`` and a ``caption``/``text`` column.

    Relative image paths are relative to the table's folder. Rows whose image is
    missing or whose caption is blank are skipped and counted.
    """
    path = Path(table)
    if not path.is_file():
        raise DataError(f"table {path} does not exist")
    skips = skips if skips is not None else SkipCounter()
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"table {path} has no rows")
    img_col = _pick_column(path, rows[0], ("image", "path"))
    cap_col = _pick_column(path, rows[0], ("caption", "text"))
    records = []
    for row in rows:
        caption = _clean_caption(row.get(cap_col))
        value = row.get(img_col)
        img = Path(str(value)) if value not in (None, "") else None
        if img is not None and not img.is_absolute():
            img = path.parent / img
        ext = IMAGE_EXTENSIONS.get(img.suffix.lower()) if img is not None else None
        if img is None or ext is None or not img.is_file():
            skips.add(MISSING_FILE)
            log.warning("skipped %s: %s row image %r is not an existing jpg/png/webp file", MISSING_FILE, path, value)
            continue
        if not caption:
            skips.add(MISSING_CAPTION)
            log.warning("skipped %s: %s row for %s has a blank caption", MISSING_CAPTION, path, value)
            continue
        extra = {k: v for k, v in row.items() if k not in (img_col, cap_col) and _jsonable(v)}
        records.append(SourceRecord(caption, path=img, ext=ext, meta={**extra, "source": str(value)}))
    if not records:
        raise DataError(f"table {path} lists no existing images with captions")
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
    """Write ``records`` as shards under ``cfg.out_dir``; returns (and saves) the manifest."""
    cfg.validate()
    skips = skips if skips is not None else SkipCounter()
    out = Path(cfg.out_dir)
    stale = sorted(out.glob(f"{cfg.prefix}-*.tar")) if out.is_dir() else []
    if stale and not cfg.overwrite:
        raise DataError(f"{out} already holds {cfg.prefix}-*.tar shards (set overwrite to replace them)")
    created_dir = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    writer = _RotatingWriter(out, cfg)
    try:
        written = 0
        for record in _limit(records, cfg.limit):
            sample = _encode(record, cfg.validate_images, skips)
            if sample is not None:
                sample["__key__"] = f"{written:09d}"
                writer.write(sample)
                written += 1
        writer.close()
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
    skips = SkipCounter()
    if source in SHARD_SOURCES:
        records = SHARD_SOURCES[source](cfg.limit)
    elif Path(source).suffix.lower() in (".csv", ".jsonl", ".parquet") and not Path(source).is_dir():
        records = scan_table(source, skips)
    else:
        records = scan_folder(source, skips)  # a DataError naming the path if it is no folder
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


def _encode(record: SourceRecord, validate: bool, skips: SkipCounter) -> Optional[Dict[str, Any]]:
    """The tar members of one record, or None (counted) when its image is unusable."""
    data = record.data if record.data is not None else record.path.read_bytes()  # type: ignore[union-attr]
    where = record.meta.get("source", "")
    if not data:
        skips.add(EMPTY_IMAGE)
        log.warning("skipped %s: %s has 0 bytes", EMPTY_IMAGE, where)
        return None
    meta = dict(record.meta)
    if validate:
        size = _image_size(data)
        if size is None:
            skips.add(NOT_AN_IMAGE)
            log.warning("skipped %s: %s is not a readable image", NOT_AN_IMAGE, where)
            return None
        if size[0] == 0 or size[1] == 0:
            skips.add(EMPTY_IMAGE)
            log.warning("skipped %s: %s is %dx%d", EMPTY_IMAGE, where, *size)
            return None
        meta["width"], meta["height"] = size
    meta["caption"] = record.caption
    return {
        record.ext: data,
        "txt": record.caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def _limit(records: Iterable[SourceRecord], limit: Optional[int]) -> Iterator[SourceRecord]:
    for i, r in enumerate(records):
        if limit is not None and i >= limit:
            return
        yield r


def _image_size(data: bytes):
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None


def _sidecar_caption(img: Path):
    txt, js = img.with_suffix(".txt"), img.with_suffix(".json")
    if txt.is_file():
        return _clean_caption(txt.read_text(encoding="utf-8", errors="replace")), {}
    if js.is_file():
        try:
            meta = json.loads(js.read_text(encoding="utf-8"))
        except ValueError:
            log.warning("%s is not valid JSON", js)
            return None, {}
        if isinstance(meta, dict):
            return _clean_caption(meta.get("caption")), {k: v for k, v in meta.items() if k != "caption"}
    return None, {}


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


def _clean_caption(value: Any) -> Optional[str]:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return None
    text = str(value).strip()
    return text or None


def _jsonable(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool)) or v is None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
