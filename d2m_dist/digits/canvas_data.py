"""Training batches of the "digiteval" task: composed canvases with the captions that describe them.

A batch draws, per sample, a DigitEval category uniformly, a prompt of it
(:func:`~d2m_dist.digits.digiteval.draw_prompt`) and a canvas meeting the prompt
from real digits (:func:`~d2m_dist.digits.digiteval.compose`). Teachers train on
the training split's digits; held-out batches (fidelity of a student against
its teacher) compose from the held-out split. Every caption the task can write
is encoded once, so a batch only indexes rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch

from d2m_dist.digits.card import PretrainConfig
from d2m_dist.digits.data import captioned_batch
from d2m_dist.digits.digiteval import CATEGORIES, Prompt, all_captions, compose, digit_pools, draw_prompt
from d2m_dist.digits.text_encoder import empty_caption_encoding, encode_captions
from d2m_dist.models.flow import FlowBatch
from d2m_dist.models.sampling import pixels_to_latents, uint8_to_unit


def canvases_to_latents(canvases: np.ndarray) -> torch.Tensor:
    """uint8 canvases ``[B, 16, 16, 3]`` -> packed pixel latents ``[B, 64, 12]`` in [-1, 1]."""
    return pixels_to_latents(uint8_to_unit(canvases).permute(0, 3, 1, 2))


def draw_compositions(count: int, pool: Dict[int, np.ndarray], rng: np.random.Generator
                      ) -> Tuple[List[Prompt], np.ndarray]:
    """``count`` prompts, each of a category drawn uniformly, and canvases meeting them (uint8 [count, 16, 16, 3])."""
    prompts = [draw_prompt(CATEGORIES[int(c)], rng) for c in rng.integers(len(CATEGORIES), size=count)]
    return prompts, np.stack([compose(p, pool, rng) for p in prompts])


@dataclass
class CanvasTrainingSet:
    pool: Dict[int, np.ndarray]  # label -> uint8 [n, 8, 8]: the digits canvases are composed from
    captions: List[str]
    row: Dict[str, int]  # caption -> row of caption_embeds
    caption_embeds: torch.Tensor  # [len(captions), T, 384]
    caption_pooled: torch.Tensor  # [len(captions), 384]
    empty_embeds: torch.Tensor  # [1, T, 384]
    empty_pooled: torch.Tensor  # [1, 384]

    def sample(self, cfg: PretrainConfig, gen: torch.Generator) -> FlowBatch:
        """``cfg.batch_size`` fresh compositions; ``gen`` fixes them (and the caption dropout)."""
        # numpy draws the compositions (digiteval's composer works in numpy), seeded from gen
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
        prompts, canvases = draw_compositions(cfg.batch_size, self.pool, rng)
        rows = torch.as_tensor([self.row[p.caption] for p in prompts])
        return captioned_batch(canvases_to_latents(canvases), self.caption_embeds[rows], self.caption_pooled[rows],
                               (self.empty_embeds, self.empty_pooled), cfg, gen)


def canvas_training_set(max_tokens: int, held_out: bool = False) -> CanvasTrainingSet:
    """Every caption encoded once (about 1000; cached on disk under $D2M_TEXT_CACHE) and the digit pool."""
    pools = digit_pools()
    captions = all_captions()
    embeds, pooled = encode_captions(captions, max_tokens)
    empty_embeds, empty_pooled = empty_caption_encoding(max_tokens)
    return CanvasTrainingSet(pools.held_out if held_out else pools.train, captions,
                             {c: i for i, c in enumerate(captions)}, embeds, pooled, empty_embeds, empty_pooled)
