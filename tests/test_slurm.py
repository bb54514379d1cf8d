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

Snakemake itself killed with SIGKILL mid-run (docs/slurm.md, "After Snakemake itself was
killed"): the same command stops at Snakemake's lock; the old run's job is still in the
queue (`squeue`, as docs/slurm.md shows it); after `--unlock` the same command refuses to start
while that job is there; after `scancel` it resumes the distillation from its checkpoint
and redoes nothing else.

An evaluation job stopped by the scheduler mid-run (`scancel` once it has saved its state;
the plugin reports a job stopped at its time limit, `TIMEOUT`, the same way, as failed) is
resubmitted by the same Snakemake run (`retries`) and resumes from its checkpoint. A real
time limit is not used: SLURM's smallest is one minute, enforced up to 30 s late, which
would make the test minutes longer.

Bad input fails before anything is submitted, with the scheduler's message in the
Snakemake log: the shipped profile unedited (placeholder account), an unknown partition, a
GPU job on a partition without GPUs, more CPUs than the node has (which `sbatch` itself
would accept, to leave the job pending forever); and a job that the scheduler accepted but
that pends for a reason that never clears is cancelled and reported as failed.

Needs root on Debian/Ubuntu (the script installs the slurm packages with apt-get when
missing, about 30 s); skips otherwise. Time budget: measured 567 s with the cluster already
installed, on 2 cores shared with other work (load average 5 to 6): the demo runs 331 s,
Snakemake killed and docs/slurm.md's steps 119 s, Ctrl-C 21 s, the bad-input and pending-job
tests 67 s (175 s for the demo runs alone on a quieter machine); the stopped evaluation
178 s more (load average about 8: two submissions, each starting Snakemake and tesla in
the job).
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tesla.synthetic import SyntheticSet

from workflow_support import ROOT, SNAKEMAKE, make_workdir, snakemake

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


#: the first test of a module pays for its fixtures: the cluster's set-up (up to 900 s on a
#: fresh machine, installing the packages) and a demo run through it (about 330 s)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason())),
              pytest.mark.timeout(2400)]

