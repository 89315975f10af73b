"""The training stream: webdataset shards -> bucketed batches, deterministic and resumable.

Order
-----
Everything random is seeded from integers, never from time or process ids:

* epoch mode: the shard list is shuffled with (seed, epoch), the same on every
  rank; rank r takes every world_size-th shard from r, and logical worker w of
  that rank every num_workers-th of those. Each shard is read by exactly one
  (rank, worker), so an epoch delivers every sample exactly once (with
  ``drop_last=False``). Samples are then shuffled in a buffer seeded with
  (seed, epoch, rank, worker).
* resampled mode: ``wds.ResampledShards(deterministic=True)`` draws shards with
  replacement forever, seeded with (seed, epoch, rank) and the logical worker.

Batches are formed inside each worker, per bucket (:mod:`d2m_dist.data.buckets`),
and numbered per worker. The DataLoader hands them out round-robin over its
workers, starting at worker 0 and skipping exhausted ones; that order depends
only on the per-worker sequences, so it is deterministic too.

Resume
------
webdataset keeps no position, so the stream keeps its own: per logical worker,
the index after the last delivered batch, which workers have finished, and which
worker is due next. :meth:`ShardStream.state_dict` returns it. A restarted
stream (same world size, workers and order-relevant settings) regenerates each
worker's sequence from the same seeds and drops the batches already delivered;
those are only *prepared* (headers parsed), not decoded. DataLoader worker i
plays logical worker (i + next) mod num_workers, so the round-robin continues
with the worker that was due. The next batches are exactly those an
uninterrupted run would have produced.

After a change of world size (an elastic resume), :meth:`ShardStream.redistribute`
takes every old rank's state: the unread rest of each old rank's epoch (and any
whole epoch an old rank had not reached yet) is dealt round-robin to the new
ranks as *leftovers*, which a new rank reads to their ends (regenerated exactly
as the old rank would have read them) before its own stream starts at the next
epoch in the new layout. So within every epoch each sample is read exactly once,
whatever the layout changes. Leftovers are part of the state, so a resume in the
same layout continues inside them. Resampled mode has no epochs: after a layout
change it starts afresh, with a warning. Loading one state into a stream of
another layout (:meth:`ShardStream.load_state_dict`) cannot be exact either and
starts epoch + 1 in a fresh order, with a warning.

Node and worker splitting use the rank/world_size from the config (falling back
to the RANK/WORLD_SIZE environment or torch.distributed via webdataset), not
``wds.split_by_node``/``wds.split_by_worker``: those read rank and worker from
the environment, and the resume remapping of workers needs the logical id.

Skips (bad samples, cut-off shards) are counted in each worker and travel to the
main process with the next batch, or with a last marker item that this class
consumes; :attr:`ShardStream.skips` holds the totals and
:attr:`ShardStream.delivered` the samples handed out, both over every epoch and
leftover read by this stream and the runs it resumes. They are part of the
state; after a layout change the old ranks' totals live on in the new rank 0's,
so the sum over ranks stays the run's total.

The input limits and the precomputed contract decide which samples are skipped,
so changing them between a checkpoint and its resume changes the regenerated
batches: the resume is still deterministic, but no longer equal to a run that
never stopped. They are not part of the layout check.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import os
import random
import re
import signal
import tarfile
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Dict, Iterator, List, Optional

import braceexpand
import numpy as np
import torch
import webdataset as wds
from omegaconf import MISSING
from webdataset import tariterators

from d2m_dist.data.buckets import bucket_batches
from d2m_dist.data.decode import PrecomputedContract, make_format
from d2m_dist.data.errors import DataError, SkipCounter, SkipHandler, log
from d2m_dist.data.validate import DEFAULT_MAX_CAPTION_BYTES, DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS


@dataclass
class StreamConfig:
    # Brace pattern ("data/train-{000000..000099}.tar"), several joined by "::",
    # local paths or anything webdataset opens (pipe:, http:, s3: through pipe:).
    urls: str = MISSING
    kind: str = "raw"  # raw | precomputed (see d2m_dist.data.decode)
    mode: str = "epoch"  # epoch: each sample once per epoch | resampled: infinite, with replacement
    batch_size: int = 16
    seed: int = 0
    # None: from RANK/WORLD_SIZE or torch.distributed (webdataset's lookup).
    rank: Optional[int] = None
    world_size: Optional[int] = None
    num_workers: int = 2  # DataLoader workers per rank (0: read in the main process)
    shuffle_buffer: int = 1000  # samples; <= 1 disables sample shuffling
    shuffle_initial: int = 100  # samples buffered before the first one leaves
    # raw kind: output sizes [h, w]; each image goes to the nearest aspect ratio.
    buckets: List[List[int]] = field(default_factory=lambda: [[512, 512]])
    image_format: str = "float"  # float: [B,3,H,W] in [-1,1] | uint8: [B,H,W,3]
    # raw kind: a sample over a limit is skipped and counted (image_too_large, file_too_large,
    # caption_too_long); the defaults and their reasons are in d2m_dist.data.validate
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES
    # precomputed kind: the sizes the model takes (None: any); a sample that differs is skipped and
    # counted as bad_shape. ShardBatches sets them from the model config.
    latent_channels: Optional[int] = None
    prompt_embeds_width: Optional[int] = None
    pooled_width: Optional[int] = None
    # epoch mode: drop each bucket's partial last batch (False: every sample is seen).
    drop_last: bool = False
    pin_memory: bool = False
    prefetch_factor: Optional[int] = None
    warn_limit: int = 10  # per reason and worker, then only at powers of ten


# Keys of the items that travel from workers to the main process; never user-visible.
_WORKER, _INDEX, _SKIPS, _DONE = "__worker__", "__index__", "__skips__", "__done__"
# Tags keep the seeds of the different random choices apart.
_SHARD_ORDER, _SAMPLE_ORDER, _RESAMPLE = 1, 2, 3
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers, stable across processes and Python versions.

    (Python's ``hash`` of a string changes per process; SeedSequence does not.)
    """
    state = np.random.SeedSequence([int(p) % (1 << 63) for p in parts]).generate_state(1)
    return int(state[0]) & 0x7FFFFFFF


