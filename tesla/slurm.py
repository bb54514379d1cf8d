"""The SLURM scheduler, asked directly: what Snakemake's SLURM executor never asks it.

The executor plugin submits every job with ``sbatch`` and polls ``squeue``; it takes any
job that ``sbatch`` accepted as one that will run. SLURM accepts more than it can run: with
its default ``EnforcePartLimits=NO`` a job asking for more CPUs than any node of its
partition has is queued, PENDING with the reason ``PartitionConfig``, and Snakemake would
wait for it forever. This module asks the scheduler three questions, each with one
command whatever the number of jobs:

* :func:`refusal`: could this request ever run? ``sbatch --test-only`` answers without
  queueing anything (one call per distinct request of a run, before its first submission);
* :class:`PendingWatch`: which jobs of a run are pending for a reason that never clears
  (:func:`never_clears`)? One ``squeue`` per round; such a job is cancelled, so that
  Snakemake reports it failed, and reported with what to change;
* :func:`earlier_jobs`: are jobs of an earlier run still queued or running in this
  directory (their Snakemake was killed)? They would write the files a new run writes.

Nothing here knows Snakemake or the workflow's rules: jobs are told apart by the job name
the plugin gives every job of a run (``<prefix>_<run uuid>``), their comment
(``rule_<rule>_wildcards_<...>``) and their working directory. The workflow calls it through
workflow/lib/slurm_glue.py, its glue with the running Snakemake.
"""

from __future__ import annotations

import re
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

__all__ = [
    "QueuedJob",
    "PendingWatch",
    "earlier_jobs",
    "largest_node",
    "may_never_clear",
    "never_clears",
    "queued_jobs",
    "refusal",
    "run_job_name",
]

#: seconds any one scheduler command may take before it counts as not answering
COMMAND_TIMEOUT = 60

#: Pending reasons (squeue(1), JOB REASON CODES) that no amount of waiting clears: the
#: request is beyond what the partition, the QOS or the association allows any one job,
#: and only a changed request (or an administrator changing the limits) lets it run.
NEVER_CLEARS = frozenset(
    {
        "PartitionConfig",  # more CPUs/memory/GPUs/nodes than the partition's nodes have
        "PartitionTimeLimit",  # a time limit above the partition's MaxTime
        "BadConstraints",  # features (constraint) that no node has
        "InvalidAccount",
        "InvalidQOS",
        "DependencyNeverSatisfied",
    }
)
#: ... and the per-job limits of a QOS or an association (QOSMaxCpuPerJobLimit,
#: AssocMaxWallDurationPerJobLimit, QOSMinGRES, ...): unlike their per-user or per-group
#: siblings (QOSMaxCpuPerUserLimit, AssocGrpCpuLimit), they do not clear when other jobs end.
_PER_JOB_LIMIT = re.compile(r"^(Assoc|QOS)Max\w*PerJob\w*$|^QOSMin\w+$")

#: Pending reasons that may clear by themselves (a node back from maintenance, a partition
#: brought up, a hold released) but often do not: reported once per job, never cancelled.
MAY_NEVER_CLEAR = frozenset(
    {
        "PartitionNodeLimit",  # more nodes than the partition allows, or its nodes are DOWN/DRAINED
        "ReqNodeNotAvail",  # required nodes down, drained or reserved (maintenance)
        "PartitionDown",
        "PartitionInactive",
        "NodeDown",
        "JobHeldAdmin",
        "launch failed requeued held",  # the job failed to start; held until released
    }
)

#: what to look at in the profile for each reason that never clears
_HINTS = {
    "PartitionConfig": (
        "it asks for more than any node of partition {partition} has: lower cpus_per_task, mem_mb "
        "or gpu/gres under `set-resources: {rule}:` in the profile "
        "(`sinfo -N -p {partition} -o '%N %c %m %G'` lists what each node has)"
    ),
    "PartitionTimeLimit": (
        "its runtime is above the time limit of partition {partition}: lower `runtime` under "
        "`set-resources: {rule}:` in the profile or choose another slurm_partition "
        "(`sinfo -p {partition} -o '%P %l'` shows the limit)"
    ),
    "BadConstraints": (
        "no node of partition {partition} has the features it asks for: fix `constraint` under "
        "`set-resources: {rule}:` in the profile (`sinfo -p {partition} -o '%N %f'` lists them)"
    ),
    "InvalidAccount": "fix slurm_account in the profile (`sacctmgr -n show assoc user=$USER format=account`)",
    "InvalidQOS": "fix the qos in the profile (`sacctmgr -n show assoc user=$USER format=qos`)",
}
_PER_JOB_HINT = (
    "it asks for more than the per-job limit of its QOS or account allows: lower the request under "
    "`set-resources: {rule}:` in the profile (`sacctmgr show qos`, `sacctmgr show assoc user=$USER` "
    "show the limits)"
)

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
#: squeue fields, `|`-separated; the comment last (the only free text)
_SQUEUE_FORMAT = "%i|%j|%T|%P|%Z|%r|%k"
#: states of a job that holds or will hold resources and can still write files
ACTIVE_STATES = ("PENDING", "RUNNING", "SUSPENDED", "CONFIGURING")


