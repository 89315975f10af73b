"""Families of teachers that need more from the trainer than their FLUX config says.

A preset registers a :class:`TeacherKind` (the digits preset: :mod:`d2m_dist.digits`):
whether a teacher folder is of its kind, the guidance value its training batches
carry, and how its teacher/student sample grid is drawn and scored. A teacher of
no registered kind (a FLUX.1 checkpoint) gets the defaults: guidance 3.5 (FLUX.1
[dev]'s usual value) and the VAE-decoded grid of latent presets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Dict, List, Optional

from torch import nn

DEFAULT_GUIDANCE = 3.5


@dataclass(frozen=True)
class GridRequest:
    """One sample grid: teacher and student from the same noise (collective: every rank samples)."""

    teacher_path: str
    teacher: nn.Module
    student: nn.Module
    count: int  # samples asked for (log.sample_count)
    steps: int  # Euler steps
    out: Path  # the PNG, written by the main rank
    is_main: bool
    autocast: Callable[[], ContextManager]


@dataclass(frozen=True)
class TeacherKind:
    name: str
    matches: Callable[[str], bool]  # teacher path -> whether it is of this kind
    embedded_guidance: Callable[[str], Optional[float]]  # the value its batches feed the guidance embedding
    sample_grid: Callable[[GridRequest], Dict[str, float]]  # writes request.out (main rank); returns metrics


KINDS: List[TeacherKind] = []


def register_teacher_kind(kind: TeacherKind) -> None:
    KINDS[:] = [k for k in KINDS if k.name != kind.name] + [kind]


def teacher_kind(teacher_path: str) -> Optional[TeacherKind]:
    return next((k for k in KINDS if k.matches(str(teacher_path))), None)


def default_guidance(teacher_path: str) -> Optional[float]:
    kind = teacher_kind(teacher_path)
    return kind.embedded_guidance(teacher_path) if kind is not None else DEFAULT_GUIDANCE
