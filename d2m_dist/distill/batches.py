"""Training batches for the stage trainer.

Batches are addressed by ``(draw, micro)``: ``draw`` counts the trainer's step
attempts (a skipped step's retry is a new draw, so it does not repeat what
failed), ``micro`` the micro-step inside it.

The digits source draws a step's *global* batch (``batch_size * ranks *
grad_accum`` samples) with its noise and timesteps from a generator seeded by
``(seed, draw)``, and rank r's micro-batch m is the contiguous slice
``(m * ranks + r)``. So N ranks see exactly what one rank with the global batch
sees, grad_accum 2 at batch b sees what grad_accum 1 at batch 2b sees, and a
resumed run continues with the batches an uninterrupted run would have drawn:
the position is just the draw.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch

from d2m_dist.config import ConfigError
from d2m_dist.models.flow import noised_inputs
from d2m_dist.models.flux import FluxInputs


FIXED_SEED_OFFSET = 1 << 40  # fixed evaluation batches draw from seeds no training draw reaches


def _slice_inputs(x: FluxInputs, lo: int, hi: int) -> FluxInputs:
    return x.select(torch.arange(lo, hi))


class DigitsBatches:
    """Real digits with captions (caption dropout as the teacher was trained), in-process."""

    def __init__(self, teacher_path: str, batch_size: int, rank: int, world: int, seed: int, grad_accum: int = 1):
        from d2m_dist.convert.digits_calibration import teacher_card
        from d2m_dist.distill.pretrain_teacher import digits_training_set

        self.card = dataclasses.replace(teacher_card(teacher_path), batch_size=batch_size * world * grad_accum)
        self.data = digits_training_set(self.card.max_tokens)
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self._drawn: Tuple[int, FluxInputs, torch.Tensor] | None = None

    def get(self, draw: int, micro: int = 0) -> Tuple[FluxInputs, torch.Tensor]:
        """(this rank's noised inputs, velocity target) for micro-step ``micro`` of ``draw``."""
        from d2m_dist.distill.pretrain_teacher import sample_batch

        if self._drawn is None or self._drawn[0] != draw:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + draw)
            inputs, target = noised_inputs(sample_batch(self.data, self.card, gen), gen, shift=self.card.shift)
            self._drawn = (draw, inputs, target)
        _, inputs, target = self._drawn
        lo = (micro * self.world + self.rank) * self.batch_size
        hi = lo + self.batch_size
        return _slice_inputs(inputs, lo, hi), target[lo:hi]

    def fixed(self, i: int) -> Tuple[FluxInputs, torch.Tensor]:
        """Fixed evaluation batch ``i`` (this rank's slice): the same in every run, apart from training's draws."""
        from d2m_dist.distill.pretrain_teacher import sample_batch

        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + FIXED_SEED_OFFSET + i)
        card = dataclasses.replace(self.card, batch_size=self.batch_size * self.world)
        inputs, target = noised_inputs(sample_batch(self.data, card, gen), gen, shift=self.card.shift)
        lo = self.rank * self.batch_size
        return _slice_inputs(inputs, lo, lo + self.batch_size), target[lo : lo + self.batch_size]

    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, state: Dict) -> None:
        pass


class ShardBatches:
    """Precomputed webdataset shards (``d2m precompute``), streamed with an exact resume position.

    Each rank reads its own split (resampled, deterministic given seed and rank);
    the stream's position is saved in the trainer's checkpoint, so a restart on
    the same world size continues with the batches an uninterrupted run would
    have seen. Noise and timesteps come from ``(seed, draw, micro, rank)``.
    """

    def __init__(self, urls: str, batch_size: int, rank: int, world: int, seed: int, num_workers: int,
                 guidance: float | None, max_tokens: int | None = None, model_config=None):
        from d2m_dist.data.stream import ShardStream, StreamConfig

        self.stream = ShardStream(StreamConfig(urls=urls, kind="precomputed", mode="resampled", batch_size=batch_size,
                                               seed=seed, rank=rank, world_size=world, num_workers=num_workers))
        self.rank, self.world, self.seed, self.guidance = rank, world, seed, guidance
        self.batch_size = batch_size
        self.urls, self.model_config, self._checked = urls, model_config, False
        self._it = None
        self._fixed: List[Dict] | None = None

    def get(self, draw: int, micro: int = 0) -> Tuple[FluxInputs, torch.Tensor]:
        if self._it is None:
            self._it = iter(self.stream)
        batch = precomputed_flow_batch(next(self._it), self.guidance)
        if self.model_config is not None and not self._checked:
            check_batch_shapes(batch, self.model_config, f"data.urls {self.urls}")
            self._checked = True
        gen = torch.Generator().manual_seed(((self.seed * 1_000_003 + draw) * 131 + micro) * 997 + self.rank)
        return noised_inputs(batch, gen)

    def fixed(self, i: int) -> Tuple[FluxInputs, torch.Tensor]:
        """Fixed evaluation batch ``i``: batch ``i * world + rank`` of one fixed-order epoch (wrapping
        around a small set), with noise from ``(seed, i, rank)``."""
        from d2m_dist.data.stream import fixed_order_stream

        if self._fixed is None:
            self._fixed = []
            for b in fixed_order_stream(self.urls, self.batch_size):
                if len(b["latent"]) == self.batch_size:  # whole batches only: every rank's has the same size
                    self._fixed.append(b)
            if not self._fixed:
                raise ConfigError(f"data.urls {self.urls}: fewer samples than one batch of {self.batch_size}")
        batch = precomputed_flow_batch(self._fixed[(i * self.world + self.rank) % len(self._fixed)], self.guidance)
        gen = torch.Generator().manual_seed(((self.seed * 1_000_003 + FIXED_SEED_OFFSET + i) * 997) + self.rank)
        return noised_inputs(batch, gen)

    def state_dict(self) -> Dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: Dict) -> None:
        if state:
            self.stream.load_state_dict(state)


def precomputed_flow_batch(b: Dict, guidance: Optional[float]):
    """A batch of the precomputed stream (``latent`` [B, C, h, w], embeddings) as a packed FlowBatch."""
    from d2m_dist.models.flow import FlowBatch
    from d2m_dist.models.flux import latent_image_ids, pack_latents

    latents = torch.as_tensor(b["latent"]).float()
    _, _, h, w = latents.shape
    embeds = torch.as_tensor(b["prompt_embeds"]).float()
    return FlowBatch(
        latents=pack_latents(latents), prompt_embeds=embeds, pooled=torch.as_tensor(b["pooled"]).float(),
        img_ids=latent_image_ids(h // 2, w // 2), txt_ids=torch.zeros(embeds.shape[1], 3),
        guidance=None if guidance is None else torch.full((latents.shape[0],), float(guidance)),
    )


def check_batch_shapes(batch, model_config, source: str) -> None:
    """A clear one-line error when precomputed data does not fit the model (instead of a matmul error)."""
    have = {"latent channels x 4 (packed)": batch.latents.shape[-1],
            "prompt_embeds width": batch.prompt_embeds.shape[-1], "pooled width": batch.pooled.shape[-1]}
    want = {"latent channels x 4 (packed)": model_config.in_channels,
            "prompt_embeds width": model_config.joint_attention_dim,
            "pooled width": model_config.pooled_projection_dim}
    for name, value in have.items():
        if value != want[name]:
            raise ConfigError(f"{source}: {name} is {value}, the model takes {want[name]} "
                              f"(shards precomputed for another model?)")
