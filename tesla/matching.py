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

    With learned soft labels (``learn_labels``) the soft targets Y are a third differentiated
    input: with K_i = d g_i / d Y_{b_i}, the same sweep gives
    ``dL/dY_{b_i} += -alpha K_i^T v_{i+1}`` (one more entry of the same vector-Jacobian product).

``tesla``
    the first-order procedure of the published TESLA code (same memory): every product
    prod_k (I - alpha H_k) replaced by I, i.e. dL/dX_{b_i} = -alpha J_i^T v and
    dL/dalpha = -v . G with G = sum_i g_i (and dL/dY_{b_i} = -alpha K_i^T v). Exact for N = 1 only.

``unroll``
    autograd through all N steps (MTT): activation memory grows as N x batch. The reference
    for tests and the memory baseline.

All three draw the same :class:`StudentStep` plan (minibatches and augmentation samples)
from the generator, so with the same generator state they follow the same trajectory and
report the same loss value.

Execution. The steps of ``exact`` and ``tesla`` run through :mod:`tesla.student_steps`: eagerly
(compile mode ``off``), or as fixed-shape graphs traced once and compiled and/or captured in
CUDA graphs (a :class:`tesla.step_compiler.StepCompiler` passed as ``compiler``). ``unroll``
always runs eagerly. Inside the N-step loops nothing waits for the device: D, the loss,
dL/dalpha and the finiteness check stay device tensors until the engine returns, and one
transfer at the end fills :class:`MatchResult`. A matching call runs in IEEE float32
(:func:`tesla.precision.ieee_float32`): a global TF32 setting does not reach it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from tesla.distributed import SINGLE, Ranks
from tesla.engines import ENGINES
from tesla.errors import TeslaError
from tesla.precision import ieee_float32
from tesla.settings import Wording
from tesla.sharding import shard_problems
from tesla.step_compiler import StepCompiler, adjoint_kind, step_kinds
from tesla.student_steps import (
    EagerSteps,
    LossFn,
    StepInputs,
    StudentSteps,
    adjoint_step,
    augmentations_on,
    student_gradient,
    student_update,
)

__all__ = [
    "ENGINES",
    "LossFn",
    "MatchResult",
    "StudentStep",
    "adjoint_kind",
    "adjoint_step",
    "exact_gradients",
    "matching_gradients",
    "plan_student_steps",
    "student_gradient",
    "student_update",
    "tesla_gradients",
    "trajectory_storage",
    "unroll_gradients",
]

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
    """The matching loss L and its gradients w.r.t. the synthetic images, alpha and (when the
    labels are learned) the soft targets Y."""

    loss: float
    grad_images: torch.Tensor
    grad_alpha: float
    start_distance: float  # D = ||theta*_t - theta*_{t+M}||^2
    final_distance: float  # ||theta_N - theta*_{t+M}||^2
    engine: str
    syn_steps: int
    finite: bool = True  # L, dL/dalpha and every element of dL/dX are finite
    compile: str = "off"  # how the student steps ran (tesla.step_compiler compile mode)
    grad_labels: torch.Tensor | None = None  # dL/dY (N x K), computed only when asked for (learn_labels)


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
    0..num_images-1; a new permutation is drawn when the current one is exhausted. The last
    chunk of a permutation is shorter when ``batch_syn`` does not divide ``num_images`` (as in
    the published code): every image is seen once per permutation. A run therefore has at
    most two minibatch sizes, batch_syn and num_images mod batch_syn, and a compiled student
    step one graph per size. Augmentation parameters are sampled per step for that step's
    batch shape. Everything is drawn from ``generator`` (a CPU generator).
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


def augmentation_rows(params: Any, rows: slice) -> Any:
    """The sample of the images ``rows`` of a minibatch (``tesla.augment.AugParams``: every
    parameter is per image, so a shard applies its rows of the minibatch's sample)."""
    n = len(range(*rows.indices(params.shape[0])))
    values = {fam: {k: v[rows] for k, v in d.items()} for fam, d in params.values.items()}
    return dataclasses.replace(params, shape=(n, *params.shape[1:]), values=values)


