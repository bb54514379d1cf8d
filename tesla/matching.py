"""Trajectory matching: the MTT loss and three engines for its gradient.

A student starts at an expert snapshot theta*_t and takes N = ``syn_steps`` SGD steps on
minibatches of the synthetic set X (labels Y), with the learnable learning rate alpha::

    theta_0 = theta*_t,   theta_{i+1} = theta_i - alpha g_i,
    g_i = grad_theta l(f_theta_i(A_i(X_{b_i})), Y_{b_i})

where A_i is a sampled differentiable augmentation and b_i a minibatch of ``batch_syn``
indices (chunks of a random permutation, redrawn when exhausted). The matching loss is::

    L = ||theta_N - theta*_{t+M}||^2 / D,   D = ||theta*_t - theta*_{t+M}||^2.

With v = (2/D)(theta_N - theta*_{t+M}), J_i = d g_i / d X_{b_i} and H_i the Hessian of l at
(theta_i, batch i), the three engines (PAPER.md section 2) are:

``exact``
    the true gradient by a reverse sweep over the stored theta_i (constant activation
    memory: one step's graph, plus N flat parameter vectors, kept in host memory when the
    student runs on a GPU)::

        v_N = v;  for i = N-1 .. 0:
            dL/dX_{b_i} += -alpha J_i^T v_{i+1}
            dL/dalpha   += -g_i . v_{i+1}
            v_i = v_{i+1} - alpha H_i v_{i+1}

``tesla``
    the first-order procedure of the published TESLA code (same memory): every product
    prod_k (I - alpha H_k) replaced by I, i.e. dL/dX_{b_i} = -alpha J_i^T v and
    dL/dalpha = -v . G with G = sum_i g_i. Exact for N = 1 only.

``unroll``
    autograd through all N steps (MTT): activation memory grows as N x batch. The reference
    for tests and the memory baseline.

All three draw the same :class:`StudentStep` plan (minibatches and augmentation samples)
from the generator, so with the same generator state they follow the same trajectory and
report the same loss value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from tesla.errors import TeslaError

ENGINES: tuple[str, ...] = ("exact", "tesla", "unroll")

#: l(theta, x, y): the mean training loss of the student with flat parameters theta on a batch.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Augmentation(Protocol):
    """What the engines need from an augmentation (``tesla.augment.DSA`` provides it)."""

    def sample(self, shape: Sequence[int], generator: torch.Generator) -> Any: ...

    def apply(self, x: torch.Tensor, params: Any) -> torch.Tensor: ...


@dataclass(frozen=True)
class StudentStep:
    """One student step's randomness: minibatch indices b_i and augmentation sample A_i."""

    indices: torch.Tensor
    augmentation: Any | None


@dataclass
class MatchResult:
    """The matching loss L and its gradients w.r.t. the synthetic images and alpha."""

    loss: float
    grad_images: torch.Tensor
    grad_alpha: float
    start_distance: float  # D = ||theta*_t - theta*_{t+M}||^2
    final_distance: float  # ||theta_N - theta*_{t+M}||^2
    engine: str
    syn_steps: int


def plan_student_steps(
    num_images: int,
    syn_steps: int,
    batch_syn: int,
    image_shape: Sequence[int],
    augment: Augmentation | None,
    generator: torch.Generator,
) -> list[StudentStep]:
    """Draw b_0..b_{N-1} and A_0..A_{N-1}.

    Minibatches are consecutive chunks of ``batch_syn`` indices of a random permutation of
    0..num_images-1; a new permutation is drawn when the current one is exhausted (the last
    chunk of a permutation may be shorter). Augmentation parameters are sampled per step for
    that step's batch shape. Everything is drawn from ``generator`` (a CPU generator).
    """
    if syn_steps < 1:
        raise ValueError(f"syn_steps must be at least 1, got {syn_steps}")
    if not 1 <= batch_syn <= num_images:
        raise ValueError(f"batch_syn must be in 1..{num_images}, got {batch_syn}")
    steps: list[StudentStep] = []
    chunks: list[torch.Tensor] = []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.randperm(num_images, generator=generator).split(batch_syn))
        indices = chunks.pop(0)
        params = None
        if augment is not None:
            params = augment.sample((len(indices), *image_shape), generator)
        steps.append(StudentStep(indices=indices, augmentation=params))
    return steps


