"""The FLUX pipeline kind of ``d2m generate``: diffusers' ``FluxPipeline`` with the student as its transformer.

A FLUX pipeline folder (FLUX.1-dev's layout) holds ``model_index.json``, ``vae/``,
``text_encoder/`` (CLIP), ``text_encoder_2/`` (T5), both tokenizers and
``scheduler/``; ``transformer/`` (the dense teacher) is needed only for
``--teacher-too``, and its config, when present, must be the architecture the
student was converted from. The student must also fit the pipeline's parts: its
text widths are T5's and CLIP's, its input channels four VAE latent channels
(FLUX packs 2x2 latents into a token).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from d2m_dist.config import ConfigError
from d2m_dist.eval.generate_kinds import (
    GenerateRequest,
    ImageFn,
    PipelineKind,
    Settings,
    check_same_architecture,
    check_size,
)

PARTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
# FluxPipeline's own defaults (FLUX.1-dev's model card uses the same)
DEFAULTS = Settings(steps=28, guidance=3.5, height=1024, width=1024)


def _config(path: Path) -> Dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"pipeline {path.parent.parent}: {path.parent.name}/{path.name} missing or unreadable") from None


def is_flux_pipeline(folder: Path) -> bool:
    index = folder / "model_index.json"
    try:
        return index.is_file() and json.loads(index.read_text()).get("_class_name") == "FluxPipeline"
    except (OSError, ValueError):
        return False


WEIGHTED = ("vae", "text_encoder", "text_encoder_2")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model")


def check_flux_pipeline(folder: Path, student: Dict, req: GenerateRequest) -> Settings:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"pipeline {folder}: no model_index.json (not a diffusers pipeline folder)")
    name = _config(index).get("_class_name")
    if name != "FluxPipeline":
        raise ConfigError(f"pipeline {folder}: model_index.json names {name!r}, not FluxPipeline")
    missing = [p for p in PARTS if not (folder / p).is_dir()]
    if missing:
        raise ConfigError(f"pipeline {folder}: no {', '.join(m + '/' for m in missing)} (a FLUX pipeline needs "
                          f"{', '.join(p + '/' for p in PARTS)})")
    # the parts' files, so that a folder with their configs only fails here, in one line, not mid-load
    for part in WEIGHTED:
        if not any(f.name.endswith(WEIGHT_SUFFIXES) for f in (folder / part).iterdir()):
            raise ConfigError(f"pipeline {folder}: {part}/ holds no weights (*.safetensors or *.bin)")
    for part in ("tokenizer", "tokenizer_2"):
        if not any((folder / part / f).is_file() for f in TOKENIZER_FILES):
            raise ConfigError(f"pipeline {folder}: {part}/ holds no tokenizer ({', '.join(TOKENIZER_FILES)})")
    if req.teacher_too and not any(f.name.endswith(WEIGHT_SUFFIXES) for f in (folder / "transformer").glob("*")):
        raise ConfigError(f"pipeline {folder}: --teacher-too needs the teacher's weights in transformer/")
    vae, clip, t5 = (_config(folder / p / "config.json") for p in ("vae", "text_encoder", "text_encoder_2"))
    wants = {
        "joint_attention_dim": ("text_encoder_2 (T5) width", t5.get("d_model")),
        "pooled_projection_dim": ("text_encoder (CLIP) width", clip.get("hidden_size")),
        "in_channels": ("4 x the VAE's latent channels", 4 * int(vae.get("latent_channels", 0))),
    }
    for key, (what, value) in wants.items():
        if student.get(key) != value:
            raise ConfigError(f"pipeline {folder}: the student's {key} is {student.get(key)}, the pipeline's {what} "
                              f"is {value}: the student was not made for this pipeline")
    teacher_config = folder / "transformer" / "config.json"
    if teacher_config.is_file():
        check_same_architecture(student, _config(teacher_config), folder)
    elif req.teacher_too:
        raise ConfigError(f"pipeline {folder}: --teacher-too needs the teacher in transformer/, which is missing")
    settings = Settings(
        steps=DEFAULTS.steps if req.steps is None else req.steps,
        guidance=DEFAULTS.guidance if req.guidance is None else req.guidance,
        height=DEFAULTS.height if req.height is None else req.height,
        width=DEFAULTS.width if req.width is None else req.width,
    )
    if settings.steps < 1:
        raise ConfigError(f"--steps {settings.steps}: must be >= 1")
    # the VAE halves the image per level after the first, and FLUX packs 2x2 latents into a token
    check_size(settings, 2 * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1),
               "the VAE's downsampling times FLUX's 2x2 latent packing")
    return settings


def load_flux_pipeline(folder: Path, settings: Settings, device: torch.device, dtype: torch.dtype,
                       teacher_too: bool) -> Tuple[ImageFn, Optional[torch.nn.Module]]:
    # lazy: diffusers' pipelines import transformers' text models (seconds); training never needs them
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from diffusers.utils import logging as diffusers_logging  # lazy: with the pipeline above

    diffusers_logging.disable_progress_bar()  # loading bars would bury the one line an error prints
    try:
        pipe = FluxPipeline.from_pretrained(str(folder), transformer=None, dtype=dtype)
        teacher = FluxTransformer2DModel.from_pretrained(str(folder / "transformer"), dtype=dtype) \
            if teacher_too else None
    except (OSError, ValueError, RuntimeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ConfigError(f"pipeline {folder}: cannot load it ({lines[0] if lines else type(exc).__name__})") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)

    @torch.inference_mode()
    def image(model: torch.nn.Module, prompt: str, seed: int) -> np.ndarray:
        pipe.transformer = model
        # drawn on the CPU: the same noise on any device
        generator = torch.Generator("cpu").manual_seed(seed)
        out = pipe(prompt, height=settings.height, width=settings.width, num_inference_steps=settings.steps,
                   guidance_scale=settings.guidance, generator=generator, output_type="np")
        return (out.images[0] * 255).round().clip(0, 255).astype(np.uint8)

    return image, teacher


FLUX_KIND = PipelineKind("flux", is_flux_pipeline, check_flux_pipeline, load_flux_pipeline)
