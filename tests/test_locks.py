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
