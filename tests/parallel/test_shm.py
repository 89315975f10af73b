"""Stale DeepSpeed all-reduce buffers in /dev/shm: found by name, owner, age and whether a process uses them."""

from __future__ import annotations

import mmap
import os
import time
import uuid

import pytest

from d2m_dist.parallel.dist import SHM_DIR, SHM_NAME, remove_stale_shm_buffers, stale_shm_buffers


@pytest.fixture
def fake_buffer():
    """A file named as DeepSpeed names a rank's buffer (uid, a made-up address and port, rank), 2 minutes old."""
    made = []

    def make(old=True):
        f = SHM_DIR / f"{SHM_NAME}_{os.getuid()}_test-{uuid.uuid4().hex[:8]}_1_0"
        f.write_bytes(b"\0" * 4096)
        if old:
            t = time.time() - 120
            os.utime(f, (t, t))
        made.append(f)
        return f

    yield make
    for f in made:
        f.unlink(missing_ok=True)


def test_an_unused_old_buffer_is_stale_and_removed(fake_buffer):
    f = fake_buffer()
    assert f in stale_shm_buffers()
    remove_stale_shm_buffers()
    assert not f.exists()


def test_a_mapped_an_open_or_a_young_buffer_is_kept(fake_buffer):
    mapped, opened, young = fake_buffer(), fake_buffer(), fake_buffer(old=False)
    with open(mapped, "r+b") as fh:
        view = mmap.mmap(fh.fileno(), 4096)  # mapped by this process, its descriptor closed
    fd = os.open(opened, os.O_RDONLY)  # held open, not mapped
    try:
        assert not {mapped, opened, young} & set(stale_shm_buffers())
        remove_stale_shm_buffers()
        assert mapped.exists() and opened.exists() and young.exists()
    finally:
        view.close()
        os.close(fd)
    # unused now: the old two go, the young one stays until it is old
    assert {mapped, opened} <= set(stale_shm_buffers()) and young not in stale_shm_buffers()
    assert young in stale_shm_buffers(min_age_s=0)
