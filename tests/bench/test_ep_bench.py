"""``d2m bench ep``'s bookkeeping, with the training runs replaced by their recorded outputs.

The runs themselves are ``d2m train`` through ``launchers/local.sh`` (tested in
tests/distill); here: which runs it asks for, and the arithmetic of its table.
"""

from __future__ import annotations

import json

import pytest

from d2m_dist.bench import ep
from d2m_dist.config import ConfigError


def test_table_from_recorded_runs(tmp_path, monkeypatch):
    calls = []
    speed = {1: [10.0, 100.0, 110.0, 90.0], 2: [10.0, 150.0, 170.0, 160.0], 4: [1.0, 1.0, 1.0, 1.0]}
    state = {1: {"expert_weights": 400, "optimizer": 1200}, 2: {"expert_weights": 200, "optimizer": 600},
             4: {"expert_weights": 100, "optimizer": 303}}

    def fake_stage(assets, stage, nproc, ep_size, run_dir, extra, log):
        calls.append((stage, nproc, ep_size, run_dir.name))
        out = run_dir / stage
        out.mkdir(parents=True)
        rows = [{"step": 10 * (i + 1), "images_per_s_between_logs": v, "time/communication": 0.001 * nproc * (i + 1)}
                for i, v in enumerate(speed[nproc])]
        (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        (out / "summary.json").write_text(json.dumps({"state_bytes_rank0": state[nproc]}))
        return out

    monkeypatch.setattr(ep, "_stage", fake_stage)
    monkeypatch.setattr(ep, "prepare_assets", lambda run, log: None)
    rows = ep.run(run=str(tmp_path), ranks="2", state_ranks="1,2,4", steps=40, repeats=2)
    # throughput runs alternate, each repeated; then one short run per state size
    assert [c[1:3] for c in calls] == [(1, 1), (2, 2), (1, 1), (2, 2), (1, 1), (2, 2), (4, 4)]
    assert len({c[3] for c in calls}) == len(calls)  # every run in its own folder
    # medians of the intervals after the first (warm-up), pooled over both runs: 100 at 1 rank, 160 at 2
    assert rows[0]["images/s"] == "100" and rows[1]["images/s"] == "160" and rows[1]["vs 1 rank"] == "1.6"
    assert rows[1]["communication ms"] == "6"  # median of 4, 6, 8 ms
    assert [r["experts vs first"] for r in rows[2:]] == ["1", "0.5", "0.25"]
    assert rows[4]["optimizer vs first"] == "0.253"


@pytest.mark.parametrize("setting,message", [({"ranks": "0"}, "ranks"), ({"state_ranks": "a"}, "state_ranks"),
                                             ({"steps": 10}, "steps"), ({"repeats": 0}, "repeats")])
def test_bad_settings_fail_before_any_run(setting, message, monkeypatch):
    monkeypatch.setattr(ep, "prepare_assets", lambda run, log: pytest.fail("ran"))
    with pytest.raises(ConfigError, match=message):
        ep.run(**setting)
