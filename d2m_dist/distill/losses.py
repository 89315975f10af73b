"""Distillation losses (docs/METHOD.md, section 3).

* output distillation: ``E||f_tea - f_stu||^2`` on the velocity prediction;
* block feature loss: ``sum_l w_l ||h_tea^l - h_stu^l||^2`` with detached weights
  ``w_l = (|L_out| / |L_feat^l|) * (sum_j ||h_tea^j||) / (L * ||h_tea^l||)``:
  every block's term is brought to the size of the output loss, then tilted
  towards blocks whose features are small;
* load balance: ``lambda_bal`` times the mean over MoE layers of the Switch loss,
  and the router z-loss, both from the global batch's routing statistics;
* group feature loss (MoB): ``sum_g ||h_tea^{last(g)} - h_stu^g||^2``.

Squared norms are means over elements, so losses do not grow with batch or
resolution.
"""

from __future__ import annotations

from typing import Dict, Iterable, Sequence, Tuple

import torch
import torch.distributed as dist


def output_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return torch.mean((student.float() - teacher.float()) ** 2)


def _global_stats(out_loss, per_layer, sq_norms, group):
    """The detached statistics behind the weights, over the whole data-parallel batch.

    Means average over equal-sized ranks, squared norms add up; with them every
    rank uses the weights one process with the global batch would use.
    """
    stats = torch.stack([out_loss.detach(), *[v.detach() for v in per_layer], *sq_norms]).double()
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world > 1:
        dist.all_reduce(stats, group=group)
        n = len(per_layer)
        stats[: 1 + n] /= world
    return stats


def block_feature_loss(student: Dict[str, torch.Tensor], teacher: Dict[str, torch.Tensor],
                       out_loss: torch.Tensor, group=None, eps: float = 1e-12) -> torch.Tensor:
    keys = [k for k in teacher if k in student]
    if not keys:
        return out_loss.new_zeros(())
    per_layer = [torch.mean((student[k].float() - teacher[k].float()) ** 2) for k in keys]
    sq_norms = [teacher[k].float().pow(2).sum() for k in keys]
    stats = _global_stats(out_loss, per_layer, sq_norms, group)
    n = len(keys)
    out_abs, layer_abs, norms = stats[0].abs(), stats[1 : 1 + n].abs(), stats[1 + n :].sqrt()
    weights = (out_abs / (layer_abs + eps)) * norms.sum() / (n * norms + eps)
    return sum(w.to(term.dtype) * term for w, term in zip(weights, per_layer))


def group_feature_loss(student: Dict[str, torch.Tensor], teacher: Dict[str, torch.Tensor],
                       groups: Iterable[str]) -> torch.Tensor:
    terms = [torch.mean((student[k].float() - teacher[k].float()) ** 2) for k in groups]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def router_aux_losses(layers: Sequence, group=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(load balance, z-loss) of the global batch from every MoE layer's :class:`RoutingStats`.

    Balance: the mean over layers of the Switch loss ``n * sum_i f_i P_i``, with
    ``f_i`` the fraction of the global batch's assignments that went to expert i and
    ``P_i`` its mean router score over the global batch's tokens. z-loss: the sum
    over layers of ``coeff * mean_t logsumexp(logits_t)^2``.

    Collective over ``group`` (the data-parallel ranks): one all_reduce of every
    layer's counts, whatever ran where. ``layers`` must be the same list on every
    rank; a layer that routed nothing on this rank (top-k 0, or a block that Mixture
    of Blocks skipped here) contributes zeros. Each rank's value is scaled so that
    the mean over ranks, which is what DeepSpeed's gradient averaging optimises and
    what the trainer logs, is the global batch's loss even when ranks routed
    different numbers of tokens through a layer.
    """
    stats = [layer.stats for layer in layers]
    device = next((s.counts.device for s in stats if s is not None), torch.device("cpu"))
    parts = []
    for layer, s in zip(layers, stats):
        if s is None:
            parts.append(torch.zeros(layer.num_experts + 1, dtype=torch.float64, device=device))
        else:
            parts.append(torch.cat([s.counts.double(), torch.tensor([float(s.tokens)], dtype=torch.float64,
                                                                    device=device)]))
    world = 1
    if parts:
        flat = torch.cat(parts)
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)
            world = dist.get_world_size(group)
        parts = list(flat.split([layer.num_experts + 1 for layer in layers]))
    balance_terms, z_terms, routed_layers = [], [], 0
    for layer, s, g in zip(layers, stats, parts):
        counts, tokens = g[:-1], float(g[-1])
        if tokens == 0:
            continue  # no rank routed through this layer
        routed_layers += 1
        if s is None:
            continue
        f = (counts / counts.sum().clamp_min(1)).to(s.score_sum.dtype)
        p_share = s.score_sum * (world / tokens)  # this rank's share of the global mean score, times world
        balance_terms.append(layer.num_experts * torch.sum(f * p_share))
        if s.z_sum is not None:
            z_terms.append(layer.z_loss_coeff * s.z_sum * (world / tokens))
    zero = torch.zeros((), device=device)
    balance = torch.stack(balance_terms).sum() / routed_layers if balance_terms else zero
    z = torch.stack(z_terms).sum() if z_terms else zero
    return balance, z
