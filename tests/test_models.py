"""Networks by name and the flat parameter vector (tesla.models)."""

from __future__ import annotations

import json

import pytest
import torch

from tesla.errors import TeslaError
from tesla.models import available_models, build_from_spec, build_model, model_spec, supports_resolution
from tesla.parameters import (
    ParamLayout,
    buffer_layout,
    count_params,
    flatten_buffers,
    flatten_params,
    functional_forward,
    load_flat_,
    load_flat_buffers_,
    param_layout,
    unflatten,
)

ALL = available_models()

#: exact counts at 3 x 32 x 32 and 3 x 64 x 64 with 10 classes (see docs/formats.md)
COUNTS_10 = {
    ("convnet", 32): 320_010,
    ("convnet", 64): 381_450,
    ("convnet_d4", 32): 452_490,
    ("convnet_d4", 64): 467_850,
    ("resnet18", 32): 11_173_962,
    ("resnet18_bn", 64): 11_173_962,
    ("vgg11", 32): 9_228_362,
    ("alexnet", 64): 2_492_234,
    ("vit", 32): 9_532_938,
    ("vit", 64): 9_631_242,
}


def test_registry_lists_every_family():
    for name in ("convnet", "convnet_d1", "convnet_d2", "convnet_d4", "convnet_d5", "resnet18", "resnet18_bn",
                 "vgg11", "alexnet", "vit"):
        assert name in ALL


def test_every_name_declares_a_builder_of_tesla_networks():
    """The registry (tesla.models, no torch at import) names each network's builder as a
    `module:function` path; every path leads to a function of tesla.networks."""
    import tesla.networks
    from tesla.models import _REGISTRY

    for name, entry in _REGISTRY.items():
        module, _, function = entry.builder.partition(":")
        assert module == "tesla.networks" and callable(getattr(tesla.networks, function, None)), (name, entry.builder)


def test_the_registry_knows_which_networks_normalise_by_batch_statistics():
    """uses_batch_norm (answered from the registry, without torch) agrees with the network
    built, for every registered name and every norm it takes: a builder that adds batch norm
    any other way than through its ``norm`` option fails here. Which networks those are is
    pinned too: a run over several processes refuses them (tesla.sharding)."""
    from tesla.models import _REGISTRY, uses_batch_norm

    for name, entry in _REGISTRY.items():
        for options in [{}] + [{"norm": norm} for norm in entry.choices.get("norm", ())]:
            with torch.device("meta"):  # the modules only, no initialisation
                model = build_model(name, channels=3, num_classes=10, resolution=32, **options)
            built = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
            assert uses_batch_norm(name, **options) == built, (name, options)
    assert uses_batch_norm("convnet", norm="batchnorm") and not uses_batch_norm("convnet")
    assert {n for n in ALL if uses_batch_norm(n)} == {"resnet18_bn", "resnet18_bn_tv", "vgg11_bn"}


def test_paper_parameter_counts():
    assert count_params(build_model("convnet", channels=3, num_classes=10, resolution=32)) == 320_010
    with torch.device("meta"):
        assert count_params(build_model("convnet_d4", channels=3, num_classes=1000, resolution=64)) == 2_496_360


@pytest.mark.parametrize("name,resolution", sorted(COUNTS_10))
def test_parameter_counts(name, resolution):
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_model(name, channels=3, num_classes=10, resolution=resolution)
    assert count_params(model) == COUNTS_10[(name, resolution)]
    assert param_layout(model).total == COUNTS_10[(name, resolution)]


#: small but complete instances of every family (defaults are covered by the count tests)
SMALL = {"vit": dict(dim=32, depth=2, heads=4, mlp_dim=32)}


