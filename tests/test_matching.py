"""Gradient engines of trajectory matching, checked in float64 against full-unroll autograd,
and the compiled student step checked against the eager one.

The student is the project's ConvNet (depth 2, width 4, 8 x 8 RGB, 3 classes) with DSA
augmentation on; batch_syn (5) is smaller than the synthetic set (12), so within one unroll
every image is visited several times and its gradient sums several steps' terms, and every
permutation ends with a shorter minibatch (5, 5, 2).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import tesla.matching as matching
from tesla.augment import DSA
from tesla.augment_packing import apply_packed, pack_augmentation
from tesla.dsa_strategy import FAMILIES
from tesla.errors import TeslaError
from tesla.losses import soft_cross_entropy
from tesla.matching import ENGINES, matching_gradients, plan_student_steps, trajectory_storage
from tesla.models import build_model
from tesla.parameters import flatten_params, functional_forward, param_layout
from tesla.precision import ieee_float32
from tesla.step_compiler import StepCompiler, resolve_compile_mode

NUM_IMAGES, BATCH_SYN, CLASSES, RES = 12, 5, 3, 8
STRATEGY = "color_crop_cutout_flip_scale_rotate"


#: tiny tensors: one intra-op thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def make_problem(dtype: torch.dtype, model_name: str = "convnet_d2") -> dict:
    torch.manual_seed(0)
    model = build_model(model_name, channels=3, num_classes=CLASSES, resolution=RES, width=4).to(dtype)
    layout = param_layout(model)
    theta_start = flatten_params(model, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    theta_target = theta_start + 0.05 * torch.randn(theta_start.shape, generator=g, dtype=dtype)
    images = torch.randn(NUM_IMAGES, 3, RES, RES, generator=g, dtype=dtype)
    labels = torch.arange(NUM_IMAGES) % CLASSES
    soft = torch.softmax(torch.randn(NUM_IMAGES, CLASSES, generator=g, dtype=dtype), dim=1)

    def loss_fn(theta, x, y):
        logits = functional_forward(model, theta, x, layout=layout)
        return F.cross_entropy(logits, y) if y.dtype == torch.int64 else soft_cross_entropy(logits, y)

    return dict(loss_fn=loss_fn, theta_start=theta_start, theta_target=theta_target, images=images, labels=labels, soft=soft)


@pytest.fixture(scope="module")
def problem():
    return make_problem(torch.float64)


def run_engine(problem, engine, syn_steps, alpha=0.1, seed=7, labels=None, augment=DSA(STRATEGY), compiler=None,
               batch_syn=BATCH_SYN, learn_labels=False):
    return matching_gradients(
        engine,
        problem["loss_fn"],
        problem["theta_start"],
        problem["theta_target"],
        problem["images"],
        problem["labels"] if labels is None else labels,
        alpha,
        syn_steps,
        batch_syn,
        augment,
        torch.Generator().manual_seed(seed),
        compiler=compiler,
        learn_labels=learn_labels,
    )


def rel(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def first_order_reference(problem, syn_steps, alpha, seed=7, augment=DSA(STRATEGY)):
    """TESLA's formula written independently: dL/dX = d/dX sum_i (-alpha v . g_i(theta_i, X)),
    theta_i and v held constant; dL/dalpha = -v . sum_i g_i."""
    loss_fn, images, labels = problem["loss_fn"], problem["images"], problem["labels"]
    plan = plan_student_steps(NUM_IMAGES, syn_steps, BATCH_SYN, images.shape[1:], augment, torch.Generator().manual_seed(seed))
    thetas, theta = [], problem["theta_start"].clone()
    for step in plan:
        thetas.append(theta)
        t = theta.clone().requires_grad_(True)
        x = augment.apply(images[step.indices], step.augmentation)
        (g,) = torch.autograd.grad(loss_fn(t, x, labels[step.indices]), t)
        theta = theta - alpha * g
    d = torch.sum((problem["theta_start"] - problem["theta_target"]) ** 2)
    v = 2 * (theta - problem["theta_target"]) / d
    X = images.clone().requires_grad_(True)
    surrogate = 0.0
    G = torch.zeros_like(theta)
    for step, theta_i in zip(plan, thetas):
        t = theta_i.clone().requires_grad_(True)
        x = augment.apply(X[step.indices], step.augmentation)
        (g,) = torch.autograd.grad(loss_fn(t, x, labels[step.indices]), t, create_graph=True)
        surrogate = surrogate + (-alpha) * torch.dot(g, v)
        G = G + g.detach()
    (grad_x,) = torch.autograd.grad(surrogate, X)
    return grad_x, float(-torch.dot(v, G)), float(torch.sum((theta - problem["theta_target"]) ** 2) / d)


@pytest.mark.parametrize("syn_steps", [1, 4, 16])
def test_exact_equals_unroll(problem, syn_steps):
    exact = run_engine(problem, "exact", syn_steps)
    unroll = run_engine(problem, "unroll", syn_steps)
    assert torch.linalg.vector_norm(unroll.grad_images) > 0 and unroll.grad_alpha != 0
    assert rel(exact.grad_images, unroll.grad_images) < 1e-9
    assert rel(exact.grad_alpha, unroll.grad_alpha) < 1e-9
    assert exact.loss == pytest.approx(unroll.loss, rel=1e-12)


def test_tesla_equals_unroll_for_one_step(problem):
    tesla = run_engine(problem, "tesla", 1)
    unroll = run_engine(problem, "unroll", 1)
    assert rel(tesla.grad_images, unroll.grad_images) < 1e-9
    assert rel(tesla.grad_alpha, unroll.grad_alpha) < 1e-9
    assert tesla.loss == pytest.approx(unroll.loss, rel=1e-12)


@pytest.mark.parametrize("syn_steps", [4, 16])
def test_tesla_is_the_first_order_formula(problem, syn_steps):
    alpha = 0.5
    tesla = run_engine(problem, "tesla", syn_steps, alpha=alpha)
    grad_x, grad_alpha, loss = first_order_reference(problem, syn_steps, alpha)
    assert rel(tesla.grad_images, grad_x) < 1e-9
    assert rel(tesla.grad_alpha, grad_alpha) < 1e-9
    assert tesla.loss == pytest.approx(loss, rel=1e-12)
    # ... and it is not the exact gradient when N > 1 (the test would notice a swap)
    exact = run_engine(problem, "exact", syn_steps, alpha=alpha)
    assert rel(tesla.grad_images, exact.grad_images) > 1e-4


def test_loss_value_is_the_same_for_all_engines(problem):
    losses = [run_engine(problem, e, 8).loss for e in ENGINES]
    assert losses[0] > 0
    assert max(losses) - min(losses) <= 1e-12 * max(losses)


def test_exact_equals_unroll_with_soft_labels(problem):
    g = torch.Generator().manual_seed(3)
    soft = torch.softmax(torch.randn(NUM_IMAGES, CLASSES, generator=g, dtype=torch.float64), dim=1)
    exact = run_engine(problem, "exact", 6, labels=soft)
    unroll = run_engine(problem, "unroll", 6, labels=soft)
    assert rel(exact.grad_images, unroll.grad_images) < 1e-9
    assert rel(exact.grad_alpha, unroll.grad_alpha) < 1e-9


# ---------------------------------------------------------------------------------------
# learned labels: dL/dY from the same reverse sweep
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("syn_steps", [1, 4, 16])
def test_exact_label_gradient_equals_unroll(problem, syn_steps):
    """dL/dY of the exact engine equals full-unroll autograd in float64 (DSA on, soft targets,
    images and labels repeated across steps for N = 4 and 16), next to dL/dX and dL/dalpha.
    The errors are printed for docs/benchmarks.md (pytest -s)."""
    exact = run_engine(problem, "exact", syn_steps, labels=problem["soft"], learn_labels=True)
    unroll = run_engine(problem, "unroll", syn_steps, labels=problem["soft"], learn_labels=True)
    assert exact.grad_labels.shape == problem["soft"].shape and exact.grad_labels.dtype == torch.float64
    assert torch.linalg.vector_norm(unroll.grad_labels) > 0
    errors = [rel(exact.grad_labels, unroll.grad_labels), rel(exact.grad_images, unroll.grad_images),
              rel(exact.grad_alpha, unroll.grad_alpha)]
    print(f"N={syn_steps}: relative error of exact vs unroll (labels, images, alpha): " + ", ".join(f"{e:.2e}" for e in errors))
    assert max(errors) < 1e-9
    assert exact.finite and exact.loss == pytest.approx(unroll.loss, rel=1e-12)


def test_label_gradient_matches_finite_differences(problem):
    """An independent check of the unroll reference itself: central differences of L along a
    random direction of Y."""
    soft, n = problem["soft"], 4
    unroll = run_engine(problem, "unroll", n, labels=soft, learn_labels=True)
    direction = torch.randn(soft.shape, generator=torch.Generator().manual_seed(3), dtype=soft.dtype)
    eps = 1e-6
    plus = run_engine(problem, "unroll", n, labels=soft + eps * direction).loss
    minus = run_engine(problem, "unroll", n, labels=soft - eps * direction).loss
    assert float(torch.sum(unroll.grad_labels * direction)) == pytest.approx((plus - minus) / (2 * eps), rel=1e-6)


def first_order_label_reference(problem, syn_steps, alpha, seed=7, augment=DSA(STRATEGY)):
    """The first-order label gradient written independently: dL/dY = d/dY sum_i (-alpha v . g_i(theta_i, Y)),
    theta_i and v held constant."""
    loss_fn, images, soft = problem["loss_fn"], problem["images"], problem["soft"]
    plan = plan_student_steps(NUM_IMAGES, syn_steps, BATCH_SYN, images.shape[1:], augment, torch.Generator().manual_seed(seed))
    xs = [augment.apply(images[step.indices], step.augmentation) for step in plan]
    thetas, theta = [], problem["theta_start"].clone()
    for step, x in zip(plan, xs):
        thetas.append(theta)
        t = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(t, x, soft[step.indices]), t)
        theta = theta - alpha * g
    v = 2 * (theta - problem["theta_target"]) / torch.sum((problem["theta_start"] - problem["theta_target"]) ** 2)
    Y = soft.clone().requires_grad_(True)
    surrogate = 0.0
    for step, x, theta_i in zip(plan, xs, thetas):
        t = theta_i.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(t, x, Y[step.indices]), t, create_graph=True)
        surrogate = surrogate + (-alpha) * torch.dot(g, v)
    (grad_y,) = torch.autograd.grad(surrogate, Y)
    return grad_y


@pytest.mark.parametrize("syn_steps", [1, 6])
def test_tesla_label_gradient_is_the_first_order_formula(problem, syn_steps):
    tesla = run_engine(problem, "tesla", syn_steps, alpha=0.5, labels=problem["soft"], learn_labels=True)
    reference = first_order_label_reference(problem, syn_steps, 0.5)
    assert rel(tesla.grad_labels, reference) < 1e-9
    exact = run_engine(problem, "exact", syn_steps, alpha=0.5, labels=problem["soft"], learn_labels=True)
    if syn_steps == 1:  # one step: first order is exact
        assert rel(tesla.grad_labels, exact.grad_labels) < 1e-9
    else:  # several steps at a large alpha: the first-order gradient is not the exact one
        assert rel(tesla.grad_labels, exact.grad_labels) > 1e-3


def test_label_gradient_only_when_asked_and_only_for_soft_targets(problem):
    plain = run_engine(problem, "exact", 2, labels=problem["soft"])
    learned = run_engine(problem, "exact", 2, labels=problem["soft"], learn_labels=True)
    assert plain.grad_labels is None
    assert torch.equal(plain.grad_images, learned.grad_images) and plain.grad_alpha == learned.grad_alpha
    with pytest.raises(TeslaError, match="soft targets"):
        run_engine(problem, "exact", 2, learn_labels=True)


def test_non_finite_label_gradient_is_flagged(problem32):
    soft = problem32["soft"].clone()
    soft[0, 0] = float("inf")
    result = run_engine(problem32, "exact", 2, labels=soft, learn_labels=True)
    assert not result.finite


@pytest.mark.parametrize("engine", ["exact", "tesla"])
def test_traced_label_gradient_equals_eager(problem32, engine):
    """The traced step graphs with the label gradient (kinds adjoint[-first-order]-labels) give
    the eager numbers within float32 round-off, and the float64 trace the unroll's."""
    compiler = StepCompiler("trace")
    eager = run_engine(problem32, engine, 8, labels=problem32["soft"], learn_labels=True)
    graph = run_engine(problem32, engine, 8, labels=problem32["soft"], learn_labels=True, compiler=compiler)
    assert {b.kind for b in compiler.built} == {"update", ("adjoint" if engine == "exact" else "adjoint-first-order") + "-labels"}
    assert_close(graph, eager, FLOAT32_ROUNDOFF)
    assert rel(graph.grad_labels, eager.grad_labels) < FLOAT32_ROUNDOFF


