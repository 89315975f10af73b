"""Teacher-vs-student evaluation on the digits preset: a sample grid and digit accuracy.

Both models sample the same prompts from the same noise (same seeds), so the
grid shows, digit by digit, what distillation kept; the accuracy is the digit
classifier's reading of ``n_per_digit`` samples per digit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from d2m_dist.digits.card import PretrainConfig, teacher_card
from d2m_dist.digits.classifier import digit_accuracy
from d2m_dist.digits.data import DIGIT_WORDS, digit_caption
from d2m_dist.digits.digiteval_run import trainer_grid as digiteval_trainer_grid
from d2m_dist.digits.draw import draw
from d2m_dist.distill.teacher_kinds import GridRequest
from d2m_dist.models.moe import set_top_k
from d2m_dist.models.sampling import SamplerConfig, unit_to_uint8


def sample_digits(model: torch.nn.Module, labels: Sequence[int], sampler: SamplerConfig,
                  card: PretrainConfig) -> torch.Tensor:
    """Images ``[B, 8, 8]`` in (about) [-1, 1], one per prompted digit label (a "digits" task teacher)."""
    return draw(model, [digit_caption(int(d)) for d in labels], card, sampler)[:, 0]


def evaluate_teacher(model: torch.nn.Module, card: PretrainConfig, n_per_digit: int = 20,
                     guidance_scale: float = 1.0, steps: int = 20, seed: int = 0, shift: bool = False) -> float:
    """Digit accuracy of ``n_per_digit`` samples of each digit (any model callable through call_flux)."""
    labels = torch.arange(len(DIGIT_WORDS)).repeat_interleave(n_per_digit)
    sampler = SamplerConfig(steps=steps, guidance_scale=guidance_scale, shift=shift,
                            embedded_guidance=card.embedded_guidance, seed=seed)
    return digit_accuracy(sample_digits(model, labels, sampler, card), labels)


@dataclass
class EvalConfig:
    n_per_digit: int = 20
    steps: int = 20
    guidance_scale: float = 1.0
    seed: int = 0


def _sample(model, card: PretrainConfig, cfg: EvalConfig, labels: torch.Tensor) -> torch.Tensor:
    sampler = SamplerConfig(steps=cfg.steps, guidance_scale=cfg.guidance_scale, embedded_guidance=card.embedded_guidance,
                            seed=cfg.seed)
    return sample_digits(model, labels.tolist(), sampler, card)


def evaluate(models: Sequence[Tuple[str, torch.nn.Module]], card: PretrainConfig,
             cfg: EvalConfig) -> Tuple[Dict[str, float], List[torch.Tensor]]:
    """``models``: (name, model), each sampled as it is set up. Returns accuracies and each model's images."""
    labels = torch.arange(10).repeat_interleave(cfg.n_per_digit)
    accuracy, images = {}, []
    for name, model in models:
        imgs = _sample(model, card, cfg, labels)
        accuracy[name] = digit_accuracy(imgs, labels)
        images.append(imgs)
    return accuracy, images


def compare_with_teacher(teacher: torch.nn.Module, student: torch.nn.Module, card: PretrainConfig, cfg: EvalConfig,
                         top_k: Optional[int] = None) -> Tuple[Dict[str, float], List[torch.Tensor]]:
    """Rows: the teacher, the student at ``top_k`` (None: each site's own spec k), the student's shared experts alone.

    The student is left at ``top_k``.
    """
    accuracy, images = evaluate([("teacher", teacher)], card, cfg)
    for name, k in (("student" if top_k is None else f"student_k{top_k}", top_k), ("student_k0", 0)):
        set_top_k(student, k)
        acc, imgs = evaluate([(name, student)], card, cfg)
        accuracy.update(acc)
        images += imgs
    set_top_k(student, top_k)
    return accuracy, images


def save_grid(images: Sequence[torch.Tensor], n_per_digit: int, path: str | Path, columns: int = 10,
              scale: int = 4) -> Path:
    """One row per model: the first sample of each digit 0..9, upscaled, 2-pixel gaps."""
    rows = []
    for imgs in images:
        firsts = imgs[:: n_per_digit][:columns]
        tiles = [np.pad(unit_to_uint8(t).numpy(), 1, constant_values=255) for t in firsts]
        rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    img = Image.fromarray(grid, mode="L").resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def trainer_grid(request: GridRequest) -> Dict[str, float]:
    """The stage trainer's teacher/student grid for a digits teacher (one image per digit and
    model in the PNG; ``count // 10`` samples per digit scored); DigitEval's for a "digiteval" teacher.
    Collective: every rank samples."""
    card = teacher_card(request.teacher_path)
    if card.task == "digiteval":
        return digiteval_trainer_grid(request, card)
    n = max(1, request.count // 10)
    cfg = EvalConfig(n_per_digit=n, steps=request.steps, seed=0)
    with request.autocast():
        accuracy, images = evaluate([("teacher", request.teacher), ("student", request.student)], card, cfg)
    if request.is_main:
        save_grid(images, n, request.out)
    return {f"digit_accuracy/{k}": v for k, v in accuracy.items()}
