import torch
import pytest

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


def reference(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token loop: softmax over all experts, keep top-k (no renorm)."""
    out = []
    for tok in x.reshape(-1, x.shape[-1]):
        y = layer.bias + layer.shared(tok)
        scores = torch.softmax(layer.router.weight @ tok, -1)
        vals, idx = scores.topk(layer.top_k)
        for v, e in zip(vals, idx):
            h = torch.nn.functional.gelu(layer.experts.w1[e] @ tok + layer.experts.b1[e], approximate="tanh")
            y = y + v * (layer.experts.w2[e] @ h)
        out.append(y)
    return torch.stack(out).reshape(x.shape)


def test_matches_token_loop_reference():
    layer = make_layer()
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-5, atol=1e-6)


def test_stats_and_aux_losses():
    layer = make_layer(z_loss_coeff=1e-3)
    x = torch.randn(50, 16)
    layer(x)
    assert layer.tokens_per_expert.sum() == 50 * 2
    assert layer.aux_loss is not None and layer.aux_loss > 0
    assert layer.z_loss is not None and layer.z_loss > 0
    assert 0 < layer.router_entropy <= torch.log(torch.tensor(4.0)) + 1e-6


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
    layer(torch.randn(40, 16))
    assert layer.dropped_tokens > 0
    assert layer.tokens_per_expert.max() <= 10  # ceil(40 * 2 / 4 * 0.5)


def test_router_is_fp32_under_bf16():
    layer = make_layer(dtype=torch.bfloat16)
    assert layer.router.weight.dtype == torch.float32
    y = layer(torch.randn(5, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def _ep_worker(rank, world, x_all, state):
    import torch.distributed as dist

    group = dist.new_group(list(range(world)))
    torch.manual_seed(0)
    layer = MoEFeedForward(MoESpec.parse("1S4E2A").resolve(16, 64), ep_group=group)
    nl = 4 // world
    sd = dict(state)
    for w in ("w1", "b1", "w2"):
        sd[f"experts.{w}"] = state[f"experts.{w}"][rank * nl : (rank + 1) * nl]
    layer.load_state_dict(sd)
    x = x_all[rank].clone().requires_grad_(True)
    y = layer(x)
    y.pow(2).sum().backward()
    ref = MoEFeedForward(MoESpec.parse("1S4E2A").resolve(16, 64))
    ref.load_state_dict(state)
    xr = x_all[rank].clone().requires_grad_(True)
    yr = ref(xr)
    yr.pow(2).sum().backward()
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    # this rank's expert grads come from every rank's tokens: compare with the sum of refs
    g = ref.experts.w1.grad.clone()
    dist.all_reduce(g)
    torch.testing.assert_close(layer.experts.w1.grad, g[rank * nl : (rank + 1) * nl], rtol=1e-5, atol=1e-6)


@pytest.mark.multiproc
def test_expert_parallel_all_to_all_matches_single_rank():
    layer = make_layer()
    state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    x_all = torch.randn(2, 9, 16)
    run_ranks(_ep_worker, 2, x_all, state)
