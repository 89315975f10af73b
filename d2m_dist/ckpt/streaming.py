"""Safetensors files written and read one tensor (or one range) at a time: peak memory is a tensor, not the model.

``safetensors.torch.save_file`` takes every tensor at once. The format is simple
(8-byte header length, a JSON header of names, dtypes, shapes and byte ranges,
then the raw bytes in header order), so when every name, dtype and shape is known
in advance the header can be written first and the tensors streamed after it.
Files are cut into shards of at most ``max_shard_bytes`` with the index file
huggingface's loaders (and :func:`d2m_dist.models.portable.read_state_dict`) read.

Reading (:class:`TensorFile`) uses plain positioned reads, not the memory map of
``safetensors.safe_open``: every page of a mapped file a process touched counts
in its resident set until the kernel reclaims it, so exporting a model through
mmap shows (and, under a cgroup limit, is charged) the whole model's size.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}
TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit

Entry = Tuple[str, torch.dtype, Tuple[int, ...]]  # name, dtype, shape


def _nbytes(entry: Entry) -> int:
    return BYTES[SAFETENSORS_DTYPES[entry[1]]] * math.prod(entry[2])


def plan_shards(entries: Sequence[Entry], max_shard_bytes: int) -> List[List[Entry]]:
    """Consecutive groups of entries, each at most ``max_shard_bytes`` (a larger tensor gets a shard alone)."""
    shards: List[List[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + _nbytes(e) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += _nbytes(e)
    return [s for s in shards if s]


def write_streamed(path: Path, entries: Sequence[Entry], produce: Callable[[str], torch.Tensor],
                   metadata: Dict[str, str]) -> None:
    """One safetensors file: ``produce(name)`` is called once per entry, in order, and must return that tensor."""
    header: Dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in entries:
        n = _nbytes((name, dtype, shape))
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for name, dtype, shape in entries:
            t = produce(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: produced {t.dtype} {tuple(t.shape)}, planned {dtype} {tuple(shape)}")
            fh.write(memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))
        fh.flush()
        os.fsync(fh.fileno())


def write_sharded(folder: Path, prefix: str, entries: Sequence[Entry], produce: Callable[[str], torch.Tensor],
                  max_shard_bytes: int, metadata: Dict[str, str]) -> List[str]:
    """``<prefix>.safetensors``, or ``<prefix>-0000i-of-0000n.safetensors`` plus ``<prefix>.safetensors.index.json``."""
    shards = plan_shards(entries, max_shard_bytes)
    if len(shards) <= 1:
        write_streamed(folder / f"{prefix}.safetensors", shards[0] if shards else [], produce, metadata)
        return [f"{prefix}.safetensors"]
    names = [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(names, shards):
        write_streamed(folder / file, shard, produce, metadata)
        weight_map.update({name: file for name, _, _ in shard})
    total = sum(_nbytes(e) for e in entries)
    (folder / f"{prefix}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return names


class TensorFile:
    """A safetensors file's header, and any tensor or element range of it by plain reads (no memory map).

    A file that is not safetensors (a pickle, say) fails in the constructor with ValueError, unread beyond
    its first bytes: nothing in it is ever executed.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
                raise ValueError("not a safetensors file (bad header length)")
            try:
                header = json.loads(fh.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError("not a safetensors file (header is not JSON)") from None
        if not isinstance(header, dict):
            raise ValueError("not a safetensors file (header is not a table)")
        self.metadata: Dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        for name, e in header.items():
            lo, hi = e["data_offsets"]
            if e["dtype"] not in TORCH_DTYPES or hi - lo != BYTES[e["dtype"]] * math.prod(e["shape"]) or \
                    self._data_start + hi > size:
                raise ValueError(f"tensor {name}: dtype {e['dtype']} or its byte range does not fit the file")
        self._entries: Dict[str, Dict] = header

    def keys(self) -> List[str]:
        return list(self._entries)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def read(self, name: str, start: int = 0, numel: int | None = None) -> torch.Tensor:
        """The tensor ``name`` in its shape, or elements ``start : start + numel`` of it flattened (1-D)."""
        e = self._entries[name]
        dtype, total = TORCH_DTYPES[e["dtype"]], math.prod(e["shape"])
        count = total - start if numel is None else numel
        if start < 0 or count < 0 or start + count > total:
            raise ValueError(f"tensor {name}: range {start}:{start + count} outside its {total} elements")
        out = torch.empty(count, dtype=dtype)
        itemsize = BYTES[e["dtype"]]
        with open(self.path, "rb") as fh:
            fh.seek(self._data_start + e["data_offsets"][0] + start * itemsize)
            if fh.readinto(memoryview(out.view(torch.uint8).numpy())) != count * itemsize:
                raise ValueError(f"tensor {name}: file {self.path} ends early")
        return out.view(e["shape"]) if numel is None and start == 0 else out
