"""Train fresh networks on a synthetic set (or on random real images) and test them once.

This is the evaluation protocol of PAPER.md section 6. A fresh network with parameters
theta_0 (random initialisation, one per run) is trained for E epochs on the set
(X, Y) with SGD

    v <- 0.9 v + grad_theta [ l(f_theta(A(x_b)), y_b) + 5e-4/2 ||theta||^2 ],  theta <- theta - eta_e v,
    eta_e = alpha            for e <  K
    eta_e = 0.1 alpha        for e >= K          (one x0.1 decay; K = E // 2 unless --lr-decay-epoch)

(with ``--reset-momentum-at-decay`` the buffer restarts at epoch K, v <- 0, as the published
code does by creating a new optimizer there; by default it is kept)

with minibatches b of 256, a fresh differentiable-siamese augmentation draw A on every
batch, and l the soft-target cross-entropy -sum_c y_c log softmax(z)_c when the set has
soft labels (hard-label cross-entropy otherwise). alpha is the learning rate *learned* by
distillation and stored in the set's file. After the last epoch, and only then, each
network is tested once on the real test split, mapped to the same network input space
as the set (``tesla.input_space``): x = T((u/255 - mean)/std) with the set's recorded
normalisation and ZCA. The published protocol (1001 epochs, x0.1 after epoch 502, i.e.
epochs 0..501 at alpha and 502..1000 at 0.1 alpha) is ``--epochs 1001 --lr-decay-epoch 502``.

Evaluation runs in two visibly separate phases (:func:`evaluate`):

1. every run trains its network (the test split is not opened: only its header,
   attributes and class ids, is read to refuse an incompatible file before any training);
   the trained networks are kept;
2. the test split is loaded once and every trained network is measured on it.

Run r of a job with ``--seed s`` uses seed s + r for theta_0, the random draw, the
minibatch order and the augmentation parameters. The runs of a job train in one process as
a group (``--group-mode``, ``tesla.group_training.train_group``): one after the other
(``sequential``, each bitwise what it is alone), interleaved on CUDA streams (``streams``)
or stacked into one vmapped step (``vmap``, equal to alone within float32 round-off);
``auto`` chooses per device from measurement. How each step is computed (TF32,
``--precision bf16``, channels-last; ``tesla.precision``) is recorded per run.

**Resuming.** Phase 1 saves the state of its runs (``tesla.group_checkpoint``: networks,
optimizers, generators, epochs, torch's global generators) in ``--checkpoint`` (default
``OUT.ckpt``) every epoch or every ``--checkpoint-every`` seconds, whichever is rarer, under
an exclusive lock (``CHECKPOINT.lock``). The same command run again after a kill continues
from it and gives the result of an uninterrupted run; a checkpoint of other settings or
other training data, or a damaged one, is set aside (logged) and the runs start afresh. It
is removed once the output is written.

Architectures (``--arch``): any registered name of ``tesla.models`` that can take the
set's resolution (``convnet`` is ConvNet-3, ``convnet_d4`` ConvNet-4, ``resnet18``,
``resnet18_bn``, ``vgg11``, ``vit``, ...), built with its default options for the set's
channels and classes; or the alias ``distill``: exactly the network the set was distilled
with (the model spec stored in its file, e.g. ConvNet of the distillation depth).

Baselines on the same protocol: ``--random`` trains on IPC random real images per class
of the training split, a new draw per run, hard labels, lr 0.01 (``--lr-random``);
``--full`` trains on the whole training split (it must fit on the device; the ``full``
row of ``acc.csv`` normally comes from the experts' recorded test accuracy instead). Their
input space is ``--normalize`` (default ``split``) and ``--zca`` (whose file fixes the
normalisation), so a baseline can see the same inputs as the experts.

Per-run results go to a long-form CSV (``tesla-eval-runs`` version 3, see
docs/formats.md); ``tesla results`` aggregates them into ``acc.csv``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from tesla import models
from tesla.augment import DSA
from tesla.data import ImageSplit
from tesla.data.header import check_test_split, read_split_header
from tesla.devices import pick_device
from tesla.errors import TeslaError
from tesla.group_checkpoint import GroupCheckpoint, remove_checkpoint
from tesla.group_modes import resolve_group_mode
from tesla.group_training import train_group
from tesla.input_space import InputSpace, open_input_space, space_of_record
from tesla.kept_evaluation import SetEvaluation, evaluate_kept_sets, remove_progress
from tesla.locks import acquire
from tesla.models import build_from_spec
from tesla.precision import Numerics
from tesla.selection import set_rows, summary_lines, write_sets
from tesla.settings import add_arguments, from_args
from tesla.synthetic import SyntheticSet
from tesla.tables import RUNS_FORMAT, RUNS_FORMAT_VERSION, RUN_COLUMNS, RunResult, format_line, write_csv_atomic
from tesla.tracking import TrackerOptions, file_digest, open_tracking
from tesla.tracking import from_args as tracking_options
from tesla.training import GroupMember, accuracy, make_optimizer, train
from tesla.training_settings import (
    BaselineSubject,
    DEFAULT_CHECKPOINT_SECONDS,
    EvaluateCommand,
    KeptSetSelection,
    LR_RANDOM,
    PAPER_DSA_STRATEGY,
    Protocol,
    SubjectChoice,
)

#: ``--arch`` alias for the network the set was distilled with (its stored model spec)
DISTILL_ALIAS = "distill"


# -- network input space ---------------------------------------------------------------------
@dataclass
class NetworkSpace:
    """What the networks of one evaluation see: the dataset's classes and image shape, and
    the input space x = T((u/255 - mean_c)/std_c) (``tesla.input_space.InputSpace``).

    The same space is used for the training set and the test split, so a network never
    sees two differently mapped inputs.
    """

    dataset: str
    num_classes: int
    channels: int
    resolution: int
    class_ids: list[str]
    input_space: InputSpace

    @property
    def zca(self):
        """The ZCA transform T (``tesla.zca.ZCA``) or None."""
        return self.input_space.zca

    def map_images(self, images_uint8: np.ndarray, device: torch.device | str) -> torch.Tensor:
        """uint8 N x H x W x C pixels -> float32 N x C x H x W network input on ``device``."""
        return self.input_space.to_input(images_uint8, device)

    def load_split(self, path: str | os.PathLike, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole split in this space on ``device``: (float32 N x C x H x W, int64 N)."""
        return self.input_space.load_split(path, device)


