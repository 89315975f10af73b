import pytest
import torch

from d2m_dist.models.moe import MoEFeedForward
from d2m_dist.models.spec import MoESpec
from tests.distributed import run_ranks


def make_layer(spec="1S4E2A", dim=16, hidden=64, seed=0, **kw):
    torch.manual_seed(seed)
    layer = MoEFeedForward(MoESpec.parse(spec).resolve(dim, hidden), **kw)
    with torch.no_grad():
        layer.router.weight.normal_()
        layer.bias.normal_()
    return layer


def reference(layer: MoEFeedForward, x: torch.Tensor, renormalize: bool = False) -> torch.Tensor:
    """Token-by-token loop: softmax over all experts, keep top-k (renormalised to sum 1 if asked)."""
    out = []
    for tok in x.reshape(-1, x.shape[-1]):
        y = layer.bias + layer.shared(tok)
        scores = torch.softmax(layer.router.weight @ tok, -1)
        vals, idx = scores.topk(layer.top_k)
        if renormalize:
            vals = vals / vals.sum()
        for v, e in zip(vals, idx):
            h = torch.nn.functional.gelu(layer.experts.w1[e] @ tok + layer.experts.b1[e], approximate="tanh")
            y = y + v * (layer.experts.w2[e] @ h)
        out.append(y)
    return torch.stack(out).reshape(x.shape)


def test_matches_token_loop_reference():
    layer = make_layer()
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-5, atol=1e-6)


def test_renormalized_top_k_matches_the_reference():
    layer = make_layer(renormalize=True)
    x = torch.randn(3, 7, 16)
    out = layer(x)
    torch.testing.assert_close(out, reference(layer, x, renormalize=True), rtol=1e-5, atol=1e-6)
    # and it is a different layer from the plain top-k one
    assert not torch.allclose(out, reference(layer, x), rtol=1e-3, atol=1e-4)


def test_routing_stats_are_the_sums_of_a_token_loop():
    layer = make_layer(z_loss_coeff=1e-3)
    x = torch.randn(50, 16)
    layer(x)
    logits = x @ layer.router.weight.t()
    scores = torch.softmax(logits, -1)
    chosen = scores.topk(2, dim=-1).indices
    counts = torch.zeros(4)
    for row in chosen:
        counts[row] += 1
    s = layer.stats
    assert s.tokens == 50 and torch.equal(s.counts, counts) and torch.equal(layer.tokens_per_expert.float(), counts)
    torch.testing.assert_close(s.score_sum, scores.sum(0))
    torch.testing.assert_close(s.z_sum, (torch.logsumexp(logits, -1) ** 2).sum())
    torch.testing.assert_close(s.entropy_sum, -(scores * scores.log()).sum())
    assert s.dropped == 0
    layer.set_top_k(0)
    layer(x)
    assert layer.stats is None  # nothing routed: nothing to balance


def test_top_k_changeable_at_inference():
    layer = make_layer()
    x = torch.randn(10, 16)
    layer.set_top_k(0)
    torch.testing.assert_close(layer(x), layer.bias + layer.shared(x))
    layer.set_top_k(4)
    assert layer(x).shape == x.shape and layer.tokens_per_expert.tolist() == [10] * 4
    with pytest.raises(ValueError):
        layer.set_top_k(5)


def test_gradients_reach_router_and_experts():
    layer = make_layer()
    layer(torch.randn(20, 16)).pow(2).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.w1.grad.abs().sum() > 0


def test_capacity_drops_and_counts():
    layer = make_layer(capacity_factor=0.5)
    x = torch.randn(40, 16)
    layer(x)
    assert layer.tokens_per_expert.max() <= 10  # ceil(40 * 2 / 4 * 0.5)
    # what was dropped: every assignment above an expert's capacity, the lowest scores first
    scores = torch.softmax(x @ layer.router.weight.t(), -1)
    top = scores.topk(2, dim=-1)
    want_dropped = 0
    for e in range(4):
        mine = top.values[top.indices == e]
        want_dropped += max(0, mine.numel() - 10)
    assert want_dropped > 0 and layer.stats.dropped == want_dropped
    assert int(layer.tokens_per_expert.sum()) == 80 - want_dropped


