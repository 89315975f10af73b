import pytest
import torch

from d2m_dist.config import ConfigError
from d2m_dist.convert.partition import balanced_kmeans, init_router, partition_site
from d2m_dist.models.spec import MoESpec
from d2m_dist.models.surgery import DenseFFN

SHAPE = MoESpec.parse("1S4E2A").resolve(8, 32)  # shared 8, 4 experts x 6


def dense(seed=0):
    g = torch.Generator().manual_seed(seed)
    return DenseFFN(torch.randn(32, 8, generator=g), torch.randn(32, generator=g), torch.randn(8, 32, generator=g), None)


def is_permutation(part, hidden=32):
    flat = torch.cat([part.shared, part.experts.reshape(-1)])
    return torch.equal(flat.sort().values, torch.arange(hidden))


@pytest.mark.parametrize("strategy", ["taylor-contiguous", "taylor-roundrobin", "cluster", "random"])
def test_every_strategy_gives_a_permutation(strategy):
    scores = torch.rand(32, generator=torch.Generator().manual_seed(1))
    part = partition_site(SHAPE, strategy, scores=scores, dense=dense(), generator=torch.Generator().manual_seed(0))
    assert part.shared.shape == (8,) and part.experts.shape == (4, 6)
    assert is_permutation(part)


def test_taylor_shared_expert_is_the_top_neurons():
    scores = torch.arange(32, dtype=torch.float64)  # neuron 31 most important
    part = partition_site(SHAPE, "taylor-contiguous", scores=scores)
    assert part.shared.tolist() == list(range(24, 32))
    # contiguous: expert 0 holds the next most important block
    assert part.experts[0].tolist() == list(range(18, 24))
    rr = partition_site(SHAPE, "taylor-roundrobin", scores=scores)
    assert rr.experts[0].tolist() == [3, 7, 11, 15, 19, 23]
    # round-robin spreads importance evenly: expert score sums differ by at most one step per slot
    sums = scores[rr.experts].sum(1)
    assert sums.max() - sums.min() <= 6 * 3


def test_balanced_kmeans_is_balanced_and_groups_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 5, generator=g) * 10
    x = torch.cat([c + 0.1 * torch.randn(6, 5, generator=g) for c in centers])
    labels = balanced_kmeans(x.double(), 3, 20, torch.Generator().manual_seed(1))
    assert torch.bincount(labels).tolist() == [6, 6, 6]
    for c in range(3):
        assert len(set(labels[c * 6 : (c + 1) * 6].tolist())) == 1


def test_router_init_mean_w1():
    d = dense()
    part = partition_site(SHAPE, "random", generator=torch.Generator().manual_seed(0))
    r = init_router(d, part, "mean_w1", None)
    torch.testing.assert_close(r[2], d.w1[part.experts[2]].mean(0))
    with pytest.raises(ConfigError):
        init_router(d, part, "bogus", None)


def test_taylor_strategies_need_scores():
    with pytest.raises(ConfigError, match="needs Taylor scores"):
        partition_site(SHAPE, "taylor-contiguous")
