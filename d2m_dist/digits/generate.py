"""The digits preset's pipeline kind for ``d2m generate``: free-text prompts to 8x8 digits.

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
from d2m_dist.digits.card import GRID, IMAGE_SIZE, LATENT_CHANNELS, is_digits_teacher, teacher_card
from d2m_dist.digits.text_encoder import empty_caption_encoding, encode_captions, load_text_encoder
from d2m_dist.eval.generate_kinds import (
    GenerateRequest,
    ImageFn,
    PipelineKind,
    Settings,
    check_same_architecture,
)
from d2m_dist.models.flux import load_flux_config, load_teacher
from d2m_dist.models.flux_config import DTYPES
from d2m_dist.models.sampling import SamplerConfig, euler_sample, latents_to_pixels, unit_to_uint8

DEFAULTS = Settings(steps=20, guidance=1.0, height=IMAGE_SIZE, width=IMAGE_SIZE)  # d2m sample's defaults


def check_digits_pipeline(folder: Path, student: Dict, req: GenerateRequest) -> Settings:
    check_same_architecture(student, load_flux_config(folder), folder)
    for side in ("height", "width"):
        value = getattr(req, side)
        if value is not None and value != IMAGE_SIZE:
            raise ConfigError(f"--{side} {value}: the digits teacher draws {IMAGE_SIZE}x{IMAGE_SIZE} images only")
    settings = Settings(DEFAULTS.steps if req.steps is None else req.steps,
                        DEFAULTS.guidance if req.guidance is None else req.guidance, IMAGE_SIZE, IMAGE_SIZE)
    if settings.steps < 1:
        raise ConfigError(f"--steps {settings.steps}: must be >= 1")
    return settings


def load_digits_pipeline(folder: Path, settings: Settings, device: torch.device, dtype: torch.dtype,
                         teacher_too: bool) -> Tuple[ImageFn, Optional[torch.nn.Module]]:
    card = teacher_card(folder)
    dtype_name = next(name for name, value in DTYPES.items() if value == dtype)
    teacher = load_teacher(TeacherConfig(path=str(folder), dtype=Dtype(dtype_name))).to(device) if teacher_too else None
    empty = empty_caption_encoding(card.max_tokens)
    load_text_encoder()  # now, not inside the first image's timing (the empty caption may come from a cache)

    @torch.inference_mode()
    def image(model: torch.nn.Module, prompt: str, seed: int) -> np.ndarray:
        embeds, pooled = encode_captions([prompt], card.max_tokens)
        sampler = SamplerConfig(steps=settings.steps, guidance_scale=settings.guidance,
                                embedded_guidance=card.embedded_guidance, seed=seed)
        packed = euler_sample(model, embeds, pooled, grid=GRID, channels=LATENT_CHANNELS, cfg=sampler,
                              uncond_embeds=empty[0], uncond_pooled=empty[1])
        grey = unit_to_uint8(latents_to_pixels(packed.cpu(), IMAGE_SIZE, IMAGE_SIZE))[0].numpy()
        return np.repeat(grey[:, :, None], 3, axis=2)

    return image, teacher


DIGITS_KIND = PipelineKind("digits", is_digits_teacher, check_digits_pipeline, load_digits_pipeline)
