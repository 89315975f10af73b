"""First-order Taylor importance of every intermediate FFN neuron.

``I_j = sum over the neuron's weights |w * dL/dw|``: its up-projection row
``W1[j, :]``, bias ``b1[j]`` and down-projection column ``W2[:, j]``, with ``L``
the teacher's flow-matching loss on a calibration batch. Scores are summed over
batches (|.| is taken per batch, then accumulated), in float64.

Streaming and shard-friendly: ``dL/dW`` is rebuilt from activations, which
works the same for a plain teacher and for a DeepSpeed ZeRO-3 engine (whose
weights exist whole only while their module runs). For ``z = W1 x + b1`` and
``y = W2 a``: ``dL/dW1 = gz^T x``, ``dL/db1 = sum gz``, ``dL/dW2 = gy^T a``.
Forward hooks keep ``x`` and ``a`` (autograd keeps them anyway), tensor hooks
receive ``gz`` and ``gy`` during the backward pass, and each site's scores are
computed right there with its weights gathered (``GatheredParameters``, a no-op
for ordinary tensors); the site's gradient is dropped at once. The backward runs
from the loss to the input latents; no parameter needs ``requires_grad``.
Distributed: every rank reads the same batch sequence and scores batches
``i % world == rank``, in lockstep rounds of ``world`` batches. In a round with
fewer batches than ranks (the last one, or a short sequence) the ranks without
a batch of their own run the round's first batch and discard its scores: a
ZeRO-3 teacher's every forward and backward is collective, so all ranks must run
the same number of passes. The per-site score vectors are then summed across
ranks with one all_reduce each, so N ranks equal one process over all batches.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from d2m_dist.models.flow import FlowBatch, noised_inputs
from d2m_dist.models.flux import call_flux
from d2m_dist.models.surgery import parse_site


def flow_matching_loss(model: nn.Module, batch: FlowBatch, generator: torch.Generator) -> torch.Tensor:
    inputs, target = noised_inputs(batch, generator)
    pred = call_flux(model, inputs)
    return torch.mean((pred.float() - target.float()) ** 2)


def _gathered(params: List[nn.Parameter]):
    """ZeRO-3 partitioned parameters whole for the ``with`` body; a no-op for ordinary tensors."""
    return deepspeed.zero.GatheredParameters(params)


class TaylorScorer:
    """Accumulates Taylor scores of dense FFN sites from activation gradients (plain or ZeRO-3 teacher)."""

    def __init__(self, model: nn.Module, sites: Iterable[str]):
        self.model = model
        self.sites = list(sites)
        self.scores: Dict[str, torch.Tensor] = {}
        self.batches = 0
        self._handles = []
        self._recording = True  # False while a lockstep filler pass runs

    def _modules(self, site: str):
        """(up-projection linear, down-projection linear, down-projection column offset)."""
        stream, i, kind = parse_site(site)
        if stream == "double":
            ff = getattr(self.model.transformer_blocks[i], kind)
            return ff.net[0].proj, ff.net[2], 0
        block = self.model.single_transformer_blocks[i]
        return block.proj_mlp, block.proj_out, block.proj_out.in_features - block.proj_mlp.out_features

    def _add(self, site: str, s: torch.Tensor) -> None:
        if not self._recording:
            return
        s = s.detach().cpu()
        self.scores[site] = self.scores[site] + s if site in self.scores else s

    def _attach(self) -> None:
        for site in self.sites:
            up, down, offset = self._modules(site)
            state = {}

            def up_hook(mod, args, out, site=site, state=state, up=up):
                x = args[0].reshape(-1, args[0].shape[-1])
                state["x"] = x

                def on_gz(gz, site=site, up=up, x=x):
                    gz = gz.reshape(-1, gz.shape[-1])
                    with _gathered([up.weight, up.bias]):
                        g1 = gz.double().t() @ x.double()  # [H, D]
                        gb1 = gz.double().sum(0)
                        s = (up.weight.double() * g1).abs().sum(1) + (up.bias.double() * gb1).abs()
                    self._add(site, s)

                if out.requires_grad:
                    out.register_hook(on_gz)

            def down_hook(mod, args, out, site=site, offset=offset, down=down):
                a = args[0].reshape(-1, args[0].shape[-1])[:, offset:]  # the MLP part of proj_out's input

                def on_gy(gy, site=site, down=down, a=a, offset=offset):
                    gy = gy.reshape(-1, gy.shape[-1])
                    with _gathered([down.weight]):
                        w2 = down.weight[:, offset:].double()
                        g2 = gy.double().t() @ a.double()  # [D, H]
                        s = (w2 * g2).abs().sum(0)
                    self._add(site, s)

                if out.requires_grad:
                    out.register_hook(on_gy)

            self._handles.append(up.register_forward_hook(up_hook))
            self._handles.append(down.register_forward_hook(down_hook))

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def accumulate(self, loss_fn, inputs_requiring_grad: torch.Tensor, record: bool = True) -> float:
        """One batch: ``loss_fn()`` runs the forward; the backward goes to ``inputs_requiring_grad``.

        ``record=False``: run the passes (their collectives) but keep no score.
        """
        self._attach()
        self._recording = record
        try:
            loss = loss_fn()
            torch.autograd.grad(loss, [inputs_requiring_grad])
        finally:
            self._detach()
            self._recording = True
        self.batches += int(record)
        return float(loss.detach())

    def all_reduce(self, group=None) -> None:
        """Sum scores over the ranks of ``group`` (no-op without torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return
        backend = dist.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        for site in self.sites:
            if site not in self.scores:  # this rank scored no batch
                self.scores[site] = torch.zeros(self._modules(site)[0].out_features, dtype=torch.float64)
            t = self.scores[site].to(device)
            dist.all_reduce(t, group=group)
            self.scores[site] = t.cpu()
        n = torch.tensor([self.batches], dtype=torch.int64, device=device)
        dist.all_reduce(n, group=group)
        self.batches = int(n.item())


def _rounds(batches: Iterable[FlowBatch], world: int) -> Iterator[List[Tuple[int, FlowBatch]]]:
    """(position, batch) in groups of ``world``: one lockstep round of the ranks each."""
    chunk: List[Tuple[int, FlowBatch]] = []
    for i, batch in enumerate(batches):
        chunk.append((i, batch))
        if len(chunk) == world:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def taylor_scores(
    model: nn.Module,
    batches: Iterable[FlowBatch],
    sites: Iterable[str],
    *,
    seed: int = 0,
    group=None,
    progress: Optional[Callable[[int, float], None]] = None,
) -> TaylorScorer:
    """Score ``sites`` of the dense ``model`` over ``batches``, shared out over the ranks of ``group``.

    Every rank passes the same batch sequence and scores its share (module docstring).
    The noise and timesteps of batch i come from a generator seeded with
    ``(seed, i)`` on every rank, so which rank sees a batch does not change its score.
    Inputs are cast to the teacher's dtype (a bf16 teacher takes bf16 inputs).
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    world = dist.get_world_size(group) if distributed else 1
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the FLUX model
    scorer = TaylorScorer(module, sites)
    # diffusers models and DeepSpeed engines both say where their compute runs
    device = model.device if isinstance(getattr(model, "device", None), torch.device) else next(module.parameters()).device
    dtype = next(module.parameters()).dtype
    for chunk in _rounds(batches, world):
        mine = rank < len(chunk)
        position, batch = chunk[rank] if mine else chunk[0]
        index = position if batch.index is None else batch.index
        gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
        inputs, target = noised_inputs(batch, gen)
        inputs = inputs.to(device, dtype=dtype)
        inputs.hidden_states.requires_grad_(True)
        # the module, not the engine: ZeRO-3's gathering hooks live on the submodules, while the
        # engine's own backward bookkeeping assumes engine.backward() and an optimizer
        loss_fn = lambda: torch.mean((call_flux(module, inputs).float() - target.to(device).float()) ** 2)  # noqa: E731
        loss = scorer.accumulate(loss_fn, inputs.hidden_states, record=mine)
        if progress and mine:
            progress(position, loss)
    scorer.all_reduce(group)
    return scorer
