"""The README's main command, end to end: `snakemake --cores all` on the embedded demo.

Runs the real pipeline (prepare -> experts -> distill at two IPCs -> evaluate on two
architectures -> acc.csv -> report plots) on a copy of the workflow and its shipped
config, then checks acc.csv's schema, that the distilled set beats random real images at
every IPC, that the report plots exist, and that a second run has nothing to do; and that the
README's demo table and the experts' accuracy are the numbers of this run's acc.csv (on a machine
without a GPU, where every training job runs on one thread, as Snakemake sets it).

Time budget: about 3 minutes on 2 cores (the demo config is sized for it).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tesla.devices import nvidia_gpu_visible
from workflow_support import ROOT, SNAKEMAKE, make_workdir, planned_jobs, snakemake

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed in this environment"),
]

ACC_COLUMNS = ["dataset", "ipc", "method", "engine", "arch", "runs", "acc_mean", "acc_std"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = make_workdir(tmp_path_factory.mktemp("wf-demo"))
    # the timeout only guards against a hang; the demo's wall time is a benchmark
    # (docs/benchmarks.md), not a test
    start = time.monotonic()
    result = snakemake(workdir, "--cores", "all", timeout=1800)
    seconds = time.monotonic() - start
    print(f"demo workflow: {seconds:.0f} s")
    logs = "".join(f"\n--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted((workdir / "results" / "logs").rglob("*.log")))
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:] + logs
    return workdir, seconds


def _demo_config(workdir: Path) -> dict:
    return yaml.safe_load((workdir / "config" / "config.yaml").read_text())["datasets"]["demo"]


def test_acc_csv_schema_and_distilled_beats_random(demo_run):
    workdir, _ = demo_run
    demo = _demo_config(workdir)
    archs = set(demo["evaluate"]["architectures"])
    runs = demo["evaluate"]["runs"]
    for ipc in sorted(demo["distill"]):
        path = workdir / "results" / f"demo_ipc{ipc}" / "acc.csv"
        table = pd.read_csv(path, comment="#")
        assert list(table.columns[: len(ACC_COLUMNS)]) == ACC_COLUMNS
        assert set(table["dataset"]) == {"demo"}
        assert set(table.loc[table["method"] != "full", "ipc"]) == {ipc}  # 'full' has no IPC
        assert set(table["method"]) == {"tesla", "random", "full"}
        for method in ("tesla", "random"):
            rows = table[table["method"] == method]
            assert set(rows["arch"]) == archs
            assert (rows["runs"] == runs).all()
        assert table["acc_mean"].between(0, 100).all() and (table["acc_std"] >= 0).all()
        tesla = table[table["method"] == "tesla"].set_index("arch")["acc_mean"]
        random = table[table["method"] == "random"].set_index("arch")["acc_mean"]
        for arch in archs:
            assert tesla[arch] > random[arch], f"IPC {ipc}, {arch}: distilled {tesla[arch]:.1f}% <= random {random[arch]:.1f}%"


def test_report_plots_and_logs_exist(demo_run):
    workdir, _ = demo_run
    for ipc in sorted(_demo_config(workdir)["distill"]):
        for name in ("curves.png", "grid.png"):
            png = workdir / "results" / f"demo_ipc{ipc}" / "exact" / name
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (workdir / "results" / "benchmarks" / "distill" / f"demo_ipc{ipc}_exact.tsv").exists()
        assert (workdir / "results" / "logs" / "distill" / f"demo_ipc{ipc}_exact.log").exists()
        # the checkpoint of a finished distillation is removed
        assert not list((workdir / "results" / f"demo_ipc{ipc}" / "exact").glob("checkpoint-*.pt"))


def test_second_run_has_nothing_to_do(demo_run):
    workdir, _ = demo_run
    result = snakemake(workdir, "--dry-run", "--cores", "1")
    assert result.returncode == 0, result.stderr
    assert planned_jobs(result.stdout + result.stderr) == {}


def test_snakemake_report_collects_tables_and_plots(demo_run):
    workdir, _ = demo_run
    result = snakemake(workdir, "--report", "report.html", "--cores", "1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    html = (workdir / "report.html").read_text(errors="replace")
    assert len(html) > 10_000
    for needle in ("acc.csv", "curves.png", "grid.png"):
        assert needle in html


#: a row of the README's demo table: | IPC | arch | distilled | random |
README_ROW = re.compile(r"^\| (\d+) \| (\w+) \| ([0-9.]+) \+- ([0-9.]+) \| ([0-9.]+) \+- ([0-9.]+) \|$", re.MULTILINE)
README_EXPERTS = re.compile(r"stopped after epoch (\d+) of (\d+)[^)]*?reach ([0-9.]+) \+- ([0-9.]+)", re.DOTALL)


def _one_decimal(mean: float, std: float) -> tuple[str, str]:
    return f"{mean:.1f}", f"{std:.1f}"


@pytest.mark.skipif(nvidia_gpu_visible(), reason="the README's demo numbers are those of a machine without a GPU")
def test_readme_demo_numbers_are_this_runs(demo_run):
    """The README states the demo's accuracies: they must be what the workflow writes."""
    workdir, _ = demo_run
    readme = (ROOT / "README.md").read_text()
    rows = README_ROW.findall(readme)
    demo = _demo_config(workdir)
    assert len(rows) == len(demo["distill"]) * len(demo["evaluate"]["architectures"]), rows
    for ipc, arch, mean, std, random_mean, random_std in rows:
        table = pd.read_csv(workdir / "results" / f"demo_ipc{ipc}" / "acc.csv", comment="#")
        by = table.set_index(["method", "arch"])
        assert (mean, std) == _one_decimal(*by.loc[("tesla", arch), ["acc_mean", "acc_std"]]), (ipc, arch)
        assert (random_mean, random_std) == _one_decimal(*by.loc[("random", arch), ["acc_mean", "acc_std"]]), (ipc, arch)
    epoch, epochs, mean, std = README_EXPERTS.search(readme).groups()
    full = table[table["method"] == "full"].iloc[0]
    assert (int(epoch), int(epochs)) == (full["test_epoch"], demo["experts"]["epochs"])
    assert (mean, std) == _one_decimal(full["acc_mean"], full["acc_std"])
