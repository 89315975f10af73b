"""Atomic, sharded training checkpoints that resume in any layout, and load no pickle.

One checkpoint is a folder ``<root>/step_<N>/``:

* ``d2m_checkpoint.json`` (rank 0): the format, the layout it was written in
  (world size, ep_size, ZeRO stage), the trainer's counters and history, the
  scheduler's position, Adam's step, and the index of every tensor fragment
  (which file holds which range of which global tensor);
* ``rank_<r>.safetensors`` (rank r): r's fragments of the fp32 master weights,
  Adam moments and EMA (:mod:`d2m_dist.ckpt.fragments`), routed experts addressed
  by global expert id, and r's torch RNG states;
* ``rank_<r>.json`` (rank r): r's data position and Python/NumPy RNG states.

Frozen parameters are not stored: they come back from the stage's init folder.

A resume builds the engine for the current layout and fills each rank's ranges
from whichever files hold them (:class:`CheckpointReader`), so the same code
restores the same layout exactly and any other layout elastically. Nothing is
unpickled: JSON and safetensors only. A folder that holds anything else where a
checkpoint file should be (for instance DeepSpeed's pickled ``*.pt`` files) is
refused with one line, unread.

Atomicity: every rank writes into ``.tmp-step_<N>``; after a barrier rank 0
renames it to ``step_<N>``, then replaces ``latest`` (write-then-rename), then
deletes checkpoints beyond the newest K and stale temporary folders. A crash at
any point leaves ``latest`` naming a complete checkpoint (or none); its temporary folder
is removed by the next save, or at the next start (:meth:`CheckpointDir.remove_temporaries`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from d2m_dist.ckpt.streaming import TensorFile
from d2m_dist.config import ConfigError

TAG_RE = re.compile(r"^step_(\d+)$")
LATEST = "latest"
META_FILE = "d2m_checkpoint.json"
FORMAT = "d2m-checkpoint"
VERSION = 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank_files(rank: int) -> Tuple[str, str]:
    return f"rank_{rank:05d}.safetensors", f"rank_{rank:05d}.json"


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def first_line(exc: BaseException) -> str:
    """An exception's message cut to one line (its type name when it has none)."""
    return (str(exc).splitlines() or [type(exc).__name__])[0]


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (damaged, foreign, or lacking a tensor): one line."""


# ----------------------------------------------------------------------------- writing


class FragmentWriter:
    """Collects this rank's fragments: ``add(name, kind, global_start, tensor)``."""

    def __init__(self) -> None:
        self.tensors: Dict[str, torch.Tensor] = {}
        self.index: List[Tuple[str, str, int, int, str]] = []  # (name, kind, global start, numel, key)

    def add(self, name: str, kind: str, start: int, tensor: torch.Tensor) -> None:
        key = f"{kind}/{name}@{start}"
        # a copy: fragments are views into ZeRO's flat buffers, which safetensors will not write as shared
        self.tensors[key] = tensor.detach().reshape(-1).to("cpu", torch.float32, copy=True)
        self.index.append((name, kind, int(start), int(tensor.numel()), key))

    def add_raw(self, key: str, tensor: torch.Tensor) -> None:
        """A tensor that is not a fragment (this rank's RNG state)."""
        self.tensors[key] = tensor.detach().to("cpu").contiguous().clone()


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
        if not TAG_RE.match(tag) or not (self.root / tag).is_dir():
            raise CheckpointError(f"checkpoint {self.root / tag} named by {f} is missing")
        return tag

    def save(self, step: int, meta: Dict[str, Any], rank_meta: Dict[str, Any], fragments: FragmentWriter) -> Path:
        """Collective: every rank calls it. ``meta`` is rank 0's (the same on every rank)."""
        tag, tmp = f"step_{step}", f".tmp-step_{step}"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.root / tmp, ignore_errors=True)
            (self.root / tmp).mkdir()
        _barrier()
        folder = self.root / tmp
        tensor_file, json_file = rank_files(_rank())
        save_file(fragments.tensors, str(folder / tensor_file), metadata={"format": FORMAT})
        (folder / json_file).write_text(json.dumps(rank_meta))
        _fsync(folder / tensor_file)
        _fsync(folder / json_file)
        indexes: List[Any] = [None] * _world()
        if dist.is_initialized() and _world() > 1:
            dist.all_gather_object(indexes, fragments.index)
        else:
            indexes = [fragments.index]
        if _rank() == 0:
            table: Dict[str, List[Any]] = {}
            for rank, entries in enumerate(indexes):
                for name, kind, start, numel, key in entries:
                    table.setdefault(f"{kind}/{name}", []).append([rank, key, start, numel])
            full = {"format": FORMAT, "version": VERSION, "world_size": _world(), **meta, "fragments": table}
            (folder / META_FILE).write_text(json.dumps(full))
            _fsync(folder / META_FILE)
        _barrier()
        if _rank() == 0:
            final = self.root / tag
            if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
                shutil.rmtree(final)
            os.replace(folder, final)
            tmp_latest = self.root / f".{LATEST}.tmp"
            tmp_latest.write_text(tag + "\n")
            _fsync(tmp_latest)
            os.replace(tmp_latest, self.root / LATEST)
            # prune only what is older than the checkpoint just written (a newer tag left by a crash
            # before `latest` moved is never counted against it), and crashed saves' temporary folders
            older = [t for t in self.tags() if int(TAG_RE.match(t).group(1)) < step]
            for old in older[: max(0, len(older) - (self.keep - 1))]:
                shutil.rmtree(self.root / old, ignore_errors=True)
            for stale in self.root.glob(".tmp-step_*"):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()
        return self.root / tag

    def remove_temporaries(self) -> List[Path]:
        """Remove the ``.tmp-step_*`` folders of saves that a crash cut short; the paths removed.

        Call it at start, from one process, only while no other job can write this root (the
        trainer holds the run folder's lock): a live save's folder looks the same. Without it a
        crashed save's folder stays until the next save completes.
        """
        found = sorted(self.root.glob(".tmp-step_*")) if self.root.is_dir() else []
        for stale in found:
            shutil.rmtree(stale, ignore_errors=True)
        return found

    def open(self, tag: Optional[str] = None) -> Optional["CheckpointReader"]:
        """The reader of ``tag`` (default: latest); None when there is no checkpoint."""
        tag = tag or self.latest()
        return None if tag is None else CheckpointReader(self.root / tag)


