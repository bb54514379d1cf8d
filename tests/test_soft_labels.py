"""TESLA soft label assignment: softmax of the target expert on un-augmented images, chunked."""

from __future__ import annotations

import pytest
import torch

from tesla.models import build_model
from tesla.parameters import flatten_params
from tesla.soft_labels import assign_soft_labels


#: tiny tensors: one intra-op thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def expert():
    torch.manual_seed(0)
    model = build_model("convnet_d2", channels=3, num_classes=5, resolution=8, width=4)
    flat = flatten_params(model) + 0.1  # not the module's own parameters: labels must use `flat`
    return model, flat


@pytest.mark.parametrize("n", [1, 3, 7, 49, 50, 64])
def test_any_number_of_images_and_chunking_do_not_change_the_labels(expert, n):
    model, flat = expert
    x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(n))
    whole = assign_soft_labels(model, flat, x, chunk=1000)
    assert whole.shape == (n, 5)
    for chunk in (1, 2, 16):
        torch.testing.assert_close(assign_soft_labels(model, flat, x, chunk=chunk), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole.sum(dim=1), torch.ones(n))
    assert bool((whole > 0).all())


def test_labels_are_the_softmax_of_the_given_parameters(expert):
    model, flat = expert
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    probe = build_model("convnet_d2", channels=3, num_classes=5, resolution=8, width=4)
    with torch.no_grad():
        offset = 0
        for p in probe.parameters():
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        expected = torch.softmax(probe(x), dim=1)
    torch.testing.assert_close(assign_soft_labels(model, flat, x, chunk=4), expected)
    # the module's own parameters are a different network: different labels
    with torch.no_grad():
        assert not torch.allclose(torch.softmax(model(x), dim=1), expected)


def test_no_gradient_reaches_images_or_parameters(expert):
    model, flat = expert
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    y = assign_soft_labels(model, flat.clone().requires_grad_(True), x)
    assert not y.requires_grad


def test_float64_images_give_float64_labels(expert):
    model, flat = expert
    model64 = build_model("convnet_d2", channels=3, num_classes=5, resolution=8, width=4).double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    y = assign_soft_labels(model64, flat.double(), x)
    assert y.dtype == torch.float64


def test_bad_arguments_are_refused(expert):
    model, flat = expert
    with pytest.raises(ValueError, match="chunk"):
        assign_soft_labels(model, flat, torch.zeros(2, 3, 8, 8), chunk=0)
    with pytest.raises(ValueError, match="N x C x H x W"):
        assign_soft_labels(model, flat, torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="no images"):
        assign_soft_labels(model, flat, torch.zeros(0, 3, 8, 8))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 4.0])
def test_label_logit_gradient_is_the_chain_rule_through_the_softmax(temperature):
    """dL/dz of y = softmax(z / T) against autograd through torch.softmax, in float64."""
    from tesla.soft_labels import label_logit_gradient, learned_soft_labels

    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 5, generator=g, dtype=torch.float64)
    grad_y = torch.randn(7, 5, generator=g, dtype=torch.float64)
    zr = z.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(torch.softmax(zr / temperature, dim=1), zr, grad_y)
    torch.testing.assert_close(label_logit_gradient(z, temperature, grad_y), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(learned_soft_labels(z, temperature), torch.softmax(z / temperature, dim=1))
