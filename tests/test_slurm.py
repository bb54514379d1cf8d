"""The workflow on a real SLURM scheduler: profiles/slurm, submitted with `sbatch`.

Brings up a one-node cluster on this machine with .ci/setup_slurm.sh (munge, MariaDB +
slurmdbd, slurmctld, slurmd; idempotent, so a running cluster is reused and left running),
then runs the embedded demo workflow on a copy of the workflow through a profile derived
from profiles/slurm: the shipped file with the local account and partition, no GPU (the
local node has none), small memory requests and a 2 s initial status delay. The demo's
budget is cut (2 experts, a short distillation, one architecture) by a --configfile
override: the numbers are tested in tests/test_workflow_demo.py, this file tests the
scheduling.

Checked against the scheduler's own record (`sacct`, i.e. slurmdbd), not only Snakemake's
output: every job of a run is a SLURM job of that run, on the local partition and account,
completed; a distillation cancelled with `scancel` mid-run is reported as failed and a
rerun completes it from its checkpoint; acc.csv is what a local `tesla results` writes.
Bad input fails at submission with the scheduler's message in the Snakemake log: the
shipped profile unedited (placeholder account), an unknown partition, a GPU job on a
partition without GPUs.

Needs root on Debian/Ubuntu (the script installs the slurm packages with apt-get when
missing, about 30 s); skips otherwise. Time budget: about 3 minutes on 2 cores (measured
175 s with the cluster already installed).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from test_workflow import ROOT, SNAKEMAKE, make_workdir, snakemake

SETUP_SCRIPT = ROOT / ".ci" / "setup_slurm.sh"
SHIPPED_PROFILE = ROOT / "profiles" / "slurm" / "config.yaml"
PARTITION = "debug"  # what .ci/setup_slurm.sh creates
ACCOUNT = "ci"


def _skip_reason() -> str | None:
    if SNAKEMAKE is None:
        return "snakemake is not installed in this environment"
    if not Path("/etc/debian_version").exists():
        return ".ci/setup_slurm.sh needs Debian or Ubuntu (apt-get and Debian's slurm-wlm packages)"
    if os.geteuid() != 0:
        return ".ci/setup_slurm.sh must run as root to install and start the SLURM daemons (CI runs as root)"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]

#: the demo at a small budget (scheduling is under test here, not accuracy)
SMALL_DEMO = {
    "datasets": {
        "demo": {
            "experts": {"count": 2, "epochs": 4, "keep_snapshots": 4},
            "distill": {
                1: {"max_start_epoch": 2, "expert_epochs": 2, "iterations": 200, "checkpoint_every": 5},
                3: {"max_start_epoch": 2, "expert_epochs": 2},
            },
            "evaluate": {"architectures": ["convnet_d1"], "runs": 1, "epochs": 40},
        }
    }
}
GPU_RULES = ("expert", "distill", "evaluate_synthetic", "evaluate_random")

_SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: ([^)]*)\)")
_RUN_ID = re.compile(r"SLURM run ID: (\S+)")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def local_profile(shipped: dict, partition: str = PARTITION, account: str = ACCOUNT, gpu: bool = False) -> dict:
    """profiles/slurm adapted to the local cluster, as a user would: account and partitions
    set; and, for a 2-core node without GPUs, no GPU, one core and 1 GB per job, and a short
    first status check."""
    profile = copy.deepcopy(shipped)
    profile["default-resources"].update(slurm_account=account, slurm_partition=partition, mem_mb=1000, runtime=10)
    for rule, res in profile["set-resources"].items():
        if "slurm_partition" in res:
            res["slurm_partition"] = partition
        if not gpu and rule in GPU_RULES:
            res["gpu"] = 0  # also overrides the rules' own gpu=1 on a machine with a GPU
        res.update(cpus_per_task=1, mem_mb=1000, runtime=10)
    profile["set-threads"] = {rule: 1 for rule in profile["set-threads"]}
    profile.update(
        {
            "slurm-init-seconds-before-status-checks": 2,
            "seconds-between-status-checks": 2,
            "max-status-checks-per-second": 5,
            "latency-wait": 5,
        }
    )
    return profile


def write_profile(folder: Path, profile: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return folder


def shipped_profile() -> dict:
    return yaml.safe_load(SHIPPED_PROFILE.read_text())


def sacct(*args: str) -> list[dict[str, str]]:
    """Rows of `sacct -X` (allocations only) for the given selection, as dicts."""
    fields = ["JobIDRaw", "JobName", "State", "Partition", "Account", "Comment", "ExitCode"]
    out = subprocess.run(
        ["sacct", "-X", "-n", "--parsable2", "-o", ",".join(fields), *args],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]


def sacct_when_final(job_ids: list[str], timeout: float = 30) -> dict[str, dict[str, str]]:
    """sacct rows of these jobs once slurmdbd has every one of them in a final state."""
    deadline = time.monotonic() + timeout
    while True:
        rows = {r["JobIDRaw"]: r for r in sacct("-j", ",".join(job_ids))}
        states = [rows[j]["State"].split(" ")[0] if j in rows else "" for j in job_ids]
        if all(s and s not in ("PENDING", "RUNNING", "REQUEUED") for s in states) or time.monotonic() > deadline:
            return rows
        time.sleep(1)


def submissions(log: str) -> dict[str, str]:
    """SLURM job id -> the rule it ran (from the path of its SLURM log), as Snakemake logged."""
    return {slurm_id: re.search(r"rule_(\w+?)/", path).group(1) for _, slurm_id, path in _SUBMITTED.findall(log)}


def run_id(log: str) -> str:
    found = _RUN_ID.findall(log)
    assert len(found) == 1, log[-3000:]
    return found[0]


def job_counts(log: str) -> dict[str, int]:
    """Snakemake's own table of the jobs of a run ('Job stats': rule, count)."""
    table = log[log.index("Job stats:"):]
    counts = {}
    for line in table.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    counts.pop("total", None)
    return counts


