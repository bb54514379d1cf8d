"""The Snakemake workflow: config validation, the early raw-data check, rerun rules.

Every test works on a copy of workflow/, config/ and envs/ in a temporary folder and runs
the real ``snakemake`` of this environment. Rerun rules need the metadata that Snakemake
records only for jobs it executes, so the workflow is executed once (module fixture) with
a stand-in ``tesla`` command first on PATH that writes each output a stage would write
(the stages themselves are tested in their own files and end to end in
tests/test_workflow_demo.py); then each test edits a copy of the config and asks
``snakemake --dry-run`` which jobs would run.

Time budget: about 30 s on 2 cores.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or shutil.which("snakemake")

pytestmark = pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed in this environment")

#: a stand-in for the `tesla` command: writes the files each stage's options name
FAKE_TESLA = textwrap.dedent(
    """\
    #!{python}
    import sys
    from pathlib import Path

    argv = sys.argv[1:]
    command = argv[0]

    def values(flag):
        out = []
        for i, a in enumerate(argv):
            if a == flag:
                for b in argv[i + 1:]:
                    if b.startswith("--"):
                        break
                    out.append(b)
        return out

    def write(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(" ".join(argv) + "\\n")

    if command == "prepare":
        d = values("--out-dir")[0]
        for name in ("train.h5", "test.h5", "prepare_report.txt"):
            write(f"{{d}}/{{name}}")
    for flag in ("--out", "--metrics", "--curves", "--grid"):
        for path in values(flag):
            write(path)
    for d in values("--grid-dir"):
        write(f"{{d}}/final.png")
    print("fake tesla", *argv)
    """
)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def make_workdir(dest: Path) -> Path:
    """A copy of the workflow, its config and its conda env file."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("workflow", "config", "envs"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", ".snakemake"))
    return dest


