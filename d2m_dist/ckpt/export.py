"""``d2m ckpt inspect`` and ``d2m ckpt export``: a training checkpoint, read offline, one tensor at a time.

A checkpoint holds the trained tensors as fragments (:mod:`d2m_dist.ckpt.checkpoint`)
and, in its metadata, the *export plan* the trainer wrote: every tensor of the
student in order, with its storage dtype, global shape and source (trained: from
the fragments; frozen: the named tensor of the stage's init folder). The export
follows the plan, assembling or copying one tensor at a time into streamed
safetensors shards, so its peak memory is about one tensor however large the model.

With ``optimizer=True`` the export also writes ``optimizer.safetensors`` (the fp32
master weights and Adam moments of every trained tensor) and
``training_state.json`` (step counters, Adam's step, the scheduler, the data
positions): a stage started with ``init=<that folder> ckpt.init_state=true``
continues from it on any layout.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from d2m_dist.ckpt.checkpoint import LATEST, META_FILE, TAG_RE, CheckpointError, CheckpointReader, first_line
from d2m_dist.ckpt.streaming import TensorFile, write_sharded
from d2m_dist.models.diffusers_student import write_diffusers_student
from d2m_dist.models.flux_config import DTYPES
from d2m_dist.models.portable import CONFIG_FILE, PROVENANCE_FILE
from d2m_dist.runtime.folders import written_whole

OPTIMIZER_FILE = "optimizer.safetensors"
TRAINING_STATE_FILE = "training_state.json"
DEFAULT_SHARD_BYTES = 5 * 2**30


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself, a checkpoints root (its latest) or a stage folder."""
    p = Path(path)
    for root in (p, p / "checkpoints"):
        if (root / META_FILE).is_file():
            return root
        if (root / LATEST).is_file():
            tag = (root / LATEST).read_text().strip()
            if TAG_RE.match(tag) and (root / tag).is_dir():
                return root / tag
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} not found")
    raise CheckpointError(f"{p} is no checkpoint: no {META_FILE}, no {LATEST} (nor in {p / 'checkpoints'})")


def inspect(path: str | Path) -> Dict[str, Any]:
    """What a checkpoint holds: layout, counters, tensors by kind, files and sizes. Reads no tensor data."""
    reader = CheckpointReader(resolve_checkpoint(path))
    meta = reader.meta
    kinds: Dict[str, Dict[str, int]] = {}
    for key, frags in reader.fragments.items():
        kind = key.split("/", 1)[0]
        k = kinds.setdefault(kind, {"tensors": 0, "elements": 0})
        k["tensors"] += 1
        k["elements"] += sum(f[3] for f in frags)
    files = {f.name: f.stat().st_size for f in sorted(reader.folder.iterdir()) if f.is_file()}
    plan = meta.get("export", {})
    return {
        "checkpoint": str(reader.folder),
        "step": meta.get("step"), "draws": meta.get("draws"), "skipped_steps": meta.get("skipped_steps"),
        "adam_step": meta.get("adam_step"), "layout": meta.get("layout"),
        "stage": plan.get("stage"), "init": plan.get("init"),
        "trained_tensors": kinds.get("fp32", {}).get("tensors", 0), "kinds": kinds,
        "student_tensors": len(plan.get("tensors", [])), "has_ema": "ema" in kinds,
        "files": files, "bytes": sum(files.values()),
    }