# ----------------------------------------------------------------------------- reading


class CheckpointReader:
    """A written checkpoint: its metadata, each rank's JSON, and any range of any stored tensor."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_file = self.folder / META_FILE
        if not meta_file.is_file():
            pickles = sorted(p.name for p in self.folder.glob("*.pt"))
            what = f"pickled files ({', '.join(pickles[:2])}...) and" if pickles else "it has"
            raise CheckpointError(f"checkpoint {self.folder}: {what} no {META_FILE} (not written by this d2m "
                                  f"version; pickles are never loaded)")
        try:
            self.meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"checkpoint {meta_file}: unreadable ({exc.__class__.__name__})") from None
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise CheckpointError(f"checkpoint {meta_file}: format {self.meta.get('format')!r} version "
                                  f"{self.meta.get('version')!r} is not {FORMAT!r} {VERSION}")
        self.fragments: Dict[str, List[List[Any]]] = self.meta["fragments"]
        self._files: Dict[int, Any] = {}
        for rank in range(self.world_size):  # every file's header now: a damaged or foreign one fails before any work
            self._file(rank)

    @property
    def world_size(self) -> int:
        return int(self.meta["world_size"])

    def _file(self, rank: int):
        if rank not in self._files:
            path = self.folder / rank_files(rank)[0]
            try:
                handle = TensorFile(path)
                if handle.metadata.get("format") != FORMAT:
                    raise ValueError("not written by d2m")
            except Exception as exc:  # a damaged or foreign file: never unpickled, refused by name
                raise CheckpointError(f"checkpoint file {path}: unreadable ({first_line(exc)})") from None
            self._files[rank] = handle
        return self._files[rank]

    def rank_meta(self, rank: int) -> Dict[str, Any]:
        path = self.folder / rank_files(rank)[1]
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"checkpoint file {path}: unreadable ({exc.__class__.__name__})") from None

    def raw(self, rank: int, key: str) -> Optional[torch.Tensor]:
        handle = self._file(rank)
        return handle.read(key) if key in handle.keys() else None

    def has(self, name: str, kind: str) -> bool:
        return f"{kind}/{name}" in self.fragments

    def read(self, name: str, kind: str, start: int, numel: int) -> torch.Tensor:
        """Elements ``start : start + numel`` of the flattened global tensor ``name`` (fp32, 1-D)."""
        out = torch.empty(numel, dtype=torch.float32)
        covered = 0
        for rank, key, f_start, f_numel in self.fragments.get(f"{kind}/{name}", []):
            lo, hi = max(start, f_start), min(start + numel, f_start + f_numel)
            if lo >= hi:
                continue
            out[lo - start : hi - start] = self._file(rank).read(key, lo - f_start, hi - lo)
            covered += hi - lo
        if covered != numel:
            raise CheckpointError(f"checkpoint {self.folder}: holds {covered} of the {numel} elements of {kind} "
                                  f"{name} at {start} (trainable parameters changed since it was written?)")
        return out


# ----------------------------------------------------------------------------- random number generators


def capture_rng(writer: FragmentWriter) -> Dict[str, Any]:
    """This rank's RNG states: torch's as tensors in ``writer``, Python's and NumPy's as JSON (returned)."""
    writer.add_raw("rng/torch", torch.get_rng_state())
    if torch.cuda.is_available():
        writer.add_raw("rng/cuda", torch.cuda.get_rng_state())
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(words), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}


def restore_rng(reader: CheckpointReader, rank: int, state: Dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(reader.raw(rank, "rng/torch"))
    cuda = reader.raw(rank, "rng/cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
