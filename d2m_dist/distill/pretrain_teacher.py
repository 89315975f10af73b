"""Pretrain the digits preset's dense teacher: a small FLUX transformer on 8x8 digits.

The teacher is diffusers' ``FluxTransformer2DModel`` at toy size, trained with
FLUX's rectified-flow objective on scikit-learn's real digits in pixel space
(no VAE: an 8x8 image in [-1, 1] is packed 2x2 into 16 tokens of 4 channels)
and conditioned on MiniLM encodings of "a handwritten digit seven"-style
captions. Captions are dropped 10% of the time (replaced by the empty caption's
encoding) so that classifier-free guidance works at sampling time. The model
saved is the EMA of the weights, as a diffusers pipeline root that
:func:`d2m_dist.models.flux.load_teacher` opens like any FLUX checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from d2m_dist.data.digits import DIGIT_WORDS, digit_caption, load_digits_arrays
from d2m_dist.data.text_encoder import EMBED_DIM, TEXT_ENCODER_NAME, empty_caption_encoding, encode_captions
from d2m_dist.eval.digits_classifier import digit_accuracy
from d2m_dist.models.flow import FlowBatch, noised_inputs
from d2m_dist.models.flux import build_flux, call_flux, latent_image_ids
from d2m_dist.models.sampling import (SamplerConfig, euler_sample, latents_to_pixels, pixels_to_latents,
                                      uint8_to_unit)

IMAGE_SIZE = 8  # pixels per side; 2x2 packing gives a 4x4 token grid
GRID = (IMAGE_SIZE // 2, IMAGE_SIZE // 2)
LATENT_CHANNELS = 4  # one pixel channel x the 2x2 patch
CARD_FILE = "d2m_teacher.json"  # how the teacher was trained and must be called


@dataclass
class PretrainConfig:
    # architecture (defaults: 0.38M parameters; about 45 s on 2 idle cores to ~0.96 digit accuracy, 1.0 with CFG 2)
    num_layers: int = 1  # double-stream blocks
    num_single_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 32
    axes_dims_rope: List[int] = field(default_factory=lambda: [8, 12, 12])  # must sum to attention_head_dim
    # optimisation
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.995  # a ~200-step horizon: short runs keep little of their early weights
    seed: int = 0
    # conditioning
    caption_dropout: float = 0.1
    max_tokens: int = 8  # "[CLS] a handwritten digit seven [SEP]" is 7 MiniLM tokens
    # FLUX.1 [dev]'s architecture has a guidance embedding; false builds a teacher without
    # one, like FLUX.1 [schnell] and FLUX models that were not guidance-distilled.
    guidance_embeds: bool = True
    # The teacher is not guidance-distilled: its guidance embedding (if any) always sees
    # this constant (CFG happens at sampling time); students must be fed the same.
    embedded_guidance: float = 1.0
    shift: bool = True  # FLUX's resolution-shifted logit-normal training timesteps
    progress: bool = True

    def check(self) -> None:
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                             f"{self.attention_head_dim}")
        if any(a % 2 for a in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope}: every axis needs an even width")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")

    def flux_config(self) -> Dict:
        """The diffusers ``FluxTransformer2DModel`` config of this teacher."""
        return {
            "_class_name": "FluxTransformer2DModel",
            "attention_head_dim": self.attention_head_dim,
            "axes_dims_rope": list(self.axes_dims_rope),
            "guidance_embeds": self.guidance_embeds,
            "in_channels": LATENT_CHANNELS,
            "joint_attention_dim": EMBED_DIM,
            "num_attention_heads": self.num_attention_heads,
            "num_layers": self.num_layers,
            "num_single_layers": self.num_single_layers,
            "patch_size": 1,
            "pooled_projection_dim": EMBED_DIM,
        }


# ----------------------------------------------------------------------------- data


@dataclass
class DigitsTrainingSet:
    """All real digits, encoded once: the whole set is a few hundred kB."""

    latents: torch.Tensor  # [N, 16, 4] packed pixels in [-1, 1]
    labels: torch.Tensor  # [N]
    caption_embeds: torch.Tensor  # [10, T, 384], row = digit
    caption_pooled: torch.Tensor  # [10, 384]
    empty_embeds: torch.Tensor  # [1, T, 384]
    empty_pooled: torch.Tensor  # [1, 384]


def digit_captions() -> List[str]:
    return [digit_caption(d) for d in range(len(DIGIT_WORDS))]


def digits_training_set(max_tokens: int) -> DigitsTrainingSet:
    images, labels = load_digits_arrays()
    embeds, pooled = encode_captions(digit_captions(), max_tokens)
    empty_embeds, empty_pooled = empty_caption_encoding(max_tokens)
    return DigitsTrainingSet(
        latents=pixels_to_latents(uint8_to_unit(images)),
        labels=torch.as_tensor(labels),
        caption_embeds=embeds,
        caption_pooled=pooled,
        empty_embeds=empty_embeds,
        empty_pooled=empty_pooled,
    )


def sample_batch(data: DigitsTrainingSet, cfg: PretrainConfig, gen: torch.Generator) -> FlowBatch:
    """A random batch with captions dropped to the empty caption at ``cfg.caption_dropout``."""
    idx = torch.randint(data.latents.shape[0], (cfg.batch_size,), generator=gen)
    labels = data.labels[idx]
    embeds = data.caption_embeds[labels]
    pooled = data.caption_pooled[labels]
    drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
    embeds[drop] = data.empty_embeds
    pooled[drop] = data.empty_pooled
    return FlowBatch(
        latents=data.latents[idx],
        prompt_embeds=embeds,
        pooled=pooled,
        img_ids=latent_image_ids(*GRID),
        txt_ids=torch.zeros(cfg.max_tokens, 3),
        guidance=torch.full((cfg.batch_size,), cfg.embedded_guidance) if cfg.guidance_embeds else None,
    )


# ----------------------------------------------------------------------------- training


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
    cfg.check()
    torch.manual_seed(cfg.seed)  # the model's initialisation
    model = build_flux(cfg.flux_config()).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    data = digits_training_set(cfg.max_tokens)
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
    import diffusers

    model.save_pretrained(str(out / "transformer"), safe_serialization=True)
    index = {
        "_class_name": "FluxPipeline",
        "_diffusers_version": diffusers.__version__,
        "transformer": ["diffusers", "FluxTransformer2DModel"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    card = {
        "preset": "digits",
        "text_encoder": TEXT_ENCODER_NAME,
        "pixels": "8x8 grayscale in [-1, 1] (uint8 / 127.5 - 1), packed 2x2 -> 16 tokens x 4 channels",
        "pretrain": dataclasses.asdict(cfg),
        **(extra or {}),
    }
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")


def load_pretrain_config(path: str | Path) -> PretrainConfig:
    """The :class:`PretrainConfig` a saved teacher was trained with (from its card)."""
    card = json.loads((Path(path) / CARD_FILE).read_text())
    return PretrainConfig(**card["pretrain"])


# ----------------------------------------------------------------------------- evaluation


def sample_digits(model: torch.nn.Module, labels: Sequence[int], sampler: SamplerConfig,
                  max_tokens: int) -> torch.Tensor:
    """Images ``[B, 8, 8]`` in (about) [-1, 1], one per prompted digit label."""
    embeds, pooled = encode_captions(digit_captions(), max_tokens)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    empty_embeds, empty_pooled = empty_caption_encoding(max_tokens)
    packed = euler_sample(
        model, embeds[labels], pooled[labels], grid=GRID, channels=LATENT_CHANNELS, cfg=sampler,
        uncond_embeds=empty_embeds, uncond_pooled=empty_pooled,
    )
    return latents_to_pixels(packed.cpu(), IMAGE_SIZE, IMAGE_SIZE)


def evaluate_teacher(model: torch.nn.Module, n_per_digit: int = 20, guidance_scale: float = 1.0, steps: int = 20,
                     seed: int = 0, *, max_tokens: int = 8, embedded_guidance: float = 1.0,
                     shift: bool = False) -> float:
    """Digit accuracy of ``n_per_digit`` samples of each digit (any model callable through call_flux)."""
    labels = torch.arange(len(DIGIT_WORDS)).repeat_interleave(n_per_digit)
    sampler = SamplerConfig(steps=steps, guidance_scale=guidance_scale, shift=shift,
                            embedded_guidance=embedded_guidance, seed=seed)
    was_training = model.training
    model.eval()
    try:
        images = sample_digits(model, labels, sampler, max_tokens)
    finally:
        model.train(was_training)
    return digit_accuracy(images, labels)


def pretrain_teacher(cfg: PretrainConfig, out: str | Path, eval_per_digit: int = 20,
                     eval_scales: Tuple[float, ...] = (1.0,)) -> Tuple[PretrainResult, Dict[str, float]]:
    """Train, evaluate the EMA teacher at each CFG scale, and save it with the numbers in its card."""
    result = pretrain(cfg)
    accuracy = {
        f"cfg{scale:g}": evaluate_teacher(result.ema, eval_per_digit, scale, max_tokens=cfg.max_tokens,
                                          embedded_guidance=cfg.embedded_guidance)
        for scale in eval_scales
    }
    save_teacher(result.ema, out, cfg, extra={
        "parameters": count_parameters(result.ema),
        "train_seconds": round(result.seconds, 1),
        "final_loss": sum(result.losses[-50:]) / len(result.losses[-50:]),
        "digit_accuracy": accuracy,
    })
    return result, accuracy
