"""Typed configuration: omegaconf structured dataclasses, loading and validation.

Every command reads one of the top-level dataclasses below from a YAML file plus
``key=value`` overrides. The schema is strict: an unknown key or a value of the
wrong type is a :class:`ConfigError` with one line naming the key, raised before
any work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Type, TypeVar

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


# ----------------------------------------------------------------------------- model side


@dataclass
class TeacherConfig:
    # A diffusers pipeline folder, its transformer/ subfolder, or a single-file
    # original checkpoint (flux1-dev.safetensors key layout).
    path: str = MISSING
    dtype: str = "fp32"  # fp32 | bf16
    # Only for single-file checkpoints: a diffusers transformer config (folder or
    # config.json) that gives the architecture. Default: FLUX.1-dev's.
    config: Optional[str] = None


@dataclass
class SiteOverride:
    # fnmatch pattern over site names: "double.3.ff", "double.*.ff_context", "single.1[0-9].mlp"
    sites: str = MISSING
    spec: str = MISSING


@dataclass
class MoEConfig:
    spec: str = "1S12E2A"
    # all | double | single | list (use double_blocks / single_blocks)
    sites: str = "all"
    double_blocks: Optional[List[int]] = None
    single_blocks: Optional[List[int]] = None
    overrides: List[SiteOverride] = field(default_factory=list)
    # Renormalise the top-k softmax scores to sum to one (off: softmax over all
    # experts, then keep the top k, as in METHOD.md).
    renormalize: bool = False
    z_loss_coeff: float = 0.0
    # None: dropless. A float c caps each expert at ceil(c * tokens * k / n) tokens.
    capacity_factor: Optional[float] = None


@dataclass
class MoBGroupConfig:
    first: int = 0  # first block of the grouped range
    last: int = -1  # last block (inclusive); -1: the last block of the stream
    m: int = 2  # blocks per group
    kappa: int = 1  # active blocks per group, per sample


@dataclass
class MoBConfig:
    enabled: bool = False
    double: Optional[MoBGroupConfig] = None
    single: Optional[MoBGroupConfig] = None
    alpha: float = 0.5  # router input mix: alpha * W_x pooled features + (1 - alpha) * W_y temb
    # straight_through: selected blocks run with gate 1 in value, router score in gradient;
    # score: h + g * (f(h) - h) with g the router score; one: hard gate, router gets no gradient
    gate: str = "straight_through"


# ----------------------------------------------------------------------------- stage 0


@dataclass
class CalibrationConfig:
    # random: Gaussian latents and text embeddings of the teacher's shapes (smoke runs);
    # digits: the embedded digits set encoded by the offline text encoder.
    source: str = "random"
    num_batches: int = 8
    batch_size: int = 4
    seed: int = 0
    # random source only: token counts
    image_tokens: int = 16
    text_tokens: int = 8
    guidance: float = 3.5


@dataclass
class PartitionConfig:
    # taylor-contiguous | taylor-roundrobin | cluster | random
    strategy: str = "taylor-contiguous"
    # mean_w1 | zeros | normal
    router_init: str = "mean_w1"
    seed: int = 0
    cluster_iters: int = 20


@dataclass
class ConvertConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mob: MoBConfig = field(default_factory=MoBConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    output: str = MISSING
    device: str = "auto"  # auto | cpu | cuda
    overwrite: bool = False


# ----------------------------------------------------------------------------- loading


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    head = text[0] if text else type(exc).__name__
    key = getattr(exc, "full_key", None)
    if key and key not in head:
        head = f"{key}: {head}"
    return head


def load_config(schema: Type[T], path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> T:
    """Build a ``schema`` instance from a YAML file and ``key=value`` overrides.

    Raises :class:`ConfigError` (one line) for a missing file, unknown keys,
    wrong types or required values left unset.
    """
    base = OmegaConf.structured(schema)
    OmegaConf.set_struct(base, True)
    try:
        layers = [base]
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file not found: {p}")
            layers.append(OmegaConf.load(p))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' is not of the form key=value")
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"required config value not set: {', '.join(missing)}")
        obj = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid config: {_one_line(exc)}") from None
    except Exception as exc:  # yaml syntax errors and the like
        raise ConfigError(f"invalid config {path}: {_one_line(exc)}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    if dataclasses.is_dataclass(cfg):
        return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: '{value}' is not one of {', '.join(allowed)}")
