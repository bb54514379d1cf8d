"""Train expert networks on the real training split and save their trajectories.

Expert k (``--seed k``) is a fresh network (initialised from seed k) trained with plain SGD
(lr 0.01, no momentum, no weight decay, batch 256, DSA on every batch; PAPER.md section 1)
on inputs x = T((u/255 - mean)/std) of the chosen input space (``tesla.input_space``:
``--normalize``, and ``--zca`` whose file fixes the normalisation). Its flat parameter
vector is saved at initialisation and after every epoch, theta*_0 .. theta*_E, in a
``tesla-trajectory`` file (docs/formats.md).

**Only what is used.** Distillation reads snapshots 0 .. max_start_epoch + expert_epochs.
With ``--keep-snapshots K`` (K = that number) the expert stores theta*_0 .. theta*_K and
*stops training after epoch K*: plain SGD has no schedule, so these K epochs are exactly the
first K epochs of a longer run. ``--train-to-end`` trains all ``--epochs`` anyway (when the
final test accuracy of fully trained experts is wanted, e.g. the ``full`` row of acc.csv).
The file records the epochs trained and the epoch after which its test accuracy was measured.

**A group of experts per process.** ``--seed k1 k2 ... --out f1 f2 ...`` trains several
experts with the same settings in one process: the data are loaded once, and each expert
keeps its own initialisation, data order and augmentation draws (its seed), its own
resumable state ``fi.partial/`` with its own lock, and its own output file, written as soon
as that expert is complete. ``--group-mode`` (``tesla.group_training.train_group``):
``sequential`` (one after the other: each bitwise equal to training it alone),
``streams`` (steps interleaved on separate CUDA streams) or ``vmap`` (stacked parameters,
one vmapped step: equal to alone within float32 round-off); ``auto`` picks per device
(``tesla.group_modes.AUTO_GROUP_MODE``). An expert whose output already exists (with the same
settings) is skipped. While others of its group still train, a finished expert's partial
folder keeps a hard link to its file, so a job killed later (whose outputs a workflow
manager may delete) restores it instead of training it again.

**Resuming.** After every epoch the model, optimizer and generator states and the snapshots
so far are saved in ``OUT.partial/``; running the same command again continues from the
last completed epoch, and the trajectory is bitwise identical to an uninterrupted run on
the same device (CPU) and group mode. OUT appears only when that expert is complete.

**Arithmetic** (``tesla.precision``): TF32 where the GPU has it (``--no-tf32`` turns it
off), ``--precision bf16`` for a bfloat16 autocast, ``--channels-last``; all recorded.

Command line::

    tesla experts --train train.h5 --test test.h5 --out expert_K.h5 [expert_L.h5 ...] --seed K [L ...]
                  [--model convnet] [--epochs 50] [--lr 0.01] [--batch-size 256]
                  [--dsa STRATEGY|none] [--normalize NAME] [--zca zca.h5] [--keep-snapshots N]
                  [--train-to-end] [--dtype float32|float16|bfloat16] [--group-mode auto]
                  [--precision float32|bf16] [--no-tf32] [--channels-last|--no-channels-last]
                  [--device auto]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from tesla.augment import DSA
from tesla.data import ImageSplit
from tesla.devices import pick_device
from tesla.errors import TeslaError
from tesla.files import atomic_output
from tesla.group_modes import resolve_group_mode
from tesla.group_training import train_group
from tesla.input_space import open_input_space
from tesla.locks import acquire
from tesla.models import build_from_spec, model_spec
from tesla.numerics_options import PRECISIONS
from tesla.parameters import buffer_layout, flatten_buffers, flatten_params, param_layout
from tesla.precision import Numerics
from tesla.settings import add_arguments, from_args
from tesla.tracking import (
    TrackerOptions,
    Tracking,
    disabled as tracking_disabled,
    from_args as tracking_options,
    open_tracking,
)
from tesla.training import EndTraining, GroupMember, accuracy, make_optimizer
from tesla.training_settings import ExpertConfig, ExpertsCommand
from tesla.trajectories import STORAGE_DTYPES, Trajectory, TrajectoryMeta, TrajectoryWriter, same_model_spec
from tesla.zca import zca_fingerprint  # SHA-256 of a fitted ZCA transform, '' for none

__all__ = [
    "ExpertConfig",
    "configure_parser",
    "derive_seed",
    "partial_dir",
    "run",
    "train_expert",
    "train_experts",
    "zca_fingerprint",
]

PARTIAL_VERSION = 1
#: the hard link to a finished expert's file, kept in its partial folder until its group is done
FINISHED_LINK = "trajectory.h5"
#: the fields in which the experts of one group differ
PER_EXPERT_FIELDS = ("seed", "out")


def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one use of the run seed: SHA-256 of 'purpose:seed' (independent streams)."""
    return int.from_bytes(hashlib.sha256(f"{purpose}:{int(seed)}".encode()).digest()[:8], "little") >> 1


