"""Expert-parallel scaling on this machine: digits stage 2 on 1 rank against N ranks with ep_size N.

Two measurements, each a real ``d2m train`` run through ``launchers/local.sh``
(torchrun, gloo on CPU, NCCL on GPUs):

* throughput: stage 2 (routed experts and routers train, ZeRO-2) for ``steps``
  steps at the same per-rank batch, one thread per rank on CPU, on 1 rank with
  ep_size 1 and on each of ``ranks`` with ep_size = ranks, ``repeats`` runs each,
  alternated. Images/s is the median over every run's log intervals of the steps
  between logs (``images_per_s_between_logs``: the
  logged steps themselves synchronise around every collective to time them); the
  step-time split (data, teacher, student, communication, optimizer) comes from
  the logged steps and says what the communication costs;
* state per rank: a few steps at ep_size 1, 2, 4 (as many ranks), reading the
  expert weights and optimizer state rank 0 holds (``summary.json``,
  ``parallel/deepspeed_setup.state_bytes``).

The digits assets (shards, teacher, stage-1 student) come from ``run=`` (a demo
run folder: ``launchers/demo.sh``) or are made in a temporary folder first
(a few minutes: the teacher's quality does not change the timing).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from d2m_dist.bench.common import Row, fmt
from d2m_dist.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHARDS = "shards/precomputed/train-{000000..000007}.tar"


def _run(cmd: List[str], env: Optional[Dict[str, str]] = None, log: Optional[Path] = None) -> None:
    full_env = {**os.environ, **(env or {})}
    out = open(log, "a") if log else subprocess.DEVNULL
    try:
        rc = subprocess.call(cmd, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    finally:
        if log:
            out.close()
    if rc != 0:
        raise RuntimeError(f"bench ep: {' '.join(cmd[:4])} ... exited {rc}" + (f" (log: {log})" if log else ""))


def _d2m(*args: str) -> List[str]:
    return [sys.executable, "-m", "d2m_dist.cli", *args]


def prepare_assets(run: Path, log: Path) -> None:
    """Shards, a briefly trained digits teacher and a stage-1 student in ``run`` (skipping what exists)."""
    if not (run / "shards/raw/train.manifest.json").is_file():
        _run(_d2m("shards", "make", "digits", f"out_dir={run}/shards/raw", "max_samples=225"), log=log)
    if not (run / "shards/precomputed/train.manifest.json").is_file():
        _run(["bash", "launchers/local.sh", "configs/digits/precompute.yaml",
              f"inputs={run}/shards/raw/train-{{000000..000007}}.tar", f"out_dir={run}/shards/precomputed"],
             env={"NPROC": "1", "VERB": "precompute"}, log=log)
    if not (run / "teacher/model_index.json").is_file():
        _run(_d2m("teacher", "--config", "configs/digits/teacher.yaml", "--out", str(run / "teacher"),
                  "--eval-per-class", "1", "steps=60", "warmup_steps=5"), log=log)
    if not (run / "stage0").is_dir():
        _run(_d2m("convert", "--config", "configs/digits/stage0.yaml", f"teacher.path={run}/teacher",
                  f"output={run}/stage0"), log=log)
    if not (run / "stage1/export").is_dir():
        _stage(run, "stage1", 1, 1, run, [f"init={run}/stage0", "steps=20"], log)


def _stage(assets: Path, stage: str, nproc: int, ep: int, run_dir: Path, extra: Sequence[str], log: Path) -> Path:
    _run(["bash", "launchers/local.sh", f"configs/digits/{stage}.yaml", f"run_dir={run_dir}",
          f"teacher.path={assets}/teacher", f"data.urls={assets}/{SHARDS}", f"parallel.ep_size={ep}",
          "log.wandb=false", "log.progress=false", "log.fixed_batches=0", "log.sample_every=0", *extra],
         env={"NPROC": str(nproc), "OMP_NUM_THREADS": "1"}, log=log)
    return run_dir / stage


def _metrics(stage_dir: Path) -> List[Dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _median(rows: List[Dict], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else float("nan")


def throughput(assets: Path, work: Path, nproc: int, steps: int, log: Path, repeat: int = 0) -> List[Dict]:
    """One stage-2 run on ``nproc`` ranks with ep_size ``nproc``: its log records after the first."""
    stage = _stage(assets, "stage2", nproc, nproc, work / f"throughput-{nproc}-{repeat}",
                   [f"init={assets}/stage1/export", f"steps={steps}", "log.every=10", f"ckpt.every={10 * steps}"], log)
    return _metrics(stage)[1:]  # the first interval holds the warm-up (allocations, first all_to_all)


def _throughput_row(nproc: int, steps: int, records: List[Dict]) -> Row:
    row: Row = {"ranks": nproc, "ep_size": nproc, "steps": steps,
                "images/s": _median(records, "images_per_s_between_logs")}
    for key in ("data", "teacher_forward", "student_forward_backward", "communication", "optimizer"):
        row[f"{key} ms"] = _median(records, f"time/{key}") * 1e3
    return row


def state(assets: Path, work: Path, nproc: int, log: Path) -> Dict[str, int]:
    stage = _stage(assets, "stage2", nproc, nproc, work / f"state-{nproc}",
                   [f"init={assets}/stage1/export", "steps=2", "log.every=1", "ckpt.every=1000"], log)
    return json.loads((stage / "summary.json").read_text())["state_bytes_rank0"]


def _ints(text: str, what: str) -> List[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"bench ep: {what} must be a comma list of positive integers, got {text!r}")
    return values


def run(run: Optional[str] = None, ranks: str = "2", state_ranks: str = "1,2,4", steps: int = 120,
        repeats: int = 3) -> List[Row]:
    """Rows: throughput at 1 rank and at each of ``ranks`` (ep_size = ranks), then state per rank.

    Each throughput row pools the log intervals of ``repeats`` runs, alternated with the other rows'.
    """
    scale, state_at = _ints(ranks, "ranks"), _ints(state_ranks, "state_ranks")
    if steps < 30:
        raise ConfigError(f"bench ep: steps must be at least 30 (three log intervals), got {steps}")
    if repeats < 1:
        raise ConfigError(f"bench ep: repeats must be at least 1, got {repeats}")
    with tempfile.TemporaryDirectory(prefix="d2m-bench-ep-") as tmp:
        work = Path(tmp)
        log = work / "runs.log"
        assets = Path(run) if run else work / "assets"
        try:
            prepare_assets(assets, log)
            # runs alternate (1 rank, N ranks, 1 rank, ...) so that the machine's drift hits all alike
            counts = [1] + [n for n in scale if n != 1]
            records: Dict[int, List[Dict]] = {n: [] for n in counts}
            for rep in range(repeats):
                for n in counts:
                    records[n] += throughput(assets, work, n, steps, log, rep)
            rows = [_throughput_row(n, steps, records[n]) for n in counts]
            for r in rows:
                r["vs 1 rank"] = r["images/s"] / rows[0]["images/s"]
            states = {n: state(assets, work, n, log) for n in state_at}
        except RuntimeError as exc:
            # the runs' output outlives the temporary folder: the failing rank's traceback is in it
            kept = Path(tempfile.gettempdir()) / "d2m-bench-ep-failed.log"
            kept.write_text(log.read_text())
            raise RuntimeError(f"{str(exc).split(' (log:')[0]} (its output: {kept})") from None
    table: List[Row] = []
    for r in rows:
        table.append({"what": f"stage 2, {r['ranks']} rank(s), ep_size {r['ep_size']}",
                      "images/s": fmt(r["images/s"], 4), "vs 1 rank": fmt(r["vs 1 rank"], 3),
                      **{k: fmt(v, 3) for k, v in r.items() if k.endswith(" ms")}})
    ref = states[state_at[0]]
    for n, s in states.items():
        table.append({"what": f"state on rank 0 at ep_size {n} ({n} ranks)",
                      "expert weights MB": fmt(s["expert_weights"] / 1e6, 4),
                      "optimizer MB": fmt(s["optimizer"] / 1e6, 4),
                      "experts vs first": fmt(s["expert_weights"] / ref["expert_weights"], 3),
                      "optimizer vs first": fmt(s["optimizer"] / ref["optimizer"], 3)})
    return table


COLUMNS = ["what", "images/s", "vs 1 rank", "data ms", "teacher_forward ms", "student_forward_backward ms",
           "communication ms", "optimizer ms", "expert weights MB", "optimizer MB", "experts vs first",
           "optimizer vs first"]
