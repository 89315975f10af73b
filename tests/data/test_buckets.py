"""Resolution buckets: nearest aspect, resize + centre crop, one bucket per batch."""

from __future__ import annotations

import numpy as np
from PIL import Image

from d2m_dist.data.buckets import bucket_batches, fit_to_bucket, nearest_bucket
from d2m_dist.data.shards import ShardWriterConfig, SourceRecord, write_shards
from d2m_dist.data.stream import ShardStream, StreamConfig

from .conftest import png_bytes

BUCKETS = [[8, 8], [4, 16], [16, 4], [6, 10]]


def test_nearest_bucket_is_by_log_aspect():
    b = [tuple(x) for x in BUCKETS]
    assert nearest_bucket(100, 100, b) == 0
    assert nearest_bucket(10, 45, b) == 1 and nearest_bucket(45, 10, b) == 2
    assert nearest_bucket(60, 100, b) == 3
    # 1:2 is as far from 1:1 as from 1:4 in log space: the first bucket wins ties
    assert nearest_bucket(1, 2, [(1, 1), (1, 4)]) == 0


def test_fit_scales_to_cover_and_crops_the_centre():
    arr = np.zeros((8, 16), np.uint8)
    arr[:, 8:] = 255  # left half black, right half white
    out = np.asarray(fit_to_bucket(Image.fromarray(arr), (4, 4)))
    assert out.shape == (4, 4)
    assert (out[:, :2] < 64).all() and (out[:, 2:] > 192).all()  # the middle 8 columns, scaled by 1/2


def test_bucket_batches_groups_and_flushes():
    items = [("a", 1), ("b", 2), ("a", 3), ("a", 4), ("b", 5)]
    got = list(bucket_batches(items, 2, lambda x: x[0], drop_last=False))
    assert got == [[("a", 1), ("a", 3)], [("b", 2), ("b", 5)], [("a", 4)]]
    assert list(bucket_batches(items, 2, lambda x: x[0], drop_last=True)) == got[:2]


def test_every_stream_batch_comes_from_one_bucket(tmp_path):
    sizes = [(16, 16), (10, 10), (8, 30), (30, 8), (12, 20), (20, 12), (9, 11), (40, 10)]
    records = [
        SourceRecord(f"image {i}", data=png_bytes(*sizes[i % len(sizes)], value=i), ext="png") for i in range(40)
    ]
    m = write_shards(records, ShardWriterConfig(out_dir=str(tmp_path / "s"), max_samples=5))
    cfg = StreamConfig(urls=m.url, rank=0, world_size=1, num_workers=2, batch_size=3, buckets=BUCKETS, shuffle_buffer=6)
    keys, used = [], set()
    for batch in ShardStream(cfg):
        h, w = BUCKETS[batch["bucket"]]
        assert batch["image"].shape == (len(batch["key"]), 3, h, w)
        for oh, ow in batch["original_size"].tolist():
            assert nearest_bucket(oh, ow, [tuple(b) for b in BUCKETS]) == batch["bucket"]
        keys += batch["key"]
        used.add(batch["bucket"])
    assert sorted(keys) == [f"{i:09d}" for i in range(40)]
    assert used == {0, 1, 2, 3}

