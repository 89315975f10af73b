"""The stage trainer end to end, through launchers/local.sh (torchrun, gloo, DeepSpeed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import d2m_dist.digits  # noqa: F401  (in-process workers train on the digits preset: it must be registered there too)
from d2m_dist.cli import main
from d2m_dist.models.portable import read_state_dict
from tests.distill.launch import changed_outside, launch, stage_config, summary

pytestmark = pytest.mark.multiproc


def test_two_ranks_ep2_equal_one_rank(tmp_path, digits_teacher, digits_student):
    common = ["steps=5", "optim.lr=1e-3", "optim.grad_clip=0.5", "parallel.ep_size={ep}", "data.batch_size={bs}"]
    runs = {}
    for nproc, ep, bs in ((1, 1, 8), (2, 2, 4)):  # same global batch of 8
        d = tmp_path / f"n{nproc}"
        d.mkdir()
        cfg = stage_config(d, digits_teacher, digits_student)
        p = launch(cfg, nproc, *[c.format(ep=ep, bs=bs) for c in common])
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        runs[nproc] = (summary(d / "run"), read_state_dict(d / "run" / "stage2" / "export"))
    (s1, w1), (s2, w2) = runs[1], runs[2]
    for term in ("loss", "output", "feature", "balance"):
        assert len(s1["history"][term]) == 5
        torch.testing.assert_close(torch.tensor(s2["history"][term]), torch.tensor(s1["history"][term]),
                                   rtol=1e-5, atol=1e-6, msg=term)
    experts = [k for k in w1 if ".experts." in k or k.endswith("router.weight")]
    assert experts
    # Adam turns float-rounding-sized gradient differences of near-zero gradients into
    # per-element differences of a few 1e-6 (updates are lr=1e-3 sized): compare at 1e-5
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5, msg=k)
    # what a rank holds: ep_size 2 halves the expert weights exactly; ZeRO-2 halves the optimizer's
    # fp32 partitions and moments of the routers (2 data-parallel ranks) and experts (2 owners) alike,
    # up to its flat buffers' alignment padding
    b1, b2 = s1["state_bytes_rank0"], s2["state_bytes_rank0"]
    assert b2["expert_weights"] * 2 == b1["expert_weights"] > 0
    assert abs(b2["optimizer"] * 2 / b1["optimizer"] - 1) < 0.01, (b1, b2)
    # the step-time split, logged every step (log.every=1): communication apart from compute
    split = ("time/data", "time/teacher_forward", "time/student_forward_backward", "time/optimizer",
             "time/communication")
    records = [json.loads(line) for line in (tmp_path / "n2" / "run" / "stage2" / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "time/data" in r]
    assert [r["step"] for r in timed] == [1, 2, 3, 4, 5]
    for r in timed:
        assert all(r[k] >= 0 for k in split), r
        assert r["time/communication"] > 0  # the token all_to_all and ZeRO's reductions
        assert 0 < r["time/communication_moe"] <= r["time/communication"]  # of which the token exchange
    # the routed experts did train, and nothing else moved (stage 2: routed experts and routers)
    init = read_state_dict(digits_student)
    assert any(not torch.equal(w1[k], init[k]) for k in experts)
    for w in (w1, w2):
        assert changed_outside(init, w, lambda k: ".experts." in k or k.endswith("router.weight")) == []


@pytest.mark.parametrize("source", ["shards"])
def test_sigterm_then_resume_equals_uninterrupted(tmp_path, digits_teacher, digits_student, digits_latent_shards,
                                                  source):
    """Stage 2 (ZeRO-2, DeepSpeed writes its client state from rank 0 only): every rank's data position
    is its own, so both ranks continue exactly where they stopped. On the streamed shards, whose position
    is state; the digits source's batches are addressed by step (its resumes, same layout or another, are
    tests/distill/test_resume.py's and the Slurm requeue test's), so a second run here bought nothing."""
    # with an EMA: its per-rank shards are part of the checkpoint, and the export is the average
    steps = ["steps=24", "parallel.ep_size=2", "data.batch_size=4", "ckpt.every=5", "ema.enabled=true",
             "ema.decay=0.9"]
    if source == "shards":
        steps += ["data.source=shards", f"data.urls={digits_latent_shards}", "data.num_workers=1"]
    full = tmp_path / "full"
    full.mkdir()
    p = launch(stage_config(full, digits_teacher, digits_student), 2, *steps)
    assert p.returncode == 0, p.stdout[-3000:]

    part = tmp_path / "part"
    part.mkdir()
    cfg = stage_config(part, digits_teacher, digits_student)
    proc = launch(cfg, 2, *steps, wait=False, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "step 8/24" in line:
            os.killpg(proc.pid, signal.SIGTERM)  # as Slurm does: the whole job step
            break
    out = "".join(seen) + proc.stdout.read()
    assert proc.wait(timeout=300) == 3, out[-3000:]  # stopped early, resumable
    assert "stopped by signal" in out, out[-3000:]
    latest = (part / "run" / "stage2" / "checkpoints" / "latest").read_text().strip()
    assert latest != "step_24"
    p = launch(cfg, 2, *steps)  # the same command again resumes
    assert p.returncode == 0, p.stdout[-3000:]
    assert "resumed from" in p.stdout + p.stderr
    assert "exact resume is impossible" not in p.stdout + p.stderr

    a, b = summary(full / "run"), summary(part / "run")
    assert a["history"] == b["history"]  # identical loss sequence, bitwise
    wa, wb = read_state_dict(full / "run" / "stage2" / "export"), read_state_dict(part / "run" / "stage2" / "export")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((part / "run" / "stage2" / "export" / "d2m_config.json").read_text())["extra"]["weights"] == "ema 0.9"
    # the resumed run logged into the run it started
    assert b["wandb_run_id"] == (part / "run" / "stage2" / "wandb_run_id").read_text().strip()


def test_stage1_zero3_two_ranks_equal_one_rank_with_ema_and_bf16(tmp_path, digits_teacher, digits_student):
    """Stage 1 runs its student under ZeRO-3: the EMA is averaged per partition and gathered at export."""
    common = ["steps=4", "optim.lr=1e-3", "ema.enabled=true", "ema.decay=0.5"]
    runs = {}
    for name, nproc, bs, extra in (("n1", 1, 8, []), ("n2", 2, 4, []), ("bf16", 2, 4, ["precision=bf16"])):
        d = tmp_path / name
        d.mkdir()
        p = launch(stage_config(d, digits_teacher, digits_student, stage=1), nproc, *common,
                   f"data.batch_size={bs}", *extra)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        runs[name] = (summary(d / "run", 1), read_state_dict(d / "run" / "stage1" / "export"))
    (s1, w1), (s2, w2), (sb, wb) = runs["n1"], runs["n2"], runs["bf16"]
    torch.testing.assert_close(torch.tensor(s2["history"]["loss"]), torch.tensor(s1["history"]["loss"]),
                               rtol=1e-5, atol=1e-6)
    init = read_state_dict(digits_student)
    shared = [k for k in w1 if ".shared." in k]
    assert shared and any(not torch.equal(w1[k], init[k]) for k in shared)
    # stage 1 trains the shared experts and the MoE output biases, nothing else
    moe_bias = lambda k: k.endswith((".ff.bias", ".ff_context.bias", ".mlp.bias"))  # noqa: E731
    for w in (w1, w2):
        assert changed_outside(init, w, lambda k: ".shared." in k or moe_bias(k)) == []
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5, msg=k)
    # bf16 autocast: matrix products in bf16 (the losses move), weights and export stay fp32
    lb, l2 = torch.tensor(sb["history"]["loss"]), torch.tensor(s2["history"]["loss"])
    assert not torch.equal(lb, l2)
    torch.testing.assert_close(lb, l2, rtol=2e-2, atol=0)
    assert all(t.dtype == torch.float32 for t in wb.values())


def test_nan_losses_skip_then_stop_with_diagnostic_checkpoint(tmp_path, digits_teacher, digits_student):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan_teacher"
    shutil.copytree(digits_teacher, bad)
    f = bad / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd["proj_out.bias"][0] = float("nan")
    save_file(sd, str(f))
    cfg = stage_config(tmp_path, bad, digits_student, max_bad_steps=3)
    p = launch(cfg, 1, "steps=10")
    assert p.returncode == 4, p.stdout[-3000:]
    assert (p.stdout + p.stderr).count("non-finite gradients at step 0") == 3
    assert (tmp_path / "run" / "stage2" / "diagnostic" / "latest").is_file()


@pytest.mark.parametrize(
    "case, expect",
    [
        ("ep_divides_n", "does not divide the 4 experts"),
        ("world_divisible", "does not divide the world size 1"),
        ("missing_init", "not found (run the previous stage first)"),
        ("disagree", "disagree on num_layers"),
        ("unknown_key", "Key 'bogus' not in"),
        ("no_shards", "match no existing shard file"),
        ("negative_lr", "optim.lr must be > 0, got -0.001"),
        ("shards_for_another_model", "prompt_embeds.npy is [8, 16]: D = 16, the model takes 384"),
        ("other_teacher", "was converted from another teacher"),
        ("not_flux_weights", "the weights are not the FLUX transformer its config.json describes"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, digits_teacher, digits_student, capsys, case, expect):
    teacher = digits_teacher
    init = digits_student
    over = []
    if case == "ep_divides_n":
        over = ["parallel.ep_size=3"]
        os.environ["WORLD_SIZE"] = "3"
    elif case == "world_divisible":
        over = ["parallel.ep_size=2"]
    elif case == "missing_init":
        init = tmp_path / "nope"
    elif case == "disagree":
        from tests.tiny import save_tiny_teacher

        teacher = tmp_path / "other"
        save_tiny_teacher(teacher, num_single_layers=3)
    elif case == "unknown_key":
        over = ["optim.bogus=1"]
    elif case == "no_shards":
        over = ["data.source=shards", f"data.urls={tmp_path}/none-{{000000..000001}}.tar"]
    elif case == "shards_for_another_model":
        from tests.tiny import write_precomputed_shards

        urls = write_precomputed_shards(tmp_path / "shards", shards=1, latent=(1, 8, 8), text_tokens=8, dim=16)
        over = ["data.source=shards", f"data.urls={urls}"]
    elif case == "negative_lr":
        over = ["optim.lr=-1e-3"]
    elif case in ("other_teacher", "not_flux_weights"):
        teacher = tmp_path / "teacher"
        shutil.copytree(digits_teacher, teacher)
        weights = next((teacher / "transformer").glob("*.safetensors"))
        if case == "other_teacher":  # the same architecture, other values: a teacher the student never saw
            tensors = {k: v + 0.01 for k, v in load_file(str(weights)).items()}
        else:  # a FLUX config.json beside another model's weights
            tensors = {"encoder.layer.0.weight": torch.zeros(4, 4)}
        save_file(tensors, str(weights))
    try:
        rc = main(["train", "--config", str(stage_config(tmp_path, teacher, init)), *over])
    finally:
        os.environ.pop("WORLD_SIZE", None)
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("d2m: error:")]
    assert len(lines) == 1 and expect in lines[0], err
    assert not (tmp_path / "run").exists()


def test_launcher_prints_a_bad_config_once_and_exits_2(tmp_path, digits_teacher, digits_student):
    """Every rank finds the error; rank 0 alone reports it, and torchrun adds no traceback of its own."""
    p = launch(stage_config(tmp_path, digits_teacher, digits_student), 2, "optim.lr=-1e-3")
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-3000:]
    assert [line for line in out.splitlines() if "error" in line.lower()] == [
        "d2m: error: optim.lr must be > 0, got -0.001"], out[-3000:]
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-3000:]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- in-process runs


def _stage_worker(rank, world, overrides, poison=None, skip_draw=None):
    """One stage on this rank, in process. ``poison``: (draw, micro, rank) whose inputs turn NaN;
    ``skip_draw``: the batch source jumps over that draw (what a run that never met it would see)."""
    os.environ["LOCAL_SIZE"] = str(world)
    from d2m_dist.config import StageConfig, load_config
    from d2m_dist.distill.trainer import StageTrainer, export_student

    cfg = load_config(StageConfig, None, overrides)
    trainer = StageTrainer(cfg)
    get = trainer.batches.get

    def batches(draw, micro=0):
        if skip_draw is not None and draw >= skip_draw:
            draw += 1
        inputs, target = get(draw, micro)
        if poison == (draw, micro, rank):
            inputs.hidden_states = inputs.hidden_states * float("nan")
        return inputs, target

    trainer.batches.get = batches
    assert trainer.train() == 0
    export_student(trainer)
    if rank == 0:
        Path(cfg.run_dir, "history.json").write_text(json.dumps(trainer.summary()["history"]))
    # every attempt ran all its micro-steps: DeepSpeed's accumulation boundary never shifted
    assert trainer.engine.micro_steps == trainer.draws * cfg.optim.grad_accum
    assert trainer.skipped_steps == (1 if poison else 0)


def _stage_overrides(run_dir, teacher, init, *extra):
    return ["stage=2", f"run_dir={run_dir}", f"init={init}", f"teacher.path={teacher}", "log.wandb=false",
            "log.progress=false", "ckpt.every=0", *extra]


def test_skipped_step_leaves_no_trace_with_grad_accum(tmp_path, digits_teacher, digits_student):
    """A non-finite micro-step (rank 1 only, the second of two) skips the whole step on both ranks: no
    update, no Adam or scheduler step, no EMA update, nothing left in ZeRO's buffers. The retry draws
    new batches, so the run equals one whose batch source never held the bad draw."""
    from tests.distributed import run_ranks

    common = ["steps=4", "optim.grad_accum=2", "data.batch_size=2", "parallel.ep_size=2", "optim.lr=1e-3",
              "ema.enabled=true", "ema.decay=0.5"]
    skipped, clean = tmp_path / "skipped" / "run", tmp_path / "clean" / "run"
    run_ranks(_stage_worker, 2, _stage_overrides(skipped, digits_teacher, digits_student, *common), (2, 1, 1), None,
              timeout=300)
    run_ranks(_stage_worker, 2, _stage_overrides(clean, digits_teacher, digits_student, *common), None, 2,
              timeout=300)
    assert json.loads((skipped / "history.json").read_text()) == json.loads((clean / "history.json").read_text())
    a, b = read_state_dict(skipped / "stage2" / "export"), read_state_dict(clean / "stage2" / "export")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_grad_accum_2_at_batch_b_equals_grad_accum_1_at_batch_2b(tmp_path, digits_teacher, digits_student):
    """The same global batch per step, split in two micro-steps or not. Compared on the output loss: the
    block-feature weights and the Switch loss are statistics of each micro-batch (docs/DECISIONS.md)."""
    from tests.distributed import run_ranks

    common = ["steps=3", "optim.lr=1e-3", "loss.feature=0", "loss.balance=0"]
    runs = {}
    for name, extra in (("accum2", ["optim.grad_accum=2", "data.batch_size=4"]),
                        ("accum1", ["optim.grad_accum=1", "data.batch_size=8"])):
        run = tmp_path / name / "run"
        run_ranks(_stage_worker, 1, _stage_overrides(run, digits_teacher, digits_student, *common, *extra),
                  timeout=300)
        runs[name] = (json.loads((run / "history.json").read_text()), read_state_dict(run / "stage2" / "export"))
    (h2, w2), (h1, w1) = runs["accum2"], runs["accum1"]
    torch.testing.assert_close(torch.tensor(h2["output"]), torch.tensor(h1["output"]), rtol=1e-6, atol=1e-8)
    init = read_state_dict(digits_student)
    assert any(not torch.equal(w1[k], init[k]) for k in w1)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-6, msg=k)


def _bad_sample_shards(folder: Path) -> str:
    """4 shards of 12 good digits-shaped samples, and at the head of shards 0 and 2 three bad ones:
    prompt_embeds of another model's width, a NaN latent, an int64 pooled vector."""
    import io

    import numpy as np
    import webdataset as wds

    from tests.tiny import write_precomputed_shards

    pattern = write_precomputed_shards(folder, shards=4, per_shard=12, latent=(1, 8, 8), text_tokens=8, dim=384)
    rng = np.random.default_rng(7)

    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        return buf.getvalue()

    for s in (0, 2):
        path = folder / f"pre-{s:06d}.tar"
        good = list(wds.WebDataset(str(path), shardshuffle=False))
        with wds.TarWriter(str(path), encoder=False, mtime=0) as tar:
            for i, (field, bad) in enumerate((("prompt_embeds.npy", np.zeros((8, 100), np.float32)),
                                              ("latent.npy", np.full((1, 8, 8), np.nan, np.float32)),
                                              ("pooled.npy", np.arange(384, dtype=np.int64)))):
                sample = {"__key__": f"bad{s}{i}", "txt": b"bad", "latent.npy": npy(rng.standard_normal((1, 8, 8)).astype(np.float32)),
                          "prompt_embeds.npy": npy(rng.standard_normal((8, 384)).astype(np.float32)),
                          "pooled.npy": npy(rng.standard_normal(384).astype(np.float32))}
                sample[field] = npy(bad)
                tar.write(sample)
            for sample in good:
                tar.write({k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"})
    return pattern


def _counting_worker(rank, world, overrides):
    """A stage that may stop on bad data: its exit code, or its error line, per rank."""
    os.environ["LOCAL_SIZE"] = str(world)
    from d2m_dist.config import ConfigError, StageConfig, load_config
    from d2m_dist.distill.trainer import StageTrainer

    cfg = load_config(StageConfig, None, overrides)
    trainer = StageTrainer(cfg)
    try:
        outcome = {"code": trainer.train(), "summary_data": trainer.summary()["data"]}
    except ConfigError as exc:
        outcome = {"error": str(exc), "everywhere": exc.everywhere}
    Path(cfg.run_dir, f"outcome{rank}.json").write_text(json.dumps(outcome))


def test_bad_samples_are_counted_over_ranks_and_too_many_stop_every_rank(tmp_path, digits_teacher, digits_student):
    """Six bad samples among 48 good ones, over 2 ranks: each a counted skip under its reason, summed over
    the ranks into metrics.jsonl and summary.json; with a limit below their share both ranks stop with
    the same line."""
    from tests.distributed import run_ranks

    urls = _bad_sample_shards(tmp_path / "shards")
    # one epoch: 48 good samples = 6 steps x 2 ranks x 4
    common = ["steps=6", "data.batch_size=4", "parallel.ep_size=2", "data.source=shards", f"data.urls={urls}",
              "log.every=3"]
    run = tmp_path / "counted"
    run_ranks(_counting_worker, 2, _stage_overrides(run, digits_teacher, digits_student, *common), timeout=300)
    # 6 steps x 2 ranks x 4, less the NaN sample each rank found in one batch when decoding it (that batch
    # went out with 3); the shape and dtype of the other two are seen from the headers, before batching
    want = {"samples": 46, "skipped": 6, "skipped/bad_dtype": 2, "skipped/bad_shape": 2, "skipped/non_finite": 2}
    for rank in (0, 1):
        assert json.loads((run / f"outcome{rank}.json").read_text()) == {"code": 0, "summary_data": want}
    lines = [json.loads(line) for line in (run / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [3, 6]
    assert {k.removeprefix("data/"): v for k, v in lines[-1].items() if k.startswith("data/")} == want

    stopped = tmp_path / "stopped"
    run_ranks(_counting_worker, 2, _stage_overrides(stopped, digits_teacher, digits_student, *common,
                                                    "data.max_skipped_fraction=0.1", "data.skip_check_after=16",
                                                    "log.every=6"),
              timeout=300)
    # checked at step 6, when every bad sample was read (a NaN is found when its batch is decoded): 6 of 52
    outcomes = [json.loads((stopped / f"outcome{rank}.json").read_text()) for rank in (0, 1)]
    assert outcomes[0] == outcomes[1] and outcomes[0]["everywhere"], outcomes
    assert outcomes[0]["error"].startswith("data: 6 of 52 samples read so far were skipped as bad input "
                                           "(bad_dtype 2, bad_shape 2, non_finite 2), more than "
                                           "data.max_skipped_fraction=0.1"), outcomes[0]


# ----------------------------------------------------------------------------- crashes and concurrent starts


def test_a_second_start_on_a_held_run_dir_is_refused_in_one_line(tmp_path, digits_teacher, digits_student):
    """The lock is held (here by this test process, alive on this host): `d2m train` stops before any engine."""
    import subprocess
    import sys

    from d2m_dist.runtime.run_lock import RunLock

    cfg = stage_config(tmp_path, digits_teacher, digits_student)
    with RunLock(tmp_path / "run", "d2m train (stage 2)"):
        p = subprocess.run([sys.executable, "-m", "d2m_dist.cli", "train", "--config", str(cfg), "steps=2"],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [line for line in p.stderr.splitlines() if line.startswith("d2m: error:")]
    assert p.returncode == 2 and len(errors) == 1, p.stderr[-3000:]
    assert f"is in use by d2m train (stage 2) (pid {os.getpid()} on " in errors[0]
    assert not (tmp_path / "run" / "stage2").exists()


def test_sigkill_of_the_launcher_leaves_no_process_and_the_rerun_cleans_up_and_resumes(
        tmp_path, digits_teacher, digits_student, digits_latent_shards):
    """The launcher's process group SIGKILLed mid-run: torchrun's workers (sessions of their own, so the
    signal misses them) and their DataLoader workers exit by themselves. The same command again removes
    what a kill leaves (DeepSpeed's /dev/shm buffers, the run lock, cut saves' temporary folders),
    resumes from the checkpoint, and metrics.jsonl ends with each step once."""
    import glob
    import time

    import psutil

    from d2m_dist.parallel.dist import SHM_MIN_AGE_S

    run = tmp_path / "run"
    stage = run / "stage2"
    steps = ["steps=10", "parallel.ep_size=2", "data.batch_size=4", "ckpt.every=4", "data.source=shards",
             f"data.urls={digits_latent_shards}", "data.num_workers=1", f"run_dir={run}"]
    cfg = stage_config(tmp_path, digits_teacher, digits_student)
    ours = lambda: [p for p in psutil.process_iter(["cmdline"]) if f"run_dir={run}" in (p.info["cmdline"] or [])]  # noqa: E731

    def alive(p):
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    proc = launch(cfg, 2, *steps, wait=False, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "step 5/10" in line:
            break
    job = ours()  # local.sh, torchrun, the two workers (and their forked DataLoader workers)
    family = {p.pid: p for p in job}
    for p in job:
        family.update({c.pid: c for c in p.children(recursive=True)})
    # torchrun's workers lead sessions of their own: a signal to the launcher's group misses them
    workers = [p for p in job if "TORCHELASTIC_RUN_ID" in p.environ() and os.getsid(p.pid) == p.pid]
    assert len(workers) == 2 and os.getsid(proc.pid) == proc.pid, "".join(seen)[-3000:]
    assert sum(p.ppid() in {w.pid for w in workers} for p in family.values()) >= 2  # a DataLoader worker each
    env = workers[0].environ()
    buffers = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env['MASTER_ADDR']}_{env['MASTER_PORT']}_*")
    lock = (run / ".d2m-lock").read_bytes()
    assert len(buffers) == 2
    # The workers are frozen while their launcher dies and thawed after their watchdogs' next poll is
    # due: they act at once, so the run stops here (a step takes ~0.1 s, a poll comes every 1 s).
    for w in workers:
        os.killpg(w.pid, signal.SIGSTOP)
    os.killpg(proc.pid, signal.SIGKILL)
    killed_at = time.time()
    proc.wait(timeout=60)
    time.sleep(2)
    for w in workers:
        os.killpg(w.pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in family.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p.cmdline() for p in family.values() if alive(p)] and not ours()

    # The first worker whose watchdog fires dies by SIGKILL; a peer may see the broken connection first
    # and run its at-exit clean-up (buffers, lock). Put back what a kill of every rank leaves, as it was.
    for b in buffers:
        if not os.path.exists(b):
            Path(b).write_bytes(b"\0" * 4096)
            os.utime(b, (killed_at, killed_at))
    if not (run / ".d2m-lock").exists():
        (run / ".d2m-lock").write_bytes(lock)
    assert (stage / "checkpoints" / "latest").read_text().strip() == "step_4"
    records = lambda: [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert 5 in [r["step"] for r in records()]  # logged after the checkpoint: the rerun trains step 5 again
    (stage / "checkpoints" / ".tmp-step_8").mkdir()  # as a kill during a save leaves them
    (stage / "diagnostic" / ".tmp-step_3").mkdir(parents=True)
    # a buffer is stale once unwritten for SHM_MIN_AGE_S (all-reduces keep a live run's buffers younger)
    time.sleep(max(0.0, max(os.stat(b).st_mtime for b in buffers) + SHM_MIN_AGE_S + 1 - time.time()))

    p = launch(cfg, 2, *steps)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "resumed from" in out and "taking over the lock" in out and "has ended" in out
    assert not [b for b in buffers if os.path.exists(b)]
    assert not (stage / "diagnostic" / ".tmp-step_3").exists() and not (stage / "checkpoints" / ".tmp-step_8").exists()
    assert [r["step"] for r in records() if "loss/total" in r] == list(range(1, 11))
    assert not (run / ".d2m-lock").exists() and not ours()


def _dry_rank_worker(rank, world, overrides):
    """Rank 1's data runs dry at draw 2; both ranks must stop with the same line instead of rank 0
    waiting in a collective for a peer that died."""
    os.environ["LOCAL_SIZE"] = str(world)
    from d2m_dist.config import ConfigError, StageConfig, load_config
    from d2m_dist.data.errors import DataError
    from d2m_dist.distill.trainer import StageTrainer

    cfg = load_config(StageConfig, None, overrides)
    trainer = StageTrainer(cfg)
    get = trainer.batches.get

    def batches(draw, micro=0):
        if rank == 1 and draw == 2:
            raise DataError("data urls yield no batch at all for rank 1")
        return get(draw, micro)

    trainer.batches.get = batches
    try:
        outcome = {"code": trainer.train()}
    except ConfigError as exc:
        outcome = {"error": str(exc), "everywhere": exc.everywhere, "step": trainer.step}
    Path(cfg.run_dir, f"outcome{rank}.json").write_text(json.dumps(outcome))


def test_a_data_error_on_one_rank_stops_every_rank_with_its_line(tmp_path, digits_teacher, digits_student):
    from tests.distributed import run_ranks

    run = tmp_path / "run"
    run_ranks(_dry_rank_worker, 2, _stage_overrides(run, digits_teacher, digits_student, "steps=4",
                                                     "data.batch_size=2", "parallel.ep_size=2"), timeout=300)
    outcomes = [json.loads((run / f"outcome{rank}.json").read_text()) for rank in (0, 1)]
    assert outcomes[0] == outcomes[1] == {"error": "rank 1: data urls yield no batch at all for rank 1",
                                          "everywhere": True, "step": 2}, outcomes