# -- what is evaluated ---------------------------------------------------------------------
@dataclass
class Subject:
    """A training set to evaluate, with the facts the result table records.

    ``draw(generator)`` returns the training data of one run in network input space:
    ``(x float32 N x C x H x W, y)`` with y int64 (N,) class indices or float32 N x K
    probabilities (soft labels). A synthetic set returns the same data every run; the
    random baseline returns a new draw of real images.
    """

    method: str
    engine: str
    ipc: int
    lr: float
    dsa_strategy: str
    space: NetworkSpace
    draw: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    soft_labels: bool
    num_images: int
    source: str
    model_spec: dict | None = None
    describe: str = ""
    #: SHA-256 of the training data as the runs see them (``data_fingerprint``): what a checkpoint is keyed to
    fingerprint: str = ""
    #: a synthetic set: the distillation iteration it was saved at, and its training split's fingerprint
    iteration: int | None = None
    train_fingerprint: str = ""


def data_fingerprint(*parts) -> str:
    """SHA-256 of tensors (their dtype, shape and bytes) and plain values (their repr), in order."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{part!r};".encode())
    return h.hexdigest()


def space_fingerprint(space: NetworkSpace) -> tuple:
    """What identifies a network input space: normalisation name and constants, the ZCA transform."""
    zca = space.zca
    return space.input_space.name, space.input_space.mean, space.input_space.std, "" if zca is None else zca.fingerprint()


def synthetic_subject(path: str | os.PathLike, device: torch.device | str) -> Subject:
    """The synthetic set as its file says: images, hard or soft targets, alpha, DSA, space."""
    syn = SyntheticSet.load(path)
    try:
        syn.validate()
    except ValueError as exc:
        raise TeslaError(f"{path}: invalid synthetic set ({exc}); re-run 'tesla distill'") from None
    if not torch.isfinite(syn.images).all():
        raise TeslaError(f"{path}: the synthetic images contain NaN or infinite values; re-run 'tesla distill'")
    if syn.soft_labels is not None and not torch.isfinite(syn.soft_labels).all():
        raise TeslaError(f"{path}: the soft labels contain NaN or infinite values; re-run 'tesla distill'")
    if syn.images.shape[2] != syn.images.shape[3]:
        raise TeslaError(f"{path}: images are {syn.images.shape[2]}x{syn.images.shape[3]}; only square images are supported")
    space = NetworkSpace(
        dataset=syn.dataset,
        num_classes=syn.num_classes,
        channels=syn.channels,
        resolution=syn.resolution,
        class_ids=list(syn.class_ids),
        input_space=space_of_record(syn.normalization, syn.mean, syn.std, embedded_zca(syn, path), path),
    )
    x = syn.images.to(device=device, dtype=torch.float32)
    y = syn.targets.to(device)
    y = y.to(torch.float32) if syn.soft_labels is not None else y.to(torch.int64)

    def draw(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    return Subject(
        method="tesla",
        engine=syn.engine,
        ipc=syn.ipc,
        lr=float(syn.lr),
        dsa_strategy=syn.dsa_strategy,
        space=space,
        draw=draw,
        soft_labels=syn.soft_labels is not None,
        num_images=syn.num_images,
        source=str(path),
        model_spec=dict(syn.model_spec),
        describe=f"synthetic set {path}",
        fingerprint=data_fingerprint(syn.images, syn.targets, float(syn.lr), syn.dsa_strategy, space_fingerprint(space)),
        iteration=int(syn.iteration),
        train_fingerprint=syn.dataset_fingerprint,
    )


def embedded_zca(syn, path: str | os.PathLike):
    """The ZCA transform embedded (byte for byte) in a synthetic set file, or None,
    checked against the set's image shape."""
    try:
        zca = syn.zca()
    except TeslaError as exc:
        raise TeslaError(f"{path}: the embedded ZCA artifact is unreadable ({exc}); re-run 'tesla distill'") from None
    if zca is None:
        return None
    shape = (syn.channels, syn.resolution, int(syn.images.shape[3]))
    if tuple(zca.image_shape) != shape:
        raise TeslaError(f"{path}: the embedded ZCA is for images {tuple(zca.image_shape)}, the set's are {shape}; re-run 'tesla distill'")
    return zca