def shard_plan(plan: list[StudentStep], ranks: Ranks) -> tuple[list[StudentStep], tuple[float, ...]]:
    """This rank's part of every step (:mod:`tesla.distributed`): the rows ``ranks.shard(B)``
    of minibatch b_i with their rows of the augmentation sample A_i, and the shard's weight
    |shard| / B (its loss is the shard's sum over the full batch size B)."""
    steps, weights = [], []
    for step in plan:
        rows = ranks.shard(len(step.indices))
        params = step.augmentation
        steps.append(StudentStep(step.indices[rows], None if params is None else augmentation_rows(params, rows)))
        weights.append(len(steps[-1].indices) / len(step.indices))
    return steps, tuple(weights)


def _step_inputs(
    images: torch.Tensor, labels: torch.Tensor, alpha: float | torch.Tensor, plan: list[StudentStep],
    learn_labels: bool = False, ranks: Ranks = SINGLE,
) -> StepInputs:
    """The plan for the steps: all minibatch indices moved to the images' device in one copy
    before the sweeps (so no step copies from the host), the augmentation samples as drawn.
    Over several processes, this rank's shards of the steps (:func:`shard_plan`)."""
    device = images.device
    weights = reduce = touched = None
    if ranks.distributed:
        touched = torch.unique(torch.cat([step.indices for step in plan])).to(device)
        plan, weights = shard_plan(plan, ranks)
        reduce = ranks.sum
    sizes = [len(step.indices) for step in plan]
    indices = list(torch.cat([step.indices for step in plan]).to(device).split(sizes))
    a = torch.as_tensor(alpha, dtype=images.dtype).to(device).detach()
    return StepInputs(
        images.detach(), labels.detach().to(device), a, indices, [step.augmentation for step in plan], learn_labels,
        weights, reduce, touched,
    )