def expand_shard_urls(urls: str | List[str]) -> List[str]:
    """Brace-expand ``urls`` and check that local shards exist (DataError otherwise).

    Every listed local shard must exist: a silently missing shard would change
    what an epoch contains. URLs with a scheme (pipe:, http:, ...) are not checked.
    """
    if isinstance(urls, str):
        if urls in ("", MISSING):
            raise DataError("data urls are not set")
        parts = [u for part in urls.split("::") for u in braceexpand.braceexpand(part)]
    else:
        parts = [str(u) for u in urls]
    if not parts:
        raise DataError(f"data urls {urls!r} expand to no shard")
    local = [u for u in parts if u.startswith("file:") or not _SCHEME.match(u)]
    missing = [u for u in local if not os.path.isfile(u.removeprefix("file:"))]
    if missing and len(missing) == len(parts):
        raise DataError(f"data urls {urls!r} match no existing shard file (first: {missing[0]})")
    if missing:
        raise DataError(f"{len(missing)} of {len(parts)} shards of {urls!r} do not exist (first: {missing[0]})")
    return parts


@dataclass
class _Position:
    """Where the stream is inside the current epoch (see the module docstring)."""

    epoch: int
    consumed: List[int]  # per logical worker: index after its last delivered batch
    done: List[bool]  # per logical worker: its end marker has been received
    next_worker: int = 0  # logical worker due next in the DataLoader round-robin
    batches: int = 0  # delivered this epoch (informational)
    samples: int = 0

    @classmethod
    def start(cls, epoch: int, num_workers: int) -> "_Position":
        return cls(epoch, [0] * num_workers, [False] * num_workers)


