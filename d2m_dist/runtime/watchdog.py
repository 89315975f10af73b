"""Workers die with their launcher.

torchrun starts each worker in a session of its own (``start_new_session=True`` in
torch.distributed.elastic's SubprocessHandler), so killing the launcher's process group
(Ctrl-C's group, ``kill -9 -PGID``, an OOM kill of torchrun) does not reach the workers: they
trained on, and wrote their run folder, with nobody to report to. Here a daemon thread
checks ``os.getppid()`` every ``POLL_S``; once the process is reparented (its launcher is
gone) it kills itself, and its process group when it leads one, as a torchrun worker
does: its DataLoader workers and other children go with it. docs/DECISIONS.md has why a
poll rather than ``PR_SET_PDEATHSIG``.

Only under a launcher whose death ends the job: torchrun (``TORCHELASTIC_RUN_ID`` set) or
Slurm's step daemon (the parent is ``slurmstepd``). A plain ``d2m train`` is never watched:
a ``nohup`` run outlives its shell on purpose.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

POLL_S = 1.0

_watchdog: Optional["ParentWatchdog"] = None


def launched_by() -> Optional[str]:
    """The launcher whose death must end this process: ``torchrun``, ``slurmstepd``, or None."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return "torchrun"
    try:
        parent = Path(f"/proc/{os.getppid()}/comm").read_text().strip()
    except OSError:
        return None
    return "slurmstepd" if parent == "slurmstepd" else None


def exit_now(parent: int) -> None:
    """The launcher ``parent`` is gone: SIGKILL this process (and its group, when it leads it)."""
    print(f"d2m: launcher process {parent} is gone: exiting", file=sys.stderr, flush=True)
    me = os.getpid()
    if os.getpgrp() == me:  # a torchrun worker leads its own group: exactly it and its children
        os.killpg(me, signal.SIGKILL)
    os.kill(me, signal.SIGKILL)


class ParentWatchdog:
    """Calls ``on_orphan(parent)`` once, from a daemon thread, when ``getppid()`` stops being ``parent``."""

    def __init__(self, interval_s: float = POLL_S, on_orphan: Callable[[int], None] = exit_now,
                 getppid: Callable[[], int] = os.getppid):
        self.interval_s = interval_s
        self.on_orphan = on_orphan
        self.getppid = getppid
        self.parent = getppid()
        self._stop = threading.Event()

    def start(self) -> "ParentWatchdog":
        threading.Thread(target=self._run, name="d2m-parent-watchdog", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        # a reparented process gets an existing process as parent (init or a subreaper): never the
        # old pid again, so a change is proof of the launcher's death
        while not self._stop.wait(self.interval_s):
            if self.getppid() != self.parent:
                self.on_orphan(self.parent)
                return


def start_parent_watchdog() -> Optional[ParentWatchdog]:
    """Watch the launcher, once per process, when :func:`launched_by` names one; None otherwise."""
    global _watchdog
    if _watchdog is None and launched_by() is not None:
        _watchdog = ParentWatchdog().start()
    return _watchdog
