"""Elastic resume: a checkpoint continues on another world size, ep_size or ZeRO stage, with nothing lost.

The reference for each layout change is a 1-rank run that starts from the same
state consolidated into whole tensors (``d2m ckpt export --optimizer``, then
``ckpt.init_state=true``): the weights then come through the portable format and
the Adam moments from whole tensors, not from the checkpoint's per-rank
fragments. Parameters and Adam moments are compared after the continued steps,
read back from each run's final checkpoint, and so is the loss sequence.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from d2m_dist.ckpt.checkpoint import CheckpointReader
from d2m_dist.ckpt.export import export, inspect, resolve_checkpoint
from tests.distill.launch import launch, stage_config, summary

pytestmark = pytest.mark.multiproc


def _state(run: Path, stage: int) -> dict:
    """Every trained tensor's fp32 weights and Adam moments, whole, from the stage's latest checkpoint."""
    reader = CheckpointReader(resolve_checkpoint(run / f"stage{stage}"))
    out = {}
    for name, shape in reader.meta["shapes"].items():
        n = int(torch.Size(shape).numel())
        for kind in ("fp32", "exp_avg", "exp_avg_sq"):
            out[f"{kind}/{name}"] = reader.read(name, kind, 0, n)
    return out


def _run(tmp_path: Path, name: str, teacher, init, stage: int, nproc: int, *overrides: str, from_run: Path = None):
    """One launch in ``tmp_path/name``; ``from_run`` first copies another run's folder (its checkpoints) there."""
    d = tmp_path / name
    d.mkdir()
    if from_run is not None:
        shutil.copytree(from_run, d / "run")
    p = launch(stage_config(d, teacher, init, stage=stage), nproc, "optim.lr=1e-3", *overrides, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return d / "run", p.stdout + p.stderr


def _compare(a: Path, b: Path, stage: int, atol: float) -> None:
    la, lb = summary(a, stage)["history"]["loss"], summary(b, stage)["history"]["loss"]
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=0, atol=atol)
    sa, sb = _state(a, stage), _state(b, stage)
    assert sa.keys() == sb.keys() and sa
    for k in sa:
        # second moments are ~1e-8: an absolute 1e-6 would pass anything, so they are compared relatively
        tol = {"rtol": 1e-4, "atol": 1e-12} if k.startswith("exp_avg_sq/") else {"rtol": 0, "atol": atol}
        torch.testing.assert_close(sa[k], sb[k], msg=k, **tol)


def test_stage2_resumes_on_fewer_and_more_ranks_and_ep(tmp_path, digits_teacher, digits_student):
    """2 ranks ep 2 -> 1 rank ep 1 and -> 4 ranks ep 4; then 1 rank -> 2 ranks ep 2. Global batch 8 throughout."""
    a, _ = _run(tmp_path, "a", digits_teacher, digits_student, 2, 2, "steps=4", "parallel.ep_size=2",
                "data.batch_size=4")
    # the reference: the same state consolidated into whole tensors, continued on 1 rank
    consolidated = export(a / "stage2", tmp_path / "consolidated", optimizer=True)
    ref, _ = _run(tmp_path, "ref", digits_teacher, consolidated, 2, 1, "steps=7", "data.batch_size=8",
                  "ckpt.init_state=true")
    assert summary(ref, 2)["history"]["loss"][:4] == summary(a, 2)["history"]["loss"]  # the counters came along
    shrink, log1 = _run(tmp_path, "shrink", digits_teacher, digits_student, 2, 1, "steps=7", "data.batch_size=8",
                        from_run=a)
    assert "elastic resume" in log1 and "world_size 2, ep_size 2, ZeRO-2; continuing with world_size 1, ep_size 1" in log1
    _compare(shrink, ref, 2, atol=1e-6)
    grow, log4 = _run(tmp_path, "grow", digits_teacher, digits_student, 2, 4, "steps=7", "data.batch_size=2",
                      "parallel.ep_size=4", from_run=a)
    assert "continuing with world_size 4, ep_size 4" in log4
    _compare(grow, ref, 2, atol=1e-6)
    # 1 rank -> 2 ranks ep 2, against the same 1-rank state continued on 1 rank
    two, _ = _run(tmp_path, "two", digits_teacher, digits_student, 2, 2, "steps=9", "data.batch_size=4",
                  "parallel.ep_size=2", from_run=ref)
    one, _ = _run(tmp_path, "one", digits_teacher, digits_student, 2, 1, "steps=9", "data.batch_size=8",
                  from_run=ref)
    _compare(two, one, 2, atol=1e-6)


