"""One student step of trajectory matching: its math, and its eager execution.

Step i of the student (PAPER.md sections 1-2), with g_i = grad_theta l(f_theta_i(A_i(X_b)), Y_b),
J_i = d g_i / d X_b and H_i = d g_i / d theta_i, has two forms:

``update`` (the forward sweep)::

    theta_{i+1} = theta_i - alpha g_i,     G_{i+1} = G_i + g_i

``adjoint`` (the reverse sweep, against a vector w)::

    s_i = g_i . w,    dX_b = -alpha J_i^T w,    w' = w - alpha H_i w   (exact; first order: w' = w)

one vector-Jacobian product of (theta, X_b) -> g_i against w gives (H_i w, J_i^T w).

The steps of one matching call run eagerly here (:class:`EagerSteps`: autograd per step, the
reference) or as traced and compiled graphs (:mod:`tesla.step_compiler`); both drive the
:class:`StudentSteps` interface that the sweeps of :mod:`tesla.matching` use. Over several
processes (:mod:`tesla.distributed`) a step's rows are a shard of the minibatch, and the eager
steps pass the sum over the ranks to :func:`student_update` and :func:`adjoint_step` as ``reduce``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from tesla.errors import TeslaError

__all__ = [
    "AugmentFn",
    "EagerSteps",
    "LossFn",
    "Reduce",
    "StepInputs",
    "StudentSteps",
    "adjoint_step",
    "augmentations_on",
    "student_gradient",
    "student_update",
]

#: l(theta, x, y): the mean training loss of the student with flat parameters theta on a batch.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: x -> A(x): a step's augmentation, differentiable in x.
AugmentFn = Callable[[torch.Tensor], torch.Tensor]
#: a sum over the processes of a distributed run (in place), see tesla.distributed.Ranks.sum
Reduce = Callable[[torch.Tensor], torch.Tensor]


def student_gradient(
    loss_fn: LossFn, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, create_graph: bool = False
) -> torch.Tensor:
    """g = grad_theta l(f_theta(x), y) for a flat parameter vector ``theta`` that requires grad."""
    (g,) = torch.autograd.grad(loss_fn(theta, x, y), theta, create_graph=create_graph)
    return g


def student_update(
    loss_fn: LossFn,
    theta: torch.Tensor,
    total: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    alpha: torch.Tensor,
    augment: AugmentFn,
    reduce: Reduce | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """theta_{i+1} = theta_i - alpha g_i and G_{i+1} = G_i + g_i, with g_i at (theta_i, A_i(x)).

    Over several processes ``reduce`` sums the ranks' shares of g_i (:mod:`tesla.distributed`)."""
    with torch.enable_grad():
        t = theta.detach().requires_grad_(True)
        g = student_gradient(loss_fn, t, augment(x.detach()), y)
    if reduce is not None:
        g = reduce(g)
    return theta - alpha * g, total + g