def test_traced_exact_label_gradient_equals_unroll_in_float64(problem):
    compiler = StepCompiler("trace")
    graph = run_engine(problem, "exact", 6, labels=problem["soft"], learn_labels=True, compiler=compiler)
    unroll = run_engine(problem, "unroll", 6, labels=problem["soft"], learn_labels=True)
    assert rel(graph.grad_labels, unroll.grad_labels) < 1e-9


def test_exact_equals_unroll_without_augmentation(problem):
    exact = run_engine(problem, "exact", 5, augment=None)
    unroll = run_engine(problem, "unroll", 5, augment=None)
    assert rel(exact.grad_images, unroll.grad_images) < 1e-9


def test_alpha_gradient_matches_finite_difference(problem):
    """dL/dalpha of the exact engine against a central difference of the loss value."""
    alpha, h = 0.1, 1e-6
    exact = run_engine(problem, "exact", 4, alpha=alpha)
    up = run_engine(problem, "exact", 4, alpha=alpha + h).loss
    down = run_engine(problem, "exact", 4, alpha=alpha - h).loss
    assert exact.grad_alpha == pytest.approx((up - down) / (2 * h), rel=1e-6)


def test_minibatches_are_chunks_of_permutations_redrawn_when_exhausted():
    plan = plan_student_steps(12, 9, 5, (3, 8, 8), None, torch.Generator().manual_seed(0))
    sizes = [len(s.indices) for s in plan]
    assert sizes == [5, 5, 2, 5, 5, 2, 5, 5, 2]
    for k in range(3):
        epoch = torch.cat([s.indices for s in plan[3 * k : 3 * k + 3]])
        assert sorted(epoch.tolist()) == list(range(12))
    assert not torch.equal(plan[0].indices, plan[3].indices)


