"""Training stream: splitting, determinism, exact resume, URL checks."""

from __future__ import annotations

import copy
import json
import logging
from itertools import islice

import pytest
import torch

from d2m_dist.data.errors import DataError
from d2m_dist.data.stream import ShardStream, StreamConfig
from d2m_dist.digits.data import digit_caption, load_digits_arrays

BUCKETS = [[8, 8], [4, 16]]  # digits are 8x8: all land in the first

# 3 workers on this 2-core machine make torch warn; they are tiny here
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def _cfg(manifest, **kw) -> StreamConfig:
    base = dict(urls=manifest.url, rank=0, world_size=1, num_workers=2, batch_size=3, buckets=BUCKETS,
                shuffle_buffer=8, shuffle_initial=4, seed=7)
    return StreamConfig(**{**base, **kw})


def _same(a, b) -> bool:
    """Two lists of batches are equal, tensors included."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.keys() != y.keys():
            return False
        for k in x:
            eq = torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k]
            if not eq:
                return False
    return True


def _keys(batches):
    return [k for b in batches for k in b["key"]]


def test_epoch_each_sample_once_over_2_ranks_x_2_workers(digit_shards):
    _, labels = load_digits_arrays()
    seen = {}
    for rank in (0, 1):
        stream = ShardStream(_cfg(digit_shards, rank=rank, world_size=2))
        for batch in stream:
            assert batch["image"].shape[1:] == (3, 8, 8) and batch["image"].dtype == torch.float32
            assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
            for key, caption in zip(batch["key"], batch["caption"]):
                assert key not in seen, f"{key} delivered twice"
                seen[key] = rank
                assert caption == digit_caption(labels[int(key)])
        assert stream.epoch == 1 and stream.skips.total == 0
    assert sorted(seen) == [f"{i:09d}" for i in range(40)]
    assert set(seen.values()) == {0, 1}


def test_same_seed_same_stream_other_seed_other_order(digit_shards):
    a = list(ShardStream(_cfg(digit_shards)))
    b = list(ShardStream(_cfg(digit_shards)))
    c = list(ShardStream(_cfg(digit_shards, seed=8)))
    assert _same(a, b)
    assert _keys(a) != _keys(c) and sorted(_keys(a)) == sorted(_keys(c))
    # the next epoch is a different order of the same samples
    s = ShardStream(_cfg(digit_shards))
    list(s)
    e1 = list(s)
    assert _keys(e1) != _keys(a) and sorted(_keys(e1)) == sorted(_keys(a))


# 3 workers get 3, 3 and 2 of the 8 shards: worker 2 runs out first, which
# changes the DataLoader's round-robin near the end of the epoch
@pytest.mark.parametrize("workers, stop", [(2, 1), (2, 5), (2, 13), (3, 1), (3, 8), (3, 12), (3, 13)])
def test_exact_resume_epoch_mode(digit_shards, workers, stop):
    cfg = _cfg(digit_shards, num_workers=workers)
    full = ShardStream(cfg)
    epoch0, epoch1 = list(full), list(full)
    assert len(epoch0) == 14

    first = ShardStream(cfg)
    head = list(islice(iter(first), stop))
    state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint file

    resumed = ShardStream(cfg)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert _same(head + tail, epoch0)
    assert _same(list(resumed), epoch1)  # and the following epoch is the uninterrupted one


def test_resume_after_the_last_batch_goes_to_next_epoch(digit_shards):
    cfg = _cfg(digit_shards, num_workers=0)
    full = ShardStream(cfg)
    epoch0, epoch1 = list(full), list(full)
    s = ShardStream(cfg)
    list(islice(iter(s), len(epoch0)))  # every batch taken, but the loop never saw the end
    r = ShardStream(cfg)
    r.load_state_dict(s.state_dict())
    assert list(r) == [] and r.epoch == 1
    assert _same(list(r), epoch1)
    # forever() crosses epoch boundaries, including the empty resumed one
    r = ShardStream(cfg)
    r.load_state_dict(s.state_dict())
    assert _same(list(islice(r.forever(), len(epoch1) + 2)), epoch1 + list(islice(iter(full), 2)))


def test_exact_resume_resampled_mode(digit_shards):
    cfg = _cfg(digit_shards, mode="resampled")
    full = list(islice(iter(ShardStream(cfg)), 14))
    assert _same(full, list(islice(iter(ShardStream(cfg)), 14)))  # deterministic
    first = ShardStream(cfg)
    head = list(islice(iter(first), 6))
    resumed = ShardStream(cfg)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    tail = list(islice(iter(resumed), 8))
    assert _same(head + tail, full)
    # resampled draws shards with replacement: within the first 40 samples (one epoch's worth) some
    # sample already came twice, which an epoch (each sample once) never does
    first_epoch_worth = _keys(full)[:40]
    assert len(first_epoch_worth) == 40 and len(set(first_epoch_worth)) < 40
    assert set(_keys(full)) <= {f"{i:09d}" for i in range(40)}


def test_resampled_ranks_draw_different_streams(digit_shards):
    a = list(islice(iter(ShardStream(_cfg(digit_shards, mode="resampled", rank=0, world_size=2))), 4))
    b = list(islice(iter(ShardStream(_cfg(digit_shards, mode="resampled", rank=1, world_size=2))), 4))
    assert _keys(a) != _keys(b)


def test_other_world_size_restarts_next_epoch_fresh(digit_shards, caplog):
    saved = ShardStream(_cfg(digit_shards, rank=1, world_size=2))
    list(islice(iter(saved), 2))
    state = saved.state_dict()
    stream = ShardStream(_cfg(digit_shards))  # world size 1 now
    with caplog.at_level(logging.WARNING, logger="d2m_dist.data"):
        stream.load_state_dict(state)
    msgs = [r.getMessage() for r in caplog.records if r.name == "d2m_dist.data"]
    assert any("world_size=2 (now 1)" in m and "restarting at epoch 1" in m for m in msgs), msgs
    assert stream.epoch == 1
    reference = ShardStream(_cfg(digit_shards))
    reference.set_epoch(1)
    got = list(stream)
    assert _same(got, list(reference)) and sorted(_keys(got)) == [f"{i:09d}" for i in range(40)]


def test_url_pattern_matching_nothing(tmp_path, digit_shards):
    with pytest.raises(DataError, match="match no existing shard"):
        ShardStream(StreamConfig(urls=str(tmp_path / "nothing-{000000..000003}.tar")))
    with pytest.raises(DataError, match="1 of 9 shards"):
        ShardStream(_cfg(digit_shards, urls=digit_shards.url.replace("000007", "000008")))
    with pytest.raises(DataError, match="not set"):
        ShardStream(StreamConfig())


def test_fewer_shards_than_ranks_x_workers(digit_shards):
    with pytest.raises(DataError, match="8 shards .* fewer than world_size x num_workers = 9"):
        ShardStream(_cfg(digit_shards, world_size=3, num_workers=3))
    ShardStream(_cfg(digit_shards, world_size=3, num_workers=3, mode="resampled"))  # fine: no split


def test_uint8_images_and_single_process(digit_shards):
    cfg = _cfg(digit_shards, num_workers=0, image_format="uint8", batch_size=40, buckets=[[8, 8]])
    batches = list(ShardStream(cfg))
    assert len(batches) == 1
    b = batches[0]
    assert b["image"].dtype == torch.uint8 and b["image"].shape == (40, 8, 8, 3)
    images, _ = load_digits_arrays()
    for i, key in enumerate(b["key"]):
        assert torch.equal(b["image"][i, :, :, 0], torch.from_numpy(images[int(key)]))


def _take_until_leftovers_done(stream):
    """The batches ``stream.forever()`` reads from other ranks' epoch rests, and the first one after them."""
    out = []
    it = stream.forever()
    while True:
        batch = next(it)
        if not stream.leftovers:  # popped: this batch opened the stream's own next epoch
            return out, batch
        out.append(batch)


