"""A pool of worker processes whose large results come back through shared memory.

``tesla prepare`` decodes images in worker processes; what a worker returns is mostly
pixels. Pickling them through the pool's pipe costs the main process ~20-30 us per 64 x 64
image, copying them out of shared memory ~1 us, so :class:`WorkerPool` gives every task in
flight a *result slot* in one block of shared memory: a worker writes the large arrays of its
result into its slot (:func:`_call_into_slot`) and only the rest is pickled. An array that
does not fit its slot is pickled whole. One worker means plain calls in this process.

The workers are never forked from the preparing process: by the time it decodes, that process
runs threads of other libraries (Arrow's readers, jemalloc's background thread, OpenBLAS), and
a child forked while one of them holds a lock can wait for it forever. On Linux they are
started by Python's fork server (``forkserver``: a clean single-threaded process started for
the purpose), elsewhere as fresh interpreters (``spawn``), and are handed the block at their
start. The block is Python's own shared memory for such workers
(``multiprocessing.RawArray``): a file deleted as soon as it is made, in ``/dev/shm`` where it
has the room and in the temporary folder otherwise (where neither has it, results are pickled,
with a note), so the memory goes with the last process that maps it. A worker that dies
(killed, out of memory) stops the run with an error instead of leaving it waiting, and the
workers end with the process that made the pool.
"""

from __future__ import annotations

import ctypes
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import select
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from tesla.errors import TeslaError


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


#: bytes of one result slot of :class:`WorkerPool` (the decoded pixels of one task fit in it)
RESULT_SLOT_BYTES = 2 << 20
#: arrays smaller than this travel pickled with the rest of a result
_SLOT_MIN_BYTES = 4096


@dataclass(frozen=True)
class _InSlot:
    """Stands, in a pickled result, for an array the worker wrote into its result slot."""

    offset: int
    dtype: str
    shape: tuple[int, ...]


#: the result slots as a worker sees them (set by :func:`_init_worker`)
_worker_slots: ctypes.Array | None = None


def start_method() -> str:
    """How the pool starts its workers: Python's fork server on Linux; elsewhere fresh
    interpreters (``spawn``), whose parent is the pool's owner."""
    return "forkserver" if sys.platform.startswith("linux") else "spawn"


def _init_worker(slots: ctypes.Array | None, owner: int) -> None:
    """Worker initializer: keep the pool's block of result slots, handed over at the start, and
    end this worker with the process ``owner`` that made the pool."""
    global _worker_slots
    _worker_slots = slots
    threading.Thread(target=_exit_with, args=(owner,), daemon=True, name="tesla-pool-owner").start()


def _exit_with(owner: int) -> None:
    """Wait for process ``owner`` to end, then end this one. A worker waits for its next task on
    a queue whose other end it holds itself, so without this the workers (and the fork server
    they keep alive) of a preparation killed with SIGKILL would wait forever."""
    parent = multiprocessing.parent_process()
    try:
        handle = os.pidfd_open(owner)  # Linux: readable once the process ends
    except (AttributeError, OSError):
        handle = None
    if handle is not None:
        poller = select.poll()
        poller.register(handle, select.POLLIN)
        poller.poll()
    elif start_method() == "spawn" and parent is not None and parent.pid == owner:
        multiprocessing.connection.wait([parent.sentinel])  # the owner started this process: ready when it ends
    else:  # a fork server's worker without pidfd (Linux before 5.3): look once a second
        while process_exists(owner):
            time.sleep(1.0)
    os._exit(1)


