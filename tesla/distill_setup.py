"""The inputs of one distillation, opened and cross-checked before any work starts.

A :class:`DistillSetup` holds what every iteration reads: the training split, the expert
trajectories (all of one network, dataset, input space and ZCA, each storing the snapshots
the matching window reaches), their network and its loss l(f_theta(x), y), the ZCA transform,
the DSA strategy, the device, the synthetic set's size and minibatch size, the student-step
compiler and the processes of the job. Anything that does not fit raises
:class:`tesla.errors.TeslaError` naming the file or setting and the fix.

:func:`result_key` names a run by what its synthetic set depends on (its result settings and
its inputs' fingerprints).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tesla import distributed
from tesla.augment import DSA
from tesla.data import ImageSplit
from tesla.distributed import SINGLE, Ranks
from tesla.distill_settings import DistillSettings
from tesla.errors import TeslaError
from tesla.input_space import experts_input_space
from tesla.matching import check_shardable
from tesla.models import build_from_spec
from tesla.parameters import functional_forward, param_layout
from tesla.sharding import batch_norm_problem
from tesla.step_compiler import StepCompiler, resolve_compile_mode
from tesla.devices import pick_device
from tesla.losses import training_loss
from tesla.trajectories import Trajectory
from tesla.zca import zca_fingerprint



@dataclass
class DistillSetup:
    """What a run needs, opened and checked: the split, the experts, the network, ZCA, DSA."""

    settings: DistillSettings
    split: Any
    experts: list[Any]
    model: torch.nn.Module
    model_spec: dict
    zca: Any | None
    zca_bytes: bytes | None
    dsa: Any | None
    dsa_strategy: str
    device: torch.device
    num_images: int
    batch_syn: int
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = field(repr=False, default=None)
    input_space: Any = None  # tesla.input_space.InputSpace of the experts
    compiler: StepCompiler | None = field(repr=False, default=None)  # None: eager student steps
    ranks: Ranks = SINGLE  # the processes of the job (tesla.distributed); one by default

    @cached_property
    def fingerprints(self) -> dict[str, Any]:
        """See :func:`input_fingerprints`."""
        return {
            "train": self.split.fingerprint,
            "experts": [e.content_fingerprint() for e in self.experts],
            "zca": zca_fingerprint(self.zca),
        }


def _open_experts(s: DistillSettings, split: ImageSplit) -> list[Trajectory]:
    """Open the expert files and refuse any of another network, dataset or ZCA setting, or
    one that stores fewer snapshots than max_start_epoch + expert_epochs + 1."""
    experts = [Trajectory.open(p) for p in s.experts]
    first = experts[0]
    spec = first.model_spec
    for key, value in (("channels", split.channels), ("resolution", split.resolution), ("num_classes", split.num_classes)):
        if int(spec.get(key, -1)) != int(value):
            raise TeslaError(
                f"{s.experts[0]}: expert network has {key}={spec.get(key)}, {s.train} has {value}; "
                "give experts trained on this split"
            )
    if s.uses_init_snapshot:
        _check_init_snapshot(s, experts)
    need = s.last_window_snapshot + 1
    bound = "--max-start-epoch" if s.max_start_epoch_final is None else "--max-start-epoch-final"
    window = f"{bound} {s.largest_max_start_epoch}"
    if s.max_start_epoch_final is not None:
        window = f"the window's largest upper bound ({bound}) {s.largest_max_start_epoch}"
    for traj in experts:
        traj.check_compatible(
            model_spec=spec,
            dataset_fingerprint=split.fingerprint,
            zca_fingerprint=first.zca_fingerprint,
            needed_snapshots=None,
        )
        if traj.num_snapshots < need:
            raise TeslaError(
                f"{traj.path}: stores snapshots theta*_0 .. theta*_{traj.num_snapshots - 1}, but {window} "
                f"+ --expert-epochs {s.expert_epochs} needs theta*_{need - 1}; lower {bound} to at most "
                f"{max(0, traj.num_snapshots - 1 - s.expert_epochs)} or train experts keeping more snapshots"
            )
    return experts


def _check_init_snapshot(s: DistillSettings, experts: list[Trajectory]) -> None:
    """The initialising snapshot (``init_expert`` at ``init_epoch``) is among the experts' files."""
    if s.init_expert >= len(experts):
        raise TeslaError(
            f"--init-expert {s.init_expert}: there are only {len(experts)} --experts (indices 0..{len(experts) - 1}); "
            "give the index of the expert whose snapshot initialises the images/labels"
        )
    init_traj = experts[s.init_expert]
    if s.init_snapshot_epoch >= init_traj.num_snapshots:
        raise TeslaError(
            f"{init_traj.path}: --init-epoch {s.init_snapshot_epoch} (default: --max-start-epoch) needs snapshot "
            f"theta*_{s.init_snapshot_epoch}, but the file stores theta*_0 .. theta*_{init_traj.num_snapshots - 1}; "
            f"give --init-epoch at most {init_traj.num_snapshots - 1}"
        )


