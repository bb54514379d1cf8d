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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

ENGINES = ("exact", "tesla", "unroll")


def build_problem(args, device):
    from tesla.augment import DSA
    from tesla.models import build_model, flatten_params, functional_forward, param_layout
    from tesla.training import training_loss

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

    def loss_fn(theta, x, y):
        return training_loss(functional_forward(model, theta, x, layout=layout), y)

    dsa = DSA("color_crop_cutout_flip_scale_rotate")
    return loss_fn, theta_start, theta_target, images, labels, dsa, layout.total


def one_iteration(engine, problem, syn_steps, batch_syn, seed=0):
    from tesla.matching import matching_gradients

    loss_fn, theta_start, theta_target, images, labels, dsa, _ = problem
    return matching_gradients(
        engine, loss_fn, theta_start, theta_target, images, labels, 0.01, syn_steps, batch_syn, dsa,
        torch.Generator().manual_seed(seed),
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
    result = one_iteration(args.point_engine, problem, args.point_steps, args.batch_syn)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    out = dict(engine=args.point_engine, syn_steps=args.point_steps, seconds=seconds, loss=result.loss,
               params=problem[-1], rss_before_mb=before, rss_peak_mb=_rss_peak_mb())
    out["iteration_mb"] = out["rss_peak_mb"] - before
    if device.type == "cuda":
        out["cuda_peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return out


def run_point(args, engine, steps) -> dict:
    cmd = [sys.executable, __file__, "--point-engine", engine, "--point-steps", str(steps)] + args.passthrough
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
    points = {(e, n): run_point(args, e, n) for e in ENGINES for n in args.steps}
    speeds = timing(args)
    key = "cuda_peak_mb" if args.device.startswith("cuda") else "iteration_mb"
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
    lines += ["", f"Whole benchmark: {time.perf_counter() - t_start:.0f} s."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0




# ---------------------------------------------------------------------------------------
# exact vs tesla on real data at the same budget (the choice of the default engine)
# ---------------------------------------------------------------------------------------
def compare_engines(argv: list[str]) -> int:
    """prepare (demo digits, or a given dataset) -> experts -> distill with each engine -> evaluate,
    all through the command line, at the same budget for both engines.

        python bench/bench_distill.py compare --work /tmp/cmp [--iterations 200] [--ipc 1]
        python bench/bench_distill.py compare --work /tmp/cmp --train data/cifar10/train.h5 \
            --test data/cifar10/test.h5 --device cuda --ipc 10 --syn-steps 30 --iterations 400
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
    rows = []
    for seed in a.seeds:
        for engine in a.engines:
            out = work / f"syn_{engine}_ipc{a.ipc}_s{seed}.h5"
            secs = call("distill", "--train", train, "--experts", *experts, "--out", out, "--ipc", a.ipc,
                        "--syn-steps", a.syn_steps, "--expert-epochs", a.expert_epochs, "--max-start-epoch", a.max_start_epoch,
                        "--lr-img", a.lr_img, "--lr-lr", a.lr_lr, "--lr-teacher", a.lr_teacher, *batch,
                        "--iterations", a.iterations, "--engine", engine, "--seed", seed, "--device", a.device,
                        "--metrics", work / f"metrics_{engine}_ipc{a.ipc}_s{seed}.csv", "--checkpoint-every", a.iterations,
                        "--no-progress")
            runs = work / f"runs_{engine}_ipc{a.ipc}_s{seed}.csv"
            call("evaluate", "--synthetic", out, "--test", test, "--arch", "distill", "--runs", a.runs,
                 "--epochs", a.eval_epochs, "--device", a.device, "--out", runs)
            with open(runs) as f:
                accs = [float(r["test_acc"]) for r in _csv.DictReader(line for line in f if not line.startswith("#"))]
            with open(work / f"metrics_{engine}_ipc{a.ipc}_s{seed}.csv") as f:
                m = list(_csv.DictReader(line for line in f if not line.startswith("#")))
            last = [float(r["loss"]) for r in m[-20:]]
            rows.append((engine, seed, statistics.mean(accs), statistics.pstdev(accs), statistics.mean(last), secs))
    print(f"{what}, {a.experts} {a.model} experts x {a.expert_epochs_train} epochs (lr {a.expert_lr:g}, batch "
          f"{a.expert_batch}; {t_experts:.0f} s), ipc {a.ipc}, "
          f"syn_steps {a.syn_steps}, expert_epochs {a.expert_epochs}, max_start {a.max_start_epoch}, "
          f"batch_syn {a.batch_syn or 'all'}, {a.iterations} iterations, lr_img {a.lr_img:g}, lr_lr {a.lr_lr:g}, "
          f"lr_teacher {a.lr_teacher:g}, device {a.device}; evaluation: {a.runs} runs x {a.eval_epochs} epochs")
    print("| engine | seed | test accuracy % (mean +- std over runs) | matching loss (mean of last 20 it.) | distill seconds |")
    print("|---|---|---|---|---|")
    for engine, seed, mean, std, loss, secs in rows:
        print(f"| {engine} | {seed} | {mean:.2f} +- {std:.2f} | {loss:.4f} | {secs:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(compare_engines(sys.argv[2:]) if sys.argv[1:2] == ["compare"] else main())
