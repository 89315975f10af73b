"""``d2m plan`` on the meta device: the FLUX.1-dev presets, the verdict, the traffic by hand, bad input."""

from __future__ import annotations

import json

import pytest

from d2m_dist.cli import main
from d2m_dist.config import ConfigError
from d2m_dist.plan.inventory import plan_inputs
from d2m_dist.plan.layouts import Cluster, Layout, plan_layout
from d2m_dist.plan.memory import Param, optimizer_groups, padded, student_state
from d2m_dist.plan.report import parse_bytes
from d2m_dist.plan.traffic import Tokens, moe_exchange_bytes

MOE_L = "configs/presets/flux-dev-moe-l"


@pytest.fixture(scope="module")
def moe_l():
    return plan_inputs(MOE_L, 2)


def _plan(capsys, *args):
    rc = main(["plan", "--config", MOE_L, *args, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_padding_and_groups_by_hand():
    assert padded(10, 2) == 12 and padded(12, 2) == 12 and padded(1, 4) == 8
    params = [Param("a", 10, False, True), Param("e1", 100, True, True), Param("e2", 200_000_000, True, True),
              Param("f", 7, False, False)]
    groups = optimizer_groups(params, world=4, ep=2)
    # dense group over the world; experts in chunks of at most 178,956,971 elements over world / ep
    assert [([p.name for p in g], dp) for g, dp in groups] == [(["a"], 4), (["e1"], 2), (["e2"], 2)]
    s = student_state(params, world=4, ep=2, zero=2)
    assert s.params.rest == 4 * (padded(10, 4) + 7) and s.params.experts == 4 * (padded(100, 2) + 200_000_000)
    assert s.comm_buffers == 4 * 500_000_000  # fp32 gradients only; linear ones add a bf16 bucket under autocast
    linear = [Param("w", 10, False, True, linear=True), Param("e", 100, True, True)]
    assert student_state(linear, 4, 1, 2, bf16=True).comm_buffers == 2 * 4 * 500_000_000
    assert student_state(linear, 4, 1, 3, bf16=True).comm_buffers == (2 + 4) * 500_000_000
    assert s.optimizer.rest == 12 * padded(10, 4) // 4
    assert s.optimizer.experts == 12 * (padded(100, 2) // 2 + 200_000_000 // 2)


def test_flux_moe_l_stage2_on_four_nodes(capsys):
    rc, out = _plan(capsys, "--nodes", "4", "--gpus-per-node", "8", "--gpu-mem", "80GB", "--batch", "1")
    assert rc == 0 and out["best"] is not None and out["image_tokens"] == 4096
    layouts = out["layouts"]
    fitting = [p for p in layouts if p["fits"]]
    assert fitting and all(p["gpu_total"] <= 0.9 * 80 * 2**30 for p in fitting)
    rates = [p["images_per_s"] for p in fitting]
    assert rates == sorted(rates, reverse=True) and out["best"] == fitting[0]
    for p in layouts:
        if not p["fits"]:
            assert p["overflow"].startswith(("GPU memory", "host memory"))
    # every ep that divides 32 ranks and 12 experts, both ZeRO stages (3 only at ep 1), three placements
    eps = sorted({p["layout"]["ep"] for p in layouts})
    assert eps == [1, 2, 4] and {p["layout"]["zero"] for p in layouts if p["layout"]["ep"] > 1} == {2}
    assert len(layouts) == 3 * 3 + 3


def test_expert_state_per_gpu_falls_with_ep_and_the_verdict_names_the_overflow(moe_l, capsys):
    cluster = Cluster(4, 8, 80 * 2**30, 2**40)
    t = Tokens(4096, 512)
    ep1, ep4 = (plan_layout(moe_l, cluster, Layout(ep, 2, "sharded", 1), t) for ep in (1, 4))
    assert ep1.gpu["student_params_experts"] == 4 * ep4.gpu["student_params_experts"]
    assert ep1.gpu["student_params_rest"] == ep4.gpu["student_params_rest"]
    assert ep4.traffic["moe_all_to_all"] > 0 == ep1.traffic["moe_all_to_all"]
    small = plan_layout(moe_l, Cluster(4, 8, 8 * 2**30, 2**40), Layout(4, 2, "sharded", 1), t)
    assert not small.fits and small.overflow.startswith("GPU memory at start-up: the whole fp32 student")
    rc, out = _plan(capsys, "--nodes", "1", "--gpus-per-node", "2", "--gpu-mem", "8GB")
    assert rc == 1 and out["best"] is None


def test_moe_exchange_bytes_by_hand(moe_l):
    # MoE-L: 19 double blocks (image stream 4096 tokens, text stream 512) and 38 single blocks (4608), k = 2 of 12,
    # D = 3072; per assignment the dispatch sends the fp32 row and gate, the combine the bf16 output; forward and
    # backward alike; (ep - 1) / ep of the rows leave the rank
    t, ep = Tokens(4096, 512), 4
    rows = 19 * (4096 + 512) + 38 * 4608
    want = 2 * rows * 2 * (4 * (3072 + 1) + 2 * 3072) * (ep - 1) / ep
    assert moe_exchange_bytes(moe_l.student, t, batch=1, ep=ep, bf16=True) == int(want)
    assert moe_exchange_bytes(moe_l.student, t, batch=1, ep=1, bf16=True) == 0


@pytest.mark.parametrize("args,message", [
    (["--ep", "3"], "--ep 3 does not divide the world size"),
    (["--ep", "8"], "--ep 8 does not divide the expert count 12"),
    (["--ep", "2", "--zero", "3"], "ZeRO-3 runs with ep 1"),
    (["--gpu-mem", "eighty"], "expected a size like 80GB"),
    (["--resolution", "1000"], "--resolution 1000"),
    (["--resolution", "0"], "--resolution 0: must be > 0"),
    (["--tflops", "0"], "--tflops 0.0: must be > 0"),
    (["--text-tokens", "-5"], "--text-tokens -5: must be >= 0"),
])
def test_bad_input_is_one_line(capsys, args, message):
    base = {"--nodes": "2", "--gpus-per-node": "4", "--gpu-mem": "80GB"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    rc = main(["plan", "--config", MOE_L, *[x for kv in base.items() for x in kv]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err


def test_sizes():
    assert parse_bytes("80GB", "x") == 80 * 2**30 and parse_bytes("1TB", "x") == 2**40
    assert parse_bytes("1.5 GiB", "x") == int(1.5 * 2**30)
    with pytest.raises(ConfigError):
        parse_bytes("80 parsecs", "x")
