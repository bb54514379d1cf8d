"""Memory and speed of one distillation iteration per gradient engine.

Memory: every (engine, N) point runs in a FRESH subprocess, which builds the student, the
synthetic set and two parameter vectors, then runs one ``matching_gradients`` call. On the
CPU we report the growth of the process's peak resident set size during that call
(ru_maxrss after minus before: the iteration's own peak working memory) and the peak RSS
of the whole process; on CUDA ``torch.cuda.max_memory_allocated`` during the call.

Speed: one process times all engines side by side (interleaved, several repeats, median),
so the ratio exact/tesla compares runs under the same machine load.

    python bench/bench_distill.py                          # CPU, default sizes (< 5 min)
    python bench/bench_distill.py --device cuda --model convnet_d4 --resolution 64 \
        --classes 1000 --ipc 1 --batch-syn 100 --width 128     # ImageNet-scale, on a GPU
    python bench/bench_distill.py --labels                  # + learned labels vs soft labels

With ``--labels``, every (engine, N) point also runs with soft targets (TESLA's labels: no
label gradient) and with learned labels (the same soft targets, plus dL/dY from the same
sweep), each in its own fresh subprocess, and the table gives learned / soft.

Prints a markdown table (add ``--out FILE`` to also write it to a file).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

ENGINES = ("exact", "tesla", "unroll")


def build_problem(args, device):
    from tesla.augment import DSA
    from tesla.models import build_model
    from tesla.losses import training_loss
    from tesla.parameters import flatten_params, functional_forward, param_layout

    torch.manual_seed(0)
    model = build_model(
        args.model, channels=args.channels, num_classes=args.classes, resolution=args.resolution, width=args.width
    ).to(device)
    layout = param_layout(model)
    theta_start = flatten_params(model, device=device)
    g = torch.Generator().manual_seed(1)
    theta_target = theta_start + 0.01 * torch.randn(theta_start.shape, generator=g).to(device)
    n = args.ipc * args.classes
    images = torch.randn(n, args.channels, args.resolution, args.resolution, generator=g).to(device)
    labels = torch.arange(args.classes).repeat_interleave(args.ipc).to(device)
    if getattr(args, "point_labels", "hard") != "hard":  # soft targets (TESLA's or learned)
        labels = torch.softmax(torch.randn(n, args.classes, generator=g), dim=1).to(device)

    def loss_fn(theta, x, y):
        return training_loss(functional_forward(model, theta, x, layout=layout), y)

    dsa = DSA("color_crop_cutout_flip_scale_rotate")
    return loss_fn, theta_start, theta_target, images, labels, dsa, layout.total


def one_iteration(engine, problem, syn_steps, batch_syn, seed=0, learn_labels=False):
    from tesla.matching import matching_gradients

    loss_fn, theta_start, theta_target, images, labels, dsa, _ = problem
    return matching_gradients(
        engine, loss_fn, theta_start, theta_target, images, labels, 0.01, syn_steps, batch_syn, dsa,
        torch.Generator().manual_seed(seed), learn_labels=learn_labels,
    )


def _rss_peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def memory_point(args) -> dict:
    """Runs inside the fresh subprocess: one iteration, its peak memory."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    problem = build_problem(args, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = _rss_peak_mb()
    t0 = time.perf_counter()
    result = one_iteration(args.point_engine, problem, args.point_steps, args.batch_syn,
                           learn_labels=args.point_labels == "learned")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    out = dict(engine=args.point_engine, syn_steps=args.point_steps, seconds=seconds, loss=result.loss,
               params=problem[-1], rss_before_mb=before, rss_peak_mb=_rss_peak_mb())
    out["iteration_mb"] = out["rss_peak_mb"] - before
    if device.type == "cuda":
        out["cuda_peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return out


def run_point(args, engine, steps, labels="hard") -> dict:
    cmd = [sys.executable, __file__, "--point-engine", engine, "--point-steps", str(steps), "--point-labels", labels]
    cmd += args.passthrough
    env = dict(os.environ)
    if args.mmap_threshold:
        # glibc's dynamic mmap threshold lets freed step graphs fragment the heap, which adds
        # +-10% noise to peak RSS; a fixed threshold returns large blocks to the OS at free.
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        if "out of memory" in done.stderr.lower():
            return dict(engine=engine, syn_steps=steps, oom=True)  # the point does not fit on the device
        sys.exit(f"memory point {engine} N={steps} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def timing(args) -> dict[str, float]:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    problem = build_problem(args, device)
    fits = []
    for e in ENGINES:  # warm-up; an engine that runs out of device memory is left out of the timing
        try:
            one_iteration(e, problem, args.time_steps, args.batch_syn)
            fits.append(e)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
    times: dict[str, list[float]] = {e: [] for e in fits}
    for r in range(args.repeats):
        for e in fits:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            one_iteration(e, problem, args.time_steps, args.batch_syn, seed=r)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[e].append(time.perf_counter() - t0)
    return {e: statistics.median(v) for e, v in times.items()}


def _report(lines: list[str], t_start: float, out: str | None) -> int:
    """Print the Markdown lines with the benchmark's wall time, and write them to ``out``."""
    text = "\n".join([*lines, "", f"Whole benchmark: {time.perf_counter() - t_start:.0f} s."]).replace("\n\n\n", "\n\n")
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="convnet")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--batch-syn", type=int, default=50)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40, 80])
    p.add_argument("--time-steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--mmap-threshold", type=int, default=65536,
                   help="MALLOC_MMAP_THRESHOLD_ for the memory subprocesses (0: glibc default)")
    p.add_argument("--point-engine", default=None, help=argparse.SUPPRESS)
    p.add_argument("--point-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--point-labels", default="hard", choices=("hard", "soft", "learned"), help=argparse.SUPPRESS)
    p.add_argument("--labels", action="store_true",
                   help="also measure soft vs learned labels (exact and tesla engines, same N values)")
    p.add_argument("--labels-only", action="store_true", help="only the soft vs learned labels table")
    args = p.parse_args()
    if args.point_engine:
        print(json.dumps(memory_point(args)))
        return 0
    args.passthrough = [
        "--device", args.device, "--model", args.model, "--width", str(args.width), "--resolution", str(args.resolution),
        "--channels", str(args.channels), "--classes", str(args.classes), "--ipc", str(args.ipc),
        "--batch-syn", str(args.batch_syn), "--threads", str(args.threads),
    ]
    t_start = time.perf_counter()
    key = "cuda_peak_mb" if args.device.startswith("cuda") else "iteration_mb"
    if args.labels_only:
        setup = (f"Setup: {args.model} width {args.width}, {args.channels}x{args.resolution}x{args.resolution}, "
                 f"{args.classes} classes, ipc {args.ipc}, batch_syn {args.batch_syn}, DSA on, device {args.device}, "
                 f"{args.threads} thread(s), torch {torch.__version__}.")
        return _report([setup, *label_memory_table(args, key)], t_start, args.out)
    points: dict[tuple[str, int], dict] = {}
    for e in ENGINES:
        for n in args.steps:  # the file holds every point measured so far (a step stopped by its cap keeps them)
            points[(e, n)] = run_point(args, e, n)
            _write(args.out, ["Peak memory of one iteration so far (MiB; the full tables follow when every point is in):", "",
                              "| engine | N | MiB | out of memory |", "|---|---|---|---|",
                              *(f"| {pe} | {pn} | {pt.get(key, '')} | {bool(pt.get('oom'))} |" for (pe, pn), pt in points.items())])
    # every memory point before the timing: a child forked from a process inherits its peak RSS
    # (Linux keeps ru_maxrss across fork and exec), and the timing grows this process
    label_lines = label_memory_table(args, key) if args.labels else []
    speeds = timing(args)
    what = "torch.cuda.max_memory_allocated during the call" if key == "cuda_peak_mb" else "growth of peak RSS during the call"
    lines = [
        f"Setup: {args.model} width {args.width}, {args.channels}x{args.resolution}x{args.resolution}, {args.classes} classes, "
        f"ipc {args.ipc} ({args.ipc * args.classes} images), batch_syn {args.batch_syn}, DSA on, device {args.device}, "
        f"{args.threads} thread(s), {points[('exact', args.steps[0])]['params']} parameters, torch {torch.__version__}, "
        f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold or 'glibc default'}.",
        "",
        f"Peak memory of one iteration (MiB; {what}; process peak RSS in parentheses):",
        "",
        "| engine | " + " | ".join(f"N={n}" for n in args.steps) + f" | N={args.steps[-1]} / N={args.steps[0]} |",
        "|---|" + "---|" * (len(args.steps) + 1),
    ]
    def mib(e, n):
        pt = points[(e, n)]
        return None if pt.get("oom") else pt[key]

    def ratio(a, b):
        return "n/a (out of memory)" if a is None or b is None else f"{a / max(b, 1e-9):.2f}x"

    for e in ENGINES:
        cells = []
        for n in args.steps:
            pt = points[(e, n)]
            cells.append("out of memory" if pt.get("oom") else f"{pt[key]:.1f} ({pt['rss_peak_mb']:.0f})")
        lines.append(f"| {e} | " + " | ".join(cells) + f" | {ratio(mib(e, args.steps[-1]), mib(e, args.steps[0]))} |")
    n_max = args.steps[-1]
    lines += [
        "",
        f"unroll / exact at N={n_max}: {ratio(mib('unroll', n_max), mib('exact', n_max))}.",
        "",
        f"Seconds per iteration at N={args.time_steps} (median of {args.repeats}, engines interleaved in one process):",
        "",
        "| engine | seconds | vs tesla |",
        "|---|---|---|",
    ]
    for e in ENGINES:
        if e in speeds:
            lines.append(f"| {e} | {speeds[e]:.3f} | {speeds[e] / speeds['tesla']:.2f}x |")
        else:
            lines.append(f"| {e} | out of memory | |")
    return _report(lines + label_lines, t_start, args.out)


