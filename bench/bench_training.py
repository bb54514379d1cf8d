"""Training throughput: tesla's in-memory loop against a conventional DataLoader loop.

Both train the same network (ConvNet-3 for 32 x 32 x 3 inputs, 10 classes, same
initialisation) with the same optimizer (SGD lr 0.01, batch 256) on the same CIFAR-10
images, one epoch over ``--images`` images per measurement, in one process, methods
interleaved round by round so that load from other processes hits them alike, after ``--warmup``
unmeasured epochs of each (CUDA kernel selection, first-call paths):

* ``tesla``: ``tesla.training.train`` as ``tesla experts`` runs it -- the split as one uint8
  tensor on the device, minibatches by index permutation, normalised and augmented by DSA
  (one family per batch, the expert default) on the device, whole batch at a time;
* ``tesla crop_flip``: the same with DSA ``crop_flip`` (the baseline's transforms);
* ``tesla no-aug``: the same without augmentation (the network's own cost: an upper bound);
* ``dataloader wN``: a ``torch.utils.data.DataLoader`` (shuffle, ``num_workers=N``) over a
  map-style Dataset that holds uint8 images and applies per-sample torchvision transforms
  (PIL image -> RandomCrop(S, padding S/8) -> RandomHorizontalFlip -> ToTensor ->
  Normalize), batches moved to the device, ``loss.item()`` per step.

Reported per method: images per wall-clock second (median over rounds) and images per
CPU-second (user + system time of the process and its DataLoader workers), the latter being
the fairer figure on a machine shared with other work.

Images come from a prepared ``train.h5`` (``--train``) or, failing that, straight from the
shared CIFAR-10 tar (``--tar``; the first ``--images`` JPEGs, decoded with PIL).

    python bench/bench_training.py --tar ../shared/datasets/cifar10-jpg.tar --images 5120 --rounds 2

``--matrix`` measures instead expert images/s (all networks of a process together) of
today's path -- one expert per process, ``tesla.training.train`` with torch's default
arithmetic -- against ``tesla.group_training.train_group`` for every combination of group mode x
K networks x precision x memory format (x TF32 on a GPU), as ``tesla experts`` runs them:
random uint8 images held on the device, normalised per minibatch, DSA (the expert default)
on every batch, SGD lr 0.01, one epoch of ``--images`` images per network per measurement,
configurations interleaved round by round after one short warm-up each. Networks:
``--matrix-models NAME:RESOLUTION:CLASSES ...`` (default ConvNet-3 on CIFAR-10 shapes and
ConvNetD4 at 64 px with 1000 classes).

    python bench/bench_training.py --matrix --device cpu --images 128 --batch-size 64 --rounds 2 \
        --k 1 2 4 --modes sequential vmap --precisions float32 --layouts contiguous channels_last
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tesla.augment import DSA
from tesla.data import ImageSplit
from tesla.devices import pick_device
from tesla.models import build_model
from tesla.input_space import InputSpace
from tesla.normalizations import Normalization
from tesla.training import train


def network_input(mean, std, device):
    """The experts' per-minibatch map uint8 N x H x W x C -> normalised float N x C x H x W."""
    return InputSpace(Normalization("split", tuple(mean), tuple(std))).minibatch_transform(device)


def load_images(args) -> tuple[np.ndarray, np.ndarray, list[float], list[float], str]:
    """uint8 N x 32 x 32 x 3 images, int64 labels, per-channel mean/std, and where they came from."""
    if args.synthetic:
        rng = np.random.default_rng(0)
        r = args.resolution
        x = rng.integers(0, 256, size=(args.images, r, r, 3), dtype=np.uint8)
        return x, rng.integers(0, args.classes, size=args.images), [0.5] * 3, [0.25] * 3, "synthetic uint8 (--synthetic)"
    if args.train and Path(args.train).exists():
        split = ImageSplit.open(args.train)
        idx = np.sort(np.random.default_rng(0).choice(split.num_images, size=min(args.images, split.num_images), replace=False))
        return split.images_uint8(idx), split.labels[idx], split.mean, split.std, str(args.train)
    if args.tar and Path(args.tar).exists():
        from PIL import Image

        images, labels, classes = [], [], {}
        with tarfile.open(args.tar) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("train/") and m.name.endswith(".jpg")]
            members.sort(key=lambda m: m.name)
            rng = np.random.default_rng(0)
            pick = np.sort(rng.choice(len(members), size=min(args.images, len(members)), replace=False))
            for i in pick:
                m = members[i]
                cls = m.name.split("/")[1]
                labels.append(classes.setdefault(cls, len(classes)))
                images.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")))
        x = np.stack(images)
        flat = x.reshape(-1, 3) / 255.0
        return x, np.asarray(labels, dtype=np.int64), list(flat.mean(0)), list(flat.std(0)), str(args.tar)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(args.images, 32, 32, 3), dtype=np.uint8)
    return x, rng.integers(0, 10, size=args.images), [0.5] * 3, [0.25] * 3, "synthetic uint8 (no data found)"