def random_subject(
    train_path: str | os.PathLike,
    ipc: int,
    device: torch.device | str,
    lr: float = LR_RANDOM,
    dsa_strategy: str = PAPER_DSA_STRATEGY,
    zca_path: str | os.PathLike | None = None,
    normalize: str | None = None,
) -> Subject:
    """IPC random real training images per class, hard labels; a new draw per run, mapped
    to the input space of ``normalize`` and ``zca_path`` (default: the split's own mean/std)."""
    split = ImageSplit.open(train_path)
    if ipc < 1:
        raise TeslaError(f"--ipc {ipc}: need at least one image per class")
    smallest = int(np.diff(split.class_offsets).min())
    if ipc > smallest:
        raise TeslaError(f"{train_path}: the smallest class has {smallest} images, fewer than --ipc {ipc}; lower --ipc")
    space = _split_space(split, normalize, zca_path)

    def draw(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = split.sample_per_class(ipc, generator)
        return space.map_images(images, device), torch.as_tensor(labels, dtype=torch.int64, device=device)

    return _real_images_subject("random", train_path, split, space, draw, ipc=ipc, num_images=ipc * split.num_classes,
                                lr=lr, dsa_strategy=dsa_strategy)


def full_subject(
    train_path: str | os.PathLike,
    device: torch.device | str,
    lr: float = LR_RANDOM,
    dsa_strategy: str = PAPER_DSA_STRATEGY,
    zca_path: str | os.PathLike | None = None,
    normalize: str | None = None,
) -> Subject:
    """The whole training split, hard labels (the ``full`` baseline, trained when asked),
    in the input space of ``normalize`` and ``zca_path`` (default: the split's own mean/std).

    The split is held on the device as float32 (N x C x H x W x 4 bytes): fine for
    MNIST/CIFAR, not for ImageNet-1K, whose ``full`` row comes from the experts.
    """
    split = ImageSplit.open(train_path)
    space = _split_space(split, normalize, zca_path)

    cache: list[tuple[torch.Tensor, torch.Tensor]] = []

    def draw(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if not cache:  # loaded at the first run, kept for the others
            cache.append(space.load_split(train_path, device))
        return cache[0]

    return _real_images_subject("full", train_path, split, space, draw, ipc=0, num_images=split.num_images,
                                lr=lr, dsa_strategy=dsa_strategy)


def _real_images_subject(method: str, train_path: str | os.PathLike, split: ImageSplit, space: NetworkSpace,
                         draw: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]], *, ipc: int,
                         num_images: int, lr: float, dsa_strategy: str) -> Subject:
    """A subject of real training images with hard labels (the ``random`` and ``full``
    baselines), identified by the split's and the input space's fingerprints."""
    return Subject(
        method=method,
        engine="",
        ipc=ipc,
        lr=float(lr),
        dsa_strategy=dsa_strategy,
        space=space,
        draw=draw,
        soft_labels=False,
        num_images=num_images,
        source=str(train_path),
        model_spec=None,
        describe=f"training split {train_path}",
        fingerprint=data_fingerprint(split.fingerprint, space_fingerprint(space)),
    )


