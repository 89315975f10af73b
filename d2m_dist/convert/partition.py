"""Assigning the dense neurons of an FFN site to the shared expert and the routed experts.

Strategies (``partition.strategy``):

* ``taylor-contiguous``: neurons ranked by Taylor importance; the top ``Hs`` form
  the shared expert, the rest are cut in rank order into n experts (expert 0
  holds the most important routed neurons). Experts differ in importance.
* ``taylor-roundrobin``: same shared expert; the ranked rest are dealt to the
  experts like cards (neuron r goes to expert r mod n), so every expert gets an
  equal share of important and unimportant neurons.
* ``cluster``: same shared expert; the rest are grouped by balanced k-means on
  their normalised up-projection rows ``[W1_j, b1_j]``, so neurons that read
  similar input directions (and so tend to fire together) share an expert.
* ``random``: a random permutation, shared expert included (the baseline).

Indices inside each expert are sorted ascending: the order of neurons within an
expert does not change its function.
"""

from __future__ import annotations

from typing import Optional

import torch

from d2m_dist.config import ConfigError, PartitionStrategy, RouterInit
from d2m_dist.models.spec import SiteShape
from d2m_dist.models.surgery import DenseFFN, SitePartition

STRATEGIES = tuple(str(s) for s in PartitionStrategy)
ROUTER_INITS = tuple(str(r) for r in RouterInit)


def needs_scores(strategy: str) -> bool:
    return strategy != "random"


def partition_site(
    shape: SiteShape,
    strategy: str,
    *,
    scores: Optional[torch.Tensor] = None,
    dense: Optional[DenseFFN] = None,
    generator: Optional[torch.Generator] = None,
    cluster_iters: int = 20,
) -> SitePartition:
    hs, n, he = shape.shared_width, shape.num_experts, shape.expert_width
    if strategy == "random":
        perm = torch.randperm(shape.hidden, generator=generator)
        shared, rest = perm[:hs], perm[hs:]
        experts = rest.view(n, he)
    else:
        if scores is None:
            raise ConfigError(f"partition.strategy {strategy} needs Taylor scores")
        # stable descending sort: ties keep dense order, so results are reproducible
        order = torch.sort(scores.double(), descending=True, stable=True).indices
        shared, rest = order[:hs], order[hs:]
        if strategy == "taylor-contiguous":
            experts = rest.view(n, he)
        elif strategy == "taylor-roundrobin":
            experts = rest.view(he, n).t()
        elif strategy == "cluster":
            if dense is None:
                raise ValueError("cluster partition needs the dense weights")
            feats = torch.cat([dense.w1[rest], dense.b1[rest, None]], dim=1).double()
            labels = balanced_kmeans(feats, n, cluster_iters, generator)
            experts = torch.stack([rest[labels == e] for e in range(n)])
        else:
            raise ConfigError(f"partition.strategy: '{strategy}' is not one of {', '.join(STRATEGIES)}")
    return SitePartition(shared.sort().values, experts.sort(dim=1).values.contiguous())


def balanced_kmeans(x: torch.Tensor, k: int, iters: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Labels in 0..k-1 with exactly len(x)/k points per cluster (cosine geometry).

    Each round assigns points greedily by their best remaining (point, cluster)
    similarity under the equal-size constraint, then recomputes centroids.
    """
    n = x.shape[0]
    size = n // k
    x = torch.nn.functional.normalize(x, dim=1)
    centroids = x[torch.randperm(n, generator=generator)[:k]].clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(max(1, iters)):
        sim = x @ centroids.t()  # [n, k]
        order = torch.argsort(sim.reshape(-1), descending=True, stable=True).tolist()
        fill = [0] * k
        assigned = [-1] * n  # plain lists: this loop is O(n k) Python steps
        for flat in order:
            i, c = divmod(flat, k)
            if assigned[i] >= 0 or fill[c] >= size:
                continue
            assigned[i] = c
            fill[c] += 1
        new = torch.tensor(assigned, dtype=torch.long)
        if torch.equal(new, labels):
            break
        labels = new
        for c in range(k):
            centroids[c] = torch.nn.functional.normalize(x[labels == c].mean(0), dim=0)
    return labels


def init_router(dense: DenseFFN, part: SitePartition, how: str, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Initial router weight [n, D].

    ``mean_w1``: row i is the mean up-projection row of expert i's neurons, so the
    initial logit of an expert is its neurons' mean pre-activation (minus bias):
    tokens start routed to experts whose neurons they excite. ``normal``: N(0, 0.02).
    """
    n, d = part.experts.shape[0], dense.dim
    if how == "mean_w1":
        return dense.w1[part.experts].double().mean(1).float()
    if how == "normal":
        return torch.randn(n, d, generator=generator) * 0.02
    raise ConfigError(f"partition.router_init: '{how}' is not one of {', '.join(ROUTER_INITS)}")
