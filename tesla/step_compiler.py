"""How the student steps of one matching call run as graphs: traced once (``make_fx``),
compiled (TorchInductor) and/or captured (CUDA graphs), the augmentation passed as data
(:mod:`tesla.augment_packing`); the step's math is :mod:`tesla.student_steps`.

How a step is executed is the *compile mode*:

``off``
    eager autograd, step by step, each step applying its own DSA family
    (``tesla.augment.DSA.apply``): the engine as it was before compiled steps, and the reference.
``inductor``
    the step traced once into a pure graph of ATen operations (``make_fx`` runs the same
    autograd code, double backward included, and records the kernels it calls), then compiled
    by TorchInductor (``torch.compile``): fused kernels.
``cudagraph``
    the traced step captured in a CUDA graph (the eager kernels, no compile time): one launch
    per step instead of one per kernel (about 1,600 per ConvNet-3 step, counted on an H100).
``inductor-cudagraph``
    the compiled kernels captured in a CUDA graph.
``auto``
    ``off`` on the CPU, ``inductor-cudagraph`` on CUDA (chosen without a GPU measurement; see
    docs/benchmarks.md and ``bench/gpu_engine.sh``).

The graphs of a run: one ``update`` graph and one adjoint graph per minibatch size (two sizes
at most: see :func:`tesla.matching.plan_student_steps`), i.e. 2 graphs when ``batch_syn``
divides the number of synthetic images and 4 otherwise, whatever the DSA strategy.

Over several processes (:mod:`tesla.distributed`) a step's rows are a shard of the minibatch and
its sums over the minibatch are summed over the ranks between the graphs: the graphs
``gradient-shard`` (the shard's share of g_i) and the adjoint kinds' ``-shard`` graphs (its share
of H_i w, with dX_b, dY_b, s) replace ``update`` and the adjoint graphs (:func:`step_kinds`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.fx.experimental import proxy_tensor

from tesla.augment import DSA
from tesla.augment_packing import apply_packed, pack_augmentation, packed_width
from tesla.engines import COMPILE_MODES
from tesla.errors import TeslaError
from tesla.student_steps import AugmentFn, LossFn, StepInputs, adjoint_step, student_gradient, student_update

__all__ = [
    "COMPILE_MODES",
    "SHARD",
    "TRACE_ONLY",
    "BuiltGraph",
    "GraphSteps",
    "StepCompiler",
    "adjoint_kind",
    "resolve_compile_mode",
    "step_kinds",
]

#: the traced graph run as it is (no compiler, no capture): tests and benchmarks of the tracing
TRACE_ONLY = "trace"


def resolve_compile_mode(mode: str, device: torch.device) -> str:
    """The mode a run uses on ``device``: ``auto`` becomes ``off`` on the CPU and
    ``inductor-cudagraph`` on CUDA; CUDA-graph modes are refused off CUDA."""
    if mode == "auto":
        return "inductor-cudagraph" if device.type == "cuda" else "off"
    if mode not in COMPILE_MODES and mode != TRACE_ONLY:
        raise TeslaError(f"--compile {mode!r} is not a compile mode; choose one of {', '.join(COMPILE_MODES)}")
    if mode.endswith("cudagraph") and device.type != "cuda":
        raise TeslaError(
            f"--compile {mode} captures CUDA graphs and needs a CUDA device (the run is on {device}); "
            "use --compile inductor or off"
        )
    return mode



def adjoint_kind(propagate_hessian: bool, label_gradient: bool) -> str:
    """The name of a reverse-sweep step graph: ``adjoint`` (exact) or ``adjoint-first-order``
    (tesla), with ``-labels`` when it also gives the label gradient dY_b."""
    return ("adjoint" if propagate_hessian else "adjoint-first-order") + ("-labels" if label_gradient else "")


#: the suffix of the graphs of a shard of the minibatch (a run over several processes): they
#: return the shard's share of the sums over the minibatch, summed over the ranks outside the graph
SHARD = "-shard"


def step_kinds(propagate_hessian: bool, label_gradient: bool, sharded: bool) -> tuple[str, str]:
    """The graphs of a matching call: ``update`` and its adjoint kind, or over several processes
    ``gradient-shard`` (g_i's share) and the adjoint kind's ``-shard`` graph (H_i w's share)."""
    adjoint = adjoint_kind(propagate_hessian, label_gradient)
    return ("gradient" + SHARD, adjoint + SHARD) if sharded else ("update", adjoint)


def _shard_step(ws: "_Workspace", bb: "_BatchBuffers", kind: str, loss_fn: LossFn, augment: Callable) -> tuple:
    """(step, args, outputs) of a shard graph: the loss is the shard's share, weight x its mean
    (``ws.weight``, a graph input); ``gradient-shard`` returns g's share (into ``ws.g``), the
    adjoint ``-shard`` graphs return H w's share (exact, into ``ws.hw``), dX_b, dY_b and s."""
    def share(weight: torch.Tensor) -> LossFn:
        return lambda theta, x, y: loss_fn(theta, x, y) * weight

    base = kind[: -len(SHARD)]
    if base == "gradient":
        def step(theta, x, y, weight, family, packed):
            with torch.enable_grad():
                t = theta.detach().requires_grad_(True)
                return (student_gradient(share(weight), t, augment(family, packed)(x.detach()), y),)

        return step, (ws.theta, bb.x, bb.y, ws.weight, bb.family, bb.packed), (ws.g,)
    exact = not base.startswith("adjoint-first-order")
    labels = base.endswith("-labels")

    def step(theta, w, x, y, alpha, weight, family, packed):
        kept = []  # H w's share, as adjoint_step hands it to its sum over the ranks
        _, dx, dy, s = adjoint_step(share(weight), theta, w, x, y, alpha, augment(family, packed), exact, labels,
                                    lambda h: kept.append(h) or h)
        return tuple(kept) + (dx,) + (dy,) * labels + (s,)

    args = (ws.theta, ws.w, bb.x, bb.y, ws.alpha, ws.weight, bb.family, bb.packed)
    return step, args, (ws.hw,) * exact + (bb.dx,) + (bb.dy,) * labels + (ws.s,)



@dataclass
class BuiltGraph:
    """One traced (and compiled and/or captured) step graph of a run."""

    kind: str  # "update", "adjoint" (exact) or "adjoint-first-order" (tesla), "-labels" with dY (adjoint_kind)
    batch: int
    mode: str
    seconds: float  # tracing + compiling + capturing, including the warm-up runs


@dataclass
class _BatchBuffers:
    """Static inputs and outputs of the graphs of one minibatch size."""

    x: torch.Tensor
    y: torch.Tensor
    family: torch.Tensor
    packed: torch.Tensor
    dx: torch.Tensor
    dy: torch.Tensor


@dataclass
class _Workspace:
    """Fixed tensors every graph reads and writes (a captured graph replays on these addresses)."""

    key: tuple
    theta: torch.Tensor
    total: torch.Tensor
    w: torch.Tensor
    alpha: torch.Tensor
    s: torch.Tensor
    g: torch.Tensor  # shard graphs: g's share (gradient-shard) and H w's share (exact adjoint)
    hw: torch.Tensor
    weight: torch.Tensor  # shard graphs: the step's weight |shard| / |b_i|
    batches: dict[int, _BatchBuffers] = field(default_factory=dict)
    runs: dict[tuple[str, int], Callable[[], None]] = field(default_factory=dict)


class StepCompiler:
    """The traced / compiled / captured student steps of one run, kept across iterations.

    Create one per distillation (``StepCompiler(mode)``, mode as resolved by
    :func:`resolve_compile_mode`, not ``off``) and pass it to every
    :func:`tesla.matching.matching_gradients` call: graphs are built on first use of a
    (kind, minibatch size) and reused; ``built`` lists them. A different loss function, device,
    dtype, parameter count, image or label shape, or DSA strategy starts over.

    ``announce``: one line on stderr per graph built (compiling takes minutes). When building a
    graph fails (a compiler or capture error), a TeslaError names the mode and the way out; with
    ``fallback`` (``--compile auto``) the failure is said on stderr instead and this and every
    later call run eagerly.
    """

    def __init__(self, mode: str, announce: bool = False, fallback: bool = False) -> None:
        if mode not in (*(m for m in COMPILE_MODES if m not in ("auto", "off")), TRACE_ONLY):
            raise TeslaError(f"StepCompiler needs a compile mode other than 'off'/'auto', got {mode!r}")
        self.mode = mode
        self.announce = announce
        self.fallback = fallback
        self.failure: str | None = None  # why the graphs could not be built (fallback: eager from then on)
        self.built: list[BuiltGraph] = []
        self._workspace: _Workspace | None = None
        self._loss_fn: LossFn | None = None  # kept alive: the workspace key holds its id
        self._pool = None

    # -- the workspace ---------------------------------------------------------------
    def _workspace_for(self, loss_fn: LossFn, theta: torch.Tensor, inputs: StepInputs, families: tuple[str, ...]) -> _Workspace:
        images, labels = inputs.images, inputs.labels
        key = (id(loss_fn), images.device, images.dtype, theta.numel(), tuple(images.shape[1:]),
               labels.dtype, tuple(labels.shape[1:]), families)
        ws = self._workspace
        if ws is None or ws.key != key:
            ws = _Workspace(
                key=key,
                theta=torch.zeros(theta.numel(), dtype=theta.dtype, device=images.device),
                total=torch.zeros(theta.numel(), dtype=theta.dtype, device=images.device),
                w=torch.zeros(theta.numel(), dtype=theta.dtype, device=images.device),
                alpha=torch.zeros((), dtype=theta.dtype, device=images.device),
                s=torch.zeros((), dtype=theta.dtype, device=images.device),
                g=torch.zeros(theta.numel(), dtype=theta.dtype, device=images.device),
                hw=torch.zeros(theta.numel(), dtype=theta.dtype, device=images.device),
                weight=torch.ones((), dtype=theta.dtype, device=images.device),
            )
            self._workspace, self._loss_fn = ws, loss_fn  # the loss function the graphs were traced from
            self._pool = None  # a new memory pool for the new graphs (the old ones go with the old workspace)
        return ws

    def _batch_buffers(self, ws: _Workspace, inputs: StepInputs, batch: int, width: int) -> _BatchBuffers:
        if batch not in ws.batches:
            images, labels = inputs.images, inputs.labels
            ws.batches[batch] = _BatchBuffers(
                x=torch.zeros((batch, *images.shape[1:]), dtype=images.dtype, device=images.device),
                y=torch.zeros((batch, *labels.shape[1:]), dtype=labels.dtype, device=images.device),
                family=torch.full((), -1, dtype=torch.int64, device=images.device),
                packed=torch.zeros((batch, width), dtype=torch.float64, device=images.device),
                dx=torch.zeros((batch, *images.shape[1:]), dtype=images.dtype, device=images.device),
                dy=torch.zeros((batch, *labels.shape[1:]), dtype=labels.dtype, device=images.device),
            )
        return ws.batches[batch]

    # -- building a graph -------------------------------------------------------------
    def _build(self, ws: _Workspace, kind: str, batch: int, loss_fn: LossFn, dsa: DSA | None) -> Callable[[], None]:
        bb = ws.batches[batch]
        t0 = time.perf_counter()
        if self.announce:
            print(f"tesla: building the {kind} step graph for minibatches of {batch} ({self.mode})...", file=sys.stderr, flush=True)

        def augment(family: torch.Tensor, packed: torch.Tensor) -> AugmentFn:
            return (lambda x: x) if dsa is None else (lambda x: apply_packed(x, family, packed, dsa))

        if kind.endswith(SHARD):
            step, args, outputs = _shard_step(ws, bb, kind, loss_fn, augment)
        elif kind == "update":
            def step(theta, total, x, y, alpha, family, packed):
                return student_update(loss_fn, theta, total, x, y, alpha, augment(family, packed))

            args = (ws.theta, ws.total, bb.x, bb.y, ws.alpha, bb.family, bb.packed)
            outputs: tuple[torch.Tensor, ...] = (ws.theta, ws.total)
        else:
            exact = not kind.startswith("adjoint-first-order")
            labels = kind.endswith("-labels")

            def step(theta, w, x, y, alpha, family, packed):
                w_next, dx, dy, s = adjoint_step(loss_fn, theta, w, x, y, alpha, augment(family, packed), exact, labels)
                return (w_next,) * exact + (dx,) + (dy,) * labels + (s,)

            args = (ws.theta, ws.w, bb.x, bb.y, ws.alpha, bb.family, bb.packed)
            outputs = (ws.w,) * exact + (bb.dx,) + (bb.dy,) * labels + (ws.s,)

        graph = proxy_tensor.make_fx(step)(*args)  # runs the step once, recording its ATen operations
        call: Callable[..., Any] = graph
        if self.mode.startswith("inductor"):
            call = torch.compile(graph, backend="inductor", fullgraph=True, dynamic=False)

        def run() -> None:
            for out, value in zip(outputs, call(*args)):
                out.copy_(value)

        if self.mode.endswith("cudagraph"):
            run = self._capture(call, args, run)
        else:
            call(*args)  # compile now (inductor), not inside the sweeps
        self.built.append(BuiltGraph(kind, batch, self.mode, time.perf_counter() - t0))
        if self.announce:
            print(f"tesla: ... built in {self.built[-1].seconds:.1f} s", file=sys.stderr, flush=True)
        return run

    def _capture(self, call: Callable[..., Any], args: tuple, run: Callable[[], None]) -> Callable[[], None]:
        """Capture ``run`` (the step and the copies of its results into the workspace) in a
        CUDA graph; all graphs of the run share one memory pool, which is safe because no
        tensor of the pool outlives a replay (results are copied into the workspace inside the
        graph). Warm-up runs the pure step only, so the workspace state is not advanced."""
        device = args[0].device
        with torch.cuda.device(device):
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    call(*args)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                run()

        def replay() -> None:
            with torch.cuda.device(device):  # a graph replays on its device's current stream
                graph.replay()

        return replay

    # -- binding one matching call ----------------------------------------------------
    def steps(
        self,
        loss_fn: LossFn,
        theta_start: torch.Tensor,
        inputs: StepInputs,
        augment: Any | None,
        kinds: Sequence[str],
    ) -> "GraphSteps | None":
        """The executor of one matching call, every graph it needs built before it returns
        (``None`` once a build failed with ``fallback`` on: run the steps eagerly)."""
        if self.failure is not None:
            return None
        if augment is not None and not isinstance(augment, DSA):
            raise TeslaError("compiled student steps need a tesla.augment.DSA augmentation (or none); use compile mode 'off'")
        families = augment.families if augment is not None else ()
        try:
            ws = self._workspace_for(loss_fn, theta_start, inputs, families)
            staged = _stage_augmentations(inputs, families)
            ws.alpha.copy_(inputs.alpha)
            ws.theta.copy_(theta_start.detach().reshape(-1))
            steps = GraphSteps(ws, inputs, staged, self.mode)
            first_of_size: dict[int, int] = {}
            for i, idx in enumerate(inputs.indices):
                first_of_size.setdefault(len(idx), i)
            for batch, i in first_of_size.items():
                self._batch_buffers(ws, inputs, batch, packed_width(families))
                steps.load(i)  # real data in the buffers for tracing and warm-up
                for kind in kinds:
                    if (kind, batch) not in ws.runs:
                        ws.runs[(kind, batch)] = self._build(ws, kind, batch, loss_fn, augment)
            return steps
        except TeslaError:
            raise
        except Exception as exc:
            if not self.fallback:
                raise TeslaError(
                    f"--compile {self.mode}: could not build the student step graph ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:300] if str(exc) else ''}); use --compile off (eager) or auto "
                    "(falls back to eager)"
                ) from exc
            self.failure = f"{type(exc).__name__}: {exc}"
            self._workspace = None
            print(
                f"tesla: could not build the {self.mode} student step ({self.failure.splitlines()[0][:300]}); "
                "running the steps eagerly (--compile off) from now on",
                file=sys.stderr, flush=True,
            )
            return None


def _stage_augmentations(inputs: StepInputs, families: tuple[str, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every step's (family index, packed parameters), packed on the CPU from the samples as
    drawn and moved to the device in one copy per minibatch size before the sweeps (so the
    sweeps never copy from the host)."""
    device = inputs.images.device
    rows = [pack_augmentation(p, families, len(idx)) for p, idx in zip(inputs.augmentations, inputs.indices)]
    families_on_device = torch.tensor([k for k, _ in rows], dtype=torch.int64).to(device)
    staged: list[Any] = [None] * len(rows)
    by_size: dict[int, list[int]] = {}
    for i, idx in enumerate(inputs.indices):
        by_size.setdefault(len(idx), []).append(i)
    for steps in by_size.values():
        stacked = torch.stack([rows[i][1] for i in steps]).to(device)
        for j, i in enumerate(steps):
            staged[i] = (families_on_device[i], stacked[j])
    return staged


class GraphSteps:
    """Steps run as the graphs of a :class:`StepCompiler` (same interface as :class:`tesla.student_steps.EagerSteps`).

    Per step: the minibatch, labels and augmentation sample are copied into the fixed input
    tensors (device-to-device), the graph runs (a replay when captured) and leaves its results
    in the fixed output tensors: theta and total (update); w, dX_b and s (adjoint).
    """

    def __init__(self, ws: _Workspace, inputs: StepInputs, staged: list[tuple[torch.Tensor, torch.Tensor]], mode: str) -> None:
        self.ws, self.inputs, self.staged, self.mode = ws, inputs, staged, mode

    @property
    def theta(self) -> torch.Tensor:
        return self.ws.theta

    @property
    def total(self) -> torch.Tensor:
        return self.ws.total

    @property
    def w(self) -> torch.Tensor:
        return self.ws.w

    def load(self, i: int) -> _BatchBuffers:
        """Copy step i's minibatch X_b, labels Y_b and augmentation sample into the buffers."""
        idx = self.inputs.indices[i]
        bb = self.ws.batches[len(idx)]
        torch.index_select(self.inputs.images.detach(), 0, idx, out=bb.x)
        torch.index_select(self.inputs.labels, 0, idx, out=bb.y)
        family, packed = self.staged[i]
        bb.family.copy_(family)
        bb.packed.copy_(packed)
        if self.inputs.weights is not None:
            self.ws.weight.fill_(self.inputs.weights[i])
        return bb

    def begin(self, theta_start: torch.Tensor) -> None:
        self.ws.theta.copy_(theta_start.detach().reshape(-1))
        self.ws.total.zero_()

    def update(self, i: int) -> None:
        self.load(i)
        if self.inputs.reduce is None:
            self.ws.runs[("update", len(self.inputs.indices[i]))]()
            return
        self.ws.runs[("gradient" + SHARD, len(self.inputs.indices[i]))]()  # over several processes
        g = self.inputs.reduce(self.ws.g)
        self.ws.theta.sub_(self.ws.alpha * g)
        self.ws.total.add_(g)

    def begin_adjoint(self, v: torch.Tensor) -> None:
        self.ws.w.copy_(v)

    def adjoint(
        self, i: int, theta_i: torch.Tensor, propagate_hessian: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        self.ws.theta.copy_(theta_i, non_blocking=True)
        bb = self.load(i)
        kind = step_kinds(propagate_hessian, self.inputs.label_gradient, self.inputs.reduce is not None)[1]
        self.ws.runs[(kind, len(self.inputs.indices[i]))]()
        if self.inputs.reduce is not None and propagate_hessian:  # over several processes: w' = w - alpha sum_r (H w)_r
            self.ws.w.sub_(self.ws.alpha * self.inputs.reduce(self.ws.hw))
        return bb.dx, bb.dy if self.inputs.label_gradient else None, self.ws.s
