"""A failed job never leaves stale results: after a config change, when the changed job
fails, the same command redoes it and everything downstream, every time.

The demo workflow is executed once (module fixture) with the stand-in ``tesla`` of
tests/workflow_support.py; each test copies that finished run (outputs and Snakemake's
records), changes a distill setting of IPC 1 in config/config.yaml and runs the same
command while the distillation fails in one of three ways:

* the divergence guard stops it (``tesla distill`` exits with status 2);
* its process is killed with SIGKILL (``kill -9``);
* it is killed on every attempt, Snakemake's own retries included (what a cluster job
  cancelled with scancel looks like to Snakemake; the real SLURM is tested in
  tests/test_slurm.py).

Then the old acc.csv must not be taken for a result of the new settings: a dry run of the
same command plans the distillation, its evaluations and acc.csv, and the run (nothing
fails any more) writes them from the new settings. Without upstream fingerprints Snakemake
answered "Nothing to be done": the downstream jobs' own settings had not changed and their
outputs existed.

Time budget: about 70 s on 2 cores (about 3 s per Snakemake call).
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from workflow_support import SNAKEMAKE, install_wrapping_tesla, load_config, make_workdir, planned_jobs, snakemake, write_config

pytestmark = pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed in this environment")

TARGET = "results/demo_ipc1/acc.csv"
SYNTHETIC = "results/demo_ipc1/exact/synthetic.h5"

#: `tesla` first on PATH: `tesla distill` fails as $FAIL_DISTILL says (when set); the rest,
#: and a distillation when it is not set, is the stand-in tesla
FAILING_TESLA = textwrap.dedent(
    """\
    #!{python}
    import os, signal, sys
    how = os.environ.get("FAIL_DISTILL")
    if sys.argv[1] == "distill" and how:
        with open(os.environ["FAIL_LOG"], "a") as fh:
            fh.write(how + "\\n")
        if how == "guard":
            print("tesla distill: error: iteration 3: the matching loss 12 is above its limit 10", file=sys.stderr)
            sys.exit(2)
        os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGTERM)
    os.execv({fake!r}, [{fake!r}, *sys.argv[1:]])
    """
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """The demo's IPC 1 results made once with the stand-in tesla; the failing tesla's folder."""
    base = tmp_path_factory.mktemp("wf-failed")
    workdir = make_workdir(base / "work")
    failing = install_wrapping_tesla(base / "failing", FAILING_TESLA, base / "fake")
    result = snakemake(workdir, TARGET, "--cores", "2", path_prefix=failing)
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir, failing


def _copy(finished, tmp_path: Path) -> Path:
    workdir = tmp_path / "work"
    shutil.copytree(finished[0], workdir, symlinks=True)  # copy2: the mtimes come along
    return workdir


def _run(workdir: Path, failing: Path, *args: str, fail: str | None = None, log: Path | None = None):
    import os

    old = {k: os.environ.get(k) for k in ("FAIL_DISTILL", "FAIL_LOG")}
    os.environ.update({"FAIL_DISTILL": fail or "", "FAIL_LOG": str(log or workdir / "failures.txt")})
    try:
        return snakemake(workdir, TARGET, *args, path_prefix=failing)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _change_lr_img(workdir: Path, factor: float) -> float:
    cfg = load_config(workdir)
    row = cfg["datasets"]["demo"]["distill"][1]
    row["lr_img"] = row["lr_img"] * factor
    write_config(workdir, cfg)
    return row["lr_img"]


def _planned(workdir: Path, failing: Path) -> dict[str, set[str]]:
    result = _run(workdir, failing, "--dry-run", "--cores", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    return planned_jobs(result.stdout + result.stderr)


def _planned_after_failure(workdir: Path, failing: Path) -> None:
    """The old acc.csv stays, but is not taken for a result of the new settings: the same
    command plans the failed distillation and everything after it (not the data, the
    experts or the random baselines)."""
    assert not (workdir / SYNTHETIC).exists() and (workdir / TARGET).exists()
    jobs = _planned(workdir, failing)
    assert {"distill", "evaluate_synthetic", "results"} <= set(jobs), jobs
    assert "prepare" not in jobs and "expert" not in jobs and "evaluate_random" not in jobs, jobs


def _redone_from_the_new_settings(workdir: Path, failing: Path, lr_img: float) -> None:
    """The same command, with nothing failing any more, makes them from the new settings;
    after that nothing is left to do."""
    acc = workdir / TARGET
    before = acc.stat().st_mtime_ns
    result = _run(workdir, failing, "--cores", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"--lr-img {lr_img} " in (workdir / SYNTHETIC).read_text()  # the stand-in writes its command line
    assert acc.stat().st_mtime_ns > before
    assert _planned(workdir, failing) == {}


def test_a_guard_stop_after_a_config_change_reruns_when_a_limit_is_raised(finished, tmp_path):
    """The guard's advice "raise max_loss": a run option, so it renames no checkpoint (the
    rerun resumes) and is no rerun trigger itself; yet the stopped distillation and what
    follows it run."""
    workdir, failing = _copy(finished, tmp_path), finished[1]
    lr_img = _change_lr_img(workdir, 2)
    failed = _run(workdir, failing, "--cores", "2", fail="guard")
    assert failed.returncode != 0, failed.stdout + failed.stderr
    _planned_after_failure(workdir, failing)
    cfg = load_config(workdir)
    cfg["datasets"]["demo"]["distill"][1]["max_loss"] = 20
    write_config(workdir, cfg)
    _planned_after_failure(workdir, failing)
    _redone_from_the_new_settings(workdir, failing, lr_img)
    assert "--max-loss 20 " in (workdir / SYNTHETIC).read_text()


def test_a_killed_distillation_reruns_with_everything_downstream_every_time(finished, tmp_path):
    workdir, failing = _copy(finished, tmp_path), finished[1]
    lr_img = _change_lr_img(workdir, 2)
    for attempt in range(2):  # every time: a second failure leaves the same state
        failed = _run(workdir, failing, "--cores", "2", fail="kill")
        assert failed.returncode != 0, failed.stdout + failed.stderr
        _planned_after_failure(workdir, failing)
    assert (workdir / "failures.txt").read_text().split() == ["kill", "kill"]
    _redone_from_the_new_settings(workdir, failing, lr_img)


def test_a_job_killed_on_every_retry_reruns_with_everything_downstream(finished, tmp_path):
    """A cluster job cancelled with scancel on every attempt: to Snakemake, a job whose
    process was killed, with its retries (--retries) used up."""
    workdir, failing = _copy(finished, tmp_path), finished[1]
    lr_img = _change_lr_img(workdir, 0.5)
    failed = _run(workdir, failing, "--cores", "2", "--retries", "2", fail="cancel")
    assert failed.returncode != 0, failed.stdout + failed.stderr
    assert (workdir / "failures.txt").read_text().split() == ["cancel"] * 3  # the first try and two retries
    _planned_after_failure(workdir, failing)
    _redone_from_the_new_settings(workdir, failing, lr_img)
