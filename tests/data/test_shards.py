"""Shard writer: sources, manifest, size limits, atomicity and input errors."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import braceexpand
import pytest

from d2m_dist.data.errors import DataError
from d2m_dist.data.shards import ShardWriterConfig, make_shards, read_manifest, write_shards
from d2m_dist.digits.data import digit_caption, load_digits_arrays, scan_digits

from .conftest import png_bytes


def _tar_samples(path: Path):
    """{key: {ext: bytes}} of one shard, read with plain tarfile."""
    out = {}
    with tarfile.open(path) as t:
        for m in t.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = t.extractfile(m).read()
    return out


def _check_manifest(m, out: Path, n_samples: int, max_samples: int):
    """The manifest on disk matches the returned one, the files and the limits."""
    assert m.total_samples == n_samples
    assert read_manifest(out / "train.manifest.json") == m
    names = list(braceexpand.braceexpand(m.pattern))
    assert names == [s.name for s in m.shards]
    assert len(m.shards) == math.ceil(n_samples / max_samples)
    for s in m.shards:
        f = out / s.name
        assert f.stat().st_size == s.bytes
        assert len(_tar_samples(f)) == s.samples <= max_samples
    assert m.total_bytes == sum(s.bytes for s in m.shards)
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["train.manifest.json"])  # no temp files


def test_folder_source_with_txt_and_json_sidecars(tmp_path):
    src = tmp_path / "imgs"
    (src / "sub").mkdir(parents=True)
    for i in range(5):
        (src / f"a.{i}.png").write_bytes(png_bytes(6, 9, i))  # dots in names: keys must not inherit them
        (src / f"a.{i}.txt").write_text(f"caption {i}\n")
    (src / "sub" / "b.png").write_bytes(png_bytes(4, 4, 7))
    (src / "sub" / "b.json").write_text(json.dumps({"caption": "from json", "score": 0.5}))
    (src / "nocap.png").write_bytes(png_bytes(4, 4, 8))  # skipped: no caption
    out = tmp_path / "out"
    m = make_shards(str(src), ShardWriterConfig(out_dir=str(out), max_samples=4))
    _check_manifest(m, out, 6, 4)
    assert m.skipped == {"missing_caption": 1}
    samples = {k: v for s in m.shards for k, v in _tar_samples(out / s.name).items()}
    by_source = {json.loads(v["json"])["source"]: v for v in samples.values()}
    assert by_source["a.3.png"]["txt"] == b"caption 3"
    assert by_source["a.3.png"]["png"] == (src / "a.3.png").read_bytes()
    meta = json.loads(by_source["sub/b.png"]["json"])
    assert (meta["caption"], meta["score"], meta["width"], meta["height"]) == ("from json", 0.5, 4, 4)


def test_csv_source_relative_paths_and_missing_rows(tmp_path):
    for i in range(7):
        (tmp_path / f"im{i}.png").write_bytes(png_bytes(5, 5, i))
    rows = ["image,caption,extra"] + [f"im{i}.png,a caption {i},{i}" for i in range(7)]
    rows += ["nothere.png,lost,0", "im0.png,,0"]  # missing file, blank caption
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    m = make_shards(str(tmp_path / "list.csv"), ShardWriterConfig(out_dir=str(out), max_samples=3))
    _check_manifest(m, out, 7, 3)
    assert m.skipped == {"missing_file": 1, "missing_caption": 1}
    first = _tar_samples(out / m.shards[0].name)["000000000"]
    assert first["txt"] == b"a caption 0" and json.loads(first["json"])["extra"] == "0"


def test_jsonl_source_with_path_and_text_columns(tmp_path):
    lines = []
    for i in range(5):
        p = tmp_path / f"x{i}.png"
        p.write_bytes(png_bytes(3, 4, i))
        lines.append(json.dumps({"path": str(p), "text": f"t{i}"}))  # absolute paths
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n\n")
    out = tmp_path / "out"
    m = make_shards(str(tmp_path / "list.jsonl"), ShardWriterConfig(out_dir=str(out), max_samples=2))
    _check_manifest(m, out, 5, 2)
    assert m.pattern == "train-{000000..000002}.tar"


def test_digits_source_manifest_and_labels(digit_shards):
    out = Path(digit_shards.out_dir)
    _check_manifest(digit_shards, out, 40, 5)
    assert digit_shards.pattern == "train-{000000..000007}.tar"
    raw = json.loads((out / "train.manifest.json").read_text())
    assert raw["total_samples"] == 40 and [s["samples"] for s in raw["shards"]] == [5] * 8
    assert raw["pattern"] == digit_shards.pattern
    _, labels = load_digits_arrays()
    s = _tar_samples(out / "train-000003.tar")["000000017"]
    meta = json.loads(s["json"])
    assert meta["label"] == labels[17] and s["txt"].decode() == digit_caption(labels[17])
    assert s["png"].startswith(b"\x89PNG")


def test_max_bytes_closes_shards_before_the_limit(tmp_path):
    records = scan_digits(limit=40)
    per_sample = len(records[0].data) + 150  # png + caption + json, roughly
    cfg = ShardWriterConfig(out_dir=str(tmp_path / "out"), max_samples=1000, max_bytes=3 * per_sample)
    m = write_shards(records, cfg)
    assert m.total_samples == 40 and len(m.shards) > 5
    assert all(s.payload_bytes <= cfg.max_bytes for s in m.shards)
    # and the limit is not wasted: adding the next shard's first sample would exceed it
    assert all(s.samples >= 2 for s in m.shards[:-1])


def test_one_sample_over_max_bytes_gets_its_own_shard(tmp_path):
    m = write_shards(scan_digits(limit=3), ShardWriterConfig(out_dir=str(tmp_path / "o"), max_bytes=10))
    assert [s.samples for s in m.shards] == [1, 1, 1]


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda d: d / "nope", "does not exist"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "no images with captions"),
        (lambda d: (d / "bad.csv").write_text("a,b\n1,2\n") and d / "bad.csv", "no 'image' or 'path' column"),
        (lambda d: (d / "bad.jsonl").write_text("{not json\n") and d / "bad.jsonl", "unreadable"),
        (lambda d: (d / "empty.csv").write_text("image,caption\n") and d / "empty.csv", "no rows"),
        (lambda d: (d / "gone.csv").write_text("image,caption\nx.png,c\n") and d / "gone.csv", "no existing images"),
    ],
)
def test_bad_input_raises_before_any_output(tmp_path, make_input, message):
    src = make_input(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message) as info:
        make_shards(str(src), ShardWriterConfig(out_dir=str(out)))
    assert "\n" not in str(info.value) and src.name in str(info.value)
    assert not out.exists()


def test_parquet_source_with_typed_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths, captions, scores = [], [], []
    for i in range(5):
        (tmp_path / f"p{i}.png").write_bytes(png_bytes(4, 6, i))
        paths.append(f"p{i}.png")  # relative to the table's folder
        captions.append(f"parquet caption {i}" if i != 3 else None)  # a null caption is a missing caption
        scores.append(0.25 * i)
    pq.write_table(pa.table({"image": paths, "caption": captions, "score": scores}), tmp_path / "t.parquet")
    out = tmp_path / "out"
    m = make_shards(str(tmp_path / "t.parquet"), ShardWriterConfig(out_dir=str(out), max_samples=2))
    _check_manifest(m, out, 4, 2)
    assert m.skipped == {"missing_caption": 1}
    first = _tar_samples(out / m.shards[0].name)["000000000"]
    assert first["txt"] == b"parquet caption 0" and first["png"] == (tmp_path / "p0.png").read_bytes()
    assert json.loads(first["json"])["score"] == 0.0  # typed columns stay typed in the sidecar


def test_parquet_without_pyarrow_is_one_line(tmp_path, monkeypatch):
    import sys

    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if not installed
    with pytest.raises(DataError, match="needs pyarrow"):
        make_shards(str(tmp_path / "t.parquet"), ShardWriterConfig(out_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_truncated_parquet_is_one_line(tmp_path):
    (tmp_path / "t.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(DataError, match="unreadable") as info:
        make_shards(str(tmp_path / "t.parquet"), ShardWriterConfig(out_dir=str(tmp_path / "out")))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_existing_shards_need_overwrite(tmp_path):
    cfg = ShardWriterConfig(out_dir=str(tmp_path / "o"), max_samples=2, limit=6)
    make_shards("digits", cfg)
    with pytest.raises(DataError, match="overwrite"):
        make_shards("digits", cfg)
    cfg.overwrite, cfg.limit = True, 2  # fewer shards: the stale ones are removed
    m = make_shards("digits", cfg)
    assert sorted(p.name for p in (tmp_path / "o").glob("*.tar")) == ["train-000000.tar"] == [m.pattern]


def test_failed_overwrite_keeps_the_old_set(tmp_path):
    cfg = ShardWriterConfig(out_dir=str(tmp_path / "o"), max_samples=2, limit=4)
    old = make_shards("digits", cfg)
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()}
    records = scan_digits(limit=6)
    records[4].data = None  # fails after two new shards were written
    cfg.overwrite, cfg.limit = True, None
    with pytest.raises(AttributeError):
        write_shards(records, cfg)
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()} == before
    assert read_manifest(tmp_path / "o" / "train.manifest.json") == old


def test_failure_midway_leaves_no_output(tmp_path):
    records = scan_digits(limit=6)
    records[4].data = None  # neither data nor path: reading it fails after two shards were written
    out = tmp_path / "out"
    with pytest.raises(AttributeError):
        write_shards(records, ShardWriterConfig(out_dir=str(out), max_samples=2))
    assert not out.exists()
