"""tesla.slurm against stand-in scheduler commands (no cluster needed): which pending
reasons count as never clearing, what the watcher cancels and reports, which queued jobs
belong to an earlier run, how `sbatch --test-only` answers are read. And the workflow's side
of it (workflow/lib): the names of the generated rules, the profile keys the messages name,
what is read of the running Snakemake's profile.

The stand-ins (`squeue`, `scancel`, `sbatch`, `sinfo` first on PATH) print what a test
put in a file and record every call, so each test checks the commands issued as well as
the answer. The real scheduler is exercised end to end in tests/test_slurm.py.
Time budget: about 2 s.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tesla import slurm

LIB = Path(__file__).resolve().parents[1] / "workflow" / "lib"

#: one script for the four commands: prints $FAKE_DIR/<command>.out (and .err), exits with
#: $FAKE_DIR/<command>.rc, appends its argv to $FAKE_DIR/calls.jsonl
FAKE = textwrap.dedent(
    """\
    #!{python}
    import json, os, sys
    from pathlib import Path
    d = Path(os.environ["FAKE_DIR"])
    name = Path(sys.argv[0]).name
    with open(d / "calls.jsonl", "a") as fh:
        fh.write(json.dumps([name, *sys.argv[1:]]) + "\\n")
    for suffix, stream in ((".out", sys.stdout), (".err", sys.stderr)):
        if (d / (name + suffix)).exists():
            stream.write((d / (name + suffix)).read_text())
    rc = d / (name + ".rc")
    sys.exit(int(rc.read_text()) if rc.exists() else 0)
    """
)

RUN = "tesla_0b6f3c2e-2f55-4c3f-9d1e-5a8f6b9c1d2e"
EARLIER = "tesla_7d1c1a66-96a2-4f3b-8e51-0c6b2a1f9e40"


@pytest.fixture
def scheduler(tmp_path, monkeypatch):
    """Stand-in scheduler commands; returns a helper to set their answers and read their calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("squeue", "scancel", "sbatch", "sinfo"):
        (bin_dir / name).write_text(FAKE.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    class Scheduler:
        def answer(self, command: str, out: str = "", err: str = "", rc: int = 0) -> None:
            (tmp_path / f"{command}.out").write_text(out)
            (tmp_path / f"{command}.err").write_text(err)
            (tmp_path / f"{command}.rc").write_text(str(rc))

        def calls(self, command: str) -> list[list[str]]:
            log = tmp_path / "calls.jsonl"
            rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
            return [row[1:] for row in rows if row[0] == command]

    return Scheduler()


def squeue_line(job_id, name, state, reason, comment, workdir="/work/run", partition="debug") -> str:
    return f"{job_id}|{name}|{state}|{partition}|{workdir}|{reason}|{comment}\n"


@pytest.mark.parametrize(
    ("reason", "never", "maybe"),
    [
        ("PartitionConfig", True, False),
        ("PartitionTimeLimit", True, False),
        ("BadConstraints", True, False),
        ("InvalidAccount", True, False),
        ("QOSMaxCpuPerJobLimit", True, False),
        ("AssocMaxWallDurationPerJobLimit", True, False),
        ("QOSMinGRES", True, False),
        ("QOSMaxCpuPerUserLimit", False, False),  # clears when the user's other jobs end
        ("AssocGrpCpuLimit", False, False),
        ("Resources", False, False),
        ("Priority", False, False),
        ("None", False, False),
        ("PartitionNodeLimit", False, True),
        ("ReqNodeNotAvail, UnavailableNodes:node[1-3]", False, True),
        ("launch failed requeued held", False, True),
    ],
)
def test_pending_reasons_are_sorted_by_whether_they_can_clear(reason, never, maybe):
    assert slurm.never_clears(reason) is never
    assert slurm.may_never_clear(reason) is maybe


def test_watch_cancels_only_what_can_never_start_and_reports_the_doubtful_once(scheduler):
    scheduler.answer("squeue", out="".join([
        squeue_line("11", RUN, "PENDING", "PartitionConfig", "rule_expert_wildcards_demo_0"),
        squeue_line("12", RUN, "PENDING", "Resources", "rule_expert_wildcards_demo_1"),
        squeue_line("13", RUN, "PENDING", "ReqNodeNotAvail, UnavailableNodes:n1", "rule_distill_wildcards_demo_1"),
        squeue_line("14", RUN, "PENDING", "QOSMaxWallDurationPerJobLimit", "rule_evaluate_synthetic_wildcards_demo_1_convnet"),
        squeue_line("15", RUN, "PENDING", "PartitionTimeLimit", "rule_results"),
    ]))
    errors, warnings = [], []
    watch = slurm.PendingWatch(RUN, period=60, on_cancelled=errors.append, on_doubtful=warnings.append)
    cancelled = watch.check()
    assert [j.job_id for j in cancelled] == ["11", "14", "15"]
    assert scheduler.calls("squeue") == [["-h", "-o", "%i|%j|%T|%P|%Z|%r|%k", "--name", RUN, "-t", "PENDING"]]
    assert scheduler.calls("scancel") == [["11", "14", "15"]]
    assert len(errors) == 3
    assert errors[0].startswith("SLURM job 11, rule expert (demo_0) was pending with reason PartitionConfig")
    assert "partition debug" in errors[0] and "`set-resources: expert:`" in errors[0]
    assert "rule evaluate_synthetic (demo_1_convnet)" in errors[1] and "per-job limit" in errors[1]
    assert errors[2].startswith("SLURM job 15, rule results was pending") and "runtime" in errors[2]
    assert len(warnings) == 1 and "SLURM job 13, rule distill (demo_1)" in warnings[0]
    assert "SLURM job 12" not in " ".join(warnings + errors)
    watch.check()  # the same jobs again: cancelled again, the doubtful one not reported twice
    assert len(warnings) == 1 and len(errors) == 6


def test_watch_thread_survives_a_failed_round_and_stops(scheduler):
    scheduler.answer("squeue", err="slurm_load_jobs error: Socket timed out", rc=1)
    errors = []
    watch = slurm.PendingWatch(RUN, period=0.05, on_cancelled=errors.append, on_doubtful=errors.append)
    watch.start()
    try:
        deadline = time.monotonic() + 20
        while len(scheduler.calls("squeue")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(scheduler.calls("squeue")) >= 2  # the failed round did not end the watch
        scheduler.answer("squeue", out=squeue_line("21", RUN, "PENDING", "BadConstraints", "rule_distill_wildcards_x_1"))
        while not scheduler.calls("scancel") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scheduler.calls("scancel")[0] == ["21"]
    finally:
        watch.stop()
        watch.join(timeout=10)
    assert not watch.is_alive()
    assert "no node of partition debug has the features" in errors[0]


def test_earlier_jobs_are_this_workflows_active_jobs_in_this_directory_from_other_runs(scheduler, tmp_path):
    here = tmp_path / "run"
    here.mkdir()
    scheduler.answer("squeue", out="".join([
        squeue_line("31", EARLIER, "RUNNING", "None", "rule_distill_wildcards_demo_1", workdir=str(here)),
        squeue_line("32", EARLIER, "PENDING", "Priority", "rule_expert_wildcards_demo_0", workdir=str(here) + "/"),
        squeue_line("33", "interactive", "RUNNING", "None", "", workdir=str(here)),  # not the workflow's
        squeue_line("34", EARLIER, "RUNNING", "None", "rule_expert", workdir=str(tmp_path / "elsewhere")),
        squeue_line("35", RUN, "PENDING", "None", "rule_expert", workdir=str(here)),  # this run
        squeue_line("36", "other_" + EARLIER.split("_", 1)[1], "RUNNING", "None", "rule_x", workdir=str(here)),
    ]))
    found = slurm.earlier_jobs(here, "tesla", this_run=RUN)
    assert [j.job_id for j in found] == ["31", "32"]
    assert found[0].describe() == "SLURM job 31, rule distill (demo_1)"
    assert scheduler.calls("squeue") == [["-h", "-o", "%i|%j|%T|%P|%Z|%r|%k", "--me", "-t",
                                          "PENDING,RUNNING,SUSPENDED,CONFIGURING"]]
    # without a job-name prefix the names are bare run ids
    assert slurm.run_job_name(None).match(EARLIER.split("_", 1)[1])
    assert not slurm.run_job_name(None).match(EARLIER)


def test_refusal_is_the_schedulers_message_of_a_test_only_submission(scheduler):
    call = ["sbatch", "--parsable", "-p", "debug", "--cpus-per-task=16", "--wrap", "true"]
    scheduler.answer("sbatch", err="sbatch: error: Batch job submission failed\nallocation failure: "
                     "Requested node configuration is not available\n", rc=1)
    assert slurm.refusal(call) == ("sbatch: error: Batch job submission failed; allocation failure: "
                                   "Requested node configuration is not available")
    scheduler.answer("sbatch", err="sbatch: Job 7 to start at 2030-01-01T00:00:00 using 1 processors\n", rc=0)
    assert slurm.refusal(call) is None
    assert scheduler.calls("sbatch") == [call[1:] + ["--test-only"]] * 2


def test_largest_node_is_the_maximum_over_the_partitions_nodes(scheduler):
    scheduler.answer("sinfo", out="2 21694\n16+ 64000\n8 128000\n")
    assert slurm.largest_node("gpu") == (16, 128000)
    assert scheduler.calls("sinfo") == [["-h", "-N", "-o", "%c %m", "-p", "gpu"]]
    scheduler.answer("sinfo", err="sinfo: error: invalid partition\n", rc=1)
    assert slurm.largest_node("nope") is None


@pytest.fixture
def workflow_lib(monkeypatch):
    """workflow/lib on sys.path, as rules/common.smk puts it."""
    monkeypatch.syspath_prepend(str(LIB))


def test_the_rules_of_expert_groups_take_the_expert_resources_of_the_profile(workflow_lib):
    from rule_names import distill_processes_rule, expert_group_rule, profile_rule

    name = expert_group_rule("cifar10", "none+zca-eps0.1", 4)
    assert name == "expert_group_cifar10_none_zca_eps0_1_4" and name.isidentifier()
    assert profile_rule(name) == "expert" and profile_rule("distill") == "distill"
    assert profile_rule(distill_processes_rule("in1k", 50)) == "distill"
    selection = {"prepare_validation": "prepare", "distill_kept": "distill", "evaluate_selected": "evaluate_synthetic"}
    assert {rule: profile_rule(rule) for rule in selection} == selection


def test_watch_names_the_profile_key_the_workflow_maps_a_rule_to(scheduler, workflow_lib):
    from rule_names import expert_group_rule, profile_rule

    group = expert_group_rule("demo", "split", 0)
    scheduler.answer("squeue", out=squeue_line("41", RUN, "PENDING", "PartitionConfig", f"rule_{group}"))
    plain, mapped = [], []
    slurm.PendingWatch(RUN, period=60, on_cancelled=plain.append, on_doubtful=plain.append).check()
    slurm.PendingWatch(RUN, period=60, on_cancelled=mapped.append, on_doubtful=mapped.append,
                       profile_key=profile_rule).check()
    assert f"`set-resources: {group}:`" in plain[0]  # the package alone knows no rule of the workflow
    assert "`set-resources: expert:`" in mapped[0] and f"rule {group}" in mapped[0]


def test_profile_settings_read_what_snakemake_parsed_from_a_profile(workflow_lib):
    """The one read of Snakemake's resource settings, on the objects its command line makes of
    a profile (`set-resources: expert: {slurm_partition: gpu}` becomes
    `--set-resources expert:slurm_partition=gpu`): the values as the profile writes them."""
    from types import SimpleNamespace

    from profile_settings import profile_settings
    from snakemake.resources import Resource, Resources
    from snakemake.settings.types import ResourceSettings

    # as snakemake.cli's parse_set_resources and parse_set_threads make them (importing
    # snakemake.cli takes seconds)
    settings = ResourceSettings(
        overwrite_resources={"expert": Resources.parse(["mem_mb=8000", "slurm_partition=gpu"], allow_expressions=True)},
        overwrite_threads={"distill": Resource("_cores", 4)},
        default_resources=Resources.parse(["slurm_account='ci'"], defaults="full", allow_expressions=True),
    )
    profile = profile_settings(SimpleNamespace(resource_settings=settings))
    assert profile.resources("expert") == {"mem_mb": 8000, "slurm_partition": "gpu"}
    assert profile.resources("distill") == {}
    assert profile.threads("distill", 1) == 4 and profile.threads("expert", 2) == 2
    assert "slurm_account" in profile.default_keys and "mem_mb" in profile.default_keys


def test_messages_say_which_profile_key_set_a_request(workflow_lib):
    from profile_settings import ProfileSettings
    from rule_names import expert_group_rule
    from slurm_glue import _where_set

    profile = ProfileSettings(set_resources={"expert": {"mem_mb": 8000}}, default_keys=frozenset({"slurm_account"}))
    where = _where_set(profile, expert_group_rule("demo", "split", 0), ["mem_mb", "slurm_account", "runtime"])
    assert where == ("set-resources: expert: mem_mb; default-resources: slurm_account; the resources of rule "
                     "expert (workflow/rules/*.smk; override under `set-resources: expert:`): runtime")