def install_fake_tesla(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "tesla"
    script.write_text(FAKE_TESLA.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


def snakemake(workdir: Path, *args: str, path_prefix: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(
        ([str(path_prefix)] if path_prefix else []) + [str(Path(sys.executable).parent), env.get("PATH", "")]
    )
    env.pop("SNAKEMAKE_PROFILE", None)
    return subprocess.run(
        [SNAKEMAKE, *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def load_config(workdir: Path) -> dict:
    return yaml.safe_load((workdir / "config" / "config.yaml").read_text())


def write_config(workdir: Path, cfg: dict, name: str = "config/config.yaml") -> Path:
    path = workdir / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


_JOB = re.compile(r"^rule (\w+):\n((?:[ \t]+.*\n)+)", re.MULTILINE)


def planned_jobs(output: str) -> dict[str, set[str]]:
    """rule -> output files of the jobs a dry run lists (rule 'all' left out)."""
    jobs: dict[str, set[str]] = {}
    for rule, body in _JOB.findall(output):
        if rule == "all":
            continue
        outputs = re.search(r"^\s+output: (.*)$", body, re.MULTILINE)
        files = set(outputs.group(1).split(", ")) if outputs else set()
        jobs.setdefault(rule, set()).update(files)
    return jobs


def dry_run(workdir: Path, cfg: dict | None = None, *targets: str) -> dict[str, set[str]]:
    args = [*targets, "--dry-run", "--cores", "1"]
    if cfg is not None:
        write_config(workdir, cfg, "edited.yaml")
        args += ["--configfile", "edited.yaml"]
    result = snakemake(workdir, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return planned_jobs(result.stdout + result.stderr)


# --------------------------------------------------------------------------------------
# (a) config validation
# --------------------------------------------------------------------------------------
#: schema violations, all in one config (every problem is reported at once):
#: edit -> texts that must appear in the error
SCHEMA_BREAKAGES = {
    "unknown key": ["config key datasets.demo.experts.epoch: unknown key", "epochs"],
    "wrong type": ["config key datasets.demo.experts.lr: 'fast' is not of type 'number'"],
    "negative ipc": ["config key datasets.demo.distill.-1: invalid key name", "positive integer"],
    "zero runs": ["config key datasets.demo.evaluate.runs: 0 is less than the minimum of 1"],
    "unknown top-level key": ["config key device_name: unknown key"],
    "bad source": ["config key datasets.demo.source: 'imagenet21k' is not one of", "folder"],
    "missing source": ["config key datasets.mnist: 'source' is a required property"],
    "bad batch_syn": ["config key datasets.demo.distill.1.batch_syn"],
}
#: problems between keys, found after the schema passes
CROSS_BREAKAGES = {
    "unknown default dataset": ["config key default_datasets: 'cifar11' is not a configured dataset"],
    "snapshots too few": ["config key datasets.demo.distill.1", "datasets.demo.experts.keep_snapshots is 3"],
}


def _break(cfg: dict, edits) -> dict:
    cfg = copy.deepcopy(cfg)
    demo = cfg["datasets"]["demo"]
    for edit in edits:
        if edit == "unknown key":
            demo["experts"]["epoch"] = 3  # misspelt 'epochs'
        elif edit == "wrong type":
            demo["experts"]["lr"] = "fast"
        elif edit == "negative ipc":
            demo["distill"][-1] = dict(demo["distill"][1])
        elif edit == "zero runs":
            demo["evaluate"]["runs"] = 0
        elif edit == "unknown top-level key":
            cfg["device_name"] = "cuda"
        elif edit == "bad source":
            demo["source"] = "imagenet21k"
        elif edit == "missing source":
            del cfg["datasets"]["mnist"]["source"]
        elif edit == "bad batch_syn":
            demo["distill"][1]["batch_syn"] = -5
        elif edit == "unknown default dataset":
            cfg["default_datasets"] = ["demo", "cifar11"]
        elif edit == "snapshots too few":
            demo["experts"]["keep_snapshots"] = 3
        else:  # pragma: no cover
            raise ValueError(edit)
    return cfg


@pytest.fixture(scope="module")
def plain_workdir(tmp_path_factory) -> Path:
    return make_workdir(tmp_path_factory.mktemp("wf-plain"))


def test_shipped_config_is_valid_and_the_default_target_is_the_demo(plain_workdir):
    jobs = dry_run(plain_workdir)
    cfg = load_config(plain_workdir)
    demo = cfg["datasets"]["demo"]
    ipcs = sorted(demo["distill"])
    assert len(ipcs) >= 2
    archs = demo["evaluate"]["architectures"]
    assert len(archs) >= 2
    assert jobs["prepare"] == {"data/demo/train.h5", "data/demo/test.h5", "data/demo/prepare_report.txt"}
    assert len(jobs["expert"]) == demo["experts"]["count"]
    assert {f"results/demo_ipc{i}/acc.csv" for i in ipcs} == jobs["results"]
    assert {f"eval/demo_ipc{i}/tesla_{a}.csv" for i in ipcs for a in archs} == jobs["evaluate_synthetic"]
    assert {f"eval/demo_ipc{i}/random_{a}.csv" for i in ipcs for a in archs} == jobs["evaluate_random"]
    assert {f"results/demo_ipc{i}/{f}" for i in ipcs for f in ("curves.png", "grid.png")} == jobs["report"]
    # no other dataset is touched by the default target
    assert all("demo" in f for files in jobs.values() for f in files)


@pytest.mark.parametrize("breakages", [SCHEMA_BREAKAGES, CROSS_BREAKAGES], ids=["schema", "cross-key"])
def test_broken_config_is_refused_naming_every_key(plain_workdir, breakages):
    cfg = _break(load_config(plain_workdir), breakages)
    write_config(plain_workdir, cfg, "broken.yaml")
    # --replace-workflow-config: the broken file is the whole config (a deleted key stays deleted)
    result = snakemake(
        plain_workdir, "--dry-run", "--cores", "1", "--replace-workflow-config", "--configfile", "broken.yaml"
    )
    text = result.stdout + result.stderr
    assert result.returncode != 0, text
    assert "invalid configuration" in text
    for edit, needles in breakages.items():
        for needle in needles:
            assert needle in text, f"{edit}: {needle!r} not in:\n{text}"
    assert not (plain_workdir / "logs").exists()


# --------------------------------------------------------------------------------------
# (c) a requested dataset whose raw data is missing fails before any job
# --------------------------------------------------------------------------------------
def test_missing_imagenet_path_fails_at_once_naming_the_key(plain_workdir):
    result = snakemake(plain_workdir, "--cores", "1", "results/in1k_ipc50/acc.csv")
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "datasets.in1k.input is not set" in text
    assert "ILSVRC2012_img_train.tar" in text and "<wnid>/*.JPEG" in text  # the accepted layouts
    assert "--configfile" in text  # how to set it
    assert not (plain_workdir / "data" / "in1k").exists()
    assert not (plain_workdir / "logs").exists()  # no job started


def test_wrong_imagenet_path_fails_at_once_naming_the_key(plain_workdir, tmp_path):
    override = tmp_path / "site.yaml"
    override.write_text(yaml.safe_dump({"datasets": {"in1k": {"input": str(tmp_path / "no" / "ILSVRC2012_img_train.tar")}}}))
    result = snakemake(plain_workdir, "results/in1k_ipc1/acc.csv", "--cores", "1", "--configfile", str(override))
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "datasets.in1k.input" in text and "does not exist" in text
    assert not (plain_workdir / "logs").exists()


def test_unset_paths_of_datasets_not_requested_do_not_matter(plain_workdir):
    # in1k, cifar10, ... have no path in the shipped config, yet the demo plans fine
    jobs = dry_run(plain_workdir, None, "results/demo_ipc1/acc.csv")
    assert "prepare" in jobs


def test_unconfigured_ipc_is_refused_with_the_key_to_add(plain_workdir):
    result = snakemake(plain_workdir, "--dry-run", "--cores", "1", "results/demo_ipc7/acc.csv")
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "datasets.demo.distill.7" in text


# --------------------------------------------------------------------------------------
# (b) rerun only what changed
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> tuple[Path, Path]:
    """The demo workflow executed once with the stand-in tesla (records Snakemake's metadata)."""
    base = tmp_path_factory.mktemp("wf-executed")
    workdir = make_workdir(base / "work")
    fake = install_fake_tesla(base / "bin")
    result = snakemake(workdir, "--cores", "2", path_prefix=fake)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (workdir / "results" / "demo_ipc1" / "acc.csv").exists()
    return workdir, fake


def _edited(workdir: Path, change) -> dict:
    cfg = load_config(workdir)
    change(cfg)
    return cfg


def test_editing_nothing_reruns_nothing(executed):
    workdir, _ = executed
    assert dry_run(workdir) == {}
    # the same config written out again (other key order, same values) changes nothing either
    assert dry_run(workdir, load_config(workdir)) == {}


def test_one_ipc_distill_setting_reruns_that_distillation_and_its_evaluations(executed):
    workdir, _ = executed
    cfg = load_config(workdir)
    archs = cfg["datasets"]["demo"]["evaluate"]["architectures"]
    ipc = sorted(cfg["datasets"]["demo"]["distill"])[-1]

    def change(c):
        c["datasets"]["demo"]["distill"][ipc]["lr_img"] *= 2

    jobs = dry_run(workdir, _edited(workdir, change))
    assert set(jobs) == {"distill", "evaluate_synthetic", "results", "report"}
    assert jobs["distill"] == {
        f"distill/demo_ipc{ipc}/synthetic.h5", f"distill/demo_ipc{ipc}/metrics.csv", f"distill/demo_ipc{ipc}/grids"
    }
    assert jobs["evaluate_synthetic"] == {f"eval/demo_ipc{ipc}/tesla_{a}.csv" for a in archs}
    assert jobs["results"] == {f"results/demo_ipc{ipc}/acc.csv"}


def test_expert_setting_reruns_experts_and_everything_downstream(executed):
    workdir, _ = executed
    cfg = load_config(workdir)
    demo = cfg["datasets"]["demo"]

    def change(c):
        c["datasets"]["demo"]["experts"]["lr"] *= 2

    jobs = dry_run(workdir, _edited(workdir, change))
    assert set(jobs) == {"expert", "distill", "evaluate_synthetic", "results", "report"}
    assert len(jobs["expert"]) == demo["experts"]["count"]
    assert len(jobs["results"]) == len(demo["distill"])
    assert len(jobs["evaluate_synthetic"]) == len(demo["distill"]) * len(demo["evaluate"]["architectures"])
    # neither the data nor the random-image baselines depend on the experts


def test_adding_an_architecture_runs_only_its_evaluations(executed):
    workdir, _ = executed
    cfg = load_config(workdir)
    ipcs = sorted(cfg["datasets"]["demo"]["distill"])

    def change(c):
        c["datasets"]["demo"]["evaluate"]["architectures"].append("vgg11")

    jobs = dry_run(workdir, _edited(workdir, change))
    assert set(jobs) == {"evaluate_synthetic", "evaluate_random", "results"}
    assert jobs["evaluate_synthetic"] == {f"eval/demo_ipc{i}/tesla_vgg11.csv" for i in ipcs}
    assert jobs["evaluate_random"] == {f"eval/demo_ipc{i}/random_vgg11.csv" for i in ipcs}


def test_adding_an_expert_trains_only_it_and_redoes_what_uses_the_pool(executed):
    workdir, _ = executed
    count = load_config(workdir)["datasets"]["demo"]["experts"]["count"]

    def change(c):
        c["datasets"]["demo"]["experts"]["count"] = count + 1

    jobs = dry_run(workdir, _edited(workdir, change))
    assert jobs["expert"] == {f"experts/demo/expert_{count}.h5"}
    assert "prepare" not in jobs and "evaluate_random" not in jobs


def test_evaluation_protocol_change_reruns_evaluations_only(executed):
    workdir, _ = executed

    def change(c):
        c["datasets"]["demo"]["evaluate"]["epochs"] += 1

    jobs = dry_run(workdir, _edited(workdir, change))
    assert set(jobs) == {"evaluate_synthetic", "evaluate_random", "results"}


def test_settings_that_do_not_change_results_rerun_nothing(executed):
    workdir, _ = executed

    def change(c):
        c["device"] = "cpu"  # where it runs, not what it computes
        c["datasets"]["demo"]["distill"][1]["checkpoint_every"] += 7
        c["datasets"]["mnist"]["experts"]["epochs"] += 1  # another dataset
        c["datasets"]["in1k"]["distill"][50]["lr_img"] = 500

    assert dry_run(workdir, _edited(workdir, change)) == {}


def test_summary_names_the_changed_params(executed):
    workdir, _ = executed
    cfg = load_config(workdir)
    ipc = sorted(cfg["datasets"]["demo"]["distill"])[0]
    cfg["datasets"]["demo"]["distill"][ipc]["iterations"] += 1
    write_config(workdir, cfg, "edited.yaml")
    result = snakemake(workdir, "--summary", "--cores", "1", "--configfile", "edited.yaml")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(f"distill/demo_ipc{ipc}/synthetic.h5")]
    assert lines and "params" in lines[0], result.stdout
    others = [line for line in result.stdout.splitlines() if line.startswith("experts/demo/expert_0.h5")]
    assert others and "ok" in others[0], result.stdout


def test_distill_advice_speaks_in_config_keys_and_guard_limits_rerun_nothing(executed):
    workdir, _ = executed
    # the stand-in tesla wrote its command line into the output
    command = (workdir / "distill" / "demo_ipc1" / "synthetic.h5").read_text()
    assert "--config-key-prefix datasets.demo.distill.1 " in command
    assert "--max-lr" not in command  # null in the config: tesla's defaults

    def change(c):
        c["datasets"]["demo"]["distill"][1].update(max_lr=0.5, max_image_growth=50, max_loss=20)

    assert dry_run(workdir, _edited(workdir, change)) == {}  # limits decide when a run stops, not its result
    result = snakemake(
        workdir, "distill/demo_ipc1/synthetic.h5", "--forcerun", "distill", "--dry-run", "--printshellcmds",
        "--cores", "1", "--configfile", "edited.yaml",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--max-lr 0.5 --max-image-growth 50 --max-loss 20 " in result.stdout
