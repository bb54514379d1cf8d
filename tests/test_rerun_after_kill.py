"""A local run (the default profile) whose Snakemake is killed with SIGKILL, as by a power
cut or `kill -9`: what docs/reruns.md ("After a kill") tells the user to do, step by step;
and one stopped with Ctrl-C, which needs none of it.

The stages are stood in for by the fake ``tesla`` of tests/test_workflow.py, except that
the distillation of the first run hangs (as a long one would): Snakemake is killed while it
runs. The distillation process outlives Snakemake (it is not Snakemake's to clean up any
more), the same command then stops at Snakemake's lock, and after the old run's process is
ended and ``snakemake --unlock`` the same command completes, running only the distillation
again (data and experts are kept).

The same on a SLURM cluster, where the old run's jobs stay in the queue: tests/test_slurm.py.
Time budget: about 50 s on 2 cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import process_running
from workflow_support import SNAKEMAKE, install_wrapping_tesla, make_workdir, snakemake

pytestmark = pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed in this environment")

TARGET = "results/demo_ipc1/exact/synthetic.h5"

#: `tesla` first on PATH: `tesla distill` writes its pid to $HANG_PIDFILE (when set) and
#: sleeps; everything else is the fake tesla
HANGING_TESLA = textwrap.dedent(
    """\
    #!{python}
    import os, sys, time
    if sys.argv[1] == "distill" and os.environ.get("HANG_PIDFILE"):
        with open(os.environ["HANG_PIDFILE"], "w") as fh:
            fh.write(str(os.getpid()))
        time.sleep(600)
    os.execv({fake!r}, [{fake!r}, *sys.argv[1:]])
    """
)


def _start_until_distill(tmp_path: Path) -> tuple[Path, Path, subprocess.Popen, int]:
    """A run of the local profile (workflow/profiles/default) in its own session, as from a
    terminal, up to the point where its distillation runs (and hangs): (workdir, the folder
    of the hanging tesla, the Snakemake process, the distillation's pid)."""
    workdir = make_workdir(tmp_path / "wf")
    hanging = install_wrapping_tesla(tmp_path / "hanging", HANGING_TESLA, tmp_path / "fake")
    pidfile = tmp_path / "distill.pid"
    env = dict(os.environ, HANG_PIDFILE=str(pidfile))
    env["PATH"] = os.pathsep.join([str(hanging), str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("SNAKEMAKE_PROFILE", None)
    first = subprocess.Popen([SNAKEMAKE, TARGET], cwd=workdir, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
    if not (pidfile.exists() and pidfile.read_text()):
        first.kill()
        first.wait()
        raise AssertionError(f"the distillation did not start within 120 s (Snakemake exit status {first.returncode})")
    return workdir, hanging, first, int(pidfile.read_text())


def _wait_gone(pid: int, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while process_running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not process_running(pid)


def _end(first: subprocess.Popen, job: int) -> None:
    """Whatever a failed test left running."""
    if first.poll() is None:
        first.kill()
    if process_running(job):
        os.kill(job, signal.SIGKILL)


def _rerun_redoes_only_the_distillation(workdir: Path, hanging: Path) -> None:
    rerun = snakemake(workdir, TARGET, path_prefix=hanging)  # (no HANG_PIDFILE: nothing hangs)
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, log[-3000:]
    assert (workdir / TARGET).exists()
    # only the stopped job runs again: data and experts are reused
    assert "rule distill:" in log and "rule prepare:" not in log and "rule expert:" not in log, log[-3000:]


def test_killed_local_run_needs_unlock_then_the_same_command_resumes(tmp_path):
    workdir, hanging, first, orphan = _start_until_distill(tmp_path)
    try:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        assert process_running(orphan), "the distillation died with Snakemake (docs/reruns.md says to look for it)"

        # the same command: Snakemake's lock
        again = snakemake(workdir, TARGET, path_prefix=hanging)
        assert again.returncode != 0
        assert "Directory cannot be locked" in again.stderr and "--unlock" in again.stderr, again.stderr[-2000:]

        # docs/reruns.md's steps: end what is left of the old run, unlock, the same command
        os.kill(orphan, signal.SIGTERM)
        assert _wait_gone(orphan)
        unlocked = snakemake(workdir, TARGET, "--unlock", path_prefix=hanging)
        assert unlocked.returncode == 0 and "Unlocked" in unlocked.stdout + unlocked.stderr, unlocked.stderr[-2000:]
    finally:
        _end(first, orphan)
    _rerun_redoes_only_the_distillation(workdir, hanging)


def test_ctrl_c_stops_the_jobs_and_the_same_command_runs_at_once(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group): Snakemake stops its running job and
    removes its lock by itself; the same command needs no --unlock."""
    workdir, hanging, first, job = _start_until_distill(tmp_path)
    try:
        os.killpg(first.pid, signal.SIGINT)
        first.wait(timeout=60)
        assert _wait_gone(job), "the distillation outlived Ctrl-C"
        assert not list((workdir / ".snakemake" / "locks").glob("*")), "Ctrl-C left Snakemake's lock"
    finally:
        _end(first, job)
    _rerun_redoes_only_the_distillation(workdir, hanging)
