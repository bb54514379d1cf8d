"""A pool of worker processes whose large results come back through shared memory.

``tesla prepare`` decodes images in worker processes; what a worker returns is mostly
pixels. Pickling them through the pool's pipe costs the main process ~20-30 us per 64 x 64
image, copying them out of shared memory ~1 us, so :class:`WorkerPool` gives every task in
flight a *result slot* in one anonymous shared mapping made before the workers fork: a
worker writes the large arrays of its result into its slot (:func:`_call_into_slot`) and
only the rest is pickled. Without fork, or for an array that does not fit its slot, results
are pickled whole. One worker means plain calls in this process.
"""

from __future__ import annotations

import dataclasses
import mmap
import multiprocessing
import os
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np


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


_worker_arena: mmap.mmap | None = None  # in a pool worker: the pool's result slots


def _init_worker(arena: mmap.mmap | None) -> None:
    global _worker_arena
    _worker_arena = arena


def _call_into_slot(fn: Callable, args: tuple, slot: int):
    """Worker entry point: ``fn(*args)``, its large arrays written into result slot ``slot``."""
    start, used = slot * RESULT_SLOT_BYTES, 0

    def put(a: np.ndarray) -> np.ndarray | _InSlot:
        nonlocal used
        if a.dtype.hasobject or a.nbytes < _SLOT_MIN_BYTES or used + a.nbytes > RESULT_SLOT_BYTES:
            return a
        np.ndarray(a.shape, a.dtype, buffer=_worker_arena, offset=start + used)[...] = a
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
    """A process pool (fork where available) or, for one worker, plain calls in this process.

    With fork, the workers return the large arrays of their results (the decoded pixels)
    through *result slots*: a shared anonymous memory mapping made before the workers start,
    one slot of :data:`RESULT_SLOT_BYTES` per task in flight. Only the rest of a result is
    pickled through the pool's pipe, which keeps the main process's cost per image small
    (pickling 12 KB of pixels through a pipe costs it ~20-30 us per 64 x 64 image, copying
    them out of a slot ~1 us). Without fork (or ``shared_results=False``), or when a result
    does not fit its slot, results are pickled whole.
    """

    def __init__(self, workers: int, shared_results: bool = True) -> None:
        self.workers = max(1, workers or default_workers())
        self.window = 3 * self.workers  # tasks in flight
        self.shared_results = shared_results
        self._pool = None
        self._arena: mmap.mmap | None = None
        self._free_slots: list[int] = []

    def start(self):
        """The process pool, started on first use (fork where available, else spawn)."""
        if self._pool is None and self.workers > 1:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            if method == "fork" and self.shared_results:
                self._arena = mmap.mmap(-1, self.window * RESULT_SLOT_BYTES)
                self._free_slots = list(range(self.window))
            self._pool = multiprocessing.get_context(method).Pool(self.workers, initializer=_init_worker, initargs=(self._arena,))
        return self._pool

    def ordered_map(
        self, fn: Callable, tasks: Iterable[tuple], window: int | None = None, borrow: bool = False
    ) -> Iterator[tuple[tuple, object]]:
        """Yield (task, fn(*task)) in task order, keeping at most ``window`` tasks in flight.

        ``borrow``: the arrays that came through a result slot are views of the slot, valid
        only until the next result is asked for (the consumer copies what it keeps); else copies.
        A task still in flight when the consumer stops early keeps its result slot out of use
        for the life of the pool (its worker may yet write into it)."""
        if self.start() is None:
            for t in tasks:
                yield t, fn(*t)
            return
        window = window or self.window
        pending: deque = deque()
        for t in tasks:
            slot = self._free_slots.pop() if self._free_slots else None
            if slot is None:
                pending.append((t, self._pool.apply_async(fn, t), None))
            else:
                pending.append((t, self._pool.apply_async(_call_into_slot, (fn, t, slot)), slot))
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

    def _collect(self, task: tuple, async_result, slot: int | None, borrow: bool) -> tuple[tuple, object, int | None]:
        """(task, its result, the slot still lent to the consumer): the arrays the worker placed
        in ``slot`` are copied out, or with ``borrow`` viewed in place (the slot is then lent)."""
        try:
            result = async_result.get()
        except BaseException:
            if slot is not None and async_result.ready():  # the worker is done with the slot
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
        return np.ndarray(placed.shape, np.dtype(placed.dtype), buffer=self._arena, offset=placed.offset)

    def close(self, ok: bool) -> None:
        if self._pool is not None:
            if ok:
                self._pool.close()
            else:
                self._pool.terminate()
            self._pool.join()
            self._pool = None
        if self._arena is not None:
            try:
                self._arena.close()
            except BufferError:  # a view of a slot is still referenced: the mapping goes with it
                pass
            self._arena, self._free_slots = None, []