def _check_per_sample(model: torch.nn.Module, spec: dict, ranks: Ranks) -> None:
    """Refuse a batch-statistics network over several processes: each rank would normalise its
    shard of a minibatch by the shard's own statistics, which is not the one-process network."""
    if ranks.distributed and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise TeslaError(f"a run over {ranks.world_size} processes: {batch_norm_problem(str(spec.get('name')))}")


def _synthetic_size(s: DistillSettings, split: ImageSplit) -> tuple[int, int]:
    """(n, B): the synthetic set's size ipc x classes and the student's minibatch size
    (``batch_syn``, by default all n images); refused when a class has fewer than ipc images
    or B > n."""
    smallest = int(np.diff(split.class_offsets).min())
    if s.ipc > smallest:
        c = int(np.argmin(np.diff(split.class_offsets)))
        raise TeslaError(
            f"--ipc {s.ipc}: class {split.class_ids[c]} of {s.train} has only {smallest} images; "
            f"lower --ipc to at most {smallest}"
        )
    num_images = s.ipc * split.num_classes
    batch_syn = num_images if s.batch_syn is None else s.batch_syn
    if batch_syn > num_images:
        raise TeslaError(
            f"--batch-syn {batch_syn} is larger than the synthetic set ({s.ipc} x {split.num_classes} classes = "
            f"{num_images} images); lower --batch-syn to at most {num_images} (or omit it: all images)"
        )
    return num_images, batch_syn


def open_setup(s: DistillSettings, ranks: Ranks = SINGLE) -> DistillSetup:
    """Open and cross-check the inputs of settings that passed their own checks; raise
    TeslaError with the fix for anything wrong. ``ranks``: the processes of a distributed job
    (:mod:`tesla.distributed`)."""
    split = ImageSplit.open(s.train)
    num_images, batch_syn = _synthetic_size(s, split)
    check_shardable(s.engine, batch_syn, num_images, ranks)  # before the experts and the network are loaded
    experts = _open_experts(s, split)
    input_space = experts_input_space(experts, split, s.zca)
    zca, zca_bytes = input_space.zca, (Path(s.zca).read_bytes() if input_space.zca is not None else None)
    strategy = s.dsa if s.dsa is not None else (experts[0].dsa or "none")
    dsa = DSA(strategy)
    device = distributed.local_device(pick_device(s.device), ranks)
    compile_mode = resolve_compile_mode(s.compile, device)
    spec = dict(experts[0].model_spec)
    model = build_from_spec(spec).to(device)
    layout = param_layout(model)
    _check_per_sample(model, spec, ranks)
    if layout.total != experts[0].num_params:
        raise TeslaError(
            f"{s.experts[0]}: snapshots have {experts[0].num_params} parameters, the network "
            f"{spec.get('name')} has {layout.total}; the file does not match its own model spec"
        )

    def loss_fn(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """l(f_theta(x), y): cross-entropy (hard labels) or soft-target cross-entropy."""
        return training_loss(functional_forward(model, theta, x, layout=layout), y)

    return DistillSetup(
        settings=s,
        split=split,
        experts=experts,
        model=model,
        model_spec=spec,
        zca=zca,
        zca_bytes=zca_bytes,
        dsa=None if not dsa.families else dsa,
        dsa_strategy=dsa.strategy,
        device=device,
        num_images=num_images,
        batch_syn=batch_syn,
        loss_fn=loss_fn,
        input_space=input_space,
        compiler=None if compile_mode == "off" else StepCompiler(compile_mode, announce=s.progress, fallback=s.compile == "auto"),
        ranks=ranks,
    )


def input_fingerprints(setup: DistillSetup) -> dict[str, Any]:
    """The fingerprints of a run's inputs: the training split, each expert trajectory's
    content, the ZCA transform (computed once per setup: they read two snapshots of every
    expert and hash the ZCA matrix)."""
    return setup.fingerprints


def result_key(setup: DistillSetup) -> str:
    """A digest of everything the synthetic set depends on: the result settings
    (:meth:`DistillSettings.result_settings`) and the fingerprints of the inputs
    (:func:`input_fingerprints`). Names the checkpoint under ``--checkpoint-dir``: a rerun of
    the same job on the same inputs resumes it, a rerun with anything changed starts afresh
    (with another name) instead of resuming a foreign state."""
    key = {"settings": setup.settings.result_settings(), **input_fingerprints(setup)}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=repr).encode()).hexdigest()[:16]
