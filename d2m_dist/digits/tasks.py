"""The training set of a digits-preset teacher's task (its card's ``task``)."""

from __future__ import annotations

from typing import Union

from d2m_dist.digits.canvas_data import CanvasTrainingSet, canvas_training_set
from d2m_dist.digits.card import PretrainConfig
from d2m_dist.digits.data import DigitsTrainingSet, digits_training_set

TrainingSet = Union[DigitsTrainingSet, CanvasTrainingSet]


def training_set(card: PretrainConfig, held_out: bool = False) -> TrainingSet:
    """What the teacher of ``card`` trains on; ``held_out``: the "digiteval" task's held-out digits."""
    if card.task == "digiteval":
        return canvas_training_set(card.max_tokens, held_out=held_out)
    if held_out:
        raise ValueError("the 'digits' task trains on all real digits; it has no held-out set")
    return digits_training_set(card.max_tokens)
