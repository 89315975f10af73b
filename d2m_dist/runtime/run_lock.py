"""One writer per run folder: ``<run_dir>/.d2m-lock``.

The lock file says who writes the folder (host, pid and the pid's start time, Slurm job
and restart count, the command, since when) and is held for the life of ``d2m train``: a
second start on the same run_dir is refused in one line that names the holder. It is
created with O_CREAT|O_EXCL, so of two starters exactly one gets it, and removed at exit
(after errors too, through atexit). A SIGKILL leaves it behind; the next start takes a
lock over, with a warning, when its holder is known to be gone:

* same machine (host name, boot id and PID namespace) and the pid has ended, or runs
  another process now (its start time in ``/proc/<pid>/stat`` differs from the lock's);
* the same Slurm job at another restart count: a requeued job, whose previous attempt
  Slurm ended before starting this one;
* otherwise (another host, or a lock we cannot read) when its heartbeat, the file's mtime
  that the holder refreshes every ``HEARTBEAT_S``, is older than ``STALE_AFTER_S``.

A takeover happens under a second O_EXCL file, ``.d2m-lock.takeover``, and removes the lock
only if it still holds the bytes judged stale: two starters cannot both take over one
stale lock (each could otherwise delete the lock the other had just created).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from d2m_dist.config import ConfigError

log = logging.getLogger("d2m_dist.runtime")

LOCK_FILE = ".d2m-lock"
HEARTBEAT_S = 30.0
# ten missed heartbeats; also absorbs clock skew between the hosts of a shared filesystem
# (the reader compares the file's mtime with its own clock)
STALE_AFTER_S = 300.0
TAKEOVER_STALE_S = 30.0  # a takeover takes milliseconds: a takeover file this old was left by a killed start
_RACE_S = 10.0  # how long a start keeps retrying while other starts take a stale lock over


def process_start(pid: int) -> Optional[int]:
    """When ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22); None when it has ended.

    A zombie (ended, not yet reaped: a killed worker whose parent died too, in a container
    whose init does not reap) counts as ended.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ", which may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _pid_namespace() -> Optional[int]:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _boot_id() -> Optional[str]:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class Holder:
    """Who holds (or wants) a run folder's lock."""

    command: str
    host: str
    pid: int
    pid_start: Optional[int]
    boot_id: Optional[str]
    pid_ns: Optional[int]
    slurm_job_id: Optional[str]
    slurm_restart: Optional[str]
    started: float
    token: str  # makes each lock's bytes unique: a takeover recognises the very file it judged stale

    @classmethod
    def this_process(cls, command: str) -> "Holder":
        job = os.environ.get("SLURM_JOB_ID")
        restart = os.environ.get("SLURM_RESTART_COUNT", "0") if job else None
        return cls(command, socket.gethostname(), os.getpid(), process_start(os.getpid()), _boot_id(),
                   _pid_namespace(), job, restart, time.time(), uuid.uuid4().hex)

    @classmethod
    def parse(cls, data: bytes) -> Optional["Holder"]:
        """The holder a lock file names; None when it is unreadable (cut short, or not ours)."""
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self)) + "\n").encode()

    def same_machine(self, other: "Holder") -> bool:
        """Whether other's pid can be looked up here: same host, same boot, same PID namespace."""
        return (self.host, self.boot_id, self.pid_ns) == (other.host, other.boot_id, other.pid_ns)

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"{self.command} (pid {self.pid} on {self.host}{job}, since {since})"


def stale_reason(holder: Optional[Holder], me: Holder, age_s: float, stale_after_s: float = STALE_AFTER_S) -> Optional[str]:
    """Why ``me`` may take over the lock of ``holder`` (heartbeat ``age_s`` seconds ago); None when it may be live."""
    if holder is not None:
        if holder.slurm_job_id and holder.slurm_job_id == me.slurm_job_id and holder.slurm_restart != me.slurm_restart:
            return f"Slurm requeued job {me.slurm_job_id}: its attempt {holder.slurm_restart} has ended"
        if holder.host == me.host and holder.boot_id and me.boot_id and holder.boot_id != me.boot_id:
            return f"{holder.host} has rebooted since"
        if holder.same_machine(me):
            start = process_start(holder.pid)
            if start is None:
                return f"pid {holder.pid} has ended"
            if start != holder.pid_start:
                return f"pid {holder.pid} now runs another process"
            return None  # a live process on this machine: whatever its heartbeat says
    if age_s > stale_after_s:
        return f"no heartbeat for {age_s:.0f} s"
    return None


