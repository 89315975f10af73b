"""Every shipped preset loads, and to exactly the config it resolved to before presets were single-sourced.

``presets_before.json`` holds the preset files as they were when each repeated
its whole content (run_dir and init spelled out, the teacher's placement as
``parallel.teacher_zero3/teacher_offload``). Now a preset names a ``base:`` file
and holds only what differs, and ``init`` follows from ``run_dir`` and the
stage. Both forms go through today's loader here; the results must be equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from d2m_dist.config import ConvertConfig, StageConfig, load_config, to_dict

REPO = Path(__file__).resolve().parents[2]
BEFORE = json.loads((Path(__file__).parent / "presets_before.json").read_text())
# values the presets leave to the user (???): the same on both sides
FILL = {"stage": ["teacher.path=/teacher", "data.urls=/shards/train-{000000..000003}.tar"],
        "convert": ["teacher.path=/teacher", "calibration.urls=/shards/train-{000000..000003}.tar"]}


def _old_placement(old: dict) -> dict:
    """The two booleans the teacher's placement replaced, translated."""
    old = json.loads(json.dumps(old))
    parallel = old.get("parallel", {})
    zero3, offload = parallel.pop("teacher_zero3", False), parallel.pop("teacher_offload", False)
    if zero3:
        old.setdefault("teacher", {})["placement"] = "offload" if offload else "sharded"
    return old


@pytest.mark.parametrize("path", sorted(BEFORE))
def test_preset_resolves_as_before(path, tmp_path):
    schema = ConvertConfig if path.endswith("stage0.yaml") else StageConfig
    fill = FILL["convert" if schema is ConvertConfig else "stage"]
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(_old_placement(BEFORE[path])))
    want = to_dict(load_config(schema, old, fill))
    got = to_dict(load_config(schema, REPO / path, fill))
    assert got == want


def test_presets_hold_only_what_differs():
    """The per-variant stage files are a base, a run_dir and the variant's own settings."""
    for f in sorted((REPO / "configs" / "presets").glob("flux-dev-moe-*/stage[123].yaml")):
        content = yaml.safe_load(f.read_text())
        assert "init" not in content and content["base"].startswith("../flux-dev/"), f
        assert set(content) <= {"base", "run_dir", "mob"}, (f, set(content))


def test_base_chain_errors_are_one_line(tmp_path):
    from d2m_dist.config import ConfigError

    (tmp_path / "a.yaml").write_text("base: b.yaml\nstage: 2\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="comes back to itself"):
        load_config(StageConfig, tmp_path / "a.yaml", ["run_dir=r", "teacher.path=t"])
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_config(StageConfig, tmp_path / "c.yaml", ["run_dir=r", "teacher.path=t"])


def test_init_follows_run_dir_and_stage():
    for stage, want in ((1, "runs/x/stage0"), (2, "runs/x/stage1/export"), (3, "runs/x/stage2/export")):
        cfg = load_config(StageConfig, None, [f"stage={stage}", "run_dir=runs/x", "teacher.path=t"])
        assert cfg.init == want
    cfg = load_config(StageConfig, None, ["stage=2", "run_dir=runs/x", "teacher.path=t", "init=/elsewhere"])
    assert cfg.init == "/elsewhere"