def _split_space(split: ImageSplit, normalize: str | None, zca_path: str | os.PathLike | None) -> NetworkSpace:
    """The space of a training split: ``--normalize`` (default its own mean/std), or the
    normalisation of the ``--zca`` file followed by that ZCA."""
    if split.resolution != int(split.attrs["width"]):
        raise TeslaError(f"{split.path}: images are not square; only square images are supported")
    return NetworkSpace(
        dataset=split.dataset,
        num_classes=split.num_classes,
        channels=split.channels,
        resolution=split.resolution,
        class_ids=list(split.class_ids),
        input_space=open_input_space(split, normalize, zca_path),
    )


# -- architectures -------------------------------------------------------------------------
def resolve_architecture(arch: str | dict, subject: Subject) -> tuple[str, dict]:
    """``--arch`` -> (label recorded in the table, model spec for ``build_from_spec``).

    ``arch`` is a registered model name (``tesla.models.available_models()``), built with
    its default options for the set's channels, classes and resolution; or the alias
    ``distill``: exactly the network the set was distilled with (its stored model spec);
    or (Python API) a model spec dict. Every problem is raised here, before any training.
    """
    space = subject.space
    if isinstance(arch, dict):
        spec = dict(arch)
    elif arch == DISTILL_ALIAS:
        if subject.model_spec is None:
            raise TeslaError(
                f"--arch {DISTILL_ALIAS}: the random baseline has no distillation network; "
                f"name a registered architecture ({', '.join(models.available_models())})"
            )
        spec = dict(subject.model_spec)
    else:
        names = list(models.available_models())
        if arch not in names:
            raise TeslaError(f"--arch {arch!r}: unknown architecture; choose one of {', '.join(names)} or {DISTILL_ALIAS!r}")
        if not models.supports_resolution(arch, space.resolution):
            raise TeslaError(
                f"--arch {arch}: cannot take {space.resolution}x{space.resolution} images of {subject.describe}; "
                "choose an architecture that supports this resolution"
            )
        spec = models.model_spec(arch, channels=space.channels, num_classes=space.num_classes, resolution=space.resolution)
    shape = {"channels": space.channels, "num_classes": space.num_classes, "resolution": space.resolution}
    wrong = {k: spec.get(k) for k, v in shape.items() if spec.get(k) != v}
    if wrong:
        raise TeslaError(
            f"--arch {arch if isinstance(arch, str) else spec.get('name')}: the network is built for "
            f"{wrong}, but {subject.describe} has {shape}; re-run 'tesla distill' or choose a registered architecture"
        )
    try:
        models.build_from_spec(spec)  # fail now (unknown option, resolution it cannot take), not after a run
    except TeslaError as exc:
        raise TeslaError(f"--arch {arch if isinstance(arch, str) else spec.get('name')}: {exc}") from None
    return models.architecture_label(spec), spec


# -- the two phases ------------------------------------------------------------------------
@dataclass
class TrainedNetwork:
    """Phase 1 output: one trained network and what its training recorded."""

    run: int
    seed: int
    model: torch.nn.Module
    final_train_loss: float
    seconds: float


def run_seed(seed: int, run: int) -> int:
    """Run r of a job with ``--seed s`` uses seed s + r (initialisation, draw, batches, DSA)."""
    return int(seed) + int(run)


def make_dsa(strategy: str):
    """The augmentation A of every minibatch, or None for strategy 'none'/''."""
    dsa = DSA(strategy or "none")
    return dsa if dsa.families else None


