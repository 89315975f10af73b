"""The digits teacher's card: how it was trained, and so how it must be fed.

:class:`PretrainConfig` is both the training config of ``d2m teacher`` and the
card written beside the saved teacher (``d2m_teacher.json``): caption length,
caption dropout, the constant fed to the guidance embedding, the timestep shift.
Calibration, training batches and evaluation read it back, so every consumer
draws inputs exactly as the teacher saw them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

from d2m_dist.config import ConfigError, check_non_negative, check_positive
from d2m_dist.digits.text_encoder import EMBED_DIM

CARD_FILE = "d2m_teacher.json"  # how the teacher was trained and must be called
# What a teacher draws: "digits", one grey 8x8 digit per caption ("a handwritten digit seven");
# "digiteval", a 16x16 RGB canvas of four 8x8 slots (:mod:`d2m_dist.digits.digiteval`).
TASKS = {"digits": (8, 1), "digiteval": (16, 3)}  # task -> (pixels per side, pixel channels)


@dataclass
class PretrainConfig:
    task: str = "digits"  # a key of TASKS
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
    # the classifier-free guidance scale evaluations report beside unguided sampling (d2m eval)
    sample_guidance: float = 2.0
    progress: bool = True

    @property
    def image_size(self) -> int:
        """Pixels per side of what the teacher draws."""
        return TASKS[self.task][0]

    @property
    def pixel_channels(self) -> int:
        return TASKS[self.task][1]

    @property
    def grid(self) -> Tuple[int, int]:
        """The packed token grid: 2x2 pixel patches."""
        return self.image_size // 2, self.image_size // 2

    @property
    def latent_channels(self) -> int:
        """Channels per token: the pixel channels of a 2x2 patch."""
        return 4 * self.pixel_channels

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task {self.task!r}: must be one of {sorted(TASKS)}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ConfigError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                              f"{self.attention_head_dim}")
        if any(a % 2 for a in self.axes_dims_rope):
            raise ConfigError(f"axes_dims_rope {self.axes_dims_rope}: every axis needs an even width")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        check_positive(steps=self.steps, batch_size=self.batch_size, lr=self.lr, grad_clip=self.grad_clip,
                       num_attention_heads=self.num_attention_heads, attention_head_dim=self.attention_head_dim,
                       max_tokens=self.max_tokens)
        check_non_negative(warmup_steps=self.warmup_steps, weight_decay=self.weight_decay,
                           num_layers=self.num_layers, num_single_layers=self.num_single_layers)
        if self.num_layers + self.num_single_layers < 1:
            raise ConfigError("num_layers + num_single_layers must be >= 1")
        if self.sample_guidance < 1.0:
            raise ConfigError(f"sample_guidance must be >= 1, got {self.sample_guidance}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in (0, 1), got {self.ema_decay}")

    def flux_config(self) -> Dict:
        """The diffusers ``FluxTransformer2DModel`` config of this teacher."""
        return {
            "_class_name": "FluxTransformer2DModel",
            "attention_head_dim": self.attention_head_dim,
            "axes_dims_rope": list(self.axes_dims_rope),
            "guidance_embeds": self.guidance_embeds,
            "in_channels": self.latent_channels,
            "joint_attention_dim": EMBED_DIM,
            "num_attention_heads": self.num_attention_heads,
            "num_layers": self.num_layers,
            "num_single_layers": self.num_single_layers,
            "patch_size": 1,
            "pooled_projection_dim": EMBED_DIM,
        }


def load_pretrain_config(path: str | Path) -> PretrainConfig:
    """The :class:`PretrainConfig` a saved teacher was trained with (from its card)."""
    card = json.loads((Path(path) / CARD_FILE).read_text())
    return PretrainConfig(**card["pretrain"])


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
