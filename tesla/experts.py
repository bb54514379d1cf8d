"""Train one expert network on the real training split and save its trajectory.

Expert k (``--seed k``) is a fresh network (initialised from seed k) trained with plain SGD
(lr 0.01, no momentum, no weight decay, batch 256, DSA on every batch; PAPER.md section 1)
for E epochs, on inputs x = T((u/255 - mean)/std) of the chosen input space
(``tesla.input_space``: ``--normalize``, and ``--zca`` whose file fixes the normalisation).
Its flat parameter vector is saved at initialisation and after every epoch,
theta*_0 .. theta*_E, in a ``tesla-trajectory`` file (docs/formats.md); ``--keep-snapshots
K`` keeps theta*_0 .. theta*_K only (K = the largest max_start_epoch + expert_epochs the
distillation will use).

A killed run resumes: after every epoch the model, optimizer and generator states and the
snapshots so far are saved in ``OUT.partial/``; running the same command again continues
from the last completed epoch, and the trajectory is bitwise identical to an uninterrupted
run on the same device (CPU).  OUT appears only when the run is complete.

Command line::

    tesla experts --train train.h5 --test test.h5 --out expert_K.h5 --seed K
                  [--model convnet] [--epochs 50] [--lr 0.01] [--batch-size 256]
                  [--dsa STRATEGY|none] [--normalize NAME] [--zca zca.h5] [--keep-snapshots N]
                  [--dtype float32|float16|bfloat16] [--device auto]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tesla.errors import TeslaError
from tesla.files import atomic_output
from tesla.locks import acquire
from tesla.trajectories import STORAGE_DTYPES, TrajectoryMeta, TrajectoryWriter

__all__ = ["ExpertConfig", "configure_parser", "derive_seed", "partial_dir", "run", "train_expert", "zca_fingerprint"]

PARTIAL_VERSION = 1


@dataclass
class ExpertConfig:
    """Everything that defines one expert run (the command line's options)."""

    train: Path
    test: Path
    out: Path
    seed: int
    model: str = "convnet"
    epochs: int = 50
    lr: float = 0.01
    batch_size: int = 256
    dsa: str = "color_crop_cutout_flip_scale_rotate"
    zca: Path | None = None
    normalize: str | None = None  # None: the ZCA file's normalisation, else 'split'
    keep_snapshots: int | None = None
    dtype: str = "float32"
    device: str = "auto"


class _Stop(Exception):
    """Raised from the epoch callback to end a run early (testing the resume)."""


def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one use of the run seed: SHA-256 of 'purpose:seed' (independent streams)."""
    return int.from_bytes(hashlib.sha256(f"{purpose}:{int(seed)}".encode()).digest()[:8], "little") >> 1


def zca_fingerprint(zca) -> str:
    """SHA-256 of a fitted ZCA transform, '' for none (:func:`tesla.zca.zca_fingerprint`)."""
    from tesla.zca import zca_fingerprint as fingerprint

    return fingerprint(zca)


def _log(message: str) -> None:
    print(f"tesla experts: {message}", file=sys.stderr, flush=True)


def _atomic_save(obj, path: Path) -> None:
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def _validate(cfg: ExpertConfig) -> None:
    if cfg.epochs < 1:
        raise TeslaError(f"--epochs must be at least 1 (got {cfg.epochs})")
    if not cfg.lr > 0:
        raise TeslaError(f"--lr must be positive (got {cfg.lr}); the paper uses 0.01")
    if cfg.batch_size < 1:
        raise TeslaError(f"--batch-size must be at least 1 (got {cfg.batch_size})")
    if cfg.keep_snapshots is not None and not (0 <= cfg.keep_snapshots <= cfg.epochs):
        raise TeslaError(
            f"--keep-snapshots {cfg.keep_snapshots}: the run makes snapshots 0..{cfg.epochs} (--epochs {cfg.epochs}); "
            f"give a value in 0..{cfg.epochs} (max_start_epoch + expert_epochs of the distillation)"
        )
    if cfg.dtype not in STORAGE_DTYPES:
        raise TeslaError(f"--dtype {cfg.dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
    for name in ("train", "test", "zca"):
        p = getattr(cfg, name)
        if p is not None and Path(p).resolve() == Path(cfg.out).resolve():
            raise TeslaError(f"--out {cfg.out} is the same file as --{name}; choose another output path")


def _check_splits(train, test) -> None:
    """The test split must be the same dataset: class ids, image shape."""
    problems = []
    if train.num_classes != test.num_classes or list(train.class_ids) != list(test.class_ids):
        problems.append(f"{train.num_classes} classes vs {test.num_classes}" if train.num_classes != test.num_classes else "different class ids")
    shape_tr = (train.channels, train.resolution, int(train.attrs["width"]))
    shape_te = (test.channels, test.resolution, int(test.attrs["width"]))
    if shape_tr != shape_te:
        problems.append(f"images {shape_tr[0]}x{shape_tr[1]}x{shape_tr[2]} vs {shape_te[0]}x{shape_te[1]}x{shape_te[2]} (C x H x W)")
    if train.dataset and test.dataset and train.dataset != test.dataset:
        problems.append(f"dataset {train.dataset!r} vs {test.dataset!r}")
    if problems:
        raise TeslaError(
            f"--test {test.path} does not belong to --train {train.path}: {'; '.join(problems)}; "
            f"give the test split written by the same 'tesla prepare' run"
        )
    if int(train.attrs["width"]) != train.resolution:
        raise TeslaError(f"{train.path}: images are {train.resolution}x{train.attrs['width']}, the networks take square images; re-run 'tesla prepare' with --resolution")


def _settings(cfg: ExpertConfig, spec: dict, train, test, zca_fp: str, normalization: str) -> dict:
    """What a partial run must share with this one to be resumed (the normalisation only
    when it is not the default, so partial runs saved before it existed still resume)."""
    return dict(
        **({"normalization": normalization} if normalization != "split" else {}),
        partial_version=PARTIAL_VERSION,
        model_spec=spec,
        train_fingerprint=train.fingerprint,
        test_fingerprint=test.fingerprint,
        zca_fingerprint=zca_fp,
        seed=int(cfg.seed),
        epochs=int(cfg.epochs),
        lr=float(cfg.lr),
        batch_size=int(cfg.batch_size),
        dsa=cfg.dsa,
        keep_snapshots=cfg.keep_snapshots,
    )


def _snapshot_path(partial: Path, i: int) -> Path:
    return partial / f"snapshot_{i:05d}.pt"


def partial_dir(out: str | os.PathLike) -> Path:
    """Where a run writing ``out`` keeps its resumable state: ``out`` + '.partial/'."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def train_expert(
    cfg: ExpertConfig,
    *,
    stop_after_epochs: int | None = None,
    log: Callable[[str], None] = _log,
    progress: bool | None = True,
) -> Path | None:
    """Train expert ``cfg.seed`` and write ``cfg.out``; resume from ``cfg.out``.partial/ if present.

    ``stop_after_epochs``: end after that many epochs have been completed in this call
    (the partial state stays, the output is not written; returns None).  Otherwise returns
    the output path.  Two runs for the same ``cfg.out`` at once: the second is refused.
    """
    _validate(cfg)
    partial = partial_dir(cfg.out)
    existed = partial.exists()
    partial.mkdir(parents=True, exist_ok=True)
    lock = _lock(partial)
    try:
        return _train_expert(cfg, partial, stop_after_epochs=stop_after_epochs, log=log, progress=progress)
    finally:
        lock.close()
        if not existed and partial.exists() and all(p.name == "lock" for p in partial.iterdir()):
            shutil.rmtree(partial, ignore_errors=True)  # failed before any state was saved


