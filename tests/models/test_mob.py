import copy

import pytest
import torch

from d2m_dist.config import ConfigError, MoBConfig, MoBGroupConfig
from d2m_dist.models.flux import call_flux
from d2m_dist.models.mob import MoBGroup, apply_mob, group_last_blocks, mob_groups
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


def test_skipped_blocks_pass_through_and_run_only_chosen_samples():
    teacher = tiny_flux(num_layers=2, num_single_layers=2)
    student = apply_mob(copy.deepcopy(teacher), MoBConfig(enabled=True, single=MoBGroupConfig(m=2, kappa=1), gate="one"))
    (_, group), = mob_groups(student)
    calls = []
    for j, b in enumerate(group.blocks):
        b.register_forward_pre_hook(lambda mod, args, kwargs, j=j: calls.append((j, kwargs["hidden_states"].shape[0])), with_kwargs=True)
    x = tiny_inputs(batch=6)
    with torch.no_grad():
        call_flux(student, x)
    assert sum(n for _, n in calls) == 6  # each sample ran exactly one of the two blocks
    # reference: for each sample, run its chosen block alone
    with torch.no_grad():
        for i in range(6):
            xi = x.select(torch.tensor([i]))
            yi = call_flux(student, xi)
            chosen = int(group.usage.argmax())
            ref = copy.deepcopy(teacher)
            keep = [ref.single_transformer_blocks[chosen]]
            ref.single_transformer_blocks = torch.nn.ModuleList(keep)
            torch.testing.assert_close(yi, call_flux(ref, xi), rtol=1e-5, atol=1e-6)


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


def _ep_mob_worker(rank, world, teacher_state):
    import torch.distributed as dist

    from d2m_dist.config import MoEConfig
    from d2m_dist.models.spec import select_sites
    from d2m_dist.models.surgery import convert_to_moe
    from tests.models.test_surgery import random_partitions

    group = dist.new_group(list(range(world)))
    teacher = tiny_flux(num_layers=1, num_single_layers=2)
    cfg = MoEConfig(spec="1S4E2A", sites="single")
    specs = select_sites(cfg, 1, 2)
    student = convert_to_moe(teacher, specs, cfg, random_partitions(teacher, specs), ep_group=group)
    student = apply_mob(student, MoBConfig(enabled=True, single=MoBGroupConfig(m=2, kappa=1), gate="one"))
    (_, g), = mob_groups(student)
    # force every local sample onto block `rank`: the other block has no sample on this rank,
    # but its expert-parallel MoE layer must still join the other rank's all_to_all
    g.select = lambda h, c, t: (torch.nn.functional.one_hot(torch.full((h.shape[0],), rank), 2).bool(), None)
    out = call_flux(student, tiny_inputs(batch=2, seed=rank))
    out.pow(2).mean().backward()  # backward runs the reverse exchanges on both ranks too
    assert torch.isfinite(out).all()


@pytest.mark.multiproc
def test_mob_with_expert_parallel_blocks_keeps_ranks_in_step():
    from tests.distributed import run_ranks

    run_ranks(_ep_mob_worker, 2, None)