def _on_device(step: StudentStep, device: torch.device) -> StudentStep:
    """The step's indices and augmentation parameters moved to ``device`` (sampled on the CPU)."""
    params = step.augmentation
    if params is not None and hasattr(params, "to"):
        params = params.to(device)
    return StudentStep(indices=step.indices.to(device), augmentation=params)


def _student_batch(
    images: torch.Tensor, labels: torch.Tensor, step: StudentStep, augment: Augmentation | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_i(X_{b_i}), Y_{b_i}); differentiable w.r.t. ``images``."""
    idx = step.indices.to(images.device)
    x = _augmented(images.index_select(0, idx), step, augment)
    return x, labels.index_select(0, idx.to(labels.device))


def _augmented(x: torch.Tensor, step: StudentStep, augment: Augmentation | None) -> torch.Tensor:
    """A_i(x) with step i's stored augmentation sample (identity without augmentation)."""
    if augment is None or step.augmentation is None:
        return x
    return augment.apply(x, step.augmentation)


def student_gradient(
    loss_fn: LossFn, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, create_graph: bool = False
) -> torch.Tensor:
    """g = grad_theta l(f_theta(x), y) for a flat parameter vector ``theta`` that requires grad."""
    (g,) = torch.autograd.grad(loss_fn(theta, x, y), theta, create_graph=create_graph)
    return g


def _distance_normaliser(theta_start: torch.Tensor, theta_target: torch.Tensor) -> float:
    """D = ||theta*_t - theta*_{t+M}||^2 (must be positive)."""
    d = float(torch.sum((theta_start - theta_target) ** 2))
    if not d > 0:
        raise TeslaError(
            "the expert did not move between the start and target snapshots (distance 0): "
            "use an expert trained with a non-zero learning rate, or a larger --expert-epochs"
        )
    return d


