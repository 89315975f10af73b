"""Distillation losses (METHOD.md section 3).

* output distillation: ``E||f_tea - f_stu||^2`` on the velocity prediction;
* block feature loss: ``sum_l w_l ||h_tea^l - h_stu^l||^2`` with detached weights
  ``w_l = (|L_out| / |L_feat^l|) * (sum_j ||h_tea^j||) / (L * ||h_tea^l||)``:
  every block's term is brought to the size of the output loss, then tilted
  towards blocks whose features are small;
* load balance: ``lambda_bal`` times the mean over MoE layers of the Switch loss;
* group feature loss (MoB): ``sum_g ||h_tea^{last(g)} - h_stu^g||^2``.

Squared norms are means over elements, so losses do not grow with batch or
resolution.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

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
    return sum(w.to(l.dtype) * l for w, l in zip(weights, per_layer))


def group_feature_loss(student: Dict[str, torch.Tensor], teacher: Dict[str, torch.Tensor],
                       groups: Iterable[str]) -> torch.Tensor:
    terms = [torch.mean((student[k].float() - teacher[k].float()) ** 2) for k in groups]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def balance_loss(aux_losses: Iterable[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    terms = [a for a in aux_losses if a is not None]
    return torch.stack(terms).mean() if terms else None
