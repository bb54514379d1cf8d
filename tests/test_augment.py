"""Differentiable siamese augmentation (tesla.augment)."""

from __future__ import annotations

import math

import pytest
import torch

from tesla.augment import (
    DSA,
    AugParams,
    apply_color,
    apply_crop,
    apply_cutout,
    apply_flip,
    apply_rotate,
    apply_scale,
    crop_shift,
    cutout_side,
)
from tesla.dsa_strategy import DEFAULT_STRATEGY, FAMILIES
from tesla.errors import TeslaError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_input_and_replay(family, dtype):
    dsa = DSA(family)
    x = torch.randn(6, 3, 16, 16, dtype=dtype, requires_grad=True)
    y, params = dsa(x, gen(1))
    assert y.dtype == dtype and y.shape == x.shape
    assert params.families == (family,)
    (g,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), x)
    assert g.abs().sum() > 0
    # replay on the same batch: identical; on another batch: same transform (linear parts)
    assert torch.equal(dsa.apply(x, params), y)
    other = torch.randn_like(x)
    replay = dsa.apply(other, params)
    if family != "color":  # every family but color is linear in x: A(x + z) = A(x) + A(z) - A(0)
        zero = dsa.apply(torch.zeros_like(x), params)
        torch.testing.assert_close(dsa.apply(x.detach() + other, params), y.detach() + replay - zero)


def test_replay_is_the_same_transform_per_sample():
    """Siamese: sample i of batch B gets exactly the transform sample i of batch A got."""
    dsa = DSA(single_family=False)
    a = torch.randn(5, 3, 12, 12)
    _, params = dsa(a, gen(3))
    b = torch.randn(5, 3, 12, 12)
    batch = dsa.apply(b, params)
    for i in range(5):
        one = AugParams((1, 3, 12, 12), params.families,
                        {f: {k: v[i : i + 1] for k, v in d.items()} for f, d in params.values.items()})
        torch.testing.assert_close(dsa.apply(b[i : i + 1], one), batch[i : i + 1])


