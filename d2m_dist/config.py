"""Typed configuration: omegaconf structured dataclasses, loading and validation.

Every command reads one of the top-level dataclasses below from a YAML file plus
``key=value`` overrides. The schema is strict: an unknown key, a value of the
wrong type or outside an option's allowed values (the :class:`Choice` enums) is
a :class:`ConfigError` with one line naming the key, raised before any work
starts; each dataclass's ``validate()`` then checks ranges and combinations the
same way. A YAML file may name a ``base:`` file (relative to itself) whose values
it overrides, so presets hold only what differs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional, Sequence, Type, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line.

    ``everywhere``: every rank raises this same error, having agreed on it through a collective,
    so one rank's report is enough. An error raised before the process group exists is the same
    on every rank without that (it depends only on the config and the files), and is treated so.
    """

    def __init__(self, message: str = "", *, everywhere: bool = False):
        super().__init__(message)
        self.everywhere = everywhere


class Choice(str, Enum):
    """An option's allowed values. Each member is named and valued by its own spelling, so it
    compares, hashes, formats and serialises as that string (``Dtype("bf16") == "bf16"``)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


def choices(name: str, *values: str) -> Any:
    """A :class:`Choice` enum named ``name`` whose members are ``values``."""
    return Choice(name, {v: v for v in values})  # type: ignore[call-overload]


Dtype = choices("Dtype", "fp32", "bf16", "fp16")
# where the frozen teacher lives: a full copy on every rank's device, ZeRO-3 shards over the
# ranks, or ZeRO-3 shards kept in host memory (offload_param) and streamed in per module
TeacherPlacement = choices("TeacherPlacement", "resident", "sharded", "offload")
SiteSelection = choices("SiteSelection", "all", "double", "single", "list")
MoBGate = choices("MoBGate", "straight_through", "score", "one")
PartitionStrategy = choices("PartitionStrategy", "taylor-contiguous", "taylor-roundrobin", "cluster", "random")
RouterInit = choices("RouterInit", "mean_w1", "normal")
Device = choices("Device", "auto", "cpu", "cuda")
Precision = choices("Precision", "auto", "fp32", "bf16")
LRDecay = choices("LRDecay", "cosine", "linear", "constant")
StreamMode = choices("StreamMode", "epoch", "resampled")


def check_positive(**values: float) -> None:
    for name, v in values.items():
        if not v > 0:
            raise ConfigError(f"{name} must be > 0, got {v}")


def check_non_negative(**values: float) -> None:
    for name, v in values.items():
        if v < 0:
            raise ConfigError(f"{name} must be >= 0, got {v}")


# ----------------------------------------------------------------------------- model side


@dataclass
class TeacherConfig:
    # A diffusers pipeline folder, its transformer/ subfolder, or a single-file
    # original checkpoint (flux1-dev.safetensors key layout).
    path: str = MISSING
    dtype: Dtype = Dtype("fp32")
    # Only for single-file checkpoints: a diffusers transformer config (folder or
    # config.json) that gives the architecture. Default: FLUX.1-dev's.
    config: Optional[str] = None
    # resident | sharded (ZeRO-3 over the ranks) | offload (ZeRO-3, parameters in host memory);
    # the same for stage-0 calibration and the training stages
    placement: TeacherPlacement = TeacherPlacement("resident")


@dataclass
class SiteOverride:
    # fnmatch pattern over site names: "double.3.ff", "double.*.ff_context", "single.1[0-9].mlp"
    sites: str = MISSING
    spec: str = MISSING


@dataclass
class MoEConfig:
    spec: str = "1S12E2A"
    # all | double | single | list (use double_blocks / single_blocks)
    sites: SiteSelection = SiteSelection("all")
    double_blocks: Optional[List[int]] = None
    single_blocks: Optional[List[int]] = None
    overrides: List[SiteOverride] = field(default_factory=list)
    # Renormalise the top-k softmax scores to sum to one (off: softmax over all
    # experts, then keep the top k, as in docs/METHOD.md, section 1).
    renormalize: bool = False
    z_loss_coeff: float = 0.0
    # None: dropless. A float c caps each expert at ceil(c * tokens * k / n) tokens.
    capacity_factor: Optional[float] = None

    def validate(self) -> None:
        check_non_negative(**{"moe.z_loss_coeff": self.z_loss_coeff})
        if self.capacity_factor is not None:
            check_positive(**{"moe.capacity_factor": self.capacity_factor})


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
    gate: MoBGate = MoBGate("straight_through")

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"mob.alpha: {self.alpha} not in [0, 1]")
        for stream in ("double", "single"):
            g = getattr(self, stream)
            if g is not None and g.m < 1:
                raise ConfigError(f"mob.{stream}: m={g.m} must be >= 1")
            if g is not None and not 1 <= g.kappa <= g.m:
                raise ConfigError(f"mob.{stream}: kappa={g.kappa} must lie in 1..m={g.m}")


# ----------------------------------------------------------------------------- stage 0


@dataclass
class CalibrationConfig:
    # random: Gaussian latents and text embeddings of the teacher's shapes (smoke runs);
    # shards: precomputed shards (d2m precompute) at ``urls``, read in a fixed order;
    # or a source a preset registers (digits: the embedded digits set, d2m_dist.digits)
    source: str = "random"
    urls: Optional[str] = None
    num_batches: int = 8
    batch_size: int = 4
    seed: int = 0
    # random source only: token counts (and, for random and shards, the guidance-embedding value)
    image_tokens: int = 16
    text_tokens: int = 8
    guidance: float = 3.5

    def validate(self) -> None:
        check_positive(**{"calibration.num_batches": self.num_batches, "calibration.batch_size": self.batch_size,
                     "calibration.image_tokens": self.image_tokens, "calibration.text_tokens": self.text_tokens})
        if self.source == "shards" and not self.urls:
            raise ConfigError("calibration.urls must name the precomputed shards when calibration.source=shards")


@dataclass
class PartitionConfig:
    strategy: PartitionStrategy = PartitionStrategy("taylor-contiguous")
    router_init: RouterInit = RouterInit("mean_w1")
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
    device: Device = Device("auto")
    overwrite: bool = False
    # also write the student as a diffusers folder (FluxMoETransformer2DModel) to <output>-diffusers
    export_diffusers: bool = False

    def validate(self) -> None:
        for part in (self.moe, self.mob, self.calibration):
            part.validate()
        check_positive(**{"partition.cluster_iters": self.partition.cluster_iters})


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
            layers += _file_layers(Path(path))
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


def unset_keys(schema: Type, path: str | Path, overrides: Sequence[str] = ()) -> List[str]:
    """The required keys (``???``) that ``path`` (with its ``base:`` chain) and ``overrides`` leave unset."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), *_file_layers(Path(path)),
                                 OmegaConf.from_dotlist([o for o in overrides if "=" in o]))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid config: {_one_line(exc)}") from None
    return sorted(OmegaConf.missing_keys(merged))