def label_memory_table(args, key: str) -> list[str]:
    """Peak memory of one iteration with learned labels (dL/dY from the same sweep) against soft
    labels without a label gradient: same soft targets, same N, fresh subprocesses, run
    alternately (soft, learned) so that both see the same machine load."""
    lines = ["", "Learned labels vs soft labels (same soft targets; MiB as above; learned / soft):", "",
             "| engine | " + " | ".join(f"N={n}" for n in args.steps) + " |",
             "|---|" + "---|" * len(args.steps)]
    for e in ("exact", "tesla"):
        cells = []
        for n in args.steps:
            soft, learned = run_point(args, e, n, "soft"), run_point(args, e, n, "learned")
            cells.append(f"{soft[key]:.1f} -> {learned[key]:.1f} ({learned[key] / max(soft[key], 1e-9):.3f}x; "
                         f"peak RSS {learned['rss_peak_mb'] / soft['rss_peak_mb']:.3f}x)")
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return lines




# ---------------------------------------------------------------------------------------
# exact vs tesla on real data at the same budget (the choice of the default engine), and the
# label/window/initialisation variants (learned labels, moving window, real-correct initialisation)
# ---------------------------------------------------------------------------------------
VARIANTS = ("hard", "tesla-labels", "learned", "learned-window-correct")


