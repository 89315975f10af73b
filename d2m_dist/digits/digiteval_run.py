"""A model on DigitEval: canvases for prompts, their scores, and fidelity to the teacher.

Scores follow GenEval's rule (:func:`d2m_dist.digits.digiteval.score`) per
noise seed; the spread over seeds says how much of a difference between two
models is sampling noise. Fidelity compares a student with its teacher from
identical noise: the images (MSE and PSNR on pixels in [0, 1]) and the velocity
each predicts on held-out compositions (MSE per timestep range), which shows
where in the trajectory distillation lost the teacher.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from d2m_dist.digits.canvas_data import canvas_training_set
from d2m_dist.digits.card import PretrainConfig
from d2m_dist.digits.digiteval import CATEGORIES, Prompt, SlotReader, make_prompts, score
from d2m_dist.digits.draw import draw
from d2m_dist.distill.teacher_kinds import GridRequest
from d2m_dist.models.flow import noised_inputs
from d2m_dist.models.flux import call_flux
from d2m_dist.models.sampling import SamplerConfig, unit_to_uint8

TIMESTEP_BINS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))
HELD_OUT_SEED = 20_261_203  # the held-out fidelity batches: the same for every model


def to_canvases(images: torch.Tensor) -> np.ndarray:
    """Images ``[B, 3, 16, 16]`` in [-1, 1] -> uint8 canvases ``[B, 16, 16, 3]``."""
    return unit_to_uint8(images).permute(0, 2, 3, 1).numpy()


@dataclass
class Sampled:
    canvases: np.ndarray  # uint8 [B, 16, 16, 3]
    seconds: float  # sampling wall time (median image latency = seconds / B at this batch)


def sample_prompts(model: torch.nn.Module, prompts: Sequence[Prompt], card: PretrainConfig, *, seed: int,
                   guidance: float, steps: int) -> Sampled:
    sampler = SamplerConfig(steps=steps, guidance_scale=guidance, embedded_guidance=card.embedded_guidance, seed=seed)
    start = time.perf_counter()
    images = draw(model, [p.caption for p in prompts], card, sampler)
    return Sampled(to_canvases(images), time.perf_counter() - start)


def spread(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (0 for one value) of per-seed figures."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0}


def summarise(per_seed: List[Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """Per category and overall: mean and spread over seeds."""
    keys = [c for c in (*CATEGORIES, "overall") if c in per_seed[0]]
    return {k: spread([s[k] for s in per_seed]) for k in keys}


def image_fidelity(model_canvases: np.ndarray, teacher_canvases: np.ndarray) -> Dict[str, float]:
    """Pixel MSE (pixels in [0, 1]) and PSNR in dB (peak 1) between two same-noise image sets."""
    a = model_canvases.astype(np.float64) / 255.0
    b = teacher_canvases.astype(np.float64) / 255.0
    mse = float(np.mean((a - b) ** 2))
    return {"mse": mse, "psnr": math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)}


@torch.no_grad()
def velocity_fidelity(model: torch.nn.Module, teacher: torch.nn.Module, card: PretrainConfig, *, batches: int = 4,
                      batch_size: int = 32) -> Dict[str, float]:
    """Velocity MSE of ``model`` against ``teacher`` on held-out compositions, per timestep range.

    Each batch is noised once per range at timesteps uniform in it, both models
    see the same inputs; captions are kept (no dropout): the conditional
    velocity is what sampling uses.
    """
    data = canvas_training_set(card.max_tokens, held_out=True)
    feed = PretrainConfig(**{**vars(card), "batch_size": batch_size, "caption_dropout": 0.0})
    sums = {bin_: 0.0 for bin_ in TIMESTEP_BINS}
    for i in range(batches):
        gen = torch.Generator().manual_seed(HELD_OUT_SEED + i)
        batch = data.sample(feed, gen)
        for lo, hi in TIMESTEP_BINS:
            t = lo + (hi - lo) * torch.rand(batch_size, generator=gen)
            inputs, _ = noised_inputs(batch, gen, timesteps=t.clamp(1e-4, 1 - 1e-4))
            diff = call_flux(model, inputs).float() - call_flux(teacher, inputs).float()
            sums[(lo, hi)] += float(diff.pow(2).mean())
    return {f"{lo:.2f}-{hi:.2f}": total / batches for (lo, hi), total in sums.items()}


def read_scores(prompts: Sequence[Prompt], canvases: np.ndarray, reader: Optional[SlotReader] = None
                ) -> Dict[str, float]:
    return score(prompts, list(canvases), reader or default_reader())


@functools.lru_cache(maxsize=1)
def default_reader() -> SlotReader:
    """The slot reader fitted on the training split, once per process."""
    return SlotReader()


def first_of_each(prompts: Sequence[Prompt], per_category: int) -> Dict[str, List[int]]:
    """Indices of the first ``per_category`` prompts of each category (for the sample grids)."""
    out: Dict[str, List[int]] = {c: [] for c in CATEGORIES}
    for i, p in enumerate(prompts):
        if len(out[p.category]) < per_category:
            out[p.category].append(i)
    return {c: idx for c, idx in out.items() if idx}


def grid_rows(rows: Sequence[Tuple[str, np.ndarray]], indices: Sequence[int], scale: int = 4) -> np.ndarray:
    """One row per (label, canvases): the canvases at ``indices``, 1-pixel grey gaps, upscaled."""
    tiles = []
    for _, canvases in rows:
        row = [np.pad(canvases[i], ((1, 1), (1, 1), (0, 0)), constant_values=96) for i in indices]
        tiles.append(np.concatenate(row, axis=1))
    grid = np.concatenate(tiles, axis=0)
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def trainer_grid(request: GridRequest, card: PretrainConfig) -> Dict[str, float]:
    """The stage trainer's sample grid for a "digiteval" teacher: ``count // 6`` prompts per category,
    unguided, teacher and student from the same noise; one column per category in the PNG (the first
    prompt of each, teacher row above the student's). Collective: every rank samples."""
    per_category = max(1, request.count // len(CATEGORIES))
    prompts = make_prompts(per_category, seed=0)
    metrics, rows = {}, []
    with request.autocast():
        for name, model in (("teacher", request.teacher), ("student", request.student)):
            canvases = sample_prompts(model, prompts, card, seed=0, guidance=1.0, steps=request.steps).canvases
            metrics[f"digiteval/{name}"] = read_scores(prompts, canvases)["overall"]
            rows.append((name, canvases))
    if request.is_main:
        firsts = [idx[0] for idx in first_of_each(prompts, 1).values()]
        request.out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid_rows(rows, firsts)).save(request.out)
    return metrics