@pytest.mark.parametrize("name", ALL)
def test_functional_forward_equals_module_forward(name):
    torch.manual_seed(0)
    res = next(r for r in range(8, 65) if supports_resolution(name, r))  # smallest that works
    model = build_model(name, channels=3, num_classes=5, resolution=res, **SMALL.get(name, {})).eval()
    with torch.no_grad():  # give all-zero initialisations (torchvision's ViT head) some signal
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.01)
    flat = flatten_params(model).requires_grad_(True)
    layout = param_layout(model)
    x = torch.randn(2, 3, res, res, requires_grad=True)
    expected = model(x)
    got = functional_forward(model, flat, x, layout=layout)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # gradients reach both the flat vector and the input, and match the module's own
    g_flat, g_x = torch.autograd.grad(got.square().sum(), (flat, x))
    assert g_x.shape == x.shape and g_x.abs().sum() > 0
    assert torch.isfinite(g_flat).all() and g_flat.abs().sum() > 0
    if count_params(model) < 1_000_000:  # the large ones cost seconds; the rule is the same
        model.zero_grad()
        expected.square().sum().backward()
        ref = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(g_flat, ref, rtol=1e-4, atol=1e-5)


def test_functional_forward_second_order_convnet():
    """Hessian-vector products through the flat vector (what the exact engine needs)."""
    torch.manual_seed(0)
    model = build_model("convnet_d2", channels=1, num_classes=3, resolution=8, width=8).double()
    flat = flatten_params(model).requires_grad_(True)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    loss = torch.nn.functional.cross_entropy(functional_forward(model, flat, x), y)
    (g,) = torch.autograd.grad(loss, flat, create_graph=True)
    v = torch.randn_like(flat)
    hv, jx = torch.autograd.grad(g @ v, (flat, x))
    eps = 1e-6
    def grad_at(theta):
        theta = theta.detach().requires_grad_(True)
        l = torch.nn.functional.cross_entropy(functional_forward(model, theta, x.detach()), y)
        return torch.autograd.grad(l, theta)[0]
    fd = (grad_at(flat + eps * v) - grad_at(flat - eps * v)) / (2 * eps)
    torch.testing.assert_close(hv, fd, rtol=1e-5, atol=1e-7)
    assert jx.abs().sum() > 0


def test_vit_second_order_and_pickle(tmp_path):
    """The ViT's default 'math' attention is twice differentiable (fused CPU kernels are not)."""
    torch.manual_seed(0)
    model = build_model("vit", channels=1, num_classes=3, resolution=8, **SMALL["vit"])
    flat = flatten_params(model).requires_grad_(True)
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(functional_forward(model, flat, x), torch.tensor([0, 2]))
    (g,) = torch.autograd.grad(loss, flat, create_graph=True)
    hv, jx = torch.autograd.grad(g @ torch.randn_like(g), (flat, x))
    assert hv.abs().sum() > 0 and jx.abs().sum() > 0
    torch.save(model, tmp_path / "vit.pt")
    again = torch.load(tmp_path / "vit.pt", weights_only=False)
    assert torch.equal(flatten_params(again), flatten_params(model))


def test_unflatten_views_and_roundtrip():
    model = build_model("convnet_d1", channels=3, num_classes=4, resolution=8, width=6)
    flat = flatten_params(model)
    layout = param_layout(model)
    assert layout.names == tuple(n for n, _ in model.named_parameters())
    parts = unflatten(flat, layout)
    for name, p in model.named_parameters():
        assert torch.equal(parts[name], p.detach())
        assert parts[name].data_ptr() >= flat.data_ptr()  # a view into flat
    flat2 = torch.randn_like(flat)
    load_flat_(model, flat2)
    assert torch.equal(flatten_params(model), flat2)
    assert ParamLayout.from_json(layout.to_json()) == layout
    assert json.loads(layout.to_json())["numels"] == list(layout.numels)
    with pytest.raises(TeslaError, match="1-D vector of"):
        unflatten(flat[:-1], layout)
    with pytest.raises(TeslaError, match="not valid"):
        ParamLayout.from_json("{}")