def test_plan_stores_augmentation_parameters_per_step():
    dsa = DSA(STRATEGY)
    plan = plan_student_steps(12, 4, 5, (3, 8, 8), dsa, torch.Generator().manual_seed(0))
    assert all(s.augmentation is not None for s in plan)
    again = plan_student_steps(12, 4, 5, (3, 8, 8), dsa, torch.Generator().manual_seed(0))
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(dsa.apply(x, plan[1].augmentation), dsa.apply(x, again[1].augmentation))


def test_bad_engine_and_motionless_expert_are_refused(problem):
    with pytest.raises(TeslaError, match="unknown gradient engine"):
        run_engine(problem, "magic", 1)
    same = dict(problem, theta_target=problem["theta_start"].clone())
    with pytest.raises(TeslaError, match="did not move"):
        run_engine(same, "exact", 1)


def test_student_trajectory_is_stored_off_the_gpu():
    """The only state of the constant-memory engines that grows with N (N x P floats) lives
    in host memory when the student runs on a GPU, on the compute device otherwise."""
    assert trajectory_storage(torch.device("cuda", 0)) == torch.device("cpu")
    assert trajectory_storage(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (host-stored trajectory path)")
@pytest.mark.parametrize("engine", ["exact", "tesla"])
def test_gpu_engines_with_host_trajectory_equal_the_cpu(problem, engine):
    cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in problem.items()}
    on_gpu, on_cpu = run_engine(cuda, engine, 6), run_engine(problem, engine, 6)
    assert on_gpu.grad_images.device.type == "cuda"
    assert rel(on_gpu.grad_images.cpu(), on_cpu.grad_images) < 1e-9
    assert abs(on_gpu.grad_alpha - on_cpu.grad_alpha) <= 1e-9 * abs(on_cpu.grad_alpha)
    assert abs(on_gpu.loss - on_cpu.loss) <= 1e-12 * abs(on_cpu.loss)


