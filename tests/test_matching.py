"""Gradient engines of trajectory matching, checked in float64 against full-unroll autograd.

The student is the project's ConvNet (depth 2, width 4, 8 x 8 RGB, 3 classes) with DSA
augmentation on; batch_syn (5) is smaller than the synthetic set (12), so within one unroll
every image is visited several times and its gradient sums several steps' terms.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tesla.augment import DSA
from tesla.errors import TeslaError
from tesla.matching import ENGINES, matching_gradients, plan_student_steps, trajectory_storage
from tesla.models import build_model, flatten_params, functional_forward, param_layout
from tesla.training import soft_cross_entropy

NUM_IMAGES, BATCH_SYN, CLASSES, RES = 12, 5, 3, 8
STRATEGY = "color_crop_cutout_flip_scale_rotate"


#: tiny tensors: one intra-op thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = build_model("convnet_d2", channels=3, num_classes=CLASSES, resolution=RES, width=4).double()
    layout = param_layout(model)
    theta_start = flatten_params(model, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    theta_target = theta_start + 0.05 * torch.randn(theta_start.shape, generator=g, dtype=torch.float64)
    images = torch.randn(NUM_IMAGES, 3, RES, RES, generator=g, dtype=torch.float64)
    labels = torch.arange(NUM_IMAGES) % CLASSES

    def loss_fn(theta, x, y):
        logits = functional_forward(model, theta, x, layout=layout)
        return F.cross_entropy(logits, y) if y.dtype == torch.int64 else soft_cross_entropy(logits, y)

    return dict(loss_fn=loss_fn, theta_start=theta_start, theta_target=theta_target, images=images, labels=labels)


def run_engine(problem, engine, syn_steps, alpha=0.1, seed=7, labels=None, augment=DSA(STRATEGY)):
    return matching_gradients(
        engine,
        problem["loss_fn"],
        problem["theta_start"],
        problem["theta_target"],
        problem["images"],
        problem["labels"] if labels is None else labels,
        alpha,
        syn_steps,
        BATCH_SYN,
        augment,
        torch.Generator().manual_seed(seed),
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