class RunLock:
    """``<run_dir>/.d2m-lock`` for this process: :meth:`acquire`, then :meth:`release` (also at exit)."""

    def __init__(self, run_dir: str | Path, command: str, *, stale_after_s: float = STALE_AFTER_S,
                 heartbeat_s: float = HEARTBEAT_S):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.takeover = self.run_dir / f"{LOCK_FILE}.takeover"
        self.me = Holder.this_process(command)
        self._data = self.me.to_bytes()
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.held = False
        self._stop = threading.Event()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "RunLock":
        """Create the lock, taking over a stale one; ConfigError (one line, naming the holder) when it is held."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + _RACE_S
        while not self._create(self.path):
            if self._take_over_if_stale():
                continue
            if time.monotonic() > deadline:
                raise ConfigError(f"run_dir {self.run_dir}: other starts kept taking over its lock {self.path}; "
                                  f"try again")
            time.sleep(0.05)  # another start is taking over right now: its lock will be judged next
        self.held = True
        atexit.register(self.release)
        threading.Thread(target=self._heartbeat, name="d2m-run-lock-heartbeat", daemon=True).start()
        return self

    def _create(self, path: Path) -> bool:
        """Create ``path`` holding this process's record, atomically (O_EXCL); False when it exists."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, self._data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _take_over_if_stale(self) -> bool:
        """Remove the lock if its holder is gone: True when the way is clear, False when another start is
        taking it over now; ConfigError when the holder may be live."""
        try:
            seen = self.path.read_bytes()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True  # released meanwhile
        holder = Holder.parse(seen)
        reason = stale_reason(holder, self.me, age, self.stale_after_s)
        if reason is None:
            who = holder.describe() if holder else "another start (its lock file is unreadable or being written)"
            raise ConfigError(f"run_dir {self.run_dir} is in use by {who}, heartbeat {age:.0f} s ago: stop it first, "
                              f"or delete {self.path} if it is gone")
        # Only the start holding the takeover file removes a stale lock: two starters removing one
        # lock could each delete the lock the other had just created, and both would go on.
        if not self._create(self.takeover):
            try:
                if time.time() - self.takeover.stat().st_mtime > TAKEOVER_STALE_S:
                    self.takeover.unlink()  # left by a start killed inside its (millisecond) takeover
            except FileNotFoundError:
                pass
            return False
        try:
            try:
                if self.path.read_bytes() != seen:
                    return True  # replaced meanwhile (released, then taken): judged again next
                self.path.unlink()
            except FileNotFoundError:
                return True
            log.warning("run_dir %s: taking over the lock of %s (%s)", self.run_dir,
                        holder.describe() if holder else "an unreadable lock file", reason)
            return True
        finally:
            self.takeover.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                ours = self.path.read_bytes() == self._data
                if ours:
                    os.utime(self.path)
            except FileNotFoundError:
                ours = False
            except OSError as exc:  # a shared filesystem's hiccup: the next beat may pass
                log.warning("run lock %s: heartbeat failed (%s)", self.path, exc)
                continue
            if not ours:
                # only a holder silent for STALE_AFTER_S is taken over: this process was stopped that long
                log.error("run lock %s is no longer ours: another job may now write %s", self.path, self.run_dir)
                return

    def release(self) -> None:
        """Remove the lock if it is still ours. Idempotent."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        atexit.unregister(self.release)
        try:
            if self.path.read_bytes() == self._data:
                self.path.unlink()
        except FileNotFoundError:
            pass  # taken over (the heartbeat said so)
        except OSError as exc:  # the filesystem went away: the next start judges the lock by its holder
            log.warning("run lock %s: not removed (%s)", self.path, exc)


def take_run_lock(run_dir: str | Path, command: str) -> Optional[RunLock]:
    """Global rank 0 takes ``run_dir``'s lock (None on other ranks). Collective under a process group.

    A refusal raises the same one-line ConfigError on every rank (``everywhere``: the CLI
    reports it once): the outcome travels with its text in one broadcast from rank 0.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    lock, error = None, None
    if rank == 0:
        try:
            lock = RunLock(run_dir, command).acquire()
        except ConfigError as exc:
            error = str(exc)
        except OSError as exc:  # an unwritable or vanished run_dir: one line too, not a hang of the other ranks
            error = f"run_dir {run_dir}: cannot take its lock ({exc.strerror or exc}: {exc.filename})"
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ConfigError(error, everywhere=True)
    return lock
