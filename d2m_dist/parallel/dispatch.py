"""Token dispatchers: which rows each expert computes, and how its outputs come back.

An MoE layer routes flat tokens ``x`` [T, D] with a boolean ``routing_map``
[T, E] (token t uses expert e) and gates ``probs`` [T, E]. A dispatcher turns
that into one contiguous block of rows per local expert (expert-major order,
tokens ascending inside a block), with the gate of each row, and later adds
each row's expert output back into its token.

* :class:`LocalDispatcher` (every expert on this rank). On the GPU it never
  waits for the device: the number of assignments is known on the host when
  routing is dropless (``T * k``), the order comes from one stable sort, and
  the per-expert counts stay on the device (a grouped matmul takes them there).
* :class:`AllToAllDispatcher` (expert parallelism, experts split over the ranks
  of a process group). Rows travel by ``all_to_all`` to the rank that owns their
  expert and back; the split sizes that ``all_to_all`` needs are the one
  device-to-host copy (one per layer and forward).

The reordering between the layouts the exchange produces ([source rank][local
expert]) and the one the experts want ([local expert][source rank]) is the pure
function :func:`chunk_permutation`, tested without processes.

The gates travel with the rows (one more column) so that the expert can apply them at its hidden
width (experts have no output bias: ``g * W2 h == W2 (g * h)``), which is four
times fewer elements than the output width at FLUX's 1S12E2A.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from d2m_dist.parallel.comm_timing import COMM_CLOCK


@dataclass
class Dispatched:
    """Rows for this rank's experts, expert-major, and what combining them back needs."""

    rows: torch.Tensor  # [N, D] input rows, expert-major over this rank's experts
    gates: torch.Tensor  # [N] fp32 gate of each row
    counts: torch.Tensor  # [num_local] int64, rows per local expert, on the rows' device
    host_counts: Optional[List[int]]  # the same counts on the host when known without a sync
    token_index: torch.Tensor  # [M] token of each locally permuted assignment (M = N without EP)
    tokens: int  # T
    exchange: Optional["_Exchange"] = None  # expert parallelism: how rows travelled


@dataclass
class _Exchange:
    input_splits: List[int]  # rows sent to each rank
    output_splits: List[int]  # rows received from each rank
    to_source_major: torch.Tensor  # gather index: expert-major rows -> [source rank][local expert]


def chunk_permutation(counts: torch.Tensor) -> torch.Tensor:
    """Gather index that reorders rows laid out in chunks ``[r][c]`` into ``[c][r]``.

    ``counts`` [R, C]: chunk (r, c) holds ``counts[r, c]`` consecutive rows, chunks
    in row-major order. ``rows[chunk_permutation(counts)]`` lists the same chunks in
    column-major order, each chunk's rows in their original order. The inverse is
    ``chunk_permutation(counts.t())``.
    """
    R, C = counts.shape
    flat = counts.reshape(-1).to(torch.int64)
    start = torch.cumsum(flat, 0) - flat  # where chunk (r, c) begins in the source layout
    target_order = torch.arange(R * C, device=counts.device).view(R, C).t().reshape(-1)
    lengths, starts = flat[target_order], start[target_order]
    total = int(flat.sum()) if flat.device.type == "cpu" else None
    chunk_of_row = torch.repeat_interleave(torch.arange(R * C, device=counts.device), lengths, output_size=total)
    begin_in_target = torch.cumsum(lengths, 0) - lengths
    row = torch.arange(chunk_of_row.numel(), device=counts.device)
    return starts[chunk_of_row] + row - begin_in_target[chunk_of_row]