def test_batchnorm_buffers_flat_vector():
    torch.manual_seed(0)
    model = build_model("convnet_d2", channels=3, num_classes=4, resolution=8, width=6, norm="batchnorm")
    blayout = buffer_layout(model)
    assert blayout.names == ("features.1.running_mean", "features.1.running_var",
                             "features.5.running_mean", "features.5.running_var")
    x = torch.randn(8, 3, 8, 8)
    model.train()
    flat = flatten_params(model)
    buffers = flatten_buffers(model)
    out = functional_forward(model, flat, x, buffers=buffers)
    torch.testing.assert_close(out, model(x))
    # training-mode batch norm updated the passed buffer vector like the module's own
    torch.testing.assert_close(buffers, flatten_buffers(model))
    assert not torch.equal(buffers[:6], torch.zeros(6))
    model.eval()
    other = torch.rand_like(buffers) + 0.5
    eval_out = functional_forward(model, flat, x, buffers=other)
    load_flat_buffers_(model, other)
    torch.testing.assert_close(eval_out, model(x))


@pytest.mark.parametrize("name", ["convnet", "convnet_d4", "resnet18", "vgg11", "alexnet", "vit"])
@pytest.mark.parametrize("channels,resolution", [(1, 28), (3, 32), (3, 64)])
def test_output_shapes(name, channels, resolution):
    options = SMALL.get(name, {}) if resolution != 64 else {}
    model = build_model(name, channels=channels, num_classes=7, resolution=resolution, **options)
    with torch.no_grad():
        assert model(torch.randn(1, channels, resolution, resolution)).shape == (1, 7)


def test_spec_roundtrip():
    spec = model_spec("convnet_d2", channels=1, num_classes=3, resolution=8, width=16, norm="none")
    text = json.dumps(spec)
    assert spec["options"] == {"depth": 2, "width": 16, "norm": "none", "pooling": "avgpool"}
    torch.manual_seed(1)
    a = build_model("convnet_d2", channels=1, num_classes=3, resolution=8, width=16, norm="none")
    torch.manual_seed(1)
    b = build_from_spec(text)
    assert param_layout(a) == param_layout(b)
    assert torch.equal(flatten_params(a), flatten_params(b))
    with pytest.raises(TeslaError, match="lacks"):
        build_from_spec({"name": "convnet"})


def test_unknown_name_lists_valid_names():
    with pytest.raises(TeslaError) as info:
        build_model("convnet7", channels=3, num_classes=10, resolution=32)
    assert "convnet7" in str(info.value)
    for name in ALL:
        assert name in str(info.value)


def test_bad_resolution_and_options():
    assert not supports_resolution("convnet_d4", 8)
    assert supports_resolution("convnet", 8)
    assert not supports_resolution("vit", 30)
    with pytest.raises(TeslaError, match=r"at least 16 px.*depth of at most 3"):
        build_model("convnet_d4", channels=1, num_classes=10, resolution=8)
    with pytest.raises(TeslaError, match="multiple of 4"):
        build_model("vit", channels=3, num_classes=10, resolution=30)
    with pytest.raises(TeslaError, match="no option 'widht'.*width"):
        build_model("convnet", channels=3, num_classes=10, resolution=32, widht=64)
    with pytest.raises(TeslaError, match="norm='layer'"):
        build_model("convnet", channels=3, num_classes=10, resolution=32, norm="layer")
    with pytest.raises(TeslaError, match="channels must be a positive integer"):
        build_model("convnet", channels=0, num_classes=10, resolution=32)
    # instance norm over a 1 x 1 map erases the signal: refused, batch norm allowed
    assert not supports_resolution("resnet18", 8) and supports_resolution("resnet18_bn", 8)
    assert not supports_resolution("vgg11", 16) and supports_resolution("vgg11", 17)
    with pytest.raises(TeslaError, match=r"at least 17 px or norm='batchnorm'"):
        build_model("vgg11", channels=1, num_classes=10, resolution=16)
    # no pooling: any depth fits
    assert build_model("convnet_d4", channels=1, num_classes=2, resolution=8, pooling="none", width=4)


# -- MTT's AlexNet ------------------------------------------------------------------------
def conv_params(c_in: int, c_out: int, k: int) -> int:
    return c_out * (c_in * k * k + 1)


