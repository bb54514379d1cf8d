"""`distill.gpus: G` in the workflow: a row with G > 1 runs one distillation over G processes,
started by torchrun locally and by srun under the SLURM profile (a job asking for G GPUs and
G tasks); `snakemake -n -p` shows the command; G is not a rerun trigger; and the demo's
distillation runs over two CPU processes end to end.

The SLURM command is checked here as a dry run (the command line, the request, and the sbatch
call the executor plugin builds from it); tests/test_slurm.py runs it on the test cluster.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from tesla.synthetic import SyntheticSet
from test_workflow import executed  # noqa: F401  (the demo executed once with a stand-in tesla)
from workflow_support import ROOT, SNAKEMAKE, dry_run, load_config, make_workdir, snakemake, write_config

pytestmark = pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed in this environment")


def _job(text: str, rule: str) -> str:
    return re.search(rf"^rule {rule}:\n((?:[ \t]+.*\n)+)", text, re.MULTILINE).group(1)


def _resources(job: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in re.search(r"resources: (.*)", job).group(1).split(", "))


def _two_processes(cfg: dict, ipc: int = 1) -> dict:
    cfg["datasets"]["demo"]["distill"][ipc]["gpus"] = 2
    return cfg


def _dry_run_commands(workdir: Path, *args: str) -> str:
    result = snakemake(workdir, "results/demo_ipc1/exact/synthetic.h5", "results/demo_ipc3/exact/synthetic.h5",
                       "--dry-run", "--printshellcmds", "--configfile", "edited.yaml", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_a_row_with_two_gpus_is_launched_by_torchrun_locally_and_by_srun_under_slurm(tmp_path):
    workdir = make_workdir(tmp_path / "wf")
    shutil.copytree(ROOT / "profiles", workdir / "profiles")
    write_config(workdir, _two_processes(load_config(workdir)), "edited.yaml")

    local = _dry_run_commands(workdir, "--cores", "2")
    assert re.search(r"torchrun --standalone --nproc-per-node=2 -m tesla distill --train \S+ .*--ipc 1 ", local)
    assert re.search(r"Shell command: tesla distill --train \S+ .*--ipc 3 ", local)  # the other row: one process
    assert "srun --ntasks" not in local
    job = _job(local, "distill_gpus_demo_ipc1")
    assert "results/demo_ipc1/exact/synthetic.h5" in job and "demo_ipc1" not in _job(local, "distill")

    slurm = _dry_run_commands(workdir, "--workflow-profile", "profiles/slurm")
    assert re.search(r"srun --ntasks=2 --kill-on-bad-exit=1 tesla distill --train \S+ .*--ipc 1 ", slurm)
    assert "torchrun" not in slurm
    profile = yaml.safe_load((workdir / "profiles" / "slurm" / "config.yaml").read_text())["set-resources"]["distill"]
    resources = _resources(_job(slurm, "distill_gpus_demo_ipc1"))
    assert resources["gpu"] == str(2 * profile["gpu"]) and resources["tasks"] == "2" and resources["mpi"] == "srun"
    assert resources["tasks_per_gpu"] == "1" and resources["slurm_partition"] == profile["slurm_partition"]
    assert int(resources["cpus_per_task"]) == profile["cpus_per_task"] and int(resources["mem_mb"]) == profile["mem_mb"]
    one = _resources(_job(slurm, "distill"))  # the one-process row keeps the profile's request
    assert one["gpu"] == str(profile["gpu"]) and "tasks" not in one and "mpi" not in one
    sbatch = _sbatch(resources).split()  # what the SLURM executor plugin submits for that request
    assert {f"--gpus={2 * profile['gpu']}", "--ntasks=2", "--ntasks-per-gpu=1", f"--cpus-per-task={profile['cpus_per_task']}"} <= set(sbatch)


def _sbatch(resources: dict[str, str]) -> str:
    """The executor plugin's sbatch command for a job with these (dry-run) resources."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Resources(dict):
        __getattr__ = dict.__getitem__

    values = Resources({k: int(v) if v.isdigit() else v for k, v in resources.items()})
    job = type("Job", (), {"resources": values, "threads": 1, "name": "distill", "wildcards": {}})()
    params = {"run_uuid": "tesla", "slurm_logfile": "/dev/null", "comment_str": "distill", "account": "", "partition": "",
              "workdir": "."}
    return get_submit_command(job, params) + set_gres_string(job)


def test_a_row_its_processes_cannot_run_is_refused_before_any_job_naming_the_key(tmp_path):
    """What `tesla distill` refuses when a job of G processes starts (engine unroll, a minibatch
    smaller than G, a batch-norm network) is refused by the dry run already, by the same rules."""
    workdir = make_workdir(tmp_path / "wf")
    cfg = load_config(workdir)
    demo = cfg["datasets"]["demo"]
    demo["model"] = "resnet18_bn"
    demo["distill"][1].update(gpus=2, engine=["exact", "unroll"])
    demo["distill"][3].update(gpus=4, batch_syn=7)  # 3 x 10 images: minibatches of 7, the last one of 2
    write_config(workdir, cfg, "edited.yaml")
    result = snakemake(workdir, "--dry-run", "--cores", "1", "--configfile", "edited.yaml")
    text = result.stdout + result.stderr
    assert result.returncode != 0 and "invalid configuration" in text, text
    one, three = "config key datasets.demo.distill.1.gpus: a run over 2", "config key datasets.demo.distill.3.gpus: a run over 4"
    assert f"{one} processes: engine unroll runs in one process; use datasets.demo.distill.1.engine exact or tesla" in text
    assert (f"{three} processes: every minibatch is split over the processes, but minibatches of 2 images "
            "(datasets.demo.distill.3.batch_syn 7, 30 images) are fewer than the processes") in text
    for row in (one, three):
        assert f"{row} processes: the experts' network resnet18_bn (datasets.demo.model) uses batch norm" in text
    assert "engine exact runs" not in text and "distill.1.gpus: a run over 2 processes: every minibatch" not in text
    assert not (workdir / "results").exists()


def test_the_number_of_gpus_is_not_a_rerun_trigger(executed):  # noqa: F811
    workdir, _ = executed
    assert dry_run(workdir, _two_processes(load_config(workdir))) == {}


@pytest.mark.slow
def test_the_demo_distils_over_two_cpu_processes(tmp_path):
    """The workflow's two-process command, run for real on a small demo (2 experts, 4 iterations)."""
    workdir = make_workdir(tmp_path / "wf")
    cfg = _two_processes(load_config(workdir))
    cfg["device"] = "cpu"
    demo = cfg["datasets"]["demo"]
    demo["experts"].update(count=2, epochs=3, keep_snapshots=3)
    demo["distill"] = {1: dict(demo["distill"][1], syn_steps=2, expert_epochs=1, max_start_epoch=2, iterations=4,
                               checkpoint_every=2)}
    write_config(workdir, cfg)  # the config itself (a --configfile would merge into it, keeping the other rows)
    target = "results/demo_ipc1/exact/synthetic.h5"
    result = snakemake(workdir, target, "--cores", "2", timeout=900)
    log = workdir / "results" / "logs" / "distill" / "demo_ipc1_exact.log"
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + (log.read_text() if log.exists() else "")
    syn = SyntheticSet.load(workdir / target)
    assert syn.iteration == 4 and syn.settings["world_size"] == 2
    assert "one run over 2 processes (gloo" in log.read_text()