def test_second_order_through_augmentation():
    """d/dx of (grad_theta loss . v): what the matching engines differentiate."""
    torch.manual_seed(0)
    w = torch.randn(10, 3 * 8 * 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    dsa = DSA(single_family=False)
    xa, _ = dsa(x, gen(0))
    loss = torch.nn.functional.cross_entropy(xa.flatten(1) @ w.T, torch.tensor([0, 1, 2, 3]))
    (g,) = torch.autograd.grad(loss, w, create_graph=True)
    (jx,) = torch.autograd.grad((g * torch.randn_like(g)).sum(), x)
    assert jx.abs().sum() > 0


def test_parameter_ranges():
    n, h = 4000, 32
    shape = (n, 3, h, h)
    g = gen(5)
    p = {f: DSA(f).sample(shape, g).values[f] for f in FAMILIES}
    c = p["color"]
    assert -0.5 <= c["brightness"].min() and c["brightness"].max() <= 0.5
    assert 0.0 <= c["saturation"].min() and c["saturation"].max() <= 2.0
    assert 0.5 <= c["contrast"].min() and c["contrast"].max() <= 1.5
    for key in ("brightness", "saturation", "contrast"):  # spread over the whole range
        v = c[key]
        assert v.max() - v.min() > 0.95 * (1.0 if key != "saturation" else 2.0)
    s = crop_shift(h)
    assert s == 4
    for key in ("dy", "dx"):
        assert set(p["crop"][key].tolist()) == set(range(-s, s + 1))
    assert set(p["cutout"]["cy"].tolist()) == set(range(h))
    assert abs(p["flip"]["flip"].double().mean() - 0.5) < 0.05
    for key in ("sx", "sy"):
        v = p["scale"][key]
        assert 1 / 1.2 <= v.min() < 0.84 and 1.19 < v.max() <= 1.2
    d = p["rotate"]["degrees"]
    assert -15 <= d.min() < -14.9 and 14.9 < d.max() <= 15
    assert cutout_side(32) == 16 and cutout_side(28) == 14 and crop_shift(28) == 4 and crop_shift(64) == 8


def test_pick_one_family_is_uniform():
    """Chi-square goodness of fit of the chosen family over 3000 calls (fixed seed)."""
    dsa = DSA(DEFAULT_STRATEGY)
    g = gen(123)
    counts = {f: 0 for f in FAMILIES}
    for _ in range(3000):
        (fam,) = dsa.sample((1, 1, 4, 4), g).families
        counts[fam] += 1
    expected = 3000 / len(FAMILIES)
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 20.5, counts  # 5 degrees of freedom, p = 0.001


def test_identity_strategy_and_all_families():
    x = torch.randn(2, 3, 8, 8)
    y, params = DSA("none")(x, gen())
    assert torch.equal(y, x) and params.is_identity
    params = DSA(single_family=False).sample(x.shape, gen())
    assert params.families == FAMILIES


def test_deterministic_for_a_seed():
    x = torch.randn(3, 3, 16, 16)
    dsa = DSA()
    for _ in range(5):
        seed = int(torch.randint(1000, (1,)))
        y1, p1 = dsa(x, gen(seed))
        y2, p2 = dsa(x, gen(seed))
        assert p1.families == p2.families and torch.equal(y1, y2)


def test_family_semantics():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # crop: y[i, j] = x[i - dy, j - dx], zero padded
    y = apply_crop(x, {"dy": torch.tensor([1]), "dx": torch.tensor([-1])})
    assert torch.equal(y[0, 0, 0], torch.zeros(4))
    assert torch.equal(y[0, 0, 1:, :3], x[0, 0, :3, 1:]) and torch.equal(y[0, 0, :, 3], torch.zeros(4))
    # flip
    assert torch.equal(apply_flip(x, {"flip": torch.tensor([True])}), x.flip(3))
    assert torch.equal(apply_flip(x, {"flip": torch.tensor([False])}), x)
    # cutout: side int(0.5*8+0.5) = 4 square, clipped at the border
    ones = torch.ones(1, 2, 8, 8)
    y = apply_cutout(ones, {"cy": torch.tensor([0]), "cx": torch.tensor([4])})
    assert y[0, 0].sum() == 64 - 2 * 4 and torch.equal(y[0, 0], y[0, 1])
    assert y[0, 0, :2, 2:6].abs().sum() == 0
    # scale 1 and rotation 0 are the identity (align_corners=True grid)
    z = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    one = torch.ones(2, dtype=torch.float64)
    torch.testing.assert_close(apply_scale(z, {"sx": one, "sy": one}), z)
    torch.testing.assert_close(apply_rotate(z, {"degrees": 0 * one}), z)
    # rotation by 90 degrees (outside the sampled range) is an exact quarter turn
    torch.testing.assert_close(apply_rotate(z, {"degrees": 90 * one}).abs().sum(), z.abs().sum())
    # color: brightness shift only; saturation 0 -> grey; contrast 1
    c = {"brightness": torch.tensor([0.25]), "saturation": torch.tensor([0.0]), "contrast": torch.tensor([1.0])}
    rgb = torch.rand(1, 3, 4, 4)
    y = apply_color(rgb, c)
    torch.testing.assert_close(y, (rgb + 0.25).mean(1, keepdim=True).expand_as(rgb))
    c = {"brightness": torch.tensor([0.0]), "saturation": torch.tensor([1.0]), "contrast": torch.tensor([1.5])}
    y = apply_color(rgb, c)
    torch.testing.assert_close(y - y.mean(), 1.5 * (rgb - rgb.mean()))


def test_params_move_and_are_small():
    params = DSA(single_family=False).sample((64, 3, 32, 32), gen())
    moved = params.to("cpu")
    assert moved.families == params.families and moved.shape == params.shape
    stored = sum(v.numel() for d in params.values.values() for v in d.values())
    assert stored == 64 * 11  # 3 color + 2 crop + 2 cutout + 1 flip + 2 scale + 1 rotate per image
    x = torch.randn(64, 3, 32, 32)
    assert torch.equal(DSA(single_family=False).apply(x, moved), DSA(single_family=False).apply(x, params))


def test_errors():
    with pytest.raises(TeslaError, match="unknown family 'blur'"):
        DSA("color_blur")
    with pytest.raises(TeslaError, match="twice"):
        DSA("flip_flip")
    dsa = DSA("flip")
    params = dsa.sample((2, 3, 8, 8), gen())
    with pytest.raises(TeslaError, match="cannot replay"):
        dsa.apply(torch.zeros(3, 3, 8, 8), params)
    with pytest.raises(TeslaError, match="N x C x H x W"):
        dsa.sample((2, 8, 8), gen())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_result_on_cuda():
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    dsa = DSA(single_family=False)
    params = dsa.sample(x.shape, gen(7))
    cpu = dsa.apply(x, params)
    gpu = dsa.apply(x.cuda(), params.to("cuda"))
    torch.testing.assert_close(gpu.cpu(), cpu)
    assert math.isfinite(float(gpu.sum()))