# ---------------------------------------------------------------------------------------
# the compiled student step (tesla.step_compiler)
# ---------------------------------------------------------------------------------------
#: float32 round-off over a few steps of a tiny network: eager and graph differ in summation
#: order only (inductor: fused kernels); a wrong step (say, the wrong family or sample replayed)
#: differs by O(1)
FLOAT32_ROUNDOFF = 1e-5


@pytest.fixture(scope="module")
def problem32():
    return make_problem(torch.float32)


@pytest.fixture(scope="module")
def traced():
    """One traced-step compiler per label kind, shared by the tests of this module (a compiler
    keeps its graphs across calls, as in a distillation run)."""
    return {"hard": StepCompiler("trace"), "soft": StepCompiler("trace")}


def assert_close(result, reference, tol):
    assert torch.linalg.vector_norm(reference.grad_images) > 0 and reference.grad_alpha != 0
    assert rel(result.grad_images, reference.grad_images) < tol
    assert rel(result.grad_alpha, reference.grad_alpha) < tol
    assert result.loss == pytest.approx(reference.loss, rel=tol)
    assert result.finite and reference.finite


def test_packed_augmentation_is_the_families_own_transform():
    """apply_packed(pack(sample)) equals DSA.apply(sample) exactly, value and gradient, for every
    family (and the identity when there is no augmentation)."""
    dsa = DSA(STRATEGY)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, RES, RES, dtype=torch.float64)
    w = torch.randn_like(x)
    for family in FAMILIES:
        params = DSA(family).sample(x.shape, g)
        k, packed = pack_augmentation(params, dsa.families, len(x))
        assert params.families == (family,) and dsa.families[k] == family
        xe = x.clone().requires_grad_(True)
        xp = x.clone().requires_grad_(True)
        eager = dsa.apply(xe, params)
        graph = apply_packed(xp, torch.tensor(k), packed, dsa)
        assert torch.equal(eager, graph), family
        assert not torch.equal(eager, x), family  # the sample does something
        (ge,) = torch.autograd.grad(eager, xe, w)
        (gp,) = torch.autograd.grad(graph, xp, w)
        assert torch.equal(ge, gp), family
    k, packed = pack_augmentation(None, dsa.families, len(x))
    assert k == -1 and torch.equal(apply_packed(x, torch.tensor(k), packed, dsa), x)