def permute_local(x: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor, assignments: Optional[int]):
    """Expert-major rows for every assignment in ``routing_map``: (rows, gates, counts, token_index).

    ``assignments``: how many True entries ``routing_map`` holds, when the caller
    knows it (dropless top-k: T * k); None counts them (one device-to-host copy).
    """
    T, E = routing_map.shape
    flat = routing_map.t().reshape(-1)  # expert-major: entry e * T + t
    if assignments is None:
        assignments = int(flat.sum())
    # a stable sort puts the True entries first, in expert-major order, tokens ascending
    order = torch.argsort((~flat).to(torch.int8), stable=True)[:assignments]
    token_index = order % T
    gates = probs.t().reshape(-1).index_select(0, order).float()
    counts = routing_map.sum(dim=0).to(torch.int64)
    return x.index_select(0, token_index), gates, counts, token_index


def unpermute_local(out: torch.Tensor, token_index: torch.Tensor, tokens: int) -> torch.Tensor:
    """Sum each assignment's output into its token: [M, D] -> [T, D]."""
    return out.new_zeros(tokens, out.shape[-1]).index_add(0, token_index, out)


class LocalDispatcher:
    """Every expert lives on this rank."""

    size = 1

    def dispatch(self, x: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor,
                 assignments: Optional[int]) -> Dispatched:
        rows, gates, counts, token_index = permute_local(x, routing_map, probs, assignments)
        return Dispatched(rows, gates, counts, None, token_index, x.shape[0])

    def combine(self, out: torch.Tensor, d: Dispatched) -> torch.Tensor:
        return unpermute_local(out, d.token_index, d.tokens)


class _AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` with uneven splits (the backward is the reverse exchange)."""

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


class AllToAllDispatcher:
    """Experts split evenly over the ranks of ``group``: rank r owns global experts ``r * n_local + j``."""

    def __init__(self, group, num_experts: int):
        self.group = group
        self.size = dist.get_world_size(group)
        if num_experts % self.size:
            raise ValueError(f"{self.size} expert-parallel ranks do not divide {num_experts} experts")
        self.num_local = num_experts // self.size

    def dispatch(self, x: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor,
                 assignments: Optional[int]) -> Dispatched:
        ep, nl = self.size, self.num_local
        rows, gates, send_counts, token_index = permute_local(x, routing_map, probs, assignments)
        # how many of my rows go to each (rank, local expert), and how many each rank sends me
        recv_counts = torch.empty_like(send_counts)
        with COMM_CLOCK.measure(send_counts.device):
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        # the split sizes all_to_all needs: the one device-to-host copy
        counts_host = torch.stack([send_counts, recv_counts]).cpu()
        send_by_rank, recv_by_rank = counts_host.view(2, ep, nl).sum(2).tolist()
        recv = counts_host[1].view(ep, nl)  # [source rank][local expert]
        to_expert_major = chunk_permutation(recv).to(x.device)
        # the gates ride along as one more column, in the rows' dtype (the expert rounds them to its
        # compute dtype anyway): one exchange instead of two, each a latency that small sites feel,
        # and the gates' gradients come back with the rows'
        packed = torch.cat([rows, gates.to(rows.dtype).unsqueeze(1)], 1)
        packed = all_to_all(packed, recv_by_rank, send_by_rank, self.group).index_select(0, to_expert_major)
        # copies, not views: a view saved for the backward (the gate column is) would keep the whole
        # exchanged buffer alive until then (found by the planner's activation check, tests/plan)
        received, received_gates = packed[:, :-1].contiguous(), packed[:, -1].contiguous().float()
        exchange = _Exchange(send_by_rank, recv_by_rank, chunk_permutation(recv.t()).to(x.device))
        local_counts = recv.sum(0)
        return Dispatched(received, received_gates, local_counts.to(x.device), local_counts.tolist(), token_index,
                          x.shape[0], exchange)

    def combine(self, out: torch.Tensor, d: Dispatched) -> torch.Tensor:
        e = d.exchange
        back = all_to_all(out.index_select(0, e.to_source_major), e.input_splits, e.output_splits, self.group)
        return unpermute_local(back, d.token_index, d.tokens)
