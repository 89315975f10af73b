"""Running the stage trainer from a test the way a user does: a YAML config and launchers/local.sh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def stage_config(tmp_path: Path, teacher, init, stage=2, **extra) -> Path:
    lines = [f"stage: {stage}", f"run_dir: {tmp_path / 'run'}", f"init: {init}", f"teacher:\n  path: {teacher}",
             "log:\n  every: 1\n  progress: false\n  wandb: true", "ckpt:\n  every: 0\n  keep: 2"]
    for k, v in extra.items():
        lines.append(f"{k}: {v}")
    f = tmp_path / f"stage{stage}.yaml"
    f.write_text("\n".join(lines) + "\n")
    return f


def launch(config: Path, nproc: int, *overrides: str, wait=True, timeout: float = 600, **popen):
    env = {**os.environ, "NPROC": str(nproc), "PYTHON": sys.executable}
    cmd = ["bash", str(REPO / "launchers" / "local.sh"), str(config), *overrides]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def summary(run_dir: Path, stage=2) -> dict:
    return json.loads((run_dir / f"stage{stage}" / "summary.json").read_text())


def changed_outside(init: dict, export: dict, trains) -> list:
    """Names of the tensors that ``trains(name)`` says are frozen but differ from the init (should be none)."""
    return [k for k in init if not trains(k) and not torch.equal(init[k], export[k])]