class ShardStream:
    """Iterable of batches (dicts) from webdataset shards, for one rank.

    ``iter(stream)`` runs one epoch in epoch mode and forever in resampled mode,
    through a torch DataLoader with ``num_workers`` workers; :meth:`forever`
    chains epochs. Keep one iterator alive at a time, and call
    :meth:`load_state_dict` before starting one: the workers take a copy of the
    position when they start. :meth:`state_dict` counts a batch as consumed once
    it has been handed out.
    """

    def __init__(self, cfg: StreamConfig):
        self.cfg = cfg
        if cfg.mode not in ("epoch", "resampled"):
            raise DataError(f"stream mode {cfg.mode!r} is not 'epoch' or 'resampled'")
        if cfg.batch_size < 1 or cfg.num_workers < 0:
            raise DataError(f"batch_size ({cfg.batch_size}) must be >= 1 and num_workers ({cfg.num_workers}) >= 0")
        make_format(cfg)  # validates kind, buckets and image_format now, not in a worker
        env_rank, env_world, _, _ = wds.utils.pytorch_worker_info()
        self.rank = env_rank if cfg.rank is None else int(cfg.rank)
        self.world_size = env_world if cfg.world_size is None else int(cfg.world_size)
        if not 0 <= self.rank < self.world_size:
            raise DataError(f"rank {self.rank} is outside world size {self.world_size}")
        self.num_workers = max(1, cfg.num_workers)  # logical workers: the main process counts as one
        self.urls = expand_shard_urls(cfg.urls)
        slots = self.world_size * self.num_workers
        if cfg.mode == "epoch" and len(self.urls) < slots:
            # webdataset would leave some (rank, worker) without a shard, and a
            # rank whose loader yields nothing hangs the others in collectives.
            raise DataError(
                f"{len(self.urls)} shards in {cfg.urls!r} are fewer than world_size x num_workers = {slots}; "
                "write more, smaller shards or use mode=resampled"
            )
        if cfg.mode == "epoch" and len(self.urls) % slots and self.rank == 0:
            log.warning(
                "%d shards do not divide evenly over %d ranks x %d workers: ranks will see different numbers "
                "of batches per epoch", len(self.urls), self.world_size, self.num_workers,
            )
        self.skips = SkipCounter()
        self.delivered = 0  # samples handed out, all epochs and leftovers (see the module docstring)
        self._pos = _Position.start(0, self.num_workers)
        # old ranks' unread epoch rests this rank reads first (after an elastic resume): their states
        self.leftovers: List[Dict[str, Any]] = []

    # ------------------------------------------------------------------ iteration

    @property
    def epoch(self) -> int:
        return self._pos.epoch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning on the next iteration."""
        self._pos = _Position.start(int(epoch), self.num_workers)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        start = copy.deepcopy(self._pos)  # the workers' copy: where to start
        dataset = _WorkerStream(self.cfg, self.urls, self.rank, self.world_size, self.num_workers, start)
        for item in _data_loader(dataset, self.cfg):
            pos = self._pos
            worker = item.pop(_WORKER)
            self.skips.merge(item.pop(_SKIPS))
            pos.next_worker = (worker + 1) % self.num_workers
            if item.pop(_DONE, False):
                pos.done[worker] = True
                continue
            pos.consumed[worker] = item.pop(_INDEX) + 1
            pos.batches += 1
            pos.samples += len(item["key"])
            self.delivered += len(item["key"])
            yield item
        if self.cfg.mode == "epoch":
            self._pos = _Position.start(self._pos.epoch + 1, self.num_workers)

    def forever(self) -> Iterator[Dict[str, Any]]:
        """Batches without end: the leftovers first, then, in epoch mode, one epoch after the other."""
        while self.leftovers:
            rest = self._leftover_stream(self.leftovers[0])
            for batch in rest:
                # counted here, not again on resume
                self.leftovers[0] = {**rest.state_dict(), "skips": {}, "delivered": 0}
                self.skips.merge(rest.skips.as_dict())
                rest.skips = SkipCounter()
                self.delivered += len(batch["key"])
                yield batch
            self.leftovers.pop(0)
        empty = 0
        while True:
            n = 0
            for n, batch in enumerate(self, 1):
                yield batch
            # one empty epoch is normal (resumed right after an epoch's last batch); two are not
            empty = empty + 1 if n == 0 else 0
            if empty == 2:
                raise DataError(f"data urls {self.cfg.urls!r} yield no batch at all for rank {self.rank}")

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> Dict[str, Any]:
        """The position after the last delivered batch, plus what it is only valid for."""
        return {"version": 1, "position": asdict(self._pos), "skips": self.skips.as_dict(),
                "delivered": self.delivered, "layout": self._layout(), "leftovers": copy.deepcopy(self.leftovers)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue where ``state`` stopped, or at epoch + 1 in a fresh order if the layout changed."""
        pos = _Position(**state["position"])
        self.skips = SkipCounter(state.get("skips", {}))
        self.delivered = int(state.get("delivered", 0))  # states saved before it was kept: 0
        self.leftovers = copy.deepcopy(state.get("leftovers", []))
        saved, now = state.get("layout", {}), self._layout()
        changed = [f"{k}={saved.get(k)!r} (now {v!r})" for k, v in now.items() if saved.get(k) != v]
        if changed:
            log.warning(
                "data stream state was saved with %s: exact resume is impossible, restarting at epoch %d "
                "in a fresh deterministic order", ", ".join(changed), pos.epoch + 1,
            )
            self._pos = _Position.start(pos.epoch + 1, self.num_workers)
        else:
            self._pos = pos

    def redistribute(self, states: List[Dict[str, Any]]) -> List[int]:
        """Continue from the states of all ranks of another layout (an elastic resume).

        Returns the old ranks whose epoch rests this rank reads first (see the module docstring).
        """
        if self.rank == 0:  # the old ranks' totals live on in rank 0's counters; their rests start at none
            for st in states:
                self.skips.merge(st.get("skips", {}))
                self.delivered += int(st.get("delivered", 0))
        if self.cfg.mode != "epoch":
            log.warning("data stream in %s mode has no epochs to share out: after the change from %d to %d ranks "
                        "it starts afresh (every sample may come again, none is owed)", self.cfg.mode, len(states),
                        self.world_size)
            self._pos = _Position.start(max(s["position"]["epoch"] for s in states) + 1, self.num_workers)
            return []
        last_epoch = max(s["position"]["epoch"] for s in states)
        for st in states:
            self._check_leftover_layout(st["layout"])
        rests: List[Dict[str, Any]] = []
        owners: List[int] = []
        for old_rank, st in enumerate(states):
            pending = list(st.get("leftovers", [])) + [{k: v for k, v in st.items() if k != "leftovers"}]
            pending = [{**rest, "skips": {}, "delivered": 0} for rest in pending]
            workers = st["layout"]["num_workers"]
            # epochs this old rank had not reached yet are owed whole
            pending += [{**pending[-1], "position": asdict(_Position.start(e, workers))}
                        for e in range(st["position"]["epoch"] + 1, last_epoch + 1)]
            rests += pending
            owners += [old_rank] * len(pending)
        mine = list(range(self.rank, len(rests), self.world_size))
        self.leftovers = [rests[i] for i in mine]
        self._pos = _Position.start(last_epoch + 1, self.num_workers)
        return sorted({owners[i] for i in mine})

    def _check_leftover_layout(self, saved: Dict[str, Any]) -> None:
        """An old rank's rest can be regenerated only from the same shards, read as the same kind."""
        if saved["num_shards"] != len(self.urls) or saved["kind"] != self.cfg.kind:
            raise DataError(f"data.urls: the checkpoint's stream read {saved['num_shards']} {saved['kind']} shards, "
                            f"these are {len(self.urls)} {self.cfg.kind}: the rest of its epoch cannot be shared out "
                            f"(restore the shards, or start the stage afresh)")

    def _leftover_stream(self, state: Dict[str, Any]) -> "ShardStream":
        """The old rank's stream that ``state`` describes, positioned where it stopped: every setting its order
        depends on comes from the saved layout, so it reads exactly the old rank's rest of that epoch."""
        saved = state["layout"]
        self._check_leftover_layout(saved)
        workers = self.cfg.num_workers if saved["num_workers"] == self.num_workers else saved["num_workers"]
        buckets = [list(b) for b in saved["buckets"]] if saved.get("buckets") else self.cfg.buckets
        cfg = dataclasses.replace(self.cfg, rank=saved["rank"], world_size=saved["world_size"], num_workers=workers,
                                  batch_size=saved["batch_size"], seed=saved["seed"], mode=saved["mode"],
                                  shuffle_buffer=saved["shuffle_buffer"], shuffle_initial=saved["shuffle_initial"],
                                  drop_last=saved["drop_last"], buckets=buckets)
        stream = ShardStream(cfg)
        stream.load_state_dict({k: v for k, v in state.items() if k != "leftovers"})
        return stream

    def _layout(self) -> Dict[str, Any]:
        """Everything the batch order depends on besides the position."""
        c = self.cfg
        return {
            "world_size": self.world_size, "rank": self.rank, "num_workers": self.num_workers,
            "num_shards": len(self.urls), "seed": c.seed, "mode": c.mode, "kind": c.kind,
            "batch_size": c.batch_size, "shuffle_buffer": c.shuffle_buffer, "shuffle_initial": c.shuffle_initial,
            "drop_last": c.drop_last, "buckets": [list(b) for b in c.buckets] if c.kind == "raw" else None,
        }


