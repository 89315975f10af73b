"""The run folder's lock on its own: refusal, atomic creation, and each rule that declares a holder gone."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from d2m_dist.config import ConfigError
from d2m_dist.runtime.run_lock import LOCK_FILE, Holder, RunLock, process_start, stale_reason, take_run_lock


def _dead_pid() -> int:
    """A pid that existed and has ended (reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _plant(run_dir, holder: Holder, age_s: float = 0.0):
    run_dir.mkdir(parents=True, exist_ok=True)
    f = run_dir / LOCK_FILE
    f.write_bytes(holder.to_bytes())
    t = time.time() - age_s
    os.utime(f, (t, t))
    return f


def test_a_second_writer_is_refused_in_one_line_naming_the_holder_until_released(tmp_path):
    first = RunLock(tmp_path / "run", "d2m train (stage 2)").acquire()
    holder = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["command"] == "d2m train (stage 2)"
    with pytest.raises(ConfigError) as exc:
        RunLock(tmp_path / "run", "d2m train (stage 2)").acquire()
    msg = str(exc.value)
    assert "\n" not in msg and "is in use by d2m train (stage 2)" in msg and f"pid {os.getpid()} on " in msg
    first.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    with RunLock(tmp_path / "run", "d2m train (stage 2)"):
        assert (tmp_path / "run" / LOCK_FILE).exists()
    assert not (tmp_path / "run" / LOCK_FILE).exists()


@pytest.mark.parametrize("stale", [False, True])
def test_of_many_simultaneous_starters_exactly_one_wins(tmp_path, stale):
    """O_EXCL creation, and (stale) the takeover file: never two winners, whatever the interleaving."""
    for round_ in range(10):
        run_dir = tmp_path / f"r{round_}"
        if stale:
            _plant(run_dir, dataclasses.replace(Holder.this_process("old"), pid=_dead_pid()))
        locks = [RunLock(run_dir, f"starter {i}") for i in range(8)]
        gate, won, refused = threading.Barrier(len(locks)), [], []

        def start(lock):
            gate.wait()
            try:
                won.append(lock.acquire())
            except ConfigError:
                refused.append(lock)

        threads = [threading.Thread(target=start, args=(lock,)) for lock in locks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(refused) == 7
        assert (run_dir / LOCK_FILE).read_bytes() == won[0].me.to_bytes()
        assert not (run_dir / f"{LOCK_FILE}.takeover").exists()
        won[0].release()


def test_a_dead_holder_on_this_machine_is_taken_over_with_a_warning(tmp_path, caplog):
    me = Holder.this_process("d2m train (stage 2)")
    dead = dataclasses.replace(me, pid=_dead_pid(), token="old")
    _plant(tmp_path, dead)
    with caplog.at_level(logging.WARNING, logger="d2m_dist.runtime"):
        lock = RunLock(tmp_path, "d2m train (stage 2)").acquire()
    assert f"pid {dead.pid} has ended" in caplog.text and "taking over the lock" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.me.token
    lock.release()


def test_stale_rules():
    me = Holder.this_process("d2m train")
    alive = dataclasses.replace(me, token="other")  # this very process: live
    assert stale_reason(alive, me, age_s=1e6) is None  # a live pid here wins over an old heartbeat
    # the pid was reused: same number, another start time
    assert "now runs another process" in stale_reason(dataclasses.replace(alive, pid_start=me.pid_start - 1), me, 0)
    assert "has ended" in stale_reason(dataclasses.replace(alive, pid=_dead_pid()), me, 0)
    assert "rebooted" in stale_reason(dataclasses.replace(alive, boot_id="another-boot"), me, 0)
    # another host: only the heartbeat tells
    remote = dataclasses.replace(alive, host="elsewhere", pid=1)
    assert stale_reason(remote, me, age_s=60, stale_after_s=300) is None
    assert "no heartbeat for 301 s" == stale_reason(remote, me, age_s=301, stale_after_s=300)
    # another PID namespace on this host (a container): its pid cannot be looked up here
    assert stale_reason(dataclasses.replace(alive, pid_ns=(me.pid_ns or 0) + 1), me, age_s=60) is None
    # an unreadable lock (cut short): the heartbeat too
    assert stale_reason(None, me, age_s=60) is None and stale_reason(None, me, age_s=400) is not None
    # Slurm: a requeued job (its restart count moved on) takes over from its previous attempt, even
    # on another host with a fresh heartbeat; the same attempt (another step of it) does not
    job = dataclasses.replace(me, slurm_job_id="77", slurm_restart="1")
    prev = dataclasses.replace(remote, slurm_job_id="77", slurm_restart="0")
    assert "Slurm requeued job 77" in stale_reason(prev, job, age_s=5)
    assert stale_reason(dataclasses.replace(prev, slurm_restart="1"), job, age_s=5) is None
    assert stale_reason(dataclasses.replace(prev, slurm_job_id="76"), job, age_s=5) is None


def test_process_start_tells_a_reused_pid_and_a_zombie_apart():
    assert process_start(os.getpid()) == process_start(os.getpid()) is not None
    assert process_start(_dead_pid()) is None
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while process_start(child.pid) is not None and time.monotonic() < deadline:  # exited, not yet reaped
        time.sleep(0.05)
    assert os.path.exists(f"/proc/{child.pid}") and process_start(child.pid) is None
    child.wait()


def test_heartbeat_refreshes_the_lock_and_a_remote_holder_goes_stale_without_it(tmp_path):
    lock = RunLock(tmp_path / "a", "d2m train", heartbeat_s=0.05).acquire()
    f = tmp_path / "a" / LOCK_FILE
    os.utime(f, (0, 0))
    deadline = time.monotonic() + 10
    while f.stat().st_mtime == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert time.time() - f.stat().st_mtime < 5
    lock.release()
    # a holder on another host: refused while it beats, taken over once its heartbeat is older than the limit
    remote = dataclasses.replace(Holder.this_process("d2m train"), host="elsewhere", pid=1, token="remote")
    _plant(tmp_path / "b", remote, age_s=10)
    with pytest.raises(ConfigError, match=r"in use by d2m train \(pid 1 on elsewhere"):
        RunLock(tmp_path / "b", "d2m train", stale_after_s=60).acquire()
    _plant(tmp_path / "b", remote, age_s=120)
    RunLock(tmp_path / "b", "d2m train", stale_after_s=60).acquire().release()


def test_take_run_lock_without_a_process_group_refuses_with_an_error_every_rank_shares(tmp_path):
    lock = take_run_lock(tmp_path, "d2m train")
    with pytest.raises(ConfigError) as exc:
        take_run_lock(tmp_path, "d2m train")
    assert exc.value.everywhere
    lock.release()


def _two_ranks_refused(rank, world, run_dir):
    """Rank 0 finds the lock held (by the test process); both ranks must raise the same error."""
    try:
        take_run_lock(run_dir, "d2m train")
    except ConfigError as exc:
        assert exc.everywhere and "is in use by held by the test" in str(exc), str(exc)
    else:
        raise AssertionError(f"rank {rank}: no refusal")


@pytest.mark.multiproc
def test_every_rank_raises_the_refusal_of_rank_0(tmp_path):
    from tests.distributed import run_ranks

    with RunLock(tmp_path, "held by the test"):
        run_ranks(_two_ranks_refused, 2, tmp_path, timeout=120)
