"""The SLURM checks of a Snakemake run: the glue between the running workflow (its jobs, the
executor plugin's own sbatch builder, the profile's resources) and :mod:`tesla.slurm`, which
asks the scheduler and knows neither Snakemake nor the workflow's rules. The Snakefile's
event handlers call it with Snakemake's ``workflow`` object; nothing happens unless the
run's executor is slurm (``--workflow-profile profiles/slurm``).

What it reads of the running Snakemake, and through what:

* the executor plugin, the working directory and the status-check period:
  ``workflow.executor_plugin``, ``.workdir_init``, ``.remote_execution_settings`` (the
  workflow interface of snakemake-interface-executor-plugins); each job's ``name``,
  ``is_local``, ``resources``, ``threads``, ``output`` (its job interface);
* Snakemake's own objects where no documented interface answers: the jobs the run will
  submit (``workflow.dag.needrun_jobs()``, each job's ``group``) and the executor that
  will submit them (``workflow.scheduler.get_executor``, its ``run_uuid``);
* the exact sbatch call the plugin will make: the plugin's own builder
  (``snakemake_executor_plugin_slurm.submit_string``, its account and partition checks,
  ``workflow.executor_settings``), so that ``sbatch --test-only`` tests what will be
  submitted; a plugin whose builder differs skips this check with a warning;
* the profile, for the messages: :func:`profile_settings.profile_settings`.

Before the first submission (:func:`guard_run`, onstart), the run stops with the reason when

1. jobs of an earlier run of this workflow are still queued or running in this directory
   (its Snakemake was killed): they would write the files this run writes;
2. the scheduler refuses a request of the jobs to run: each distinct request (the sbatch
   call the plugin will make) goes once through ``sbatch --test-only``, so a request that no
   node of its partition can ever meet fails here, with the scheduler's message, the rule and
   the profile keys to change, instead of waiting in the queue forever
   (``TESLA_SLURM_TEST_ONLY=0`` in the environment skips this check).

While the run goes on,

3. a watcher (one ``squeue`` every seconds-between-status-checks) cancels and reports any job
   of the run pending for a reason that never clears (PartitionConfig, PartitionTimeLimit,
   BadConstraints, a per-job QOS limit, ...): Snakemake then reports the job failed instead
   of waiting for it (:func:`stop_watches` on success or error).
"""

from __future__ import annotations

import os
import shlex

from profile_settings import ProfileSettings, profile_settings
from rule_names import profile_rule
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger as _logger

from tesla.slurm import PendingWatch, earlier_jobs, largest_node, refusal

#: the pending-job watchers started by onstart (one per run)
_WATCHES = []
#: resources that shape an sbatch request (named in messages)
_REQUEST_KEYS = ("slurm_account", "slurm_partition", "cpus_per_task", "cpus_per_gpu", "mem_mb", "mem_mb_per_cpu",
               "runtime", "gpu", "gpu_model", "gres", "constraint", "nodes", "tasks", "slurm_extra")
#: sbatch options that name a job rather than ask for resources (left out of messages)
_NOT_A_REQUEST = {"--job-name", "--output", "--comment", "-D", "--wrap"}


def _slurm_jobs(workflow):
    """(the SLURM executor, the jobs it will submit), or (None, []) when the run does not
    use SLURM. Group jobs are left out (their request is the group's)."""
    plugin = workflow.executor_plugin
    if plugin is None or plugin.name != "slurm" or getattr(workflow, "scheduler", None) is None:
        return None, []
    jobs = [job for job in workflow.dag.needrun_jobs() if not job.is_local and job.group is None]
    executor = workflow.scheduler.get_executor(jobs[0]) if jobs else None
    return executor, jobs


def _sbatch_call(workflow, executor, job, accounts: dict) -> list[str]:
    """The sbatch call the plugin will make for `job` (argv), with a fixed job name, log and
    comment so that equal requests give equal calls. The account goes through the plugin's
    own check (once per value): a WorkflowError names the accounts you have."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from snakemake_executor_plugin_slurm.validation import validate_slurm_extra

    validate_slurm_extra(job)
    account = job.resources.get("slurm_account")
    if account not in accounts:
        try:
            accounts[account] = next(executor.get_account_arg(job))
        except WorkflowError as exc:
            accounts[account] = exc
    if isinstance(accounts[account], WorkflowError):
        raise accounts[account]
    params = {
        "run_uuid": "tesla-test-only",
        "slurm_logfile": os.devnull,
        "comment_str": "tesla-test-only",
        "account": accounts[account],
        "partition": executor.get_partition_arg(job),
        "workdir": workflow.workdir_init,
    }
    call = get_submit_command(job, params, settings=workflow.executor_settings) + set_gres_string(job)
    return shlex.split(call) + ["--wrap", "true"]


def _shown_request(call) -> str:
    """'-A ci -p debug -t 10 --mem 1000 ... --cpus-per-task=16' of a full sbatch call."""
    shown, skip = [], False
    for word in call[1:]:
        if skip:
            skip = False
        elif word in _NOT_A_REQUEST:
            skip = True
        elif word not in ("--parsable", "--export=ALL", "--requeue", "--no-requeue"):
            shown.append(word)
    return " ".join(shown)


def _where_set(profile: ProfileSettings, rule: str, keys) -> str:
    """Where each resource comes from: 'set-resources: expert: cpus_per_task, mem_mb;
    default-resources: slurm_account'."""
    rule = profile_rule(rule)
    groups = {}
    for key in keys:
        if key in profile.resources(rule):
            where = f"set-resources: {rule}:"
        elif key in profile.default_keys:
            where = "default-resources:"
        else:
            where = f"the resources of rule {rule} (workflow/rules/*.smk; override under `set-resources: {rule}:`):"
        groups.setdefault(where, []).append(key)
    return "; ".join(f"{where} {', '.join(found)}" for where, found in groups.items())


