"""`d2m eval`: DigitEval scores over seeds, fidelity to the teacher, grids and a table row; bad input."""

import json

import numpy as np
import pytest
from PIL import Image

from d2m_dist.cli import main
from d2m_dist.config import TeacherConfig
from d2m_dist.digits.card import teacher_card
from d2m_dist.digits.digiteval import SlotReader, make_prompts, prompt_to_json, score
from d2m_dist.digits.digiteval_run import sample_prompts
from d2m_dist.models.diffusers_student import write_diffusers_student
from d2m_dist.models.flux import load_teacher

QUICK = ["--per-category", "2", "--seeds", "0", "1", "--steps", "2", "--velocity-batches", "1"]


def test_teacher_scores_are_those_of_its_own_canvases_per_seed(digiteval_teacher, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(digiteval_teacher), *QUICK, "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["kind"] == "teacher" and result["guidance"] == {"cfg1": 1.0, "cfg2": 2.0}
    assert result["teacher_scores"] == {} and result["fidelity"] == {}
    # independently: the same prompts drawn by seed and scored by a freshly fitted reader
    teacher, card = load_teacher(TeacherConfig(path=str(digiteval_teacher))), teacher_card(digiteval_teacher)
    prompts, reader = make_prompts(2, 0), SlotReader()
    for name, scale in (("cfg1", 1.0), ("cfg2", 2.0)):
        want = [score(prompts, sample_prompts(teacher, prompts, card, seed=s, guidance=scale, steps=2).canvases,
                      reader) for s in (0, 1)]
        assert result["scores"][name]["per_seed"] == want
        overall = result["scores"][name]["summary"]["overall"]
        assert overall["mean"] == pytest.approx((want[0]["overall"] + want[1]["overall"]) / 2)
    assert (out / "row.md").read_text().splitlines()[2].startswith(f"| {digiteval_teacher.name} | ")


def test_student_against_its_teacher_portable_and_exported_alike(digiteval_teacher, digiteval_student, tmp_path):
    runs = {}
    exported = write_diffusers_student(digiteval_student, tmp_path / "student-diffusers")
    for name, folder in (("portable", digiteval_student), ("diffusers", exported)):
        out = tmp_path / name
        assert main(["eval", "--model", str(folder), "--teacher", str(digiteval_teacher), *QUICK, "--top-k", "0",
                     "--label", "k0", "--out", str(out)]) == 0
        runs[name] = json.loads((out / "eval.json").read_text())
    a, b = runs["portable"], runs["diffusers"]
    assert a["kind"] == "student" and a["top_k"] == 0 and a["scores"] == b["scores"]
    assert a["fidelity"] == b["fidelity"]  # the same images: identical distances to the teacher
    assert set(a["fidelity"]) == {"cfg1", "cfg2", "velocity_mse"} and len(a["fidelity"]["velocity_mse"]) == 4
    assert a["fidelity"]["cfg1"]["psnr"]["mean"] > 0 and a["teacher_scores"]["cfg1"]["per_seed"][0]["overall"] >= 0
    # a grid per category: teacher and student rows at each guidance (4), the category's 2 prompts as columns
    grid = np.asarray(Image.open(tmp_path / "portable" / "grid_counting.png"))
    assert grid.shape == (4 * 18 * 4, 2 * 18 * 4, 3)
    assert a["row"].startswith("| k0 | ") and a["row"].count("|") == 12  # 11 cells


@pytest.fixture
def bad_inputs(tmp_path, digiteval_teacher, digiteval_student, digits_teacher):
    prompts = tmp_path / "p.jsonl"
    good = json.dumps(prompt_to_json(make_prompts(1, 0)[0]))
    prompts.write_text(good + "\n" + json.dumps({"category": "size", "caption": "a big one", "items": [[1, "white"]]}))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    return {
        "student without teacher": (["--model", str(digiteval_student)], "give --teacher"),
        "digits task": (["--model", str(digits_teacher)], "draws task 'digits'"),
        "bad prompt line": (["--model", str(digiteval_teacher), "--prompts", str(prompts)], "line 2: category 'size'"),
        "repeated seed": (["--model", str(digiteval_teacher), "--seeds", "1", "1"], "distinct seeds"),
        "top-k on a teacher": (["--model", str(digiteval_teacher), "--top-k", "1"], "apply to students"),
        "top-k too large": (["--model", str(digiteval_student), "--teacher", str(digiteval_teacher), "--top-k", "9"],
                            "9"),
        "output taken": (["--model", str(digiteval_teacher), "--out", str(tmp_path / "taken")], "already exists"),
        "output inside the model": (["--model", str(digiteval_teacher), "--out", str(digiteval_teacher / "e")],
                                    "overlaps --model"),
    }


@pytest.mark.parametrize("case", ["student without teacher", "digits task", "bad prompt line", "repeated seed",
                                  "top-k on a teacher", "top-k too large", "output taken", "output inside the model"])
def test_bad_input_is_one_line_and_writes_nothing(case, bad_inputs, tmp_path, capsys, digiteval_teacher):
    args, expect = bad_inputs[case]
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "out")]
    before = sorted(p.name for p in tmp_path.iterdir())
    teacher_before = sorted(p.name for p in digiteval_teacher.iterdir())
    capsys.readouterr()
    rc = main(["eval", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("d2m: error: "), err
    assert expect in err[0], err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert sorted(p.name for p in digiteval_teacher.iterdir()) == teacher_before