def _forward_sweep(
    loss_fn: LossFn,
    theta_start: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    plan: list[StudentStep],
    augment: Augmentation | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run theta_{i+1} = theta_i - alpha g_i without a graph through the steps.

    Returns the student trajectory as one (N+1) x P tensor (row i = theta_i, row N =
    theta_N) and G = sum_i g_i. Memory on the compute device: one step's graph (freed after
    each step) plus that tensor, which :func:`trajectory_storage` puts in (pinned) host memory
    when the computation runs on a GPU, so that GPU memory does not grow with N; rows go
    back and forth with one copy per step, ordered on the current stream.
    """
    theta = theta_start.detach().reshape(-1).clone()
    store = trajectory_storage(theta.device)
    trajectory = torch.empty(
        (len(plan) + 1, theta.numel()), dtype=theta.dtype, device=store,
        pin_memory=store.type == "cpu" and theta.device.type == "cuda",
    )
    trajectory[0].copy_(theta, non_blocking=True)
    G = torch.zeros_like(theta)
    x_all = images.detach()
    for i, step in enumerate(plan):
        with torch.enable_grad():
            t = theta.clone().requires_grad_(True)
            x, y = _student_batch(x_all, labels, step, augment)
            g = student_gradient(loss_fn, t, x, y)
        G.add_(g)
        theta = theta - alpha * g
        trajectory[i + 1].copy_(theta, non_blocking=True)
    return trajectory, G


def trajectory_storage(compute: torch.device) -> torch.device:
    """Where the stored student trajectory theta_0..theta_N lives: host memory when the
    student runs on a GPU (N x P floats, e.g. 0.8 GB for ConvNetD4 at N = 80, would otherwise
    be the only GPU memory that grows with N), else the compute device itself."""
    return torch.device("cpu") if compute.type == "cuda" else compute


def _reverse_sweep(
    loss_fn: LossFn,
    thetas: torch.Tensor,
    v: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    plan: list[StudentStep],
    augment: Augmentation | None,
    propagate_hessian: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate dL/dX and dL/dalpha step by step, last step first.

    For step i, with w = v_{i+1} (exact) or w = v (first-order), one vector-Jacobian product
    of s_i = g_i . w w.r.t. [X_{b_i}, theta_i] gives J_i^T w and H_i w::

        dL/dX_{b_i} += -alpha J_i^T w,   dL/dalpha += -g_i . w,   v_i = w - alpha H_i w.
    """
    grad_images = torch.zeros_like(images)
    grad_alpha = torch.zeros((), dtype=v.dtype, device=v.device)
    x_all = images.detach()
    for i in reversed(range(len(plan))):
        with torch.enable_grad():
            theta = thetas[i].to(v.device, non_blocking=True).detach().requires_grad_(True)
            xb = x_all.index_select(0, plan[i].indices.to(x_all.device)).requires_grad_(True)
            y = labels.index_select(0, plan[i].indices.to(labels.device))
            g = student_gradient(loss_fn, theta, _augmented(xb, plan[i], augment), y, create_graph=True)
            s = torch.dot(g.reshape(-1), v.reshape(-1))
            wrt = [xb, theta] if propagate_hessian else [xb]
            grads = torch.autograd.grad(s, wrt, allow_unused=True)
        jt_v = grads[0] if grads[0] is not None else torch.zeros_like(xb)
        grad_images.index_add_(0, plan[i].indices.to(grad_images.device), -alpha * jt_v)
        grad_alpha = grad_alpha - s.detach()
        if propagate_hessian:
            h_v = grads[1] if grads[1] is not None else torch.zeros_like(v)
            v = v - alpha * h_v
    return grad_images, grad_alpha


def _matching_loss(theta_final: torch.Tensor, theta_target: torch.Tensor, d: float) -> torch.Tensor:
    """L = ||theta_N - theta*_{t+M}||^2 / D."""
    return torch.sum((theta_final - theta_target) ** 2) / d


