"""Training batches for the stage trainer: the batch-source interface, its registry, and the shard source.

A batch source hands each rank ``(inputs, velocity target)`` addressed by
``(draw, micro)``: ``draw`` counts the trainer's step attempts (a skipped step's
retry is a new draw, so it does not repeat what failed), ``micro`` the
micro-step inside it. ``fixed(i)`` gives fixed evaluation batches, the same in
every run; ``state_dict``/``load_state_dict`` carry this rank's position.

``data.source`` names a registered source: ``shards`` (precomputed webdataset
shards, here) or one a preset registers (``digits``: :mod:`d2m_dist.digits`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import torch

from d2m_dist.config import ConfigError, StageConfig
from d2m_dist.data.decode import PrecomputedContract
from d2m_dist.data.precomputed_batch import precomputed_flow_batch
from d2m_dist.data.stream import ShardStream, StreamConfig, fixed_order_stream
from d2m_dist.models.flow import noised_inputs
from d2m_dist.models.flux import FluxInputs
from d2m_dist.parallel.dist import DistInfo

log = logging.getLogger("d2m_dist.train")

FIXED_SEED_OFFSET = 1 << 40  # fixed evaluation batches draw from seeds no training draw reaches


def slice_inputs(x: FluxInputs, lo: int, hi: int) -> FluxInputs:
    """Samples ``lo:hi`` of a batch."""
    return x.select(torch.arange(lo, hi))


class BatchSource(Protocol):
    def get(self, draw: int, micro: int = 0) -> Tuple[FluxInputs, torch.Tensor]: ...

    def fixed(self, i: int) -> Tuple[FluxInputs, torch.Tensor]: ...

    def state_dict(self) -> Dict: ...

    def load_state_dict(self, state: Dict) -> None: ...

    def load_elastic_state(self, states: List[Dict]) -> None: ...  # every old rank's state, another layout

    # this rank's totals since the run began (resumes included): {"samples": delivered, "skipped": skips,
    # "skipped/<reason>": skips for one reason, ...}; the trainer sums them over ranks
    def data_counts(self) -> Dict[str, int]: ...


# (stage config, this rank's coordinates, the teacher's diffusers config, the guidance value) -> source
BatchFactory = Callable[[StageConfig, DistInfo, Any, Optional[float]], BatchSource]
BATCH_SOURCES: Dict[str, BatchFactory] = {}


def register_batch_source(name: str, factory: BatchFactory) -> None:
    BATCH_SOURCES[name] = factory


def make_batches(cfg: StageConfig, info: DistInfo, model_config: Any, guidance: Optional[float]) -> BatchSource:
    if cfg.data.source not in BATCH_SOURCES:
        raise ConfigError(f"data.source: '{cfg.data.source}' is not one of {', '.join(sorted(BATCH_SOURCES))}")
    return BATCH_SOURCES[cfg.data.source](cfg, info, model_config, guidance)


class ShardBatches:
    """Precomputed webdataset shards (``d2m precompute``), streamed with an exact resume position.

    Each rank reads its own split of every epoch (or, in resampled mode, draws
    shards with replacement), deterministic given seed and rank; each rank's
    position is saved with the trainer's checkpoint, so a restart in the same
    layout continues with the batches an uninterrupted run would have seen, and
    one in another layout shares out the rest of the epoch (:meth:`load_elastic_state`).
    Noise and timesteps come from ``(seed, draw, micro, rank)``.

    With ``model_config``, every sample is checked against the model's
    :class:`PrecomputedContract`: one that does not fit
    is skipped and counted (:meth:`data_counts`) instead of failing a step.
    """

    def __init__(self, urls: str, batch_size: int, rank: int, world: int, seed: int, num_workers: int,
                 guidance: float | None, model_config=None, mode: str = "epoch"):
        # (the stage start already ran check_shards_fit_model, on every rank, before any engine)
        contract = PrecomputedContract() if model_config is None else PrecomputedContract.for_model(model_config)
        self.stream = ShardStream(StreamConfig(
            urls=urls, kind="precomputed", mode=str(mode), batch_size=batch_size, seed=seed, rank=rank, world_size=world,
            num_workers=num_workers, latent_channels=contract.latent_channels,
            prompt_embeds_width=contract.prompt_embeds_width, pooled_width=contract.pooled_width))
        self.rank, self.world, self.seed, self.guidance = rank, world, seed, guidance
        self.batch_size = batch_size
        self.urls, self.contract = urls, contract
        self._it = None
        self._fixed: List[Dict] | None = None

    def get(self, draw: int, micro: int = 0) -> Tuple[FluxInputs, torch.Tensor]:
        if self._it is None:
            self._it = self.stream.forever()
        batch = precomputed_flow_batch(next(self._it), self.guidance)
        gen = torch.Generator().manual_seed(((self.seed * 1_000_003 + draw) * 131 + micro) * 997 + self.rank)
        return noised_inputs(batch, gen)

    def fixed(self, i: int) -> Tuple[FluxInputs, torch.Tensor]:
        """Fixed evaluation batch ``i``: batch ``i * world + rank`` of one fixed-order epoch (wrapping
        around a small set), with noise from ``(seed, i, rank)``."""
        if self._fixed is None:
            self._fixed = []
            for b in fixed_order_stream(self.urls, self.batch_size, contract=self.contract):
                if len(b["latent"]) == self.batch_size:  # whole batches only: every rank's has the same size
                    self._fixed.append(b)
            if not self._fixed:
                raise ConfigError(f"data.urls {self.urls}: fewer samples than one batch of {self.batch_size}")
        batch = precomputed_flow_batch(self._fixed[(i * self.world + self.rank) % len(self._fixed)], self.guidance)
        gen = torch.Generator().manual_seed(((self.seed * 1_000_003 + FIXED_SEED_OFFSET + i) * 997) + self.rank)
        return noised_inputs(batch, gen)

    def state_dict(self) -> Dict:
        return self.stream.state_dict()

    def data_counts(self) -> Dict[str, int]:
        """This rank's training-stream totals since the run began (resumes included): ``samples`` delivered,
        ``skipped`` in all and ``skipped/<reason>`` per reason. After a layout change the old ranks' totals
        are rank 0's, so the sum over ranks is the run's. Fixed evaluation batches are not counted."""
        skips = self.stream.skips
        return {"samples": self.stream.delivered, "skipped": skips.total,
                **{f"skipped/{reason}": n for reason, n in skips.as_dict().items()}}

    def load_state_dict(self, state: Dict) -> None:
        if state:
            self.stream.load_state_dict(state)

    def load_elastic_state(self, states: List[Dict]) -> None:
        """Every rank's state from a run in another layout: this rank takes its share of the epoch's rest."""
        owners = self.stream.redistribute(states)
        log.info("data: rank %d reads the rest of the epoch of old rank(s) %s (%d stream rests), then epoch %d",
                 self.rank, owners, len(self.stream.leftovers), self.stream.epoch)


def _shard_batches(cfg: StageConfig, info: DistInfo, model_config: Any, guidance: Optional[float]) -> ShardBatches:
    return ShardBatches(cfg.data.urls, cfg.data.batch_size, info.rank, info.world, cfg.data.seed, cfg.data.num_workers,
                        guidance, model_config=model_config, mode=cfg.data.mode)


register_batch_source("shards", _shard_batches)