def run_slurm(workdir: Path, profile: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return snakemake(workdir, "--workflow-profile", str(profile), *args, timeout=timeout)


# --------------------------------------------------------------------------------------
# fixtures: the cluster, then the demo through it (cancel + rerun)
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    start = time.monotonic()
    result = subprocess.run(["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=900)
    print(f"setup_slurm.sh: {time.monotonic() - start:.0f} s\n{result.stdout[-2000:]}")
    assert result.returncode == 0, f"{SETUP_SCRIPT} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def demo(cluster, tmp_path_factory):
    """Run A: data and experts, and the distillation of IPC 1, which is cancelled with
    scancel once it has written a checkpoint. Run B: the rerun up to acc.csv."""
    workdir = make_workdir(tmp_path_factory.mktemp("wf-slurm"))
    profile = write_profile(workdir / "profile-local", local_profile(shipped_profile()))
    (workdir / "small.yaml").write_text(yaml.safe_dump(SMALL_DEMO, sort_keys=False))
    common = ["--configfile", "small.yaml", "--retries", "0"]

    # ---- run A, in the background: cancel the distillation after its first checkpoint
    log_a = workdir / "run_a.log"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("SNAKEMAKE_PROFILE", None)
    start = time.monotonic()
    with open(log_a, "w") as fh:
        proc = subprocess.Popen(
            [SNAKEMAKE, "--workflow-profile", str(profile), *common, "distill/demo_ipc1/synthetic.h5"],
            cwd=workdir, env=env, stdout=fh, stderr=subprocess.STDOUT, text=True,
        )
    cancelled, hung = None, False
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            distill_jobs = [j for j, rule in submissions(log_a.read_text()).items() if rule == "distill"]
            if distill_jobs and list((workdir / "distill" / "demo_ipc1").glob("checkpoint-*.pt")):
                cancelled = distill_jobs[0]
                subprocess.run(["scancel", cancelled], check=True, timeout=30)
                break
            time.sleep(0.5)
        try:  # Snakemake must notice the cancellation within a few status rounds
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            hung = True
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    seconds_a = time.monotonic() - start
    text_a = log_a.read_text()
    assert cancelled is not None, "the distillation never wrote a checkpoint while running:\n" + text_a[-5000:]
    ipc1 = workdir / "distill" / "demo_ipc1"
    after_a = {"synthetic": (ipc1 / "synthetic.h5").exists(), "checkpoints": len(list(ipc1.glob("checkpoint-*.pt")))}

    # ---- run B: the rerun, up to acc.csv
    start = time.monotonic()
    run_b = run_slurm(workdir, profile, *common, "results/demo_ipc1/acc.csv")
    seconds_b = time.monotonic() - start
    print(f"slurm demo: run A (cancelled) {seconds_a:.0f} s, run B (rerun) {seconds_b:.0f} s")
    return {
        "workdir": workdir, "run_a": text_a, "rc_a": proc.returncode, "cancelled": cancelled, "hung": hung, "after_a": after_a,
        "run_b": run_b.stdout + run_b.stderr, "rc_b": run_b.returncode,
    }


# --------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------
def test_setup_is_idempotent_and_the_cluster_answers(cluster):
    start = time.monotonic()
    again = subprocess.run(["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - start
    assert again.returncode == 0, again.stdout + again.stderr
    assert "installing" not in again.stdout and "starting slurmctld" not in again.stdout, again.stdout
    assert seconds < 30, f"a second setup took {seconds:.0f} s"
    partitions = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True, check=True).stdout
    assert f"{PARTITION}* up" in partitions
    assert ACCOUNT in subprocess.run(
        ["sacctmgr", "-n", "list", "assoc", "user=root", "format=account"], capture_output=True, text=True, check=True
    ).stdout


def test_cancelled_job_is_reported_as_failed(demo):
    log, job = demo["run_a"], demo["cancelled"]
    assert not demo["hung"], "Snakemake did not notice the cancelled job within 120 s:\n" + log[-3000:]
    assert demo["rc_a"] != 0, log[-3000:]
    assert f"SLURM-job '{job}' failed, SLURM status is: 'CANCELLED" in log, log[-5000:]
    assert "Error in rule distill" in log
    # the scheduler's record agrees, and the stage's outputs are gone but its checkpoint stays
    assert sacct_when_final([job])[job]["State"].startswith("CANCELLED")
    assert demo["after_a"] == {"synthetic": False, "checkpoints": 1}
    # SLURM's log of the failed job is kept (those of successful jobs are deleted)
    slurm_logs = {p.stem: p for p in (demo["workdir"] / "logs" / "slurm").rglob("*.log")}
    assert job in slurm_logs and "rule_distill" in str(slurm_logs[job]), sorted(slurm_logs)
    assert set(slurm_logs) == {job}, sorted(slurm_logs)


def test_rerun_resumes_from_the_checkpoint_and_completes(demo):
    log, workdir = demo["run_b"], demo["workdir"]
    assert demo["rc_b"] == 0, log[-6000:]
    stage_log = (workdir / "logs" / "distill" / "demo_ipc1.log").read_text()
    resumed = re.search(r"resuming from \S+checkpoint-\w+\.pt at iteration (\d+)", stage_log)
    assert resumed and int(resumed.group(1)) >= 5, stage_log[-3000:]
    assert (workdir / "distill" / "demo_ipc1" / "synthetic.h5").exists()
    assert not list((workdir / "distill" / "demo_ipc1").glob("checkpoint-*.pt"))


@pytest.mark.parametrize("run", ["run_a", "run_b"])
def test_every_job_went_through_sbatch(demo, run):
    """The scheduler's record of the run (sacct --name <run id>) holds exactly the jobs
    Snakemake planned, one SLURM job each, with the rule in the job comment."""
    log = demo[run]
    planned = job_counts(log)
    name = run_id(log)
    assert name.startswith("tesla_")  # slurm-jobname-prefix of the profile
    submitted = submissions(log)
    assert len(submitted) == sum(planned.values()), (planned, submitted)
    rows = sacct_when_final(list(submitted))
    by_name = {r["JobIDRaw"] for r in sacct("--name", name, "-S", "now-1days")}
    assert by_name == set(submitted)
    seen: dict[str, int] = {}
    for job_id, rule in submitted.items():
        row = rows[job_id]
        assert row["JobName"] == name and row["Partition"] == PARTITION and row["Account"] == ACCOUNT, row
        assert row["Comment"].startswith(f"rule_{rule}"), row
        expected = "CANCELLED" if job_id == demo["cancelled"] else "COMPLETED"
        assert row["State"].startswith(expected), row
        seen[rule] = seen.get(rule, 0) + 1
    assert seen == planned
    if run == "run_a":
        assert set(planned) == {"prepare", "expert", "distill"}
    else:
        assert set(planned) == {"distill", "evaluate_synthetic", "evaluate_random", "results"}


def test_acc_csv_is_what_a_local_run_writes(demo):
    """acc.csv from the cluster equals `tesla results` run locally on the same evaluations."""
    workdir = demo["workdir"]
    assert demo["rc_b"] == 0, demo["run_b"][-3000:]
    runs = sorted(str(p) for p in (workdir / "eval" / "demo_ipc1").glob("*.csv"))
    experts = sorted(str(p) for p in (workdir / "experts" / "demo").glob("expert_*.h5"))
    assert len(runs) == 2 and len(experts) == 2
    local = workdir / "local_acc.csv"
    tesla = Path(sys.executable).parent / "tesla"
    done = subprocess.run([str(tesla), "results", "--runs", *runs, "--experts", *experts, "--out", str(local)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    on_cluster = pd.read_csv(workdir / "results" / "demo_ipc1" / "acc.csv", comment="#")
    here = pd.read_csv(local, comment="#")
    assert list(on_cluster.columns) == list(here.columns)
    assert list(on_cluster.columns[:8]) == ["dataset", "ipc", "method", "engine", "arch", "runs", "acc_mean", "acc_std"]
    pd.testing.assert_frame_equal(on_cluster, here)
    assert set(on_cluster["method"]) == {"tesla", "random", "full"}


# --------------------------------------------------------------------------------------
# bad input: the scheduler's refusal in the Snakemake log, at once
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_workdir(cluster, tmp_path_factory):
    workdir = make_workdir(tmp_path_factory.mktemp("wf-slurm-bad"))
    (workdir / "small.yaml").write_text(yaml.safe_dump(SMALL_DEMO, sort_keys=False))
    return workdir


def _fails_fast(workdir: Path, profile: dict, target: str, name: str, *extra: str) -> str:
    folder = write_profile(workdir / name, profile)
    start = time.monotonic()
    result = run_slurm(workdir, folder, target, "--configfile", "small.yaml", "--retries", "0", *extra, timeout=180)
    seconds = time.monotonic() - start
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    assert seconds < 90, f"took {seconds:.0f} s to fail"
    return log


def test_unedited_shipped_profile_fails_at_submission(bad_workdir):
    """profiles/slurm as shipped, with its EDIT-ME placeholders: refused with the valid accounts named."""
    # (the first status round would come after 40 s: Snakemake waits for it before exiting;
    # a shorter delay given on the command line saves that time, nothing else is changed)
    log = _fails_fast(bad_workdir, shipped_profile(), "data/demo/train.h5", "profile-shipped",
                      "--slurm-init-seconds-before-status-checks", "2")
    assert "The given account EDIT-ME-account appears to be invalid" in log, log[-3000:]
    assert ACCOUNT in re.search(r"Available accounts:\n(.*)", log).group(1).replace(",", " ").split()
    assert "Error in rule prepare" in log


def test_unknown_partition_fails_with_sbatch_message(bad_workdir):
    log = _fails_fast(bad_workdir, local_profile(shipped_profile(), partition="EDIT-ME-partition"),
                      "data/demo/train.h5", "profile-bad-partition")
    assert "SLURM sbatch failed" in log and "invalid partition specified: EDIT-ME-partition" in log, log[-3000:]
    assert "Error in rule prepare" in log


def test_gpu_job_on_a_partition_without_gpus_fails_with_sbatch_message(bad_workdir):
    """The profile's `gpu: 1` for the training rules, on the local partition that has no
    GPUs: sbatch refuses the expert job at once."""
    prepared = snakemake(bad_workdir, "data/demo/train.h5", "--workflow-profile", "none", "--cores", "1",
                         "--configfile", "small.yaml")
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    profile = local_profile(shipped_profile(), gpu=True)
    assert all(profile["set-resources"][rule]["gpu"] == 1 for rule in GPU_RULES)
    log = _fails_fast(bad_workdir, profile, "experts/demo/expert_0.h5", "profile-gpu")
    assert "--gpus=1" in log and "Invalid generic resource (gres) specification" in log, log[-3000:]
    assert "Error in rule expert" in log
