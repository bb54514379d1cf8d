"""The workflow with `select: validation`: which jobs a dry run plans, their commands, and the
refusal of a row that asks for it without a validation split."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from workflow_support import ROOT, SNAKEMAKE, load_config, make_workdir, planned_jobs, snakemake, write_config

pytestmark = pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed in this environment")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return make_workdir(tmp_path_factory.mktemp("selection"))


def _selecting(cfg: dict, per_class: int = 5) -> dict:
    demo = cfg["datasets"]["demo"]
    demo["validation_per_class"] = per_class
    demo["distill"][1].update(select="validation", keep_every=50)
    return cfg


def _dry_run(workdir: Path, cfg: dict, *targets: str, cores: int = 1):
    write_config(workdir, cfg, "edited.yaml")
    return snakemake(workdir, *targets, "--dry-run", "--printshellcmds", "--cores", str(cores), "--configfile", "edited.yaml")


def test_select_validation_holds_out_a_split_keeps_sets_and_selects_by_it(workdir):
    result = _dry_run(workdir, _selecting(load_config(workdir)), "results/demo_ipc1/acc.csv", "results/demo_ipc3/acc.csv")
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    jobs = planned_jobs(text)
    assert "prepare" not in jobs and "resources/demo/val.h5" in jobs["prepare_validation"]
    assert "--validation-per-class 5" in next(line for line in text.splitlines() if "tesla prepare " in line)
    # the select: validation row keeps its sets; the other row distils and evaluates as before
    assert "results/demo_ipc1/exact/synthetic.kept" in jobs["distill_kept"]
    assert {f for f in jobs["distill"] if f.endswith("synthetic.h5")} == {"results/demo_ipc3/exact/synthetic.h5"}
    archs = load_config(workdir)["datasets"]["demo"]["evaluate"]["architectures"]
    assert jobs["evaluate_selected"] == {f"results/demo_ipc1/eval/exact_{a}{s}" for a in archs for s in (".csv", ".sets.csv")}
    assert jobs["evaluate_synthetic"] == {f"results/demo_ipc3/eval/exact_{a}.csv" for a in archs}
    lines = text.splitlines()
    distill_1 = next(line for line in lines if "tesla distill " in line and "demo_ipc1/" in line)
    distill_3 = next(line for line in lines if "tesla distill " in line and "demo_ipc3/" in line)
    assert "--keep-every 50" in distill_1 and "--keep-every" not in distill_3
    evaluate_1 = next(line for line in lines if "tesla evaluate --kept-sets" in line)
    assert "--validation resources/demo/val.h5 --select validation --test resources/demo/test.h5" in evaluate_1
    assert "--sets-out results/demo_ipc1/eval/exact_" in evaluate_1


def test_select_final_plans_what_it_always_planned(workdir):
    """The default: no validation split, no kept sets, the plain rules and commands."""
    plain = _dry_run(workdir, load_config(workdir), "results/demo_ipc1/acc.csv")
    assert plain.returncode == 0, plain.stderr
    jobs = planned_jobs(plain.stdout)
    assert {"prepare", "distill", "evaluate_synthetic"} <= set(jobs)
    assert not {"prepare_validation", "distill_kept", "evaluate_selected"} & set(jobs)
    assert "--keep-every" not in plain.stdout and "--validation" not in plain.stdout and "val.h5" not in plain.stdout


def test_select_validation_without_a_validation_split_is_refused_naming_the_key(workdir):
    result = _dry_run(workdir, _selecting(load_config(workdir), per_class=0), "results/demo_ipc1/acc.csv")
    assert result.returncode != 0
    assert ("config key datasets.demo.distill.1.select: validation needs a validation split, but "
            "datasets.demo.validation_per_class is 0") in result.stderr + result.stdout


def test_under_the_slurm_profile_the_selection_rules_ask_for_what_their_plain_rules_get(workdir):
    """The profile's set-resources and set-threads name the plain rules (prepare, distill,
    evaluate_synthetic); the rules standing in for them on select: validation rows get the same
    (the threads are above what the rules declare on a CPU: 4 for prepare, 1 for the others)."""
    shutil.copytree(ROOT / "profiles", workdir / "profiles", dirs_exist_ok=True)
    profile = yaml.safe_load((workdir / "profiles" / "slurm" / "config.yaml").read_text())
    result = _dry_run(workdir, _selecting(load_config(workdir)), "results/demo_ipc1/acc.csv",
                      "--workflow-profile", "profiles/slurm", cores=32)  # cores for the profile's threads
    assert result.returncode == 0, result.stdout + result.stderr
    for rule, plain in (("prepare_validation", "prepare"), ("distill_kept", "distill"), ("evaluate_selected", "evaluate_synthetic")):
        job = re.search(rf"^rule {rule}:\n((?:[ \t]+.*\n)+)", result.stdout, re.MULTILINE).group(1)
        asked = dict(kv.split("=", 1) for kv in re.search(r"resources: (.*)", job).group(1).split(", "))
        for key, value in profile["set-resources"][plain].items():
            assert asked[key] == str(value), (rule, key)
        assert re.search(r"threads: (\d+)", job).group(1) == str(profile["set-threads"][plain]), rule


def test_the_rules_of_select_validation_describe_themselves(workdir):
    """`snakemake --list-rules` describes prepare_validation as itself, not as the prepare rule it is made from."""
    result = snakemake(workdir, "--list-rules")
    assert result.returncode == 0, result.stderr
    described = {line.split(" ", 1)[0]: line for line in result.stdout.splitlines() if line[:1].isalpha()}
    assert described["prepare_validation"].startswith("prepare_validation (") and "val.h5" in described["prepare_validation"]
    assert "val.h5" not in described["prepare"]
