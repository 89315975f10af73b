"""The MoE feed-forward layer: a shared expert plus top-k routed experts.

``y = b + shared(x) + sum_{i in topk(x)} g_i(x) * expert_i(x)``

* The router is a bias-free linear layer evaluated in fp32 whatever the
  activation dtype, so routing decisions do not flip under bf16.
* Top-k routing, capacity dropping and token permutation come from
  megatron-core's ``moe_utils`` (pure torch, CPU and CUDA). Dispatch is dropless
  by default and costs O(tokens * k): tokens are sorted by expert, never padded
  to the busiest expert's load.
* The layer runs no collective of its own except the expert-parallel token
  exchange: the load-balance and z-losses need the global batch's statistics, so
  the layer only records per-rank sums (:class:`RoutingStats`) and the trainer
  combines every layer's with one all_reduce per step. A layer that a Mixture of
  Blocks skipped on some rank then cannot desynchronise the ranks' collectives.
* Routed experts are stored stacked, one tensor per weight kind, so a grouped
  matmul can serve them; row ``j`` of the stack on expert-parallel rank ``r`` is
  global expert ``r * n_local + j``.
* Under expert parallelism the permuted tokens travel by ``all_to_all`` inside
  the expert-parallel process group, the experts run on their owner rank, and
  the results travel back.
* The dense output bias ``b`` lives once, outside the experts, so that the shared
  expert plus every routed expert with unit gates reproduces the dense FFN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from d2m_dist.models import _megatron as mu
from d2m_dist.models.precision import fp32_region
from d2m_dist.models.spec import SiteShape
from d2m_dist.parallel.comm_timing import COMM_CLOCK


class _AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` with uneven splits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: List[int], input_splits: List[int], group):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        x = x.contiguous()
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        with COMM_CLOCK.measure(x.device):
            dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad.contiguous(), ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_splits: List[int], input_splits: List[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, output_splits, input_splits, group)


class ExpertStack(nn.Module):
    """``num_local`` non-gated GELU(tanh) MLPs of the same width, stored stacked.

    ``w1[e]`` is expert e's up-projection (rows = its neurons), ``w2[e]`` its
    down-projection (columns = its neurons). Experts carry no output bias.
    """

    def __init__(self, num_local: int, dim: int, width: int, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.w1 = nn.Parameter(torch.empty(num_local, width, dim, **kw))
        self.b1 = nn.Parameter(torch.empty(num_local, width, **kw))
        self.w2 = nn.Parameter(torch.empty(num_local, dim, width, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.w1.is_meta:
            return
        bound1 = 1 / math.sqrt(self.w1.shape[-1])
        bound2 = 1 / math.sqrt(self.w2.shape[-1])
        nn.init.uniform_(self.w1, -bound1, bound1)
        nn.init.uniform_(self.b1, -bound1, bound1)
        nn.init.uniform_(self.w2, -bound2, bound2)

    @property
    def num_local(self) -> int:
        return self.w1.shape[0]

    def forward(self, x: torch.Tensor, counts: List[int]) -> torch.Tensor:
        """``x``: tokens sorted by local expert, ``counts[e]`` of them for expert e."""
        outs = []
        # empty chunks run too: every expert stays in the graph, so all ranks'
        # backward passes (and DeepSpeed's gradient hooks) see the same parameters
        for e, chunk in enumerate(torch.split(x, counts, dim=0)):
            h = F.gelu(F.linear(chunk, self.w1[e], self.b1[e]), approximate="tanh")
            outs.append(F.linear(h, self.w2[e]))
        return torch.cat(outs, dim=0) if outs else x.new_zeros(0, x.shape[-1])


class SharedExpert(nn.Module):
    """The always-on expert: a GELU(tanh) MLP without output bias."""

    def __init__(self, dim: int, width: int, dtype=None, device=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, width, dtype=dtype, device=device)
        self.fc2 = nn.Linear(width, dim, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


@dataclass
class RoutingStats:
    """What one MoE layer's last forward routed on this rank: the inputs of the auxiliary losses.

    Kept as sums over tokens, not means, so that the trainer can combine them over
    ranks (and over layers that ran on some ranks only) with one all_reduce and
    recover the statistics of the global batch (``distill/losses.router_aux_losses``).
    """

    tokens: int  # tokens routed on this rank
    counts: torch.Tensor  # [n] float, assignments per expert (global ids), detached
    score_sum: torch.Tensor  # [n] sum over tokens of the softmax router scores, in the graph
    z_sum: Optional[torch.Tensor]  # sum over tokens of logsumexp(logits)^2, in the graph; None without z-loss
    entropy_sum: torch.Tensor  # sum over tokens of the router entropy, detached
    dropped: int  # assignments removed by the capacity limit


class MoEFeedForward(nn.Module):
    """Drop-in replacement for a dense ``x -> y`` FFN (diffusers ``FeedForward``).

    After each forward the layer keeps, for the trainer and logging,
    ``tokens_per_expert`` (global ids, this rank's tokens) and ``stats``
    (:class:`RoutingStats`, None when the layer routed nothing: top-k 0, unit gates,
    or a forward that did not run it). The auxiliary losses are computed from
    ``stats`` by the trainer, over the whole data-parallel batch.
    """

    def __init__(
        self,
        shape: SiteShape,
        *,
        out_bias: bool = True,
        renormalize: bool = False,
        z_loss_coeff: float = 0.0,
        capacity_factor: Optional[float] = None,
        ep_group=None,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.shape = shape
        self.num_experts = shape.num_experts
        self.top_k = shape.top_k
        self.renormalize = renormalize
        self.z_loss_coeff = z_loss_coeff
        self.capacity_factor = capacity_factor
        # unit_gates: every routed expert on with gate 1 (dense-equivalence checks)
        self.unit_gates = False
        self.ep_group = ep_group
        ep_size = dist.get_world_size(ep_group) if ep_group is not None else 1
        ep_rank = dist.get_rank(ep_group) if ep_group is not None else 0
        if shape.num_experts % ep_size:
            raise ValueError(f"ep_size {ep_size} does not divide the {shape.num_experts} experts")
        self.ep_size = ep_size
        num_local = shape.num_experts // ep_size
        self.expert_offset = ep_rank * num_local

        self.shared = SharedExpert(shape.dim, shape.shared_width, dtype=dtype, device=device) if shape.shared_width else None
        self.experts = ExpertStack(num_local, shape.dim, shape.expert_width, dtype=dtype, device=device)
        # fp32 router regardless of the model dtype
        self.router = nn.Linear(shape.dim, shape.num_experts, bias=False, dtype=torch.float32, device=device)
        self.bias = nn.Parameter(torch.zeros(shape.dim, dtype=dtype, device=device)) if out_bias else None
        self.clear_stats()

    # -- runtime knobs ------------------------------------------------------------------

    def set_top_k(self, k: Optional[int]) -> None:
        """k active routed experts per token; None: the site's own spec k."""
        k = self.shape.top_k if k is None else k
        if not 0 <= k <= self.num_experts:
            raise ValueError(f"top_k must lie in 0..{self.num_experts}, got {k}")
        self.top_k = k

    @property
    def global_expert_ids(self) -> range:
        return range(self.expert_offset, self.expert_offset + self.experts.num_local)

    # -- forward ------------------------------------------------------------------------

    def clear_stats(self) -> None:
        """Forget the last forward's routing (the trainer calls it before every student forward)."""
        self.stats: Optional[RoutingStats] = None
        self.tokens_per_expert: Optional[torch.Tensor] = None

    def route(self, x2: torch.Tensor):
        """Routing for flat tokens ``x2`` [T, D]: (probs [T, n], routing_map [T, n], logits)."""
        with fp32_region(x2.device.type):
            logits = F.linear(x2.float(), self.router.weight.float())
        if self.unit_gates:
            routing_map = torch.ones_like(logits, dtype=torch.bool)
            return torch.ones_like(logits), routing_map, logits
        probs, routing_map = mu.topk_routing_with_score_function(
            logits, self.top_k, use_pre_softmax=not self.renormalize, score_function="softmax"
        )
        return probs, routing_map, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clear_stats()
        x2 = x.reshape(-1, x.shape[-1])
        y = self.shared(x2) if self.shared is not None else torch.zeros_like(x2)
        if self.bias is not None:
            y = y + self.bias
        if self.top_k > 0 or self.unit_gates:
            y = y + self._routed(x2)
        return y.reshape(x.shape)

    def _routed(self, x2: torch.Tensor) -> torch.Tensor:
        probs, routing_map, logits = self.route(x2)
        dropped = 0
        if self.capacity_factor is not None and not self.unit_gates:
            kept_probs, kept_map = mu.apply_router_token_dropping(
                probs, routing_map, self.top_k, self.capacity_factor, drop_policy="probs"
            )
            dropped = int(routing_map.sum() - kept_map.sum())
            probs, routing_map = kept_probs, kept_map
        tokens_per_expert = routing_map.sum(dim=0)
        self.tokens_per_expert = tokens_per_expert.detach()
        if not self.unit_gates:
            self.stats = self._routing_stats(logits, tokens_per_expert, dropped)
        permuted, permuted_probs, sorted_indices = mu.permute(x2, routing_map, probs=probs)
        out = self._run_experts(permuted, tokens_per_expert)
        out = out * permuted_probs.unsqueeze(-1).to(out.dtype)
        return mu.unpermute(out, sorted_indices, restore_shape=x2.shape)

    def _routing_stats(self, logits: torch.Tensor, tokens_per_expert: torch.Tensor, dropped: int) -> RoutingStats:
        with fp32_region(logits.device.type):
            scores = torch.softmax(logits, dim=-1)
            z_sum = torch.logsumexp(logits, dim=-1).pow(2).sum() if self.z_loss_coeff else None
            with torch.no_grad():
                entropy = -(scores * torch.log(scores.clamp_min(1e-20))).sum()
        return RoutingStats(tokens=logits.shape[0], counts=tokens_per_expert.detach().float(),
                            score_sum=scores.sum(0), z_sum=z_sum, entropy_sum=entropy, dropped=dropped)

    def _run_experts(self, permuted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Tokens sorted by global expert id in, expert outputs in the same order out."""
        if self.ep_size == 1:
            return self.experts(permuted, tokens_per_expert.tolist())
        ep, nl = self.ep_size, self.experts.num_local
        # how many tokens of mine go to each (rank, local expert), and how many I get
        send_counts = tokens_per_expert.to(torch.int64)
        recv_counts = torch.empty_like(send_counts)
        with COMM_CLOCK.measure(send_counts.device):
            dist.all_to_all_single(recv_counts, send_counts, group=self.ep_group)
        input_splits = send_counts.view(ep, nl).sum(1).tolist()
        output_splits = recv_counts.view(ep, nl).sum(1).tolist()
        received = all_to_all(permuted, output_splits, input_splits, self.ep_group)
        # received is laid out [source rank][local expert]; the experts want [local expert][source rank]
        by_source = recv_counts.view(ep, nl)
        to_expert_major = torch.arange(ep * nl).view(ep, nl).t().reshape(-1)
        grouped, _ = mu.sort_chunks_by_idxs(received, by_source.reshape(-1), to_expert_major)
        out = self.experts(grouped, by_source.sum(0).tolist())
        to_source_major = torch.arange(ep * nl).view(nl, ep).t().reshape(-1)
        out, _ = mu.sort_chunks_by_idxs(out, by_source.t().reshape(-1), to_source_major)
        return all_to_all(out, input_splits, output_splits, self.ep_group)

    def extra_repr(self) -> str:
        s = self.shape
        return (
            f"dim={s.dim}, shared={s.shared_width}, experts={s.num_experts}x{s.expert_width}, "
            f"top_k={self.top_k}, local={list(self.global_expert_ids)}"
        )


def moe_layers(model: nn.Module):
    """(name, layer) for every MoE layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoEFeedForward)]


def set_top_k(model: nn.Module, k: Optional[int]) -> None:
    """Change the number of active routed experts at every site (0 = shared only).

    ``k`` is capped at each site's expert count; None restores each site's own
    spec k (sites may differ: ``moe.overrides``).
    """
    for _, layer in moe_layers(model):
        layer.set_top_k(None if k is None else min(k, layer.num_experts))


def clear_routing_stats(model: nn.Module) -> None:
    """Forget every MoE layer's last routing, so that layers a forward skips report nothing."""
    for _, layer in moe_layers(model):
        layer.clear_stats()