def export_diffusers(path: str | Path, out: str | Path, *, weights: str = "last", init: Optional[str] = None,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> Path:
    """A checkpoint, or a portable student folder, as a diffusers ``FluxMoETransformer2DModel`` folder.

    A checkpoint goes through a portable folder beside ``out`` (streamed, then linked into
    diffusers' names and removed); a portable folder is linked directly.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output {out} already exists (--overwrite replaces it)")
    if (Path(path) / CONFIG_FILE).is_file():
        if weights != "last" or init is not None:
            raise CheckpointError(f"{path} is a student folder, not a checkpoint: --weights and --init do not apply")
        return write_diffusers_student(path, out, overwrite=overwrite)
    portable = out.with_name(f".{out.name}.portable-{os.getpid()}")
    try:
        export(path, portable, weights=weights, init=init, max_shard_bytes=max_shard_bytes, overwrite=True)
        return write_diffusers_student(portable, out, overwrite=overwrite)
    finally:
        shutil.rmtree(portable, ignore_errors=True)


def export(path: str | Path, out: str | Path, *, weights: str = "last", optimizer: bool = False,
           init: Optional[str] = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> Path:
    """The checkpoint as a portable student folder (streamed; peak memory about one tensor)."""
    if weights not in ("last", "ema"):
        raise CheckpointError(f"--weights: '{weights}' is not last or ema")
    reader = CheckpointReader(resolve_checkpoint(path))
    plan = reader.meta.get("export")
    if not plan:
        raise CheckpointError(f"checkpoint {reader.folder}: no export plan in {META_FILE}")
    init_dir = Path(init or plan["init"])
    if not (init_dir / CONFIG_FILE).is_file():
        raise CheckpointError(f"init folder {init_dir} (the frozen weights) not found: give it with --init")
    if weights == "ema" and not any(k.startswith("ema/") for k in reader.fragments):
        raise CheckpointError(f"checkpoint {reader.folder}: holds no EMA (trained with ema.enabled=false)")
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output {out} already exists (--overwrite replaces it)")

    init_files = _init_tensor_files(init_dir)
    handles: Dict[str, Any] = {}

    def init_tensor(name: str) -> torch.Tensor:
        if name not in init_files:
            raise CheckpointError(f"init folder {init_dir} has no tensor {name}")
        file = init_files[name]
        if file not in handles:
            try:
                handles[file] = TensorFile(init_dir / file)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"init folder file {init_dir / file}: unreadable ({first_line(exc)})") from None
        return handles[file].read(name)

    tensors = plan["tensors"]  # [name, storage dtype, global shape, source]
    by_name = {t[0]: t for t in tensors}
    kind = "ema" if weights == "ema" else "fp32"

    def produce(name: str) -> torch.Tensor:
        _, dtype, shape, source = by_name[name]
        if source == "trained":
            numel = int(torch.Size(shape).numel())
            t = reader.read(name, kind, 0, numel).view(shape)
        else:
            t = init_tensor(source[len("init:"):])
        return t.to(DTYPES[dtype])

    with written_whole(out) as tmp:
        entries = [(n, DTYPES[d], tuple(s)) for n, d, s, _ in tensors]
        write_sharded(tmp, "model", entries, produce, max_shard_bytes, {"format": "pt"})
        student_meta = dict(plan["student_meta"])
        student_meta["extra"] = {**student_meta.get("extra", {}), "step": reader.meta.get("step"), "weights": weights,
                                 "from_checkpoint": str(reader.folder)}
        (tmp / CONFIG_FILE).write_text(json.dumps(student_meta, indent=2))
        if (init_dir / PROVENANCE_FILE).is_file():
            shutil.copy2(init_dir / PROVENANCE_FILE, tmp / PROVENANCE_FILE)
        if optimizer:
            _export_optimizer(reader, tmp, tensors, max_shard_bytes)
    return out


def _export_optimizer(reader: CheckpointReader, folder: Path, tensors: List[List[Any]], max_shard_bytes: int) -> None:
    """fp32 masters and Adam moments of the trained tensors, full size, plus the counters to continue with."""
    trained = [(n, s) for n, _, s, source in tensors if source == "trained"]
    kinds = ("fp32", "exp_avg", "exp_avg_sq") + (("ema",) if any(k.startswith("ema/") for k in reader.fragments) else ())
    entries = [(f"{k}/{n}", torch.float32, tuple(s)) for n, s in trained for k in kinds]

    def produce(key: str) -> torch.Tensor:
        kind, name = key.split("/", 1)
        shape = next(s for n, s in trained if n == name)
        return reader.read(name, kind, 0, int(torch.Size(shape).numel())).view(shape)

    write_sharded(folder, OPTIMIZER_FILE[: -len(".safetensors")], entries, produce, max_shard_bytes, {"format": "pt"})
    meta = {k: v for k, v in reader.meta.items() if k not in ("fragments", "export", "shapes")}
    meta["data"] = [reader.rank_meta(r)["data"] for r in range(reader.world_size)]
    (folder / TRAINING_STATE_FILE).write_text(json.dumps(meta))


def _init_tensor_files(folder: Path) -> Dict[str, str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    return {k: "model.safetensors" for k in TensorFile(folder / "model.safetensors").keys()}



class ExportedStateReader:
    """The training state of an exported folder (``optimizer=True``), read like a checkpoint.

    Its tensors are whole, so any range of any of them reads directly; its layout is
    "exported", never the current one, so a run started from it shares out the data
    positions and reseeds, as after any change of layout.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        state_file = self.folder / TRAINING_STATE_FILE
        if not state_file.is_file():
            raise CheckpointError(f"init {self.folder}: no {TRAINING_STATE_FILE} (export it with --optimizer to start "
                                  f"from its training state)")
        try:
            self.meta = json.loads(state_file.read_text())
            self.meta["layout"] = {"exported": True, **self.meta.get("layout", {})}
            self._data = self.meta.pop("data")
            index = self.folder / f"{OPTIMIZER_FILE}.index.json"
            files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
                else [OPTIMIZER_FILE]
            self._handles = [TensorFile(self.folder / f) for f in files]
        except (OSError, ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"init {self.folder}: training state unreadable ({first_line(exc)})") from None
        self._where = {k: h for h in self._handles for k in h.keys()}

    @property
    def world_size(self) -> int:
        return len(self._data)

    def rank_meta(self, rank: int) -> Dict[str, Any]:
        return {"data": self._data[rank]}

    def has(self, name: str, kind: str) -> bool:
        return f"{kind}/{name}" in self._where

    def read(self, name: str, kind: str, start: int, numel: int) -> torch.Tensor:
        key = f"{kind}/{name}"
        if key not in self._where:
            raise CheckpointError(f"init {self.folder}: no {kind} of {name} in {OPTIMIZER_FILE}")
        return self._where[key].read(key, start, numel).float()