#: the network measured (``--model``, ``--resolution``, ``--classes``); ConvNet-3 on CIFAR-10 sizes by default
MODEL_SPEC = dict(name="convnet", channels=3, num_classes=10, resolution=32)


def fresh_model(device) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(MODEL_SPEC["name"], channels=MODEL_SPEC["channels"], num_classes=MODEL_SPEC["num_classes"],
                       resolution=MODEL_SPEC["resolution"]).to(device)


def run_tesla(images, labels, mean, std, device, strategy: str | None, batch: int) -> tuple[float, float]:
    """(wall, CPU) seconds for one epoch of tesla.training.train as experts run it: uint8 images on the
    device, normalised per minibatch there (loading to the device is not timed)."""
    x = torch.from_numpy(images).to(device)
    y = torch.from_numpy(labels).to(device)
    to_input = network_input(mean, std, device)
    model = fresh_model(device)
    dsa = DSA(strategy) if strategy else None
    sync(device)
    t0, c0 = time.perf_counter(), cpu_seconds()
    train(model, x, y, epochs=1, lr=0.01, batch_size=batch, dsa=dsa, generator=torch.Generator().manual_seed(0),
          input_transform=to_input)
    sync(device)
    return time.perf_counter() - t0, cpu_seconds() - c0


class PerSampleDataset(torch.utils.data.Dataset):
    """The conventional map-style dataset: uint8 images, per-sample torchvision transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std) -> None:
        import torchvision.transforms as T

        self.images, self.labels = images, labels
        size = images.shape[1]
        self.transform = T.Compose(
            [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def run_dataloader(images, labels, mean, std, device, workers: int, batch: int) -> tuple[float, float]:
    """(wall, CPU) seconds for one epoch of the conventional loop (worker start-up included, as in real use)."""
    model = fresh_model(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader(
        PerSampleDataset(images, labels, mean, std), batch_size=batch, shuffle=True, num_workers=workers,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0),
    )
    model.train()
    sync(device)
    t0, c0 = time.perf_counter(), cpu_seconds()
    for xb, yb in loader:
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()
    sync(device)
    wall = time.perf_counter() - t0
    del loader  # workers exit and are reaped, so their CPU time is counted
    return wall, cpu_seconds() - c0


def data_tesla(images, labels, mean, std, device, strategy: str | None, batch: int) -> tuple[float, float]:
    """(wall, CPU) seconds to produce one epoch of network-ready augmented batches, tesla's way."""
    from tesla.training import minibatches

    x = torch.from_numpy(images).to(device)
    y = torch.from_numpy(labels).to(device)
    to_input = network_input(mean, std, device)
    dsa = DSA(strategy) if strategy else None
    g = torch.Generator().manual_seed(0)
    sync(device)
    t0, c0 = time.perf_counter(), cpu_seconds()
    for idx in minibatches(len(x), batch, g, device):
        xb, yb = to_input(x[idx]), y[idx]
        if dsa is not None:
            xb, _ = dsa(xb, g)
    sync(device)
    return time.perf_counter() - t0, cpu_seconds() - c0