def _file_layers(path: Path, seen: Sequence[Path] = ()) -> List[DictConfig]:
    """``path``'s values after those of its ``base:`` chain (each base relative to the file naming it)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config {path}: its base: chain comes back to itself")
    layer = OmegaConf.load(path)
    base = layer.pop("base", None) if isinstance(layer, DictConfig) else None
    if base is None:
        return [layer]
    return _file_layers(path.parent / str(base), [*seen, path.resolve()]) + [layer]


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    """Plain containers (options as their strings), e.g. for JSON files and wandb."""
    if dataclasses.is_dataclass(cfg):
        return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)  # type: ignore
    return dict(cfg)


# ----------------------------------------------------------------------------- stages 1-3


@dataclass
class TrainDataConfig:
    # shards: precomputed webdataset shards (d2m precompute), streamed by d2m_dist.data.stream;
    # or a source a preset registers (digits: the embedded set, encoded in-process)
    source: str = "digits"
    urls: Optional[str] = None
    batch_size: int = 16  # per rank, per micro-step
    num_workers: int = 0
    seed: int = 0
    # shards: epoch (each sample once per epoch; a resume in another layout shares out the rest of the
    # epoch exactly) | resampled (shards drawn with replacement, no epochs)
    mode: StreamMode = StreamMode("epoch")
    # value fed to the guidance embedding; None: the digits teacher's card, else 3.5 (FLUX.1-dev)
    guidance: Optional[float] = None
    # the run stops (one line, exit 2) when more than this share of the samples read so far, over all
    # ranks, were skipped as bad input; checked at every log step once skip_check_after samples were read
    max_skipped_fraction: float = 0.05
    skip_check_after: int = 256


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    decay: LRDecay = LRDecay("cosine")  # after warmup
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1


@dataclass
class ParallelConfig:
    # ranks one MoE layer's experts are split over; 0: the largest that divides the world size and
    # every site's expert count (1 under ZeRO-3), so a job requeued on another node count still starts
    ep_size: int = 1
    # ZeRO stage of the student; None: the stage's recipe (3 for stage 1, 2 with experts)
    zero_stage: Optional[int] = None


@dataclass
class CheckpointConfig:
    every: int = 100  # steps; 0: only at the end and on signals
    keep: int = 3
    # a fresh stage (no checkpoint yet) whose init folder is a `d2m ckpt export --optimizer` folder
    # continues its training state (Adam moments, counters, scheduler, data position), on any layout
    init_state: bool = False


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
    # student folder; None: the previous stage's output in run_dir (<run_dir>/stage0 for stage 1,
    # <run_dir>/stage<N-1>/export after it)
    init: Optional[str] = None
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
    # also write the export as a diffusers folder (FluxMoETransformer2DModel, FluxPipeline's transformer)
    # to <run_dir>/stage<N>/export-diffusers
    export_diffusers: bool = False
    max_bad_steps: int = 5  # NaN/inf losses in a row before a diagnostic checkpoint and exit
    precision: Precision = Precision("auto")  # auto: bf16 on GPU, fp32 on CPU
    device: Device = Device("auto")

    def validate(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ConfigError(f"stage: {self.stage} is not 1, 2 or 3")
        if self.init is None:
            self.init = str(Path(self.run_dir) / ("stage0" if self.stage == 1 else f"stage{self.stage - 1}/export"))
        o = self.optim
        check_positive(steps=self.steps, **{"optim.lr": o.lr, "optim.grad_accum": o.grad_accum,
                                       "data.batch_size": self.data.batch_size,
                                       "max_bad_steps": self.max_bad_steps})
        check_non_negative(**{"parallel.ep_size": self.parallel.ep_size,
                         "optim.weight_decay": o.weight_decay, "optim.warmup_steps": o.warmup_steps,
                         "optim.grad_clip": o.grad_clip, "optim.min_lr_ratio": o.min_lr_ratio,
                         "data.num_workers": self.data.num_workers, "ckpt.every": self.ckpt.every,
                         "log.sample_every": self.log.sample_every, "log.fixed_batches": self.log.fixed_batches})
        check_positive(**{"ckpt.keep": self.ckpt.keep, "log.every": self.log.every, "log.sample_steps": self.log.sample_steps})
        for name, beta in (("optim.beta1", o.beta1), ("optim.beta2", o.beta2)):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {beta}")
        if self.ema.enabled and not 0.0 < self.ema.decay < 1.0:
            raise ConfigError(f"ema.decay must be in (0, 1), got {self.ema.decay}")
        if not 0.0 <= self.data.max_skipped_fraction <= 1.0:
            raise ConfigError(f"data.max_skipped_fraction must be in [0, 1], got {self.data.max_skipped_fraction}")
        check_non_negative(**{"data.skip_check_after": self.data.skip_check_after})
        if self.data.source == "shards" and not self.data.urls:
            raise ConfigError("data.urls must name the shards when data.source=shards")
        if self.mob.enabled:
            self.mob.validate()
