"""The MoE feed-forward layer: a shared expert plus top-k routed experts.

``y = b + shared(x) + sum_{i in topk(x)} g_i(x) * expert_i(x)``

* The router is a bias-free linear layer evaluated in fp32 whatever the
  activation dtype, so routing decisions do not flip under bf16.
* Top-k routing and capacity dropping come from megatron-core's ``moe_utils``
  (pure torch, CPU and CUDA). Dispatch is dropless by default and costs
  O(tokens * k): tokens are sorted by expert, never padded to the busiest
  expert's load. Moving rows to their experts and back is the dispatcher's job
  (``parallel/dispatch.py``), computing them the expert stack's (grouped
  matmuls or a loop, :class:`ExpertStack`).
* The layer runs no collective of its own except the expert-parallel token
  exchange: the load-balance and z-losses need the global batch's statistics, so
  the layer only records per-rank sums (:class:`RoutingStats`) and the trainer
  combines every layer's with one all_reduce per step. A layer that a Mixture of
  Blocks skipped on some rank then cannot desynchronise the ranks' collectives.
* Routed experts are stored stacked, one tensor per weight kind, so a grouped
  matmul can serve them; row ``j`` of the stack on expert-parallel rank ``r`` is
  global expert ``r * n_local + j``.
* A layer is built with every expert and a local dispatcher. Expert
  parallelism is a separate step on the built model
  (``parallel/expert_parallel.apply_expert_parallel``): it keeps this rank's
  slice of the stack and swaps in the all-to-all dispatcher, whose rows travel
  inside the expert-parallel process group to their owner rank and back.
* The dense output bias ``b`` lives once, outside the experts, so that the shared
  expert plus every routed expert with unit gates reproduces the dense FFN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from d2m_dist.models import _megatron as mu
from d2m_dist.models.precision import fp32_region
from d2m_dist.models.spec import SiteShape
from d2m_dist.parallel.dispatch import LocalDispatcher


def _contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    """Identity whose backward makes the incoming gradient dense (grouped_mm's backward refuses stride 0)."""
    return _ContiguousGrad.apply(x) if x.requires_grad else x


class _ContiguousGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


EXPERT_KERNELS = ("auto", "grouped", "loop")


class ExpertStack(nn.Module):
    """``num_local`` non-gated GELU(tanh) MLPs of the same width, stored stacked.

    ``w1[e]`` is expert e's up-projection (rows = its neurons), ``w2[e]`` its
    down-projection (columns = its neurons). Experts carry no output bias, so a
    row's gate multiplies its hidden activation (width ``width``) rather than its
    output (width ``dim``): the same product, fewer elements.

    Two kernels compute the same thing (``kernel``; tests compare values and
    gradients, experts without rows included):

    * ``grouped``: ``torch._grouped_mm`` over the whole stack, offsets on the
      device, no host synchronisation; one CUTLASS kernel for bf16 on sm90+;
    * ``loop``: one matmul per expert over its contiguous slice of rows (needs
      the row counts on the host).

    ``auto`` takes ``grouped`` where it is one kernel (CUDA, bf16, compute
    capability 9+) and on CPU, where its C++ loop beat ours side by side
    (docs/BENCHMARKS.md, ``d2m bench moe``); the Python loop elsewhere (other
    GPUs and dtypes, widths grouped_mm cannot take).
    """

    def __init__(self, num_local: int, dim: int, width: int, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.w1 = nn.Parameter(torch.empty(num_local, width, dim, **kw))
        self.b1 = nn.Parameter(torch.empty(num_local, width, **kw))
        self.w2 = nn.Parameter(torch.empty(num_local, dim, width, **kw))
        self.kernel = "auto"
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

    def set_kernel(self, kernel: str) -> None:
        if kernel not in EXPERT_KERNELS:
            raise ValueError(f"expert kernel must be one of {', '.join(EXPERT_KERNELS)}, got {kernel!r}")
        self.kernel = kernel

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def resolved_kernel(self, x: torch.Tensor) -> str:
        """The kernel that ``forward`` runs for rows like ``x``."""
        dtype = self._compute_dtype(x)
        size = torch.finfo(dtype).bits // 8
        # grouped_mm wants every row stride a multiple of 16 bytes
        aligned = (self.w1.shape[-1] * size) % 16 == 0 and (self.w1.shape[1] * size) % 16 == 0
        if self.kernel == "grouped":
            if not aligned:
                raise ValueError(f"grouped experts need widths x {size} bytes divisible by 16, "
                                 f"got dim {self.w1.shape[-1]}, width {self.w1.shape[1]}")
            return "grouped"
        if self.kernel == "loop":
            return "loop"
        if x.device.type == "cuda":
            supported = dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
        else:
            supported = x.device.type == "cpu"
        return "grouped" if supported and aligned else "loop"

    def forward(self, x: torch.Tensor, counts: torch.Tensor, gates: Optional[torch.Tensor] = None,
                host_counts: Optional[List[int]] = None) -> torch.Tensor:
        """``x``: rows sorted by local expert, ``counts[e]`` of them for expert e; ``gates`` [rows] or None."""
        if self.resolved_kernel(x) == "grouped":
            return self._grouped(x, counts, gates)
        return self._loop(x, counts.tolist() if host_counts is None else host_counts, gates)

    def _grouped(self, x: torch.Tensor, counts: torch.Tensor, gates: Optional[torch.Tensor]) -> torch.Tensor:
        dtype = self._compute_dtype(x)  # grouped_mm is not autocast-aware: cast here
        ends = torch.cumsum(counts, 0).to(torch.int32)
        w1, b1, w2 = self.w1.to(dtype), self.b1.to(dtype), self.w2.to(dtype)
        x = x.to(dtype)
        if (x.stride(0) * x.element_size()) % 16 or x.data_ptr() % 16:
            # a view whose row stride grouped_mm refuses: zero rows or one row sliced from a wider
            # tensor count as contiguous whatever their stride (under EP the rows arrive packed
            # with their gates as one more column, and a rank may receive none)
            x = x.clone(memory_format=torch.contiguous_format)
        h = torch._grouped_mm(x, w1.transpose(-2, -1), offs=ends)
        # the expert of each row, found on the device (no host sync)
        expert = torch.searchsorted(ends, torch.arange(x.shape[0], device=x.device, dtype=torch.int32), right=True)
        h = F.gelu(h + b1.index_select(0, expert), approximate="tanh")
        if gates is not None:
            h = h * gates.unsqueeze(-1).to(h.dtype)
        return _contiguous_grad(torch._grouped_mm(h, w2.transpose(-2, -1), offs=ends))

    def _loop(self, x: torch.Tensor, counts: List[int], gates: Optional[torch.Tensor]) -> torch.Tensor:
        outs = []
        # unbind, not w1[e]: the backward of each select would allocate a zero tensor the size of
        # the whole stack, once per expert and weight
        w1, b1, w2 = self.w1.unbind(0), self.b1.unbind(0), self.w2.unbind(0)
        gate_chunks = torch.split(gates, counts) if gates is not None else [None] * len(counts)
        # empty chunks run too: every expert stays in the graph, so all ranks'
        # backward passes (and DeepSpeed's gradient hooks) see the same parameters
        for e, (chunk, g) in enumerate(zip(torch.split(x, counts, dim=0), gate_chunks)):
            h = F.gelu(F.linear(chunk, w1[e], b1[e]), approximate="tanh")
            if g is not None:
                h = h * g.unsqueeze(-1).to(h.dtype)
            outs.append(F.linear(h, w2[e]))
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
        # every expert on this rank; parallel/expert_parallel.apply_expert_parallel slices the
        # stack and swaps in the all-to-all dispatcher
        self.dispatcher = LocalDispatcher()
        self.expert_offset = 0
        num_local = shape.num_experts
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
    def ep_size(self) -> int:
        return self.dispatcher.size

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
        # assignments known on the host without asking the device: T * k when dropless
        assignments = x2.shape[0] * (self.num_experts if self.unit_gates else self.top_k)
        if self.capacity_factor is not None and not self.unit_gates:
            kept_probs, kept_map = mu.apply_router_token_dropping(
                probs, routing_map, self.top_k, self.capacity_factor, drop_policy="probs"
            )
            kept = int(kept_map.sum())  # capacity dropping: the count needs the device
            dropped, assignments = assignments - kept, kept
            probs, routing_map = kept_probs, kept_map
        tokens_per_expert = routing_map.sum(dim=0)
        self.tokens_per_expert = tokens_per_expert.detach()
        if not self.unit_gates:
            self.stats = self._routing_stats(logits, tokens_per_expert, dropped)
        d = self.dispatcher.dispatch(x2, routing_map, probs, assignments)
        out = self.experts(d.rows, d.counts, d.gates, d.host_counts)
        return self.dispatcher.combine(out, d)

    def _routing_stats(self, logits: torch.Tensor, tokens_per_expert: torch.Tensor, dropped: int) -> RoutingStats:
        with fp32_region(logits.device.type):
            scores = torch.softmax(logits, dim=-1)
            z_sum = torch.logsumexp(logits, dim=-1).pow(2).sum() if self.z_loss_coeff else None
            with torch.no_grad():
                entropy = -(scores * torch.log(scores.clamp_min(1e-20))).sum()
        return RoutingStats(tokens=logits.shape[0], counts=tokens_per_expert.detach().float(),
                            score_sum=scores.sum(0), z_sum=z_sum, entropy_sum=entropy, dropped=dropped)

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