def _train_expert(
    cfg: ExpertConfig,
    partial: Path,
    *,
    stop_after_epochs: int | None,
    log: Callable[[str], None],
    progress: bool | None,
) -> Path | None:
    from tesla.augment import DSA
    from tesla.data import ImageSplit
    from tesla.input_space import open_input_space
    from tesla.models import buffer_layout, build_from_spec, flatten_buffers, flatten_params, model_spec, param_layout
    from tesla.training import accuracy, make_optimizer, pick_device, train

    out = Path(cfg.out)
    train_split = ImageSplit.open(cfg.train)
    test_split = ImageSplit.open(cfg.test)
    _check_splits(train_split, test_split)
    spec = model_spec(
        cfg.model, channels=train_split.channels, num_classes=train_split.num_classes, resolution=train_split.resolution
    )
    dsa_strategy = (cfg.dsa or "none").strip().lower()
    dsa = DSA(dsa_strategy) if dsa_strategy != "none" else None
    if dsa is not None:
        dsa_strategy = dsa.strategy
    space = open_input_space(train_split, cfg.normalize, cfg.zca)
    zca = space.zca
    zca_fp = zca_fingerprint(zca)
    keep = cfg.epochs if cfg.keep_snapshots is None else cfg.keep_snapshots
    device = pick_device(cfg.device)

    # -- network, optimizer, generator: fresh or resumed --------------------------------
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        model = build_from_spec(spec)
    model.to(device)
    optimizer = make_optimizer(model, cfg.lr)
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "data"))
    settings = _settings(cfg, spec, train_split, test_split, zca_fp, space.name)
    state_path = partial / "state.pt"
    start_epoch, history = 0, []
    if state_path.exists():
        try:
            state = torch.load(state_path, map_location=device, weights_only=True)
        except Exception as exc:
            raise TeslaError(f"{state_path}: unreadable partial state ({exc}); delete {partial} to start over") from None
        if state.get("settings") != settings:
            diff = [k for k in settings if state.get("settings", {}).get(k) != settings[k]]
            raise TeslaError(
                f"{partial} holds a partial run with other settings ({', '.join(diff)}); rerun with the same "
                f"settings to resume it, or delete {partial} to start over"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"].cpu())
        start_epoch, history = int(state["epoch"]), list(state["history"])
        missing = [i for i in range(min(start_epoch, keep) + 1) if not _snapshot_path(partial, i).exists()]
        if missing:
            raise TeslaError(f"{partial}: snapshot(s) {missing[:5]} missing; delete {partial} to start over")
        log(f"resuming {out} from epoch {start_epoch}/{cfg.epochs} ({partial})")
    else:
        _atomic_save({"theta": flatten_params(model, device="cpu"), "buffers": flatten_buffers(model, device="cpu")}, _snapshot_path(partial, 0))
        _save_state(state_path, settings, 0, model, optimizer, generator, history)

    # -- data ------------------------------------------------------------------------------
    # without ZCA the splits stay uint8 on the device and are normalised per minibatch (a
    # quarter of the memory); with ZCA (CIFAR-size images) they are whitened once, as float32
    t0 = time.perf_counter()
    if zca is None:
        to_input = space.minibatch_transform(device)
        x = torch.from_numpy(train_split.images_uint8()).to(device)
        y = torch.as_tensor(train_split.labels, dtype=torch.int64, device=device)
        x_test = torch.from_numpy(test_split.images_uint8()).to(device)
        y_test = torch.as_tensor(test_split.labels, dtype=torch.int64, device=device)
    else:
        to_input = None
        x, y = space.load_split(train_split, device)
        x_test, y_test = space.load_split(test_split, device)
    log(
        f"expert seed {cfg.seed}: {spec['name']} ({sum(p.numel() for p in model.parameters()):,} parameters) on "
        f"{train_split.num_images} {train_split.dataset} images ({time.perf_counter() - t0:.1f} s to load), "
        f"{cfg.epochs} epochs, lr {cfg.lr:g}, batch {cfg.batch_size}, DSA {dsa_strategy}, "
        f"inputs: {space.describe()}, device {device}"
    )

    done_here = 0

    def on_epoch_end(stats) -> None:
        nonlocal done_here
        if stats.epoch <= keep:
            _atomic_save(
                {"theta": flatten_params(model, device="cpu"), "buffers": flatten_buffers(model, device="cpu")},
                _snapshot_path(partial, stats.epoch),
            )
        history.append(stats.as_dict())
        _save_state(state_path, settings, stats.epoch, model, optimizer, generator, history)
        log(
            f"epoch {stats.epoch}/{cfg.epochs}  loss {stats.loss:.4f}  train acc {100 * stats.accuracy:.2f}%  "
            f"lr {stats.lr:g}  {stats.seconds:.1f} s ({stats.images_per_second:.0f} img/s)"
        )
        done_here += 1
        if stop_after_epochs is not None and done_here >= stop_after_epochs and stats.epoch < cfg.epochs:
            raise _Stop

    try:
        train(
            model, x, y,
            epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, dsa=dsa, generator=generator,
            start_epoch=start_epoch, optimizer=optimizer, on_epoch_end=on_epoch_end, input_transform=to_input,
            progress=progress, desc=f"expert {cfg.seed} epoch",
        )
    except _Stop:
        log(f"stopped after epoch {start_epoch + done_here}; run the same command again to resume from {partial}")
        return None

    # -- final test accuracy and the trajectory file -------------------------------------
    test_acc = accuracy(model, x_test, y_test, input_transform=to_input)
    log(f"test accuracy {100 * test_acc:.2f}% on {test_split.num_images} images of {cfg.test}")
    meta = TrajectoryMeta(
        model_spec=spec,
        dataset=train_split.dataset,
        dataset_fingerprint=train_split.fingerprint,
        test_dataset_fingerprint=test_split.fingerprint,
        zca_fingerprint=zca_fp,
        input_normalization=space.name,
        input_mean=space.mean,
        input_std=space.std,
        seed=cfg.seed,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        dsa=dsa_strategy,
        epochs=cfg.epochs,
        train_loss=[h["loss"] for h in history],
        train_accuracy=[h["accuracy"] for h in history],
        epoch_seconds=[h["seconds"] for h in history],
        final_test_accuracy=test_acc,
        extra=dict(
            model=cfg.model,
            train_path=str(cfg.train),
            test_path=str(cfg.test),
            zca_path=str(cfg.zca) if cfg.zca is not None else "",
            keep_snapshots=keep,
            device=str(device),
            torch_version=str(torch.__version__),
        ),
    )
    with TrajectoryWriter(
        out, layout=param_layout(model), buffer_layout=buffer_layout(model), dtype=cfg.dtype, expected_snapshots=keep + 1
    ) as writer:
        for i in range(keep + 1):
            snap = torch.load(_snapshot_path(partial, i), map_location="cpu", weights_only=True)
            writer.append(snap["theta"], snap["buffers"])
        writer.commit(meta)
    shutil.rmtree(partial, ignore_errors=True)
    log(f"wrote {out}: snapshots 0..{keep} x {param_layout(model).total:,} parameters ({cfg.dtype})")
    return out


def _lock(partial: Path):
    """Hold an exclusive lock on ``partial``/lock for this run (two jobs, one output: refused)."""
    return acquire(partial / "lock", stage="tesla experts", protects=str(partial))


def _save_state(path: Path, settings: dict, epoch: int, model, optimizer, generator: torch.Generator, history: list) -> None:
    _atomic_save(
        dict(
            settings=settings,
            epoch=epoch,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            generator=generator.get_state(),
            history=history,
        ),
        path,
    )


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    from tesla.augment import DEFAULT_STRATEGY
    from tesla.input_space import NORMALIZATIONS
    from tesla.models import available_models

    parser.add_argument("--train", required=True, type=Path, help="training split (tesla-images HDF5 from 'tesla prepare')")
    parser.add_argument("--test", required=True, type=Path, help="test split of the same dataset (for the final test accuracy)")
    parser.add_argument("--out", required=True, type=Path, help="output trajectory file (tesla-trajectory HDF5), e.g. expert_K.h5")
    parser.add_argument("--seed", required=True, type=int, help="expert number k: seeds the initialisation and the data order")
    parser.add_argument("--model", default="convnet", help=f"network: {', '.join(available_models())}")
    parser.add_argument("--epochs", type=int, default=50, help="training epochs E (snapshots 0..E)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (no momentum, no weight decay)")
    parser.add_argument("--batch-size", type=int, default=256, help="minibatch size")
    parser.add_argument("--dsa", default=DEFAULT_STRATEGY, help="DSA strategy ('_'-joined families, one picked per batch) or 'none'")
    parser.add_argument(
        "--normalize", default=None, choices=NORMALIZATIONS,
        help="input normalisation (default: the --zca file's, else 'split' = the training split's own mean/std; "
        "'none' = pixels in [0, 1]; or the published constants)",
    )
    parser.add_argument("--zca", type=Path, default=None, help="ZCA whitening file from 'tesla zca' (applied to train and test)")
    parser.add_argument(
        "--keep-snapshots", type=int, default=None, metavar="K",
        help="keep snapshots 0..K only (K = max_start_epoch + expert_epochs of the distillation; default: all, K = E)",
    )
    parser.add_argument(
        "--dtype", choices=list(STORAGE_DTYPES), default="float32",
        help="snapshot storage type; 16-bit halves the file, see docs/formats.md for its effect on the matching loss",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--stop-after-epochs", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    cfg = ExpertConfig(
        train=args.train, test=args.test, out=args.out, seed=args.seed, model=args.model, epochs=args.epochs,
        lr=args.lr, batch_size=args.batch_size, dsa=args.dsa, zca=args.zca, normalize=args.normalize,
        keep_snapshots=args.keep_snapshots,
        dtype=args.dtype, device=args.device,
    )
    if args.stop_after_epochs is not None and args.stop_after_epochs < 1:
        raise TeslaError("--stop-after-epochs must be at least 1")
    train_expert(cfg, stop_after_epochs=args.stop_after_epochs, progress=None)
    return 0
