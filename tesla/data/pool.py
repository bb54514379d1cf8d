"""A pool of worker processes whose large results come back through shared memory.

``tesla prepare`` decodes images in worker processes; what a worker returns is mostly
pixels. Pickling them through the pool's pipe costs the main process ~20-30 us per 64 x 64
image, copying them out of shared memory ~1 us, so :class:`WorkerPool` gives every task in
flight a *result slot* in one block of shared memory (``multiprocessing.shared_memory``): a
worker writes the large arrays of its result into its slot (:func:`_call_into_slot`) and
only the rest is pickled. For an array that does not fit its slot, or where the shared-memory
folder lacks the room, results are pickled whole. One worker means plain calls in this process.

The workers are never forked from the preparing process: by the time it decodes, that process
runs threads of other libraries (Arrow's readers, jemalloc's background thread, OpenBLAS), and
a child forked while one of them holds a lock can wait for it forever. They are started by
Python's fork server (``forkserver``: a clean single-threaded process started for the purpose)
or, where there is none, as fresh interpreters (``spawn``). A worker that dies (killed, out of
memory) stops the run with an error instead of leaving it waiting.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shutil
import sys
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
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


#: where ``SharedMemory`` blocks live on Linux (a RAM file system whose size a container may cap)
SHARED_MEMORY_FOLDER = "/dev/shm"

_worker_slots: SharedMemory | None = None  # in a pool worker: the pool's result slots
_still_viewed: list[SharedMemory] = []  # closed pools' blocks that a consumer's view still uses


def start_method() -> str:
    """How the pool starts its workers: ``forkserver`` where Python has it, else ``spawn``."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _init_worker(slots_name: str | None) -> None:
    """Worker initializer: attach the pool's block of result slots, by name."""
    global _worker_slots
    _worker_slots = SharedMemory(name=slots_name) if slots_name else None


def _result_slots(size: int) -> SharedMemory | None:
    """A block of ``size`` bytes of shared memory with every page already in memory, or None
    (with a note on stderr) where the shared-memory folder has less room free: a worker writing
    into a page the file system cannot back would die of SIGBUS mid-run."""
    if os.path.isdir(SHARED_MEMORY_FOLDER):
        free = shutil.disk_usage(SHARED_MEMORY_FOLDER).free
        if free < size:
            print(f"tesla prepare: note: {SHARED_MEMORY_FOLDER} has {free >> 20} MiB free, less than the "
                  f"{size >> 20} MiB of result slots; the workers' pixels come through pipes (slower). "
                  f"Give the container more shared memory (docker run --shm-size) or use fewer --workers.",
                  file=sys.stderr)
            return None
    block = SharedMemory(create=True, size=size)
    np.frombuffer(block.buf, np.uint8)[:] = 0  # claim every page now, while the room is there
    return block


def _call_into_slot(fn: Callable, args: tuple, slot: int):
    """Worker entry point: ``fn(*args)``, its large arrays written into result slot ``slot``."""
    start, used = slot * RESULT_SLOT_BYTES, 0

    def put(a: np.ndarray) -> np.ndarray | _InSlot:
        nonlocal used
        if a.dtype.hasobject or a.nbytes < _SLOT_MIN_BYTES or used + a.nbytes > RESULT_SLOT_BYTES:
            return a
        np.ndarray(a.shape, a.dtype, buffer=_worker_slots.buf, offset=start + used)[...] = a
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
    ~1 us). With ``shared_results=False``, without room for the block, or when a result does
    not fit its slot, results are pickled whole.
    """

    def __init__(self, workers: int, shared_results: bool = True) -> None:
        self.workers = max(1, workers or default_workers())
        self.window = 3 * self.workers  # tasks in flight
        self.shared_results = shared_results
        self._pool: ProcessPoolExecutor | None = None
        self._slots: SharedMemory | None = None
        self._free_slots: list[int] = []

    def start(self) -> ProcessPoolExecutor | None:
        """The process pool, started on first use (None for one worker)."""
        if self._pool is None and self.workers > 1:
            context = multiprocessing.get_context(start_method())
            if context.get_start_method() == "forkserver":
                context.set_forkserver_preload(["tesla.data.pool"])  # numpy imported once, in the server
            if self.shared_results:
                self._slots = _result_slots(self.window * RESULT_SLOT_BYTES)
                self._free_slots = list(range(self.window)) if self._slots is not None else []
            name = self._slots.name if self._slots is not None else None
            self._pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_init_worker, initargs=(name,))
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
            slot = self._free_slots.pop() if self._free_slots else None
            if slot is None:
                pending.append((t, self._pool.submit(fn, *t), None))
            else:
                pending.append((t, self._pool.submit(_call_into_slot, fn, t, slot), slot))
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

    def _collect(self, task: tuple, future: Future, slot: int | None, borrow: bool) -> tuple[tuple, object, int | None]:
        """(task, its result, the slot still lent to the consumer): the arrays the worker placed
        in ``slot`` are copied out, or with ``borrow`` viewed in place (the slot is then lent)."""
        try:
            result = future.result()
        except BrokenProcessPool:
            raise TeslaError(
                "a worker process of the pool ended without finishing its task (killed, out of memory, or it "
                "could not start: see the lines above); rerun with fewer --workers, or with more memory for the job"
            ) from None
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
        """The array a worker wrote into a result slot, viewed in place."""
        return np.ndarray(placed.shape, np.dtype(placed.dtype), buffer=self._slots.buf, offset=placed.offset)

    def close(self, ok: bool) -> None:
        """Stop the workers (after a failure, the tasks not yet started are dropped) and free
        the result slots."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=not ok)
            self._pool = None
        if self._slots is not None:
            self._slots.unlink()
            try:
                self._slots.close()
            except BufferError:  # a view of a slot is still referenced: the mapping stays until the process ends
                _still_viewed.append(self._slots)
            self._slots, self._free_slots = None, []
