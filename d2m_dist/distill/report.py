"""The run summary of a pipeline folder: per-stage losses and expert balance, evaluation, parameters.

``python -m d2m_dist.distill.report RUN_DIR`` prints it as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict


def _read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def run_summary(run_dir: str | Path) -> Dict:
    run = Path(run_dir)
    out: Dict = {"run_dir": str(run), "stages": {}}
    teacher_card = _read(run / "teacher" / "d2m_teacher.json")
    if teacher_card:
        out["teacher"] = {k: teacher_card.get(k) for k in ("parameters", "train_seconds", "final_loss", "digit_accuracy",
                                                           "digiteval") if k in teacher_card}
    for s in (1, 2, 3):
        summ = _read(run / f"stage{s}" / "summary.json")
        if not summ:
            continue
        hist = summ.get("history", {})
        loss = hist.get("loss", [])
        window = max(1, len(loss) // 10)
        stage = {
            "steps": summ.get("step"),
            "skipped_steps": summ.get("skipped_steps"),
            "loss_first": sum(loss[:window]) / window if loss else None,
            "loss_last": sum(loss[-window:]) / window if loss else None,
            "max_over_mean_expert_load": summ.get("max_over_mean_expert_load"),
            "wandb_run_id": summ.get("wandb_run_id"),
            # samples read and skipped as bad input, by reason (the digits source reads no files: 0)
            "data": summ.get("data"),
            # the end-of-stage grid's scores, teacher and student from the same noise (digits: digit accuracy)
            "samples": summ.get("samples"),
        }
        stage["loss_fell"] = bool(loss) and stage["loss_last"] < stage["loss_first"]
        fixed = summ.get("fixed_batch_loss") or {}
        stage["fixed_batch_loss"] = fixed
        if fixed.get("start") is not None and fixed.get("end") is not None:
            stage["fixed_batch_loss_fell"] = fixed["end"] < fixed["start"]
        if stage["max_over_mean_expert_load"]:
            stage["max_over_mean_worst"] = max(stage["max_over_mean_expert_load"].values())
        out["stages"][f"stage{s}"] = stage
    ev = _read(run / "eval.json")
    if ev:
        out["evaluation"] = ev
    digiteval = {}
    for folder in sorted((run / "eval").glob("*/")) if (run / "eval").is_dir() else []:
        result = _read(folder / "eval.json")  # `d2m eval` of one model (launchers/digiteval.sh)
        if result:
            digiteval[folder.name] = {"overall": {g: v["summary"]["overall"] for g, v in result["scores"].items()},
                                      "row": result.get("row")}
    if digiteval:
        out["digiteval"] = digiteval
    return out


if __name__ == "__main__":
    print(json.dumps(run_summary(sys.argv[1]), indent=2))
