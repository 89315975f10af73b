"""The digits preset's pipeline kind for ``d2m generate``: free-text prompts to the teacher task's images.

The pipeline folder is the digits teacher's (``d2m teacher --out``): its card says
how the teacher was trained and so how it must be sampled (caption length, the
constant its guidance embedding sees). Prompts are encoded by the preset's
offline MiniLM encoder; ``--guidance`` is the classifier-free guidance scale
(the toy teacher is not guidance-distilled; 1 means one conditional call per step),
the empty caption the unconditional branch, exactly as ``d2m sample`` draws.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from d2m_dist.config import ConfigError, Dtype, TeacherConfig
from d2m_dist.digits.card import is_digits_teacher, teacher_card
from d2m_dist.digits.draw import draw
from d2m_dist.digits.text_encoder import load_text_encoder
from d2m_dist.eval.generate_kinds import (
    GenerateRequest,
    ImageFn,
    PipelineKind,
    Settings,
    check_same_architecture,
)
from d2m_dist.models.flux import load_flux_config, load_teacher
from d2m_dist.models.flux_config import DTYPES
from d2m_dist.models.sampling import SamplerConfig, unit_to_uint8

DEFAULT_STEPS, DEFAULT_GUIDANCE = 20, 1.0  # d2m sample's defaults


def check_digits_pipeline(folder: Path, student: Dict, req: GenerateRequest) -> Settings:
    check_same_architecture(student, load_flux_config(folder), folder)
    side = teacher_card(folder).image_size
    for name in ("height", "width"):
        value = getattr(req, name)
        if value is not None and value != side:
            raise ConfigError(f"--{name} {value}: this digits teacher draws {side}x{side} images only")
    settings = Settings(DEFAULT_STEPS if req.steps is None else req.steps,
                        DEFAULT_GUIDANCE if req.guidance is None else req.guidance, side, side)
    if settings.steps < 1:
        raise ConfigError(f"--steps {settings.steps}: must be >= 1")
    return settings


def load_digits_pipeline(folder: Path, settings: Settings, device: torch.device, dtype: torch.dtype,
                         teacher_too: bool) -> Tuple[ImageFn, Optional[torch.nn.Module]]:
    card = teacher_card(folder)
    dtype_name = next(name for name, value in DTYPES.items() if value == dtype)
    teacher = load_teacher(TeacherConfig(path=str(folder), dtype=Dtype(dtype_name))).to(device) if teacher_too else None
    load_text_encoder()  # now, not inside the first image's timing (captions may come from a cache)

    @torch.inference_mode()
    def image(model: torch.nn.Module, prompt: str, seed: int) -> np.ndarray:
        sampler = SamplerConfig(steps=settings.steps, guidance_scale=settings.guidance,
                                embedded_guidance=card.embedded_guidance, seed=seed)
        pixels = unit_to_uint8(draw(model, [prompt], card, sampler))[0].permute(1, 2, 0).numpy()
        return np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels

    return image, teacher


DIGITS_KIND = PipelineKind("digits", is_digits_teacher, check_digits_pipeline, load_digits_pipeline)