def fixed_order_stream(urls: str | List[str], batch_size: int, seed: int = 0, kind: str = "precomputed",
                       contract: Optional[PrecomputedContract] = None) -> "ShardStream":
    """One epoch over ``urls`` read by a single reader, samples unshuffled (shard order from ``seed``):
    the same batches in the same order on every rank and in every run (calibration batches, fixed
    evaluation batches, grid prompts). ``contract``: what precomputed samples must fit (None: any)."""
    contract = contract or PrecomputedContract()
    return ShardStream(StreamConfig(urls=urls, kind=kind, mode="epoch", batch_size=batch_size, seed=seed, rank=0,
                                    world_size=1, num_workers=0, shuffle_buffer=0,
                                    latent_channels=contract.latent_channels,
                                    prompt_embeds_width=contract.prompt_embeds_width, pooled_width=contract.pooled_width))


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGUSR1 to the training process.

    A scheduler's preemption signal goes to the whole job step, workers included; a worker
    that died of it would make the trainer's next batch fail before it could checkpoint.
    The trainer stops at the end of its step and the loader then ends its workers.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _data_loader(dataset: "_WorkerStream", cfg: StreamConfig) -> torch.utils.data.DataLoader:
    kwargs: Dict[str, Any] = dict(batch_size=None, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory)
    if cfg.num_workers > 0:
        kwargs["worker_init_fn"] = _ignore_stop_signals
    if cfg.num_workers > 0 and cfg.prefetch_factor is not None:
        kwargs["prefetch_factor"] = cfg.prefetch_factor
    if "in_order" in inspect.signature(torch.utils.data.DataLoader).parameters:
        kwargs["in_order"] = True  # the resume logic relies on the strict round-robin order
    return torch.utils.data.DataLoader(dataset, **kwargs)