def alexnet_mtt_count(channels: int, num_classes: int) -> int:
    """Counted from the published description: widths 128-192-256-192-192, kernels 5-5-3-3-3,
    192 x 4 x 4 into one linear layer."""
    widths, kernels = [channels, 128, 192, 256, 192, 192], [5, 5, 3, 3, 3]
    convs = sum(conv_params(widths[i], widths[i + 1], kernels[i]) for i in range(5))
    return convs + num_classes * (192 * 4 * 4 + 1)


@pytest.mark.parametrize("channels,resolution,classes", [(3, 32, 10), (1, 28, 10), (3, 32, 100)])
def test_alexnet_mtt_parameter_count_and_classifier_input(channels, resolution, classes):
    model = build_model("alexnet_mtt", channels=channels, num_classes=classes, resolution=resolution)
    assert count_params(model) == alexnet_mtt_count(channels, classes)
    assert alexnet_mtt_count(3, 10) == 1_872_202  # the figure in docs/formats.md
    x = torch.randn(2, channels, resolution, resolution)
    with torch.no_grad():
        assert model.features(x).shape == (2, 192, 4, 4)  # what the published classifier takes
        assert model(x).shape == (2, classes)


def test_alexnet_mtt_refuses_sizes_it_cannot_take():
    assert supports_resolution("alexnet_mtt", 28) and supports_resolution("alexnet_mtt", 32)
    assert not supports_resolution("alexnet_mtt", 64) and not supports_resolution("alexnet_mtt", 8)
    with pytest.raises(TeslaError, match=r"cannot take 64 x 64.*192 x 4 x 4.*use 'alexnet'"):
        build_model("alexnet_mtt", channels=3, num_classes=10, resolution=64)


# -- ResNet-18 initialisation --------------------------------------------------------------
def _conv_stds(model: torch.nn.Module) -> list[tuple[float, int, int]]:
    """(weight std, fan_in, fan_out) of every convolution."""
    out = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            out.append((float(m.weight.detach().std()), m.in_channels * k, m.out_channels * k))
    return out


def test_resnet18_starts_as_the_published_network_and_torchvision_init_stays_available():
    """PAPER.md section 10: the published ResNet-18 keeps PyTorch's default layer
    initialisation (Kaiming-uniform, a = sqrt(5): std 1/sqrt(3 fan_in)); torchvision's
    (Kaiming-normal fan-out: std sqrt(2/fan_out)) is ``resnet18_tv``."""
    torch.manual_seed(0)
    published = build_model("resnet18", channels=3, num_classes=10, resolution=32)
    torch.manual_seed(0)
    tv = build_model("resnet18_tv", channels=3, num_classes=10, resolution=32)
    for std, fan_in, _ in _conv_stds(published):
        assert std == pytest.approx((3 * fan_in) ** -0.5, rel=0.1), fan_in
    ratios = []
    for (std, fan_in, fan_out), (std_tv, _, _) in zip(_conv_stds(published), _conv_stds(tv)):
        assert std_tv == pytest.approx((2 / fan_out) ** 0.5, rel=0.1), fan_out
        ratios.append(std_tv / std)
    assert min(ratios) < 0.6 and max(ratios) > 2.3  # the 0.5-2.5x of PAPER.md section 10
    for name, init in (("resnet18", "torch-default"), ("resnet18_bn", "torch-default"), ("resnet18_tv", "torchvision"),
                       ("resnet18_bn_tv", "torchvision")):
        assert model_spec(name, channels=3, num_classes=10, resolution=32)["options"]["init"] == init
    with pytest.raises(TeslaError, match="init='kaiming' is not one of torch-default, torchvision"):
        build_model("resnet18", channels=3, num_classes=10, resolution=32, init="kaiming")
    # a spec written before the option rebuilds what it was built with: torchvision's
    old = model_spec("resnet18", channels=3, num_classes=10, resolution=32)
    del old["options"]["init"]
    torch.manual_seed(0)
    rebuilt = build_from_spec(old)
    assert [s for s, _, _ in _conv_stds(rebuilt)] == pytest.approx([s for s, _, _ in _conv_stds(tv)], rel=1e-6)
