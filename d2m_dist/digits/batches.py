"""Batches of the digits preset: stage-0 calibration and the stage trainer's ``data.source=digits``.

Real digits with captions through the offline text encoder. The teacher's card
says how it was trained and so how it must be fed (caption length, caption
dropout, embedded guidance, timestep shift); both draw exactly as training did.

Training batches: a step's *global* batch (``batch_size * ranks * grad_accum``
samples) with its noise and timesteps comes from a generator seeded by
``(seed, draw)``, and rank r's micro-batch m is the contiguous slice
``m * ranks + r``. So N ranks see exactly what one rank with the global batch
sees, grad_accum 2 at batch b sees what grad_accum 1 at batch 2b sees, and a
resumed run continues with the batches an uninterrupted run would have drawn:
the position is just the draw.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, Iterator, Tuple

import torch

from d2m_dist.config import CalibrationConfig
from d2m_dist.digits.card import teacher_card
from d2m_dist.digits.data import sample_batch
from d2m_dist.digits.tasks import training_set
from d2m_dist.distill.batches import FIXED_SEED_OFFSET, slice_inputs
from d2m_dist.models.flow import FlowBatch, noised_inputs
from d2m_dist.models.flux import FluxInputs


def digits_batches(teacher_path: str | Path, cal: CalibrationConfig) -> Iterator[FlowBatch]:
    card = dataclasses.replace(teacher_card(teacher_path), batch_size=cal.batch_size)
    data = training_set(card)
    for i in range(cal.num_batches):
        gen = torch.Generator().manual_seed(cal.seed * 7919 + i)
        batch = sample_batch(data, card, gen)
        batch.index = i
        yield batch


class DigitsBatches:
    """Real digits with captions (caption dropout as the teacher was trained), in-process."""

    def __init__(self, teacher_path: str, batch_size: int, rank: int, world: int, seed: int, grad_accum: int = 1):
        self.card = dataclasses.replace(teacher_card(teacher_path), batch_size=batch_size * world * grad_accum)
        self.data = training_set(self.card)
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self._drawn: Tuple[int, FluxInputs, torch.Tensor] | None = None
        self.delivered = 0  # samples handed out by get(), resumes included

    def get(self, draw: int, micro: int = 0) -> Tuple[FluxInputs, torch.Tensor]:
        """(this rank's noised inputs, velocity target) for micro-step ``micro`` of ``draw``."""
        if self._drawn is None or self._drawn[0] != draw:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + draw)
            inputs, target = noised_inputs(sample_batch(self.data, self.card, gen), gen, shift=self.card.shift)
            self._drawn = (draw, inputs, target)
        _, inputs, target = self._drawn
        lo = (micro * self.world + self.rank) * self.batch_size
        hi = lo + self.batch_size
        self.delivered += self.batch_size
        return slice_inputs(inputs, lo, hi), target[lo:hi]

    def fixed(self, i: int) -> Tuple[FluxInputs, torch.Tensor]:
        """Fixed evaluation batch ``i`` (this rank's slice): the same in every run, apart from training's draws."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + FIXED_SEED_OFFSET + i)
        card = dataclasses.replace(self.card, batch_size=self.batch_size * self.world)
        inputs, target = noised_inputs(sample_batch(self.data, card, gen), gen, shift=self.card.shift)
        lo = self.rank * self.batch_size
        return slice_inputs(inputs, lo, lo + self.batch_size), target[lo : lo + self.batch_size]

    def state_dict(self) -> Dict:
        return {"delivered": self.delivered}  # the position is the trainer's draw counter; this is a count

    def load_state_dict(self, state: Dict) -> None:
        self.delivered = int(state.get("delivered", 0))  # checkpoints from before it was kept: {}

    def load_elastic_state(self, states: list) -> None:
        # any layout draws the same global batches from the draw counter; the old ranks' counts go to rank 0
        self.delivered = sum(int(s.get("delivered", 0)) for s in states) if self.rank == 0 else 0

    def data_counts(self) -> Dict[str, int]:
        """Samples handed out on this rank since the run began; an in-process set has nothing to skip."""
        return {"samples": self.delivered, "skipped": 0}
