"""The worker pool of `tesla prepare` (tesla.data.pool) as processes: its workers are not
forked from the preparing process, a worker that dies stops the run with an error instead of
a wait without end, the workers end with a preparation killed alone, and the block of result
slots is a deleted file (nothing outlives the processes), in the temporary folder where
/dev/shm lacks the room, through pipes where neither has it, whose views stay valid after the
pool is closed. (What the pool returns: tests/test_prepare.py.)

The tasks are module-level functions of this file: the workers import them by name.
Time budget: about 10 s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import process_running
from tesla.data.pool import RESULT_SLOT_BYTES, WorkerPool, start_method
from tesla.errors import TeslaError

#: held by a thread of the test while the workers start
HELD = threading.Lock()


def _take_the_held_lock() -> bool:
    got = HELD.acquire(timeout=20)
    if got:
        HELD.release()
    return got


def _watch_as_elsewhere(owner: int, method: str) -> None:
    """In a process ``owner`` started: wait for it to end as a worker does where Linux's pidfd
    is missing (``spawn``: Windows, macOS; ``forkserver``: Linux before 5.3)."""
    import tesla.data.pool as pool

    delattr(os, "pidfd_open")
    pool.start_method = lambda: method
    if method == "spawn":  # as on Windows, where os.kill(pid, 0) cannot ask: looking must not be what ends it
        pool.process_exists = lambda pid: time.sleep(3600)
    pool._exit_with(owner)


def _pixels(k: int) -> np.ndarray:
    return np.full((32, 64, 64, 3), k, dtype=np.uint8)


def _die_at(k: int, doomed: int) -> int:
    if k == doomed:
        os.kill(os.getpid(), signal.SIGKILL)
    return k


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
        if start_method() == "forkserver":  # (a spawned worker's parent is this process)
            assert pool.start().submit(_parent).result(timeout=60) != os.getpid()  # not forked from this process
    finally:
        release.set()
        holder.join()
        pool.close(ok=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("busy", [False, True], ids=["waiting", "busy"])
def test_a_worker_that_dies_stops_the_run_with_an_error(busy):
    """Whether the consumer is waiting for the dead worker's result or busy elsewhere when it
    dies (the next task is then handed to a broken pool)."""
    pool = WorkerPool(2)
    try:
        with pytest.raises(TeslaError, match=r"a worker process of the pool ended without finishing its task .*fewer --workers"):
            for _ in pool.ordered_map(_die_at, [(k, 1) for k in range(8)], window=2):
                if busy:
                    time.sleep(2)
    finally:
        pool.close(ok=False)


def _block_mappings(size: int) -> list[str]:
    """The paths of this process's mappings of ``size`` bytes made by multiprocessing's heap."""
    found = []
    for line in open("/proc/self/maps"):
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if end - start == size and len(fields) == 6 and f"/pym-{os.getpid()}-" in fields[5]:
            found.append(fields[5].strip())
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_block_is_a_deleted_file_and_its_views_outlive_the_pool():
    pool = WorkerPool(2)
    kept = [(k, a) for (k,), a in pool.ordered_map(_pixels, [(k,) for k in range(8)], borrow=True) if k == 7]
    mappings = _block_mappings(pool.window * RESULT_SLOT_BYTES)
    assert mappings and all(m.endswith("(deleted)") for m in mappings), mappings
    pool.close(ok=True)
    assert int(kept[0][1][0, 0, 0, 0]) == 7 and int(kept[0][1].max()) == 7  # read after close


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_without_room_in_dev_shm_the_block_goes_to_the_temporary_folder(monkeypatch):
    """A container's small /dev/shm (Docker gives 64 MiB): the same results, from a block in
    the temporary folder."""
    real = os.statvfs
    monkeypatch.setattr(os, "statvfs", lambda path: os.statvfs_result((4096, 4096, 1, 1, 0, 1, 1, 1, 0, 255))
                        if str(path) == "/dev/shm" else real(path))
    pool = WorkerPool(3)  # 18 MiB: a size of its own
    try:
        got = [int(a[0, 0, 0, 0]) for _, a in pool.ordered_map(_pixels, [(k,) for k in range(8)])]
        assert got == list(range(8))
        mappings = _block_mappings(pool.window * RESULT_SLOT_BYTES)
        assert mappings and not any(m.startswith("/dev/shm/") for m in mappings), mappings
    finally:
        pool.close(ok=True)


OWNER = """
import multiprocessing, os, sys, time
from tesla.data.pool import WorkerPool

if __name__ == "__main__":
    if sys.argv[1] == "pool":
        pool = WorkerPool(2)
        print(" ".join(str(pid) for pid in {pid for _, pid in pool.ordered_map(os.getpid, [()] * 6)}), flush=True)
    else:  # a watcher as elsewhere (test_pool._watch_as_elsewhere), in a spawned process
        import test_pool
        watcher = multiprocessing.get_context("spawn").Process(target=test_pool._watch_as_elsewhere, args=(os.getpid(), sys.argv[1]))
        watcher.start()
        print(watcher.pid, flush=True)
    time.sleep(120)
"""


def _descendants(pid: int) -> set[int]:
    """The processes below ``pid`` (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@pytest.mark.timeout(120)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["pool", "spawn", "forkserver"])
def test_the_workers_of_a_killed_preparation_end_with_it(tmp_path, how):
    """A worker waits for its next task on a queue it holds both ends of: killed alone (SIGKILL,
    as by `kill -9`), the process that made the pool would leave its workers, and the fork
    server they keep alive, waiting forever. ``pool``: the pool itself; ``spawn`` and
    ``forkserver``: the watch of a worker without Linux's pidfd (the parent's sentinel of a
    spawned worker; a look once a second)."""
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    owner = subprocess.Popen([sys.executable, str(script), how], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    below: set[int] = set()
    try:
        workers = {int(pid) for pid in owner.stdout.readline().split()}
        below = _descendants(owner.pid)
        assert workers and workers <= below and all(process_running(pid) for pid in below)
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 30
        while any(process_running(pid) for pid in below) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in below if process_running(pid)], "a process of the pool outlived the process that made it"
    finally:  # what a failure left: not the resource tracker, which removes the pool's semaphores once alone
        owner.kill()
        for pid in below:
            try:
                if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, FileNotFoundError):
                pass


def test_without_room_anywhere_the_pixels_come_through_pipes(monkeypatch, capsys):
    """Neither /dev/shm nor the temporary folder has the room (a block that does not fit a RAM
    file system would end the run with SIGBUS): a note, no block, the same results."""
    monkeypatch.setattr(os, "statvfs", lambda path: os.statvfs_result((4096, 4096, 1, 1, 0, 1, 1, 1, 0, 255)))
    pool = WorkerPool(2)
    try:
        got = [int(a[0, 0, 0, 0]) for _, a in pool.ordered_map(_pixels, [(k,) for k in range(8)])]
        assert got == list(range(8)) and pool._slots is None
    finally:
        pool.close(ok=True)
    err = capsys.readouterr().err
    assert f"{pool.window * RESULT_SLOT_BYTES >> 20} MiB of shared memory for the workers' results fit in none of" in err
    assert "(0 MiB free)" in err and "--shm-size" in err and "--workers" in err