def fresh_network(spec: dict, init_seed: int, device: torch.device | str) -> torch.nn.Module:
    """A network of ``spec`` with theta_0 drawn from ``init_seed`` (torch's global generator
    forked, so nothing else is disturbed), on ``device``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = build_from_spec(spec)
    return model.to(device)


def protocol_settings(protocol: Protocol) -> dict:
    """The keyword arguments of ``training.train``/``train_group`` that the protocol fixes."""
    return dict(
        epochs=protocol.epochs,
        lr=protocol.lr,
        momentum=protocol.momentum,
        weight_decay=protocol.weight_decay,
        batch_size=protocol.batch_size,
        dsa=make_dsa(protocol.dsa_strategy),
        lr_decay_epochs=protocol.lr_decay_epochs,
        reset_momentum_at_decay=protocol.reset_momentum_at_decay,
    )


def train_fresh_network(
    spec: dict,
    x: torch.Tensor,
    y: torch.Tensor,
    protocol: Protocol,
    generator: torch.Generator,
    init_seed: int,
    device: torch.device | str,
    progress: bool = False,
    desc: str = "train",
    numerics: Numerics | None = None,
) -> tuple[torch.nn.Module, float]:
    """theta_0 from ``init_seed``, then ``training.train`` with the protocol.

    Returns (trained model, mean training loss of the last epoch).
    """
    model = fresh_network(spec, init_seed, device)
    history = train(model, x, y, generator=generator, numerics=numerics, progress=progress, desc=desc,
                    **protocol_settings(protocol))
    return model, float(history[-1].loss)


def train_runs(
    subject: Subject,
    spec: dict,
    protocol: Protocol,
    runs: int,
    seed: int,
    device: torch.device | str,
    progress: bool = True,
    group_mode: str = "auto",
    numerics: Numerics | None = None,
    checkpoint: GroupCheckpoint | None = None,
) -> list[TrainedNetwork]:
    """Phase 1: train one fresh network per run, the runs as one group
    (``group_training.train_group``; ``group_mode`` as ``--group-mode``). Run r draws its data
    with its own generator (seed s + r) before training. The test split plays no part here.
    With a ``checkpoint`` (``tesla.group_checkpoint``) the runs continue from its saved
    state when it is theirs, and save theirs as they go.

    Each run's ``seconds`` is its draw plus its training epochs (for runs trained together,
    the group's epochs; those of a resumed run include the epochs before it was stopped).
    """
    numerics = numerics or Numerics()
    mode = resolve_group_mode(group_mode, device, runs, numerics)
    members, draw_seconds = [], []
    for r in range(runs):
        s = run_seed(seed, r)
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(s)
        x, y = subject.draw(generator)
        model = fresh_network(spec, s, device)
        optimizer = make_optimizer(model, protocol.lr, protocol.momentum, protocol.weight_decay)
        members.append(GroupMember(model, x, y, generator, optimizer, name=f"run {r + 1}/{runs}"))
        draw_seconds.append(time.perf_counter() - start)
    earlier = [[] for _ in members]
    if checkpoint is not None:
        earlier = checkpoint.resume(members)  # after the draws, which the saved generators have passed
        checkpoint.follow(members, earlier, sequential=mode == "sequential")
    histories = train_group(members, mode=mode, numerics=numerics, progress=progress, desc=f"evaluate {subject.method}",
                            **protocol_settings(protocol))
    _synchronize(device)
    histories = [list(before) + list(h) for before, h in zip(earlier, histories)]
    return [
        TrainedNetwork(run=r, seed=run_seed(seed, r), model=m.model, final_train_loss=float(h[-1].loss),
                       seconds=draw_seconds[r] + sum(e.seconds for e in h))
        for r, (m, h) in enumerate(zip(members, histories))
    ]


def checkpoint_identity(subject: Subject, spec: dict, protocol: Protocol, runs: int, seed: int, mode: str,
                        numerics: Numerics, device: torch.device | str) -> dict:
    """Everything the trained networks depend on: the settings of the runs (network,
    protocol, seeds, group mode, arithmetic, device type) and the fingerprint of their
    training data. The test split is not part of it: it is read after training."""
    settings = dict(method=subject.method, engine=subject.engine, ipc=subject.ipc, model_spec=spec, protocol=asdict(protocol),
                    runs=int(runs), seed=int(seed), group_mode=mode, numerics=numerics.record(),
                    device_type=torch.device(device).type)
    return {"settings": settings, "inputs": {"training data": subject.fingerprint}}


def measure_test_accuracy(
    trained: Sequence[TrainedNetwork], test_path: str | os.PathLike, space: NetworkSpace, device: torch.device | str
) -> list[float]:
    """Phase 2: load the real test split once, mapped to the set's space, and measure each network (percent)."""
    x_test, y_test = space.load_split(test_path, device)
    accs = []
    for t in trained:
        t.model.eval()
        accs.append(as_percent(accuracy(t.model, x_test, y_test)))
    return accs


def as_percent(value) -> float:
    """``training.accuracy`` returns a fraction in [0, 1]; the tables use percent."""
    value = float(value)
    return 100.0 * value


