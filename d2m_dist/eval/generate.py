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

import io
import json
import statistics
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
from d2m_dist.runtime.folders import written_whole

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
    if not (0 <= req.seed and req.seed + len(req.prompts) <= 2**63):
        raise ConfigError(f"--seed {req.seed}: must lie in 0..2^63 - {len(req.prompts)} (image i uses seed + i)")
    out = Path(req.out).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is a file, not a folder")
    if out.exists() and not req.overwrite and any(out.iterdir()):
        raise ConfigError(f"output {out} already exists (--overwrite replaces it)")
    for name, given in (("--student", student), ("--pipeline", pipeline)):
        given = given.resolve()
        if out == given or out in given.parents or given in out.parents:
            raise ConfigError(f"output {out} overlaps {name} {given}: --overwrite would delete it")
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


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(exc).__name__


def _agree_on_failure(error: Optional[BaseException], rank: int, world: int) -> None:
    """Every rank learns whether any failed, so none waits in a collective for one that is gone. Collective."""
    message = None if error is None else (str(error) if isinstance(error, ConfigError) else _first_line(error))
    messages = [message]
    if world > 1:
        messages = [None] * world
        dist.all_gather_object(messages, message)
    failed = [r for r, m in enumerate(messages) if m is not None]
    if not failed:
        return
    if world == 1:
        raise error  # type: ignore[misc]  # one process: its own error, as raised
    raise ConfigError(f"[rank {failed[0]}] {messages[failed[0]]}", everywhere=True)


def run_generate(req: GenerateRequest, device: torch.device,
                 checked: Optional[Tuple[PipelineKind, Settings]] = None) -> Optional[Dict]:
    """Generate every prompt's image(s); the result dict on rank 0 (None on the others).

    ``checked``: what :func:`check_request` returned, when the caller ran it already (before joining
    the process group, so that bad input is one line from every rank alike). Each rank draws its
    prompts (round-robin) and sends the PNGs to rank 0, which alone writes: into a temporary folder
    beside ``out``, renamed into place once whole, so no shared file system is needed and a failure
    on any rank (every rank learns of it) leaves nothing behind.
    """
    rank, world = _rank_world()
    dtype = DTYPES[req.dtype] if req.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    records: List[ImageRecord] = []
    pngs: Dict[str, bytes] = {}
    error: Optional[BaseException] = None
    try:
        kind, settings = checked or check_request(req)
        student = load_any_student(req.student, device=device, dtype=dtype)
        # a folder's saved knobs hold unless the command line sets them
        if req.top_k is not None:
            student.set_top_k(req.top_k)
        if req.mob_kappa is not None:
            student.set_mob_kappa(req.mob_kappa)
        image_fn, teacher = kind.load(Path(req.pipeline), settings, device, dtype, req.teacher_too)
        models = ([("teacher", teacher)] if teacher is not None else []) + [("student", student)]
        mine = list(range(rank, len(req.prompts), world))
        if mine:  # one untimed image per model: the latencies leave out first-call costs (kernels, caches)
            for _, model in models:
                image_fn(model, req.prompts[mine[0]], req.seed + mine[0])
        for i in mine:
            record = ImageRecord(i, req.prompts[i], req.seed + i, rank, {}, {})
            for name, model in models:
                image, seconds = _timed(image_fn, model, req.prompts[i], req.seed + i, device)
                rel = f"{name}/{i:05d}.png"
                pngs[rel] = _png(image)
                record.files[name], record.seconds[name] = rel, seconds
            records.append(record)
        knobs = {"top_k": student.config.top_k, "mob_kappa": student.config.mob_kappa}
    except Exception as exc:  # noqa: BLE001 - told to every rank below, then raised
        error = exc
    _agree_on_failure(error, rank, world)
    parts = [(records, pngs)]
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object((records, pngs), parts, dst=0)
    result, error = None, None
    if rank == 0:
        everything = sorted((r for part, _ in parts for r in part), key=lambda r: r.index)
        files = {k: v for _, part in parts for k, v in part.items()}
        try:
            result = _write(req, kind, settings, dtype, device, world, everything, files,
                            [n for n, _ in models], knobs)
        except Exception as exc:  # noqa: BLE001 - the other ranks learn of it instead of waiting
            error = exc
    _agree_on_failure(error, rank, world)  # also the barrier: no rank returns before the folder is in place
    return result


def _write(req: GenerateRequest, kind: PipelineKind, settings: Settings, dtype: torch.dtype, device: torch.device,
           world: int, records: List[ImageRecord], files: Dict[str, bytes], names: List[str], knobs: Dict) -> Dict:
    """The output folder, whole or not at all: written beside ``out`` under a temporary name, then renamed."""
    with written_whole(req.out) as tmp:  # --overwrite was checked by check_request; the old folder goes last
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(exist_ok=True)
            (tmp / rel).write_bytes(data)
        _write_grid(tmp, records, names)
        result = _summary(req, kind, settings, dtype, device, world, records, names, knobs)
        (tmp / RESULT_FILE).write_text(json.dumps(result, indent=2))
    return result


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
             world: int, records: List[ImageRecord], names: List[str], knobs: Dict) -> Dict:
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    medians = {f"{n}_median_s": statistics.median(r.seconds[n] for r in records) for n in names}
    return {
        "student": str(Path(req.student).resolve()), "pipeline": str(Path(req.pipeline).resolve()),
        "kind": kind.name, **asdict(settings), "seed": req.seed, **knobs,
        "teacher_too": req.teacher_too, "device": str(device), "dtype": dtype_name, "world_size": world,
        "grid": "grid.png", "grid_rows": min(GRID_ROWS, len(records)), **medians,
        "images": [asdict(r) for r in records],
    }