def adjoint_step(
    loss_fn: LossFn,
    theta: torch.Tensor,
    w: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    alpha: torch.Tensor,
    augment: AugmentFn,
    propagate_hessian: bool,
    label_gradient: bool = False,
    reduce: Reduce | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One reverse-sweep step: s = g . w, dX_b = -alpha J^T w, dY_b = -alpha K^T w (with
    ``label_gradient``; K = d g / d Y_b, the soft targets being the third differentiated
    input) and w' = w - alpha H w (w' = w when ``propagate_hessian`` is off: the first-order
    procedure).

    One vector-Jacobian product of s w.r.t. [X_b, theta, Y_b] gives J^T w, H w and K^T w.
    Over several processes (x, y a shard of the minibatch) ``reduce`` sums the ranks' H w;
    dX_b, dY_b and s stay this shard's. Returns (w', dX_b, dY_b or None, s).
    """
    if label_gradient and not y.is_floating_point():
        raise TeslaError("a label gradient needs soft (floating-point) labels, not class indices")
    with torch.enable_grad():
        t = theta.detach().requires_grad_(True)
        xb = x.detach().requires_grad_(True)
        yb = y.detach().requires_grad_(True) if label_gradient else y
        g = student_gradient(loss_fn, t, augment(xb), yb, create_graph=True)
        s = torch.dot(g.reshape(-1), w.reshape(-1))
        wrt = [xb] + ([t] if propagate_hessian else []) + ([yb] if label_gradient else [])
        grads = list(torch.autograd.grad(s, wrt, allow_unused=True))
    jt_w = grads.pop(0)
    jt_w = torch.zeros_like(xb) if jt_w is None else jt_w
    w_next = w
    if propagate_hessian:
        h_w = grads.pop(0)
        h_w = torch.zeros_like(w) if h_w is None else h_w
        if reduce is not None:
            h_w = reduce(h_w)
        w_next = w - alpha * h_w
    dy = None
    if label_gradient:
        kt_w = grads.pop(0)
        dy = -alpha * (torch.zeros_like(yb) if kt_w is None else kt_w)
    return w_next, -alpha * jt_w, dy, s.detach()



@dataclass(frozen=True)
class StepInputs:
    """What every step of one matching call reads: the synthetic set, its labels, the learned
    alpha (0-d tensor), and per step i its minibatch indices (on the images' device) and its
    augmentation sample (as drawn, on the CPU: each executor moves what it needs before the
    sweeps)."""

    images: torch.Tensor
    labels: torch.Tensor
    alpha: torch.Tensor
    indices: list[torch.Tensor]
    augmentations: list[Any]
    label_gradient: bool = False  # the reverse sweep also gives dL/dY (soft labels learned with the images)
    #: over several processes: step i's rows are this rank's shard of b_i and weighs |shard| / |b_i|
    #: (its loss is the shard's sum over the FULL batch size), and ``reduce`` sums over the ranks
    weights: tuple[float, ...] | None = None
    reduce: Reduce | None = None
    touched: torch.Tensor | None = None  # over several processes: the rows some rank's step reads



class StudentSteps(Protocol):
    """What the sweeps of :mod:`tesla.matching` drive: the state (theta = theta_i, total = G,
    w = the adjoint vector) and the two kinds of step. :class:`EagerSteps` and
    :class:`tesla.step_compiler.GraphSteps` provide it."""

    mode: str
    theta: torch.Tensor
    total: torch.Tensor

    def begin(self, theta_start: torch.Tensor) -> None: ...

    def update(self, i: int) -> None: ...

    def begin_adjoint(self, v: torch.Tensor) -> None: ...

    def adjoint(
        self, i: int, theta_i: torch.Tensor, propagate_hessian: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Step i of the reverse sweep at theta_i: (dX_b, dY_b or None, s), leaving w' as the new w."""
        ...


def augmentations_on(device: torch.device, samples: Sequence[Any]) -> list[Any]:
    """Every step's augmentation sample moved to ``device`` (once, before the sweeps)."""
    return [p.to(device) if p is not None and hasattr(p, "to") else p for p in samples]


class EagerSteps:
    """Steps run eagerly (compile mode ``off``): autograd per step, step i applying its own
    sample with ``augment.apply``. State: theta (theta_i), total (G), w (the adjoint vector)."""

    mode = "off"

    def __init__(self, loss_fn: LossFn, inputs: StepInputs, augment: Any | None) -> None:
        self.loss_fn, self.inputs, self.augment = loss_fn, inputs, augment
        self.samples = augmentations_on(inputs.images.device, inputs.augmentations)
        self.theta = self.total = self.w = None

    def _augment(self, i: int) -> AugmentFn:
        params = self.samples[i]
        if self.augment is None or params is None:
            return lambda x: x
        return lambda x: self.augment.apply(x, params)

    def _batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.inputs.indices[i]
        return self.inputs.images.detach().index_select(0, idx), self.inputs.labels.index_select(0, idx)

    def begin(self, theta_start: torch.Tensor) -> None:
        self.theta = theta_start.detach().reshape(-1).clone()
        self.total = torch.zeros_like(self.theta)

    def _loss(self, i: int) -> LossFn:
        """Step i's loss: l itself, or over several processes this shard's share of it."""
        weights = self.inputs.weights
        if weights is None:
            return self.loss_fn
        return lambda theta, x, y: self.loss_fn(theta, x, y) * weights[i]

    def update(self, i: int) -> None:
        x, y = self._batch(i)
        self.theta, self.total = student_update(
            self._loss(i), self.theta, self.total, x, y, self.inputs.alpha, self._augment(i), self.inputs.reduce
        )

    def begin_adjoint(self, v: torch.Tensor) -> None:
        self.w = v

    def adjoint(
        self, i: int, theta_i: torch.Tensor, propagate_hessian: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        x, y = self._batch(i)
        theta = theta_i.to(self.w.device, non_blocking=True)
        self.w, dx, dy, s = adjoint_step(
            self._loss(i), theta, self.w, x, y, self.inputs.alpha, self._augment(i), propagate_hessian,
            self.inputs.label_gradient, self.inputs.reduce,
        )
        return dx, dy, s
