"""Several networks with the same settings trained in one process (the experts of one job, the
runs of one evaluation), in one of the group modes (:mod:`tesla.group_modes`): one after the
other (``sequential``, each through :func:`tesla.training.train_alone`, the one-network path of
:func:`tesla.training.train`, under the group's :class:`~tesla.training.Recipe`: bitwise equal to alone),
their minibatch steps interleaved on separate CUDA streams (``streams``, the interleaved loop
of :mod:`tesla.training`), or stacked into one vmapped step (``vmap``, the loop of this module,
equal to alone within float32 round-off). Each network keeps its own initialisation, generator
(minibatch order and augmentation draws), optimizer state and callbacks.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from torch.func import functional_call, stack_module_state, vmap

from tesla import training
from tesla.errors import TeslaError
from tesla.group_modes import GROUP_MODES, resolve_group_mode
from tesla.losses import training_loss
from tesla.precision import Numerics
from tesla.training import (
    FINITE_CHECK_EVERY,
    Augmentation,
    EpochStats,
    EpochTally,
    GroupMember,
    Recipe,
    begin_epoch,
    check_finite,
    check_member,
    close_epoch,
    epoch_cohorts,
    gather_minibatch,
    make_recipe,
    minibatches,
    progress_bar,
    train_interleaved,
)

__all__ = ["train_group"]


def train_group(
    members: Sequence[GroupMember],
    *,
    mode: str,
    epochs: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    dsa: Augmentation | None = None,
    lr_decay_epochs: Sequence[int] = (),
    lr_decay: float = 0.1,
    reset_momentum_at_decay: bool = False,
    input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    numerics: Numerics | None = None,
    progress: bool | None = False,
    desc: str = "train",
) -> list[list[EpochStats]]:
    """Train several networks with the same settings in one process; network k of the group
    computes what :func:`tesla.training.train` computes for it alone (its own initialisation, generator,
    data, optimizer, start epoch and callbacks).  ``mode`` (:data:`GROUP_MODES`):

    * ``sequential``: one after the other, each through :func:`tesla.training.train_alone` (the path
      of :func:`tesla.training.train`) with the group's recipe: bitwise equal to alone;
    * ``streams``: their minibatch steps interleaved, each network's on its own CUDA stream
      so that the GPU can overlap their kernels; the same kernels as alone (on a device
      without streams: interleaved on one, bitwise equal to alone);
    * ``vmap``: the networks' parameters stacked, theta[k] = network k's, and one step for
      all, ``torch.func.vmap`` over ``functional_call`` (convolutions become grouped
      convolutions), summed losses sum_k l_k(theta[k]) differentiated once (network k's
      gradient is grad l_k, as nothing else depends on theta[k]), one SGD update of the
      stacked tensors (element-wise, so each network's SGD): equal to alone within float32
      round-off.  Needs SGD optimizers, the same number of images for every network and a
      contiguous layout; batch-norm running statistics are stacked and updated per network.
      Networks that resume at a later epoch join the stack when the others reach it.

    Returns each member's statistics of the epochs it ran.
    """
    if mode not in GROUP_MODES:
        raise TeslaError(f"group mode {mode!r}: choose one of {', '.join(GROUP_MODES)} (or auto)")
    if not members:
        return []
    recipe = make_recipe(epochs, lr, momentum, weight_decay, batch_size, lr_decay_epochs, lr_decay, reset_momentum_at_decay)
    numerics = numerics or Numerics()
    for member in members:
        check_member(member, recipe)
    if mode == "sequential":
        return [training.train_alone(m, recipe, dsa, input_transform, numerics, progress=progress) for m in members]
    if mode == "vmap":
        _check_stackable(members, numerics)
        return _train_stacked(list(members), recipe, dsa, input_transform, numerics, progress=progress, desc=desc)
    return train_interleaved(list(members), recipe, dsa, input_transform, numerics, streams=True, progress=progress, desc=desc)



class _Stack:
    """The networks of a cohort as one stacked network: theta[k] = network k's parameters
    (``torch.func.stack_module_state``), one SGD optimizer over the stacked tensors (SGD is
    element-wise, so it is each network's SGD; their momentum buffers are stacked too)."""

    def __init__(self, members: Sequence[GroupMember], numerics: Numerics) -> None:
        self.members = list(members)
        self.numerics = numerics
        template = self.members[0].model
        self.params, self.buffers = stack_module_state([m.model for m in self.members])
        settings = _sgd_settings(self.members[0].optimizer)
        self.optimizer = torch.optim.SGD(list(self.params.values()), **settings)
        for name, stacked in self.params.items():
            buffers = [_momentum_buffer(m, name) for m in self.members]
            if all(b is not None for b in buffers):
                self.optimizer.state[stacked]["momentum_buffer"] = torch.stack(buffers)
            elif any(b is not None for b in buffers):  # networks of one cohort are at the same epoch
                raise TeslaError("networks resumed at the same epoch disagree on having an SGD momentum buffer; "
                                 "their partial states are inconsistent: delete them to start over")

        def forward(params, buffers, xb):
            return functional_call(template, (params, buffers), (xb,))

        self._forward = vmap(forward)
        self._losses = vmap(training_loss)

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step of every network on its minibatch: xb K x B x C x H x W, yb K x B (x classes).
        Returns (K losses, K x B x classes logits)."""
        with self.numerics.autocast(xb.device):
            logits = self._forward(self.params, self.buffers, xb)
            losses = self._losses(logits, yb)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        self.optimizer.step()
        return losses, logits

    @torch.no_grad()
    def unstack(self) -> None:
        """Copy network k's parameters, buffers, momentum buffer and lr back into member k."""
        lr = self.optimizer.param_groups[0]["lr"]
        for k, m in enumerate(self.members):
            for name, p in m.model.named_parameters():
                p.copy_(self.params[name][k])
                state = m.optimizer.state[p]
                stacked = self.optimizer.state.get(self.params[name], {}).get("momentum_buffer")
                if stacked is None:
                    state.pop("momentum_buffer", None)
                else:
                    state["momentum_buffer"] = stacked[k].clone()
            for name, b in m.model.named_buffers():
                b.copy_(self.buffers[name][k])
            for group in m.optimizer.param_groups:
                group["lr"] = lr


def _sgd_settings(optimizer: torch.optim.Optimizer) -> dict:
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        raise TeslaError("group mode vmap stacks plain SGD optimizers (one parameter group); use --group-mode sequential")
    group = optimizer.param_groups[0]
    return {k: group[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov")}


def _momentum_buffer(member: GroupMember, name: str) -> torch.Tensor | None:
    param = dict(member.model.named_parameters())[name]
    return member.optimizer.state.get(param, {}).get("momentum_buffer")


def _check_stackable(members: Sequence[GroupMember], numerics: Numerics) -> None:
    """What vmap needs: one architecture, the same data shape and label kind, SGD with the
    same settings, a contiguous layout."""
    if numerics.channels_last:
        resolve_group_mode("vmap", members[0].x.device, len(members), numerics)  # raises
    first = members[0]
    layout = [(n, tuple(p.shape)) for n, p in first.model.named_parameters()]
    buffers = [(n, tuple(b.shape)) for n, b in first.model.named_buffers()]
    settings = _sgd_settings(first.optimizer)
    for m in members[1:]:
        if [(n, tuple(p.shape)) for n, p in m.model.named_parameters()] != layout or \
                [(n, tuple(b.shape)) for n, b in m.model.named_buffers()] != buffers or type(m.model) is not type(first.model):
            raise TeslaError(f"group mode vmap: {m.name} is another architecture than {first.name}; "
                             "vmap trains copies of one network (use --group-mode sequential)")
        if tuple(m.x.shape) != tuple(first.x.shape) or m.y.dtype != first.y.dtype or tuple(m.y.shape) != tuple(first.y.shape):
            raise TeslaError(f"group mode vmap: {m.name} has {tuple(m.x.shape)} images and labels {tuple(m.y.shape)}, "
                             f"{first.name} {tuple(first.x.shape)} and {tuple(first.y.shape)}; vmap needs the same number "
                             "of images and the same label kind for every network (use --group-mode sequential)")
        if _sgd_settings(m.optimizer) != settings:
            raise TeslaError("group mode vmap: the networks' SGD settings differ; use --group-mode sequential")


def _train_stacked(members: list[GroupMember], recipe: Recipe, dsa, input_transform, numerics: Numerics, *,
                   progress: bool | None, desc: str) -> list[list[EpochStats]]:
    """The vmap loop: each epoch, the networks that are due (started, not ended) train as one
    stack; every network draws its own minibatch order and augmentation from its generator,
    in the same order as alone (the permutation first, then one draw per minibatch).  The
    stack is copied back into the members after every epoch when they have callbacks (they
    save states), else when the cohort changes and at the end."""
    device = members[0].x.device
    histories: list[list[EpochStats]] = [[] for _ in members]
    running = [True] * len(members)
    shared_x = all(m.x is members[0].x for m in members)
    for m in members:
        m.model.train()
    stack: _Stack | None = None
    stacked: list[int] = []
    callbacks = any(m.on_epoch_end is not None for m in members)
    bar = progress_bar(members, recipe, progress, desc)
    try:
        for epoch, cohort in epoch_cohorts(members, running, recipe):
            if cohort != stacked:
                if stack is not None and not callbacks:
                    stack.unstack()
                stack, stacked = _Stack([members[k] for k in cohort], numerics), cohort
            lr_e = begin_epoch([stack.optimizer], recipe, epoch)
            t0 = time.perf_counter()
            tally = EpochTally(len(cohort), device)
            orders = [minibatches(members[k].x.shape[0], recipe.batch_size, members[k].generator, device) for k in cohort]
            for step in range(len(orders[0])):
                xb, yb = _stacked_minibatch([members[k] for k in cohort], [o[step] for o in orders], input_transform, dsa,
                                            shared_x)
                losses, logits = stack.step(xb, yb)
                tally.add(slice(None), losses, logits, yb)
                if bar is not None:
                    bar.update(len(cohort))
                if step % FINITE_CHECK_EVERY == FINITE_CHECK_EVERY - 1:
                    for j, value in enumerate(tally.loss_sum.tolist()):
                        check_finite(value, epoch, lr_e, members[cohort[j]].name)
            seconds = time.perf_counter() - t0
            if callbacks:
                stack.unstack()
            close_epoch(members, cohort, tally, histories, running, epoch, lr_e, seconds, bar)
        if stack is not None and not callbacks:
            stack.unstack()
    finally:
        if bar is not None:
            bar.close()
    return histories


def _stacked_minibatch(members: Sequence[GroupMember], idx: Sequence[torch.Tensor], input_transform, dsa,
                       shared_x: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """K minibatches stacked, K x B x ...: one gather and one input transform for all when the
    networks share their images, then each network's own augmentation draw."""
    if shared_x:
        order = torch.stack(list(idx))
        xs = members[0].x[order.reshape(-1)]
        if input_transform is not None:
            xs = input_transform(xs)
        xs = xs.view(len(members), -1, *xs.shape[1:])
        ys = [m.y[i] for m, i in zip(members, idx)]
        if dsa is not None:
            xs = torch.stack([dsa(xs[k], m.generator)[0] for k, m in enumerate(members)])
        return xs, torch.stack(ys)
    batches = [gather_minibatch(m, i, input_transform, dsa) for m, i in zip(members, idx)]
    return torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])
