"""Atomic, sharded training checkpoints on top of DeepSpeed's engine checkpoints.

Layout: ``<stage_dir>/checkpoints/step_<N>/`` (DeepSpeed's per-rank model and
optimizer shards plus ``client_state``: step, RNG streams, data position,
tracking run id) and ``<stage_dir>/checkpoints/latest`` (the tag, one line).

Atomicity: every rank writes into ``.tmp-step_<N>``; after a barrier rank 0
renames it to ``step_<N>``, then replaces ``latest`` (write-then-rename), then
deletes checkpoints beyond the newest K. A crash at any point leaves ``latest``
naming a complete checkpoint (or none).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from d2m_dist.config import ConfigError

TAG_RE = re.compile(r"^step_(\d+)$")
LATEST = "latest"
LAYOUT_FILE = "d2m_layout.json"


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class CheckpointDir:
    def __init__(self, root: str | Path, keep: int = 3):
        self.root = Path(root)
        self.keep = max(1, keep)

    def tags(self) -> List[str]:
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
        return sorted(found, key=lambda t: int(TAG_RE.match(t).group(1)))

    def latest(self) -> Optional[str]:
        f = self.root / LATEST
        if not f.is_file():
            return None
        tag = f.read_text().strip()
        if not (self.root / tag).is_dir():
            raise FileNotFoundError(f"checkpoint {self.root / tag} named by {f} is missing")
        return tag

    def save(self, engine, step: int, client_state: Dict[str, Any],
             rank_state: Optional[Dict[str, Any]] = None, layout: Optional[Dict[str, Any]] = None) -> Path:
        """Collective: every rank calls it.

        ``rank_state``: this rank's own extra state (e.g. its EMA shard); ``layout``: the
        parallel layout the shards were cut for, checked by :meth:`load` before DeepSpeed
        reads anything.
        """
        tag = f"step_{step}"
        tmp_tag = f".tmp-{tag}"
        if _is_main():
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.root / tmp_tag, ignore_errors=True)
        _barrier()
        # frozen parameters come back from the init weights: DeepSpeed would store rank 0's
        # copy of frozen experts for every rank (docs/DECISIONS.md)
        engine.save_checkpoint(str(self.root), tag=tmp_tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)
        if rank_state is not None:
            torch.save(rank_state, self.root / tmp_tag / _rank_file())
        if layout is not None and _is_main():
            (self.root / tmp_tag / LAYOUT_FILE).write_text(json.dumps(layout, sort_keys=True) + "\n")
        _barrier()
        if _is_main():
            final = self.root / tag
            if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
                shutil.rmtree(final)
            os.replace(self.root / tmp_tag, final)
            tmp_latest = self.root / f".{LATEST}.tmp"
            tmp_latest.write_text(tag + "\n")
            with open(tmp_latest, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_latest, self.root / LATEST)
            for old in self.tags()[: -self.keep]:
                shutil.rmtree(self.root / old, ignore_errors=True)
        _barrier()
        return self.root / tag

    def load(self, engine, tag: Optional[str] = None,
             layout: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
        """Load ``tag`` (default: latest) into ``engine``; returns the client state, or None if there is none.

        ``layout``: this run's parallel layout; a checkpoint cut for another one is refused
        with one line (ZeRO partitions and expert shards would not fit).
        """
        tag = tag or self.latest()
        if tag is None:
            return None
        saved_file = self.root / tag / LAYOUT_FILE
        if layout is not None and saved_file.is_file():
            saved = json.loads(saved_file.read_text())
            diff = [f"{k} {saved.get(k)} (now {v})" for k, v in sorted(layout.items()) if saved.get(k) != v]
            if diff:
                raise ConfigError(f"checkpoint {self.root / tag} was written with {', '.join(diff)}: resume with "
                                  f"the same layout, or start the stage afresh in another run_dir")
        _, client = engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True,
                                           load_lr_scheduler_states=True, load_module_strict=False)
        if client is None:
            raise RuntimeError(f"checkpoint {self.root / tag} could not be loaded")
        return client

    def load_rank_state(self, tag: Optional[str] = None) -> Optional[Dict[str, Any]]:
        """This rank's ``rank_state`` of ``tag`` (default: latest); None if it was saved without one."""
        tag = tag or self.latest()
        if tag is None:
            return None
        f = self.root / tag / _rank_file()
        return torch.load(f, map_location="cpu", weights_only=True) if f.is_file() else None


def _rank_file() -> str:
    rank = dist.get_rank() if dist.is_initialized() else 0
    return f"d2m_rank_{rank:05d}.pt"
