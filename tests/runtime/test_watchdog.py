"""A process whose launcher dies exits: the watchdog's rule, and one real orphan."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil

from d2m_dist.runtime.watchdog import ParentWatchdog, launched_by


def test_the_orphan_action_runs_once_when_the_parent_pid_changes():
    ppids = iter([100, 100, 100, 1])  # the first read is the parent at start
    called, done = [], threading.Event()
    watchdog = ParentWatchdog(0.01, on_orphan=lambda parent: (called.append(parent), done.set()),
                              getppid=lambda: next(ppids, 1)).start()
    assert done.wait(10)
    time.sleep(0.05)
    assert called == [100]
    watchdog.stop()


def test_no_action_while_the_parent_lives_or_after_stop():
    called = []
    watchdog = ParentWatchdog(0.01, on_orphan=called.append, getppid=lambda: 100).start()
    time.sleep(0.1)
    watchdog.stop()
    assert called == []


def test_only_a_launcher_whose_death_ends_the_job_is_watched(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert launched_by() is None  # pytest's parent is a shell or a runner, not slurmstepd
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert launched_by() == "torchrun"


def test_an_orphaned_process_exits_within_seconds():
    """bash starts a python that watches it; bash is SIGKILLed; the python is gone soon after."""
    child = ("from d2m_dist.runtime.watchdog import ParentWatchdog; import time; "
             "ParentWatchdog(0.1).start(); print('ready', flush=True); time.sleep(120)")
    shell = subprocess.Popen(["bash", "-c", f'{sys.executable} -c "{child}" & echo $!; wait'], stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    pid = int(shell.stdout.readline())
    assert shell.stdout.readline().strip() == "ready"
    os.kill(shell.pid, signal.SIGKILL)  # the shell only: its child is orphaned, not signalled
    shell.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the orphaned process still runs 15 s after its parent died")
