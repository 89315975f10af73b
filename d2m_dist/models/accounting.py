"""Parameter accounting for dense teachers and MoE/MoB students.

"Activated" parameters are those one token meets in one forward pass, on
average: all parameters minus the routed experts it does not use (n - k per MoE
site), where a block inside a Mixture-of-Blocks group counts with the share of
samples that run it (kappa / m). The paper's activated counts appear to leave
out the AdaLN modulation (per-sample, not per-token, weights), so both counts are
reported (docs/METHOD.md, docs/DECISIONS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from diffusers.models.normalization import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    AdaLayerNormZeroSingle,
)
from torch import nn

from d2m_dist.config import MoBConfig, MoEConfig, TeacherConfig
from d2m_dist.models.flux import load_teacher
from d2m_dist.models.mob import MoBGroup, apply_mob
from d2m_dist.models.moe import MoEFeedForward
from d2m_dist.models.spec import select_sites
from d2m_dist.models.surgery import convert_to_moe

_MODULATION = (AdaLayerNormZero, AdaLayerNormZeroSingle, AdaLayerNormContinuous)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class ParamReport:
    total: int
    ffn_sites: int  # number of MoE sites
    ffn_total: int  # all FFN-site parameters (shared + experts + output biases), routers excluded
    ffn_activated: int
    routers: int  # MoE and MoB routers
    modulation: int
    activated: int  # per token, modulation included
    activated_without_modulation: int

    def as_dict(self) -> Dict[str, int]:
        return dict(self.__dict__)

    def lines(self) -> list:
        b = lambda n: f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n:,}"  # noqa: E731
        return [
            f"total parameters            {b(self.total)}",
            f"MoE sites                   {self.ffn_sites}",
            f"FFN parameters              {b(self.ffn_total)} (activated {b(self.ffn_activated)})",
            f"router parameters           {b(self.routers)}",
            f"AdaLN modulation            {b(self.modulation)}",
            f"activated, with modulation  {b(self.activated)}",
            f"activated, w/o modulation   {b(self.activated_without_modulation)}",
        ]


def modulation_params(model: nn.Module) -> int:
    return sum(count(m.linear) for m in model.modules() if isinstance(m, _MODULATION))


def idle_expert_params(module: nn.Module) -> int:
    """Routed-expert parameters inside ``module`` that a token does not use (n - k per MoE site)."""
    idle = 0
    for m in module.modules():
        if isinstance(m, MoEFeedForward):
            idle += (m.num_experts - m.top_k) * (count(m.experts) // m.experts.num_local)
    return idle


def moe_param_report(model: nn.Module) -> ParamReport:
    """Total and activated parameters of a (converted) FLUX transformer.

    A block inside a Mixture-of-Blocks group runs for kappa of every m samples, so it
    contributes kappa/m of what it activates when it runs (its parameters minus its idle
    experts), and kappa/m of its AdaLN modulation to the modulation that is left out of
    the count without modulation.
    """
    total = count(model)
    sites = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    groups = [g for g in model.modules() if isinstance(g, MoBGroup)]
    routers = sum(count(m.router) for m in sites) + sum(count(g.router) for g in groups)
    ffn_total = sum(count(m) - count(m.router) for m in sites)

    share = {}  # MoE layer -> fraction of samples that run it (kappa/m inside a MoB group)
    for g in groups:
        for b in g.blocks:
            for m in b.modules():
                if isinstance(m, MoEFeedForward):
                    share[id(m)] = g.kappa / g.m
    ffn_activated = sum((count(m) - count(m.router) - idle_expert_params(m)) * share.get(id(m), 1.0) for m in sites)

    # ungrouped sites lose their idle experts; a grouped block runs (rate = kappa/m) or is skipped
    inactive = sum(idle_expert_params(m) for m in sites if id(m) not in share)
    modulation_active = modulation = modulation_params(model)
    for g in groups:
        rate = g.kappa / g.m
        for b in g.blocks:
            inactive += count(b) - rate * (count(b) - idle_expert_params(b))
            modulation_active -= (1 - rate) * modulation_params(b)
    activated = total - inactive
    return ParamReport(total, len(sites), ffn_total, int(round(ffn_activated)), routers, modulation,
                       int(round(activated)), int(round(activated - modulation_active)))


def dense_ffn_params(model: nn.Module) -> int:
    """FFN parameters of a dense FLUX transformer (ff, ff_context, single-block MLP incl. its proj_out columns)."""
    n = 0
    for b in model.transformer_blocks:
        n += count(b.ff) + count(b.ff_context)
    for b in model.single_transformer_blocks:
        d = b.proj_out.weight.shape[0]
        n += count(b.proj_mlp) + b.proj_out.weight[:, d:].numel()
    return n


def parameter_report(teacher: TeacherConfig, moe: MoEConfig, mob: MoBConfig) -> Tuple[int, int, ParamReport]:
    """(dense total, dense FFN, the student's report) for a conversion config, on the meta device (no weights)."""
    model = load_teacher(teacher, meta=True)
    dense_total, dense_ffn = count(model), dense_ffn_params(model)
    c = model.config
    student = apply_mob(convert_to_moe(model, select_sites(moe, c.num_layers, c.num_single_layers), moe), mob)
    return dense_total, dense_ffn, moe_param_report(student)
