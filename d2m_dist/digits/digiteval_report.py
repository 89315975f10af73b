"""``d2m eval`` on a DigitEval teacher, student or exported student: scores, fidelity, grids, a table row.

Everything about the request is checked before any model is loaded (one line,
exit 2, nothing written). The model and, given ``--teacher``, its teacher draw
the same prompts from the same noise for every seed, unguided and at the
teacher card's ``sample_guidance``; each is scored by DigitEval's reader. The
output folder (``eval.json``, ``grid_<category>.png``, ``row.md``) is written
whole or not at all.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from d2m_dist.config import ConfigError, TeacherConfig
from d2m_dist.digits.card import PretrainConfig, is_digits_teacher, teacher_card
from d2m_dist.digits.digiteval import CATEGORIES, Prompt, make_prompts, prompt_from_json
from d2m_dist.digits.digiteval_run import (
    first_of_each,
    grid_rows,
    image_fidelity,
    read_scores,
    sample_prompts,
    spread,
    summarise,
    velocity_fidelity,
)
from d2m_dist.eval.generate import check_knobs, student_config
from d2m_dist.eval.generate_kinds import check_same_architecture
from d2m_dist.models.diffusers_student import load_any_student, student_base_config
from d2m_dist.models.flux import load_flux_config, load_teacher
from d2m_dist.runtime.folders import written_whole

RESULT_FILE = "eval.json"
ROW_FILE = "row.md"
GRID_COLUMNS = 8  # prompts per category shown in its grid


@dataclass
class EvalRequest:
    model: str  # a DigitEval teacher (pipeline root), a student folder (portable or diffusers)
    out: str
    teacher: Optional[str] = None  # required for a student: its card says how to feed it
    prompts_file: Optional[str] = None  # JSON lines of DigitEval prompts (digiteval.prompt_to_json)
    per_category: int = 50
    prompt_seed: int = 0
    seeds: Tuple[int, ...] = (0, 1, 2)
    steps: int = 20
    top_k: Optional[int] = None
    mob_kappa: Optional[int] = None
    velocity_batches: int = 4
    label: Optional[str] = None  # the markdown row's first cell (default: the model folder's name)
    overwrite: bool = False


@dataclass
class Checked:
    """What check_request found out: the model's kind, the teacher to compare with, the prompts."""

    model_is_teacher: bool
    teacher: Optional[Path]
    card: PretrainConfig
    prompts: List[Prompt] = field(default_factory=list)


def read_prompt_file(path: Path) -> List[Prompt]:
    if not path.is_file():
        raise ConfigError(f"prompt file {path} not found")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompts.append(prompt_from_json(json.loads(line)))
        except (json.JSONDecodeError, ValueError) as exc:
            raise ConfigError(f"prompt file {path}, line {n}: {str(exc).splitlines()[0]}") from None
    if not prompts:
        raise ConfigError(f"prompt file {path} holds no prompts")
    return prompts


def check_request(req: EvalRequest) -> Checked:
    model = Path(req.model)
    if not model.is_dir():
        raise ConfigError(f"model {model} not found")
    model_is_teacher = is_digits_teacher(model)
    if not model_is_teacher:
        student_config(model)  # one line if it is not a student folder either
        if req.teacher is None:
            raise ConfigError(f"model {model} is a student: give --teacher (its card says how to feed it)")
    elif req.top_k is not None or req.mob_kappa is not None:
        raise ConfigError(f"model {model} is a dense teacher: --top-k and --mob-kappa apply to students")
    teacher = Path(req.teacher) if req.teacher is not None else None
    if teacher is not None and not is_digits_teacher(teacher):
        raise ConfigError(f"teacher {teacher}: not a digits-preset teacher (no d2m_teacher.json)")
    card = teacher_card(teacher if teacher is not None else model)
    if card.task != "digiteval":
        raise ConfigError(f"teacher {teacher or model} draws task {card.task!r}: DigitEval scores 'digiteval' "
                          f"teachers (configs/digits/digiteval-teacher.yaml); d2m sample reads the 'digits' task")
    if teacher is not None:
        reference = load_flux_config(teacher)
        own = load_flux_config(model) if model_is_teacher else student_base_config(model)
        check_same_architecture(own, reference, teacher)
    if not model_is_teacher:
        check_knobs(student_config(model), req.top_k, req.mob_kappa)
    if not req.seeds or any(s < 0 for s in req.seeds) or len(set(req.seeds)) != len(req.seeds):
        raise ConfigError(f"--seeds {list(req.seeds)}: give one or more distinct seeds >= 0")
    if req.steps < 1 or req.per_category < 1 or req.velocity_batches < 0:
        raise ConfigError("--steps and --per-category must be >= 1, --velocity-batches >= 0")
    prompts = read_prompt_file(Path(req.prompts_file)) if req.prompts_file else \
        make_prompts(req.per_category, req.prompt_seed)
    out = Path(req.out).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is a file, not a folder")
    if out.exists() and not req.overwrite and any(out.iterdir()):
        raise ConfigError(f"output {out} already exists (--overwrite replaces it)")
    for name, given in (("--model", model), ("--teacher", teacher)):
        if given is not None:
            given = given.resolve()
            if out == given or out in given.parents or given in out.parents:
                raise ConfigError(f"output {out} overlaps {name} {given}: --overwrite would delete it")
    return Checked(model_is_teacher, teacher, card, prompts)