def data_dataloader(images, labels, mean, std, device, workers: int, batch: int) -> tuple[float, float]:
    """(wall, CPU) seconds to produce one epoch of batches on the device with the DataLoader."""
    loader = torch.utils.data.DataLoader(
        PerSampleDataset(images, labels, mean, std), batch_size=batch, shuffle=True, num_workers=workers,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0),
    )
    sync(device)
    t0, c0 = time.perf_counter(), cpu_seconds()
    for xb, yb in loader:
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
    sync(device)
    wall = time.perf_counter() - t0
    del loader
    return wall, cpu_seconds() - c0


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------
# --matrix: several experts per process, precision and memory format
# --------------------------------------------------------------------------------------
def _tf32_state():
    """torch's TF32 settings as they are (the default of a fresh process: today's path)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):
        return ("new", matmul.fp32_precision, cudnn.conv.fp32_precision)
    return ("old", matmul.allow_tf32, cudnn.allow_tf32)  # pragma: no cover - torch < 2.9


def _restore_tf32(state) -> None:
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if state[0] == "new":
        matmul.fp32_precision, cudnn.conv.fp32_precision = state[1], state[2]
    else:  # pragma: no cover - torch < 2.9
        matmul.allow_tf32, cudnn.allow_tf32 = state[1], state[2]


def matrix_configs(args, device) -> list[dict]:
    """today's path, then every valid (mode, K, precision, layout, tf32) combination."""
    import itertools

    from tesla.precision import has_tf32

    tf32s = [None] if not has_tf32(device) else [{"on": True, "off": False}[t] for t in args.tf32]
    configs = [dict(name="today: one expert per process (training.train, torch defaults)", today=True, k=1)]
    for mode, k, precision, layout, tf32 in itertools.product(args.modes, args.k, args.precisions, args.layouts, tf32s):
        if mode == "vmap" and layout == "channels_last":
            continue  # grouped convolutions have no channels-last layout (refused by train_group)
        tf32_text = "" if tf32 is None else (", TF32" if tf32 else ", no TF32")
        configs.append(dict(name=f"{mode}, K={k}, {precision}, {layout}{tf32_text}", today=False, mode=mode, k=k,
                            precision=precision, channels_last=layout == "channels_last", tf32=bool(tf32)))
    return configs


def run_matrix_config(config: dict, model_name: str, resolution: int, classes: int, x, y, device, batch: int,
                      default_tf32) -> tuple[float, float]:
    """(wall, CPU) seconds for one epoch of K networks on (x, y), as tesla experts trains them."""
    from tesla.precision import Numerics
    from tesla.group_training import train_group
    from tesla.training import GroupMember

    to_input = network_input([0.5] * 3, [0.25] * 3, device)
    dsa = DSA()
    models = []
    for k in range(config["k"]):
        torch.manual_seed(k)
        models.append(build_model(model_name, channels=3, num_classes=classes, resolution=resolution).to(device))
    if config["today"]:
        _restore_tf32(default_tf32)
        sync(device)
        t0, c0 = time.perf_counter(), cpu_seconds()
        today_train = TODAY_TRAIN[0] if TODAY_TRAIN else train
        today_train(models[0], x, y, epochs=1, lr=0.01, batch_size=batch, dsa=dsa,
                    generator=torch.Generator().manual_seed(0), input_transform=to_input)
    else:
        numerics = Numerics(config["precision"], config["tf32"], config["channels_last"])
        numerics.apply(device)
        members = [GroupMember(m, x, y, torch.Generator().manual_seed(k), name=f"net {k}") for k, m in enumerate(models)]
        sync(device)
        t0, c0 = time.perf_counter(), cpu_seconds()
        train_group(members, mode=config["mode"], epochs=1, lr=0.01, batch_size=batch, dsa=dsa, input_transform=to_input,
                    numerics=numerics)
    sync(device)
    return time.perf_counter() - t0, cpu_seconds() - c0


#: ``--today-from``: the train function of another checkout's training module (today's path)
TODAY_TRAIN: list = []


