"""What a planned stage trains: the student and teacher built on the meta device, the stage recipe applied.

``--config`` names a preset folder (``configs/presets/flux-dev-moe-l``: its
``stage0.yaml`` gives the student's architecture, ``stage<N>.yaml`` the stage) or a
stage file (the architecture then comes from ``stage0.yaml`` beside it). Values a
plan does not read and a preset leaves unset (``???``: the data, the run folder)
get placeholders; an unset teacher path means FLUX.1-dev's architecture
(``meta:flux1-dev``). Only configs are read; nothing is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from torch import nn

from d2m_dist.config import ConfigError, ConvertConfig, StageConfig, load_config, unset_keys
from d2m_dist.distill.stages import StageRecipe, apply_recipe_to_student, stage_recipe
from d2m_dist.models.flux import build_flux, load_flux_config
from d2m_dist.models.mob import apply_mob, mob_groups
from d2m_dist.models.moe import moe_layers
from d2m_dist.models.spec import select_sites
from d2m_dist.models.surgery import convert_to_moe
from d2m_dist.plan.activations import activation_estimate, build_twin
from d2m_dist.plan.memory import Param

DEFAULT_TEACHER = "meta:flux1-dev"
# DeepSpeed's LOWER_PRECISION_SAFE_MODULES: their parameters' gradients travel in bf16 under autocast
LINEAR_CLASSES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# what a plan never reads, filled only where the files leave it unset
PLACEHOLDERS = {"teacher.path": DEFAULT_TEACHER, "run_dir": "plan", "output": "plan"}


@dataclass
class PlannedStage:
    convert: ConvertConfig
    stage: StageConfig
    recipe: StageRecipe
    student: nn.Module  # meta device, every expert, the recipe applied (trainable flags, top-k, MoB mode)
    teacher: nn.Module  # meta device
    teacher_config: Dict
    _twin: Optional[nn.Module] = field(default=None, repr=False)  # built when activations are first asked for
    _activations: Dict = field(default_factory=dict, repr=False)

    def params(self, ep: int) -> List[Param]:
        """The student's parameters as a rank of an ``ep``-way expert-parallel group holds them."""
        experts = {id(p) for _, layer in moe_layers(self.student) for p in layer.experts.parameters()}
        linear = {id(p) for m in self.student.modules() if type(m) in LINEAR_CLASSES
                  for p in m.parameters(recurse=False)}
        return [Param(name, p.numel() // (ep if id(p) in experts else 1), id(p) in experts, p.requires_grad,
                      id(p) in linear) for name, p in self.student.named_parameters()]

    def teacher_numels(self) -> List[int]:
        return [p.numel() for p in self.teacher.parameters()]

    def expert_counts(self) -> List[int]:
        return [layer.num_experts for _, layer in moe_layers(self.student)]

    def feature_blocks(self) -> int:
        """Teacher block outputs the stage's loss keeps: every block (feature loss), or each MoB group's last."""
        if self.recipe.losses.feature:
            return len(self.teacher.transformer_blocks) + len(self.teacher.single_transformer_blocks)
        return len(mob_groups(self.student)) if self.recipe.losses.group else 0

    @property
    def bf16(self) -> bool:
        """Whether the stage trains under bf16 autocast on GPUs (precision auto or bf16)."""
        return self.stage.precision != "fp32"

    @property
    def teacher_bytes(self) -> int:
        return 4 if self.stage.teacher.dtype == "fp32" else 2

    def activations(self, image_tokens: int, text_tokens: int, batch: int, ep: int,
                    bf16: Optional[bool] = None) -> Dict[str, Dict[str, int]]:
        bf16 = self.bf16 if bf16 is None else bf16
        key = (image_tokens, text_tokens, batch, ep, bf16)
        if key not in self._activations:
            if self._twin is None:
                self._twin = build_twin(self.teacher_config, self.convert, self.stage, self.recipe)
            self._activations[key] = activation_estimate(
                self._twin, self.student, self.teacher_config, image_tokens, text_tokens, batch, ep, bf16,
                self.teacher_bytes, self.feature_blocks())
        return self._activations[key]


def _files(config: str, stage: int) -> Tuple[Path, Path]:
    p = Path(config)
    if p.is_dir():
        return p / "stage0.yaml", p / f"stage{stage}.yaml"
    if p.is_file():
        return p.parent / "stage0.yaml", p
    raise ConfigError(f"--config {config}: neither a preset folder nor a config file")


def _load(schema, path: Path, overrides: Sequence[str]):
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    unset = set(unset_keys(schema, path, overrides))
    return load_config(schema, path, [*overrides, *(f"{k}={v}" for k, v in PLACEHOLDERS.items() if k in unset)])


def plan_inputs(config: str, stage: int = 2, overrides: Sequence[str] = ()) -> PlannedStage:
    """The stage ``config`` describes, built on the meta device."""
    stage0_file, stage_file = _files(config, stage)
    # calibration never matters to a plan: the random source needs no shards
    convert = _load(ConvertConfig, stage0_file,
                    [*(o for o in overrides if o.startswith("teacher.path=")), "calibration.source=random"])
    # nor the data's location: a stage file may leave it to the command line
    cfg = _load(StageConfig, stage_file, [*overrides, "data.urls=unused"])
    teacher_path = cfg.teacher.path if cfg.teacher.path != DEFAULT_TEACHER else convert.teacher.path
    teacher_config = load_flux_config(teacher_path)
    recipe = stage_recipe(cfg)
    student = build_flux(teacher_config, meta=True)
    c = student.config
    convert_to_moe(student, select_sites(convert.moe, c.num_layers, c.num_single_layers), convert.moe)
    apply_mob(student, convert.mob)
    if cfg.mob.enabled and not mob_groups(student):
        apply_mob(student, cfg.mob)  # stage 3 adds the groups the student lacks, as the trainer does
    apply_recipe_to_student(student, recipe)
    return PlannedStage(convert, cfg, recipe, student, build_flux(teacher_config, meta=True), teacher_config)
