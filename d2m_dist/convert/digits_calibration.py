"""Calibration batches for the digits preset: real digits, captions through the offline text encoder.

The teacher's card (``d2m_teacher.json`` beside ``model_index.json``) says how
it was trained and so how it must be fed (caption length, embedded guidance);
calibration draws batches exactly as training did, caption dropout included.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import torch

from d2m_dist.config import CalibrationConfig
from d2m_dist.distill.pretrain_teacher import (
    CARD_FILE,
    PretrainConfig,
    digits_training_set,
    load_pretrain_config,
    sample_batch,
)
from d2m_dist.models.flow import FlowBatch


def is_digits_teacher(teacher_path: str | Path) -> bool:
    """Whether ``teacher_path`` (a pipeline root or its transformer/ folder) holds a digits teacher card."""
    p = Path(teacher_path)
    return any((root / CARD_FILE).is_file() for root in (p, p.parent))


def teacher_card(teacher_path: str | Path) -> PretrainConfig:
    """The digits teacher's training config (defaults when the folder has no card)."""
    p = Path(teacher_path)
    for root in (p, p.parent):
        if (root / CARD_FILE).is_file():
            return load_pretrain_config(root)
    return PretrainConfig()


def digits_batches(teacher_path: str | Path, cal: CalibrationConfig) -> Iterator[FlowBatch]:
    card = dataclasses.replace(teacher_card(teacher_path), batch_size=cal.batch_size)
    data = digits_training_set(card.max_tokens)
    for i in range(cal.num_batches):
        gen = torch.Generator().manual_seed(cal.seed * 7919 + i)
        batch = sample_batch(data, card, gen)
        batch.index = i
        yield batch
