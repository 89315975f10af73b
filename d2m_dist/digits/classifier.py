"""A digit classifier trained on the real digits, to read generated ones.

The quality score of the digits preset is the fraction of generated images that
this classifier reads as the digit they were prompted with. It is an RBF SVM on
the 64 pixels (0.99 on held-out real digits, fitted in well under a second), so
it is refitted on first use and cached rather than shipped as weights.

Pixel convention: every image here is ``[B, 8, 8]`` float in [-1, 1]
(``uint8 / 127.5 - 1``, :func:`d2m_dist.models.sampling.uint8_to_unit`), the
range the teacher is trained and sampled in. Values outside are clipped, as a
sampler can overshoot.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from d2m_dist.digits.data import load_digits_arrays
from d2m_dist.models.sampling import uint8_to_unit

# A fixed fifth of the real digits is never seen by the classifier, so its
# accuracy on them is an honest reading of how well it reads digits.
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitSplit:
    train_images: torch.Tensor  # [N, 8, 8] in [-1, 1]
    train_labels: torch.Tensor  # [N]
    test_images: torch.Tensor
    test_labels: torch.Tensor


@functools.lru_cache(maxsize=1)
def digits_split() -> DigitSplit:
    """The classifier's stratified train / held-out split of the 1797 real digits."""
    from sklearn.model_selection import train_test_split  # lazy: scikit-learn's import is slow

    images, labels = load_digits_arrays()
    tr_x, te_x, tr_y, te_y = train_test_split(
        images, labels, test_size=HELD_OUT_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return DigitSplit(uint8_to_unit(tr_x), torch.as_tensor(tr_y), uint8_to_unit(te_x), torch.as_tensor(te_y))


class DigitClassifier:
    """Reads [B, 8, 8] images in [-1, 1] as digits 0..9."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        from sklearn.svm import SVC  # lazy: scikit-learn's import is slow

        # gamma="scale" adapts the RBF width to the pixel range; C=10 (vs the
        # default 1) fits the 8x8 digits tighter: 0.994 vs 0.989 held-out.
        self._svm = SVC(gamma="scale", C=10.0)
        self._svm.fit(_features(images), np.asarray(labels))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted digit per image, ``[B]`` int64."""
        return torch.as_tensor(self._svm.predict(_features(images)), dtype=torch.int64)


def _features(images: torch.Tensor) -> np.ndarray:
    x = torch.as_tensor(images).detach().float().cpu()
    if x.shape[-2:] != (8, 8):
        raise ValueError(f"digit images must be [B, 8, 8], got {tuple(x.shape)}")
    return x.clamp(-1, 1).reshape(x.shape[0], 64).numpy()


@functools.lru_cache(maxsize=1)
def load_digit_classifier() -> DigitClassifier:
    """The classifier fitted on the training part of :func:`digits_split` (cached)."""
    split = digits_split()
    return DigitClassifier(split.train_images, split.train_labels)


def digit_accuracy(images: torch.Tensor, prompted_labels) -> float:
    """Fraction of ``images`` ([B, 8, 8] in [-1, 1]) read as their prompted digit."""
    labels = torch.as_tensor(prompted_labels, dtype=torch.int64).reshape(-1)
    if labels.numel() != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.numel()} labels")
    predicted = load_digit_classifier().predict(images)
    return float((predicted == labels).float().mean())
