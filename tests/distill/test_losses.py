"""The distillation losses against hand calculations on tiny tensors (plain Python arithmetic).

Every expected value here is computed without the code under test: closed forms
with ``math``, softmax and top-k written out in Python, and, for the routing
losses, megatron-core's own Switch function as a second reference. The
distributed cases check that the mean over ranks (what DeepSpeed's gradient
averaging optimises) is the global batch's loss, also when ranks route different
numbers of tokens through a layer or none at all.
"""

from __future__ import annotations

import math

import pytest
import torch

from d2m_dist.distill import losses as L
from d2m_dist.models.moe import MoEFeedForward
from d2m_dist.models.spec import MoESpec
from tests.distributed import run_ranks


def test_output_loss_is_the_mean_squared_error():
    s = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    t = torch.tensor([[0.0, 2.0], [1.0, 5.0]])
    assert float(L.output_loss(s, t)) == pytest.approx((1 + 0 + 4 + 0) / 4)


def test_block_feature_loss_weights_by_hand():
    t1 = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    s1 = t1 + torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # mean squared error 2/4
    t2 = torch.tensor([[[0.0, 0.0], [0.0, 2.0]]])
    s2 = (t2 + torch.tensor([[[0.0, 0.0], [0.0, 0.5]]])).requires_grad_(True)  # 0.25/4
    s1 = s1.requires_grad_(True)
    out = torch.tensor(0.1)
    loss = L.block_feature_loss({"double.0": s1, "single.0": s2}, {"double.0": t1, "single.0": t2}, out)
    # w_l = (|L_out| / L_l) * (sum_j ||t_j||) / (L * ||t_l||), with L = 2 layers
    n1, n2 = math.sqrt(1 + 4 + 9 + 16), 2.0
    l1, l2 = 0.5, 0.0625
    w1 = (0.1 / l1) * (n1 + n2) / (2 * n1)
    w2 = (0.1 / l2) * (n1 + n2) / (2 * n2)
    assert float(loss.detach()) == pytest.approx(w1 * l1 + w2 * l2, rel=1e-6)
    loss.backward()
    # the weights are detached: d/ds1 = w1 * 2 (s1 - t1) / 4
    torch.testing.assert_close(s1.grad, w1 * 2 * (s1 - t1).detach() / 4)
    torch.testing.assert_close(s2.grad, w2 * 2 * (s2 - t2).detach() / 4)


def test_group_feature_loss_sums_the_groups_mean_squared_errors():
    t = {"single.1": torch.zeros(1, 2, 2), "single.3": torch.ones(1, 2, 2), "double.0": torch.zeros(1, 2, 2)}
    s = {"single.1": torch.full((1, 2, 2), 2.0), "single.3": torch.full((1, 2, 2), 0.5),
         "double.0": torch.full((1, 2, 2), 9.0)}
    # only the named groups count
    assert float(L.group_feature_loss(s, t, ["single.1", "single.3"])) == pytest.approx(4.0 + 0.25)


# ----------------------------------------------------------------------------- routing losses


ROUTER = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.5], [0.5, -0.5]]  # 4 experts over 2 input features


def make_layer(k=2, z=0.0, renormalize=False):
    layer = MoEFeedForward(MoESpec.parse(f"1S4E{k}A").resolve(2, 10), z_loss_coeff=z, renormalize=renormalize)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor(ROUTER))
    return layer


def by_hand(tokens, k=2, z=0.0):
    """(Switch balance n * sum_i f_i P_i, z-loss) of one layer over ``tokens``, in plain Python."""
    n = len(ROUTER)
    counts, score_sums, z_sum = [0] * n, [0.0] * n, 0.0
    for x in tokens:
        logits = [sum(w * v for w, v in zip(row, x)) for row in ROUTER]
        m = max(logits)
        exps = [math.exp(v - m) for v in logits]
        total = sum(exps)
        scores = [e / total for e in exps]
        for i in sorted(range(n), key=lambda i: -scores[i])[:k]:
            counts[i] += 1
        score_sums = [a + b for a, b in zip(score_sums, scores)]
        z_sum += (m + math.log(total)) ** 2
    f = [c / sum(counts) for c in counts]
    p = [s / len(tokens) for s in score_sums]
    return n * sum(a * b for a, b in zip(f, p)), z * z_sum / len(tokens)


TOKENS = [[0.3, -1.2], [2.0, 0.1], [-0.7, 0.4], [1.1, 1.5], [0.0, -0.2]]


def test_switch_balance_and_z_loss_by_hand():
    layer = make_layer(k=2, z=1e-2)
    layer(torch.tensor(TOKENS))
    balance, z = L.router_aux_losses([layer])
    want_balance, want_z = by_hand(TOKENS, k=2, z=1e-2)
    assert balance.item() == pytest.approx(want_balance, rel=1e-6)
    assert z.item() == pytest.approx(want_z, rel=1e-6)
    # megatron-core's Switch function on the same routing agrees
    from d2m_dist.models import _megatron as mu

    logits = torch.tensor(TOKENS) @ torch.tensor(ROUTER).t()
    ref = mu.switch_load_balancing_loss_func(torch.softmax(logits, -1), layer.tokens_per_expert.float(), len(TOKENS),
                                             2, 4, 1.0)
    assert balance.item() == pytest.approx(float(ref), rel=1e-6)


def test_balance_is_the_mean_over_layers_and_skips_layers_that_did_not_route():
    a, b, idle = make_layer(k=1), make_layer(k=2), make_layer(k=2)
    a(torch.tensor(TOKENS[:3]))
    b(torch.tensor(TOKENS[2:]))
    idle.set_top_k(0)
    idle(torch.tensor(TOKENS))  # k = 0: the shared expert alone, nothing routed
    balance, _ = L.router_aux_losses([a, b, idle])
    want = (by_hand(TOKENS[:3], k=1)[0] + by_hand(TOKENS[2:], k=2)[0]) / 2
    assert balance.item() == pytest.approx(want, rel=1e-6)


def _uneven_ranks_worker(rank, world, shares, expected_value, expected_grad):
    layer = make_layer(k=2, z=1e-2)
    layer.experts.requires_grad_(False)
    tokens = shares[rank]
    if tokens:
        layer(torch.tensor(tokens))
    # else: a block that Mixture of Blocks skipped on this rank: the layer never ran here
    balance, z = L.router_aux_losses([layer])
    value = torch.stack([balance, z]).detach().clone()
    torch.distributed.all_reduce(value)
    torch.testing.assert_close(value / world, expected_value, rtol=1e-6, atol=0)
    if balance.requires_grad:  # a rank that routed nothing has no graph to differentiate
        (balance + z).backward()
    grad = layer.router.weight.grad if layer.router.weight.grad is not None else torch.zeros(4, 2)
    torch.distributed.all_reduce(grad)  # DeepSpeed averages gradients over ranks
    torch.testing.assert_close(grad / world, expected_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.multiproc
@pytest.mark.parametrize("shares", [(TOKENS[:2], TOKENS[2:]), (TOKENS, [])], ids=["2+3 tokens", "5+0 tokens"])
def test_ranks_with_uneven_tokens_average_to_the_global_batch(shares):
    everything = [t for s in shares for t in s]
    want_balance, want_z = by_hand(everything, k=2, z=1e-2)
    single = make_layer(k=2, z=1e-2)
    single(torch.tensor(everything))
    balance, z = L.router_aux_losses([single])
    (balance + z).backward()
    run_ranks(_uneven_ranks_worker, 2, list(shares), torch.tensor([want_balance, want_z], dtype=torch.float32),
              single.router.weight.grad.clone())
