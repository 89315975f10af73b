"""``d2m generate``: images from a student (and, beside it, its teacher) for a list of prompts.

What a pipeline folder is decides how prompts become images: a **pipeline kind**.
FLUX pipeline folders (``model_index.json``, ``vae/``, both text encoders and
tokenizers, ``scheduler/``) are built in and run diffusers' own ``FluxPipeline``
with the student as its transformer; a preset registers its own kind (the digits
preset: :mod:`d2m_dist.digits.generate`).

Every check runs before any weight is loaded or any file written: the prompts,
the student folder, that the student fits the pipeline (text widths, latent
channels, the teacher's architecture), the knobs (top-k, MoB kappa) against the
student's config, the image size. Images are written into a temporary folder
renamed into place at the end: an error leaves nothing behind.

Image ``i`` (in prompt order) is drawn from seed ``seed + i`` on the CPU, so the
same image comes out on any device and any number of ranks; under torchrun the
prompts are dealt round-robin over the ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from d2m_dist.config import ConfigError
from d2m_dist.eval.flux_generate import FLUX_KIND
from d2m_dist.eval.flux_samples import save_rgb_grid
from d2m_dist.eval.generate_kinds import KINDS, GenerateRequest, ImageFn, PipelineKind, Settings
from d2m_dist.models.diffusers_student import (
    DIFFUSERS_CONFIG,
    FluxMoETransformer2DModel,
    diffusers_config,
    is_diffusers_student,
    load_any_student,
    student_base_config,
)
from d2m_dist.models.flux_config import DTYPES
from d2m_dist.models.portable import CONFIG_FILE, StudentMeta

GRID_ROWS = 16  # prompts shown in grid.png (every image is written as its own PNG)
RESULT_FILE = "generate.json"


def pipeline_kind(folder: Path) -> PipelineKind:
    """A preset's kind if one claims the folder, else FLUX (whose check names the parts a folder lacks)."""
    return next((k for k in reversed(KINDS) if k.matches(folder)), FLUX_KIND)


# ----------------------------------------------------------------------------- prompts


def read_prompts(prompt: Optional[str], prompts_file: Optional[str]) -> List[str]:
    """``--prompt`` or ``--prompts FILE`` (one per line, or JSON lines with a "prompt" field)."""
    if (prompt is None) == (prompts_file is None):
        raise ConfigError("give exactly one of --prompt TEXT and --prompts FILE")
    if prompt is not None:
        if not prompt.strip():
            raise ConfigError("--prompt is empty")
        return [prompt]
    path = Path(prompts_file)
    if not path.is_file():
        raise ConfigError(f"prompt file {path} not found")
    try:
        lines = [line.strip() for line in path.read_text().splitlines()]
    except UnicodeDecodeError:
        raise ConfigError(f"prompt file {path}: not UTF-8 text") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line:
            continue
        if path.suffix == ".jsonl":
            try:
                line = str(json.loads(line)["prompt"]).strip()
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(f"prompt file {path}, line {n}: not a JSON object with a \"prompt\"") from None
        if line:
            out.append(line)
    if not out:
        raise ConfigError(f"prompt file {path} holds no prompt")
    return out


# ----------------------------------------------------------------------------- checks


def student_config(path: Path) -> Dict:
    """The student's diffusers config (either folder kind), read without weights."""
    if is_diffusers_student(path):
        return json.loads((path / DIFFUSERS_CONFIG).read_text())
    if (path / CONFIG_FILE).is_file():
        return diffusers_config(StudentMeta.read(path))
    if not path.is_dir():
        raise ConfigError(f"student not found: {path}")
    raise ConfigError(f"student {path}: neither a d2m student folder ({CONFIG_FILE}) nor a diffusers "
                      f"FluxMoETransformer2DModel folder")


def check_knobs(config: Dict, top_k: Optional[int], mob_kappa: Optional[int]) -> None:
    """top-k and kappa against the student's own sites and groups, on the meta device (no memory)."""
    with torch.device("meta"):
        model = FluxMoETransformer2DModel.from_config({**config, "top_k": None, "mob_kappa": None})
    model.set_top_k(top_k)
    model.set_mob_kappa(mob_kappa)


def check_request(req: GenerateRequest) -> Tuple[PipelineKind, Settings]:
    student, pipeline = Path(req.student), Path(req.pipeline)
    config = student_config(student)
    if not pipeline.is_dir():
        raise ConfigError(f"pipeline {pipeline} not found")
    kind = pipeline_kind(pipeline)
    settings = kind.check(pipeline, student_base_config(student), req)
    check_knobs(config, req.top_k, req.mob_kappa)
    if req.dtype is not None and req.dtype not in DTYPES:
        raise ConfigError(f"--dtype {req.dtype} is not one of {', '.join(DTYPES)}")
    out = Path(req.out)
    if out.exists() and not req.overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output {out} already exists (--overwrite replaces it)")
    return kind, settings


