"""The worker pool of `tesla prepare` (tesla.data.pool) as processes: its workers are not
forked from the preparing process, a worker that dies stops the run with an error instead of
a wait without end, and the block of result slots is freed at the end, or not used where the
shared-memory folder lacks the room. (What the pool returns: tests/test_prepare.py.)

The tasks are module-level functions of this file: the workers import them by name.
Time budget: about 10 s."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import pytest

import tesla.data.pool as pool_module
from tesla.data.pool import RESULT_SLOT_BYTES, WorkerPool
from tesla.errors import TeslaError

#: held by a thread of the test while the workers start
HELD = threading.Lock()


def _take_the_held_lock() -> bool:
    got = HELD.acquire(timeout=20)
    if got:
        HELD.release()
    return got


def _pixels(k: int) -> np.ndarray:
    return np.full((32, 64, 64, 3), k, dtype=np.uint8)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _parent() -> int:
    return os.getppid()


def test_a_lock_held_by_another_thread_does_not_reach_the_workers():
    """Forking copies a lock held by another thread of the parent, locked, into the child,
    where nothing will ever release it (what a library's thread can do to a forked worker).
    The workers start clean instead."""
    held, release = threading.Event(), threading.Event()

    def hold():
        with HELD:
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    pool = WorkerPool(2)
    try:
        futures = [pool.start().submit(_take_the_held_lock) for _ in range(2)]
        assert [f.result(timeout=60) for f in futures] == [True, True]
        assert pool.start().submit(_parent).result(timeout=60) != os.getpid()  # not a child of this process
    finally:
        release.set()
        holder.join()
        pool.close(ok=True)


@pytest.mark.timeout(120)
def test_a_worker_that_dies_stops_the_run_with_an_error():
    pool = WorkerPool(2)
    try:
        with pytest.raises(TeslaError, match=r"a worker process of the pool ended without finishing its task .*fewer --workers"):
            list(pool.ordered_map(_die, [()] * 4))
    finally:
        pool.close(ok=False)


def test_the_result_slots_are_freed_at_the_end():
    pool = WorkerPool(2)
    got = [int(a[0, 0, 0, 0]) for _, a in pool.ordered_map(_pixels, [(k,) for k in range(8)])]
    assert got == list(range(8))
    name = pool._slots.name
    SharedMemory(name=name).close()  # there while the pool is open
    pool.close(ok=True)
    with pytest.raises(FileNotFoundError):
        SharedMemory(name=name)


def test_without_room_for_the_slots_the_pixels_come_through_pipes(tmp_path, monkeypatch, capsys):
    """A container's small /dev/shm (Docker gives 64 MiB): a note on stderr, no block of
    slots, the same results."""
    monkeypatch.setattr(pool_module, "SHARED_MEMORY_FOLDER", str(tmp_path))
    monkeypatch.setattr(pool_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(64 << 20, 63 << 20, 1 << 20))
    pool = WorkerPool(2)
    try:
        got = [int(a[0, 0, 0, 0]) for _, a in pool.ordered_map(_pixels, [(k,) for k in range(8)])]
        assert got == list(range(8)) and pool._slots is None
    finally:
        pool.close(ok=True)
    err = capsys.readouterr().err
    assert f"{tmp_path} has 1 MiB free, less than the {pool.window * RESULT_SLOT_BYTES >> 20} MiB of result slots" in err
    assert "--shm-size" in err and "--workers" in err