def load_train_function(path: Path):
    """``train`` from a training module file of another checkout (e.g. the main branch's
    tesla/training.py before this work), imported under its own name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("today_training", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["today_training"] = module
    spec.loader.exec_module(module)
    return module.train


def main_matrix(args) -> int:
    device = pick_device(args.device)
    if args.today_from is not None:
        TODAY_TRAIN.append(load_train_function(args.today_from))
    default_tf32 = _tf32_state()
    lines = [
        f"load average at the start: {' '.join(f'{v:.1f}' for v in os.getloadavg())}",
        f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; torch "
        f"{torch.__version__}; {torch.get_num_threads()} threads; batch {args.batch_size}; {args.images} random images per "
        f"network per measurement; DSA {DSA().strategy}; median of {args.rounds} interleaved rounds; today's path: "
        f"{args.today_from or 'this checkout'}'s training.train",
    ]
    print("\n".join(lines), flush=True)
    for entry in args.matrix_models:
        name, resolution, classes = entry.split(":")
        resolution, classes = int(resolution), int(classes)
        rng = np.random.default_rng(0)
        x = torch.from_numpy(rng.integers(0, 256, size=(args.images, resolution, resolution, 3), dtype=np.uint8)).to(device)
        y = torch.from_numpy(rng.integers(0, classes, size=args.images)).to(device)
        configs = matrix_configs(args, device)
        warm = max(1, min(args.images, 2 * args.batch_size))
        for config in configs:  # kernel selection, first-call paths: two minibatches each
            run_matrix_config(config, name, resolution, classes, x[:warm], y[:warm], device, args.batch_size, default_tf32)
        walls = {c["name"]: [] for c in configs}
        cpus = {c["name"]: [] for c in configs}
        for r in range(args.rounds):
            for config in configs:
                wall, cpu_s = run_matrix_config(config, name, resolution, classes, x, y, device, args.batch_size, default_tf32)
                walls[config["name"]].append(wall)
                cpus[config["name"]].append(cpu_s)
                print(f"round {r + 1}: {name} {config['name']}: {config['k'] * args.images / wall:.1f} images/s",
                      file=sys.stderr, flush=True)
                _write(args.out, lines + matrix_table(entry, configs, walls, cpus, args.images, args.rounds))
        table = matrix_table(entry, configs, walls, cpus, args.images, args.rounds)
        print("\n".join(table), flush=True)
        lines += table
    lines.append(f"\nload average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(lines[-1])
    _write(args.out, lines)
    return 0


def _write(out: Path | None, lines: list[str]) -> None:
    """Rewrite ``out`` with ``lines`` (a step killed at its time cap keeps what it measured)."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")


