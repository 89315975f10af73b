"""Pretrain the digits preset's dense teacher: a small FLUX transformer on 8x8 digits.

The teacher is diffusers' ``FluxTransformer2DModel`` at toy size, trained with
FLUX's rectified-flow objective on scikit-learn's real digits in pixel space
(no VAE: an 8x8 image in [-1, 1] is packed 2x2 into 16 tokens of 4 channels)
and conditioned on MiniLM encodings of "a handwritten digit seven"-style
captions. Captions are dropped 10% of the time (replaced by the empty caption's
encoding) so that classifier-free guidance works at sampling time. The model
saved is the EMA of the weights, as a diffusers pipeline root that
:func:`d2m_dist.models.flux.load_teacher` opens like any FLUX checkpoint, with
its card (:mod:`d2m_dist.digits.card`) beside it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import diffusers
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from d2m_dist.digits.card import CARD_FILE, PretrainConfig
from d2m_dist.digits.data import sample_batch
from d2m_dist.digits.digiteval import make_prompts
from d2m_dist.digits.digiteval_run import read_scores, sample_prompts
from d2m_dist.digits.evaluate import evaluate_teacher
from d2m_dist.digits.tasks import training_set
from d2m_dist.digits.text_encoder import TEXT_ENCODER_NAME
from d2m_dist.models.flow import noised_inputs
from d2m_dist.models.flux import build_flux, call_flux


@dataclass
class PretrainResult:
    model: torch.nn.Module  # the trained weights (train mode)
    ema: torch.nn.Module  # their EMA (eval mode, frozen): the teacher to save and use
    losses: List[float]
    seconds: float


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Train a teacher from scratch on the digits; deterministic given ``cfg.seed`` (on CPU)."""
    cfg.validate()
    torch.manual_seed(cfg.seed)  # the model's initialisation
    model = build_flux(cfg.flux_config()).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    data = training_set(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))

    losses: List[float] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="teacher", disable=not cfg.progress, dynamic_ncols=True)
    for step in bar:
        inputs, target = noised_inputs(sample_batch(data, cfg, gen), gen, shift=cfg.shift)
        loss = F.mse_loss(call_flux(model, inputs), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        # short runs (tests, smoke) would otherwise keep mostly the random init in the EMA
        _ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    return PretrainResult(model=model, ema=ema, losses=losses, seconds=time.perf_counter() - start)


# ----------------------------------------------------------------------------- saving


def save_teacher(model: torch.nn.Module, out: str | Path, cfg: PretrainConfig, extra: Dict | None = None) -> Path:
    """Write ``out/transformer/`` (diffusers, safetensors), ``model_index.json`` and the card.

    ``model_index.json`` makes ``out`` a pipeline root for
    :func:`~d2m_dist.models.flux.resolve_transformer_dir`; it lists only the
    transformer, because the preset has no VAE and its text encoder is a pip
    package (named in the card, ``d2m_teacher.json``, with everything a caller
    must match: max_tokens, embedded guidance, pixel range).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"teacher output {out} exists and is not an empty folder")
    # written beside the target and renamed into place: a crash leaves no half teacher
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_teacher(model, tmp, cfg, extra)
        if out.exists():
            out.rmdir()  # the empty folder the caller made
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_teacher(model: torch.nn.Module, out: Path, cfg: PretrainConfig, extra: Dict | None) -> None:
    model.save_pretrained(str(out / "transformer"), safe_serialization=True)
    index = {
        "_class_name": "FluxPipeline",
        "_diffusers_version": diffusers.__version__,
        "transformer": ["diffusers", "FluxTransformer2DModel"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    side, channels = cfg.image_size, cfg.pixel_channels
    card = {
        "preset": "digits",
        "text_encoder": TEXT_ENCODER_NAME,
        "pixels": f"{side}x{side} {'grayscale' if channels == 1 else 'RGB'} in [-1, 1] (uint8 / 127.5 - 1), packed "
                  f"2x2 -> {cfg.grid[0] * cfg.grid[1]} tokens x {cfg.latent_channels} channels",
        "pretrain": dataclasses.asdict(cfg),
        **(extra or {}),
    }
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")


def teacher_quality(model: torch.nn.Module, cfg: PretrainConfig, per_class: int, scale: float) -> object:
    """What the card records of a teacher's samples at CFG ``scale``: the "digits" task's digit accuracy
    (``per_class`` samples per digit), the "digiteval" task's DigitEval scores (``per_class`` prompts per category)."""
    if cfg.task == "digiteval":
        prompts = make_prompts(per_class, seed=0)
        return read_scores(prompts, sample_prompts(model, prompts, cfg, seed=0, guidance=scale, steps=20).canvases)
    return evaluate_teacher(model, cfg, per_class, scale)


def pretrain_teacher(cfg: PretrainConfig, out: str | Path, eval_per_class: int = 20,
                     eval_scales: Tuple[float, ...] = (1.0,)) -> Tuple[PretrainResult, Dict[str, object]]:
    """Train, evaluate the EMA teacher at each CFG scale, and save it with the numbers in its card."""
    result = pretrain(cfg)
    quality = {f"cfg{scale:g}": teacher_quality(result.ema, cfg, eval_per_class, scale) for scale in eval_scales}
    save_teacher(result.ema, out, cfg, extra={
        "parameters": count_parameters(result.ema),
        "train_seconds": round(result.seconds, 1),
        "final_loss": sum(result.losses[-50:]) / len(result.losses[-50:]),
        "digiteval" if cfg.task == "digiteval" else "digit_accuracy": quality,
    })
    return result, quality
