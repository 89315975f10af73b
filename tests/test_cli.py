"""`d2m convert`: happy path and bad input (one line, non-zero exit, nothing left behind)."""

import json
import subprocess
import sys

import pytest

from d2m_dist.cli import main
from tests.tiny import save_tiny_teacher

BASE = ["moe.spec=1S4E2A", "calibration.num_batches=2", "calibration.batch_size=2"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    save_tiny_teacher(root)
    return root


def run(capsys, *args):
    rc = main(["convert", *args])
    err = capsys.readouterr().err.strip()
    return rc, err


def test_convert_writes_a_student(tmp_path, teacher_dir, capsys):
    rc, err = run(capsys, f"teacher.path={teacher_dir}", f"output={tmp_path / 'out'}", *BASE)
    assert rc == 0, err
    meta = json.loads((tmp_path / "out" / "d2m_config.json").read_text())
    assert meta["site_specs"]["single.1.mlp"] == "1S4E2A"
    # the teacher it came from, checked at every stage start
    from d2m_dist.models.teacher_identity import teacher_fingerprint

    assert meta["extra"]["teacher_fingerprint"] == teacher_fingerprint(teacher_dir)


def test_convert_with_config_file_subprocess(tmp_path, teacher_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"teacher:\n  path: {teacher_dir}\nmoe:\n  spec: 1S4E1A\n  sites: single\n"
                   f"calibration:\n  num_batches: 1\noutput: {tmp_path / 'o'}\n")
    p = subprocess.run([sys.executable, "-m", "d2m_dist.cli", "convert", "--config", str(cfg)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "o" / "model.safetensors").is_file()


def _truncated_teacher(tmp_path, teacher_dir):
    import shutil

    bad = tmp_path / "trunc"
    shutil.copytree(teacher_dir, bad)
    f = bad / "transformer" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return bad


def _non_flux_teacher(tmp_path, teacher_dir):
    bad = tmp_path / "unet"
    (bad).mkdir()
    (bad / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    return bad


def _flux_config_other_weights(tmp_path, teacher_dir):
    import shutil

    import torch
    from safetensors.torch import save_file

    bad = tmp_path / "mislabelled"
    shutil.copytree(teacher_dir, bad)
    save_file({"encoder.layer.0.weight": torch.zeros(4, 4)},
              str(bad / "transformer" / "diffusion_pytorch_model.safetensors"))
    return bad


@pytest.mark.parametrize(
    "case, expect",
    [
        ("spec", "moe spec '1X4E2A'"),
        ("other_weights", "the weights are not the FLUX transformer its config.json describes"),
        ("cluster_iters", "partition.cluster_iters must be > 0"),
        ("indivisible", "does not divide into 5 experts"),
        ("missing_teacher", "teacher not found"),
        ("unknown_key", "moe.bogus: Key 'bogus' not in"),
        ("wrong_type", "calibration.num_batches"),
        ("truncated", "truncated"),
        ("non_flux", "not FluxTransformer2DModel"),
        ("strategy", "partition.strategy"),
    ],
)
def test_bad_input_one_line_error_no_output(tmp_path, teacher_dir, capsys, case, expect):
    out = tmp_path / "out"
    args = [f"teacher.path={teacher_dir}", f"output={out}", *BASE]
    extra = {
        "spec": ["moe.spec=1X4E2A"],
        "indivisible": ["moe.spec=1S5E2A"],
        "missing_teacher": [f"teacher.path={tmp_path / 'nope'}"],
        "unknown_key": ["moe.bogus=1"],
        "wrong_type": ["calibration.num_batches=many"],
        "truncated": [f"teacher.path={_truncated_teacher(tmp_path, teacher_dir)}"] if case == "truncated" else [],
        "non_flux": [f"teacher.path={_non_flux_teacher(tmp_path, teacher_dir)}"] if case == "non_flux" else [],
        "strategy": ["partition.strategy=kmeans"],
        "other_weights": [f"teacher.path={_flux_config_other_weights(tmp_path, teacher_dir)}"]
        if case == "other_weights" else [],
        "cluster_iters": ["partition.cluster_iters=0"],
    }[case]
    rc, err = run(capsys, *args, *extra)
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("d2m: error:")]
    assert len(lines) == 1 and expect in lines[0], err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_output_is_not_touched(tmp_path, teacher_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = run(capsys, f"teacher.path={teacher_dir}", f"output={out}", *BASE)
    assert rc == 2 and "already exists" in err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "rank, everywhere, initialised, printed, code",
    [
        ("0", False, False, "d2m: error: bad\n", 0),  # before the process group: the same on every rank
        ("1", False, False, "", 0),  # ... so rank 1 stays quiet
        ("1", True, True, "", 0),  # agreed through a collective: rank 0 speaks for all
        ("1", False, True, "d2m: error: [rank 1] bad\n", 2),  # this rank's own: tagged, and torchrun stops the rest
    ],
)
def test_user_errors_are_reported_once_per_job(tmp_path, monkeypatch, capsys, rank, everywhere, initialised,
                                               printed, code):
    import torch.distributed as dist

    from d2m_dist.cli import report_user_error
    from d2m_dist.config import ConfigError

    status = tmp_path / "status"
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("D2M_STATUS_FILE", str(status))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setattr(dist, "is_initialized", lambda: initialised)
    assert report_user_error(ConfigError("bad", everywhere=everywhere)) == code
    assert capsys.readouterr().err == printed
    # the launcher exits with the status file's code: written by whoever reported
    assert (status.read_text() if status.exists() else None) == ("2\n" if printed else None)
    # without torchrun (one process, or srun tasks) the exit code itself is 2
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert report_user_error(ConfigError("bad", everywhere=everywhere)) == 2