def variant_options(name: str, a) -> list:
    """The ``tesla distill`` options of a --variants entry."""
    learned = ["--soft-labels", "learned", "--lr-label", a.lr_label, "--label-temperature", a.label_temperature]
    final = a.max_start_epoch_final if a.max_start_epoch_final is not None else 2 * a.max_start_epoch
    window = ["--min-start-epoch", a.min_start_epoch, "--max-start-epoch-final", final,
              "--window-iterations", a.window_iterations or max(1, a.iterations // 2)]
    return {
        "hard": ["--soft-labels", "none"],
        "tesla-labels": ["--soft-labels", "tesla"],
        "learned": learned,
        "learned-window-correct": [*learned, *window, "--init", "real-correct"],
    }[name]
def compare_engines(argv: list[str]) -> int:
    """prepare (demo digits, or a given dataset) -> experts -> distill with each engine -> evaluate,
    all through the command line, at the same budget for both engines.

        python bench/bench_distill.py compare --work /tmp/cmp [--iterations 200] [--ipc 1]
        python bench/bench_distill.py compare --work /tmp/cmp --train data/cifar10/train.h5 \
            --test data/cifar10/test.h5 --device cuda --ipc 10 --syn-steps 30 --iterations 400

    With ``--variants`` it compares label/window/initialisation options instead of
    engines, all with ``--engine`` (default exact) on the same experts:
    ``tesla-labels`` (a: TESLA's labels), ``learned`` (b: learned labels), ``learned-window-correct``
    (c: learned labels + moving window + real-correct initialisation), ``hard`` (class labels).
    A summary gives, per variant, the mean +- std over seeds of the per-seed mean accuracy.
    """
    import csv as _csv

    p = argparse.ArgumentParser(prog="bench_distill.py compare")
    p.add_argument("--work", required=True, help="folder for experts, synthetic sets and CSVs (reused when rerun)")
    p.add_argument("--train", default=None, help="a prepared train.h5 (default: the demo digits, prepared into --work)")
    p.add_argument("--test", default=None, help="the matching test.h5")
    p.add_argument("--device", default="cpu")
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--expert-epochs-train", type=int, default=12)
    p.add_argument("--model", default="convnet", help="network of the experts (and of distillation and evaluation)")
    p.add_argument("--expert-lr", type=float, default=0.01)
    p.add_argument("--expert-batch", type=int, default=256)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--syn-steps", type=int, default=20)
    p.add_argument("--expert-epochs", type=int, default=2)
    p.add_argument("--batch-syn", type=int, default=None, help="default: all synthetic images")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--lr-img", type=float, default=100.0)
    p.add_argument("--lr-lr", type=float, default=1e-7)
    p.add_argument("--lr-teacher", type=float, default=0.01)
    p.add_argument("--max-start-epoch", type=int, default=8)
    p.add_argument("--eval-epochs", type=int, default=300)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--engines", nargs="+", default=["exact", "tesla"], choices=ENGINES)
    p.add_argument("--variants", nargs="+", default=None, choices=tuple(VARIANTS),
                   help="compare these label/window/init variants (with --engine) instead of --engines")
    p.add_argument("--engine", default="exact", choices=ENGINES, help="the engine of every --variants run")
    p.add_argument("--lr-label", type=float, default=10.0)
    p.add_argument("--label-temperature", type=float, default=1.0)
    p.add_argument("--min-start-epoch", type=int, default=0, help="variant c: the window's lower bound")
    p.add_argument("--max-start-epoch-final", type=int, default=None, help="variant c (default: 2 x --max-start-epoch)")
    p.add_argument("--window-iterations", type=int, default=None, help="variant c (default: half the iterations)")
    a = p.parse_args(argv)
    if (a.train is None) != (a.test is None):
        p.error("give --train and --test together (a prepared train.h5 and its test.h5), or neither for the demo")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    tesla = [sys.executable, "-m", "tesla"]

    def call(*args):
        t0 = time.perf_counter()
        done = subprocess.run([*tesla, *map(str, args)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            sys.exit(f"tesla {' '.join(map(str, args[:1]))} failed:\n{done.stderr[-3000:]}")
        return time.perf_counter() - t0

    if a.train is None:
        train, test, what = work / "train.h5", work / "test.h5", "demo digits (8x8, 10 classes)"
        if not train.exists():
            call("prepare", "demo", "--out-dir", work, "--quiet")
    else:
        train, test, what = Path(a.train), Path(a.test), f"{a.train}"
    experts = []
    t_experts = 0.0
    for k in range(a.experts):
        path = work / f"expert_{k}.h5"
        if not path.exists():
            t_experts += call("experts", "--train", train, "--test", test, "--out", path, "--seed", k,
                              "--epochs", a.expert_epochs_train, "--device", a.device, "--model", a.model,
                              "--lr", a.expert_lr, "--batch-size", a.expert_batch)
        experts.append(path)
    batch = ["--batch-syn", a.batch_syn] if a.batch_syn else []
    if a.variants:
        runs_of = {v: (a.engine, variant_options(v, a)) for v in a.variants}
    else:
        runs_of = {e: (e, []) for e in a.engines}
    rows = []
    for seed in a.seeds:
        for name, (engine, options) in runs_of.items():
            out = work / f"syn_{name}_ipc{a.ipc}_s{seed}.h5"
            secs = call("distill", "--train", train, "--experts", *experts, "--out", out, "--ipc", a.ipc,
                        "--syn-steps", a.syn_steps, "--expert-epochs", a.expert_epochs, "--max-start-epoch", a.max_start_epoch,
                        "--lr-img", a.lr_img, "--lr-lr", a.lr_lr, "--lr-teacher", a.lr_teacher, *batch,
                        "--iterations", a.iterations, "--engine", engine, "--seed", seed, "--device", a.device,
                        "--metrics", work / f"metrics_{name}_ipc{a.ipc}_s{seed}.csv", "--checkpoint-every", a.iterations,
                        "--no-progress", "--restart", *options)
            runs = work / f"runs_{name}_ipc{a.ipc}_s{seed}.csv"
            call("evaluate", "--synthetic", out, "--test", test, "--arch", "distill", "--runs", a.runs,
                 "--epochs", a.eval_epochs, "--device", a.device, "--out", runs)
            with open(runs) as f:
                accs = [float(r["test_acc"]) for r in _csv.DictReader(line for line in f if not line.startswith("#"))]
            with open(work / f"metrics_{name}_ipc{a.ipc}_s{seed}.csv") as f:
                m = list(_csv.DictReader(line for line in f if not line.startswith("#")))
            last = [float(r["loss"]) for r in m[-20:]]
            rows.append((name, seed, statistics.mean(accs), statistics.pstdev(accs), statistics.mean(last), secs))
            print(f"{name} seed {seed}: {rows[-1][2]:.2f} %", file=sys.stderr, flush=True)
    print(f"{what}, {a.experts} {a.model} experts x {a.expert_epochs_train} epochs (lr {a.expert_lr:g}, batch "
          f"{a.expert_batch}; {t_experts:.0f} s), ipc {a.ipc}, "
          f"syn_steps {a.syn_steps}, expert_epochs {a.expert_epochs}, max_start {a.max_start_epoch}, "
          f"batch_syn {a.batch_syn or 'all'}, {a.iterations} iterations, lr_img {a.lr_img:g}, lr_lr {a.lr_lr:g}, "
          f"lr_teacher {a.lr_teacher:g}, device {a.device}; evaluation: {a.runs} runs x {a.eval_epochs} epochs")
    if a.variants:
        print(f"variants with engine {a.engine}: " + "; ".join(f"{v}: {' '.join(map(str, o)) or '-'}" for v, (_, o) in runs_of.items()))
        print()
        print("| variant | seeds | test accuracy % (mean +- std over seeds of the per-seed mean) | matching loss (last 20 it.) |")
        print("|---|---|---|---|")
        for name in runs_of:
            mine = [r for r in rows if r[0] == name]
            means = [r[2] for r in mine]
            spread = statistics.stdev(means) if len(means) > 1 else 0.0
            print(f"| {name} | {len(mine)} | {statistics.mean(means):.2f} +- {spread:.2f} | "
                  f"{statistics.mean(r[4] for r in mine):.4f} |")
        print()
    print(f"| {'variant' if a.variants else 'engine'} | seed | test accuracy % (mean +- std over runs) | matching loss (mean of last 20 it.) | distill seconds |")
    print("|---|---|---|---|---|")
    for engine, seed, mean, std, loss, secs in rows:
        print(f"| {engine} | {seed} | {mean:.2f} +- {std:.2f} | {loss:.4f} | {secs:.0f} |")
    return 0


# ---------------------------------------------------------------------------------------
# the student step: eager (before / after this change) vs each compile mode vs the floor
# ---------------------------------------------------------------------------------------
#: the settings timed (CIFAR-10 IPC 10, ImageNet-1K IPC 10 and 50; random data: time does not depend on the values)
ENGINE_SETTINGS = {
    "cifar10-ipc10": dict(model="convnet", width=128, resolution=32, classes=10, ipc=10, batch_syn=100, syn_steps=30),
    "in1k-ipc10": dict(model="convnet_d4", width=128, resolution=64, classes=1000, ipc=10, batch_syn=500, syn_steps=20),
    "in1k-ipc50": dict(model="convnet_d4", width=128, resolution=64, classes=1000, ipc=50, batch_syn=1000, syn_steps=30),
}
#: --toy: the same networks, tiny (checks that the script runs, in seconds, on a CPU)
TOY = dict(width=8, resolution=16, classes=10, ipc=2, batch_syn=10, syn_steps=3)
#: the engine of the commit before the compiled student step (the "before" column)
BASELINE_REV = "6cb807c"


def load_baseline(path: str | None, rev: str | None):
    """The matching module of another revision, imported from a file (``git show
    REV:tesla/matching.py``), or None."""
    import importlib.util
    import tempfile

    if path is None and rev is not None:
        done = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:tesla/matching.py"], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"no baseline: git show {rev}:tesla/matching.py failed ({done.stderr.strip()[:200]})", file=sys.stderr)
            return None
        handle = tempfile.NamedTemporaryFile("w", suffix="_matching_before.py", delete=False)
        handle.write(done.stdout)
        handle.close()
        path = handle.name
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("tesla_matching_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(torch.linalg.vector_norm(a.cpu() - b.cpu()) / torch.linalg.vector_norm(b.cpu()))


def _write(out: str | None, lines: list[str]) -> None:
    """Rewrite ``out`` with ``lines`` (a step killed at its time cap keeps what it measured)."""
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("\n".join(lines) + "\n")


def _engine_rows(runners: dict, failed: dict, first: dict, times: dict, results: dict, compilers: dict) -> list[str]:
    """One row per column of the engine table: those measured (median of the timed calls so far),
    those that failed, and those still waiting ("not measured yet")."""
    median = {k: statistics.median(v) for k, v in times.items() if v}
    ref, base = results.get("off"), median.get("before")
    rows = []
    for key in runners:
        if key in failed:
            rows.append(f"| {key} | failed: {failed[key]} | | | | | | |")
            continue
        if key not in median:
            build = f"{first[key]:.2f}" if key in first else "not measured yet"
            rows.append(f"| {key} | {build} | not measured yet | | | | | |")
            continue
        t = median[key]
        speed = f"{base / t:.2f}x" if base else "n/a"
        to_floor = f"{t / median['floor']:.2f}" if "floor" in median else "n/a"
        graphs = len(compilers[key].built) if compilers.get(key) is not None else "-"
        diff_x = diff_a = "-"
        if ref is not None and key not in ("floor", "off") and hasattr(results[key], "grad_images"):
            diff_x = f"{_rel(results[key].grad_images, ref.grad_images):.1e}"
            diff_a = f"{_rel(results[key].grad_alpha, ref.grad_alpha):.1e}"
        rows.append(f"| {key} | {first[key]:.2f} | {t:.4f} | {speed} | {to_floor} | {graphs} | {diff_x} | {diff_a} |")
    return rows


def engine_benchmark(argv: list[str]) -> int:
    """Seconds per distillation iteration: the engine before this change, the eager engine
    now (--compile off) and each compile mode, side by side in one process, and the floor (the
    same N plain forward+backward steps on the same minibatches and DSA samples).

        python bench/bench_distill.py engine --device cuda                 # the three ENGINE_SETTINGS
        python bench/bench_distill.py engine --device cpu --toy --modes off trace
    """
    from tesla.augment import DSA
    from tesla.matching import matching_gradients, plan_student_steps
    from tesla.models import build_model
    from tesla.parameters import flatten_params, functional_forward, param_layout
    from tesla.losses import training_loss
    from tesla.step_compiler import StepCompiler
    from tesla.student_steps import student_update

    p = argparse.ArgumentParser(prog="bench_distill.py engine")
    p.add_argument("--device", default="cpu")
    p.add_argument("--settings", nargs="+", default=list(ENGINE_SETTINGS), choices=list(ENGINE_SETTINGS))
    p.add_argument("--modes", nargs="+", default=["off", "cudagraph", "inductor", "inductor-cudagraph"],
                   help="compile modes to time (off = the eager engine now; 'trace' = the traced graph uncompiled)")
    p.add_argument("--engine", default="exact", choices=["exact", "tesla", "unroll"])
    p.add_argument("--repeats", type=int, default=3, help="timed iterations per column (median), after one warm-up")
    p.add_argument("--width", type=int, default=None, help="override the network width")
    p.add_argument("--syn-steps", type=int, default=None, help="override N")
    p.add_argument("--ipc", type=int, default=None, help="override the images per class")
    p.add_argument("--batch-syn", type=int, default=None, help="override batch_syn")
    p.add_argument("--toy", action="store_true", help=f"tiny sizes ({TOY}) to check the script runs")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--baseline", default=None, help="matching.py of the engine before (default: git show REV:...)")
    p.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the 'before' engine ('' for none)")
    p.add_argument("--no-floor", dest="floor", action="store_false")
    p.add_argument("--out", default=None, help="also write the tables to this file")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    before = load_baseline(a.baseline, a.baseline_rev or None)
    t_start = time.perf_counter()
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [
        f"Device: {machine}; torch {torch.__version__}; engine `{a.engine}`; DSA color_crop_cutout_flip_scale_rotate; "
        f"random images and snapshots; one warm-up call per column, then {a.repeats} timed iterations per column, "
        f"columns interleaved in a rotating order (median).",
        "",
    ]
    for name in a.settings:
        cfg = dict(ENGINE_SETTINGS[name])
        if a.toy:
            cfg.update(TOY)
        for key in ("width", "syn_steps", "ipc", "batch_syn"):
            if getattr(a, key) is not None:
                cfg[key] = getattr(a, key)
        torch.manual_seed(0)
        model = build_model(cfg["model"], channels=3, num_classes=cfg["classes"], resolution=cfg["resolution"],
                            width=cfg["width"]).to(device)
        layout = param_layout(model)

        def loss_fn(theta, x, y, model=model, layout=layout):
            return training_loss(functional_forward(model, theta, x, layout=layout), y)

        g = torch.Generator().manual_seed(1)
        theta_start = flatten_params(model, device=device)
        theta_target = theta_start + 0.01 * torch.randn(theta_start.shape, generator=g).to(device)
        n = cfg["ipc"] * cfg["classes"]
        images = torch.randn(n, 3, cfg["resolution"], cfg["resolution"], generator=g).to(device)
        labels = torch.arange(cfg["classes"]).repeat_interleave(cfg["ipc"]).to(device)
        dsa = DSA("color_crop_cutout_flip_scale_rotate")
        alpha, N, B = 0.01, cfg["syn_steps"], cfg["batch_syn"]
        args = (loss_fn, theta_start, theta_target, images, labels, alpha, N, B, dsa)

        def floor(seed):
            """N plain forward+backward steps (eager) on the same minibatches and DSA samples."""
            plan = plan_student_steps(n, N, B, images.shape[1:], dsa, torch.Generator().manual_seed(seed))
            theta, total, a_t = theta_start.clone(), torch.zeros_like(theta_start), torch.tensor(alpha, device=device)
            for step in plan:
                idx = step.indices.to(device)
                params = step.augmentation.to(device)
                theta, total = student_update(loss_fn, theta, total, images[idx], labels[idx], a_t,
                                              lambda x, params=params: dsa.apply(x, params))
            return theta

        runners: dict[str, Any] = {}
        compilers: dict[str, Any] = {}
        if before is not None:
            runners["before"] = lambda seed: before.matching_gradients(a.engine, *args, torch.Generator().manual_seed(seed))
        for mode in a.modes:
            compilers[mode] = None if mode == "off" else StepCompiler(mode)
            runners[mode] = lambda seed, c=compilers[mode]: matching_gradients(
                a.engine, *args, torch.Generator().manual_seed(seed), compiler=c)
        if a.floor:
            runners["floor"] = floor
        first: dict[str, float] = {}
        results: dict[str, Any] = {}
        failed: dict[str, str] = {}
        times: dict[str, list[float]] = {}
        head = [
            f"**{name}**: {cfg['model']} width {cfg['width']}, 3x{cfg['resolution']}x{cfg['resolution']}, "
            f"{cfg['classes']} classes, {n} images (ipc {cfg['ipc']}), batch_syn {B}, N = {N}, "
            f"{theta_start.numel():,} parameters",
            "",
            "| column | first call s (build) | s per iteration | before / this | / floor | graphs | dL/dX vs off | dL/dalpha vs off |",
            "|---|---|---|---|---|---|---|---|",
        ]

        def table(rounds: int) -> list[str]:
            """The setting's table with what is measured so far (written after every measurement)."""
            done = f"timed rounds done: {rounds} of {a.repeats}" if rounds < a.repeats else ""
            return [*head, *_engine_rows(runners, failed, first, times, results, compilers), "", *([done, ""] if done else [])]

        for key, run in runners.items():  # warm-up: tracing, compiling, capturing
            _sync(device)
            t0 = time.perf_counter()
            try:
                results[key] = run(0)
                _sync(device)
                first[key] = time.perf_counter() - t0
                times[key] = []
                print(f"{name}: {key} first call (builds graphs) {first[key]:.1f} s", flush=True)
            except Exception as exc:  # a mode that cannot run here is reported, not fatal
                failed[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                print(f"{name}: {key} failed: {failed[key]}", file=sys.stderr)
            _write(a.out, lines + table(0))
        order = list(first)
        for r in range(a.repeats):
            for key in order[r % len(order):] + order[: r % len(order)]:  # rotated: no column always first
                _sync(device)
                t0 = time.perf_counter()
                runners[key](r + 1)
                _sync(device)
                times[key].append(time.perf_counter() - t0)
            _write(a.out, lines + table(r + 1))
        lines += table(a.repeats)
        print("\n".join(table(a.repeats)), flush=True)
        del runners, compilers, results, images
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return _report(lines, t_start, a.out)


# ---------------------------------------------------------------------------------------
# precision: the exact gradient in lower precisions against float64
# ---------------------------------------------------------------------------------------
def _rounded(t: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """float32 -> nearest float32 with ``mantissa_bits`` explicit mantissa bits (ties away from
    zero): TF32 keeps 10, bf16 7."""
    drop = 23 - mantissa_bits
    bits = t.contiguous().view(torch.int32)
    return ((bits + (1 << (drop - 1))) & ~((1 << drop) - 1)).view(torch.float32).view(t.shape)


def rounded_products(mantissa_bits: int):
    """A dispatch mode rounding the float32 operands of every convolution and matrix product,
    forward and backward (it sits below autograd), to ``mantissa_bits`` and accumulating in
    float32: what tensor cores do in TF32 (10 bits) or with bf16 operands (7 bits)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map

    aten = torch.ops.aten
    products = {aten.convolution.default, aten.convolution_backward.default, aten.mm.default, aten.addmm.default,
                aten.bmm.default}

    class RoundedProducts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in products:
                args = tree_map(lambda t: _rounded(t, mantissa_bits) if isinstance(t, torch.Tensor)
                                and t.dtype == torch.float32 else t, args)
            return func(*args, **(kwargs or {}))

    return RoundedProducts()


def precision_benchmark(argv: list[str]) -> int:
    """Relative error of the exact engine's dL/dX, dL/dalpha and L against float64, for float32
    and lower precisions runnable on the CPU: TF32 and bf16 product operands (emulated: operands
    rounded, float32 accumulation), bf16 and float16 autocast. The first-order (tesla) engine's
    distance from the exact gradient, in float64, is printed for scale.

        python bench/bench_distill.py precision [--width 128 --ipc 1 --syn-steps 10 --seeds 3]
    """
    import contextlib

    from tesla.augment import DSA
    from tesla.matching import matching_gradients
    from tesla.models import build_model
    from tesla.parameters import flatten_params, functional_forward, param_layout
    from tesla.losses import training_loss
    from tesla.step_compiler import StepCompiler

    p = argparse.ArgumentParser(prog="bench_distill.py precision")
    p.add_argument("--model", default="convnet")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--norm", default="instancenorm", help="ConvNet norm: instancenorm (the paper's) or none")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--batch-syn", type=int, default=None, help="default: all images")
    p.add_argument("--syn-steps", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.01)
    p.add_argument("--target", choices=("noise", "sgd"), default="noise",
                   help="theta*_{t+M}: theta*_t + 0.01 N(0, 1) noise, or 20 SGD steps (lr 0.01) on random images, "
                        "an expert-like move")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--inductor", action="store_true", help="also float32 with the inductor-compiled step (minutes)")
    p.add_argument("--kinks", action="store_true",
                   help="count the ReLU inputs of the forward sweep that float32 puts on the other side of 0 than float64")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    compiler = StepCompiler("inductor") if a.inductor else None
    variants = {
        "float32": (torch.float32, contextlib.nullcontext),
        "TF32 operands (emulated)": (torch.float32, lambda: rounded_products(10)),
        "bf16 operands (emulated)": (torch.float32, lambda: rounded_products(7)),
        "bf16 autocast": (torch.float32, lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
        "float16 autocast": (torch.float32, lambda: torch.autocast("cpu", dtype=torch.float16)),
    }
    if compiler is not None:
        variants["float32, inductor-compiled step"] = (torch.float32, contextlib.nullcontext)
    errors: dict[str, list[tuple[float, float, float]]] = {k: [] for k in [*variants, "first order (tesla), float64"]}
    kinks: list[str] = []
    t_start = time.perf_counter()
    n = a.ipc * a.classes
    batch_syn = a.batch_syn or n
    for seed in range(a.seeds):
        torch.manual_seed(seed)
        model = build_model(a.model, channels=3, num_classes=a.classes, resolution=a.resolution, width=a.width,
                            norm=a.norm).double()
        layout = param_layout(model)
        g = torch.Generator().manual_seed(100 + seed)
        theta_start = flatten_params(model, dtype=torch.float64)
        images = torch.randn(n, 3, a.resolution, a.resolution, generator=g, dtype=torch.float64)
        labels = torch.arange(a.classes).repeat_interleave(a.ipc)
        if a.target == "noise":
            theta_target = theta_start + 0.01 * torch.randn(theta_start.shape, generator=g, dtype=torch.float64)
        else:
            theta_target = theta_start.clone()
            for _ in range(20):
                x = torch.randn(32, 3, a.resolution, a.resolution, generator=g, dtype=torch.float64)
                y = torch.randint(a.classes, (32,), generator=g)
                t = theta_target.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(training_loss(functional_forward(model, t, x, layout=layout), y), t)
                theta_target = theta_target - 0.01 * grad
        dsa = DSA("color_crop_cutout_flip_scale_rotate")

        def run(engine, dtype, context, compiler=None, relu_inputs=None):
            m = model.to(dtype)
            hooks = []
            if relu_inputs is not None:  # the ReLU inputs of the first N forwards: the forward sweep's
                forwards = [0]

                def record(module, inputs):
                    if forwards[0] < a.syn_steps:
                        relu_inputs.append(inputs[0].detach().double())

                def counted(*args):
                    forwards[0] += 1

                hooks = [r.register_forward_pre_hook(record) for r in m.modules() if isinstance(r, torch.nn.ReLU)]
                hooks.append(m.register_forward_hook(counted))

            def loss_fn(theta, x, y):
                return training_loss(functional_forward(m, theta, x, layout=layout), y)

            try:
                with context():
                    return matching_gradients(engine, loss_fn, theta_start.to(dtype), theta_target.to(dtype),
                                              images.to(dtype), labels, a.alpha, a.syn_steps, batch_syn, dsa,
                                              torch.Generator().manual_seed(seed), compiler=compiler)
            finally:
                for h in hooks:
                    h.remove()

        if a.kinks:
            acts64, acts32 = [], []
            run("exact", torch.float64, contextlib.nullcontext, relu_inputs=acts64)
            run("exact", torch.float32, contextlib.nullcontext, relu_inputs=acts32)
            flips = [(x64, (x64 > 0) != (x32 > 0)) for x64, x32 in zip(acts64, acts32)]
            flipped = torch.cat([x64[f] for x64, f in flips])
            total = sum(f.numel() for _, f in flips)
            kinks.append(f"seed {seed}: {flipped.numel()} of {total:,} ReLU inputs of the forward sweep on the other "
                         f"side of 0 in float32 (their float64 values: "
                         f"{', '.join(f'{v:.1e}' for v in flipped[:6].tolist()) or 'none'})")
        ref = run("exact", torch.float64, contextlib.nullcontext)
        for name, (dtype, context) in variants.items():
            r = run("exact", dtype, context, compiler if "inductor" in name else None)
            errors[name].append((_rel(r.grad_images, ref.grad_images), _rel(r.grad_alpha, ref.grad_alpha),
                                 _rel(r.loss, ref.loss)))
        r = run("tesla", torch.float64, contextlib.nullcontext)
        errors["first order (tesla), float64"].append((_rel(r.grad_images, ref.grad_images),
                                                       _rel(r.grad_alpha, ref.grad_alpha), _rel(r.loss, ref.loss)))
        print(f"seed {seed} done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True)
    lines = [
        f"Exact engine against float64: {a.model} ({a.norm}) width {a.width}, 3x{a.resolution}x{a.resolution}, {a.classes} classes, "
        f"{n} images, batch_syn {batch_syn}, N = {a.syn_steps}, alpha {a.alpha:g}, DSA on, {a.seeds} seeds "
        f"(random network, target by {a.target}; max over seeds); torch {torch.__version__}, CPU.",
        "",
        "| precision | dL/dX rel. error | dL/dalpha rel. error | L rel. error |",
        "|---|---|---|---|",
    ]
    for name, errs in errors.items():
        worst = [max(e[k] for e in errs) for k in range(3)]
        lines.append(f"| {name} | {worst[0]:.1e} | {worst[1]:.1e} | {worst[2]:.1e} |")
    if kinks:
        lines += ["", *kinks]
    return _report(lines, t_start, a.out)


if __name__ == "__main__":
    commands = {"compare": compare_engines, "engine": engine_benchmark, "precision": precision_benchmark}
    sys.exit(commands[sys.argv[1]](sys.argv[2:]) if sys.argv[1:2] and sys.argv[1] in commands else main())
