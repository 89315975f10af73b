"""Experiment tracking: wandb on rank 0, offline unless the user chose otherwise.

The run id is created once per stage directory and stored there, so a resumed
or requeued job logs into the same run. Every logged step is also appended to
``<stage_dir>/metrics.jsonl`` (rank 0), which needs no wandb to read. A resumed
run first drops the lines of the steps after its checkpoint (the killed run
logged them; they are trained and logged again), so each step appears once.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Optional

log = logging.getLogger("d2m_dist.tracking")


class Tracker:
    """Tracking never stops training: a failing wandb (its service process killed by the
    job's signal, a full disk...) is reported once and then left alone."""

    def __init__(self, stage_dir: Path, project: str, name: str, config: Dict[str, Any], enabled: bool, is_main: bool,
                 start_step: int = 0):
        self.run = None
        self.metrics_file = stage_dir / "metrics.jsonl" if is_main else None
        id_file = stage_dir / "wandb_run_id"
        if is_main:
            stage_dir.mkdir(parents=True, exist_ok=True)
            continue_metrics(self.metrics_file, start_step)
            if not id_file.is_file():
                id_file.write_text(uuid.uuid4().hex[:12] + "\n")
        self.run_id = id_file.read_text().strip() if id_file.is_file() else None
        if not (enabled and is_main):
            return
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb  # lazy: after the environment above, and never when tracking is off (a slow import)

        self.run = wandb.init(project=project, name=name, id=self.run_id, resume="allow", config=config,
                              dir=str(stage_dir), reinit="finish_previous")

    def _guard(self, what: str, fn) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - tracking must not end a training run
            log.warning("wandb %s failed (%s: %s); tracking disabled for this run", what, type(exc).__name__, exc)
            self.run = None

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        if self.metrics_file is not None:
            with open(self.metrics_file, "a") as fh:
                fh.write(json.dumps({"step": step, **metrics}) + "\n")
        self._guard("log", lambda: self.run.log(metrics, step=step))

    def log_image(self, key: str, path: Path, step: int) -> None:
        def fn():
            import wandb  # lazy: as in __init__ (loaded by then whenever a run exists)

            self.run.log({key: wandb.Image(str(path))}, step=step)

        self._guard("image", fn)

    def finish(self) -> None:
        self._guard("finish", lambda: self.run.finish())
        self.run = None


def continue_metrics(path: Path, start_step: int) -> None:
    """Make ``path`` (metrics.jsonl) end where a run starting at ``start_step`` continues.

    A resume (``start_step`` > 0) keeps the lines of steps up to its checkpoint and drops the
    later ones and any line a kill cut short, rewriting through a temporary file and
    ``os.replace`` (a crash here leaves the old file or the new one, never half of it).
    A fresh start over an old file (its checkpoints were deleted: nothing to continue) moves
    it aside to ``metrics.<time>.jsonl``: appending would give steps 1, 2, ... twice, from two
    runs, and deleting it would lose what the user may still want to compare.
    """
    if not path.is_file():
        return
    if start_step == 0:
        if path.stat().st_size:
            aside = path.with_name(f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            os.replace(path, aside)
            log.warning("%s holds an earlier run without a checkpoint to continue: moved to %s", path, aside.name)
        return
    tmp, dropped = path.with_name(path.name + ".tmp"), 0
    with open(path) as src, open(tmp, "w") as dst:
        for line in src:
            try:
                step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                dropped += 1  # cut short by a kill mid-write
                continue
            if step > start_step:
                dropped += 1
                continue
            dst.write(line if line.endswith("\n") else line + "\n")
    if dropped:
        os.replace(tmp, path)
        log.info("%s: %d lines after step %d dropped (they are logged again from there)", path, dropped, start_step)
    else:
        tmp.unlink()


def read_run_id(stage_dir: Path) -> Optional[str]:
    f = stage_dir / "wandb_run_id"
    return f.read_text().strip() if f.is_file() else None
