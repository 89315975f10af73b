"""Process-group setup: one call for gloo on CPU and NCCL on GPU, through DeepSpeed."""

from __future__ import annotations

import atexit
import glob
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from d2m_dist.config import ConfigError


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
    if dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    else:
        if "RANK" not in os.environ:  # plain `python`: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        # DeepSpeed's CPU accelerator needs LOCAL_SIZE for its shared-memory op
        os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        deepspeed.init_distributed(dist_backend=backend)
        if device.type == "cpu":
            atexit.register(remove_shm_buffers, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), device)


def remove_shm_buffers(addr: str, port: str) -> None:
    """Unlink this run's DeepSpeed CPU all-reduce buffers from /dev/shm.

    DeepSpeed's shared-memory op (CPU accelerator) creates one ``/dev/shm`` file per
    rank and never removes it; each run left tens of MB in RAM-backed shm, which
    filled a 24 GB test machine over a day of runs. Every rank mapped every buffer
    during init, so removing the names at exit frees the memory once all ranks end.
    """
    pattern = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_*"
    for f in glob.glob(pattern):
        try:
            os.unlink(f)
        except OSError:
            pass  # another rank of the same run removed it first


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
