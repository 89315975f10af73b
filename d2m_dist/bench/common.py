"""Timing helpers for ``d2m bench``: medians of repeated runs, interleaved comparisons, machine description."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Mapping

import torch
from torch.utils.flop_counter import FlopCounterMode


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads (torch {torch.__version__})"


def median_time(fn: Callable[[], object], repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in seconds (CUDA synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_times(fns: Mapping[str, Callable[[], object]], repeats: int = 5,
                      warmup: int = 1) -> Dict[str, List[float]]:
    """Wall times in seconds of each of ``fns``, ``repeats`` per function (CUDA synchronised).

    Every round runs each function once, in the order given, so slow drift (clock
    changes, thermal throttling, another job on the machine) hits all of them alike
    and their ratios stay comparable, where timing one function's repeats after
    another's would put the drift between them. ``warmup`` rounds run first, untimed.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()  # the previous function's queued work is not this one's
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def flops(fn: Callable[[], object]) -> int:
    """Exact FLOPs of one call, counted by torch's dispatcher (no timing noise)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def table(rows, columns) -> str:
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}"


Row = Dict[str, object]
