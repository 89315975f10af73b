"""MoE specs: ``1S12E2A`` strings and their resolved per-site shapes.

A spec names widths as ratios of the model width D: ``r_s`` for the shared
expert, ``n`` routed experts and ``k`` of them active per token. The dense FFN's
ratio ``r`` (4 for FLUX) is split as ``r = r_s + n * r_n``, so each routed expert
has width ``(r - r_s) / n * D``. Widths must come out as whole neurons.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, List, Optional, Sequence

from d2m_dist.config import ConfigError, MoEConfig

_SPEC_RE = re.compile(r"^\s*(?P<rs>[0-9]+(?:\.[0-9]+)?)S(?P<n>[0-9]+)E(?P<k>[0-9]+)A\s*$")


@dataclass(frozen=True)
class MoESpec:
    """A parsed spec, independent of any model."""

    shared_ratio: Fraction
    num_experts: int
    top_k: int

    @classmethod
    def parse(cls, text: str) -> "MoESpec":
        m = _SPEC_RE.match(str(text))
        if not m:
            raise ConfigError(
                f"moe spec '{text}': expected <shared ratio>S<experts>E<active>A, e.g. 1S12E2A"
            )
        spec = cls(Fraction(m.group("rs")), int(m.group("n")), int(m.group("k")))
        spec.check()
        return spec

    def check(self) -> None:
        if self.shared_ratio < 0:
            raise ConfigError(f"moe spec: shared ratio must be >= 0, got {self.shared_ratio}")
        if self.num_experts < 1:
            raise ConfigError(f"moe spec: number of experts must be >= 1, got {self.num_experts}")
        if not 0 <= self.top_k <= self.num_experts:
            raise ConfigError(
                f"moe spec: active experts k={self.top_k} must lie in 0..n={self.num_experts}"
            )

    def __str__(self) -> str:
        rs = self.shared_ratio
        rs_text = str(rs.numerator) if rs.denominator == 1 else f"{float(rs):g}"
        return f"{rs_text}S{self.num_experts}E{self.top_k}A"

    def resolve(self, dim: int, hidden: int, site: str = "") -> "SiteShape":
        """Widths in neurons for an FFN of input width ``dim`` and hidden width ``hidden``."""
        where = f" at site {site}" if site else ""
        shared = self.shared_ratio * dim
        if shared.denominator != 1:
            raise ConfigError(f"moe spec {self}{where}: shared width {float(shared)} is not an integer")
        shared_width = int(shared)
        if shared_width > hidden:
            raise ConfigError(
                f"moe spec {self}{where}: shared width {shared_width} exceeds the dense width {hidden}"
            )
        rest = hidden - shared_width
        if rest % self.num_experts:
            raise ConfigError(
                f"moe spec {self}{where}: routed width {rest} does not divide into {self.num_experts} experts"
            )
        expert_width = rest // self.num_experts
        if expert_width == 0:
            raise ConfigError(f"moe spec {self}{where}: routed experts would have width 0")
        return SiteShape(
            dim=dim,
            hidden=hidden,
            shared_width=shared_width,
            num_experts=self.num_experts,
            expert_width=expert_width,
            top_k=self.top_k,
        )


@dataclass(frozen=True)
class SiteShape:
    """A spec resolved against one FFN site."""

    dim: int
    hidden: int
    shared_width: int
    num_experts: int
    expert_width: int
    top_k: int

    @property
    def activated_width(self) -> int:
        return self.shared_width + self.top_k * self.expert_width


# ----------------------------------------------------------------------------- sites

SITE_KINDS = ("ff", "ff_context", "mlp")


def all_site_names(num_double: int, num_single: int) -> List[str]:
    names = []
    for i in range(num_double):
        names += [f"double.{i}.ff", f"double.{i}.ff_context"]
    names += [f"single.{i}.mlp" for i in range(num_single)]
    return names


def select_sites(cfg: MoEConfig, num_double: int, num_single: int) -> Dict[str, MoESpec]:
    """The converted sites of a model and the spec for each (overrides applied in order)."""
    default = MoESpec.parse(cfg.spec)
    if cfg.sites == "all":
        doubles, singles = range(num_double), range(num_single)
    elif cfg.sites == "double":
        doubles, singles = range(num_double), []
    elif cfg.sites == "single":
        doubles, singles = [], range(num_single)
    elif cfg.sites == "list":
        doubles = _check_blocks("moe.double_blocks", cfg.double_blocks, num_double)
        singles = _check_blocks("moe.single_blocks", cfg.single_blocks, num_single)
    else:
        raise ConfigError(f"moe.sites: '{cfg.sites}' is not one of all, double, single, list")
    names = []
    for i in doubles:
        names += [f"double.{i}.ff", f"double.{i}.ff_context"]
    names += [f"single.{i}.mlp" for i in singles]
    if not names:
        raise ConfigError("moe: no FFN site selected")
    specs = {name: default for name in names}
    for ov in cfg.overrides:
        spec = MoESpec.parse(ov.spec)
        hit = [n for n in names if fnmatch.fnmatchcase(n, ov.sites)]
        if not hit:
            raise ConfigError(f"moe.overrides: pattern '{ov.sites}' matches no converted site")
        for n in hit:
            specs[n] = spec
    return specs


def _check_blocks(name: str, blocks: Optional[Sequence[int]], count: int) -> List[int]:
    blocks = list(blocks or [])
    for b in blocks:
        if not 0 <= b < count:
            raise ConfigError(f"{name}: block {b} out of range 0..{count - 1}")
    if len(set(blocks)) != len(blocks):
        raise ConfigError(f"{name}: repeated block index")
    return sorted(blocks)