# --------------------------------------------------------------------------------------
# the scheduler's commands
# --------------------------------------------------------------------------------------
def _run(argv: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT)


def _message(text: str) -> str:
    """The scheduler's lines as one line ('sbatch: error: ...; allocation failure: ...')."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def refusal(sbatch_call: Sequence[str]) -> str | None:
    """None when the scheduler would accept this job, else its message.

    ``sbatch_call`` is a complete submission (``sbatch ... --wrap ...``); it is run with
    ``--test-only``, which makes the controller check the request against its partitions,
    nodes, accounts and limits and say when it would start, without queueing anything.
    A request no node can ever meet is refused ("Requested node configuration is not
    available"); one that only has to wait is accepted.
    """
    try:
        done = _run([*sbatch_call, "--test-only"])
    except subprocess.TimeoutExpired:
        return f"the controller did not answer `sbatch --test-only` within {COMMAND_TIMEOUT} s (`scontrol ping`)"
    if done.returncode == 0:
        return None
    return _message(done.stderr + done.stdout) or f"sbatch --test-only exited with status {done.returncode}"


def largest_node(partition: str | None) -> tuple[int, int] | None:
    """(CPUs, memory in MB) of the largest node of a partition (of the cluster for None),
    each the maximum over the nodes; None when sinfo does not say."""
    argv = ["sinfo", "-h", "-N", "-o", "%c %m"] + (["-p", partition] if partition else [])
    try:
        done = _run(argv)
    except (OSError, subprocess.TimeoutExpired):
        return None
    sizes = [re.fullmatch(r"(\d+)\+? (\d+)\+?", line.strip()) for line in done.stdout.splitlines()]
    sizes = [(int(m[1]), int(m[2])) for m in sizes if m]
    if done.returncode != 0 or not sizes:
        return None
    return max(c for c, _ in sizes), max(m for _, m in sizes)


@dataclass(frozen=True)
class QueuedJob:
    """One line of ``squeue``."""

    job_id: str
    name: str
    state: str
    partition: str
    workdir: str
    reason: str
    comment: str

    @property
    def rule(self) -> str:
        """The rule the job runs, as the comment the executor plugin gives every job names it."""
        return self.comment.removeprefix("rule_").split("_wildcards_", 1)[0]

    @property
    def wildcards(self) -> str:
        parts = self.comment.split("_wildcards_", 1)
        return parts[1] if len(parts) == 2 else ""

    @property
    def reason_code(self) -> str:
        """'ReqNodeNotAvail' of 'ReqNodeNotAvail, UnavailableNodes:n[1-3]'."""
        return self.reason.split(",", 1)[0].strip()

    def describe(self) -> str:
        wildcards = f" ({self.wildcards})" if self.wildcards else ""
        return f"SLURM job {self.job_id}, rule {self.rule}{wildcards}"


def queued_jobs(*selection: str) -> list[QueuedJob]:
    """The jobs ``squeue <selection>`` lists (e.g. ``--me``, ``--name NAME``, ``-t PENDING``)."""
    done = _run(["squeue", "-h", "-o", _SQUEUE_FORMAT, *selection])
    if done.returncode != 0:
        raise RuntimeError(f"squeue {' '.join(selection)} failed: {_message(done.stderr) or done.returncode}")
    jobs = []
    for line in done.stdout.splitlines():
        fields = line.split("|", 6)
        if len(fields) == 7:
            jobs.append(QueuedJob(*(f.strip() for f in fields)))
    return jobs


def scancel(job_ids: Iterable[str]) -> None:
    ids = list(job_ids)
    if ids:
        _run(["scancel", *ids])


# --------------------------------------------------------------------------------------
# the questions
# --------------------------------------------------------------------------------------
def never_clears(reason: str) -> bool:
    """Whether a job pending for ``reason`` (squeue's %r) can only run once its request changes."""
    code = reason.split(",", 1)[0].strip()
    return code in NEVER_CLEARS or bool(_PER_JOB_LIMIT.match(code))


def may_never_clear(reason: str) -> bool:
    """Whether ``reason`` may or may not clear by itself (worth a warning, not a cancel)."""
    code = reason.split(",", 1)[0].strip()
    return code in MAY_NEVER_CLEAR or reason.strip() in MAY_NEVER_CLEAR


def same_rule(rule: str) -> str:
    """The profile key of a rule that takes its resources under its own name."""
    return rule


def why_never(job: QueuedJob, profile_key: Callable[[str], str] = same_rule) -> str:
    """What the reason of a job that never starts means and what to change; ``profile_key``
    names the `set-resources` key that holds the request of the job's rule."""
    code = job.reason_code
    hint = _HINTS.get(code) or (_PER_JOB_HINT if _PER_JOB_LIMIT.match(code) else "its request must change")
    return hint.format(partition=job.partition, rule=profile_key(job.rule))


def run_job_name(prefix: str | None) -> re.Pattern:
    """The job names the executor plugin gives the jobs of any run: ``<prefix>_<uuid>``."""
    return re.compile(rf"^{re.escape(prefix)}_{_UUID}$" if prefix else rf"^{_UUID}$")


def earlier_jobs(workdir: str | Path, prefix: str | None, this_run: str | None = None) -> list[QueuedJob]:
    """Your queued or running jobs that an earlier run of the workflow submitted in
    ``workdir`` (same job-name pattern, same working directory, another run name)."""
    pattern = run_job_name(prefix)
    here = Path(workdir).resolve()
    return [
        j
        for j in queued_jobs("--me", "-t", ",".join(ACTIVE_STATES))
        if pattern.match(j.name) and j.name != this_run and j.workdir and Path(j.workdir).resolve() == here
    ]


class PendingWatch(threading.Thread):
    """Watch the pending jobs of one run (the jobs named ``run_name``) every ``period`` s.

    Each round is one ``squeue --name RUN -t PENDING``. A job pending for a reason that
    never clears (:func:`never_clears`) is cancelled with ``scancel`` and ``on_cancelled``
    gets the message to show (the executor then sees the job CANCELLED and reports it
    failed). Jobs newly seen pending for a reason that may never clear
    (:func:`may_never_clear`) are left alone and listed once, in one message per round, to
    ``on_doubtful``. A round that fails (the controller does not answer) is skipped.
    ``profile_key`` maps a job's rule to the `set-resources` key the messages name (the rule
    itself unless the caller knows better).
    """

    def __init__(
        self,
        run_name: str,
        period: float,
        on_cancelled: Callable[[str], None],
        on_doubtful: Callable[[str], None],
        profile_key: Callable[[str], str] = same_rule,
    ):
        super().__init__(name=f"slurm-pending-watch-{run_name}", daemon=True)
        self.run_name = run_name
        self.period = period
        self.on_cancelled = on_cancelled
        self.on_doubtful = on_doubtful
        self.profile_key = profile_key
        self._stop_event = threading.Event()
        self._reported: set[tuple[str, str]] = set()

    def check(self) -> list[QueuedJob]:
        """One round; returns the jobs it cancelled."""
        pending = queued_jobs("--name", self.run_name, "-t", "PENDING")
        hopeless = [j for j in pending if never_clears(j.reason)]
        scancel(j.job_id for j in hopeless)
        for job in hopeless:
            self.on_cancelled(
                f"{job.describe()} was pending with reason {job.reason_code}, which never clears by itself: "
                f"{why_never(job, self.profile_key)}. The job was cancelled so that the run does not wait for it forever."
            )
        doubtful = [
            j for j in pending if may_never_clear(j.reason) and (j.job_id, j.reason_code) not in self._reported
        ]
        if doubtful:
            self._reported.update((j.job_id, j.reason_code) for j in doubtful)
            listed = "; ".join(f"{j.describe()}: '{j.reason}' (partition {j.partition})" for j in doubtful)
            self.on_doubtful(
                f"pending for a reason the scheduler may take long to clear, or never: {listed}. They run "
                f"once it clears (`scontrol show job <id>` says more); `scancel <id>` ends the wait and "
                f"Snakemake reports the job failed."
            )
        return hopeless

    def run(self) -> None:
        while not self._stop_event.wait(self.period):
            try:
                self.check()
            except (OSError, RuntimeError, subprocess.TimeoutExpired):
                continue  # the controller did not answer: try again next round

    def stop(self) -> None:
        self._stop_event.set()
