"""One matching iteration over G processes (torch.distributed) against one process, side by side.

Run under torchrun; every rank builds the same synthetic problem (bench_distill.build_problem:
a ConvNet student, random images, DSA on). Then, in ONE job:

1. the G-process iteration: ``--repeats`` timed calls of ``matching_gradients`` over all ranks,
   counting every all-reduce (elements and bytes of payload; a ring all-reduce sends
   2 (G - 1) / G of it per rank);
2. the same work in one process: rank 0 alone runs the same calls while the other ranks wait
   in a barrier (on a shared CPU they would otherwise compete for its cores);

and rank 0 prints a markdown table: seconds per iteration (median), the ratio G-process /
one-process, and the bytes each rank sends per iteration, with the formula they follow::

    exact:  2 N P + R (C H W [+ K]) + 1  floats all-reduced (N forward, N Hessian-vector sums)
    tesla:    N P + R (C H W [+ K]) + 1                     (no Hessian-vector products)
    + n K per iteration with TESLA's soft labels (the labelling pass, not timed here)

(P parameters, R the rows the iteration's minibatches touch, K classes with learned labels).

    python -m torch.distributed.run --standalone --nproc-per-node 2 bench/bench_distributed.py       # CPU, gloo
    torchrun --standalone --nproc-per-node 8 bench/bench_distributed.py --device cuda --model convnet_d4 \\
        --resolution 64 --classes 1000 --ipc 50 --batch-syn 1000 --width 128 --syn-steps 30 --no-single

On GPUs ``--no-single`` skips the one-process comparison (each G is its own launch; see
bench/gpu_distributed.sh, which runs G = 1, 2, 4, 8 and tabulates the speed-up).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from bench_distill import build_problem  # noqa: E402
from tesla.distributed import SINGLE, Ranks, join, leave  # noqa: E402
from tesla.matching import matching_gradients  # noqa: E402


class Counted:
    """Ranks.sum, counting what it all-reduces (elements and calls)."""

    def __init__(self) -> None:
        self.elements = self.bytes = self.calls = 0
        self._sum = Ranks.sum

    def install(self) -> None:
        counter = self

        def counted_sum(ranks: Ranks, tensor: torch.Tensor, what: str = "summing over the processes") -> torch.Tensor:
            if ranks.distributed:
                counter.elements += tensor.numel()
                counter.bytes += tensor.numel() * tensor.element_size()
                counter.calls += 1
            return counter._sum(ranks, tensor, what)

        Ranks.sum = counted_sum

    def reset(self) -> None:
        self.elements = self.bytes = self.calls = 0


def iteration(problem, args, ranks: Ranks, seed: int) -> tuple[float, float]:
    """Wall seconds of one matching call (the device synchronised at both ends) and the CPU
    seconds of all ranks' processes (every thread, gloo's included) during it."""
    loss_fn, theta_start, theta_target, images, labels, dsa, _ = problem
    sync = torch.cuda.synchronize if images.device.type == "cuda" else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    matching_gradients(
        args.engine, loss_fn, theta_start, theta_target, images, labels, 0.01, args.syn_steps, args.batch_syn, dsa,
        torch.Generator().manual_seed(seed), learn_labels=args.labels == "learned", ranks=ranks,
    )
    sync()
    wall = time.perf_counter() - t0
    cpu = torch.tensor([time.process_time() - c0], dtype=torch.float64, device=ranks.device_for_collectives())
    if ranks.distributed:
        import torch.distributed as dist

        dist.all_reduce(cpu)  # not counted: the benchmark's own sum
    return wall, float(cpu)


def timed(problem, args, ranks: Ranks) -> tuple[float, float]:
    """Median wall and CPU seconds per iteration over --repeats calls, after one warm-up call."""
    iteration(problem, args, ranks, seed=0)
    runs = [iteration(problem, args, ranks, seed=1 + k) for k in range(args.repeats)]
    return statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)


def expected_floats(args, params: int, touched: int, shape) -> int:
    """The all-reduced floats of one iteration, from the formula in the docstring."""
    per_row = int(torch.Size(shape[1:]).numel()) + (args.classes if args.labels == "learned" else 0)
    sweeps = 2 if args.engine == "exact" else 1
    return sweeps * args.syn_steps * params + touched * per_row + 1


def touched_rows(args, n: int) -> int:
    from tesla.matching import plan_student_steps

    plan = plan_student_steps(n, args.syn_steps, args.batch_syn, (1,), None, torch.Generator().manual_seed(1))
    return int(torch.unique(torch.cat([s.indices for s in plan])).numel())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--engine", default="exact", choices=("exact", "tesla"))
    p.add_argument("--labels", default="hard", choices=("hard", "soft", "learned"))
    p.add_argument("--model", default="convnet")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--batch-syn", type=int, default=100)
    p.add_argument("--syn-steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--no-single", action="store_true", help="skip the one-process comparison")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.point_labels = args.labels
    torch.set_num_threads(args.threads)
    ranks = join(args.device)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device.startswith("cuda") else torch.device(args.device)
    problem = build_problem(args, device)
    counter = Counted()
    counter.install()
    many, many_cpu = timed(problem, args, ranks)
    calls_per_iteration = counter.calls / (args.repeats + 1)
    floats = counter.elements / (args.repeats + 1)
    payload = counter.bytes / (args.repeats + 1)
    one = one_cpu = None
    if not args.no_single and ranks.distributed:
        if ranks.writes:
            one, one_cpu = timed(problem, args, SINGLE)
        ranks.barrier()
    if ranks.writes:
        g = ranks.world_size
        n = args.ipc * args.classes
        expected = expected_floats(args, problem[-1], touched_rows(args, n), problem[3].shape)
        lines = [
            f"**{args.engine}, {args.labels} labels**: {args.model} width {args.width}, {args.resolution} px, {args.classes} classes, "
            f"IPC {args.ipc} ({n} images), batch_syn {args.batch_syn}, N = {args.syn_steps}, P = {problem[-1]:,} parameters, "
            f"{g} process(es) ({ranks.backend}), {args.device}, {args.threads} thread(s) each",
            "",
            "| processes | s / iteration | ratio to 1 process | CPU s / iteration (all ranks) | CPU ratio | "
            "all-reduces / iteration | floats all-reduced | payload MB | sent per rank MB (ring) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        ring = 2 * (g - 1) / g * payload
        ratio = f"{many / one:.2f}" if one else "-"
        cpu_ratio = f"{many_cpu / one_cpu:.2f}" if one_cpu else "-"
        lines.append(f"| {g} | {many:.4f} | {ratio} | {many_cpu:.4f} | {cpu_ratio} | {calls_per_iteration:.0f} | {floats:,.0f} | "
                     f"{payload / 1e6:.3f} | {ring / 1e6:.3f} |")
        if one:
            lines.append(f"| 1 (same job, rank 0 alone) | {one:.4f} | 1.00 | {one_cpu:.4f} | 1.00 | 0 | 0 | 0 | 0 |")
        lines += ["", f"Formula: {expected:,} floats all-reduced per iteration; counted: {floats:,.0f}."]
        text = "\n".join(lines) + "\n"
        print(text)
        if args.out:
            args.out.write_text(text)
    leave(ranks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