class _WorkerStream(torch.utils.data.IterableDataset):
    """What runs in each DataLoader worker: shards -> samples -> batches of one logical worker."""

    def __init__(
        self, cfg: StreamConfig, urls: List[str], rank: int, world_size: int, num_workers: int, pos: _Position
    ):
        super().__init__()
        self.cfg, self.urls, self.rank, self.world_size, self.num_workers, self.pos = (
            cfg, urls, rank, world_size, num_workers, pos
        )

    def __iter__(self):
        cfg, pos = self.cfg, self.pos
        info = torch.utils.data.get_worker_info()
        physical, count = (info.id, info.num_workers) if info is not None else (0, 1)
        if count != self.num_workers:
            raise DataError(f"the DataLoader runs {count} workers but the stream was configured for {self.num_workers}")
        worker = (physical + pos.next_worker) % self.num_workers
        if pos.done[worker]:
            return
        fmt = make_format(cfg)
        counter = SkipCounter()
        tracker = _ShardTracker(max_empty=None if cfg.mode == "epoch" else 10 * len(self.urls) + 100)
        handler = SkipHandler(counter, cfg.warn_limit, f" (rank {self.rank} worker {worker})", tracker.mark_truncated)
        shuffle = None
        if cfg.shuffle_buffer > 1:
            rng = random.Random(derive_seed(_SAMPLE_ORDER, cfg.seed, pos.epoch, self.rank, worker))
            shuffle = wds.shuffle(cfg.shuffle_buffer, cfg.shuffle_initial, rng=rng)
        tracker.handler = handler
        # wds.tarfile_to_samples, taken apart to watch each shard's end
        samples = wds.DataPipeline(
            *self._shard_source(worker),
            tracker.track,
            partial(tariterators.url_opener, handler=handler),
            tracker.watch_end,
            partial(tariterators.tar_file_expander, handler=handler),
            tracker.check_end,
            partial(tariterators.group_by_keys, handler=handler),
            tracker.drop_partial,
            shuffle,  # before decoding: the buffer holds compressed bytes
            wds.map(fmt.prepare, handler=handler),
        )
        drop_last = cfg.drop_last and cfg.mode == "epoch"
        skip = pos.consumed[worker]
        handler.quiet = skip > 0  # the earlier run already warned about these batches' skips
        for index, items in enumerate(bucket_batches(samples, cfg.batch_size, lambda p: p.group, drop_last)):
            if index < skip:
                counter.take_delta()  # reported with this batch in the earlier run
                handler.quiet = index + 1 < skip
                continue
            batch = fmt.collate(items, handler)
            if batch is None:  # every sample failed to decode; its skips go with the next batch
                continue
            batch.update({_WORKER: worker, _INDEX: index, _SKIPS: counter.take_delta()})
            yield batch
        yield {_WORKER: worker, _DONE: True, _SKIPS: counter.take_delta()}

    def _shard_source(self, worker: int) -> list:
        cfg = self.cfg
        if cfg.mode == "resampled":
            # deterministic=True: seeded from (worker, seed) only; webdataset's
            # default also mixes in pid and time. Its worker_seed default reads
            # the rank from the environment, so pass the logical worker instead.
            seed = derive_seed(_RESAMPLE, cfg.seed, self.pos.epoch, self.rank)
            return [wds.ResampledShards(self.urls, seed=seed, deterministic=True, worker_seed=lambda: worker)]
        # epoch: one shard order for all ranks, then every world_size-th shard
        # for this rank and every num_workers-th of those for this worker
        return [
            wds.SimpleShardList(self.urls, seed=derive_seed(_SHARD_ORDER, cfg.seed, self.pos.epoch)),
            _every(self.world_size, self.rank),
            _every(self.num_workers, worker),
        ]


