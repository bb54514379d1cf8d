"""Reproduce a dataset's published rows (CIFAR-10 IPC 1 and 10 by default) at a reduced budget, in one go.

The settings of every row come from ``config/config.yaml`` (the ``--dataset`` entry, ``cifar10`` by default: per-row
syn_steps, expert_epochs, max_start_epoch, lr_img and its convention, lr_lr, lr_teacher,
batch_syn, normalisation and ZCA, engines, evaluation runs; the entry's evaluation schedule:
1001 epochs, lr x0.1 from epoch 502, momentum restarted there). What is reduced is the budget,
given on the command line and printed with the results: the training images (whatever the
data tar holds), the number of experts, the distillation iterations, and (for ``--toy`` runs
only) the epochs and step counts. Both engines (``exact`` and ``tesla``) distil from the same
experts; each input space (normalisation + ZCA) gets its own experts, as in the workflow.

Stages (each a set of ``python -m tesla`` processes, run side by side up to ``--jobs``, each
under the stage's time cap): prepare (+ ZCA fit), experts (one process per input space, a
group of experts each), distill (one process per IPC x engine), evaluate (the synthetic sets
and the random-real baseline, ConvNet-3), cross-architecture evaluation at IPC 10 if the time
left allows, results (``tesla results``). It writes, under ``--out``: ``reproduce.md`` (the
table, also printed), ``acc_ipc<N>.csv`` and ``logs.tar.gz`` (every process's output).

    python bench/reproduce_published.py --data .device/cifar10-subset.tar.gz --work /tmp/repro \\
        --out bench_out --device cuda        # bench/gpu_reproduce.sh calls it with its budget
    python bench/reproduce_published.py --dataset mnist --channels 1 --data mnist-subset.tar ...   # docs/benchmarks.md

PAPER.md section 8 gives numbers for CIFAR-10 (ConvNet-3); for other datasets the paper columns show "-".
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tesla.input_space import input_space_key  # noqa: E402
from tesla.registries import soft_label_kind  # noqa: E402

# PAPER.md section 8 (accuracy %, ConvNet-3, mean +- std): the numbers to compare with.
PAPER = {
    1: {"TESLA": "48.5 +- 0.8", "MTT": "46.3 +- 0.8", "random": "15.4 +- 0.3"},
    10: {"TESLA": "66.4 +- 0.8", "MTT": "65.3 +- 0.7", "random": "31.0 +- 0.5"},
    50: {"TESLA": "72.6 +- 0.7", "MTT": "71.6 +- 0.2", "random": "50.6 +- 0.3"},
}


@dataclass
class Job:
    """One process of a stage: ``program`` (``python -m tesla``) with ``args``."""

    name: str
    args: list[str]
    log: Path
    program: tuple[str, ...] = (sys.executable, "-m", "tesla")
    proc: subprocess.Popen | None = None
    started: float = 0.0
    status: str = "not run"
    seconds: float = 0.0


@dataclass
class Row:
    """One distillation row of the config (an IPC) with its resolved settings."""

    ipc: int
    settings: dict
    normalize: str
    zca: bool
    zca_eps: float
    engines: list[str]
    eval_runs: int
    space: str = ""
    synthetic: dict[str, Path] = field(default_factory=dict)


def run_stage(name: str, jobs: list[Job], cap_s: float, max_parallel: int, stage_seconds: dict) -> None:
    """Run ``jobs`` side by side (at most ``max_parallel`` at a time); kill what is left after ``cap_s``."""
    start = time.monotonic()
    waiting = list(jobs)
    running: list[Job] = []
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    while waiting or running:
        while waiting and len(running) < max_parallel:
            job = waiting.pop(0)
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with open(job.log, "w") as log:
                log.write("$ " + " ".join([*job.program, *job.args]) + "\n")
                log.flush()
                job.proc = subprocess.Popen([*job.program, *job.args], stdout=log,
                                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
            job.started = time.monotonic()
            running.append(job)
        time.sleep(0.5)
        over = time.monotonic() - start > cap_s
        for job in list(running):
            rc = job.proc.poll()
            if rc is None and not over:
                continue
            if rc is None:
                os.killpg(job.proc.pid, signal.SIGKILL)
                job.proc.wait()
                job.status = f"killed at the {name} cap ({cap_s:.0f} s)"
            else:
                job.status = "ok" if rc == 0 else f"exit status {rc}"
            job.seconds = time.monotonic() - job.started
            running.remove(job)
            print(f"  [{name}] {job.name}: {job.status}, {job.seconds:.1f} s", flush=True)
        if over:
            for job in waiting:
                job.status = f"not started: {name} cap ({cap_s:.0f} s) reached"
            waiting = []
    stage_seconds[name] = time.monotonic() - start


def config_rows(config_path: Path, dataset: str, ipcs: list[int], max_start: int | None, syn_steps: int | None) -> tuple[dict, list[Row]]:
    """The ``dataset`` entry of the config and its rows for ``ipcs`` (toy overrides applied)."""
    entry = yaml.safe_load(config_path.read_text())["datasets"][dataset]
    rows = []
    for ipc in ipcs:
        s = dict(entry["distill"][ipc])
        if max_start is not None:
            s["max_start_epoch"] = max_start
        if syn_steps is not None:
            s["syn_steps"] = syn_steps
        engines = s.get("engine", "exact")
        row = Row(ipc=ipc, settings=s, normalize=s.get("normalize", entry.get("normalize", "split")),
                  zca=bool(s.get("zca", entry.get("zca", False))), zca_eps=float(s.get("zca_eps", entry.get("zca_eps", 0.1))),
                  engines=[engines] if isinstance(engines, str) else list(engines),
                  eval_runs=int(s.get("eval_runs", entry["evaluate"].get("runs", 5))))
        row.space = input_space_key(row.normalize, row.zca_eps if row.zca else None)
        rows.append(row)
    return entry, rows


def unpack(data: Path, work: Path) -> Path:
    """The data tar, uncompressed (``tesla prepare`` reads plain tars only)."""
    if not data.name.endswith(".gz"):
        return data
    tar = work / data.name[: -len(".gz")]
    if not tar.exists():
        with gzip.open(data, "rb") as src, open(tar.with_suffix(".tmp"), "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tar.with_suffix(".tmp").rename(tar)
    return tar


def space_flags(row: Row, zca_files: dict[str, Path]) -> list[str]:
    """The input-space options of ``tesla experts`` / ``tesla evaluate --random``."""
    return ["--zca", str(zca_files[row.space])] if row.zca else ["--normalize", row.normalize]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="class-folder tar train/<class>/, test/<class>/ (.tar or .tar.gz; bench/make_device_data.sh)")
    p.add_argument("--dataset", default="cifar10", help="entry of the config whose rows are reproduced")
    p.add_argument("--channels", type=int, choices=[1, 3], default=3, help="tesla prepare --channels (1 for MNIST)")
    p.add_argument("--work", type=Path, required=True, help="working folder (prepared data, experts, sets)")
    p.add_argument("--out", type=Path, required=True, help="folder for reproduce.md, acc_ipc<N>.csv, logs.tar.gz")
    p.add_argument("--config", type=Path, default=ROOT / "config" / "config.yaml")
    p.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    p.add_argument("--experts", type=int, default=5, help="experts per input space (published: 100)")
    p.add_argument("--iterations", type=int, nargs="+", default=[200, 300], help="distillation iterations, one per --ipc (published: 10000)")
    p.add_argument("--engines", nargs="+", choices=["exact", "tesla", "unroll"],
                   help="distil every row with these engines, from the same experts (default: each row's config engines)")
    p.add_argument("--cross-archs", nargs="*", help="architectures of the IPC-10 cross-architecture stage (default: the entry's others)")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", default="auto", help="tesla distill --compile")
    p.add_argument("--jobs", type=int, default=6, help="processes side by side within a stage")
    p.add_argument("--caps", type=float, nargs=4, default=[45, 130, 220, 110], metavar=("PREPARE", "EXPERTS", "DISTILL", "EVALUATE"),
                   help="time cap of each stage in seconds")
    p.add_argument("--budget", type=float, default=540, help="whole run in seconds: the cross-architecture stage runs only in what is left")
    p.add_argument("--cross-arch-min", type=float, default=90, help="seconds that must be left to start the cross-architecture stage")
    toy = p.add_argument_group("toy overrides (CPU check of the script; not the published settings)")
    toy.add_argument("--max-start-epoch", type=int, help="replace every row's max_start_epoch")
    toy.add_argument("--syn-steps", type=int, help="replace every row's syn_steps")
    toy.add_argument("--eval-epochs", type=int, help="evaluation epochs (lr decay at the config's ratio)")
    toy.add_argument("--eval-runs", type=int, help="evaluation runs of every row")
    toy.add_argument("--model", help="replace the entry's model (experts, distillation, evaluation)")
    toy.add_argument("--max-loss", type=float, help="tesla distill --max-loss (the guard's loss limit; toy experts of 1 step per epoch exceed 10)")
    a = p.parse_args(argv)
    if len(a.iterations) != len(a.ipc):
        p.error("--iterations takes one value per --ipc")
    t0 = time.monotonic()
    entry, rows = config_rows(a.config, a.dataset, a.ipc, a.max_start_epoch, a.syn_steps)
    ev = entry["evaluate"]
    epochs, decay = int(ev["epochs"]), int(ev["lr_decay_epoch"])
    if a.eval_epochs is not None:
        epochs, decay = a.eval_epochs, max(1, round(a.eval_epochs * decay / int(ev["epochs"])))
    model = a.model or entry["model"]
    for row in rows:
        row.eval_runs = a.eval_runs or row.eval_runs
        row.engines = a.engines or row.engines
    work, logs = a.work, a.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    stage_s: dict[str, float] = {}
    data = work / "data"
    dev = ["--device", a.device]

    # 1. prepare (+ ZCA fit per ZCA input space)
    t = time.monotonic()
    tar = unpack(a.data, work)
    stage_s["unpack"] = time.monotonic() - t
    run_stage("prepare", [Job("prepare", ["prepare", "folder", "--input", str(tar), "--out-dir", str(data), "--name", a.dataset,
                                          "--resolution", str(entry.get("resolution", 32)), "--channels", str(a.channels), "--quiet"], logs / "prepare.log")],
              a.caps[0], a.jobs, stage_s)
    train, test = data / "train.h5", data / "test.h5"
    zca_files = {r.space: work / f"zca_{r.space}.h5" for r in rows if r.zca}
    zca_jobs = {r.space: Job(f"zca {r.space}", ["zca", "--train", str(train), "--out", str(zca_files[r.space]), "--normalize", r.normalize,
                                                   "--eps", str(r.zca_eps), *dev], logs / f"zca_{r.space}.log") for r in rows if r.zca}
    run_stage("zca", list(zca_jobs.values()), max(5.0, a.caps[0] - stage_s["prepare"]), a.jobs, stage_s)

    # 2. experts: one group per input space, trained up to the last snapshot its rows read
    spaces: dict[str, list[Row]] = {}
    for row in rows:
        spaces.setdefault(row.space, []).append(row)
    expert_files: dict[str, list[Path]] = {}
    expert_jobs = []
    ex = entry["experts"]
    keep: dict[str, int] = {}
    for space, srows in spaces.items():
        keep[space] = max(int(r.settings["max_start_epoch"]) + int(r.settings["expert_epochs"]) for r in srows)
        expert_files[space] = [work / "experts" / space / f"expert_{k}.h5" for k in range(a.experts)]
        expert_jobs.append(Job(f"experts {space}", ["experts", "--train", str(train), "--test", str(test), "--model", model,
                                                     "--epochs", str(ex["epochs"]), "--lr", str(ex["lr"]), "--batch-size", str(ex["batch_size"]),
                                                     "--keep-snapshots", str(keep[space]), *space_flags(srows[0], zca_files), *dev,
                                                     "--seed", *map(str, range(a.experts)),
                                                     "--out", *map(str, expert_files[space])], logs / f"experts_{space}.log"))
    run_stage("experts", expert_jobs, a.caps[1], a.jobs, stage_s)

    # 3. distill: every row x engine, from the same experts
    distill_jobs = []
    for row, iters in zip(rows, a.iterations):
        s = row.settings
        row.settings["iterations_run"] = iters
        for engine in row.engines:
            out = work / f"ipc{row.ipc}" / engine / "synthetic.h5"
            row.synthetic[engine] = out
            args = ["distill", "--train", str(train), "--experts", *map(str, expert_files[row.space]), "--out", str(out),
                    "--ipc", str(row.ipc), "--syn-steps", str(s["syn_steps"]), "--expert-epochs", str(s["expert_epochs"]),
                    "--max-start-epoch", str(s["max_start_epoch"]), "--lr-img", str(s["lr_img"]),
                    "--lr-img-convention", s.get("lr_img_convention", "gradient"), "--lr-lr", str(s["lr_lr"]),
                    "--lr-teacher", str(s["lr_teacher"]), "--iterations", str(iters), "--engine", engine,
                    "--compile", a.compile, "--metrics", str(out.with_name("metrics.csv")), "--checkpoint-every", str(max(1, iters // 4)),
                    "--no-progress", *dev]
            if s.get("batch_syn"):
                args += ["--batch-syn", str(s["batch_syn"])]
            labels = soft_label_kind(s.get("soft_labels", "none"))
            if labels != "none":
                args += ["--soft-labels", labels]
            if row.zca:
                args += ["--zca", str(zca_files[row.space])]
            if a.max_loss is not None:
                args += ["--max-loss", str(a.max_loss)]
            distill_jobs.append(Job(f"distill ipc{row.ipc} {engine}", args, logs / f"distill_ipc{row.ipc}_{engine}.log"))
    run_stage("distill", distill_jobs, a.caps[2], a.jobs, stage_s)

    # 4. evaluate (ConvNet-3 = the distillation network) the sets and the random-real baseline
    schedule = ["--epochs", str(epochs), "--lr-decay-epoch", str(decay)] + (["--reset-momentum-at-decay"] if ev.get("reset_momentum_at_decay") else [])
    runs_files: dict[int, list[Path]] = {r.ipc: [] for r in rows}

    def eval_job(row: Row, what: str, arch: str, source: list[str]) -> Job:
        out = work / f"ipc{row.ipc}" / "eval" / f"{what}_{arch}.csv"
        runs_files[row.ipc].append(out)
        return Job(f"evaluate ipc{row.ipc} {what} {arch}", ["evaluate", *source, "--test", str(test), "--arch", arch, "--runs", str(row.eval_runs),
                                                             *schedule, *dev, "--out", str(out)], logs / f"eval_ipc{row.ipc}_{what}_{arch}.log")

    eval_jobs = []
    for row in rows:
        eval_jobs += [eval_job(row, e, model, ["--synthetic", str(f)]) for e, f in row.synthetic.items() if f.exists()]
        eval_jobs.append(eval_job(row, "random", model, ["--random", "--train", str(train), "--ipc", str(row.ipc), *space_flags(row, zca_files)]))
    run_stage("evaluate", eval_jobs, a.caps[3], a.jobs, stage_s)

    # 5. cross-architecture (the entry's other architectures, the IPC-10 sets only), in what is left
    left = a.budget - (time.monotonic() - t0) - 15
    others = a.cross_archs if a.cross_archs is not None else [arch for arch in ev["architectures"] if arch != model]
    cross = [r for r in rows if r.ipc == 10]
    cross_jobs: list[Job] = []
    if cross and others and left >= a.cross_arch_min:
        cross_jobs = jobs = [eval_job(r, e, arch, ["--synthetic", str(f)]) for r in cross for arch in others for e, f in r.synthetic.items() if f.exists()]
        run_stage("cross-arch", jobs, left, a.jobs, stage_s)
    else:
        stage_s["cross-arch"] = 0.0
        print(f"  [cross-arch] not run: {left:.0f} s left, {a.cross_arch_min:.0f} s needed" if cross and others else "  [cross-arch] no IPC-10 row")

    # 6. results: tesla results per IPC, then one table
    t = time.monotonic()
    acc: dict[int, pd.DataFrame] = {}
    for row in rows:
        done = [f for f in runs_files[row.ipc] if f.exists()]
        if not done:
            continue
        out = a.out / f"acc_ipc{row.ipc}.csv"
        experts = [f for f in expert_files[row.space] if f.exists()]
        r = subprocess.run([sys.executable, "-m", "tesla", "results", "--runs", *map(str, done), "--experts", *map(str, experts), "--out", str(out)],
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
        (logs / f"results_ipc{row.ipc}.log").write_text(r.stdout + r.stderr)
        if r.returncode == 0:
            acc[row.ipc] = pd.read_csv(out, comment="#")
    stage_s["results"] = time.monotonic() - t
    stage_s["total"] = time.monotonic() - t0
    all_jobs = list(zca_jobs.values()) + expert_jobs + distill_jobs + eval_jobs + cross_jobs
    table = render(rows, acc, a, model, epochs, decay, ev, keep, stage_s, all_jobs, tar)
    (a.out / "reproduce.md").write_text(table)
    print(table)
    with tarfile.open(a.out / "logs.tar.gz", "w:gz") as t_:
        t_.add(logs, arcname="logs")
        for row in rows:
            for e, f in row.synthetic.items():
                if f.with_name("metrics.csv").exists():
                    t_.add(f.with_name("metrics.csv"), arcname=f"metrics/ipc{row.ipc}_{e}.csv")
    return 0 if all(job.status == "ok" for job in all_jobs if job not in cross_jobs) else 1


def _acc(df: pd.DataFrame | None, method: str, engine: str, arch: str) -> str:
    if df is None:
        return "not run"
    eng = df["engine"].fillna("")
    hit = df[(df["method"] == method) & (eng == engine) & (df["arch"] == arch)]
    if hit.empty:
        return "not run"
    r = hit.iloc[0]
    return f"{r.acc_mean:.2f} +- {r.acc_std:.2f} ({int(r.runs)})"


def render(rows, acc, a, model, epochs, decay, ev, keep, stage_s, jobs, tar) -> str:
    """The markdown table of the run: ours against the paper, the budget, seconds per stage."""
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() and a.device != "cpu" else "CPU"
    lines = [f"# {a.dataset} at the published settings, REDUCED budget ({dev}, torch {torch.__version__})", "",
             f"Data: {tar.name}; experts per input space: {a.experts} ({model}, trained to the last snapshot the rows read: "
             + ", ".join(f"{s} {k} epochs" for s, k in keep.items()) + "; published: 100 x 50 epochs); "
             f"evaluation: {epochs} epochs, lr x0.1 from epoch {decay}, momentum restart {bool(ev.get('reset_momentum_at_decay'))}. "
             "Accuracy %, mean +- population std (runs). Our sets are the final ones; the paper's were selected by test accuracy.", "",
             f"| IPC | engine | input space | iterations (published) | ours, {model} | paper TESLA | paper MTT | random real, ours | random real, paper | experts' test acc (epoch) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        df = acc.get(row.ipc)
        full = "not run"
        if df is not None and (df["method"] == "full").any():
            f = df[df["method"] == "full"].iloc[0]
            full = f"{f.acc_mean:.2f} +- {f.acc_std:.2f} ({int(f.test_epoch)})"
        paper = PAPER.get(row.ipc, {}) if a.dataset == "cifar10" else {}
        for engine in row.engines:
            lines.append(f"| {row.ipc} | {engine} | {row.space} | {row.settings['iterations_run']} ({row.settings['iterations']}) | "
                         f"{_acc(df, 'tesla', engine, model)} | {paper.get('TESLA', '-')} | {paper.get('MTT', '-')} | "
                         f"{_acc(df, 'random', '', model)} | {paper.get('random', '-')} | {full} |")
    cross = [(r, e, arch) for r in rows for e in r.engines for arch in dict.fromkeys(ev["architectures"] + (a.cross_archs or [])) if arch != model
             and acc.get(r.ipc) is not None and _acc(acc[r.ipc], "tesla", e, arch) != "not run"]
    if cross:
        lines += ["", "| IPC | engine | architecture | ours |", "|---|---|---|---|"]
        lines += [f"| {r.ipc} | {e} | {arch} | {_acc(acc[r.ipc], 'tesla', e, arch)} |" for r, e, arch in cross]
    lines += ["", "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in stage_s.items()), "",
              "Processes: " + "; ".join(f"{j.name}: {j.status} ({j.seconds:.0f} s)" for j in jobs), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
