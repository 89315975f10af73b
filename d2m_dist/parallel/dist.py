"""Process-group setup: one call for gloo on CPU and NCCL on GPU, through DeepSpeed."""

from __future__ import annotations

import atexit
import glob
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Set

import torch
import torch.distributed as dist

from d2m_dist.config import ConfigError

log = logging.getLogger("d2m_dist.parallel")

# DeepSpeed's CPU all-reduce buffers (ops/csrc/cpu/comm/shm.cpp, SHM_BUFFER_NAME and shm_initialize):
# /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, created by each rank
# with shm_open and never unlinked by DeepSpeed.
SHM_DIR = Path("/dev/shm")
SHM_NAME = "deepspeed_allreduce_buffer"
# a buffer written (all-reduces write through the mapping, which moves its mtime on tmpfs) this
# recently may belong to a live job we cannot see (another PID namespace sharing /dev/shm), or be
# inside the shm_open call that creates it: never removed
SHM_MIN_AGE_S = 10.0


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str = "auto") -> torch.device:
    """auto | cpu | cuda; a CUDA device is this process's LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join (or create) the default process group; single process works without a launcher.

    A group that already exists (the caller made it) is adopted: DeepSpeed's communication
    layer wraps it, so its expert-parallel groups and engines work on it.
    """
    import deepspeed  # lazy: seconds to import; pick_device and DistInfo callers never need it

    device = pick_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    created = not dist.is_initialized()
    if created:
        if "RANK" not in os.environ:  # plain `python`: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        # DeepSpeed's CPU accelerator needs LOCAL_SIZE for its shared-memory op
        os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        if device.type == "cpu":
            # the group DeepSpeed would make (gloo, its timeout; it adopts an existing one), made here so
            # that the clean-up below comes between it and DeepSpeed's shm op creating our buffers
            from deepspeed.constants import default_pg_timeout  # lazy: with deepspeed above

            dist.init_process_group(backend, timeout=default_pg_timeout)
    if device.type == "cpu":
        _remove_stale_shm_buffers_once_per_node()
    deepspeed.init_distributed(dist_backend=backend)
    if created and device.type == "cpu":
        atexit.register(remove_shm_buffers, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), device)


def _remove_stale_shm_buffers_once_per_node() -> None:
    """Local rank 0 removes stale buffers while the other ranks wait at a barrier.

    Ordered before any rank of this job runs DeepSpeed's shm op: a rank that opened a stale
    file of the same name (a reused MASTER_PORT) just before it was unlinked would map an
    orphan its peers never see, and the job's first all-reduce would hang. Other jobs'
    buffers are safe without ordering: their creators map them from creation on.
    """
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        removed = remove_stale_shm_buffers()
        if removed:
            mb = sum(size for _, size in removed) / 2**20
            log.warning("removed %d stale DeepSpeed buffers (%.0f MB) of killed runs from %s", len(removed), mb, SHM_DIR)
    if dist.get_world_size() > 1:
        dist.barrier()


def remove_shm_buffers(addr: str, port: str) -> None:
    """Unlink this run's DeepSpeed CPU all-reduce buffers from /dev/shm.

    DeepSpeed's shared-memory op (CPU accelerator) creates one ``/dev/shm`` file per
    rank and never removes it; each run left tens of MB in RAM-backed shm, which
    filled a 24 GB test machine over a day of runs. Every rank mapped every buffer
    during init, so removing the names at exit frees the memory once all ranks end.
    """
    pattern = f"{SHM_DIR}/{SHM_NAME}_{os.getuid()}_{addr}_{port}_*"
    for f in glob.glob(pattern):
        try:
            os.unlink(f)
        except OSError:
            pass  # another rank of the same run removed it first


def stale_shm_buffers(min_age_s: float = SHM_MIN_AGE_S, shm_dir: Path = SHM_DIR) -> List[Path]:
    """This user's DeepSpeed all-reduce buffers that no live process maps or holds open.

    They are what a killed run (SIGKILL: no at-exit clean-up) leaves behind. Only regular
    files owned by our uid are considered, and none written in the last ``min_age_s``.
    """
    uid, now = os.getuid(), time.time()
    candidates = []
    for path in shm_dir.glob(f"{SHM_NAME}_{uid}_*"):
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue  # removed meanwhile (its run ended, or another node-local clean-up)
        if stat.S_ISREG(st.st_mode) and st.st_uid == uid and now - st.st_mtime >= min_age_s:
            candidates.append(path)
    if not candidates:
        return []
    used = paths_in_use(str(p) for p in candidates)
    return [p for p in candidates if str(p) not in used]


def remove_stale_shm_buffers(min_age_s: float = SHM_MIN_AGE_S, shm_dir: Path = SHM_DIR) -> List[tuple]:
    """Unlink :func:`stale_shm_buffers`; returns (path, bytes) of each file removed."""
    removed = []
    for path in stale_shm_buffers(min_age_s, shm_dir):
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append((path, size))
    return removed


def paths_in_use(paths: Iterable[str]) -> Set[str]:
    """Those of ``paths`` that some process we can inspect maps (``/proc/*/maps``) or holds open (``/proc/*/fd``).

    Processes of other users are unreadable and skipped: they cannot open our 0600 buffers.
    """
    wanted, found = set(paths), set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:  # OSError: the process ended, or is not ours
            with open(f"/proc/{entry.name}/maps") as fh:
                for line in fh:
                    fields = line.rstrip("\n").split(None, 5)  # address perms offset dev inode [path]
                    if len(fields) == 6 and fields[5] in wanted:
                        found.add(fields[5])
            fds = list(os.scandir(f"/proc/{entry.name}/fd"))
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd.path)
            except OSError:
                continue  # closed meanwhile
            if target in wanted:
                found.add(target)
        if found == wanted:
            break
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_true(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank."""
    t = torch.tensor([1 if flag else 0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def any_true(flag: bool, device: torch.device) -> bool:
    return not all_true(not flag, device)