#: the demo at a small budget (scheduling is under test here, not accuracy)
SMALL_DEMO = {
    "datasets": {
        "demo": {
            "experts": {"count": 2, "epochs": 4, "keep_snapshots": 4},
            "distill": {
                1: {"max_start_epoch": 2, "expert_epochs": 2, "iterations": 200, "checkpoint_every": 5},
                3: {"max_start_epoch": 2, "expert_epochs": 2, "iterations": 40, "checkpoint_every": 5},
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


def start_slurm(workdir: Path, profile: Path, log: Path, *args: str, new_session: bool = False) -> subprocess.Popen:
    """snakemake with this profile in the background, its output to `log` (in a session of
    its own with `new_session`, as from a terminal)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("SNAKEMAKE_PROFILE", None)
    with open(log, "w") as fh:
        return subprocess.Popen([SNAKEMAKE, "--workflow-profile", str(profile), *args], cwd=workdir, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, text=True, start_new_session=new_session)


def distill_job_with_checkpoint(proc: subprocess.Popen, log: Path, folder: Path, timeout: float = 300) -> str | None:
    """The SLURM id of the run's distillation once it has written a checkpoint in `folder`;
    None if the run ends first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        distill_jobs = [j for j, rule in submissions(log.read_text()).items() if rule == "distill"]
        if distill_jobs and list(folder.glob("checkpoint-*.pt")):
            return distill_jobs[0]
        time.sleep(0.5)
    return None


#: docs/slurm.md's command to see the jobs of a run whose Snakemake was killed: id, state, time
#: used, working directory, rule and wildcards (the comment)
SQUEUE_MINE = "squeue --me -o '%.10i %.10T %.10M %Z %k'"


def jobs_in(workdir: Path) -> dict[str, str]:
    """Queued or running jobs (id -> state) working in `workdir`, from docs/slurm.md's squeue command."""
    out = subprocess.run(shlex.split(SQUEUE_MINE), capture_output=True, text=True, check=True, timeout=60).stdout
    rows = [line.split(maxsplit=4) for line in out.splitlines()[1:]]
    return {r[0]: r[1] for r in rows if len(r) >= 4 and Path(r[3]) == workdir.resolve()}


def cancel_jobs_in(workdir: Path) -> list[str]:
    """scancel whatever a test left in the queue in `workdir` (a run that hung, a killed one)."""
    left = list(jobs_in(workdir))
    if left:
        subprocess.run(["scancel", *left], timeout=60)
    return left


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
    start = time.monotonic()
    proc = start_slurm(workdir, profile, log_a, *common, "results/demo_ipc1/exact/synthetic.h5")
    hung = False
    try:
        cancelled = distill_job_with_checkpoint(proc, log_a, workdir / "results" / "demo_ipc1" / "exact")
        if cancelled is not None:
            subprocess.run(["scancel", cancelled], check=True, timeout=30)
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
    ipc1 = workdir / "results" / "demo_ipc1" / "exact"
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
    """A second setup changes nothing, even with OMP_NUM_THREADS=1 in its environment (which
    `nproc` obeys): the node has the machine's CPUs, as Python counts them."""
    start = time.monotonic()
    again = subprocess.run(["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    seconds = time.monotonic() - start
    assert again.returncode == 0, again.stdout + again.stderr
    assert "installing" not in again.stdout and "starting slurmctld" not in again.stdout, again.stdout
    assert "wrote /etc/slurm/slurm.conf" not in again.stdout, again.stdout
    assert seconds < 30, f"a second setup took {seconds:.0f} s"
    partitions = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True, check=True).stdout
    assert f"{PARTITION}* up" in partitions
    assert ACCOUNT in subprocess.run(
        ["sacctmgr", "-n", "list", "assoc", "user=root", "format=account"], capture_output=True, text=True, check=True
    ).stdout
    node = subprocess.run(["scontrol", "show", "node"], capture_output=True, text=True, check=True).stdout
    assert int(re.search(r"CPUTot=(\d+)", node).group(1)) == os.cpu_count(), node


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
    slurm_logs = {p.stem: p for p in (demo["workdir"] / "results" / "logs" / "slurm").rglob("*.log")}
    assert job in slurm_logs and "rule_distill" in str(slurm_logs[job]), sorted(slurm_logs)
    assert set(slurm_logs) == {job}, sorted(slurm_logs)


def test_rerun_resumes_from_the_checkpoint_and_completes(demo):
    log, workdir = demo["run_b"], demo["workdir"]
    assert demo["rc_b"] == 0, log[-6000:]
    stage_log = (workdir / "results" / "logs" / "distill" / "demo_ipc1_exact.log").read_text()
    resumed = re.search(r"resuming from \S+checkpoint-\w+\.pt at iteration (\d+)", stage_log)
    assert resumed and int(resumed.group(1)) >= 5, stage_log[-3000:]
    assert (workdir / "results" / "demo_ipc1" / "exact" / "synthetic.h5").exists()
    assert not list((workdir / "results" / "demo_ipc1" / "exact").glob("checkpoint-*.pt"))


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
    runs = sorted(str(p) for p in (workdir / "results" / "demo_ipc1" / "eval").glob("*.csv"))
    experts = sorted(str(p) for p in (workdir / "results" / "demo" / "experts" / "split").glob("expert_*.h5"))
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
# Snakemake itself killed (SIGKILL) while its jobs run: docs/slurm.md's steps, one by one
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def killed(demo):
    """Run K (after the demo runs, on their data and experts): the distillation of IPC 3,
    whose Snakemake is killed with SIGKILL once the job has written a checkpoint. Then
    docs/slurm.md's steps, each recorded: the same command (the lock), what is left (`pgrep`,
    docs/slurm.md's `squeue`), `--unlock`, the same command with the old job still queued,
    `scancel`, the same command."""
    workdir = demo["workdir"]
    profile = workdir / "profile-local"
    command = ["--configfile", "small.yaml", "--retries", "0", "results/demo_ipc3/exact/synthetic.h5"]
    log_k = workdir / "run_k.log"
    proc = start_slurm(workdir, profile, log_k, *command)
    try:
        job = distill_job_with_checkpoint(proc, log_k, workdir / "results" / "demo_ipc3" / "exact")
        proc.kill()  # SIGKILL: no clean-up, as after a power cut of the login node
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert job is not None, "the distillation never wrote a checkpoint while running:\n" + log_k.read_text()[-5000:]
    # the old job goes on without its Snakemake; suspended (as root) so that it cannot end
    # while the steps below run, however slow the machine
    subprocess.run(["scontrol", "suspend", job], check=True, timeout=60)
    steps = {"pid": proc.pid, "job": job, "workdir": workdir}
    start = time.monotonic()
    try:
        steps["locked"] = run_slurm(workdir, profile, *command)
        steps["pgrep"] = subprocess.run(["pgrep", "-af", "snakemake"], capture_output=True, text=True).stdout
        steps["squeue"] = jobs_in(workdir)
        steps["unlock"] = run_slurm(workdir, profile, *command, "--unlock")
        steps["old job queued"] = run_slurm(workdir, profile, *command, timeout=300)
        subprocess.run(["scancel", job], check=True, timeout=60)
        deadline = time.monotonic() + 60
        while job in jobs_in(workdir) and time.monotonic() < deadline:
            time.sleep(0.5)
        steps["rerun"] = run_slurm(workdir, profile, *command)
    finally:
        cancel_jobs_in(workdir)
    print(f"slurm kill: docs/slurm.md's steps and the rerun {time.monotonic() - start:.0f} s")
    return steps


def test_killed_snakemake_leaves_its_lock_and_its_jobs(killed):
    locked = killed["locked"]
    assert locked.returncode != 0
    assert "Directory cannot be locked" in locked.stderr and "--unlock" in locked.stderr, locked.stderr[-3000:]
    assert not re.search(rf"^{killed['pid']} ", killed["pgrep"], re.MULTILINE)  # the old Snakemake is gone
    assert killed["squeue"] == {killed["job"]: "SUSPENDED"}  # ... its job is not
    assert "Unlocked working directory" in killed["unlock"].stdout + killed["unlock"].stderr


def test_jobs_of_the_killed_run_stop_the_next_run_before_it_submits(killed):
    """After --unlock, the same command refuses to run beside the old run's job (both would
    write the same files), naming it and how to cancel it."""
    result = killed["old job queued"]
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    job = killed["job"]
    assert "jobs of an earlier run of this workflow are still queued or running" in log, log[-3000:]
    assert f"SLURM job {job}, rule distill (demo_3_exact): SUSPENDED" in log and f"scancel {job}" in log, log[-3000:]
    assert "has been submitted with SLURM jobid" not in log


def test_after_scancel_the_same_command_resumes_and_redoes_nothing_else(killed):
    result, workdir = killed["rerun"], killed["workdir"]
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert job_counts(log) == {"distill": 1}  # data and experts are reused
    stage_log = (workdir / "results" / "logs" / "distill" / "demo_ipc3_exact.log").read_text()
    resumed = re.search(r"resuming from \S+checkpoint-\w+\.pt at iteration (\d+)", stage_log)
    assert resumed and int(resumed.group(1)) >= 5, stage_log[-3000:]
    assert (workdir / "results" / "demo_ipc3" / "exact" / "synthetic.h5").exists()
    assert sacct_when_final([killed["job"]])[killed["job"]]["State"].startswith("CANCELLED")


def _prepared(folder: Path) -> Path:
    """A workdir with the small demo config whose data is prepared locally."""
    workdir = make_workdir(folder)
    (workdir / "small.yaml").write_text(yaml.safe_dump(SMALL_DEMO, sort_keys=False))
    prepared = snakemake(workdir, "resources/demo/train.h5", "--workflow-profile", "none", "--cores", "1",
                         "--configfile", "small.yaml")
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def prepared_workdir(cluster, tmp_path_factory):
    """A workdir whose data is prepared (locally): the expert jobs come first."""
    workdir = _prepared(tmp_path_factory.mktemp("wf-slurm-prepared"))
    yield workdir
    cancel_jobs_in(workdir)


def test_ctrl_c_cancels_the_jobs_and_leaves_no_lock(prepared_workdir):
    """Ctrl-C (SIGINT to the terminal's process group) once a job is submitted: Snakemake
    cancels it (`scancel`) and removes its lock, so the same command runs again at once."""
    workdir = prepared_workdir
    profile = write_profile(workdir / "profile-local", local_profile(shipped_profile()))
    log_c = workdir / "run_c.log"
    proc = start_slurm(workdir, profile, log_c, "results/demo/experts/split/expert_0.h5", "--configfile", "small.yaml",
                       new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not submissions(log_c.read_text()) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        jobs = list(submissions(log_c.read_text()))
        assert jobs, log_c.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        left = cancel_jobs_in(workdir)
    assert not left, f"Ctrl-C left jobs in the queue: {left}"
    assert sacct_when_final(jobs)[jobs[0]]["State"].startswith("CANCELLED")
    assert not list((workdir / ".snakemake" / "locks").glob("*")), "Ctrl-C left Snakemake's lock"


#: an evaluation long enough to be stopped mid-run, saving its state every second
LONG_EVALUATION = {"datasets": {"demo": {**SMALL_DEMO["datasets"]["demo"], "evaluate": {
    "architectures": ["convnet_d1"], "runs": 2, "epochs": 500, "checkpoint_every": 1}}}}


def test_a_stopped_evaluation_is_retried_and_resumes(prepared_workdir):
    """An evaluation job stopped by the scheduler once it has saved its state (`scancel`,
    which the SLURM plugin reports as it reports a job stopped at its time limit, `TIMEOUT`:
    a failed job) is resubmitted by the same Snakemake run (`retries`) and continues from its
    checkpoint instead of epoch 0."""
    workdir = prepared_workdir
    profile = write_profile(workdir / "profile-local", local_profile(shipped_profile()))
    (workdir / "long_eval.yaml").write_text(yaml.safe_dump(LONG_EVALUATION, sort_keys=False))
    target = "results/demo_ipc3/eval/random_convnet_d1.csv"
    log_e = workdir / "run_e.log"
    proc = start_slurm(workdir, profile, log_e, "--configfile", "long_eval.yaml", "--retries", "1", target)
    stopped = None
    try:
        deadline = time.monotonic() + 300
        while stopped is None and time.monotonic() < deadline and proc.poll() is None:
            jobs = [j for j, rule in submissions(log_e.read_text()).items() if rule == "evaluate_random"]
            if jobs and (workdir / f"{target}.ckpt").exists():
                stopped = jobs[0]
                subprocess.run(["scancel", stopped], check=True, timeout=30)
            time.sleep(0.2)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cancel_jobs_in(workdir)
    log = log_e.read_text()
    assert stopped is not None, "the evaluation never saved its state while running:\n" + log[-5000:]
    assert proc.returncode == 0, log[-6000:]
    assert f"SLURM-job '{stopped}' failed, SLURM status is: 'CANCELLED" in log, log[-5000:]
    retried = [j for j, rule in submissions(log).items() if rule == "evaluate_random" and j != stopped]
    assert len(retried) == 1, log[-5000:]
    states = sacct_when_final([stopped, *retried])
    assert states[stopped]["State"].startswith("CANCELLED") and states[retried[0]]["State"] == "COMPLETED"
    stage_log = (workdir / "results" / "logs" / "evaluate" / "demo_ipc3" / "random_convnet_d1.log").read_text()
    resumed = re.search(r"resumed from \S+random_convnet_d1\.csv\.ckpt: run 1/2 at epoch (\d+), run 2/2 at epoch (\d+)",
                        stage_log)
    assert resumed and int(resumed.group(1)) > 0, stage_log[-3000:]
    assert (workdir / target).exists() and not (workdir / f"{target}.ckpt").exists()


@pytest.fixture(scope="module")
def second_prepared_workdir(cluster, tmp_path_factory):
    """Another workdir whose data is prepared (its experts are its own: the tests of the other
    one need theirs still to be made)."""
    workdir = _prepared(tmp_path_factory.mktemp("wf-slurm-two-processes"))
    yield workdir
    cancel_jobs_in(workdir)


def test_a_distillation_over_two_processes_is_one_job_whose_tasks_srun_starts(second_prepared_workdir):
    """`distill.gpus: 2`: one SLURM job asking for 2 tasks, in which srun starts the two ranks
    (a job step of 2 tasks); they form one run (gloo on this node without GPUs) and the set
    records it."""
    workdir = second_prepared_workdir
    profile = write_profile(workdir / "profile-local", local_profile(shipped_profile()))
    two = copy.deepcopy(SMALL_DEMO)
    two["datasets"]["demo"]["distill"][3].update(gpus=2, iterations=6)
    (workdir / "two_processes.yaml").write_text(yaml.safe_dump(two, sort_keys=False))
    target = "results/demo_ipc3/exact/synthetic.h5"
    result = run_slurm(workdir, profile, target, "--configfile", "two_processes.yaml")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    jobs = [j for j, rule in submissions(log).items() if rule == "distill_gpus_demo_ipc3"]
    assert len(jobs) == 1, submissions(log)
    assert sacct_when_final(jobs)[jobs[0]]["State"] == "COMPLETED"
    steps = subprocess.run(["sacct", "-j", jobs[0], "-n", "--parsable2", "-o", "JobIDRaw,NTasks,State"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert any(step.split("|")[1] == "2" and step.split("|")[2] == "COMPLETED" for step in steps), steps
    stage_log = (workdir / "results" / "logs" / "distill" / "demo_ipc3_exact.log").read_text()
    assert "one run over 2 processes (gloo" in stage_log, stage_log[-3000:]
    syn = SyntheticSet.load(workdir / target)
    assert syn.iteration == 6 and syn.settings["world_size"] == 2


# --------------------------------------------------------------------------------------
# bad input: the scheduler's refusal in the Snakemake log, before anything is submitted
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_workdir(cluster, tmp_path_factory):
    workdir = make_workdir(tmp_path_factory.mktemp("wf-slurm-bad"))
    (workdir / "small.yaml").write_text(yaml.safe_dump(SMALL_DEMO, sort_keys=False))
    yield workdir
    cancel_jobs_in(workdir)


def _fails_fast(workdir: Path, profile: dict, target: str, name: str, *extra: str) -> str:
    folder = write_profile(workdir / name, profile)
    args = [target, "--configfile", "small.yaml", "--retries", "0", *extra]
    start = time.monotonic()
    try:
        result = run_slurm(workdir, folder, *args, timeout=180)
    except subprocess.TimeoutExpired:
        # Snakemake was killed: cancel what it left in the queue and its lock, for the next tests
        left = cancel_jobs_in(workdir)
        run_slurm(workdir, folder, *args, "--unlock", timeout=120)
        pytest.fail(f"the run was still going after 180 s, its jobs {left} waiting in the queue")
    finally:
        left = cancel_jobs_in(workdir)
    seconds = time.monotonic() - start
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    assert seconds < 90, f"took {seconds:.0f} s to fail"
    assert not left, f"jobs left in the queue: {left}"
    return log


def _refused_before_submission(log: str, rule: str, message: str) -> None:
    assert "SLURM refuses these requests (sbatch --test-only); nothing was submitted" in log, log[-3000:]
    assert re.search(rf"rule {rule} \(\d+ jobs?: [^)]*\): .*{re.escape(message)}", log), log[-3000:]
    assert "has been submitted with SLURM jobid" not in log


def test_unedited_shipped_profile_fails_before_submission(bad_workdir):
    """profiles/slurm as shipped, with its EDIT-ME placeholders: refused with the valid accounts named."""
    log = _fails_fast(bad_workdir, shipped_profile(), "resources/demo/train.h5", "profile-shipped")
    _refused_before_submission(log, "prepare", "The given account EDIT-ME-account appears to be invalid")
    assert ACCOUNT in re.search(r"Available accounts: (.*)", log).group(1).replace(",", " ").split()
    assert "set by default-resources: slurm_account" in log


def test_unknown_partition_fails_with_the_scheduler_message(bad_workdir):
    log = _fails_fast(bad_workdir, local_profile(shipped_profile(), partition="EDIT-ME-partition"),
                      "resources/demo/train.h5", "profile-bad-partition")
    _refused_before_submission(log, "prepare", "invalid partition specified: EDIT-ME-partition")
    assert "-p EDIT-ME-partition" in log and "default-resources: slurm_account, slurm_partition" in log


def test_gpu_job_on_a_partition_without_gpus_fails_with_the_scheduler_message(prepared_workdir):
    """The profile's `gpu: 1` for the training rules, on the local partition that has no
    GPUs: refused for the expert jobs, before anything runs."""
    profile = local_profile(shipped_profile(), gpu=True)
    assert all(profile["set-resources"][rule]["gpu"] == 1 for rule in GPU_RULES)
    log = _fails_fast(prepared_workdir, profile, "results/demo/experts/split/expert_0.h5", "profile-gpu")
    _refused_before_submission(log, "expert", "Invalid generic resource (gres) specification")
    assert "--gpus=1" in log


def _too_many_cpus() -> dict:
    """The local profile with `cpus_per_task: 16` for the experts, on a node with fewer."""
    cpus = os.cpu_count()
    assert cpus < 16, "the test needs a node with fewer than 16 CPUs"
    profile = local_profile(shipped_profile())
    profile["set-resources"]["expert"]["cpus_per_task"] = 16
    return profile


def test_more_cpus_than_any_node_has_fails_before_submission(prepared_workdir):
    """sbatch would accept this job and leave it PENDING (PartitionConfig) forever; the run
    fails at once instead, naming the profile key and the node's size."""
    log = _fails_fast(prepared_workdir, _too_many_cpus(), "results/demo/experts/split/expert_0.h5", "profile-cpus")
    _refused_before_submission(log, "expert", "Requested node configuration is not available")
    assert "--cpus-per-task=16" in log
    assert (f"cpus_per_task=16 (set-resources: expert: cpus_per_task): the largest node of partition "
            f"{PARTITION} has {os.cpu_count()} CPUs") in log, log[-3000:]


def test_job_pending_for_a_reason_that_never_clears_is_cancelled_and_reported(prepared_workdir, monkeypatch):
    """The same request with the pre-submission check off (TESLA_SLURM_TEST_ONLY=0): sbatch
    accepts it, the job pends with reason PartitionConfig, and the run's watcher cancels it,
    so that Snakemake reports it failed instead of waiting."""
    monkeypatch.setenv("TESLA_SLURM_TEST_ONLY", "0")
    log = _fails_fast(prepared_workdir, _too_many_cpus(), "results/demo/experts/split/expert_0.h5", "profile-cpus-watch")
    job = next(j for j, rule in submissions(log).items() if rule == "expert")
    assert re.search(rf"SLURM job {job}, rule expert \(demo_split_0\) was pending with reason PartitionConfig, "
                     rf"which never clears by itself: .*set-resources: expert:", log), log[-3000:]
    assert f"SLURM-job '{job}' failed, SLURM status is: 'CANCELLED" in log and "Error in rule expert" in log
    assert sacct_when_final([job])[job]["State"].startswith("CANCELLED")