@pytest.mark.parametrize("new_world,new_workers", [(1, 1), (3, 1), (2, 2)])
def test_a_layout_change_within_an_epoch_reads_every_sample_once(digit_shards, new_world, new_workers):
    """2 ranks stop at different points of epoch 0; ``new_world`` ranks (or the same 2 with another worker
    count) take over: over the epoch every one of the 40 samples is read exactly once, and the next epoch
    (new layout) again reads each once."""
    old = [ShardStream(_cfg(digit_shards, rank=r, world_size=2, num_workers=1)) for r in range(2)]
    seen = []
    for stream, n in zip(old, (3, 1)):  # rank 0 read 3 batches, rank 1 one
        seen += _keys(list(islice(iter(stream), n)))
    states = json.loads(json.dumps([s.state_dict() for s in old]))  # as in a checkpoint
    new = [ShardStream(_cfg(digit_shards, rank=r, world_size=new_world, num_workers=new_workers))
           for r in range(new_world)]
    rest, continuations = [], []
    for stream in new:
        stream.redistribute(states)
        batches, first_of_next = _take_until_leftovers_done(stream)
        rest += _keys(batches)
        continuations.append((stream, first_of_next))
    everything = [f"{i:09d}" for i in range(40)]
    assert sorted(seen + rest) == everything  # epoch 0: each sample exactly once across the change
    assert len(seen) < 40 and rest  # it really changed layout mid-epoch
    # the next epoch runs in the new layout: each sample once again
    epoch1 = []
    for stream, first_of_next in continuations:
        assert stream.epoch == 1
        epoch1 += _keys([first_of_next] + list(iter(stream)))
    assert sorted(epoch1) == everything


def test_leftovers_resume_exactly_in_the_same_layout(digit_shards):
    old = [ShardStream(_cfg(digit_shards, rank=r, world_size=2, num_workers=1)) for r in range(2)]
    for stream in old:
        list(islice(iter(stream), 2))
    states = [s.state_dict() for s in old]
    a = ShardStream(_cfg(digit_shards, rank=0, world_size=1, num_workers=1))
    a.redistribute(states)
    it = a.forever()
    head = [next(it) for _ in range(3)]  # inside the first old rank's rest
    assert a.leftovers
    b = ShardStream(_cfg(digit_shards, rank=0, world_size=1, num_workers=1))
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    uninterrupted = [next(it) for _ in range(8)]
    resumed = list(islice(b.forever(), 8))
    assert _same(resumed, uninterrupted) and head


def test_resampled_mode_starts_afresh_after_a_layout_change(digit_shards, caplog):
    old = ShardStream(_cfg(digit_shards, mode="resampled", rank=0, world_size=2))
    list(islice(iter(old), 2))
    new = ShardStream(_cfg(digit_shards, mode="resampled", rank=0, world_size=1))
    assert new.redistribute([old.state_dict(), old.state_dict()]) == []
    assert "has no epochs to share out" in caplog.text and not new.leftovers


def test_leftovers_of_other_shards_are_refused_in_one_line(digit_shards, tmp_path):
    old = ShardStream(_cfg(digit_shards, rank=0, world_size=2, num_workers=1))
    list(islice(iter(old), 1))
    state = old.state_dict()
    state["layout"]["num_shards"] += 1  # the checkpoint's stream read another set of shards
    new = ShardStream(_cfg(digit_shards, rank=0, world_size=1, num_workers=1))
    with pytest.raises(DataError, match="the rest of its epoch cannot be shared out"):
        new.redistribute([state, state])
