import copy

import pytest
import torch

from d2m_dist.config import ConfigError, MoBConfig, MoBGroupConfig
from d2m_dist.models.flux import call_flux
from d2m_dist.models.mob import MoBGroup, apply_mob, group_last_blocks, mob_groups
from d2m_dist.models.moe import moe_layers
from tests.tiny import tiny_flux, tiny_inputs


def mob_cfg(m=2, kappa=2, **kw):
    return MoBConfig(enabled=True, double=MoBGroupConfig(first=0, last=-1, m=m, kappa=kappa),
                     single=MoBGroupConfig(first=0, last=-1, m=m, kappa=kappa), **kw)


def test_kappa_equals_m_with_unit_gates_is_exactly_dense():
    teacher = tiny_flux(num_layers=2, num_single_layers=4)
    student = apply_mob(copy.deepcopy(teacher), mob_cfg(m=2, kappa=2))
    for _, g in mob_groups(student):
        g.unit_gates = True
    x = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(call_flux(student, x), call_flux(teacher, x))


def test_straight_through_gate_with_kappa_m_is_exactly_dense_and_trains_router():
    teacher = tiny_flux(num_layers=2, num_single_layers=4)
    student = apply_mob(copy.deepcopy(teacher), mob_cfg(m=2, kappa=2, gate="straight_through"))
    x = tiny_inputs()
    out = call_flux(student, x)
    with torch.no_grad():
        assert torch.equal(out, call_flux(teacher, x))
    out.pow(2).mean().backward()
    for _, g in mob_groups(student):
        assert g.router.w_x.weight.grad.abs().sum() > 0


def _keep_only(teacher, block: int):
    """The dense teacher with its single-stream list reduced to ``block``: one sample's path through a group."""
    ref = copy.deepcopy(teacher)
    ref.single_transformer_blocks = torch.nn.ModuleList([ref.single_transformer_blocks[block]])
    return ref


def test_skipped_blocks_pass_through_and_run_only_chosen_samples():
    teacher = tiny_flux(num_layers=2, num_single_layers=2)
    student = apply_mob(copy.deepcopy(teacher), MoBConfig(enabled=True, single=MoBGroupConfig(m=2, kappa=1), gate="one"))
    (_, group), = mob_groups(student)
    calls = []
    for j, b in enumerate(group.blocks):
        b.register_forward_pre_hook(lambda mod, args, kwargs, j=j: calls.append((j, kwargs["hidden_states"].shape[0])), with_kwargs=True)
    x = tiny_inputs(batch=6)
    # a mixed batch: samples 0, 2, 3 choose block 1, the others block 0
    choice = torch.tensor([1, 0, 1, 1, 0, 0])
    group.select = lambda h, c, t: (torch.nn.functional.one_hot(choice, 2).bool(), None)
    with torch.no_grad():
        out = call_flux(student, x)
    assert sorted(calls) == [(0, 3), (1, 3)]  # each block ran once, on its own samples only
    # reference: each sample through the dense stack with only its chosen block, one at a time
    with torch.no_grad():
        for i in range(6):
            xi = x.select(torch.tensor([i]))
            torch.testing.assert_close(out[i : i + 1], call_flux(_keep_only(teacher, int(choice[i])), xi),
                                       rtol=1e-5, atol=1e-6)


def test_config_errors():
    with pytest.raises(ConfigError, match="does not divide"):
        apply_mob(tiny_flux(num_single_layers=3), MoBConfig(enabled=True, single=MoBGroupConfig(m=2, kappa=1)))
    with pytest.raises(ConfigError, match="kappa"):
        apply_mob(tiny_flux(), MoBConfig(enabled=True, single=MoBGroupConfig(m=2, kappa=3)))


def test_group_last_blocks():
    student = apply_mob(tiny_flux(num_single_layers=5), MoBConfig(enabled=True, single=MoBGroupConfig(first=1, last=4, m=2, kappa=1)))
    assert group_last_blocks(student, "single_transformer_blocks") == [0, 2, 4]
    assert sum(isinstance(e, MoBGroup) for e in student.single_transformer_blocks) == 2


def test_compute_falls_with_kappa():
    from d2m_dist.bench.common import flops

    teacher = tiny_flux(num_layers=1, num_single_layers=4)
    x = tiny_inputs(batch=8)
    counts = []
    for kappa in (4, 2, 1):
        student = apply_mob(copy.deepcopy(teacher), MoBConfig(enabled=True, single=MoBGroupConfig(m=4, kappa=kappa), gate="one"))
        with torch.no_grad():
            counts.append(flops(lambda: call_flux(student, x)))
    assert counts[0] > counts[1] > counts[2]


def _ep_mob_worker(rank, world, seed):
    import torch.distributed as dist

    from d2m_dist.config import MoEConfig
    from d2m_dist.models.spec import select_sites
    from d2m_dist.models.surgery import convert_to_moe
    from d2m_dist.parallel.expert_parallel import apply_expert_parallel
    from tests.models.test_surgery import random_partitions

    group = dist.new_group(list(range(world)))
    cfg = MoEConfig(spec="1S4E2A", sites="single")
    specs = select_sites(cfg, 1, 2)

    def build(ep_group):
        teacher = tiny_flux(seed, num_layers=1, num_single_layers=2)
        student = convert_to_moe(teacher, specs, cfg, random_partitions(teacher, specs))
        apply_expert_parallel(student, ep_group)  # the explicit step: this rank's experts, all-to-all
        student = apply_mob(student, MoBConfig(enabled=True, single=MoBGroupConfig(m=2, kappa=1), gate="one"))
        (_, g), = mob_groups(student)
        # every local sample on block `rank`: the other block has no sample on this rank, but its
        # expert-parallel MoE layer must still join the other rank's all_to_all
        g.select = lambda h, c, t: (torch.nn.functional.one_hot(torch.full((h.shape[0],), rank), 2).bool(), None)
        return student

    ep, ref = build(group), build(None)  # experts split over the 2 ranks / all experts on this rank
    from d2m_dist.models.portable import local_expert_slices

    ep.load_state_dict(local_expert_slices(ep, ref.state_dict()))  # the same weights (routers' init differs)
    x = tiny_inputs(batch=2, seed=rank)
    outs = []
    for model in (ep, ref):
        inputs = x.to()
        inputs.hidden_states.requires_grad_(True)
        out = call_flux(model, inputs)
        out.pow(2).mean().backward()  # backward runs the reverse exchanges on both ranks too
        outs.append((out.detach(), inputs.hidden_states.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-6)
    # this rank's experts were trained by both ranks' tokens: the sum of the references' gradients

    for (name, a), (_, b) in zip(moe_layers(ep), moe_layers(ref)):
        g = b.experts.w1.grad.clone() if b.experts.w1.grad is not None else torch.zeros_like(b.experts.w1)
        dist.all_reduce(g)
        local = slice(a.expert_offset, a.expert_offset + a.experts.num_local)
        got = a.experts.w1.grad if a.experts.w1.grad is not None else torch.zeros_like(a.experts.w1)
        torch.testing.assert_close(got, g[local], rtol=1e-5, atol=1e-6, msg=name)
        # the zero-weighted sample that joined the exchange left no routing statistics behind
        if name.startswith(f"single_transformer_blocks.0.blocks.{1 - rank}."):
            assert a.stats is None and b.stats is None


@pytest.mark.multiproc
def test_mob_with_expert_parallel_blocks_equals_single_rank():
    from tests.distributed import run_ranks

    run_ranks(_ep_mob_worker, 2, 0)