def test_router_is_fp32_under_bf16():
    layer = make_layer(dtype=torch.bfloat16)
    assert layer.router.weight.dtype == torch.float32
    y = layer(torch.randn(5, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def _ep_worker(rank, world, x_all, state, capacity_factor=None, dtype=torch.float32):
    import torch.distributed as dist

    from d2m_dist.parallel.expert_parallel import apply_expert_parallel

    group = dist.new_group(list(range(world)))
    torch.manual_seed(0)
    layer = MoEFeedForward(MoESpec.parse("1S4E2A").resolve(16, 64), capacity_factor=capacity_factor, dtype=dtype)
    layer.load_state_dict(state)
    assert apply_expert_parallel(layer, group) == 1  # the explicit step keeps this rank's slice
    nl = 4 // world
    assert layer.expert_offset == rank * nl and layer.experts.num_local == nl
    torch.testing.assert_close(layer.experts.w1, state["experts.w1"][rank * nl : (rank + 1) * nl].to(dtype))
    x = x_all[rank].to(dtype).requires_grad_(True)
    y = layer(x)
    y.float().pow(2).sum().backward()
    ref = MoEFeedForward(MoESpec.parse("1S4E2A").resolve(16, 64), capacity_factor=capacity_factor, dtype=dtype)
    ref.load_state_dict(state)
    xr = x_all[rank].to(dtype).requires_grad_(True)
    yr = ref(xr)
    yr.float().pow(2).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, yr, **tol)
    torch.testing.assert_close(x.grad, xr.grad, **tol)
    # the gates' gradients came back through the exchange: the routers' gradients agree
    torch.testing.assert_close(layer.router.weight.grad, ref.router.weight.grad, **tol)
    # this rank's expert grads come from every rank's tokens: compare with the sum of refs
    g = ref.experts.w1.grad.clone()
    dist.all_reduce(g)
    torch.testing.assert_close(layer.experts.w1.grad, g[rank * nl : (rank + 1) * nl], **tol)
    if capacity_factor is not None:  # the capacity applies to each rank's own tokens, as on one rank
        assert layer.stats.dropped == ref.stats.dropped > 0
        assert torch.equal(layer.tokens_per_expert, ref.tokens_per_expert)


@pytest.mark.multiproc
@pytest.mark.parametrize("capacity_factor,dtype", [(None, torch.float32), (0.5, torch.float32),
                                                   (None, torch.bfloat16)],
                         ids=["dropless", "capacity 0.5", "bf16 rows"])
def test_expert_parallel_all_to_all_matches_single_rank(capacity_factor, dtype):
    layer = make_layer()
    state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    x_all = torch.randn(2, 9, 16)
    run_ranks(_ep_worker, 2, x_all, state, capacity_factor, dtype)


@pytest.mark.multiproc
def test_expert_parallel_when_one_rank_s_experts_receive_no_token():
    """Every token prefers experts 0 and 1 (rank 0's): rank 1 receives zero rows, runs its experts on
    nothing, and both ranks still match the single-rank layer (a zero-row view once broke the kernel)."""
    layer = make_layer()
    state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    state["router.weight"] = torch.cat([torch.ones(2, 16), -torch.ones(2, 16)])
    x_all = torch.randn(2, 9, 16).abs()
    run_ranks(_ep_worker, 2, x_all, state)


@pytest.mark.parametrize("empty", [False, True], ids=["all experts busy", "experts without rows"])
def test_grouped_kernel_equals_the_loop_in_values_and_gradients(empty):
    from d2m_dist.models.moe import ExpertStack

    torch.manual_seed(3)
    stack = ExpertStack(4, 16, 12)
    counts = torch.tensor([0, 5, 0, 4]) if empty else torch.tensor([3, 2, 5, 1])
    x = torch.randn(int(counts.sum()), 16)
    gates = torch.rand(x.shape[0])
    results = []
    for kernel in ("grouped", "loop"):
        stack.set_kernel(kernel)
        stack.zero_grad(set_to_none=True)
        xi, gi = x.clone().requires_grad_(True), gates.clone().requires_grad_(True)
        out = stack(xi, counts, gi)
        out.sum().backward()  # an expanded gradient: the grouped backward needs it made dense
        results.append([out.detach(), xi.grad, gi.grad] + [p.grad.clone() for p in stack.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if empty:  # experts without rows get zero gradients, not none
        assert results[0][3][0].abs().sum() == 0 and results[0][3][1].abs().sum() > 0
    # and both equal a per-row hand calculation
    want = []
    expert = torch.repeat_interleave(torch.arange(4), counts)
    for row, e, g in zip(x, expert, gates):
        h = torch.nn.functional.gelu(stack.w1[e] @ row + stack.b1[e], approximate="tanh")
        want.append(stack.w2[e] @ (g * h))
    torch.testing.assert_close(results[0][0], torch.stack(want), rtol=1e-5, atol=1e-6)


def test_whole_layer_grouped_equals_loop():
    layer = make_layer()
    x = torch.randn(3, 7, 16)
    outs = []
    for kernel in ("grouped", "loop"):
        layer.experts.set_kernel(kernel)
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.pow(2).sum().backward()
        outs.append((y.detach(), xi.grad, layer.router.weight.grad.clone(), layer.experts.w2.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grouped_kernel_refuses_misaligned_widths_and_auto_falls_back():
    from d2m_dist.models.moe import ExpertStack

    stack = ExpertStack(2, 6, 5)  # rows of 6 and 5 floats: not multiples of 16 bytes
    x = torch.randn(3, 6)
    assert stack.resolved_kernel(x) == "loop"
    stack.set_kernel("grouped")
    with pytest.raises(ValueError, match="divisible by 16"):
        stack(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="expert kernel"):
        stack.set_kernel("fast")


def test_grouped_kernel_takes_a_single_row_view_of_any_stride():
    """A one-row or zero-row slice of a wider tensor is 'contiguous' to torch whatever its row stride,
    which grouped_mm refuses (seen under EP: the rows arrive packed with their gates as one more
    column, and a rank may receive none for a layer)."""
    from d2m_dist.models.moe import ExpertStack

    torch.manual_seed(4)
    stack = ExpertStack(2, 16, 12)
    packed = torch.randn(1, 17)
    x = packed[:, :16].contiguous()
    assert x.is_contiguous() and x.stride(0) == 17
    counts = torch.tensor([0, 1])
    stack.set_kernel("grouped")
    out = stack(x, counts)
    stack.set_kernel("loop")
    torch.testing.assert_close(out, stack(x, counts))
    # and zero rows (a rank that receives no token), sliced the same way
    none = torch.randn(0, 17)[:, :16].contiguous()
    assert none.stride(0) == 17
    stack.set_kernel("grouped")
    assert stack(none, torch.tensor([0, 0])).shape == (0, 16)
