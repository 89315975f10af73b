"""FLUX.1-dev-sized accounting on the meta device at 1S12E2A."""

import json
import subprocess
import sys

from d2m_dist.config import MoEConfig, TeacherConfig
from d2m_dist.models.accounting import count, dense_ffn_params, moe_param_report
from d2m_dist.models.flux import load_teacher
from d2m_dist.models.spec import select_sites
from d2m_dist.models.surgery import convert_to_moe


def test_flux_dev_moe_l_accounting():
    teacher = load_teacher(TeacherConfig(path="meta:flux1-dev", dtype="fp32"), meta=True)
    dense_total, dense_ffn = count(teacher), dense_ffn_params(teacher)
    assert round(dense_total / 1e9, 2) == 11.90
    assert round(dense_ffn / 1e9, 2) == 5.74
    specs = select_sites(MoEConfig(spec="1S12E2A"), 19, 38)
    rep = moe_param_report(convert_to_moe(teacher, specs, MoEConfig(spec="1S12E2A")))
    assert rep.ffn_sites == 76
    assert rep.routers == 76 * 12 * 3072
    assert rep.total == dense_total + rep.routers
    assert rep.ffn_total == dense_ffn
    # exactly 37.5% of the weights; the always-on output biases add 0.01%
    assert abs(rep.ffn_activated / dense_ffn - 0.375) < 1e-3
    assert round(rep.modulation / 1e9, 2) == 3.25
    # about 8.32B and 5.07B plus routers (docs/METHOD.md, section 4)
    assert abs((rep.activated - rep.routers) / 1e9 - 8.32) < 0.01
    assert abs((rep.activated_without_modulation - rep.routers) / 1e9 - 5.07) < 0.01


def test_params_cli_prints_both_counts(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "d2m_dist.cli", "params", "--json", "teacher.path=meta:flux1-dev", "teacher.dtype=fp32"],
        capture_output=True, text=True, check=True,
    ).stdout
    rep = json.loads(out[out.index("{"):])
    assert rep["ffn_sites"] == 76
    assert 8.30e9 < rep["activated"] < 8.34e9 and 5.05e9 < rep["activated_without_modulation"] < 5.09e9


def _hand_count(model, k: int, n: int, kappa: int, m: int):
    """(activated, activated without modulation) by reading parameter names, independently of the module walk.

    Routed experts (``.experts.``) count k/n; parameters of blocks inside a MoB group
    (``single_transformer_blocks.<g>.blocks.<j>.``) count kappa/m of that; AdaLN
    modulation is every ``norm1*.linear``, single-block ``norm.linear`` and ``norm_out.linear``.
    """
    import re

    activated = modulation = 0.0
    for name, p in model.named_parameters():
        share = k / n if ".experts." in name else 1.0
        if re.match(r"single_transformer_blocks\.\d+\.blocks\.\d+\.", name):
            share *= kappa / m
        activated += share * p.numel()
        if re.search(r"(norm1|norm1_context|\.norm|norm_out)\.linear\.", "." + name):
            modulation += share * p.numel()
    return round(activated), round(activated - modulation)


def test_accounting_with_mob_against_a_hand_count():
    from d2m_dist.config import MoBConfig, MoBGroupConfig
    from d2m_dist.models.mob import apply_mob
    from tests.tiny import tiny_flux

    cfg = MoEConfig(spec="1S4E2A")
    model = tiny_flux(num_layers=2, num_single_layers=4)
    student = apply_mob(convert_to_moe(model, select_sites(cfg, 2, 4), cfg),
                        MoBConfig(enabled=True, single=MoBGroupConfig(m=2, kappa=1)))
    rep = moe_param_report(student)
    assert (rep.activated, rep.activated_without_modulation) == _hand_count(student, k=2, n=4, kappa=1, m=2)
    # the MoB share really is applied: without groups, more is activated
    plain_model = convert_to_moe(tiny_flux(num_layers=2, num_single_layers=4), select_sites(cfg, 2, 4), cfg)
    plain = moe_param_report(plain_model)
    assert (plain.activated, plain.activated_without_modulation) == _hand_count(plain_model, k=2, n=4, kappa=1, m=1)
    assert rep.activated < plain.activated and rep.activated_without_modulation < plain.activated_without_modulation


def test_flux_dev_mob_presets_near_the_papers_counts():
    """MoE-S and MoE-XS (docs/DECISIONS.md): within 6% of the paper's 3.19B and 2.64B without modulation."""
    from d2m_dist.config import MoBConfig, MoBGroupConfig
    from d2m_dist.models.mob import apply_mob

    counts = {}
    for name, spec, last_single in (("S", "1S12E2A", 23), ("XS", "1S12E1A", 35)):
        teacher = load_teacher(TeacherConfig(path="meta:flux1-dev", dtype="fp32"), meta=True)
        cfg = MoEConfig(spec=spec)
        mob = MoBConfig(enabled=True, double=MoBGroupConfig(first=0, last=17, m=2, kappa=1),
                        single=MoBGroupConfig(first=0, last=last_single, m=2, kappa=1))
        counts[name] = moe_param_report(apply_mob(convert_to_moe(teacher, select_sites(cfg, 19, 38), cfg), mob))
    assert abs(counts["S"].activated_without_modulation / 3.19e9 - 1) < 0.04
    assert abs(counts["XS"].activated_without_modulation / 2.64e9 - 1) < 0.06
