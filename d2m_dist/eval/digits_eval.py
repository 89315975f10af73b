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

from d2m_dist.distill.pretrain_teacher import PretrainConfig, sample_digits
from d2m_dist.eval.digits_classifier import digit_accuracy
from d2m_dist.models.moe import set_top_k
from d2m_dist.models.sampling import SamplerConfig, unit_to_uint8


@dataclass
class EvalConfig:
    n_per_digit: int = 20
    steps: int = 20
    guidance_scale: float = 1.0
    seed: int = 0


def _sample(model, card: PretrainConfig, cfg: EvalConfig, labels: torch.Tensor) -> torch.Tensor:
    sampler = SamplerConfig(steps=cfg.steps, guidance_scale=cfg.guidance_scale, embedded_guidance=card.embedded_guidance,
                            seed=cfg.seed)
    model.eval()
    return sample_digits(model, labels.tolist(), sampler, card.max_tokens)


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
