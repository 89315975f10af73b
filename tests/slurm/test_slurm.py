"""The sbatch scripts in slurm/ on a real local Slurm cluster (tools/slurm_local.sh: munge, slurmctld,
two slurmd nodes on this host; CPU only, gloo, one torchrun per node)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from d2m_dist.models.portable import read_state_dict
from tests.distill.launch import launch

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.multiproc]
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """The local cluster, started once (by this session or before it); stopped at the end if we started it."""
    d = os.environ.get("D2M_SLURM_DIR", str(REPO / ".cache" / "slurm"))
    script = REPO / "tools" / "slurm_local.sh"
    was_up = subprocess.run(["bash", str(script), "status"], capture_output=True).returncode == 0
    p = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        pytest.fail(f"tools/slurm_local.sh start failed:\n{p.stdout}\n{p.stderr}")
    env = {**os.environ, "SLURM_CONF": f"{d}/slurm.conf", "GPUS_PER_NODE": "0", "D2M_REPO": str(REPO),
           "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}"}
    yield env
    if not was_up:
        subprocess.run(["bash", str(script), "stop"], check=False, timeout=120)


def sbatch(env, cwd, *args) -> str:
    p = subprocess.run(["sbatch", "--parsable", *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def job(env, jid) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", jid], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait(env, jid, timeout=600, until=DONE) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        j = job(env, jid)
        if j.get("JobState") in until:
            return j
        time.sleep(2)
    pytest.fail(f"job {jid} not done after {timeout}s: {job(env, jid)}")


def log_of(cwd: Path, name: str, jid: str) -> str:
    f = cwd / f"slurm-{name}-{jid}.out"
    return f.read_text() if f.exists() else ""


def stage2_args(run: Path, teacher, student, steps):
    return [REPO / "configs" / "digits" / "stage2.yaml", f"run_dir={run}", f"init={student}",
            f"teacher.path={teacher}", "data.source=digits", f"steps={steps}", "data.batch_size=4",
            "ckpt.every=5", "log.every=1", "log.progress=false"]


@pytest.mark.parametrize("launch", ["torchrun", "srun"])
def test_two_node_stage2_completes(slurm, tmp_path, digits_teacher, digits_student, launch):
    # torchrun: one task per node, c10d rendezvous; srun: one task per process, ranks from SLURM_PROCID
    env = {**slurm, "D2M_LAUNCH": launch}
    jid = sbatch(env, tmp_path, "-N", 2, REPO / "slurm" / "stage2.sh",
                 *stage2_args(tmp_path / "run", digits_teacher, digits_student, 6))
    j = wait(slurm, jid)
    out = log_of(tmp_path, "d2m-stage2", jid)
    assert j["JobState"] == "COMPLETED", out[-3000:]
    assert "2 node(s)" in out and f"{launch} x 1 per node" in out and "rendezvous 127.0.0.1:" in out, out[-3000:]
    assert "world 2, ep_size 2" in out and "step 6/6" in out and "step ended with code 0" in out, out[-3000:]
    assert (tmp_path / "run" / "stage2" / "checkpoints" / "latest").read_text().strip() == "step_6"
    assert (tmp_path / "run" / "stage2" / "export" / "d2m_config.json").is_file()


def test_requeue_and_resubmit_on_other_node_counts_equal_a_run_without_slurm(slurm, tmp_path, digits_teacher,
                                                                             digits_student, request, monkeypatch):
    """A 2-node job preempted comes back on 1 node, then a 2-node job continues its run.

    ``parallel.ep_size=0`` picks the expert-parallel size from the world the job got. A constant learning
    rate makes a run's first steps independent of its ``steps``, so the reference without Slurm
    (launchers/local.sh: 2 ranks to the preempted step, 1 rank, 2 ranks) can stop where the job was preempted.
    """
    args = stage2_args(tmp_path / "run", digits_teacher, digits_student, 40)[1:] + ["parallel.ep_size=0",
                                                                                 "optim.decay=constant"]
    config = REPO / "configs" / "digits" / "stage2.yaml"
    a = sbatch(slurm, tmp_path, "-N", 2, REPO / "slurm" / "stage2.sh", config, *args)
    request.addfinalizer(lambda: subprocess.run(["scancel", a], env=slurm, check=False))  # a failed test's leftovers
    t0 = time.time()
    while "step 3/40" not in log_of(tmp_path, "d2m-stage2", a):
        assert time.time() - t0 < 600 and job(slurm, a)["JobState"] in ("PENDING", "RUNNING"), \
            log_of(tmp_path, "d2m-stage2", a)[-3000:]
        time.sleep(0.5)
    # a job that takes one node as soon as the preempted one frees both; the requeued job, pending
    # for want of nodes, is then changed to one node (as a user would) and starts on the other
    blocker = sbatch(slurm, tmp_path, "-N", 1, "--job-name=blocker", "--wrap", "sleep 900")
    subprocess.run(["scancel", "--signal=USR1", "--batch", a], env=slurm, check=True)
    try:
        wait(slurm, blocker, until={"RUNNING"})
        t0 = time.time()
        while not (job(slurm, a).get("Restarts") == "1" and job(slurm, a)["JobState"] == "PENDING"):
            assert time.time() - t0 < 300, (job(slurm, a), log_of(tmp_path, "d2m-stage2", a)[-3000:])
            time.sleep(1)
        # a bare NumNodes=1 only lowers the minimum; tasks and CPUs (one per node here) must follow
        subprocess.run(["scontrol", "update", f"JobId={a}", "NumNodes=1-1", "NumTasks=1", "NumCPUs=1"], env=slurm,
                       check=True)
        assert "node=1," in job(slurm, a)["TRES"], job(slurm, a)  # (NumNodes shows the last allocation's)
        wait(slurm, a, until={"RUNNING"} | DONE)
    finally:
        subprocess.run(["scancel", blocker], env=slurm, check=False)
    j = wait(slurm, a, timeout=900)
    out = log_of(tmp_path, "d2m-stage2", a)
    assert j["JobState"] == "COMPLETED", (j, out[-4000:])
    assert "restart 0: 2 node(s)" in out and "restart 1: 1 node(s)" in out and "requeueing job" in out, out[-4000:]
    assert "world_size 2, ep_size 2, ZeRO-2; continuing with world_size 1, ep_size 1" in out, out[-4000:]
    preempted = int(re.search(r"resumed from \S+ at step (\d+)", out).group(1))
    assert 3 <= preempted < 40
    # the other way round: a 2-node job continues the 1-node job's checkpoint
    b = sbatch(slurm, tmp_path, "-N", 2, REPO / "slurm" / "stage2.sh", config, *args, "steps=48")
    j = wait(slurm, b)
    out = log_of(tmp_path, "d2m-stage2", b)
    assert j["JobState"] == "COMPLETED", out[-4000:]
    assert "world_size 1, ep_size 1, ZeRO-2; continuing with world_size 2, ep_size 2" in out, out[-4000:]

    ref = tmp_path / "ref"
    ref.mkdir()
    # one thread per process, as the Slurm tasks run (slurm/common.sh): a 1-rank run on 2 threads sums
    # its matmuls in another order (4e-8 apart after 40 steps)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ref_args = stage2_args(ref / "run", digits_teacher, digits_student, 40)[1:] + ["parallel.ep_size=0",
                                                                                "optim.decay=constant"]
    for nproc, steps in ((2, preempted), (1, 40), (2, 48)):
        p = launch(config, nproc, *ref_args, f"steps={steps}", timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    wa, wb = read_state_dict(tmp_path / "run" / "stage2" / "export"), read_state_dict(ref / "run" / "stage2" / "export")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def pipeline(env, cwd, run, teacher, *extra):
    tiny = ["steps=2", "data.source=digits", "data.batch_size=4", "log.progress=false", "ckpt.every=0"]
    p = subprocess.run(["bash", str(REPO / "slurm" / "pipeline.sh"), str(REPO / "configs" / "digits"),
                        f"run_dir={run}", f"all:teacher.path={teacher}", "s0:calibration.num_batches=1",
                        "s0:calibration.batch_size=8", *[f"s{s}:{t}" for s in (1, 2, 3) for t in tiny], *extra],
                       env={**env, "D2M_SBATCH_ARGS": "-N 2"}, cwd=cwd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return dict(line.split() for line in p.stdout.splitlines())


def test_pipeline_runs_in_order(slurm, tmp_path, digits_teacher):
    ids = pipeline(slurm, tmp_path, tmp_path / "run", digits_teacher)
    assert list(ids) == ["stage0", "stage1", "stage2", "stage3", "export"]
    jobs = {n: wait(slurm, i, timeout=1200) for n, i in ids.items()}
    assert all(j["JobState"] == "COMPLETED" for j in jobs.values()), {n: j["JobState"] for n, j in jobs.items()}
    starts = [jobs[n]["StartTime"] for n in ids]
    ends = [jobs[n]["EndTime"] for n in ids]
    assert all(ends[i] <= starts[i + 1] for i in range(4)), (starts, ends)
    assert (tmp_path / "run" / "student" / "d2m_config.json").is_file()
    assert "loaded" in log_of(tmp_path, "d2m-export", ids["export"])


def test_failing_stage_stops_the_chain(slurm, tmp_path, digits_teacher):
    ids = pipeline(slurm, tmp_path, tmp_path / "run", digits_teacher, "s1:optim.bogus=1")
    assert wait(slurm, ids["stage0"])["JobState"] == "COMPLETED"
    j1 = wait(slurm, ids["stage1"])
    # a bad config on 2 nodes: rank 0 reports it once, the status file carries the 2 past torchrun
    assert j1["JobState"] == "FAILED" and j1["ExitCode"] == "2:0", j1
    out = log_of(tmp_path, "d2m-stage1", ids["stage1"])
    assert [line for line in out.splitlines() if "d2m: error:" in line] == [
        "d2m: error: invalid config: optim.bogus: Key 'bogus' not in 'OptimConfig'"], out[-3000:]
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-3000:]
    for n in ("stage2", "stage3", "export"):
        j = wait(slurm, ids[n], timeout=120)
        assert j["JobState"] == "CANCELLED" or j.get("Reason") == "DependencyNeverSatisfied", j
        assert j.get("RunTime", "00:00:00") == "00:00:00", j  # never ran
    assert not (tmp_path / "run" / "stage2").exists()