def evaluate(
    subject: Subject,
    arch: str | dict,
    test_path: str | os.PathLike,
    protocol: Protocol,
    runs: int = 5,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    group_mode: str = "auto",
    numerics: Numerics | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = DEFAULT_CHECKPOINT_SECONDS,
    log: Callable[[str], None] | None = None,
    validation: str | os.PathLike | None = None,
) -> list[RunResult]:
    """Check everything, train ``runs`` fresh networks (phase 1), then test them (phase 2).

    ``checkpoint``: a file from which phase 1 resumes when it holds the state of these runs
    (same settings and training data), and to which it saves their state after an epoch once
    ``checkpoint_every`` seconds have passed since the last save (``tesla.group_checkpoint``).
    The caller holds its lock and removes it once the result is written (:func:`run`).
    ``validation``: a validation split each network is also measured on (``RunResult.val_acc``)."""
    if runs < 1:
        raise TeslaError(f"--runs {runs}: need at least one run")
    protocol.check()
    numerics = numerics or Numerics()
    mode = resolve_group_mode(group_mode, device, runs, numerics)
    label, spec = resolve_architecture(arch, subject)
    check_test_split(read_split_header(test_path), subject.space, subject.describe)
    if validation is not None:
        check_validation_split(validation, subject)

    saved = None
    if checkpoint is not None:
        identity = checkpoint_identity(subject, spec, protocol, runs, seed, mode, numerics, device)
        saved = GroupCheckpoint(checkpoint, identity, every=checkpoint_every, log=log or _log)
    trained = train_runs(subject, spec, protocol, runs, seed, device, progress=progress, group_mode=mode,
                         numerics=numerics, checkpoint=saved)  # phase 1
    accs = measure_test_accuracy(trained, test_path, subject.space, device)  # phase 2
    vals = [None] * len(trained) if validation is None else measure_test_accuracy(trained, validation, subject.space, device)

    return [
        RunResult(
            dataset=subject.space.dataset,
            ipc=subject.ipc,
            method=subject.method,
            engine=subject.engine,
            arch=label,
            run=t.run,
            seed=t.seed,
            epochs=protocol.epochs,
            lr_decay_epoch=protocol.decay_epoch,
            lr=protocol.lr,
            final_train_loss=t.final_train_loss,
            test_acc=acc,
            seconds=t.seconds,
            labels="soft" if subject.soft_labels else "hard",
            dsa=protocol.dsa_strategy or "none",
            zca=subject.space.zca is not None,
            input_space=subject.space.input_space.key,
            num_images=subject.num_images,
            device=str(device),
            source=subject.source,
            reset_momentum_at_decay=protocol.reset_momentum_at_decay,
            precision=numerics.precision,
            tf32=numerics.tf32,
            memory_format=numerics.memory_format,
            group_mode=mode,
            iteration="" if subject.iteration is None else subject.iteration,
            val_acc=val,
        )
        for t, acc, val in zip(trained, accs, vals)
    ]


def check_validation_split(path: str | os.PathLike, subject: Subject) -> None:
    """A validation split must match the set (classes, shape) and have been held out of the
    very training split the set was distilled from (so no image of it shaped the set)."""
    header = read_split_header(path)
    check_test_split(header, subject.space, subject.describe, expected="val")
    import h5py

    with h5py.File(header.path, "r") as f:
        held_out_of = str(f.attrs.get("train_fingerprint", ""))
    if not held_out_of or (subject.train_fingerprint and held_out_of != subject.train_fingerprint):
        raise TeslaError(
            f"--validation {path}: not held out of the training split {subject.describe} was distilled from "
            "(its train_fingerprint differs or is missing); give the val.h5 that 'tesla prepare "
            "--validation-per-class' wrote beside that train.h5"
        )


# -- kept sets: each evaluated as a synthetic set (tesla.kept_evaluation selects among them) -----
#: options of :func:`evaluate` that change no run: a set's evaluation is keyed without them
_NOT_IN_RESULTS = frozenset({"checkpoint_every", "progress", "log"})


def kept_set_evaluation(
    arch: str | dict,
    test_path: str | os.PathLike,
    protocol: Protocol,
    validation: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    **options,
) -> SetEvaluation:
    """How ``--kept-sets`` evaluates one kept set (:func:`tesla.kept_evaluation.evaluate_kept_sets`):
    as a synthetic set with the protocol, its lr and augmentation those of the set, each network
    measured on the ``validation`` split too (:func:`evaluate`, ``options`` its other arguments);
    keyed by the set's training data, the fingerprints of the test and validation splits (a
    split prepared again at the same path measures the sets again) and every setting its runs
    depend on (not how often a checkpoint is saved, :data:`_NOT_IN_RESULTS`)."""
    device = options.get("device", "cpu")
    measured_on = [ImageSplit.open(p).fingerprint if p is not None else "" for p in (test_path, validation)]

    def evaluate_set(path: Path) -> tuple[str, Callable[[], list[RunResult]]]:
        subject = synthetic_subject(path, device)
        own = replace(protocol, lr=subject.lr, dsa_strategy=subject.dsa_strategy)
        key = data_fingerprint(subject.fingerprint, repr(arch), asdict(own), *measured_on,
                               *(repr(options.get(k)) for k in sorted(options) if k not in _NOT_IN_RESULTS))
        return key, lambda: evaluate(subject, arch, test_path, own, checkpoint=checkpoint, validation=validation, **options)

    return evaluate_set


