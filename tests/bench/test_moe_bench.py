"""``d2m bench moe`` at a tiny size (CPU): rows, the FLOPs limit, the shared weights, the JSON file.

No assertion on time.
"""

from __future__ import annotations

import json

import pytest
import torch

from d2m_dist.bench import moe
from d2m_dist.cli import main
from d2m_dist.config import ConfigError
from d2m_dist.models.moe import MoEFeedForward
from d2m_dist.models.spec import MoESpec

D, TOKENS, SPEC = 32, 64, "1S4E2A"
# 1S4E2A at D = 32: hidden 128 = shared 32 + 4 experts x 24, a token activates 32 + 2 x 24 of 128
LIMIT = (32 + 2 * 24) / 128
# ours counts its router too: 2 T D n against the dense 4 T D H
OURS_FLOPS = LIMIT + 2 * 4 / (4 * 128)


def _check_rows(rows, modes=moe.MODES, variants=moe.VARIANTS):
    assert [(r["mode"], r["variant"]) for r in rows] == [(m, v) for m in modes for v in variants]
    for r in rows:
        assert list(r) == moe.COLUMNS
        assert (r["D"], r["tokens"], r["dtype"]) == (D, TOKENS, "fp32")
        assert float(r["median ms"]) > 0
        if r["variant"] == "dense":
            assert float(r["vs dense"]) == 1.0 and float(r["fwd FLOPs vs dense"]) == 1.0
            assert float(r["FLOPs limit"]) == 1.0
        else:
            assert float(r["FLOPs limit"]) == pytest.approx(LIMIT, abs=1e-4)
    ours = [r for r in rows if r["variant"] == "ours"]
    assert all(float(r["fwd FLOPs vs dense"]) == pytest.approx(OURS_FLOPS, abs=1e-4) for r in ours)


def test_flops_limit_by_hand():
    assert LIMIT == 0.625
    assert moe.flops_limit(MoESpec.parse(SPEC).resolve(D, 4 * D)) == LIMIT
    assert moe.flops_limit(MoESpec.parse("1S12E2A").resolve(3072, 4 * 3072)) == 0.375


def test_bench_through_the_module():
    rows = moe.run(dims=[D], tokens=TOKENS, spec=SPEC, repeats=1, warmup=0, device="cpu")
    _check_rows(rows)
    by_variant = {r["variant"]: r for r in rows if r["mode"] == "forward"}
    # dropless DeepSpeed computes every expert on the busiest one's load: never fewer FLOPs than ours
    assert float(by_variant["ds-dropless"]["fwd FLOPs vs dense"]) >= float(by_variant["ours"]["fwd FLOPs vs dense"])


def test_bench_through_the_cli_writes_the_same_rows_as_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["bench", "moe", f"dims={D}", f"tokens={TOKENS}", f"spec={SPEC}", "repeats=1", "warmup=0",
                 "device=cpu", "modes=forward", "variants=dense,ours,ds-cf1.25", f"json={out}"]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "moe" and doc["columns"] == moe.COLUMNS
    assert doc["versions"]["torch"] == torch.__version__ and doc["versions"]["deepspeed"]
    variants = ("dense", "ours", "ds-cf1.25")
    _check_rows(doc["rows"], modes=("forward",), variants=variants)
    for r in doc["rows"]:  # the printed table holds the same rows
        assert "| " + " | ".join(str(r[c]) for c in moe.COLUMNS) + " |" in printed


def test_bad_settings_fail_before_running():
    with pytest.raises(ConfigError, match="variants"):
        moe.run(dims=[D], spec=SPEC, variants="dense,tutel")
    with pytest.raises(ConfigError, match="modes"):
        moe.run(dims=[D], spec=SPEC, modes="backward")
    with pytest.raises(ConfigError, match="does not divide"):
        moe.run(dims=[30], spec=SPEC)


def test_dense_is_the_layer_with_unit_gates():
    torch.manual_seed(0)
    layer = MoEFeedForward(MoESpec.parse(SPEC).resolve(D, 4 * D))
    dense = moe.dense_from_moe(layer)
    layer.unit_gates = True  # every routed expert on with gate 1: the dense FFN's neurons, all of them
    x = torch.randn(2, 16, D)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense(x))


def test_deepspeed_layer_holds_our_experts_and_routes_as_ours():
    """DeepSpeed's MoE equals our layer, dropless, where both weight the top-2 experts alike.

    DeepSpeed's top-2 gating always renormalises the two gates to sum to 1
    (``top2gating``: ``gates1_s / (gates1_s + gates2_s)``), so it is compared with
    our layer built with ``renormalize=True`` (softmax over the top-k logits, the
    same values). Its second expert is the argmax of the remaining logits once
    Gumbel sampling is off (the bench turns ``top2_2nd_expert_sampling`` off; it
    would otherwise be drawn at random, in eval mode too). Dropless, its capacity
    is the busiest expert's load, so no token is dropped and the outputs match to
    rounding; in train mode (same capacity, no noise policy) as well.
    """
    shape = MoESpec.parse(SPEC).resolve(D, 4 * D)
    torch.manual_seed(0)
    ours = MoEFeedForward(shape, renormalize=True)
    with torch.no_grad():
        ours.bias.normal_()  # nonzero, so that a missing bias would show
    x = torch.randn(1, TOKENS, D)
    with moe.deepspeed_world(torch.device("cpu")):
        site = moe.DeepSpeedSite(ours, capacity_factor=None)
        assert len(site.experts) == shape.num_experts
        for j, expert in enumerate(site.experts):  # one module per expert, each one of ours
            torch.testing.assert_close(expert.fc1.weight, ours.experts.w1[j], rtol=0, atol=0)
            torch.testing.assert_close(expert.fc1.bias, ours.experts.b1[j], rtol=0, atol=0)
            torch.testing.assert_close(expert.fc2.weight, ours.experts.w2[j], rtol=0, atol=0)
            assert expert.fc2.bias is None
        torch.testing.assert_close(site.gate.weight, ours.router.weight, rtol=0, atol=0)
        for train in (False, True):
            site.train(train)
            ours.train(train)
            with torch.no_grad():
                torch.testing.assert_close(site(x), ours(x))
                # the routed part alone: DeepSpeed's layer against ours less its shared expert and bias
                torch.testing.assert_close(site.moe(x)[0], ours(x) - ours.shared(x) - ours.bias)
    import torch.distributed as dist

    assert not dist.is_initialized()  # the world made for it is gone


def test_a_callers_process_group_is_adopted_and_left_alone(monkeypatch):
    import deepspeed.comm
    import torch.distributed as dist

    from tests.distributed import free_port

    port = str(free_port())
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        rows = moe.run(dims=[D], tokens=TOKENS, spec=SPEC, repeats=1, warmup=0, device="cpu", modes="forward",
                       variants="ours,ds-dropless")
        assert [r["variant"] for r in rows] == ["ours", "ds-dropless"]
        assert dist.is_initialized()
    finally:
        deepspeed.comm.destroy_process_group()
        from d2m_dist.parallel.dist import remove_shm_buffers

        remove_shm_buffers("127.0.0.1", port)