def _every(step: int, start: int):
    def stage(src):
        return itertools.islice(src, start, None, step)

    return stage


class _ShardTracker:
    """Pipeline stages that know which shard is being read, and whether it ended properly.

    A cut-off tar does not always raise: Python's tarfile treats a stream that
    ends inside or right before a member header as a normal end of archive.
    ``watch_end``/``check_end`` catch that case: an uncompressed tar that ran
    dry must end in zero blocks (the end-of-archive marker), so one that ends in
    anything else was cut, and is reported to the handler as ``truncated_tar``.

    After a cut (raised or detected), webdataset's grouping stage flushes the
    sample it was assembling from the broken shard, typically missing members.
    ``drop_partial`` drops it: it is the first sample after the cut to come from
    the broken shard. ``track`` also stops an infinite resampled stream in which
    no shard yields a sample.
    """

    def __init__(self, max_empty: Optional[int]):
        self.max_empty = max_empty
        self.handler = None  # set by the owner: SkipHandler and tracker refer to each other
        self.visit = 0  # shards opened so far
        self.url: Optional[str] = None
        self.stream: Optional[_TailRecorder] = None
        self.cut: Optional[str] = None  # url of a shard that broke, until its partial sample is handled
        self.reported = -1  # visit whose truncation was already counted
        self.empty = 0  # shards opened since the last good sample

    def track(self, src):
        for shard in src:
            self.visit += 1
            self.url = shard["url"]
            self.empty += 1
            if self.max_empty is not None and self.empty > self.max_empty:
                raise DataError(f"no readable sample in the last {self.max_empty} shards drawn from the data urls")
            yield shard

    def watch_end(self, src):
        for shard in src:
            shard["stream"] = self.stream = _TailRecorder(shard["stream"], shard["url"])
            yield shard

    def check_end(self, src):
        for item in src:
            if item == {} and self.stream is not None and self.stream.cut_short():  # {}: end of one shard
                self.handler(tarfile.ReadError(f"{self.url} ends without an end-of-archive marker"))
            yield item

    def mark_truncated(self) -> bool:
        if self.reported == self.visit:
            return False
        self.reported = self.visit
        self.cut = self.url
        return True

    def drop_partial(self, src):
        for sample in src:
            cut, self.cut = self.cut, None
            if cut is not None and sample.get("__url__") == cut:
                continue
            self.empty = 0
            yield sample


class _TailRecorder:
    """A read-only stream proxy that remembers whether it ran dry and its last 1 KiB."""

    _COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd
    _MARKER = 1024  # two zero blocks end a tar archive

    def __init__(self, stream, url: str):
        self._stream = stream
        self._url = url
        self._head: Optional[bytes] = None
        self._tail = b""
        self._eof = False

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        if self._head is None:
            self._head = data[:6]
        if not data:
            self._eof = True
        else:
            self._tail = (self._tail + data[-self._MARKER :])[-self._MARKER :]
        return data

    def cut_short(self) -> bool:
        """Ran dry without the zero blocks at the end (compressed streams check themselves)."""
        if not self._eof or (self._head or b"").startswith(self._COMPRESSED):
            return False
        return len(self._tail) < self._MARKER or any(self._tail)

    def __repr__(self) -> str:  # webdataset appends "@ <stream>" to tar errors: show the shard
        return self._url

    def __getattr__(self, name):
        return getattr(self._stream, name)
