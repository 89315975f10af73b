"""Corrupt shards and samples are skipped, counted per reason exactly, and logged."""

from __future__ import annotations

import logging
import struct
import tarfile
import zlib
from pathlib import Path

import pytest

from d2m_dist.data.errors import SkipCounter, SkipHandler, SkipSample
from d2m_dist.data.stream import ShardStream, StreamConfig

from .conftest import png_bytes, write_tar


def _png_0x0() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 0, 0, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _good(key: str, i: int):
    return {"__key__": key, "png": png_bytes(8, 8, i), "txt": f"caption {key}".encode()}


EXPECTED_SKIPS = {
    "not_an_image": 1,
    "missing_caption": 1,
    "empty_image": 2,
    "missing_image": 1,
    "truncated_tar": 1,
}


def _corrupt_shards(root: Path, cut: str) -> tuple[str, set]:
    """4 shards of 6 samples with one of each kind of damage; returns (url, keys that survive)."""
    s0 = [_good(f"a{i}", i) for i in range(6)]
    s0[1]["png"] = b"these bytes are not an image"
    del s0[3]["txt"]  # missing caption
    s1 = [_good(f"b{i}", 10 + i) for i in range(6)]
    s1[2]["png"] = b""  # 0 bytes
    s1[3]["png"] = _png_0x0()  # 0 x 0
    del s1[4]["png"]  # caption only
    s2 = [_good(f"c{i}", 20 + i) for i in range(6)]
    s3 = [_good(f"d{i}", 30 + i) for i in range(6)]
    for n, samples in enumerate((s0, s1, s2, s3)):
        write_tar(root / f"bad-{n:06d}.tar", samples)
    # cut shard 2 inside sample c3's second member: c0..c2 survive, c3 is half
    # read (png only, dropped with the cut), c4 and c5 are lost
    path = root / "bad-000002.tar"
    with tarfile.open(path) as t:
        member = t.getmember("c3.txt")
    # data: tarfile raises; header / boundary: tarfile ends quietly, the stream
    # notices the missing end-of-archive marker
    offset = {"data": member.offset_data + 2, "header": member.offset + 100, "boundary": member.offset}[cut]
    path.write_bytes(path.read_bytes()[:offset])
    survivors = {"a0", "a2", "a4", "a5", "b0", "b1", "b5", "c0", "c1", "c2"} | {f"d{i}" for i in range(6)}
    return str(root / "bad-{000000..000003}.tar"), survivors


@pytest.mark.parametrize("cut", ["data", "header", "boundary"])
def test_every_corruption_kind_is_skipped_and_counted(tmp_path, cut):
    url, survivors = _corrupt_shards(tmp_path, cut)
    cfg = StreamConfig(urls=url, rank=0, world_size=1, num_workers=2, batch_size=4, buckets=[[8, 8]], shuffle_buffer=4)
    stream = ShardStream(cfg)
    keys = [k for batch in stream for k in batch["key"]]
    assert sorted(keys) == sorted(survivors)
    assert stream.skips.as_dict() == EXPECTED_SKIPS


@pytest.mark.parametrize("variant", ["no_record_padding", "gzip"])
def test_intact_tars_are_not_called_truncated(tmp_path, variant):
    samples = [_good(f"k{i}", i) for i in range(5)]
    if variant == "gzip":
        url = str(write_tar(tmp_path / "z-000000.tar.gz", samples))
    else:  # as other tar writers leave it: members, then exactly the two zero blocks
        path = write_tar(tmp_path / "z-000000.tar", samples)
        with tarfile.open(path) as t:
            last = t.getmembers()[-1]
        end = last.offset_data + -(-last.size // 512) * 512 + 1024
        path.write_bytes(path.read_bytes()[:end])
        url = str(path)
    stream = ShardStream(StreamConfig(urls=url, rank=0, world_size=1, num_workers=0, buckets=[[8, 8]]))
    assert sorted(k for b in stream for k in b["key"]) == [f"k{i}" for i in range(5)]
    assert stream.skips.total == 0


def test_counts_merge_across_ranks_and_resume(tmp_path):
    url, survivors = _corrupt_shards(tmp_path, "data")
    per_rank, keys = [], []
    for rank in (0, 1):
        cfg = StreamConfig(
            urls=url, rank=rank, world_size=2, num_workers=2, batch_size=2, buckets=[[8, 8]], shuffle_buffer=0
        )
        stream = ShardStream(cfg)
        # stop half-way and resume: counts reported before the stop are not counted again
        it = iter(stream)
        keys += [k for _, b in zip(range(2), it) for k in b["key"]]
        resumed = ShardStream(cfg)
        resumed.load_state_dict(stream.state_dict())
        keys += [k for b in resumed for k in b["key"]]
        per_rank.append(resumed.skips)
    assert sorted(keys) == sorted(survivors)
    assert SkipCounter.merged(per_rank) == EXPECTED_SKIPS


def test_skips_are_warned_about(tmp_path, caplog):
    url, _ = _corrupt_shards(tmp_path, "data")
    cfg = StreamConfig(urls=url, rank=0, world_size=1, num_workers=0, batch_size=4, buckets=[[8, 8]])
    with caplog.at_level(logging.WARNING, logger="d2m_dist.data"):
        list(ShardStream(cfg))
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "d2m_dist.data")
    for reason in EXPECTED_SKIPS:
        assert f"skipped {reason}" in text
    assert "bad-000002.tar" in text and "sample a1" in text


def test_handler_reraises_what_is_not_a_data_problem():
    handler = SkipHandler(SkipCounter())
    assert handler(SkipSample("missing_caption")) is True
    with pytest.raises(TypeError):
        handler(TypeError("a bug, not bad data"))
    assert handler.counter.as_dict() == {"missing_caption": 1}


def test_skip_counter_merge_and_delta():
    a, b = SkipCounter({"x": 2}), SkipCounter()
    b.add("y")
    b.add("x", 3)
    assert b.take_delta() == {"y": 1, "x": 3} and b.take_delta() == {}
    assert SkipCounter.merged([a, b, {"z": 1}]).as_dict() == {"x": 5, "y": 1, "z": 1}
    assert a.merge(b).total == 6