def test_packing_refuses_several_families_per_step():
    dsa_all = DSA(STRATEGY, single_family=False)
    params = dsa_all.sample((4, 3, RES, RES), torch.Generator().manual_seed(0))
    with pytest.raises(TeslaError, match="one DSA family"):
        pack_augmentation(params, dsa_all.families, 4)


@pytest.mark.parametrize("engine", ["exact", "tesla"])
@pytest.mark.parametrize("labels", ["hard", "soft"])
@pytest.mark.parametrize("syn_steps", [3, 8])
def test_traced_steps_equal_eager_steps(problem32, traced, engine, labels, syn_steps):
    """The traced step graph (the graph TorchInductor compiles) gives the eager engine's numbers
    within float32 round-off: DSA on, a shorter last minibatch (5, 5, 2), images repeated
    across steps (N = 8 is 2.7 permutations), hard and soft labels."""
    y = problem32["labels"] if labels == "hard" else problem32["soft"]
    eager = run_engine(problem32, engine, syn_steps, labels=y)
    graph = run_engine(problem32, engine, syn_steps, labels=y, compiler=traced[labels])
    assert graph.compile == "trace" and eager.compile == "off"
    assert_close(graph, eager, FLOAT32_ROUNDOFF)


def test_one_graph_per_kind_and_minibatch_size_serves_every_family(problem32, traced):
    """All six DSA families are drawn, yet the run builds one update and one adjoint graph per
    minibatch size (5 and 2): four graphs per engine, reused by every later call."""
    compiler = traced["hard"]
    for seed in range(3):
        run_engine(problem32, "exact", 8, seed=seed, compiler=compiler)
    plan = plan_student_steps(NUM_IMAGES, 8, BATCH_SYN, (3, RES, RES), DSA(STRATEGY), torch.Generator().manual_seed(0))
    assert len({s.augmentation.families for s in plan}) >= 3
    exact_graphs = sorted((b.kind, b.batch) for b in compiler.built if b.kind != "adjoint-first-order")
    assert exact_graphs == [("adjoint", 2), ("adjoint", 5), ("update", 2), ("update", 5)]