def _log(message: str) -> None:
    print(f"tesla experts: {message}", file=sys.stderr, flush=True)


def _atomic_save(obj, path: Path) -> None:
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def partial_dir(out: str | os.PathLike) -> Path:
    """Where a run writing ``out`` keeps its resumable state: ``out`` + '.partial/'."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def _snapshot_path(partial: Path, i: int) -> Path:
    return partial / f"snapshot_{i:05d}.pt"


# --------------------------------------------------------------------------------------
# checks made before anything is trained
# --------------------------------------------------------------------------------------
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

    if cfg.precision not in PRECISIONS:
        raise TeslaError(f"--precision {cfg.precision!r} is not one of {', '.join(PRECISIONS)}")
    for name in ("train", "test", "zca"):
        p = getattr(cfg, name)
        if p is not None and Path(p).resolve() == Path(cfg.out).resolve():
            raise TeslaError(f"--out {cfg.out} is the same file as --{name}; choose another output path")


def _validate_group(cfgs: Sequence[ExpertConfig]) -> None:
    """Every expert's settings, and a group that is one set of settings with distinct
    seeds and distinct outputs."""
    if not cfgs:
        raise TeslaError("no expert to train: give --seed and --out")
    for cfg in cfgs:
        _validate(cfg)
    shared = [f.name for f in fields(ExpertConfig) if f.name not in PER_EXPERT_FIELDS]
    for cfg in cfgs[1:]:
        differ = [name for name in shared if getattr(cfg, name) != getattr(cfgs[0], name)]
        if differ:
            raise TeslaError(f"the experts of one group share their settings; seed {cfg.seed} differs in {', '.join(differ)}")
    _refuse_repeats([int(c.seed) for c in cfgs], "--seed", "the same seed twice trains the same expert twice")
    _refuse_repeats([str(Path(c.out).resolve()) for c in cfgs], "--out", "two experts cannot write one file")


def _refuse_repeats(values: Sequence, option: str, why: str) -> None:
    seen, repeated = set(), []
    for v in values:
        if v in seen and v not in repeated:
            repeated.append(v)
        seen.add(v)
    if repeated:
        raise TeslaError(f"{option} names {', '.join(map(str, repeated))} more than once ({why}); give each once")


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


# --------------------------------------------------------------------------------------
# what the experts of a group share: data, network, input space, arithmetic
# --------------------------------------------------------------------------------------
class _Shared:
    """The group's common ground: splits, model spec, DSA, input space, device, numerics;
    the data are loaded on the device once (:meth:`load`)."""

    def __init__(self, cfg: ExpertConfig) -> None:
        self.cfg = cfg
        self.train_split = ImageSplit.open(cfg.train)
        self.test_split = ImageSplit.open(cfg.test)
        _check_splits(self.train_split, self.test_split)
        self.spec = model_spec(
            cfg.model, channels=self.train_split.channels, num_classes=self.train_split.num_classes,
            resolution=self.train_split.resolution,
        )
        strategy = (cfg.dsa or "none").strip().lower()
        self.dsa = DSA(strategy) if strategy != "none" else None
        self.dsa_strategy = self.dsa.strategy if self.dsa is not None else "none"
        self.space = open_input_space(self.train_split, cfg.normalize, cfg.zca)
        self.zca_fp = zca_fingerprint(self.space.zca)
        self.device = pick_device(cfg.device)
        self.numerics = Numerics.resolve(self.device, cfg.precision, cfg.tf32, cfg.channels_last)
        self.group_mode = "sequential"  # how the pending experts train (train_experts resolves --group-mode)

    def identity(self, seed: int) -> dict[str, Any]:
        """What a finished trajectory of expert ``seed`` must record to count as this one."""
        cfg = self.cfg
        return dict(
            seed=int(seed), model_spec=self.spec, dataset_fingerprint=self.train_split.fingerprint,
            test_dataset_fingerprint=self.test_split.fingerprint, zca_fingerprint=self.zca_fp,
            input_normalization=self.space.name, lr=float(cfg.lr), batch_size=int(cfg.batch_size),
            dsa=self.dsa_strategy, epochs_requested=int(cfg.epochs), epochs=int(cfg.stop_epoch),
            num_snapshots=cfg.last_snapshot + 1, storage_dtype=cfg.dtype, precision=self.numerics.precision,
        )

    def settings(self, seed: int) -> dict:
        """What a partial run must share with this one to be resumed (the normalisation and
        the arithmetic only when not the historical default, so partial runs saved before
        they existed still resume). The epoch training stops at is not part of it: SGD
        without a schedule computes the same first epochs either way."""
        cfg = self.cfg
        numerics = self.numerics.record()
        return dict(
            **({"normalization": self.space.name} if self.space.name != "split" else {}),
            **({"numerics": numerics} if numerics != {"precision": "float32", "tf32": False, "memory_format": "contiguous"} else {}),
            partial_version=PARTIAL_VERSION,
            model_spec=self.spec,
            train_fingerprint=self.train_split.fingerprint,
            test_fingerprint=self.test_split.fingerprint,
            zca_fingerprint=self.zca_fp,
            seed=int(seed),
            epochs=int(cfg.epochs),
            lr=float(cfg.lr),
            batch_size=int(cfg.batch_size),
            dsa=cfg.dsa,
            keep_snapshots=cfg.keep_snapshots,
        )

    def load(self) -> None:
        """The splits on the device: without ZCA as uint8, normalised per minibatch (a quarter
        of the memory); with ZCA (CIFAR-size images) whitened once, as float32."""
        t0 = time.perf_counter()
        if self.space.zca is None:
            self.to_input = self.space.minibatch_transform(self.device)
            self.x = torch.from_numpy(self.train_split.images_uint8()).to(self.device)
            self.y = torch.as_tensor(self.train_split.labels, dtype=torch.int64, device=self.device)
            self.x_test = torch.from_numpy(self.test_split.images_uint8()).to(self.device)
            self.y_test = torch.as_tensor(self.test_split.labels, dtype=torch.int64, device=self.device)
        else:
            self.to_input = None
            self.x, self.y = self.space.load_split(self.train_split, self.device)
            self.x_test, self.y_test = self.space.load_split(self.test_split, self.device)
        self.load_seconds = time.perf_counter() - t0


def _differences(path: Path, expected: dict[str, Any]) -> list[str]:
    """The recorded settings of a trajectory file that differ from ``expected``."""
    with Trajectory.open(path) as t:
        recorded = dict(
            seed=t.seed, model_spec=t.model_spec, dataset_fingerprint=t.dataset_fingerprint,
            test_dataset_fingerprint=str(t.attrs["test_dataset_fingerprint"]), zca_fingerprint=t.zca_fingerprint,
            input_normalization=t.input_normalization, lr=t.lr, batch_size=t.batch_size, dsa=t.dsa,
            epochs_requested=t.epochs_requested, epochs=t.epochs, num_snapshots=t.num_snapshots,
            storage_dtype=t.storage_dtype, precision=t.precision,
        )

    def same(key: str, value: Any) -> bool:
        if key == "model_spec":
            return same_model_spec(value, recorded[key])
        if key == "epochs":  # trained at least as far as asked (SGD without a schedule: the same first epochs)
            return recorded[key] >= value
        return recorded[key] == value

    return [
        f"{key} {recorded[key]!r} vs {value!r}" if key != "model_spec" else "the network"
        for key, value in expected.items()
        if not same(key, value)
    ]


def _already_finished(cfg: ExpertConfig, expected: dict[str, Any], log: Callable[[str], None]) -> bool:
    """True when expert ``cfg`` needs no training: its output exists, or its partial folder
    keeps the finished file of an earlier run of its group (restored to the output). A file
    trained with other settings is refused (delete it to train this expert)."""
    out = Path(cfg.out)
    kept = partial_dir(out) / FINISHED_LINK
    for candidate in (out, kept):
        if not candidate.exists():
            continue
        try:
            problems = _differences(candidate, expected)
        except TeslaError as exc:
            raise TeslaError(f"{candidate} exists but is not a usable expert trajectory ({exc}); delete it to train "
                             f"expert {cfg.seed}") from None
        if problems:
            raise TeslaError(
                f"{candidate} exists but was trained with other settings ({'; '.join(problems)}); delete it to train "
                f"expert {cfg.seed} with these settings, or choose another --out"
            )
        if candidate == kept:
            _link_or_copy(kept, out)
            log(f"restored {out} (expert {cfg.seed}, finished by an earlier run of its group) from {kept}")
        else:
            log(f"{out} exists (expert {cfg.seed}, same settings): skipped")
        return True
    return False


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a second name of ``source`` (a hard link), or a copy where links fail."""
    try:
        os.link(source, target)
    except OSError:
        with atomic_output(target) as tmp:
            shutil.copy2(source, tmp)