def _log(message: str) -> None:
    print(f"tesla evaluate: {message}", file=sys.stderr, flush=True)


def _synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# -- output --------------------------------------------------------------------------------
def write_runs(path: str | os.PathLike, results: Sequence[RunResult]) -> Path:
    return write_csv_atomic(path, format_line(RUNS_FORMAT, RUNS_FORMAT_VERSION), RUN_COLUMNS, [r.row() for r in results])


# -- command line --------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """What is evaluated (:class:`tesla.training_settings.SubjectChoice`: a synthetic set, kept
    sets or a baseline), the options of :class:`~tesla.training_settings.BaselineSubject`,
    :class:`~tesla.training_settings.EvaluateCommand` and
    :class:`~tesla.training_settings.KeptSetSelection`, and the live curves'."""
    add_arguments(parser, SubjectChoice)
    add_arguments(parser, BaselineSubject)
    add_arguments(parser, EvaluateCommand)
    add_arguments(parser, KeptSetSelection)
    add_arguments(parser, TrackerOptions)


def refuse_baseline_options(args: argparse.Namespace) -> None:
    """A synthetic set (or kept sets) is evaluated as its file says: no baseline option."""
    for option in ("train", "ipc", "zca", "normalize", "dsa", "lr_random"):
        if getattr(args, option) is not None:
            flag = "--" + option.replace("_", "-")
            raise TeslaError(
                f"{flag} applies to --random only: a synthetic set is evaluated exactly as its file says; drop {flag}"
            )


def subject_from_args(args: argparse.Namespace, device: torch.device | str) -> Subject:
    if args.synthetic is not None:
        refuse_baseline_options(args)
        return synthetic_subject(args.synthetic, device)
    dsa = PAPER_DSA_STRATEGY if args.dsa is None else args.dsa
    lr = LR_RANDOM if args.lr_random is None else args.lr_random
    if args.full:
        if args.train is None:
            raise TeslaError("--full needs --train TRAIN.h5")
        if args.ipc is not None:
            raise TeslaError("--ipc does not apply to --full (it trains on every image of --train); drop --ipc")
        return full_subject(args.train, device, lr=lr, dsa_strategy=dsa, zca_path=args.zca, normalize=args.normalize)
    if args.train is None or args.ipc is None:
        raise TeslaError("--random needs --train TRAIN.h5 and --ipc N")
    return random_subject(
        args.train,
        args.ipc,
        device,
        lr=lr,
        dsa_strategy=dsa,
        zca_path=args.zca,
        normalize=args.normalize,
    )


def checkpoint_path(args: argparse.Namespace) -> Path:
    """``--checkpoint``, default OUT.ckpt; refused where it would overwrite an input or the output."""
    path = Path(args.checkpoint) if args.checkpoint is not None else Path(f"{args.out}.ckpt")
    if not (args.checkpoint_every >= 0 and math.isfinite(args.checkpoint_every)):
        raise TeslaError(f"--checkpoint-every {args.checkpoint_every}: give a number of seconds >= 0 (0: every epoch)")
    for option in ("out", "synthetic", "train", "test", "zca", "validation", "sets_out"):
        other = getattr(args, option, None)
        if other is not None and Path(other).resolve() == path.resolve():
            raise TeslaError(f"--checkpoint {path} is the --{option} file; give another --checkpoint path")
    if path.is_dir():
        raise TeslaError(f"--checkpoint {path} is a folder; give a file path (its folder is made if missing)")
    return path