def test_traced_exact_engine_equals_unroll_in_float64(problem):
    """The traced path (packed augmentation, fixed buffers) is the exact gradient too."""
    compiler = StepCompiler("trace")
    exact = run_engine(problem, "exact", 6, compiler=compiler)
    unroll = run_engine(problem, "unroll", 6)
    assert exact.compile == "trace"
    assert_close(exact, unroll, 1e-9)


def test_traced_steps_without_augmentation(problem32):
    compiler = StepCompiler("trace")
    graph = run_engine(problem32, "exact", 3, augment=None, compiler=compiler, batch_syn=6)
    eager = run_engine(problem32, "exact", 3, augment=None, batch_syn=6)
    assert_close(graph, eager, FLOAT32_ROUNDOFF)


@contextlib.contextmanager
def no_host_reads():
    """Every way a tensor's value reaches Python raises (on CUDA each would wait for the device)."""
    saved = {}

    def refuse(name):
        def method(*args, **kwargs):
            raise AssertionError(f"Tensor.{name} inside a student-step loop: a host synchronisation")

        return method

    for name in ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__"):
        saved[name] = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("mode", ["off", "trace"])
@pytest.mark.parametrize("engine", ["exact", "tesla"])
def test_no_host_synchronisation_inside_the_sweeps(problem32, traced, monkeypatch, mode, engine):
    """The N-step loops never read a tensor's value: D, the loss, dL/dalpha and the finiteness
    check stay tensors until the engine returns (one transfer, after the loops)."""
    def guarded(sweep):
        def run(*args, **kwargs):
            with no_host_reads():
                return sweep(*args, **kwargs)

        return run

    compiler = None if mode == "off" else traced["hard"]
    reference = run_engine(problem32, engine, 8, compiler=compiler)  # graphs built outside the guard
    monkeypatch.setattr(matching, "_forward_sweep", guarded(matching._forward_sweep))
    monkeypatch.setattr(matching, "_reverse_sweep", guarded(matching._reverse_sweep))
    result = run_engine(problem32, engine, 8, compiler=compiler)
    assert torch.equal(result.grad_images, reference.grad_images) and result.loss == reference.loss
    # ... and the guard is not vacuous: a read inside a sweep is caught
    with no_host_reads(), pytest.raises(AssertionError, match="host synchronisation"):
        float(torch.ones(()))


def test_non_finite_results_are_flagged_without_raising(problem32):
    images = problem32["images"].clone()
    images[0] = float("nan")
    result = run_engine(dict(problem32, images=images), "exact", 3)
    assert not result.finite
    assert run_engine(problem32, "exact", 3).finite


