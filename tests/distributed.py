"""Running a function on N gloo ranks from a test."""

from __future__ import annotations

import os
import socket
import time
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except Exception:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 600.0) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; re-raise the first failure.

    Ranks still running after ``timeout`` seconds (a collective that never matches) are
    killed and the call fails, so a hang fails its test instead of the whole suite.
    """
    from d2m_dist.parallel.dist import remove_shm_buffers

    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = mp.start_processes(_entry, args=(world, port, fn, args, errors), nprocs=world, join=False,
                               start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not procs.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                for p in procs.processes:
                    if p.is_alive():
                        p.kill()
                raise AssertionError(f"{world} ranks still running after {timeout:.0f} s (a hang?)")
    finally:
        remove_shm_buffers("127.0.0.1", str(port))  # workers that used DeepSpeed's CPU shm op
    if not errors.empty():
        raise AssertionError(errors.get())