def test_stage1_zero3_resumes_on_one_rank(tmp_path, digits_teacher, digits_student):
    a, _ = _run(tmp_path, "a", digits_teacher, digits_student, 1, 2, "steps=3", "data.batch_size=4",
                "ema.enabled=true", "ema.decay=0.5")
    consolidated = export(a / "stage1", tmp_path / "consolidated", optimizer=True)
    ref, _ = _run(tmp_path, "ref", digits_teacher, consolidated, 1, 1, "steps=5", "data.batch_size=8",
                  "ckpt.init_state=true", "ema.enabled=true", "ema.decay=0.5")
    one, log = _run(tmp_path, "one", digits_teacher, digits_student, 1, 1, "steps=5", "data.batch_size=8",
                    "ema.enabled=true", "ema.decay=0.5", from_run=a)
    assert "elastic resume" in log
    _compare(one, ref, 1, atol=1e-6)
    # the EMA came along too: the exports (EMA by default) agree
    from d2m_dist.models.portable import read_state_dict

    wa, wb = read_state_dict(one / "stage1" / "export"), read_state_dict(ref / "stage1" / "export")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)


def test_inspect_and_export_match_the_live_export(tmp_path, digits_teacher, digits_student):
    """The offline export of the final checkpoint equals the export the trainer writes from its live weights."""
    run, _ = _run(tmp_path, "a", digits_teacher, digits_student, 2, 2, "steps=2", "parallel.ep_size=2",
                  "data.batch_size=4", "export_diffusers=true")
    info = inspect(run / "stage2")
    assert info["step"] == 2 and info["layout"] == {"world_size": 2, "ep_size": 2, "zero_stage": 2}
    assert info["trained_tensors"] == info["kinds"]["exp_avg"]["tensors"] > 0 and not info["has_ema"]
    assert info["bytes"] == sum(f.stat().st_size for f in Path(info["checkpoint"]).iterdir())
    from d2m_dist.models.portable import read_state_dict

    out = export(run / "stage2", tmp_path / "exported", max_shard_bytes=20_000)  # several shards
    assert (out / "model.safetensors.index.json").is_file()
    got, want = read_state_dict(out), read_state_dict(run / "stage2" / "export")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((out / "d2m_config.json").read_text())["site_specs"] == \
        json.loads((digits_student / "d2m_config.json").read_text())["site_specs"]

    # the diffusers twins: the stage's own (export_diffusers=true), and `d2m ckpt export --format diffusers`
    # from the checkpoint and from the portable export, all holding the live export's tensors
    from d2m_dist.cli import main
    from d2m_dist.models.diffusers_student import FluxMoETransformer2DModel

    assert main(["ckpt", "export", str(run / "stage2"), "--format", "diffusers", "--out", str(tmp_path / "d1")]) == 0
    assert main(["ckpt", "export", str(run / "stage2" / "export"), "--format", "diffusers",
                 "--out", str(tmp_path / "d2")]) == 0
    for folder in (run / "stage2" / "export-diffusers", tmp_path / "d1", tmp_path / "d2"):
        sd = FluxMoETransformer2DModel.from_pretrained(folder).state_dict()
        assert sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in want), folder
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


class _Planted:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_crafted_pickle_is_refused_and_never_runs(tmp_path, digits_teacher, digits_student):
    from d2m_dist.cli import main

    run, _ = _run(tmp_path, "a", digits_teacher, digits_student, 2, 1, "steps=1")
    ckpt = resolve_checkpoint(run / "stage2")
    evidence = tmp_path / "pwned"
    payload = pickle.dumps(_Planted(str(evidence)))
    # 1. a checkpoint file replaced by a pickle
    (ckpt / "rank_00000.safetensors").write_bytes(payload)
    cfg = stage_config(tmp_path / "a", digits_teacher, digits_student)
    rc = main(["train", "--config", str(cfg), "steps=3"])
    assert rc == 2 and not evidence.exists()
    # 2. a folder of DeepSpeed-style pickles where a checkpoint should be
    for f in list(ckpt.iterdir()):
        f.unlink()
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(payload)
    torch_file = ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch_file.write_bytes(payload)
    rc = main(["train", "--config", str(cfg), "steps=3"])
    assert rc == 2 and not evidence.exists()
    rc = main(["ckpt", "inspect", str(ckpt)])
    assert rc == 2 and not evidence.exists()
