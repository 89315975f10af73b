"""Expert parallelism as a step on a built layer, and DeepSpeed's view of our layers."""

from __future__ import annotations

import pytest
import torch
from deepspeed.moe.layer import MoE as DeepSpeedMoE

from d2m_dist.config import ConfigError
from d2m_dist.models.moe import MoEFeedForward
from d2m_dist.models.spec import MoESpec
from d2m_dist.parallel.deepspeed_setup import adopt_moe_layers
from d2m_dist.parallel.dispatch import AllToAllDispatcher, LocalDispatcher
from d2m_dist.parallel.expert_parallel import apply_expert_parallel, expert_layers
from tests.distributed import run_ranks


def _layer(spec="1S4E2A"):
    torch.manual_seed(0)
    return MoEFeedForward(MoESpec.parse(spec).resolve(16, 64))


def test_deepspeed_adoption_is_one_class_made_once_and_idempotent():
    a, b = _layer(), _layer()
    model = torch.nn.Sequential(a, b)
    adopt_moe_layers(model, 2)
    cls = type(a)
    assert isinstance(a, DeepSpeedMoE) and isinstance(a, MoEFeedForward) and type(b) is cls
    keys = set(model.state_dict())
    adopt_moe_layers(model, 2)  # again: nothing changes, no second set of hooks
    c = _layer()
    adopt_moe_layers(torch.nn.Sequential(c), 2)
    assert type(a) is cls and type(c) is cls
    assert set(model.state_dict()) == keys
    assert "0.deepspeed_moe.experts.deepspeed_experts.3.w1" in keys and "0.experts.w1" not in keys
    # DeepSpeed's per-expert keys load back into the stacks
    fresh = torch.nn.Sequential(_layer(), _layer())
    adopt_moe_layers(fresh, 2)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh[1].experts.w2, b.experts.w2)


def test_a_group_of_one_leaves_the_model_alone():
    layer = _layer()
    assert apply_expert_parallel(layer, None) == 0
    assert isinstance(layer.dispatcher, LocalDispatcher) and layer.experts.num_local == 4


def _split_worker(rank, world, state):
    import torch.distributed as dist

    group = dist.new_group(list(range(world)))
    model = torch.nn.Sequential(_layer(), _layer("1S2E1A") if world == 4 else _layer())
    if world == 4:  # 2 experts do not split over 4 ranks: one line, nothing changed
        with pytest.raises(ConfigError, match="ep_size 4 does not divide the 2 experts of 1"):
            apply_expert_parallel(model, group)
        assert model[0].experts.num_local == 4
        model = torch.nn.Sequential(_layer())
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})
    full = sum(p.numel() for _, m in expert_layers(model) for p in m.experts.parameters())
    assert apply_expert_parallel(model, group) == len(model)
    local = sum(p.numel() for _, m in expert_layers(model) for p in m.experts.parameters())
    assert local * world == full  # the expert state per rank is 1/world of it, exactly
    nl = 4 // world
    for i, layer in enumerate(model):
        assert isinstance(layer.dispatcher, AllToAllDispatcher) and layer.expert_offset == rank * nl
        torch.testing.assert_close(layer.experts.b1, state[f"{i}.experts.b1"][rank * nl:(rank + 1) * nl])
        assert layer.experts.w1.requires_grad
    with pytest.raises(ValueError, match="split already"):
        apply_expert_parallel(model, group)
    adopted = torch.nn.Sequential(_layer())
    adopt_moe_layers(adopted, world)  # marks the expert parameters (allreduce=False): new ones would lose it
    with pytest.raises(ValueError, match="before DeepSpeed adopts"):
        apply_expert_parallel(adopted, group)


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [2, 4])
def test_apply_expert_parallel_keeps_this_rank_s_slice(world):
    state = torch.nn.Sequential(_layer(), _layer()).state_dict()
    run_ranks(_split_worker, world, state)
