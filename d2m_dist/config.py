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
    # experts, then keep the top k, as in docs/METHOD.md, section 1).
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
    # digits: the embedded digits set encoded by the offline text encoder;
    # shards: precomputed shards (d2m precompute) at ``urls``, read in a fixed order.
    source: str = "random"
    urls: Optional[str] = None
    num_batches: int = 8
    batch_size: int = 4
    seed: int = 0
    # random source only: token counts (and, for random and shards, the guidance-embedding value)
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
    # Taylor calibration with the teacher as a DeepSpeed ZeRO-3 engine (weights sharded over
    # ranks, optionally offloaded to CPU) so that FLUX.1-dev fits; the surgery then reads the
    # teacher from disk on rank 0
    teacher_zero3: bool = False
    teacher_offload: bool = False


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


# ----------------------------------------------------------------------------- stages 1-3


@dataclass
class TrainDataConfig:
    # digits: the embedded set, encoded in-process (captions through the offline text encoder);
    # shards: precomputed webdataset shards (d2m precompute), streamed by d2m_dist.data.stream
    source: str = "digits"
    urls: Optional[str] = None
    batch_size: int = 16  # per rank, per micro-step
    num_workers: int = 0
    seed: int = 0
    # value fed to the guidance embedding; None: the digits teacher's card, else 3.5 (FLUX.1-dev)
    guidance: Optional[float] = None


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    decay: str = "cosine"  # cosine | linear | constant, after warmup
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1


@dataclass
class ParallelConfig:
    ep_size: int = 1
    # ZeRO stage of the student; None: 3 for stage 1 (no routed experts), 2 with experts
    zero_stage: Optional[int] = None
    # the frozen teacher: plain (replicated) or a ZeRO-3 inference engine
    teacher_zero3: bool = False
    teacher_offload: bool = False  # ZeRO-3 offload_param to CPU


@dataclass
class CheckpointConfig:
    every: int = 100  # steps; 0: only at the end and on signals
    keep: int = 3


@dataclass
class LogConfig:
    every: int = 10
    wandb: bool = True
    project: str = "d2m"
    sample_every: int = 0  # teacher/student sample grid every N steps (0: only at the end)
    sample_count: int = 10  # digits: images per digit = count // 10; VAE presets: prompts from the shards
    sample_steps: int = 20  # Euler steps per sample
    # the stage's loss on this many fixed batches (per rank) before the first and after the last
    # step, in summary.json: the same batches and noise at both ends, so the change is the training's
    fixed_batches: int = 4
    # VAE that decodes the grid of a latent-space preset; None: vae/ in the teacher's pipeline folder
    sample_vae: Optional[str] = None
    progress: bool = True


@dataclass
class LossConfig:
    # None: the stage's recipe (d2m_dist/distill/stages.py): output and block features in
    # stages 1-2, load balance 1e-2 in stage 2, the MoB group feature loss alone in stage 3
    output: Optional[float] = None
    feature: Optional[float] = None
    balance: Optional[float] = None
    group: Optional[float] = None


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.999  # per optimizer step
    # the stage's export (the next stage's init) holds the average rather than the last weights
    export: bool = True


@dataclass
class StageConfig:
    stage: int = MISSING  # 1 | 2 | 3
    run_dir: str = MISSING  # runs/<name>; this stage writes <run_dir>/stage<N>/
    init: str = MISSING  # student folder: stage-0 output or the previous stage's export
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    steps: int = 100
    seed: int = 0
    # parameter groups that train; empty: the stage's default
    # (1: shared experts and output biases; 2: routed experts and routers; 3: MoB routers)
    trainable: List[str] = field(default_factory=list)
    # active routed experts at every site; None: the stage's recipe (stage 1: 0, the shared
    # expert alone; later stages: each site's own spec k, so per-site overrides hold)
    top_k: Optional[int] = None
    mob: MoBConfig = field(default_factory=MoBConfig)  # stage 3: groups to add if the student has none
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    max_bad_steps: int = 5  # NaN/inf losses in a row before a diagnostic checkpoint and exit
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    device: str = "auto"

    def validate(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ConfigError(f"stage: {self.stage} is not 1, 2 or 3")
        choice("precision", self.precision, ("auto", "fp32", "bf16"))
        choice("data.source", self.data.source, ("digits", "shards"))
        choice("optim.decay", self.optim.decay, ("cosine", "linear", "constant"))
        if self.steps < 1:
            raise ConfigError("steps must be >= 1")
        if self.ema.enabled and not 0.0 < self.ema.decay < 1.0:
            raise ConfigError(f"ema.decay must be in (0, 1), got {self.ema.decay}")
        if self.parallel.ep_size < 1:
            raise ConfigError("parallel.ep_size must be >= 1")
        if self.data.source == "shards" and not self.data.urls:
            raise ConfigError("data.urls must name the shards when data.source=shards")