def track_results(args: argparse.Namespace, subject: Subject, results: Sequence[RunResult]) -> None:
    """The live curves of an evaluation (``--tracker``, :mod:`tesla.tracking`): each run's test
    accuracy, final training loss and time at its run number (1, 2, ...), their mean and
    standard deviation (series ``summary``, at the number of runs), and the per-run table;
    the configuration every option, the subject and the inputs' fingerprints. TensorBoard's
    events by default in a folder ``tensorboard/<out name>`` beside the output."""
    options = tracking_options(args)
    if options.tracker is None:
        return
    splits = {k: ImageSplit.open(getattr(args, k)).fingerprint for k in ("train", "test") if getattr(args, k, None)}
    files = {k: file_digest(getattr(args, k)) for k in ("synthetic", "zca") if getattr(args, k, None) is not None}
    config = {
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                      if not k.startswith("tracker") and k != "func"},
        "subject": {"method": subject.method, "engine": subject.engine, "ipc": subject.ipc, "lr": subject.lr,
                    "dsa": subject.dsa_strategy, "dataset": subject.space.dataset, "source": subject.source,
                    "input_space": subject.space.input_space.key, "num_images": subject.num_images},
        "inputs": {**splits, **files},
    }
    out = Path(args.out)
    tracker = open_tracking(options, stage="evaluate", identity={"out": str(out.resolve()), "config": config},
                            default_dir=out.parent / "tensorboard" / out.stem, step_name="run",
                            name=f"evaluate {out}", config=config, start=0)
    for r in results:
        tracker.log_scalars(r.run + 1, {"test_acc": r.test_acc, "final_train_loss": r.final_train_loss,
                                        "seconds": r.seconds})
    accs = np.array([r.test_acc for r in results])
    tracker.log_scalars(len(results), {"test_acc_mean": accs.mean(), "test_acc_std": accs.std()}, series="summary")
    tracker.log_table("runs", RUN_COLUMNS, [[r.row()[c] for c in RUN_COLUMNS] for r in results])
    tracker.close()


def run(args: argparse.Namespace) -> int:
    tracking_options(args)  # a tracker whose package is missing is refused before any work
    kept_sets, selection = from_args(SubjectChoice, args).kept_sets, from_args(KeptSetSelection, args)
    selection.check(kept_sets)  # --validation, --select and --sets-out belong to --kept-sets
    device = pick_device(args.device)
    if kept_sets is not None:
        return run_kept_sets(args, kept_sets, selection, device)
    subject = subject_from_args(args, device)
    protocol = from_args(Protocol, args, lr=subject.lr, dsa_strategy=subject.dsa_strategy)
    numerics = Numerics.from_arguments(args, device)
    numerics.apply(device)
    checkpoint = checkpoint_path(args)
    with acquire(f"{checkpoint}.lock", stage="tesla evaluate", protects=f"the checkpoint {checkpoint}"):
        results = evaluate(subject, args.arch, args.test, protocol, runs=args.runs, seed=args.seed, device=device,
                           group_mode=args.group_mode, numerics=numerics, checkpoint=checkpoint,
                           checkpoint_every=args.checkpoint_every)
        write_runs(args.out, results)
        remove_checkpoint(checkpoint)  # the output holds the result now
    track_results(args, subject, results)
    accs = np.array([r.test_acc for r in results])
    ipc = "all images" if subject.method == "full" else f"ipc {subject.ipc}"
    print(
        f"{subject.method} {results[0].arch} on {subject.space.dataset} {ipc}: "
        f"{accs.mean():.2f} +- {accs.std():.2f} % over {len(accs)} runs -> {args.out}"
    )
    return 0


def run_kept_sets(args: argparse.Namespace, kept_sets: Path, selection: KeptSetSelection, device: torch.device) -> int:
    """``--kept-sets``: every kept set evaluated; --out the runs of the selected one, the per-set table beside it."""
    refuse_baseline_options(args)
    numerics = Numerics.from_arguments(args, device)
    numerics.apply(device)
    checkpoint = checkpoint_path(args)
    protocol = from_args(Protocol, args, lr=LR_RANDOM, dsa_strategy="")  # each set's own lr and augmentation replace these
    with acquire(f"{checkpoint}.lock", stage="tesla evaluate", protects=f"the checkpoint {checkpoint}"):
        evaluate_set = kept_set_evaluation(
            args.arch, args.test, protocol, validation=selection.validation, checkpoint=checkpoint, runs=args.runs,
            seed=args.seed, device=device, group_mode=args.group_mode, numerics=numerics,
            checkpoint_every=args.checkpoint_every,
        )
        per_set, scores, chosen = evaluate_kept_sets(kept_sets, evaluate_set, validation=selection.validation,
                                                     select=selection.select, checkpoint=checkpoint)
        first = per_set[chosen][0]
        sets_out = selection.sets_out or Path(args.out).with_suffix(".sets.csv")
        write_sets(sets_out, set_rows(scores, first.dataset, first.ipc, first.engine, first.arch))
        write_runs(args.out, per_set[chosen])
        remove_progress(checkpoint)  # the checkpoint and the finished sets' runs
    if tracking_options(args).tracker is not None:  # the live curves of the selected set's runs
        track_results(args, synthetic_subject(first.source, device), per_set[chosen])
    print(f"{len(scores)} kept sets of {first.dataset} ipc {first.ipc} on {first.arch} (test accuracy %):")
    for line in summary_lines(scores):
        print(line)
    print(f"-> {args.out} (the {selection.select} set, iteration {first.iteration}), {sets_out}")
    return 0