# ----------------------------------------------------------------------------- running


@dataclass
class ImageRecord:
    index: int
    prompt: str
    seed: int
    rank: int
    files: Dict[str, str]  # model name -> PNG path relative to the output folder
    seconds: Dict[str, float]  # model name -> wall time of its image


def _rank_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _timed(fn: ImageFn, model: torch.nn.Module, prompt: str, seed: int, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    image = fn(model, prompt, seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return image, time.perf_counter() - start


def run_generate(req: GenerateRequest, device: torch.device,
                 checked: Optional[Tuple[PipelineKind, Settings]] = None) -> Optional[Dict]:
    """Generate every prompt's image(s); the result dict on rank 0 (None on the others).

    ``checked``: what :func:`check_request` returned, when the caller ran it already (before joining
    the process group, so that bad input is one line from every rank alike).
    """
    kind, settings = checked or check_request(req)
    rank, world = _rank_world()
    dtype = DTYPES[req.dtype] if req.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    out = Path(req.out)
    tmp = _shared_tmp_folder(out, rank, world)
    try:
        student = load_any_student(req.student, device=device, dtype=dtype)
        student.set_top_k(req.top_k)
        student.set_mob_kappa(req.mob_kappa)
        image_fn, teacher = kind.load(Path(req.pipeline), settings, device, dtype, req.teacher_too)
        models = ([("teacher", teacher)] if teacher is not None else []) + [("student", student)]
        records: List[ImageRecord] = []
        for i in range(rank, len(req.prompts), world):
            seed = req.seed + i
            record = ImageRecord(i, req.prompts[i], seed, rank, {}, {})
            for name, model in models:
                image, seconds = _timed(image_fn, model, req.prompts[i], seed, device)
                rel = f"{name}/{i:05d}.png"
                (tmp / name).mkdir(exist_ok=True)
                Image.fromarray(image).save(tmp / rel)
                record.files[name], record.seconds[name] = rel, seconds
            records.append(record)
        everything = _gather(records, world)
        result = None
        if rank == 0:
            result = _summary(req, kind, settings, dtype, device, world, everything, [n for n, _ in models])
            _write_grid(tmp, everything, [n for n, _ in models])
            (tmp / RESULT_FILE).write_text(json.dumps(result, indent=2))
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        if world > 1:
            dist.barrier()
        return result
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _shared_tmp_folder(out: Path, rank: int, world: int) -> Path:
    """Rank 0 makes the temporary folder beside ``out``; every rank learns its name."""
    name = [None]
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        name = [tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)]
    if world > 1:
        dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def _gather(records: List[ImageRecord], world: int) -> List[ImageRecord]:
    if world == 1:
        return records
    parts: List[Optional[List[ImageRecord]]] = [None] * world
    dist.all_gather_object(parts, records)
    return sorted((r for part in parts for r in part or []), key=lambda r: r.index)


def _write_grid(folder: Path, records: List[ImageRecord], names: List[str]) -> None:
    """grid.png: one row per prompt (the first GRID_ROWS), one column per model, the same noise across a row."""
    rows = []
    for r in records[:GRID_ROWS]:
        tiles = [np.asarray(Image.open(folder / r.files[n]).convert("RGB")) for n in names]
        rows.append(torch.from_numpy(np.stack([_visible(t) for t in tiles])))
    save_rgb_grid(rows, folder / "grid.png")


def _visible(image: np.ndarray, side: int = 64) -> np.ndarray:
    """Tiny images (the digits' 8x8) enlarged by a whole factor, nearest neighbour, for the grid only."""
    factor = max(1, side // max(image.shape[:2]))
    return image.repeat(factor, 0).repeat(factor, 1)


def _summary(req: GenerateRequest, kind: PipelineKind, settings: Settings, dtype: torch.dtype, device: torch.device,
             world: int, records: List[ImageRecord], names: List[str]) -> Dict:
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    medians = {f"{n}_median_s": statistics.median(r.seconds[n] for r in records) for n in names}
    return {
        "student": str(Path(req.student).resolve()), "pipeline": str(Path(req.pipeline).resolve()),
        "kind": kind.name, **asdict(settings), "seed": req.seed, "top_k": req.top_k, "mob_kappa": req.mob_kappa,
        "teacher_too": req.teacher_too, "device": str(device), "dtype": dtype_name, "world_size": world,
        "grid": "grid.png", "grid_rows": min(GRID_ROWS, len(records)), **medians,
        "images": [asdict(r) for r in records],
    }
