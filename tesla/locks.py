"""Exclusive run locks: one process at a time works on an output that resumes.

A stage that resumes (``tesla distill`` from its checkpoint, ``tesla experts`` from its
``OUT.partial/`` folder) must never run twice at once for the same output: the two runs
would read and overwrite each other's state, and the last writer would win silently. This
happens for real: when Snakemake is killed on a SLURM login node, the jobs it submitted keep
running, and the rerun submits them again.

:func:`acquire` takes an exclusive, non-blocking ``flock`` on a lock file (``tesla-lock``
version 1, docs/formats.md) and records in it who holds it: pid, host, start time and
command line. A second run is refused at once with a :class:`~tesla.errors.TeslaError` that
names the first one. The kernel releases the lock when its holder ends, however it ends
(SIGKILL, out of memory, node reboot), so a killed run never leaves a stale lock; a clean
end removes the file. A process forked while a lock is held (by a library, say) does not keep
it: the child closes its copy of the descriptor at once, so the lock still ends with the
process that took it.

What it does not cover: ``flock`` between *different machines* works only where the shared
file system forwards it (NFS v4 and NFS v3 with ``lockd`` do on Linux; Lustre only when
mounted with ``-o flock``; with ``localflock`` it is per node). Where the file system
refuses locks (``ENOLCK``, ``EOPNOTSUPP``), :func:`acquire` warns and the run goes on
unprotected. A lock file on a file system that accepts locks but keeps them per node gives
no protection between nodes: there, make sure a run's old job is gone (``squeue``) before
starting it again.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tesla.errors import TeslaError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["LOCK_FORMAT", "LOCK_VERSION", "Holder", "RunLock", "acquire"]

LOCK_FORMAT = "tesla-lock"
LOCK_VERSION = 1
#: errors of flock that mean "another process holds it" (all others: the file system has no locks)
_HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
#: descriptors of the locks this process holds (a forked child closes its copies)
_HELD_FDS: set[int] = set()


def _close_inherited_locks() -> None:
    """In a forked child: close the inherited lock descriptors. flock belongs to the open
    file, which the child shares: without this, a worker that outlives a killed parent
    would keep the parent's lock."""
    for fd in list(_HELD_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: what the lock file records."""

    pid: int
    host: str
    started: str  # local time, ISO 8601
    command: str

    @classmethod
    def this_process(cls) -> Holder:
        return cls(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            command=shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python",
        )

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started}, command: {self.command}"

    def to_json(self) -> str:
        return json.dumps(
            {"format": LOCK_FORMAT, "format_version": LOCK_VERSION, "pid": self.pid, "host": self.host,
             "started": self.started, "command": self.command}
        )

    @classmethod
    def read(cls, text: str) -> Holder | None:
        """The holder recorded in a lock file, or None (empty, being written, or not ours)."""
        try:
            d = json.loads(text)
            if d.get("format") != LOCK_FORMAT:
                return None
            return cls(pid=int(d["pid"]), host=str(d["host"]), started=str(d["started"]), command=str(d["command"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


class RunLock:
    """A held lock (or, where the file system has no locks, a stand-in that holds nothing).

    Use as a context manager, or call :meth:`release` (also named ``close``)."""

    def __init__(self, path: Path, handle) -> None:
        self.path = path
        self._handle = handle

    @property
    def held(self) -> bool:
        return self._handle is not None

    def release(self) -> None:
        """Remove the lock file, then release the lock (in that order: a process that opened
        the old file meanwhile sees that it is gone and takes a new one)."""
        if self._handle is None:
            return
        try:
            if _same_file(self.path, self._handle.fileno()):
                self.path.unlink(missing_ok=True)
        finally:
            _HELD_FDS.discard(self._handle.fileno())
            self._handle.close()
            self._handle = None

    close = release

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def acquire(path: str | os.PathLike, *, stage: str, protects: str) -> RunLock:
    """Take the exclusive lock ``path`` for the whole run of ``stage`` (e.g. ``'tesla distill'``),
    which works on ``protects`` (e.g. the output file); refuse with a :class:`TeslaError`
    naming the holder when another process has it. The parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover - not POSIX
        _warn_unlocked(path, "this system has no flock")
        return RunLock(path, None)
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _HELD:
                handle.seek(0)
                holder = Holder.read(handle.read())
                handle.close()
                raise _in_use(path, stage, protects, holder) from None
            handle.close()
            _warn_unlocked(path, os.strerror(exc.errno or 0))
            return RunLock(path, None)
        if not _same_file(path, handle.fileno()):  # its holder removed it after we opened it: retry
            handle.close()
            continue
        handle.seek(0)
        handle.truncate()
        handle.write(Holder.this_process().to_json() + "\n")
        handle.flush()
        _HELD_FDS.add(handle.fileno())
        return RunLock(path, handle)


def _in_use(path: Path, stage: str, protects: str, holder: Holder | None) -> TeslaError:
    if holder is None:
        who, stop = "a process that has not recorded itself yet", "stop it"
    else:
        here = holder.host == socket.gethostname()
        who = holder.describe()
        stop = f"stop it (kill {holder.pid}{'' if here else f' on {holder.host}'}; under SLURM, scancel its job)"
    return TeslaError(
        f"{protects} is in use by another '{stage}' run: {who}. Two runs on one output would overwrite each "
        f"other's state; wait for that run to finish or {stop}, then run this command again (the lock {path} "
        f"is released as soon as that process ends, even when it is killed)"
    )


def _warn_unlocked(path: Path, why: str) -> None:
    print(
        f"tesla: warning: cannot lock {path} ({why}); this run is not protected against a second run on the "
        f"same output (see docs/formats.md, 'tesla-lock')",
        file=sys.stderr,
    )
