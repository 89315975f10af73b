"""``d2m ckpt export``'s peak memory against the largest tensor and the checkpoint size.

The export streams a checkpoint into the portable format one tensor at a time,
so its peak memory should follow the largest tensor, not the model. This
benchmark writes a stage-2 checkpoint of a FLUX-width student at reduced depth
(FLUX.1-dev: 3072 wide, 19 double + 38 single blocks -> 1 + 2), in the
trainer's own format (:class:`d2m_dist.ckpt.checkpoint.CheckpointDir`, the
trainer's export plan, every trained tensor cut into two ZeRO-style fragments),
with random values, and an init folder holding the frozen tensors. Then it runs
the CLI in child processes, each reporting its own peak resident set size:

* ``d2m ckpt inspect`` (same imports, reads headers only): the baseline;
* ``d2m ckpt export`` (the student), and with ``--optimizer`` (masters and moments too).

The figure of merit is (peak - baseline) / largest tensor read (fp32, as the
checkpoint stores it): a small constant, whatever the depth.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

from d2m_dist.bench.common import Row, fmt
from d2m_dist.bench.step import reduced_depth
from d2m_dist.ckpt.checkpoint import CheckpointDir, FragmentWriter
from d2m_dist.ckpt.streaming import write_sharded
from d2m_dist.config import MoBConfig, MoEConfig, to_dict
from d2m_dist.distill.resume import export_plan
from d2m_dist.models.flux import build_flux, load_flux_config
from d2m_dist.models.flux_config import DTYPES
from d2m_dist.models.moe import moe_layers
from d2m_dist.models.portable import CONFIG_FILE, StudentMeta
from d2m_dist.models.spec import select_sites
from d2m_dist.models.surgery import convert_to_moe

# the child: run the CLI, then print its own peak RSS (kB) as the last line of stderr. VmHWM, not
# getrusage's ru_maxrss: Linux carries the forking parent's high-water mark over into ru_maxrss
# across exec, so a child of this (large) process would report the parent's size
_CHILD = ("import re, sys\nfrom d2m_dist.cli import main\nrc = main(sys.argv[1:])\n"
          "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
          "print('peak_rss_kb', hwm, file=sys.stderr)\nsys.exit(rc)\n")


def _cli_peak_rss(*args: str) -> tuple[int, float]:
    """Peak RSS in bytes and wall seconds of ``d2m ARGS`` in a fresh process."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"d2m {' '.join(args)} failed:\n{p.stderr[-2000:]}")
    kb = int(p.stderr.strip().splitlines()[-1].split()[1])
    return kb * 1024, seconds


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def write_stage2_checkpoint(root: Path, teacher: str, spec: str) -> Dict[str, int]:
    """A stage-2 checkpoint and its init folder under ``root``; returns tensor and parameter counts."""
    config = reduced_depth(load_flux_config(teacher))
    moe = MoEConfig(spec=spec)
    specs = select_sites(moe, config["num_layers"], config["num_single_layers"])
    model = convert_to_moe(build_flux(config, meta=True), specs, moe)  # shapes only: no memory
    model.requires_grad_(False)
    for _, layer in moe_layers(model):  # stage 2 trains the routed experts and the routers
        layer.experts.requires_grad_(True)
        layer.router.requires_grad_(True)
    names = {id(p): n for n, p in model.named_parameters()}
    plan = export_plan(model, names, torch.bfloat16)
    g = torch.Generator().manual_seed(0)

    def random(shape, dtype) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * 0.02).to(dtype)

    init = root / "init"
    init.mkdir()
    entries = [(n, DTYPES[d], tuple(s)) for n, d, s, _ in plan]
    shapes = {n: s for n, _, s in entries}
    dtypes = {n: d for n, d, _ in entries}
    write_sharded(init, "model", entries, lambda n: random(shapes[n], dtypes[n]), 5 * 2**30, {"format": "pt"})
    meta = StudentMeta(dict(config), to_dict(moe), {s: str(sp) for s, sp in specs.items()}, to_dict(MoBConfig()),
                       "bf16", {"stage": 0, "note": "random weights (d2m bench export)"})
    (init / CONFIG_FILE).write_text(meta.to_json())

    writer = FragmentWriter()
    trained = [(n, s) for n, _, s, source in plan if source == "trained"]
    for name, shape in trained:
        numel = int(torch.Size(shape).numel())
        half = numel // 2  # two fragments, as two ZeRO ranks would hold them
        for kind in ("fp32", "exp_avg", "exp_avg_sq"):
            flat = random((numel,), torch.float32)
            writer.add(name, kind, 0, flat[:half])
            writer.add(name, kind, half, flat[half:])
    counters = {"step": 1, "draws": 1, "skipped_steps": 0, "layout": {"world_size": 2, "ep_size": 2, "zero_stage": 2},
                "adam_step": 1, "scheduler": {"last_epoch": 1, "step_count": 2},
                "shapes": {n: list(s) for n, s in trained},
                "export": {"stage": 2, "init": str(init), "student_meta": json.loads(meta.to_json()),
                           "tensors": plan}}
    CheckpointDir(root / "stage2" / "checkpoints").save(1, counters, {"data": {}}, writer)
    return {"tensors": len(plan), "trained": len(trained),
            "parameters": sum(int(torch.Size(s).numel()) for _, _, s, _ in plan),
            "largest": max(int(torch.Size(s).numel()) for _, _, s, _ in plan)}


def run(teacher: str = "meta:flux1-dev", spec: str = "1S12E2A", workdir: str | None = None) -> List[Row]:
    with tempfile.TemporaryDirectory(prefix="d2m-bench-export-", dir=workdir) as tmp:
        root = Path(tmp)
        counts = write_stage2_checkpoint(root, teacher, spec)
        ckpt = root / "stage2"
        ckpt_bytes = _folder_bytes(ckpt / "checkpoints")
        largest = counts["largest"] * 4  # read as fp32 (the checkpoint's dtype) before the cast
        base, _ = _cli_peak_rss("ckpt", "inspect", str(ckpt))
        rows: List[Row] = []

        def row(what: str, peak: int, seconds: float, out: Path | None) -> None:
            rows.append({"what": what, "parameters": f"{counts['parameters'] / 1e6:.0f}M",
                         "checkpoint GB": fmt(ckpt_bytes / 1e9, 3),
                         "written GB": fmt(_folder_bytes(out) / 1e9, 3) if out else "-",
                         "largest tensor MB": fmt(largest / 1e6, 3), "peak RSS MB": fmt(peak / 1e6, 4),
                         "over baseline / largest": fmt((peak - base) / largest, 3) if out else "-",
                         "seconds": fmt(seconds, 3)})

        row("inspect (baseline: imports, headers)", base, 0.0, None)
        for extra in ([], ["--optimizer"]):
            out = root / f"student{'-opt' if extra else ''}"
            peak, seconds = _cli_peak_rss("ckpt", "export", str(ckpt), "--out", str(out), *extra)
            row(f"export{' --optimizer' if extra else ''}", peak, seconds, out)
        return rows