# --------------------------------------------------------------------------------------
# one expert of a group
# --------------------------------------------------------------------------------------
class _ExpertRun:
    """One expert's network, optimizer, generator and partial state, and what it does after
    each epoch (snapshot, state, log) and when it is complete (test accuracy, file)."""

    def __init__(self, cfg: ExpertConfig, shared: _Shared, *, stop_after_epochs: int | None,
                 log: Callable[[str], None], tracker: Tracking) -> None:
        self.cfg, self.shared, self.log, self.tracker = cfg, shared, log, tracker
        self.series = f"expert_{cfg.seed}"  # its curves in the job's tracker
        self.out = Path(cfg.out)
        self.partial = partial_dir(self.out)
        self.stop_after_epochs = stop_after_epochs
        self.done_here = 0
        self.stopped = False
        self.written: Path | None = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, "init"))
            self.model = build_from_spec(shared.spec)
        self.model.to(shared.device)
        self.optimizer = make_optimizer(self.model, cfg.lr)
        self.generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "data"))
        self.settings = shared.settings(cfg.seed)
        self.state_path = self.partial / "state.pt"
        self.start_epoch, self.history = 0, []
        if self.state_path.exists():
            self._resume()
        else:
            _atomic_save({"theta": flatten_params(self.model, device="cpu"), "buffers": flatten_buffers(self.model, device="cpu")},
                         _snapshot_path(self.partial, 0))
            self._save_state(0)
        tracker.start(self.start_epoch, self.series)

    def _resume(self) -> None:
        partial, device = self.partial, self.shared.device
        try:
            state = torch.load(self.state_path, map_location=device, weights_only=True)
        except Exception as exc:
            raise TeslaError(f"{self.state_path}: unreadable partial state ({exc}); delete {partial} to start over") from None
        if state.get("settings") != self.settings:
            diff = [k for k in {**self.settings, **state.get("settings", {})}
                    if state.get("settings", {}).get(k) != self.settings.get(k)]
            raise TeslaError(
                f"{partial} holds a partial run with other settings ({', '.join(diff)}); rerun with the same "
                f"settings to resume it, or delete {partial} to start over"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"].cpu())
        self.start_epoch, self.history = int(state["epoch"]), list(state["history"])
        missing = [i for i in range(min(self.start_epoch, self.cfg.last_snapshot) + 1)
                   if not _snapshot_path(partial, i).exists()]
        if missing:
            raise TeslaError(f"{partial}: snapshot(s) {missing[:5]} missing; delete {partial} to start over")
        self.log(f"resuming {self.out} from epoch {self.start_epoch}/{self.cfg.stop_epoch} ({partial})")

    def _save_state(self, epoch: int) -> None:
        _atomic_save(
            dict(settings=self.settings, epoch=epoch, model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                 generator=self.generator.get_state(), history=self.history),
            self.state_path,
        )

    @property
    def needs_training(self) -> bool:
        return self.start_epoch < self.cfg.stop_epoch

    def on_epoch_end(self, stats) -> None:
        """Snapshot (while stored), state and log; the file when complete; EndTraining when
        ``stop_after_epochs`` epochs have run in this call."""
        cfg = self.cfg
        if stats.epoch <= cfg.last_snapshot:
            _atomic_save({"theta": flatten_params(self.model, device="cpu"), "buffers": flatten_buffers(self.model, device="cpu")},
                         _snapshot_path(self.partial, stats.epoch))
        self.history.append(stats.as_dict())
        self._save_state(stats.epoch)
        self.log(
            f"expert {cfg.seed}: epoch {stats.epoch}/{cfg.stop_epoch}  loss {stats.loss:.4f}  train acc "
            f"{100 * stats.accuracy:.2f}%  lr {stats.lr:g}  {stats.seconds:.1f} s ({stats.images_per_second:.0f} img/s)"
        )
        self.done_here += 1
        if stats.epoch < cfg.stop_epoch:  # the last epoch is tracked with the test accuracy (finish)
            self.tracker.log_scalars(stats.epoch, stats.as_dict(), self.series)
        if stats.epoch >= cfg.stop_epoch:
            self.finish()
        elif self.stop_after_epochs is not None and self.done_here >= self.stop_after_epochs:
            self.stopped = True
            self.log(f"expert {cfg.seed}: stopped after epoch {stats.epoch}; run the same command again to resume "
                     f"from {self.partial}")
            raise EndTraining

    def finish(self, *, keep_link: bool = True) -> Path:
        """Test accuracy (float32) and the trajectory file, written at once; the partial
        folder then keeps only a hard link to the file (removed when the group is done)."""
        cfg, shared = self.cfg, self.shared
        epochs = int(self.start_epoch if not self.history else self.history[-1]["epoch"])
        test_acc = accuracy(self.model, shared.x_test, shared.y_test, input_transform=shared.to_input)
        self.log(f"expert {cfg.seed}: test accuracy {100 * test_acc:.2f}% after epoch {epochs} on "
                 f"{shared.test_split.num_images} images of {cfg.test}")
        self.tracker.log_scalars(epochs, {**(self.history[-1] if self.history else {}), "test_accuracy": test_acc},
                                 self.series)
        meta = TrajectoryMeta(
            model_spec=shared.spec,
            dataset=shared.train_split.dataset,
            dataset_fingerprint=shared.train_split.fingerprint,
            test_dataset_fingerprint=shared.test_split.fingerprint,
            zca_fingerprint=shared.zca_fp,
            input_normalization=shared.space.name,
            input_mean=shared.space.mean,
            input_std=shared.space.std,
            seed=cfg.seed,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            dsa=shared.dsa_strategy,
            epochs=epochs,
            epochs_requested=cfg.epochs,
            test_accuracy_epoch=epochs,
            precision=shared.numerics.precision,
            train_loss=[h["loss"] for h in self.history],
            train_accuracy=[h["accuracy"] for h in self.history],
            epoch_seconds=[h["seconds"] for h in self.history],
            final_test_accuracy=test_acc,
            extra=dict(
                model=cfg.model,
                train_path=str(cfg.train),
                test_path=str(cfg.test),
                zca_path=str(cfg.zca) if cfg.zca is not None else "",
                keep_snapshots=cfg.last_snapshot,
                device=str(shared.device),
                torch_version=str(torch.__version__),
                tf32=bool(shared.numerics.tf32),
                memory_format=shared.numerics.memory_format,
                group_mode=shared.group_mode,
            ),
        )
        keep = cfg.last_snapshot
        with TrajectoryWriter(
            self.out, layout=param_layout(self.model), buffer_layout=buffer_layout(self.model), dtype=cfg.dtype,
            expected_snapshots=keep + 1,
        ) as writer:
            for i in range(keep + 1):
                snap = torch.load(_snapshot_path(self.partial, i), map_location="cpu", weights_only=True)
                writer.append(snap["theta"], snap["buffers"])
            writer.commit(meta)
        self._keep_only_link()
        self.log(f"wrote {self.out}: snapshots 0..{keep} x {param_layout(self.model).total:,} parameters ({cfg.dtype}), "
                 f"{epochs} of {cfg.epochs} epochs trained")
        self.written = self.out
        return self.out

    def _keep_only_link(self) -> None:
        for path in self.partial.iterdir():
            if path.name.startswith("snapshot_") or path.name == "state.pt":
                path.unlink(missing_ok=True)
        try:
            os.link(self.out, self.partial / FINISHED_LINK)
        except OSError:
            pass  # no hard links here: a deleted output is then trained again


def _cleanup(cfgs: Sequence[ExpertConfig]) -> None:
    """The group is done: remove every expert's partial folder (its lock, if held, is
    released afterwards and finds its file gone)."""
    for cfg in cfgs:
        shutil.rmtree(partial_dir(cfg.out), ignore_errors=True)


def _lock_all(cfgs: Sequence[ExpertConfig]) -> list:
    """One exclusive lock per expert (its ``partial``/lock), all or none."""
    locks = []
    try:
        for cfg in cfgs:
            partial = partial_dir(cfg.out)
            locks.append((partial, partial.exists(), None))
            partial.mkdir(parents=True, exist_ok=True)
            locks[-1] = (partial, locks[-1][1], acquire(partial / "lock", stage="tesla experts", protects=str(partial)))
    except BaseException:
        _release_all(locks)
        raise
    return locks


def _release_all(locks: Sequence) -> None:
    for partial, existed, lock in locks:
        if lock is not None:
            lock.close()
        if not existed and partial.exists() and all(p.name == "lock" for p in partial.iterdir()):
            shutil.rmtree(partial, ignore_errors=True)  # failed before any state was saved


# --------------------------------------------------------------------------------------
# the group
# --------------------------------------------------------------------------------------
def train_experts(
    cfgs: Sequence[ExpertConfig],
    *,
    group_mode: str = "auto",
    stop_after_epochs: int | None = None,
    log: Callable[[str], None] = _log,
    progress: bool | None = True,
    tracking: TrackerOptions | None = None,
) -> list[Path | None]:
    """Train a group of experts (same settings, distinct seeds and outputs) in one process.

    Everything is checked before any training: the settings, the group (distinct seeds and
    outputs), the data, finished outputs (skipped when their settings match, refused
    otherwise) and every expert's lock. ``stop_after_epochs``: each expert ends after that
    many epochs in this call (its partial state stays; its entry is None). Returns each
    expert's output path (None where not complete). ``tracking``: the live curves of the
    group (:func:`open_tracker`; none by default).
    """
    cfgs = list(cfgs)
    _validate_group(cfgs)
    shared = _Shared(cfgs[0])
    done = [_already_finished(cfg, shared.identity(cfg.seed), log) for cfg in cfgs]
    pending = [cfg for cfg, finished in zip(cfgs, done) if not finished]
    shared.group_mode = resolve_group_mode(group_mode, shared.device, len(pending), shared.numerics)
    results: list[Path | None] = [Path(cfg.out) if finished else None for cfg, finished in zip(cfgs, done)]
    if not pending:
        _cleanup(cfgs)
        return results
    locks = _lock_all(pending)
    tracker = tracking_disabled()
    try:
        tracker = open_tracker(cfgs, shared, tracking or TrackerOptions())
        shared.numerics.apply(shared.device)
        runs = [_ExpertRun(cfg, shared, stop_after_epochs=stop_after_epochs, log=log, tracker=tracker)
                for cfg in pending]
        shared.load()
        n_params = sum(p.numel() for p in runs[0].model.parameters())
        log(
            f"{len(pending)} expert(s), seeds {', '.join(str(c.seed) for c in pending)}: {shared.spec['name']} "
            f"({n_params:,} parameters) on {shared.train_split.num_images} {shared.train_split.dataset} images "
            f"({shared.load_seconds:.1f} s to load), {cfgs[0].stop_epoch} of {cfgs[0].epochs} epochs, lr {cfgs[0].lr:g}, "
            f"batch {cfgs[0].batch_size}, DSA {shared.dsa_strategy}, inputs: {shared.space.describe()}, device "
            f"{shared.device} ({shared.numerics.describe()}), group mode {shared.group_mode}"
        )
        for run in runs:
            if not run.needs_training:
                run.finish()
        training = [run for run in runs if run.needs_training]
        if training:
            t0 = time.perf_counter()
            members = [
                GroupMember(run.model, shared.x, shared.y, run.generator, run.optimizer, run.start_epoch, run.on_epoch_end,
                            name=f"expert {run.cfg.seed}")
                for run in training
            ]
            train_group(
                members, mode=shared.group_mode, epochs=cfgs[0].stop_epoch, lr=cfgs[0].lr, batch_size=cfgs[0].batch_size,
                dsa=shared.dsa, input_transform=shared.to_input, numerics=shared.numerics, progress=progress,
                desc=f"experts {', '.join(str(r.cfg.seed) for r in training)}",
            )
            trained = sum(r.done_here for r in training) * shared.train_split.num_images
            seconds = time.perf_counter() - t0
            if len(training) > 1 and seconds > 0:
                log(f"group: {trained:,} images in {seconds:.1f} s ({trained / seconds:.0f} img/s over {len(training)} experts)")
        for cfg, run in zip(pending, runs):
            results[cfgs.index(cfg)] = run.written
        if all(r is not None for r in results):
            _cleanup(cfgs)
    finally:
        tracker.close()
        _release_all(locks)
    return results


def open_tracker(cfgs: Sequence[ExpertConfig], shared: _Shared, options: TrackerOptions) -> Tracking:
    """The job's live curves (``--tracker``, :mod:`tesla.tracking`): one tracker run per group
    of outputs and settings, each expert a series (``expert_<seed>``: its loss, accuracy,
    learning rate and time per epoch, and the test accuracy with its last epoch), the
    configuration every setting and the inputs' fingerprints; TensorBoard's events by default
    in a folder ``tensorboard`` beside the outputs."""
    if options.tracker is None:
        return tracking_disabled()
    outs = [str(Path(c.out).resolve()) for c in cfgs]
    settings = {str(c.seed): shared.settings(c.seed) for c in cfgs}
    config = {"experts": {str(c.seed): {k: str(v) if isinstance(v, Path) else v for k, v in vars(c).items()} for c in cfgs},
              "settings": settings, "device": str(shared.device), "group_mode": shared.group_mode}
    return open_tracking(options, stage="experts", identity={"outs": outs, "settings": settings},
                         default_dir=Path(cfgs[0].out).parent / "tensorboard", step_name="epoch",
                         name=f"experts {', '.join(Path(c.out).name for c in cfgs)}", config=config)


def train_expert(
    cfg: ExpertConfig,
    *,
    stop_after_epochs: int | None = None,
    log: Callable[[str], None] = _log,
    progress: bool | None = True,
) -> Path | None:
    """Train expert ``cfg.seed`` and write ``cfg.out`` (a group of one, :func:`train_experts`).

    ``stop_after_epochs``: end after that many epochs have been completed in this call (the
    partial state stays, the output is not written; returns None). Otherwise returns the
    output path. Two runs for the same ``cfg.out`` at once: the second is refused.
    """
    return train_experts([cfg], stop_after_epochs=stop_after_epochs, log=log, progress=progress)[0]


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The options of :class:`tesla.training_settings.ExpertsCommand`, and the live curves'."""
    add_arguments(parser, ExpertsCommand)
    add_arguments(parser, TrackerOptions)


def run(args: argparse.Namespace) -> int:
    seeds, outs = list(args.seed), list(args.out)
    if len(seeds) != len(outs):
        raise TeslaError(f"--seed gives {len(seeds)} expert(s) but --out {len(outs)} file(s); give one --out per --seed, "
                         "in the same order")
    if args.stop_after_epochs is not None and args.stop_after_epochs < 1:
        raise TeslaError("--stop-after-epochs must be at least 1")
    cfgs = [from_args(ExpertConfig, args, seed=seed, out=out) for seed, out in zip(seeds, outs)]
    train_experts(cfgs, group_mode=args.group_mode, stop_after_epochs=args.stop_after_epochs, progress=None,
                  tracking=tracking_options(args))
    return 0