def process_exists(pid: int) -> bool:
    """Whether process ``pid`` exists, on POSIX (signal 0 only asks; one of another user's
    answers PermissionError, and exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _room_for_slots(size: int) -> bool:
    """Whether a block of ``size`` bytes fits where Python puts it (``/dev/shm`` on Linux, else
    the temporary folder); if not, a note on stderr. Writing past a full RAM file system's room
    kills the writer with SIGBUS."""
    folders = (["/dev/shm"] if sys.platform.startswith("linux") else []) + [tempfile.gettempdir()]
    free = {folder: shutil.disk_usage(folder).free for folder in folders if os.path.isdir(folder)}
    if any(room >= size for room in free.values()):
        return True
    print(f"tesla prepare: note: {size >> 20} MiB of shared memory for the workers' results fit in none of "
          + ", ".join(f"{folder} ({room >> 20} MiB free)" for folder, room in free.items())
          + "; their pixels come through pipes instead (slower). Give the container more shared memory "
          "(docker run --shm-size) or use fewer --workers.", file=sys.stderr)
    return False


def _broken_pool() -> TeslaError:
    return TeslaError(
        "a worker process of the pool ended without finishing its task (killed, out of memory, or it "
        "could not start: see the lines above); rerun with fewer --workers, or with more memory for the job"
    )


def _call_into_slot(fn: Callable, args: tuple, slot: int):
    """Worker entry point: ``fn(*args)``, its large arrays written into result slot ``slot``."""
    start, used = slot * RESULT_SLOT_BYTES, 0

    def put(a: np.ndarray) -> np.ndarray | _InSlot:
        nonlocal used
        if a.dtype.hasobject or a.nbytes < _SLOT_MIN_BYTES or used + a.nbytes > RESULT_SLOT_BYTES:
            return a
        np.ndarray(a.shape, a.dtype, buffer=_worker_slots, offset=start + used)[...] = a
        placed = _InSlot(start + used, a.dtype.str, a.shape)
        used += -(-a.nbytes // 64) * 64
        return placed

    return _map_parts(fn(*args), np.ndarray, put)


def _map_parts(result, kind: type, fn: Callable):
    """``result`` with each of its top-level parts (itself, the items of a tuple, the fields
    of a dataclass) that is a ``kind`` replaced by ``fn(part)``."""
    if isinstance(result, kind):
        return fn(result)
    if isinstance(result, tuple):
        return tuple(fn(x) if isinstance(x, kind) else x for x in result)
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        parts = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
        changed = {k: fn(v) for k, v in parts.items() if isinstance(v, kind)}
        return dataclasses.replace(result, **changed) if changed else result
    return result


class WorkerPool:
    """A pool of worker processes (see the module's docstring for how they start) or, for one
    worker, plain calls in this process.

    The workers return the large arrays of their results (the decoded pixels) through *result
    slots*: one block of shared memory made before the workers start, one slot of
    :data:`RESULT_SLOT_BYTES` per task in flight. Only the rest of a result is pickled through
    the pool's pipe, which keeps the main process's cost per image small (pickling 12 KB of
    pixels through a pipe costs it ~20-30 us per 64 x 64 image, copying them out of a slot
    ~1 us). With ``shared_results=False``, or when a result does not fit its slot, results are
    pickled whole.
    """

    def __init__(self, workers: int, shared_results: bool = True) -> None:
        self.workers = max(1, workers or default_workers())
        self.window = 3 * self.workers  # tasks in flight
        self.shared_results = shared_results
        self._pool: ProcessPoolExecutor | None = None
        self._slots: ctypes.Array | None = None
        self._free_slots: list[int] = []

    def start(self) -> ProcessPoolExecutor | None:
        """The process pool, made on first use (None for one worker); its workers start with
        the tasks."""
        if self._pool is None and self.workers > 1:
            context = multiprocessing.get_context(start_method())
            if context.get_start_method() == "forkserver":
                context.set_forkserver_preload(["tesla.data.pool"])  # numpy imported once, in the server
            size = self.window * RESULT_SLOT_BYTES
            if self.shared_results and _room_for_slots(size):  # zero-filled: every page is claimed now
                self._slots = context.RawArray(ctypes.c_uint8, size)
                self._free_slots = list(range(self.window))
            self._pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_init_worker, initargs=(self._slots, os.getpid()))
        return self._pool

    def ordered_map(
        self, fn: Callable, tasks: Iterable[tuple], window: int | None = None, borrow: bool = False
    ) -> Iterator[tuple[tuple, object]]:
        """Yield (task, fn(*task)) in task order, keeping at most ``window`` tasks in flight.

        ``fn`` must be importable by name (a module-level function): the workers are other
        processes. ``borrow``: the arrays that came through a result slot are views of the
        slot, valid only until the next result is asked for (the consumer copies what it
        keeps); else copies. A task still in flight when the consumer stops early keeps its
        result slot out of use for the life of the pool (its worker may yet write into it)."""
        if self.start() is None:
            for t in tasks:
                yield t, fn(*t)
            return
        window = window or self.window
        pending: deque = deque()
        for t in tasks:
            pending.append(self._submit(fn, t))
            if len(pending) >= window:
                t0, result, lent = self._collect(*pending.popleft(), borrow)
                yield t0, result
                if lent is not None:  # the consumer is done with the views of the lent slot
                    self._free_slots.append(lent)
        while pending:
            t0, result, lent = self._collect(*pending.popleft(), borrow)
            yield t0, result
            if lent is not None:
                self._free_slots.append(lent)

    def _submit(self, fn: Callable, task: tuple) -> tuple[tuple, Future, int | None]:
        """(task, its future, the result slot it writes into or None)."""
        slot = self._free_slots.pop() if self._free_slots else None
        try:
            if slot is None:
                return task, self._pool.submit(fn, *task), None
            return task, self._pool.submit(_call_into_slot, fn, task, slot), slot
        except BrokenProcessPool:  # a worker died while the consumer was busy
            raise _broken_pool() from None

    def _collect(self, task: tuple, future: Future, slot: int | None, borrow: bool) -> tuple[tuple, object, int | None]:
        """(task, its result, the slot still lent to the consumer): the arrays the worker placed
        in ``slot`` are copied out, or with ``borrow`` viewed in place (the slot is then lent)."""
        try:
            result = future.result()
        except BrokenProcessPool:
            raise _broken_pool() from None
        except BaseException:
            if slot is not None and future.done():  # the worker is done with the slot
                self._free_slots.append(slot)
            raise
        if slot is None:
            return task, result, None
        if borrow:
            return task, _map_parts(result, _InSlot, self._slot_view), slot
        result = _map_parts(result, _InSlot, lambda placed: self._slot_view(placed).copy())
        self._free_slots.append(slot)
        return task, result, None

    def _slot_view(self, placed: _InSlot) -> np.ndarray:
        """The array a worker wrote into a result slot, viewed in place (the view keeps the
        block alive: it stays valid after :meth:`close`)."""
        return np.ndarray(placed.shape, np.dtype(placed.dtype), buffer=self._slots, offset=placed.offset)

    def close(self, ok: bool) -> None:
        """Stop the workers (after a failure, the tasks not yet started are dropped) and let go
        of the result slots (freed with the last view of them)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=not ok)
            self._pool = None
        self._slots, self._free_slots = None, []
