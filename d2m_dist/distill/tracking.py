"""Experiment tracking: wandb on rank 0, offline unless the user chose otherwise.

The run id is created once per stage directory and stored there, so a resumed
or requeued job logs into the same run. Every logged step is also appended to
``<stage_dir>/metrics.jsonl`` (rank 0), which needs no wandb to read; a resumed
run appends after it, so steps between the last checkpoint and a preemption
appear twice there (the later line is the one that counts).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Dict, Optional

log = logging.getLogger("d2m_dist.tracking")


class Tracker:
    """Tracking never stops training: a failing wandb (its service process killed by the
    job's signal, a full disk...) is reported once and then left alone."""

    def __init__(self, stage_dir: Path, project: str, name: str, config: Dict[str, Any], enabled: bool, is_main: bool):
        self.run = None
        self.metrics_file = stage_dir / "metrics.jsonl" if is_main else None
        id_file = stage_dir / "wandb_run_id"
        if is_main:
            stage_dir.mkdir(parents=True, exist_ok=True)
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


def read_run_id(stage_dir: Path) -> Optional[str]:
    f = stage_dir / "wandb_run_id"
    return f.read_text().strip() if f.is_file() else None