def _beyond_largest_node(profile: ProfileSettings, job, call) -> list[str]:
    """The CPU and memory requests of `job` above the largest node of the partition its
    sbatch `call` names (of the cluster when it names none)."""
    partition = call[call.index("-p") + 1] if "-p" in call else None
    node = largest_node(partition)
    if node is None:
        return []
    where = f"partition {partition}" if partition else "the cluster"
    key = "cpus_per_task" if job.resources.get("cpus_per_task") else "threads"
    cpus = job.resources.get("cpus_per_task") or job.threads
    found = []
    if isinstance(cpus, int) and cpus > node[0]:
        found.append(f"{key}={cpus} ({_where_set(profile, job.name, [key])}): the largest node of {where} has {node[0]} CPUs")
    mem = job.resources.get("mem_mb")
    if isinstance(mem, int) and mem > node[1]:
        found.append(f"mem_mb={mem} ({_where_set(profile, job.name, ['mem_mb'])}): the largest node of {where} has {node[1]} MB")
    return found


def _refusals(workflow, executor, jobs, profile: ProfileSettings) -> list[str]:
    """What the scheduler refuses among the requests of `jobs`, one paragraph per refused
    request. One `sbatch --test-only` per distinct request, whatever the number of jobs."""
    accounts, requests = {}, {}
    for job in jobs:
        try:
            call = tuple(_sbatch_call(workflow, executor, job, accounts))
        except WorkflowError as exc:  # refused before sbatch (the plugin's account check)
            call = " ".join(str(exc).split())
        if isinstance(call, tuple) and any("<TBD>" in word for word in call):
            continue  # a resource computed from inputs not made yet: known at submission
        requests.setdefault(call, []).append(job)
    problems = []
    for call, same in requests.items():
        message = call if isinstance(call, str) else refusal(call)
        if message is None:
            continue
        rules = list(dict.fromkeys(job.name for job in same))
        outputs = [str(job.output[0]) for job in same[:3] if job.output] + (["..."] if len(same) > 3 else [])
        lines = [f"rule {', '.join(rules)} ({len(same)} job{'s' if len(same) > 1 else ''}: {', '.join(outputs)}): {message}"]
        if isinstance(call, tuple):
            lines.append(f"    request: {_shown_request(call)}")
            lines += [f"    {line}" for line in _beyond_largest_node(profile, same[0], call)]
        for rule in rules:
            job = next(j for j in same if j.name == rule)
            keys = ["slurm_account"] if isinstance(call, str) else [k for k in _REQUEST_KEYS if k in job.resources.keys()]
            lines.append(f"    {'rule ' + rule + ': ' if len(rules) > 1 else ''}set by {_where_set(profile, rule, keys)}")
        problems.append("\n".join(lines))
    return problems


def guard_run(workflow) -> None:
    """Checks 1 and 2 (raising WorkflowError), then start the watcher (3); nothing when the
    run's executor is not slurm."""
    executor, jobs = _slurm_jobs(workflow)
    if executor is None:
        return
    try:
        left = earlier_jobs(workflow.workdir_init, workflow.executor_settings.jobname_prefix, executor.run_uuid)
    except RuntimeError as exc:  # squeue failed: the scheduler is not answering
        raise WorkflowError(f"cannot list your SLURM jobs before submitting: {exc}") from None
    if left:
        listed = "\n  ".join(f"{job.describe()}: {job.state} (run {job.name})" for job in left)
        raise WorkflowError(
            f"jobs of an earlier run of this workflow are still queued or running in {workflow.workdir_init} "
            f"(its Snakemake was stopped without cancelling them):\n  {listed}\n"
            f"They write the files this run would write. Cancel them (`scancel {' '.join(j.job_id for j in left)}`: "
            f"a cancelled distillation or expert resumes from its checkpoint in the next run) or wait until they "
            f"end (`squeue --me -o '%.10i %.10T %.10M %Z %k'` lists them), then run this command again."
        )
    if os.environ.get("TESLA_SLURM_TEST_ONLY", "1") != "0":
        try:
            problems = _refusals(workflow, executor, jobs, profile_settings(workflow))
        except (ImportError, AttributeError, TypeError) as exc:  # another plugin version
            _logger.warning(f"sbatch --test-only check skipped: this executor plugin differs from 2.8 ({exc!r})")
            problems = []
        if problems:
            raise WorkflowError(
                "SLURM refuses these requests (sbatch --test-only); nothing was submitted:\n  "
                + "\n  ".join(problems)
                + "\nChange them in the profile (config.yaml of the --workflow-profile folder) and run again."
            )
    watch = PendingWatch(
        executor.run_uuid,
        period=workflow.remote_execution_settings.seconds_between_status_checks,
        on_cancelled=_logger.error,
        on_doubtful=_logger.warning,
        profile_key=profile_rule,
    )
    watch.start()
    _WATCHES.append(watch)


def stop_watches() -> None:
    """Stop the pending-job watchers of this run (onsuccess, onerror)."""
    for watch in _WATCHES:
        watch.stop()
