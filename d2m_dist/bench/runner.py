"""``d2m bench NAME [key=value ...]``: run one benchmark, print (and optionally append) its table.

Every benchmark also takes ``json=PATH``: its rows, columns, the command, the
machine and the versions of torch and DeepSpeed, written as one JSON object.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from d2m_dist.bench import data, ep, export, mob, moe, partition, step
from d2m_dist.bench.common import Row, machine, table
from d2m_dist.config import CalibrationConfig, ConfigError
from d2m_dist.digits.batches import digits_batches
from d2m_dist.digits.card import PretrainConfig
from d2m_dist.digits.teacher import pretrain_teacher


def _kv(overrides: Sequence[str]) -> Dict[str, str]:
    out = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"benchmark setting '{item}' is not key=value")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def _bench_mob(kv: Dict[str, str]):
    rows = mob.run(m=int(kv.pop("m", 4)), batch=int(kv.pop("batch", 16)), repeats=int(kv.pop("repeats", 7)))
    return rows, ["kappa", "m", "GFLOPs", "FLOPs vs kappa=m", "median ms", "time vs kappa=m"]


def _bench_partition(kv: Dict[str, str]):
    teacher = kv.pop("teacher", None)
    with tempfile.TemporaryDirectory(prefix="d2m-bench-teacher-") as tmp:
        if teacher is None:  # a fresh digits teacher (about a minute on 2 cores)
            teacher = str(Path(tmp) / "teacher")
            pretrain_teacher(PretrainConfig(), teacher, eval_per_class=10)
        calib = list(digits_batches(teacher, CalibrationConfig(num_batches=int(kv.pop("calib_batches", 16)),
                                                               batch_size=32, seed=0)))
        held = list(digits_batches(teacher, CalibrationConfig(num_batches=8, batch_size=32, seed=12345)))
        rows = partition.run(teacher, calib, held, spec=kv.pop("spec", "1S12E2A"), top_k=int(kv.pop("k", 2)))
    return rows, ["strategy", "spec", "k", "ffn rel err", "velocity rel err"]


def _bench_data(kv: Dict[str, str]):
    rows = data.run(passes=int(kv.pop("passes", 3)), workers=int(kv.pop("workers", 2)))
    return rows, list(rows[0])


def _bench_step(kv: Dict[str, str]):
    rows = step.run(teacher=kv.pop("teacher", "meta:flux1-dev"), spec=kv.pop("spec", "1S12E2A"),
                    batch=int(kv.pop("batch", 1)), image_tokens=int(kv.pop("image_tokens", 4096)),
                    text_tokens=int(kv.pop("text_tokens", 512)), repeats=int(kv.pop("repeats", 5)),
                    device=kv.pop("device", "auto"), parts=kv.pop("parts", "train,inference"),
                    depth=kv.pop("depth", "reduced"))
    return rows, step.COLUMNS


def _bench_export(kv: Dict[str, str]):
    rows = export.run(teacher=kv.pop("teacher", "meta:flux1-dev"), spec=kv.pop("spec", "1S12E2A"),
                      workdir=kv.pop("workdir", None))
    return rows, list(rows[0])


def _bench_moe(kv: Dict[str, str]):
    rows = moe.run(dims=kv.pop("dims", "1024,3072"), tokens=int(kv.pop("tokens", 4096)),
                   spec=kv.pop("spec", "1S12E2A"), repeats=int(kv.pop("repeats", 5)),
                   warmup=int(kv.pop("warmup", 1)), device=kv.pop("device", "auto"),
                   modes=kv.pop("modes", "forward,forward+backward"), variants=kv.pop("variants", "all"))
    return rows, moe.COLUMNS


def _bench_ep(kv: Dict[str, str]):
    rows = ep.run(run=kv.pop("run", None), ranks=kv.pop("ranks", "2"), state_ranks=kv.pop("state_ranks", "1,2,4"),
                  steps=int(kv.pop("steps", 120)), repeats=int(kv.pop("repeats", 3)))
    return rows, ep.COLUMNS


BENCHMARKS = {"ep": _bench_ep, "export": _bench_export, "mob": _bench_mob, "moe": _bench_moe, "partition": _bench_partition,
              "data": _bench_data, "step": _bench_step}


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_json(path: str, name: str, command: str, rows: List[Row], columns: Sequence[str]) -> None:
    """One benchmark run as JSON: what ran, where, with which versions, and its rows (as in the table)."""
    doc = {
        "benchmark": name, "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command,
        "machine": machine(), "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                           "deepspeed": _version("deepspeed")},
        "columns": list(columns), "rows": rows,
    }
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=1, default=str)
        fh.write("\n")


def run_benchmark(name: str, overrides: Sequence[str], out: Optional[str] = None) -> int:
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark '{name}' (one of {', '.join(BENCHMARKS)})")
    kv = _kv(overrides)
    json_path = kv.pop("json", None)
    rows, columns = BENCHMARKS[name](kv)
    if kv:
        raise ConfigError(f"unknown setting(s) for benchmark {name}: {', '.join(kv)}")
    command = f"d2m bench {name} {' '.join(overrides)}".rstrip()
    if json_path:
        write_json(json_path, name, command, rows, columns)
    text = "\n".join([
        f"### {name} ({datetime.date.today()}, {machine()})",
        f"`{command}`",
        "",
        table(rows, columns),
        "",
    ])
    print(text)
    if out:
        with open(out, "a") as fh:
            fh.write(text + "\n")
    return 0