def _student_residual(
    loss_fn: LossFn,
    theta_start: torch.Tensor,
    theta_target: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    plan: list[StudentStep],
    augment: Augmentation | None,
) -> tuple[float, torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """Pass 1 of the constant-memory engines: the student trajectory without a graph.

    Returns D, the stored theta_0..theta_N, G = sum_i g_i, ||theta_N - theta*_{t+M}||^2 and
    v = (2/D)(theta_N - theta*_{t+M}) = dL/dtheta_N.
    """
    d = _distance_normaliser(theta_start, theta_target)
    thetas, G = _forward_sweep(loss_fn, theta_start, images, labels, alpha, plan, augment)
    residual = thetas[-1].to(theta_target.device, non_blocking=True) - theta_target
    return d, thetas, G, float(torch.sum(residual**2)), (2.0 / d) * residual


def exact_gradients(
    loss_fn: LossFn,
    theta_start: torch.Tensor,
    theta_target: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    plan: list[StudentStep],
    augment: Augmentation | None = None,
) -> MatchResult:
    """The exact MTT gradient by a reverse sweep (engine ``exact``).

    dL/dX_{b_i} = -alpha v^T [prod_{k=N-1..i+1} (I - alpha H_k)] J_i and
    dL/dalpha = -v^T sum_i [prod_{k=N-1..i+1} (I - alpha H_k)] g_i, computed as
    v_N = v, v_i = (I - alpha H_i) v_{i+1}.
    """
    d, thetas, _, final, v = _student_residual(loss_fn, theta_start, theta_target, images, labels, alpha, plan, augment)
    grad_images, grad_alpha = _reverse_sweep(
        loss_fn, thetas, v, images, labels, alpha, plan, augment, propagate_hessian=True
    )
    return MatchResult(final / d, grad_images, float(grad_alpha), d, final, "exact", len(plan))


def tesla_gradients(
    loss_fn: LossFn,
    theta_start: torch.Tensor,
    theta_target: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    plan: list[StudentStep],
    augment: Augmentation | None = None,
) -> MatchResult:
    """TESLA's first-order constant-memory gradient (engine ``tesla``).

    Pass 1 keeps theta_i and G = sum_i g_i (g_i detached); theta_N = theta*_t - alpha G.
    Pass 2: dL/dX_{b_i} = (2/D)[alpha (theta*_{t+M} - theta*_t) + alpha^2 G]^T J_i
    = -alpha v^T J_i, and dL/dalpha = -v^T G.
    """
    d, thetas, G, final, v = _student_residual(loss_fn, theta_start, theta_target, images, labels, alpha, plan, augment)
    grad_images, _ = _reverse_sweep(loss_fn, thetas, v, images, labels, alpha, plan, augment, propagate_hessian=False)
    grad_alpha = -torch.dot(v.reshape(-1), G.reshape(-1))
    return MatchResult(final / d, grad_images, float(grad_alpha), d, final, "tesla", len(plan))


def unroll_gradients(
    loss_fn: LossFn,
    theta_start: torch.Tensor,
    theta_target: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    plan: list[StudentStep],
    augment: Augmentation | None = None,
) -> MatchResult:
    """Autograd through the whole unroll (engine ``unroll``, MTT): the graph of all N steps."""
    d = _distance_normaliser(theta_start, theta_target)
    with torch.enable_grad():
        x_all = images.detach().requires_grad_(True)
        a = torch.tensor(float(alpha), dtype=theta_start.dtype, device=theta_start.device, requires_grad=True)
        theta = theta_start.detach().requires_grad_(True)
        for step in plan:
            x, y = _student_batch(x_all, labels, step, augment)
            g = student_gradient(loss_fn, theta, x, y, create_graph=True)
            theta = theta - a * g
        loss = _matching_loss(theta, theta_target.detach(), d)
        grad_images, grad_alpha = torch.autograd.grad(loss, [x_all, a])
    final = float(loss.detach()) * d
    return MatchResult(float(loss.detach()), grad_images, float(grad_alpha), d, final, "unroll", len(plan))


_ENGINE_FUNCTIONS = {"exact": exact_gradients, "tesla": tesla_gradients, "unroll": unroll_gradients}


def matching_gradients(
    engine: str,
    loss_fn: LossFn,
    theta_start: torch.Tensor,
    theta_target: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    syn_steps: int,
    batch_syn: int,
    augment: Augmentation | None,
    generator: torch.Generator,
) -> MatchResult:
    """Matching loss L and (dL/dX, dL/dalpha) by ``engine`` (``exact``, ``tesla`` or ``unroll``).

    ``theta_start`` = theta*_t and ``theta_target`` = theta*_{t+M} are flat parameter
    vectors; ``labels`` are class indices or soft targets, as ``loss_fn`` expects.
    Minibatches and augmentation samples are drawn from ``generator`` first
    (:func:`plan_student_steps`), so every engine sees the same student trajectory.
    """
    if engine not in _ENGINE_FUNCTIONS:
        raise TeslaError(f"unknown gradient engine {engine!r}; choose one of {', '.join(ENGINES)}")
    plan = plan_student_steps(len(images), syn_steps, batch_syn, tuple(images.shape[1:]), augment, generator)
    plan = [_on_device(step, images.device) for step in plan]
    return _ENGINE_FUNCTIONS[engine](loss_fn, theta_start, theta_target, images, labels, float(alpha), plan, augment)
