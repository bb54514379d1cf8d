"""Seconds per evaluation run: ConvNet-3 on CIFAR-10-sized sets (32x32x3, 10 classes).

For IPC 1, 10 and 50 a synthetic set of random images (timing does not depend on the
pixel values) is trained with the evaluation protocol (SGD momentum 0.9, weight decay
5e-4, batch 256, DSA on every batch) through ``tesla.evaluation.train_fresh_network``
(the one training loop) for a reduced number of epochs; the seconds per epoch are
extrapolated to the protocol's 1000 epochs, and the final test pass over 10,000 images
(``training.accuracy``: batches of 1024, no gradients) is timed once and added.

``--vmap`` also measures whether several runs of the same network trained *together*
(``torch.func.vmap`` over stacked parameters, one SGD step per run) would be faster than
the same steps run one after the other: forward + backward of R networks on R batches.

``--groups`` measures what ``tesla evaluate --group-mode`` does: the R runs of one job
through ``tesla.evaluation.train_runs`` (the whole protocol: momentum, weight decay, DSA,
lr decay) in each group mode, side by side (modes interleaved round by round), per IPC;
seconds per run = group seconds / R.

    .venv/bin/python bench/bench_evaluate.py --epochs 20 --vmap
    .venv/bin/python bench/bench_evaluate.py --groups --runs 5 --epochs 4 --ipc 1 10 50 --rounds 2
"""

from __future__ import annotations

import argparse
import time

import torch

