"""First-order Taylor importance of every intermediate FFN neuron.

``I_j = sum over the neuron's weights |w * dL/dw|``: its up-projection row
``W1[j, :]``, bias ``b1[j]`` and down-projection column ``W2[:, j]``, with ``L``
the teacher's flow-matching loss on a calibration batch. Scores are summed over
batches (|.| is taken per batch, then accumulated), in float64.

Streaming: each batch's gradients are requested with ``torch.autograd.grad`` for
the FFN weights only, turned into per-neuron scores and dropped at once; no
per-batch gradient is kept and no other parameter needs a gradient.
Distributed: each rank scores its own batches; the per-site score vectors are
summed across ranks with one all_reduce each, so N ranks over disjoint batches
equal one process over all of them.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from d2m_dist.models.flow import FlowBatch, noised_inputs
from d2m_dist.models.flux import call_flux
from d2m_dist.models.surgery import parse_site


def _site_params(model: nn.Module, site: str) -> List[nn.Parameter]:
    """The parameters holding ``site``'s W1, b1 and W2 (W2 may be a wider tensor)."""
    stream, i, kind = parse_site(site)
    if stream == "double":
        ff = getattr(model.transformer_blocks[i], kind)
        return [ff.net[0].proj.weight, ff.net[0].proj.bias, ff.net[2].weight]
    block = model.single_transformer_blocks[i]
    return [block.proj_mlp.weight, block.proj_mlp.bias, block.proj_out.weight]


def neuron_scores(w1, g1, b1, gb1, w2, g2) -> torch.Tensor:
    """Per-neuron |w * grad| summed over W1 row, b1 entry and W2 column (float64)."""
    s = (w1.double() * g1.double()).abs().sum(1)
    s += (b1.double() * gb1.double()).abs()
    s += (w2.double() * g2.double()).abs().sum(0)
    return s


def flow_matching_loss(model: nn.Module, batch: FlowBatch, generator: torch.Generator) -> torch.Tensor:
    inputs, target = noised_inputs(batch, generator)
    pred = call_flux(model, inputs)
    return torch.mean((pred.float() - target.float()) ** 2)


class TaylorScorer:
    """Accumulates Taylor scores for a set of dense FFN sites of a FLUX transformer."""

    def __init__(self, model: nn.Module, sites: Iterable[str]):
        self.model = model
        self.sites = list(sites)
        self._params = {s: _site_params(model, s) for s in self.sites}
        self.scores: Dict[str, torch.Tensor] = {}
        self.batches = 0

    def _flat_params(self) -> List[nn.Parameter]:
        seen, out = set(), []
        for ps in self._params.values():
            for p in ps:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def accumulate(self, loss_fn: Callable[[], torch.Tensor]) -> float:
        """Add one batch: ``loss_fn`` builds the loss (params get grads only inside)."""
        params = self._flat_params()
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        try:
            loss = loss_fn()
            grads = dict(zip(map(id, params), torch.autograd.grad(loss, params)))
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
        with torch.no_grad():
            for site, (pw1, pb1, pw2) in self._params.items():
                g1, gb1, g2 = grads[id(pw1)], grads[id(pb1)], grads[id(pw2)]
                w2 = pw2
                if site.startswith("single."):
                    d = pw2.shape[0]  # proj_out = [attn | mlp]: the MLP down-projection is columns D:
                    w2, g2 = pw2[:, d:], g2[:, d:]
                s = neuron_scores(pw1, g1, pb1, gb1, w2, g2).cpu()
                self.scores[site] = self.scores[site] + s if site in self.scores else s
        self.batches += 1
        return float(loss.detach())

    def all_reduce(self, group=None) -> None:
        """Sum scores over the ranks of ``group`` (no-op without torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return
        backend = dist.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        for site in self.sites:
            t = self.scores[site].to(device)
            dist.all_reduce(t, group=group)
            self.scores[site] = t.cpu()
        n = torch.tensor([self.batches], dtype=torch.int64, device=device)
        dist.all_reduce(n, group=group)
        self.batches = int(n.item())


def taylor_scores(
    model: nn.Module,
    batches: Iterable[FlowBatch],
    sites: Iterable[str],
    *,
    seed: int = 0,
    group=None,
    progress: Optional[Callable[[int, float], None]] = None,
) -> TaylorScorer:
    """Score ``sites`` of the dense ``model`` over this rank's ``batches``, then sum over ranks.

    The noise and timesteps of batch i come from a generator seeded with
    ``(seed, i)`` on every rank, so which rank sees a batch does not change its score.
    """
    scorer = TaylorScorer(model, sites)
    device = next(model.parameters()).device
    for i, batch in enumerate(batches):
        index = i if batch.index is None else batch.index
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
        batch = batch.to(device)
        loss = scorer.accumulate(lambda: flow_matching_loss(model, batch, gen))
        if progress:
            progress(i, loss)
    scorer.all_reduce(group)
    return scorer