@pytest.fixture
def tf32_everywhere():
    """A caller that enabled TF32 (and bf16 oneDNN products) globally, restored afterwards."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("medium")
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


def test_matching_runs_in_ieee_float32_whatever_the_global_tf32_setting(problem32, tf32_everywhere):
    seen = []
    loss_fn = problem32["loss_fn"]

    def spying_loss(theta, x, y):
        seen.append((torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
                     torch.backends.cudnn.allow_tf32))
        return loss_fn(theta, x, y)

    for engine in ENGINES:
        run_engine(dict(problem32, loss_fn=spying_loss), engine, 2)
    assert seen and set(seen) == {("highest", False, False)}
    assert torch.get_float32_matmul_precision() == "medium" and torch.backends.cudnn.allow_tf32  # restored
    with pytest.raises(TeslaError, match="did not move"):  # restored on an error too
        run_engine(dict(problem32, theta_target=problem32["theta_start"].clone()), "exact", 1)
    assert torch.get_float32_matmul_precision() == "medium" and torch.backends.cudnn.allow_tf32


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9: no fp32_precision API")
def test_ieee_float32_also_overrides_and_restores_the_per_backend_api():
    backends = [torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.mkldnn.matmul]
    saved = [b.fp32_precision for b in backends]
    try:
        for b in backends:
            b.fp32_precision = "tf32"
        with ieee_float32():
            assert [b.fp32_precision for b in backends] == ["ieee"] * 3
        assert [b.fp32_precision for b in backends] == ["tf32"] * 3
    finally:
        for b, value in zip(backends, saved):
            b.fp32_precision = value


def test_compile_modes_resolve_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_compile_mode("auto", cpu) == "off"
    assert resolve_compile_mode("auto", cuda) == "inductor-cudagraph"
    assert resolve_compile_mode("inductor", cpu) == "inductor"
    for mode in ("cudagraph", "inductor-cudagraph"):
        assert resolve_compile_mode(mode, cuda) == mode
        with pytest.raises(TeslaError, match="needs a CUDA device"):
            resolve_compile_mode(mode, cpu)
    with pytest.raises(TeslaError, match="not a compile mode"):
        resolve_compile_mode("fast", cpu)


def test_a_failed_build_falls_back_to_eager_steps_when_allowed(problem32, monkeypatch, capsys):
    import torch.fx.experimental.proxy_tensor as proxy_tensor

    def broken_make_fx(*args, **kwargs):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(proxy_tensor, "make_fx", broken_make_fx)
    eager = run_engine(problem32, "exact", 3)
    with pytest.raises(TeslaError, match="--compile trace: could not build.*compiler exploded.*--compile off"):
        run_engine(problem32, "exact", 3, compiler=StepCompiler("trace"))
    compiler = StepCompiler("trace", fallback=True)
    for _ in range(2):
        result = run_engine(problem32, "exact", 3, compiler=compiler)
        assert result.compile == "off" and torch.equal(result.grad_images, eager.grad_images)
    assert "compiler exploded" in compiler.failure
    assert capsys.readouterr().err.count("running the steps eagerly") == 1


@pytest.mark.slow
def test_inductor_compiled_steps_equal_eager_steps():
    """TorchInductor compiles the traced step (C++ kernels on the CPU: about 1.5 CPU-minutes for
    the two graphs of this tiny problem, cached by inductor afterwards) and gives the eager
    numbers within float32 round-off. The traced-step tests above check the same property
    for every engine, label kind and minibatch shape without a compiler."""
    problem = make_problem(torch.float32, "convnet_d1")
    compiler = StepCompiler("inductor")
    eager = run_engine(problem, "exact", 4, batch_syn=6)
    compiled = run_engine(problem, "exact", 4, batch_syn=6, compiler=compiler)
    assert compiled.compile == "inductor" and len(compiler.built) == 2
    assert_close(compiled, eager, FLOAT32_ROUNDOFF)


# ---------------------------------------------------------------------------------------
# CUDA only (skipped without a GPU)
# ---------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled/captured student steps)")


def on_cuda(problem):
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in problem.items()}


@pytest.fixture(scope="module")
def cuda_compilers():
    return {}


#: every engine and label kind with captured eager kernels; the compiled modes on fewer
#: combinations (each new compiler compiles its graphs: seconds to a minute each)
CUDA_CASES = [
    ("cudagraph", "exact", "hard"), ("cudagraph", "exact", "soft"), ("cudagraph", "tesla", "hard"),
    ("cudagraph", "tesla", "soft"), ("inductor-cudagraph", "exact", "hard"), ("inductor-cudagraph", "tesla", "soft"),
    ("inductor", "exact", "hard"), ("cudagraph", "exact", "learned"), ("inductor-cudagraph", "tesla", "learned"),
]


@needs_cuda
@pytest.mark.parametrize("mode, engine, labels", CUDA_CASES)
def test_cuda_compiled_steps_equal_eager_steps(problem32, cuda_compilers, mode, engine, labels):
    """On the GPU too, compiled/captured steps give the eager numbers within float32 round-off
    (not bitwise: CUDA's index_add and grid_sample backward sum with atomics), and replaying
    the captured graphs in a second call gives the first call's numbers."""
    cuda = on_cuda(problem32)
    y = cuda["labels"] if labels == "hard" else cuda["soft"]
    learn = labels == "learned"  # soft targets with the label gradient dL/dY
    compiler = cuda_compilers.setdefault((mode, labels), StepCompiler(mode))
    for syn_steps in (3, 8):
        eager = run_engine(cuda, engine, syn_steps, labels=y, learn_labels=learn)
        graph = run_engine(cuda, engine, syn_steps, labels=y, compiler=compiler, learn_labels=learn)
        again = run_engine(cuda, engine, syn_steps, labels=y, compiler=compiler, learn_labels=learn)  # replayed graphs
        assert graph.compile == mode and graph.grad_images.device.type == "cuda"
        assert_close(graph, eager, FLOAT32_ROUNDOFF)
        assert_close(again, graph, FLOAT32_ROUNDOFF)
        if learn:
            assert rel(graph.grad_labels, eager.grad_labels) < FLOAT32_ROUNDOFF
            assert rel(again.grad_labels, graph.grad_labels) < FLOAT32_ROUNDOFF


@needs_cuda
@pytest.mark.parametrize("mode", ["off", "cudagraph"])
@pytest.mark.parametrize("engine", ["exact", "tesla"])
def test_cuda_sweeps_never_synchronise(problem32, cuda_compilers, monkeypatch, mode, engine):
    def guarded(sweep):
        def run(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return sweep(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return run

    cuda = on_cuda(problem32)
    compiler = None if mode == "off" else cuda_compilers.setdefault((mode, "hard"), StepCompiler(mode))
    reference = run_engine(cuda, engine, 8, compiler=compiler)
    monkeypatch.setattr(matching, "_forward_sweep", guarded(matching._forward_sweep))
    monkeypatch.setattr(matching, "_reverse_sweep", guarded(matching._reverse_sweep))
    result = run_engine(cuda, engine, 8, compiler=compiler)
    assert_close(result, reference, FLOAT32_ROUNDOFF)


@pytest.mark.slow
def test_inductor_compiled_label_gradient_equals_eager_steps():
    """TorchInductor's compiled exact step with the label gradient gives the eager numbers
    (dL/dX, dL/dalpha and dL/dY) within float32 round-off."""
    problem = make_problem(torch.float32, "convnet_d1")
    compiler = StepCompiler("inductor")
    eager = run_engine(problem, "exact", 4, batch_syn=6, labels=problem["soft"], learn_labels=True)
    compiled = run_engine(problem, "exact", 4, batch_syn=6, labels=problem["soft"], learn_labels=True, compiler=compiler)
    assert compiled.compile == "inductor" and len(compiler.built) == 2
    assert_close(compiled, eager, FLOAT32_ROUNDOFF)
    assert rel(compiled.grad_labels, eager.grad_labels) < FLOAT32_ROUNDOFF