def _load(req: EvalRequest, checked: Checked) -> Tuple[torch.nn.Module, Optional[torch.nn.Module]]:
    if checked.model_is_teacher:
        model = load_teacher(TeacherConfig(path=req.model))
    else:
        model = load_any_student(req.model)  # with the top-k and kappa it was saved with, unless asked otherwise
        if req.top_k is not None:
            model.set_top_k(req.top_k)
        if req.mob_kappa is not None:
            model.set_mob_kappa(req.mob_kappa)
    teacher = load_teacher(TeacherConfig(path=str(checked.teacher))) if checked.teacher is not None else None
    return model.eval(), teacher


def run_eval(req: EvalRequest, checked: Checked) -> Dict:
    model, teacher = _load(req, checked)
    card, prompts = checked.card, checked.prompts
    settings = {"cfg1": 1.0, f"cfg{card.sample_guidance:g}": card.sample_guidance}
    result: Dict = {
        "model": str(Path(req.model).resolve()), "teacher": str(checked.teacher.resolve()) if checked.teacher else None,
        "kind": "teacher" if checked.model_is_teacher else "student",
        "top_k": None if checked.model_is_teacher else model.config.top_k,
        "mob_kappa": None if checked.model_is_teacher else model.config.mob_kappa,
        "parameters": sum(p.numel() for p in model.parameters()),
        "prompts": {"file": req.prompts_file, "per_category": None if req.prompts_file else req.per_category,
                    "seed": None if req.prompts_file else req.prompt_seed, "count": len(prompts)},
        "seeds": list(req.seeds), "steps": req.steps, "guidance": settings,
        "scores": {}, "teacher_scores": {}, "fidelity": {}, "latency_ms_per_image": {},
    }
    rows: List[Tuple[str, np.ndarray]] = []  # the first seed's canvases, for the grids
    for name, scale in settings.items():
        per_seed, teacher_per_seed, fidelity, latency = [], [], [], []
        for i, seed in enumerate(req.seeds):
            reference = None
            if teacher is not None:
                reference = sample_prompts(teacher, prompts, card, seed=seed, guidance=scale, steps=req.steps)
                teacher_per_seed.append(read_scores(prompts, reference.canvases))
            drawn = sample_prompts(model, prompts, card, seed=seed, guidance=scale, steps=req.steps)
            per_seed.append(read_scores(prompts, drawn.canvases))
            latency.append(1000.0 * drawn.seconds / len(prompts))
            if reference is not None:
                fidelity.append(image_fidelity(drawn.canvases, reference.canvases))
            if i == 0:
                rows += [(f"teacher {name}", reference.canvases)] if reference is not None else []
                rows.append((f"model {name}", drawn.canvases))
        result["scores"][name] = {"summary": summarise(per_seed), "per_seed": per_seed}
        result["latency_ms_per_image"][name] = statistics.median(latency)
        if teacher is not None:
            result["teacher_scores"][name] = {"summary": summarise(teacher_per_seed), "per_seed": teacher_per_seed}
            result["fidelity"][name] = {"mse": spread([f["mse"] for f in fidelity]),
                                        "psnr": spread([f["psnr"] for f in fidelity])}
    if teacher is not None and req.velocity_batches > 0:
        result["fidelity"]["velocity_mse"] = velocity_fidelity(model, teacher, card, batches=req.velocity_batches)
    label = req.label or Path(req.model).name
    row = markdown_row(label, result, settings)
    with written_whole(req.out) as tmp:
        for category, idx in first_of_each(prompts, GRID_COLUMNS).items():
            Image.fromarray(grid_rows(rows, idx)).save(tmp / f"grid_{category}.png")
        (tmp / ROW_FILE).write_text(markdown_header(settings) + row + "\n")
        result["row"] = row
        (tmp / RESULT_FILE).write_text(json.dumps({"request": asdict(req), **result}, indent=2))
    return result


def _cell(summary: Dict[str, float]) -> str:
    return f"{summary['mean']:.3f} ± {summary['std']:.3f}"


def markdown_header(settings: Dict[str, float]) -> str:
    guided = [n for n in settings if n != "cfg1"]
    cols = ["model", "overall (unguided)", *[f"overall ({n})" for n in guided], *CATEGORIES, "PSNR vs teacher (dB)",
            "ms/image"]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"


def markdown_row(label: str, result: Dict, settings: Dict[str, float]) -> str:
    """One table row: overall per guidance setting, per-category unguided, PSNR unguided, latency unguided."""
    scores = result["scores"]
    cells = [label, *[_cell(scores[n]["summary"]["overall"]) for n in settings]]
    cells += [_cell(scores["cfg1"]["summary"][c]) if c in scores["cfg1"]["summary"] else "-" for c in CATEGORIES]
    psnr = result["fidelity"].get("cfg1", {}).get("psnr")
    cells.append(f"{psnr['mean']:.1f}" if psnr else "-")
    cells.append(f"{result['latency_ms_per_image']['cfg1']:.2f}")
    return "| " + " | ".join(cells) + " |"


def parse_seeds(values: Sequence[str]) -> Tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ConfigError(f"--seeds {' '.join(values)}: integers expected") from None