def _sum_over_ranks(
    inputs: StepInputs, grad_images: torch.Tensor, grad_alpha: torch.Tensor, grad_labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """dL/dX, dL/dalpha (and dL/dY) summed over the ranks' shards: one all-reduce of the rows
    some step touched (``inputs.touched``; every other row is zero on every rank) and of dL/dalpha."""
    rows = inputs.touched
    parts = [grad_images.index_select(0, rows), grad_alpha.reshape(1)]
    if grad_labels is not None:
        parts.append(grad_labels.index_select(0, rows))
    flat = inputs.reduce(torch.cat([p.reshape(-1) for p in parts]))
    summed = [piece.view_as(p) for piece, p in zip(flat.split([p.numel() for p in parts]), parts)]
    grad_images = grad_images.index_copy(0, rows, summed[0])
    if grad_labels is not None:
        grad_labels = grad_labels.index_copy(0, rows, summed[2])
    return grad_images, summed[1].reshape(()), grad_labels


def trajectory_storage(compute: torch.device) -> torch.device:
    """Where the stored student trajectory theta_0..theta_N lives: host memory when the
    student runs on a GPU (N x P floats, e.g. 0.8 GB for ConvNetD4 at N = 80, would otherwise
    be the only GPU memory that grows with N), else the compute device itself."""
    return torch.device("cpu") if compute.type == "cuda" else compute


def _forward_sweep(steps: StudentSteps, theta_start: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Run theta_{i+1} = theta_i - alpha g_i without a graph through the steps.

    Returns the student trajectory as one (N+1) x P tensor (row i = theta_i, row N = theta_N);
    ``steps.theta`` is then theta_N and ``steps.total`` G = sum_i g_i. Memory on the compute
    device: one step (freed after each step) plus that tensor, which
    :func:`trajectory_storage` puts in (pinned) host memory when the computation runs on a
    GPU, so that GPU memory does not grow with N; rows go back and forth with one copy per
    step, ordered on the current stream.
    """
    theta = theta_start.detach().reshape(-1)
    store = trajectory_storage(theta.device)
    trajectory = torch.empty(
        (num_steps + 1, theta.numel()), dtype=theta.dtype, device=store,
        pin_memory=store.type == "cpu" and theta.device.type == "cuda",
    )
    trajectory[0].copy_(theta, non_blocking=True)
    steps.begin(theta)
    for i in range(num_steps):
        steps.update(i)
        trajectory[i + 1].copy_(steps.theta, non_blocking=True)
    return trajectory


def _reverse_sweep(
    steps: StudentSteps,
    trajectory: torch.Tensor,
    v: torch.Tensor,
    inputs: StepInputs,
    propagate_hessian: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Accumulate dL/dX, dL/dalpha (and dL/dY) step by step, last step first.

    For step i, with w = v_{i+1} (exact) or w = v (first-order), one vector-Jacobian product
    of s_i = g_i . w w.r.t. [X_{b_i}, theta_i (, Y_{b_i})] gives J_i^T w, H_i w (and K_i^T w)::

        dL/dX_{b_i} += -alpha J_i^T w,   dL/dalpha += -g_i . w,   v_i = w - alpha H_i w
        (dL/dY_{b_i} += -alpha K_i^T w).

    Returns dL/dX, dL/dalpha (a 0-d device tensor) and dL/dY (None unless ``inputs.label_gradient``).
    """
    grad_images = torch.zeros_like(inputs.images)
    grad_labels = torch.zeros_like(inputs.labels) if inputs.label_gradient else None
    grad_alpha = torch.zeros((), dtype=v.dtype, device=v.device)
    steps.begin_adjoint(v)
    for i in reversed(range(len(inputs.indices))):
        dx, dy, s = steps.adjoint(i, trajectory[i], propagate_hessian)
        grad_images.index_add_(0, inputs.indices[i], dx)
        if grad_labels is not None:
            grad_labels.index_add_(0, inputs.indices[i], dy)
        grad_alpha.sub_(s)
    return grad_images, grad_alpha, grad_labels


def _distance_normaliser(theta_start: torch.Tensor, theta_target: torch.Tensor) -> torch.Tensor:
    """D = ||theta*_t - theta*_{t+M}||^2, a device scalar (checked positive in :func:`_result`)."""
    return torch.sum((theta_start.detach() - theta_target.detach()) ** 2)


def _result(
    engine: str,
    d: torch.Tensor,
    final: torch.Tensor,
    grad_images: torch.Tensor,
    grad_alpha: torch.Tensor,
    syn_steps: int,
    compile_mode: str,
    grad_labels: torch.Tensor | None = None,
) -> MatchResult:
    """The one host transfer of a matching call: D, ||theta_N - theta*_{t+M}||^2, dL/dalpha and
    the finiteness of (L, dL/dalpha, dL/dX, dL/dY) in one copy; L = final / D."""
    finite = torch.isfinite(grad_images).all() & torch.isfinite(final) & torch.isfinite(grad_alpha)
    if grad_labels is not None:
        finite = finite & torch.isfinite(grad_labels).all()
    d_, final_, grad_alpha_, finite_ = torch.stack(
        [d.double(), final.double(), grad_alpha.double(), finite.double()]
    ).tolist()
    if not d_ > 0:
        raise TeslaError(
            "the expert did not move between the start and target snapshots (distance 0): "
            "use an expert trained with a non-zero learning rate, or a larger --expert-epochs"
        )
    return MatchResult(
        final_ / d_, grad_images, grad_alpha_, d_, final_, engine, syn_steps, bool(finite_), compile_mode, grad_labels
    )


def _student_steps(
    loss_fn: LossFn,
    theta_start: torch.Tensor,
    inputs: StepInputs,
    augment: Augmentation | None,
    compiler: StepCompiler | None,
    exact: bool,
) -> StudentSteps:
    """The compiler's graphs (:func:`tesla.step_compiler.step_kinds`) built for this call, else eager steps."""
    kinds = step_kinds(exact, inputs.label_gradient, inputs.reduce is not None)
    steps = None if compiler is None else compiler.steps(loss_fn, theta_start, inputs, augment, kinds)
    return EagerSteps(loss_fn, inputs, augment) if steps is None else steps


def _constant_memory_gradients(
    engine: str,
    loss_fn: LossFn,
    theta_start: torch.Tensor,
    theta_target: torch.Tensor,
    inputs: StepInputs,
    augment: Augmentation | None,
    compiler: StepCompiler | None,
) -> MatchResult:
    """Pass 1 (the student trajectory without a graph), then the reverse sweep of ``exact``
    (propagating v_i = (I - alpha H_i) v_{i+1}) or of ``tesla`` (v held constant)."""
    exact = engine == "exact"
    steps = _student_steps(loss_fn, theta_start, inputs, augment, compiler, exact)
    d = _distance_normaliser(theta_start, theta_target)
    trajectory = _forward_sweep(steps, theta_start, len(inputs.indices))
    residual = steps.theta - theta_target.detach().reshape(-1)
    final = torch.sum(residual**2)
    v = (2.0 / d) * residual  # dL/dtheta_N
    grad_alpha_first_order = None if exact else -torch.dot(v, steps.total)
    grad_images, grad_alpha, grad_labels = _reverse_sweep(steps, trajectory, v, inputs, propagate_hessian=exact)
    if inputs.reduce is not None:
        grad_images, grad_alpha, grad_labels = _sum_over_ranks(inputs, grad_images, grad_alpha, grad_labels)
    if not exact:
        grad_alpha = grad_alpha_first_order
    return _result(engine, d, final, grad_images, grad_alpha, len(inputs.indices), steps.mode, grad_labels)


def exact_gradients(
    loss_fn: LossFn,
    theta_start: torch.Tensor,
    theta_target: torch.Tensor,
    inputs: StepInputs,
    augment: Augmentation | None = None,
    compiler: StepCompiler | None = None,
) -> MatchResult:
    """The exact MTT gradient by a reverse sweep (engine ``exact``).

    dL/dX_{b_i} = -alpha v^T [prod_{k=N-1..i+1} (I - alpha H_k)] J_i and
    dL/dalpha = -v^T sum_i [prod_{k=N-1..i+1} (I - alpha H_k)] g_i, computed as
    v_N = v, v_i = (I - alpha H_i) v_{i+1}; with ``inputs.label_gradient`` also
    dL/dY_{b_i} = -alpha v^T [prod_{k=N-1..i+1} (I - alpha H_k)] K_i, K_i = d g_i / d Y_{b_i}.
    """
    return _constant_memory_gradients("exact", loss_fn, theta_start, theta_target, inputs, augment, compiler)


def tesla_gradients(
    loss_fn: LossFn,
    theta_start: torch.Tensor,
    theta_target: torch.Tensor,
    inputs: StepInputs,
    augment: Augmentation | None = None,
    compiler: StepCompiler | None = None,
) -> MatchResult:
    """TESLA's first-order constant-memory gradient (engine ``tesla``).

    Pass 1 keeps theta_i and G = sum_i g_i (g_i detached); theta_N = theta*_t - alpha G.
    Pass 2: dL/dX_{b_i} = (2/D)[alpha (theta*_{t+M} - theta*_t) + alpha^2 G]^T J_i
    = -alpha v^T J_i, and dL/dalpha = -v^T G; with ``inputs.label_gradient`` also the
    first-order label gradient dL/dY_{b_i} = -alpha v^T K_i.
    """
    return _constant_memory_gradients("tesla", loss_fn, theta_start, theta_target, inputs, augment, compiler)


def unroll_gradients(
    loss_fn: LossFn,
    theta_start: torch.Tensor,
    theta_target: torch.Tensor,
    inputs: StepInputs,
    augment: Augmentation | None = None,
    compiler: StepCompiler | None = None,
) -> MatchResult:
    """Autograd through the whole unroll (engine ``unroll``, MTT): the graph of all N steps.
    Always eager (``compiler`` is not used: a graph of N double-backward steps is not worth
    compiling for the reference engine)."""
    d = _distance_normaliser(theta_start, theta_target)
    with torch.enable_grad():
        x_all = inputs.images.detach().requires_grad_(True)
        y_all = inputs.labels.detach().requires_grad_(inputs.label_gradient)
        a = inputs.alpha.detach().clone().requires_grad_(True)
        theta = theta_start.detach().reshape(-1).requires_grad_(True)
        for idx, params in zip(inputs.indices, augmentations_on(x_all.device, inputs.augmentations)):
            x = x_all.index_select(0, idx)
            if augment is not None and params is not None:
                x = augment.apply(x, params)
            g = student_gradient(loss_fn, theta, x, y_all.index_select(0, idx), create_graph=True)
            theta = theta - a * g
        final = torch.sum((theta - theta_target.detach().reshape(-1)) ** 2)
        wrt = [x_all, a] + ([y_all] if inputs.label_gradient else [])
        grads = torch.autograd.grad(final / d, wrt, allow_unused=True)
    grad_labels = None
    if inputs.label_gradient:
        grad_labels = torch.zeros_like(y_all) if grads[2] is None else grads[2]
    return _result("unroll", d, final.detach(), grads[0], grads[1], len(inputs.indices), "off", grad_labels)


def check_shardable(engine: str, batch_syn: int, num_images: int, ranks: Ranks) -> None:
    """Refuse what a run over several processes cannot do (:func:`tesla.sharding.shard_problems`:
    ``unroll``, one graph of all steps, and a minibatch smaller than the number of processes)."""
    if not ranks.distributed:
        return
    problems = shard_problems(engine, batch_syn, num_images, ranks.world_size, Wording().name)
    if problems:
        raise TeslaError(f"a run over {ranks.world_size} processes: {problems[0]}")


_ENGINE_FUNCTIONS = {"exact": exact_gradients, "tesla": tesla_gradients, "unroll": unroll_gradients}


def matching_gradients(
    engine: str,
    loss_fn: LossFn,
    theta_start: torch.Tensor,
    theta_target: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    alpha: float | torch.Tensor,
    syn_steps: int,
    batch_syn: int,
    augment: Augmentation | None,
    generator: torch.Generator,
    compiler: StepCompiler | None = None,
    learn_labels: bool = False,
    ranks: Ranks = SINGLE,
) -> MatchResult:
    """Matching loss L and (dL/dX, dL/dalpha) by ``engine`` (``exact``, ``tesla`` or ``unroll``).

    ``theta_start`` = theta*_t and ``theta_target`` = theta*_{t+M} are flat parameter
    vectors; ``labels`` are class indices or soft targets, as ``loss_fn`` expects; ``alpha``
    a float or a 0-d tensor. Minibatches and augmentation samples are drawn from
    ``generator`` first (:func:`plan_student_steps`), so every engine sees the same student
    trajectory. ``compiler`` (a :class:`tesla.step_compiler.StepCompiler`, kept for the whole
    run) runs the steps of ``exact`` and ``tesla`` as compiled graphs; ``None`` runs them
    eagerly. The call runs in IEEE float32 whatever the global TF32 settings. With
    ``learn_labels`` (``labels`` must then be N x K soft targets) the result also holds
    dL/dY (``grad_labels``), from the same reverse sweep (exact, first-order or autograd).
    With ``ranks`` of several processes (:mod:`tesla.distributed`; every rank passes the same
    arguments) each rank computes its shards of the minibatches and every rank returns the
    whole result (``exact`` and ``tesla``, eager or compiled steps).
    """
    if engine not in _ENGINE_FUNCTIONS:
        raise TeslaError(f"unknown gradient engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if learn_labels and not (labels.is_floating_point() and labels.ndim == 2):
        raise TeslaError(f"learned labels need N x K soft targets, got labels of shape {tuple(labels.shape)} ({labels.dtype})")
    check_shardable(engine, batch_syn, len(images), ranks)
    plan = plan_student_steps(len(images), syn_steps, batch_syn, tuple(images.shape[1:]), augment, generator)
    with ieee_float32():
        inputs = _step_inputs(images, labels, alpha, plan, learn_labels, ranks)
        return _ENGINE_FUNCTIONS[engine](loss_fn, theta_start, theta_target, inputs, augment, compiler)
