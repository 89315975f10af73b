"""The stage recipes: what each distillation stage trains, with which losses, in which layout.

One record per stage (docs/METHOD.md, section 3), read by the trainer, the
DeepSpeed setup and the export; a stage config can override any field
(``trainable``, ``top_k``, ``parallel.zero_stage``, ``loss.*``), and
:func:`stage_recipe` applies those overrides once. Nothing else in the code
branches on the stage number.

Parameter groups (names in ``StageConfig.trainable``):

* ``shared``: shared experts and the MoE layers' output biases;
* ``experts``: routed experts (stacked tensors);
* ``routers``: MoE routers;
* ``mob_routers``: Mixture-of-Blocks routers;
* ``mob_blocks``: the blocks inside MoB groups;
* ``all``: every parameter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from torch import nn

from d2m_dist.config import ConfigError, StageConfig
from d2m_dist.models.mob import MoBGroup
from d2m_dist.models.moe import MoEFeedForward, set_top_k

GROUPS = ("shared", "experts", "routers", "mob_routers", "mob_blocks", "all")


@dataclass(frozen=True)
class LossWeights:
    output: float  # velocity distillation
    feature: float  # block feature loss (every block's output)
    balance: float  # Switch load balance of the MoE routers
    group: float  # MoB group feature loss (each group's output against the teacher's last block of it)


@dataclass(frozen=True)
class StageRecipe:
    stage: int
    summary: str
    trainable: Tuple[str, ...]
    # active routed experts: 0 = the shared expert alone; None = each site's own spec k
    top_k: Optional[int]
    zero_stage: int  # the student's ZeRO stage
    # Mixture-of-Blocks groups route (True) or run every block with gate 1, exactly the
    # dense stack (False): MoB is introduced by stage 3, even when stage 0 already built groups
    mob: bool
    losses: LossWeights


RECIPES: Dict[int, StageRecipe] = {
    1: StageRecipe(1, "shared expert alone (k = 0), a width-pruned FFN", ("shared",), 0, 3, False,
                   LossWeights(output=1.0, feature=1.0, balance=0.0, group=0.0)),
    2: StageRecipe(2, "routed experts and routers; shared expert frozen", ("experts", "routers"), None, 2, False,
                   LossWeights(output=1.0, feature=1.0, balance=1e-2, group=0.0)),
    3: StageRecipe(3, "Mixture-of-Blocks routers; everything else frozen", ("mob_routers",), None, 2, True,
                   LossWeights(output=0.0, feature=0.0, balance=0.0, group=1.0)),
}


def stage_recipe(cfg: StageConfig) -> StageRecipe:
    """The stage's recipe with the config's overrides applied (checked: one-line errors)."""
    base = RECIPES[cfg.stage]
    trainable = tuple(cfg.trainable) or base.trainable
    for g in trainable:
        if g not in GROUPS:
            raise ConfigError(f"trainable: '{g}' is not one of {', '.join(GROUPS)}")
    zero = cfg.parallel.zero_stage if cfg.parallel.zero_stage is not None else base.zero_stage
    if zero not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage: {zero} is not 1, 2 or 3")
    if zero == 3 and cfg.parallel.ep_size > 1:
        # ZeRO-3 partitions every parameter as if replicated; expert shards differ by rank
        raise ConfigError(f"parallel.ep_size={cfg.parallel.ep_size} needs ZeRO stage 1 or 2 "
                          f"(stage {cfg.stage} runs ZeRO-3): set parallel.ep_size=1 or parallel.zero_stage=2")
    overrides = {k: v for k, v in dataclasses.asdict(cfg.loss).items() if v is not None}
    for k, v in overrides.items():
        if v < 0:
            raise ConfigError(f"loss.{k} must be >= 0, got {v}")
    losses = dataclasses.replace(base.losses, **overrides)
    top_k = cfg.top_k if cfg.top_k is not None else base.top_k
    return dataclasses.replace(base, trainable=trainable, zero_stage=zero, losses=losses, top_k=top_k)


def group_params(model: nn.Module) -> Dict[str, List[nn.Parameter]]:
    out: Dict[str, List[nn.Parameter]] = {g: [] for g in GROUPS}
    out["all"] = list(model.parameters())
    for m in model.modules():
        if isinstance(m, MoEFeedForward):
            if m.shared is not None:
                out["shared"] += list(m.shared.parameters())
            if m.bias is not None:
                out["shared"].append(m.bias)
            out["experts"] += list(m.experts.parameters())
            out["routers"] += list(m.router.parameters())
        elif isinstance(m, MoBGroup):
            out["mob_routers"] += list(m.router.parameters())
            out["mob_blocks"] += list(m.blocks.parameters())
    return out


def set_trainable(model: nn.Module, groups: Sequence[str]) -> int:
    """Freeze everything, then unfreeze ``groups``; returns the number of trainable parameters."""
    model.requires_grad_(False)
    params = group_params(model)
    for g in groups:
        if not params[g]:
            raise ConfigError(f"trainable group '{g}' is empty in this student")
        for p in params[g]:
            p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def routers_train(model: nn.Module) -> bool:
    """Whether any MoE router learns: the auxiliary routing losses apply only then."""
    return any(p.requires_grad for m in model.modules() if isinstance(m, MoEFeedForward) for p in m.router.parameters())


def apply_recipe_to_student(model: nn.Module, recipe: StageRecipe) -> int:
    """Top-k, MoB mode and trainable parameters of ``recipe``; returns the trainable count."""
    set_top_k(model, recipe.top_k)
    for m in model.modules():
        if isinstance(m, MoBGroup):
            m.unit_gates = not recipe.mob
    return set_trainable(model, recipe.trainable)
