"""``d2m bench NAME [key=value ...]``: run one benchmark, print (and optionally append) its table."""

from __future__ import annotations

import datetime
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence

from d2m_dist.bench import data, export, mob, partition, step
from d2m_dist.bench.common import machine, table
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
            pretrain_teacher(PretrainConfig(), teacher, eval_per_digit=10)
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
                    device=kv.pop("device", "auto"))
    return rows, list(rows[0])


def _bench_export(kv: Dict[str, str]):
    rows = export.run(teacher=kv.pop("teacher", "meta:flux1-dev"), spec=kv.pop("spec", "1S12E2A"),
                      workdir=kv.pop("workdir", None))
    return rows, list(rows[0])


BENCHMARKS = {"export": _bench_export, "mob": _bench_mob, "partition": _bench_partition, "data": _bench_data, "step": _bench_step}


def run_benchmark(name: str, overrides: Sequence[str], out: Optional[str] = None) -> int:
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark '{name}' (one of {', '.join(BENCHMARKS)})")
    kv = _kv(overrides)
    rows, columns = BENCHMARKS[name](kv)
    if kv:
        raise ConfigError(f"unknown setting(s) for benchmark {name}: {', '.join(kv)}")
    text = "\n".join([
        f"### {name} ({datetime.date.today()}, {machine()})",
        f"`d2m bench {name} {' '.join(overrides)}`".replace(" `", "`"),
        "",
        table(rows, columns),
        "",
    ])
    print(text)
    if out:
        with open(out, "a") as fh:
            fh.write(text + "\n")
    return 0
