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
    # about 8.32B and 5.07B plus routers (METHOD.md section 1)
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