def matrix_table(entry: str, configs: list[dict], walls: dict, cpus: dict, images: int, rounds: int) -> list[str]:
    """The table of one ``MODEL:R:C`` entry: the median of the rounds measured so far per configuration
    (rows not measured yet are left out; the line under the table says how many rounds are in)."""
    name, resolution, classes = entry.split(":")
    done = [c for c in configs if walls[c["name"]]]
    rate = {c["name"]: c["k"] * images / statistics.median(walls[c["name"]]) for c in done}
    per_cpu = {c["name"]: c["k"] * images / statistics.median(cpus[c["name"]]) for c in done}
    today = configs[0]["name"]
    table = ["", f"{name} ({resolution} x {resolution} x 3, {classes} classes):", "",
             "| configuration | images/s, all networks (wall) | vs today | images per CPU-second | vs today |",
             "|---|---|---|---|---|"]
    for c in done:
        n = c["name"]
        vs, vs_cpu = (f"{rate[n] / rate[today]:.2f}x", f"{per_cpu[n] / per_cpu[today]:.2f}x") if today in rate else ("n/a", "n/a")
        table.append(f"| {n} | {rate[n]:.1f} | {vs} | {per_cpu[n]:.1f} | {vs_cpu} |")
    measured = min(len(walls[c["name"]]) for c in configs)
    if measured < rounds:
        table += ["", f"(measured so far: {sum(len(v) for v in walls.values())} of {rounds * len(configs)} runs; "
                      f"{len(done)} of {len(configs)} configurations)"]
    return table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=Path, default=None, help="a prepared CIFAR-10 train.h5 (preferred)")
    p.add_argument("--tar", type=Path, default=Path("../shared/datasets/cifar10-jpg.tar"), help="the shared CIFAR-10 tar")
    p.add_argument("--images", type=int, default=5120, help="images per measured epoch")
    p.add_argument("--rounds", type=int, default=2, help="measurements per method (interleaved)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured epochs per method before the rounds")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader num_workers values to measure")
    p.add_argument(
        "--strategies", nargs="+", default=["color_crop_cutout_flip_scale_rotate", "crop_flip", "none"],
        help="DSA strategies of the tesla loop to measure ('none': no augmentation)",
    )
    p.add_argument("--no-data-only", action="store_true", help="skip the input-pipeline-only measurement")
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default="convnet", help="network (default: ConvNet-3)")
    p.add_argument("--resolution", type=int, default=32, help="input side (with --synthetic)")
    p.add_argument("--classes", type=int, default=10, help="classes (with --synthetic)")
    p.add_argument("--synthetic", action="store_true",
                   help="random uint8 images of --resolution and --classes instead of CIFAR-10 (ImageNet-sized runs)")
    p.add_argument("--matrix", action="store_true",
                   help="measure several experts per process x precision x memory format instead (see the docstring)")
    p.add_argument("--matrix-models", nargs="+", default=["convnet:32:10", "convnet_d4:64:1000"],
                   help="with --matrix: NAME:RESOLUTION:CLASSES of each network measured")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8], help="with --matrix: networks per process")
    p.add_argument("--modes", nargs="+", default=["sequential", "streams", "vmap"], help="with --matrix: group modes")
    p.add_argument("--precisions", nargs="+", default=["float32", "bf16"], help="with --matrix: float32, bf16")
    p.add_argument("--layouts", nargs="+", default=["contiguous", "channels_last"], help="with --matrix: memory formats")
    p.add_argument("--tf32", nargs="+", default=["on", "off"], choices=["on", "off"],
                   help="with --matrix, on a GPU that has TF32: measure with it on and/or off")
    p.add_argument("--out", type=Path, default=None, help="with --matrix: also write the tables to this file")
    p.add_argument("--today-from", type=Path, default=None,
                   help="with --matrix: the tesla/training.py of another checkout whose train() is today's path "
                        "(default: this checkout's, with torch's default arithmetic)")
    args = p.parse_args()
    if args.matrix:
        return main_matrix(args)
    MODEL_SPEC.update(name=args.model, num_classes=args.classes if args.synthetic else 10,
                      resolution=args.resolution if args.synthetic else 32)
    device = pick_device(args.device)
    images, labels, mean, std, source = load_images(args)
    print(f"load average at the start: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"model: {MODEL_SPEC}; data: {len(images)} images {images.shape[1:]} from {source}; device {device}; torch {torch.__version__}; "
          f"{torch.get_num_threads()} threads; batch {args.batch_size}", flush=True)
    methods = {
        **{
            (f"tesla.training.train, DSA {s}" if s != "none" else "tesla.training.train, no augmentation"): (
                lambda s=s: run_tesla(images, labels, mean, std, device, None if s == "none" else s, args.batch_size)
            )
            for s in args.strategies
        },
        **{
            f"DataLoader, per-sample transforms, num_workers={w}": (lambda w=w: run_dataloader(images, labels, mean, std, device, w, args.batch_size))
            for w in args.workers
        },
    }
    if not args.no_data_only:
        data_methods = {
            **{f"data only: tesla gather + normalise + DSA {s}": (lambda s=s: data_tesla(images, labels, mean, std, device, None if s == "none" else s, args.batch_size)) for s in args.strategies if s != "none"},
            **{f"data only: DataLoader num_workers={w}": (lambda w=w: data_dataloader(images, labels, mean, std, device, w, args.batch_size)) for w in args.workers},
        }
        print("\n| input pipeline alone (no network) | images/s, wall (median of 3) | images per CPU-second |")
        print("|---|---|---|")
        for name, fn in data_methods.items():
            for _ in range(args.warmup):
                fn()
            runs = [fn() for _ in range(3)]
            wall = statistics.median(r[0] for r in runs)
            cpu_s = statistics.median(r[1] for r in runs)
            print(f"| {name} | {len(images) / wall:.0f} | {len(images) / max(cpu_s, 1e-9):.0f} |", flush=True)
    for _ in range(args.warmup):  # first calls pay for CUDA kernel selection and DataLoader start-up paths
        for name, fn in methods.items():
            fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(args.rounds):
        for name, fn in methods.items():
            wall, cpu_s = fn()
            times[name].append(wall)
            cpu[name].append(cpu_s)
            print(f"round {r + 1}: {name}: {len(images) / wall:.0f} images/s, {len(images) / cpu_s:.1f} images per CPU-second",
                  file=sys.stderr, flush=True)
    rate = {name: len(images) / statistics.median(ts) for name, ts in times.items()}
    per_cpu = {name: len(images) / statistics.median(cs) for name, cs in cpu.items()}
    baselines = [n for n in rate if n.startswith("DataLoader")]
    best = max(baselines, key=rate.get)
    best_cpu = max(baselines, key=per_cpu.get)
    print(f"\n| loop | images/s, wall (median of {args.rounds}) | vs best DataLoader | images per CPU-second | vs best DataLoader |")
    print("|---|---|---|---|---|")
    for name in methods:
        print(f"| {name} | {rate[name]:.1f} | {rate[name] / rate[best]:.2f}x | {per_cpu[name]:.1f} | "
              f"{per_cpu[name] / per_cpu[best_cpu]:.2f}x |")
    print(f"\nload average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
