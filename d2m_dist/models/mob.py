"""Mixture of Blocks: groups of m consecutive blocks, kappa of them active per sample.

A :class:`MoBGroup` takes the place of its m blocks in the transformer's block
list and has the same call signature, so diffusers' own forward loop runs the
student unchanged. Per sample (and so per timestep) a router scores the m
blocks from ``alpha * W_x [pool(x_img), pool(x_txt)] + (1 - alpha) * W_y temb``
and the top-kappa run; a skipped block passes the hidden states through. An
active block runs only on the samples that chose it (a gathered sub-batch), so
skipped work is never computed.

Gate modes (how the router score weights an active block's update
``f(h) - h``): ``straight_through`` (value 1, gradient of the score: the block
computes exactly what the dense block did and the router still learns),
``score`` (``h + s (f(h) - h)``) and ``one`` (hard, no router gradient).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from d2m_dist.config import ConfigError, MoBConfig, MoBGroupConfig
from d2m_dist.models.moe import MoEFeedForward, clear_routing_stats
from d2m_dist.models.precision import fp32_region

GATE_MODES = ("straight_through", "score", "one")


class MoBRouter(nn.Module):
    """Per-sample block router (fp32)."""

    def __init__(self, dim: int, temb_dim: int, m: int, alpha: float, device=None):
        super().__init__()
        self.alpha = alpha
        self.w_x = nn.Linear(2 * dim, m, bias=False, dtype=torch.float32, device=device)
        self.w_y = nn.Linear(temb_dim, m, bias=False, dtype=torch.float32, device=device)
        if not self.w_x.weight.is_meta:
            nn.init.normal_(self.w_x.weight, std=0.02)
            nn.init.normal_(self.w_y.weight, std=0.02)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        with fp32_region(hidden.device.type):
            pooled = torch.cat([hidden.float().mean(1), context.float().mean(1)], dim=-1)
            return self.alpha * self.w_x(pooled) + (1 - self.alpha) * self.w_y(temb.float())


class MoBGroup(nn.Module):
    def __init__(self, blocks: List[nn.Module], kappa: int, alpha: float, gate: str, dim: int, temb_dim: int):
        super().__init__()
        if not 1 <= kappa <= len(blocks):
            raise ConfigError(f"mob: kappa={kappa} must lie in 1..m={len(blocks)}")
        if gate not in GATE_MODES:
            raise ConfigError(f"mob.gate: '{gate}' is not one of {', '.join(GATE_MODES)}")
        self.blocks = nn.ModuleList(blocks)
        self.kappa = kappa
        self.gate = gate
        device = next(blocks[0].parameters()).device
        self.router = MoBRouter(dim, temb_dim, len(blocks), alpha, device=device)
        # unit_gates: every block on with gate exactly 1 (dense-equivalence checks)
        self.unit_gates = False
        # samples of the last forward that ran each block [m] (this rank), and the batch size
        self.usage_counts: Optional[torch.Tensor] = None
        self.samples = 0

    @property
    def usage(self) -> Optional[torch.Tensor]:
        """[m] fraction of this rank's samples that ran each block in the last forward."""
        return None if self.usage_counts is None else self.usage_counts / max(1, self.samples)

    def _must_take_part(self, j: int) -> bool:
        """Whether block j must run on this rank even when no local sample chose it.

        Two reasons, both about what the other ranks do in lockstep: the block holds
        expert-parallel MoE layers (their token all_to_all, forward and backward, needs
        every rank of the group), or it has trainable parameters (ZeRO reduces gradients
        in buckets filled in the order the backward produces them, so every rank's graph
        must hold the block at the same place, or the buckets' contents would not line up).
        """
        block = self.blocks[j]
        if any(isinstance(m, MoEFeedForward) and m.ep_size > 1 for m in block.modules()):
            return True
        return torch.is_grad_enabled() and any(p.requires_grad for p in block.parameters())

    @staticmethod
    def _take_part(block, hidden, context, temb, rotary, kwargs):
        """Run ``block`` on one sample with zero weight: the same graph as on the ranks where
        samples did choose it (collectives and gradient order), nothing added to the output.

        diffusers' blocks cannot run an empty batch, so one sample's compute is the price.
        The sample's routing is forgotten afterwards: it must not count in the load
        balance or the metrics, since its output is discarded.
        """
        one = torch.zeros(1, dtype=torch.long, device=hidden.device)
        c_out, h_out = block(hidden_states=hidden.index_select(0, one), encoder_hidden_states=context.index_select(0, one),
                             temb=temb.index_select(0, one), image_rotary_emb=rotary, joint_attention_kwargs=kwargs)
        clear_routing_stats(block)
        zero = (h_out.sum() + c_out.sum()) * 0.0  # in the graph, so backward runs the exchanges too
        return hidden + zero.to(hidden.dtype), context + zero.to(context.dtype)

    @property
    def m(self) -> int:
        return len(self.blocks)

    def select(self, hidden, context, temb):
        """(active [B, m] bool, gate_minus_one [B, m]) for this batch."""
        b = hidden.shape[0]
        if self.unit_gates:
            return torch.ones(b, self.m, dtype=torch.bool, device=hidden.device), None
        scores = F.softmax(self.router(hidden, context, temb), dim=-1)
        top = scores.topk(self.kappa, dim=-1).indices
        active = torch.zeros_like(scores, dtype=torch.bool).scatter(1, top, True)
        if self.gate == "straight_through":
            delta = scores - scores.detach()
        elif self.gate == "score":
            delta = scores - 1
        else:
            delta = None
        return active, delta

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        active, delta = self.select(hidden_states, encoder_hidden_states, temb)
        self.usage_counts = active.sum(0).detach().float()
        self.samples = active.shape[0]
        for j, block in enumerate(self.blocks):
            idx = active[:, j].nonzero().squeeze(1)
            if idx.numel() == 0:
                # skipped by every local sample: no compute, unless the other ranks need this
                # rank in the block's collectives or its place in the gradient order
                clear_routing_stats(block)
                if self._must_take_part(j):
                    hidden_states, encoder_hidden_states = self._take_part(
                        block, hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
                continue
            whole = idx.numel() == hidden_states.shape[0]
            h = hidden_states if whole else hidden_states.index_select(0, idx)
            c = encoder_hidden_states if whole else encoder_hidden_states.index_select(0, idx)
            t = temb if whole else temb.index_select(0, idx)
            c_out, h_out = block(
                hidden_states=h, encoder_hidden_states=c, temb=t,
                image_rotary_emb=image_rotary_emb, joint_attention_kwargs=joint_attention_kwargs,
            )
            if delta is not None:
                # out + (g - 1)(out - in): exactly `out` when g == 1 in value
                g = delta[:, j] if whole else delta[idx, j]
                g = g.to(h_out.dtype)[:, None, None]
                h_out = h_out + g * (h_out - h)
                c_out = c_out + g * (c_out - c)
            if whole:
                hidden_states, encoder_hidden_states = h_out, c_out
            else:
                hidden_states = hidden_states.index_copy(0, idx, h_out)
                encoder_hidden_states = encoder_hidden_states.index_copy(0, idx, c_out)
        return encoder_hidden_states, hidden_states


def _group_range(spec: MoBGroupConfig, count: int, stream: str):
    last = spec.last if spec.last >= 0 else count + spec.last
    if not 0 <= spec.first <= last < count:
        raise ConfigError(f"mob.{stream}: block range {spec.first}..{spec.last} out of 0..{count - 1}")
    span = last - spec.first + 1
    if spec.m < 1 or span % spec.m:
        raise ConfigError(f"mob.{stream}: m={spec.m} does not divide the {span} grouped blocks")
    return spec.first, last


def apply_mob(model: nn.Module, cfg: MoBConfig) -> nn.Module:
    """Replace the configured block ranges of a (converted) FLUX transformer by MoB groups, in place."""
    if not cfg.enabled:
        return model
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ConfigError(f"mob.alpha: {cfg.alpha} not in [0, 1]")
    c = model.config
    dim = c.num_attention_heads * c.attention_head_dim
    for stream, attr in (("double", "transformer_blocks"), ("single", "single_transformer_blocks")):
        spec = getattr(cfg, stream)
        if spec is None:
            continue
        blocks = list(getattr(model, attr))
        first, last = _group_range(spec, len(blocks), stream)
        new: List[nn.Module] = blocks[:first]
        for start in range(first, last + 1, spec.m):
            new.append(MoBGroup(blocks[start : start + spec.m], spec.kappa, cfg.alpha, cfg.gate, dim, dim))
        new += blocks[last + 1 :]
        setattr(model, attr, nn.ModuleList(new))
    return model


def mob_groups(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoBGroup)]


def group_last_blocks(model: nn.Module, attr: str) -> List[int]:
    """For each entry of a block list, the index (in the dense model) of its last block."""
    out, k = [], -1
    for entry in getattr(model, attr):
        k += entry.m if isinstance(entry, MoBGroup) else 1
        out.append(k)
    return out
