"""tesla.locks: the exclusive run lock shared by the stages that resume.

The end-to-end cases (a second real process refused, a SIGKILLed holder leaving no stale
lock) are in tests/test_distill.py and tests/test_experts.py."""

from __future__ import annotations

import errno
import json
import os
import socket

import pytest

from tesla import locks
from tesla.errors import TeslaError


def test_the_lock_file_records_its_holder_and_is_removed_on_release(tmp_path):
    path = tmp_path / "sub" / "out.h5.lock"
    with locks.acquire(path, stage="tesla distill", protects="--out out.h5") as lock:
        assert lock.held
        record = json.loads(path.read_text())
        assert record["format"] == "tesla-lock" and record["format_version"] == 1
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["started"][:2] == "20" and record["command"]
        assert locks.Holder.read(path.read_text()) == locks.Holder(
            os.getpid(), socket.gethostname(), record["started"], record["command"]
        )
    assert not path.exists()


def test_a_second_holder_is_refused_with_the_first_ones_pid_and_host(tmp_path):
    path = tmp_path / "out.h5.lock"
    with locks.acquire(path, stage="tesla distill", protects="--out out.h5"):
        # flock locks belong to an open file: a second open in the same process conflicts too
        with pytest.raises(TeslaError) as err:
            locks.acquire(path, stage="tesla distill", protects="--out out.h5")
    msg = str(err.value)
    assert msg.startswith("--out out.h5 is in use by another 'tesla distill' run: ")
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in msg and f"kill {os.getpid()};" in msg
    assert f"the lock {path} is released as soon as that process ends" in msg
    with locks.acquire(path, stage="tesla distill", protects="--out out.h5"):  # free again
        pass


def test_a_lock_file_left_by_a_dead_process_is_taken_over(tmp_path):
    path = tmp_path / "out.h5.lock"
    dead = locks.Holder(pid=999999, host="elsewhere", started="2020-01-01T00:00:00+0000", command="tesla distill")
    path.write_text(dead.to_json())  # the file stays after a kill; its lock does not
    with locks.acquire(path, stage="tesla distill", protects="x"):
        assert locks.Holder.read(path.read_text()).pid == os.getpid()


def test_an_unreadable_record_still_refuses(tmp_path):
    path = tmp_path / "lock"
    with locks.acquire(path, stage="tesla experts", protects="e.h5.partial") as lock:
        lock._handle.truncate(0)  # as if the holder had not written its record yet
        lock._handle.flush()
        with pytest.raises(TeslaError, match="in use by another 'tesla experts' run: a process that has not recorded itself yet"):
            locks.acquire(path, stage="tesla experts", protects="e.h5.partial")


def test_a_file_system_without_locks_warns_and_runs_unprotected(tmp_path, monkeypatch, capsys):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(locks.fcntl, "flock", no_locks)
    with locks.acquire(tmp_path / "lock", stage="tesla distill", protects="x") as lock:
        assert not lock.held
    err = capsys.readouterr().err
    assert "warning: cannot lock" in err and os.strerror(errno.ENOLCK) in err and "not protected" in err


def test_a_forked_child_does_not_keep_the_lock_of_a_killed_parent(tmp_path):
    """flock belongs to the open file a forked child shares: the child must close its copy,
    else a worker that outlives its killed parent keeps the lock. Here the parent (a forked
    process that takes the lock, forks a long-lived child, then dies by SIGKILL) is gone
    while its child lives: the lock must be free."""
    import signal
    import time

    path = tmp_path / "out.lock"
    child_pid_file = tmp_path / "child.pid"
    parent = os.fork()
    if parent == 0:  # the parent-to-be-killed
        try:
            held = locks.acquire(path, stage="tesla prepare", protects="--out-dir x")  # noqa: F841 (kept alive)
            child = os.fork()
            if child == 0:  # a worker: lives on
                time.sleep(60)
                os._exit(0)
            child_pid_file.write_text(str(child))
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 30
        while not child_pid_file.exists() or not child_pid_file.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        child = int(child_pid_file.read_text())
        os.kill(parent, signal.SIGKILL)
        os.waitpid(parent, 0)
        os.kill(child, 0)  # the worker still lives
        with locks.acquire(path, stage="tesla prepare", protects="--out-dir x") as held:
            assert held.held
    finally:
        for pid in (parent, locals().get("child")):
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_two_preparations_of_one_folder_are_kept_apart(tmp_path, capsys):
    """`tesla prepare` holds OUT_DIR/.tesla-prepare.lock while it works: a second one on the
    same folder is refused naming the first, and leaves no file behind."""
    from tesla.cli import main
    from tesla.prepare import LOCK_NAME

    out = tmp_path / "demo"
    out.mkdir()
    first = locks.acquire(out / LOCK_NAME, stage="tesla prepare", protects=f"--out-dir {out}")
    try:
        assert main(["prepare", "demo", "--out-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out-dir {out} is in use by another 'tesla prepare' run: pid {os.getpid()}" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        first.release()
    assert main(["prepare", "demo", "--out-dir", str(out)]) == 0
    assert {"train.h5", "test.h5", "prepare_report.txt"} <= {p.name for p in out.iterdir()}
    assert not (out / LOCK_NAME).exists()


def test_an_output_folder_that_cannot_be_made_is_a_clear_error(tmp_path, capsys):
    """A path error of the file system (here: --out-dir below a regular file) ends with one
    line naming the path, exit status 2, no traceback."""
    from tesla.cli import main

    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert main(["prepare", "demo", "--out-dir", str(blocker / "demo")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tesla prepare: error: ") and str(blocker) in err and "Traceback" not in err
    assert blocker.read_text() == "x"
