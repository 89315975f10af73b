"""Parameter accounting for dense teachers and MoE/MoB students.

"Activated" parameters are those one token meets in one forward pass: all
parameters minus the routed experts it does not use (n - k per MoE site) minus,
for MoB groups, the average share of skipped blocks ((m - kappa) / m of a
group's blocks). The paper's activated counts appear to leave out the AdaLN
modulation (per-sample, not per-token, weights), so both counts are reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle
from torch import nn

from d2m_dist.models.mob import MoBGroup
from d2m_dist.models.moe import MoEFeedForward

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


def moe_param_report(model: nn.Module) -> ParamReport:
    total = count(model)
    sites = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    routers = sum(count(m.router) for m in sites) + sum(count(g.router) for g in model.modules() if isinstance(g, MoBGroup))
    ffn_total = sum(count(m) - count(m.router) for m in sites)
    inactive = 0
    for m in sites:
        per_expert = count(m.experts) // m.experts.num_local
        inactive += (m.num_experts - m.top_k) * per_expert
    ffn_activated = ffn_total - inactive
    for g in model.modules():
        if isinstance(g, MoBGroup):
            skipped_share = (g.m - g.kappa) / g.m
            block_params = sum(count(b) for b in g.blocks)
            inactive += int(round(block_params * skipped_share))
    modulation = modulation_params(model)
    activated = total - inactive
    return ParamReport(total, len(sites), ffn_total, ffn_activated, routers, modulation, activated, activated - modulation)


def dense_ffn_params(model: nn.Module) -> int:
    """FFN parameters of a dense FLUX transformer (ff, ff_context, single-block MLP incl. its proj_out columns)."""
    n = 0
    for b in model.transformer_blocks:
        n += count(b.ff) + count(b.ff_context)
    for b in model.single_transformer_blocks:
        d = b.proj_out.weight.shape[0]
        n += count(b.proj_mlp) + b.proj_out.weight[:, d:].numel()
    return n
