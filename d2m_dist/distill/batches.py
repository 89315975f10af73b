"""Training batches for the stage trainer, identical whatever the world size.

A step's *global* batch (``batch_size * data-parallel ranks`` samples) and its
noise and timesteps are drawn from generators seeded by ``(seed, step)``; each
rank keeps its contiguous slice. So N ranks see exactly what one rank with the
global batch sees (the basis of the distributed-equals-single tests), and a
resumed run continues with the batches an uninterrupted run would have drawn:
the position is just the step.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import torch

from d2m_dist.models.flow import noised_inputs
from d2m_dist.models.flux import FluxInputs


def _slice_inputs(x: FluxInputs, lo: int, hi: int) -> FluxInputs:
    return x.select(torch.arange(lo, hi))


class DigitsBatches:
    """Real digits with captions (caption dropout as the teacher was trained), in-process."""

    def __init__(self, teacher_path: str, batch_size: int, rank: int, world: int, seed: int):
        from d2m_dist.convert.digits_calibration import teacher_card
        from d2m_dist.distill.pretrain_teacher import digits_training_set

        self.card = dataclasses.replace(teacher_card(teacher_path), batch_size=batch_size * world)
        self.data = digits_training_set(self.card.max_tokens)
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed

    def get(self, step: int) -> Tuple[FluxInputs, torch.Tensor]:
        """(this rank's noised inputs, velocity target) for ``step``."""
        from d2m_dist.distill.pretrain_teacher import sample_batch

        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        full = sample_batch(self.data, self.card, gen)
        inputs, target = noised_inputs(full, gen, shift=self.card.shift)
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return _slice_inputs(inputs, lo, hi), target[lo:hi]

    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, state: Dict) -> None:
        pass
