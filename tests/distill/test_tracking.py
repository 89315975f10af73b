"""metrics.jsonl across a resume: each step once."""

from __future__ import annotations

import json

from d2m_dist.distill.tracking import Tracker


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_resume_drops_the_steps_after_its_checkpoint_and_a_cut_line(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss/total": 1.0 / s}) for s in (1, 2, 3, 3, 4, 5)]  # 3 twice: loss and samples
    metrics.write_text("\n".join(lines) + '\n{"step": 6, "loss/to')  # killed while writing step 6
    tracker = Tracker(tmp_path, "p", "stage2", {}, enabled=False, is_main=True, start_step=3)
    assert _steps(metrics) == [1, 2, 3, 3]
    for step in (4, 5):
        tracker.log({"loss/total": 0.5}, step)
    assert _steps(metrics) == [1, 2, 3, 3, 4, 5]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_fresh_start_moves_an_old_file_aside(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + "\n")
    Tracker(tmp_path, "p", "stage2", {}, enabled=False, is_main=True, start_step=0).log({"x": 1}, 1)
    assert _steps(metrics) == [1]
    (aside,) = tmp_path.glob("metrics.*.jsonl")
    assert _steps(aside) == [1, 2]


def test_other_ranks_leave_the_file_alone(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 9}) + "\n")
    Tracker(tmp_path, "p", "stage2", {}, enabled=False, is_main=False, start_step=3)
    assert _steps(metrics) == [9]
