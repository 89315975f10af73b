"""What each distillation stage trains, and how the student is set up for it.

Parameter groups (names in ``StageConfig.trainable``):

* ``shared``: shared experts and the MoE layers' output biases;
* ``experts``: routed experts (stacked tensors);
* ``routers``: MoE routers;
* ``mob_routers``: Mixture-of-Blocks routers;
* ``mob_blocks``: the blocks inside MoB groups;
* ``all``: every parameter.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

from torch import nn

from d2m_dist.config import ConfigError, StageConfig
from d2m_dist.models.mob import MoBGroup
from d2m_dist.models.moe import MoEFeedForward

GROUPS = ("shared", "experts", "routers", "mob_routers", "mob_blocks", "all")
DEFAULT_TRAINABLE = {1: ["shared"], 2: ["experts", "routers"], 3: ["mob_routers"]}


def stage_trainable(cfg: StageConfig) -> List[str]:
    groups = list(cfg.trainable) or DEFAULT_TRAINABLE[cfg.stage]
    for g in groups:
        if g not in GROUPS:
            raise ConfigError(f"trainable: '{g}' is not one of {', '.join(GROUPS)}")
    return groups


def stage_top_k(cfg: StageConfig, spec_k: int) -> int:
    if cfg.top_k is not None:
        return cfg.top_k
    return 0 if cfg.stage == 1 else spec_k


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
