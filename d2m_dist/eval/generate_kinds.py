"""What ``d2m generate`` asks of a pipeline folder: the request, the resolved settings, a pipeline kind.

A kind knows one family of pipeline folders: whether a folder is of it, whether
a student can run in it (from configs alone), and how a prompt and a seed become
an image. FLUX pipeline folders are built in (:mod:`d2m_dist.eval.flux_generate`);
a preset registers its own with :func:`register_pipeline_kind`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from d2m_dist.config import ConfigError


@dataclass
class GenerateRequest:
    student: str
    pipeline: str
    prompts: List[str]
    out: str
    seed: int = 0
    steps: Optional[int] = None  # None: the pipeline kind's default
    guidance: Optional[float] = None
    height: Optional[int] = None
    width: Optional[int] = None
    top_k: Optional[int] = None  # None: each site's spec k
    mob_kappa: Optional[int] = None  # None: each group's kappa
    teacher_too: bool = False
    dtype: Optional[str] = None  # None: bf16 on a GPU, fp32 on the CPU
    overwrite: bool = False


@dataclass(frozen=True)
class Settings:
    """What every image of one run shares (the kind's defaults filled in), written to the JSON."""

    steps: int
    guidance: float
    height: int
    width: int


# (model, prompt, seed) -> uint8 [H, W, 3]
ImageFn = Callable[[torch.nn.Module, str, int], np.ndarray]


@dataclass(frozen=True)
class PipelineKind:
    name: str
    matches: Callable[[Path], bool]
    # (folder, the student's FLUX config, request) -> settings; a ConfigError when the folder lacks a part
    # or the student cannot run in it. Reads configs only: no weight is loaded.
    check: Callable[[Path, Dict, GenerateRequest], Settings]
    # (folder, settings, device, dtype, teacher too) -> (image function, the teacher or None)
    load: Callable[[Path, Settings, torch.device, torch.dtype, bool], Tuple[ImageFn, Optional[torch.nn.Module]]]


KINDS: List[PipelineKind] = []


def register_pipeline_kind(kind: PipelineKind) -> None:
    KINDS[:] = [k for k in KINDS if k.name != kind.name] + [kind]


def check_same_architecture(student: Dict, teacher: Dict, where: Path) -> None:
    """The student was converted from a FLUX of ``teacher``'s architecture (every FLUX config key equal)."""
    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    differ = sorted(k for k in student if not k.startswith("_") and k in teacher
                    and norm(student[k]) != norm(teacher[k]))
    if differ:
        k = differ[0]
        raise ConfigError(f"pipeline {where}: the student was converted from another FLUX architecture "
                          f"({k} {student[k]} here {teacher[k]}; {len(differ)} keys differ)")


def check_size(settings: Settings, multiple: int, why: str) -> None:
    for side in ("height", "width"):
        value = getattr(settings, side)
        if value < multiple or value % multiple:
            raise ConfigError(f"--{side} {value}: must be a positive multiple of {multiple} ({why})")