from tesla.devices import pick_device
from tesla.evaluation import PAPER_DSA_STRATEGY, Protocol, train_fresh_network
from tesla.models import build_from_spec, model_spec
from tesla.training import accuracy


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_run(ipc: int, epochs: int, device: torch.device, spec: dict) -> float:
    """Seconds for ``epochs`` epochs of the protocol on 10*ipc images (after one warm-up epoch)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10 * ipc, 3, 32, 32, generator=g).to(device)
    y = torch.arange(10).repeat_interleave(ipc).to(device)
    warm = Protocol(epochs=1, lr=0.01, dsa_strategy=PAPER_DSA_STRATEGY)
    train_fresh_network(spec, x, y, warm, g, init_seed=0, device=device)
    protocol = Protocol(epochs=epochs, lr=0.01, dsa_strategy=PAPER_DSA_STRATEGY)
    sync(device)
    start = time.perf_counter()
    train_fresh_network(spec, x, y, protocol, g, init_seed=0, device=device)
    sync(device)
    return time.perf_counter() - start


def time_test(device: torch.device, spec: dict, n: int = 10000) -> float:
    model = build_from_spec(spec).to(device)
    x = torch.randn(n, 3, 32, 32).to(device)
    y = torch.randint(0, 10, (n,)).to(device)
    accuracy(model, x[:1024], y[:1024])
    sync(device)
    start = time.perf_counter()
    accuracy(model, x, y)
    sync(device)
    return time.perf_counter() - start


def time_vmap(spec: dict, runs: int, batch: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(sequential, vmapped) seconds for ``steps`` forward+backward passes of ``runs`` networks."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    models = [build_from_spec(spec).to(device) for _ in range(runs)]
    x = torch.randn(runs, batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (runs, batch), device=device)

    def loss(params, buffers, xb, yb):
        return torch.nn.functional.cross_entropy(functional_call(models[0], (params, buffers), (xb,)), yb)

    def sequential() -> None:
        for r, m in enumerate(models):
            m.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x[r]), y[r]).backward()

    params, buffers = stack_module_state(models)
    batched = vmap(grad(loss), in_dims=(0, 0, 0, 0))

    out = []
    for fn in (sequential, lambda: batched(params, buffers, x, y)):
        fn()
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return out[0], out[1]


def time_groups(ipc: int, runs: int, epochs: int, modes: list[str], rounds: int, device: torch.device,
                spec: dict) -> dict[str, float]:
    """Median seconds per run of R runs trained as one group, per group mode (interleaved)."""
    import statistics

    from tesla.evaluation import NetworkSpace, Subject, train_runs
    from tesla.input_space import InputSpace, Normalization

    g = torch.Generator().manual_seed(0)
    x = torch.randn(10 * ipc, 3, 32, 32, generator=g).to(device)
    y = torch.arange(10).repeat_interleave(ipc).to(device)
    space = NetworkSpace("bench", 10, 3, 32, [str(c) for c in range(10)], InputSpace(Normalization("split", (0.0,) * 3, (1.0,) * 3)))
    subject = Subject(method="tesla", engine="exact", ipc=ipc, lr=0.01, dsa_strategy=PAPER_DSA_STRATEGY, space=space,
                      draw=lambda generator: (x, y), soft_labels=False, num_images=len(x), source="random")
    protocol = Protocol(epochs=epochs, lr=0.01, dsa_strategy=PAPER_DSA_STRATEGY)
    warm = Protocol(epochs=1, lr=0.01, dsa_strategy=PAPER_DSA_STRATEGY)
    for mode in modes:
        train_runs(subject, spec, warm, runs, 0, device, progress=False, group_mode=mode)
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode in modes:
            sync(device)
            start = time.perf_counter()
            train_runs(subject, spec, protocol, runs, 0, device, progress=False, group_mode=mode)
            sync(device)
            seconds[mode].append((time.perf_counter() - start) / runs)
    return {mode: statistics.median(v) for mode, v in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20, help="epochs actually timed (extrapolated to 1000)")
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--vmap", action="store_true", help="also compare sequential and vmapped runs")
    parser.add_argument("--model", default="convnet", help="network for 32 x 32 x 3 inputs, 10 classes (default ConvNet-3)")
    parser.add_argument("--groups", action="store_true",
                        help="only compare the group modes of train_runs (the runs of one tesla evaluate job)")
    parser.add_argument("--runs", type=int, default=5, help="with --groups: runs per job")
    parser.add_argument("--modes", nargs="+", default=["sequential", "streams", "vmap"], help="with --groups: group modes")
    parser.add_argument("--rounds", type=int, default=2, help="with --groups: measurements per mode (median)")
    args = parser.parse_args()
    device = pick_device(args.device)
    spec = model_spec(args.model, channels=3, num_classes=10, resolution=32)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.groups:
        print(f"{args.runs} runs per job, {args.epochs} epochs each, {args.model}, batch 256, median of {args.rounds} "
              "interleaved rounds; seconds per run (group seconds / runs)")
        print("| IPC | " + " | ".join(args.modes) + " | " + " | ".join(f"sequential / {m}" for m in args.modes[1:]) + " |")
        print("|---|" + "---|" * (2 * len(args.modes) - 1))
        for ipc in args.ipc:
            t = time_groups(ipc, args.runs, args.epochs, args.modes, args.rounds, device, spec)
            ratios = " | ".join(f"{t[args.modes[0]] / t[m]:.2f}" for m in args.modes[1:])
            print(f"| {ipc} | " + " | ".join(f"{t[m]:.3f} s" for m in args.modes) + f" | {ratios} |", flush=True)
        return
    test_seconds = time_test(device, spec)
    print(f"test pass, 10,000 images: {test_seconds:.2f} s")
    print("| IPC | images | epochs timed | s/epoch | s per run at 1000 epochs (extrapolated, incl. test) |")
    print("|---|---|---|---|---|")
    for ipc in args.ipc:
        seconds = time_run(ipc, args.epochs, device, spec)
        per_epoch = seconds / args.epochs
        print(f"| {ipc} | {10 * ipc} | {args.epochs} | {per_epoch:.4f} | {1000 * per_epoch + test_seconds:.0f} |")
    if args.vmap:
        for batch in (10, 100):
            seq, vm = time_vmap(spec, runs=5, batch=batch, steps=5, device=device)
            print(f"5 networks x batch {batch}, 5 fwd+bwd steps: sequential {seq:.3f} s, vmap {vm:.3f} s (ratio {seq / vm:.2f})")


if __name__ == "__main__":
    main()
