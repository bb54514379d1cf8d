"""Networks by name: the registry of architectures, their specs and construction.

Registry
--------
``build_model(name, channels=, num_classes=, resolution=, **options)`` builds a network
for C x R x R inputs.  Registered names (``available_models()``):

* ``convnet`` (depth 3), ``convnet_d1`` .. ``convnet_d5``: the ConvNet-D of MTT/TESLA,
  D x [conv3x3(width, pad 1) -> norm -> ReLU -> pool 2x2] -> linear;
* ``resnet18`` (instance norm) and ``resnet18_bn`` (batch norm): torchvision's ResNet-18
  (``BasicBlock`` x [2, 2, 2, 2]) with a 3x3 stride-1 stem and no max-pool, initialised as
  the published network (PyTorch's default layer initialisation, option ``init``);
  ``resnet18_tv`` and ``resnet18_bn_tv``: the same with torchvision's initialisation;
* ``vgg11`` (instance norm, as MTT's cross-architecture VGG-11) and ``vgg11_bn``;
* ``alexnet``: a small-input AlexNet (five convolutions, three max-pools, linear head);
* ``alexnet_mtt``: the AlexNet of MTT's cross-architecture table (widths 128-192-256-192-192,
  a 192 x 4 x 4 classifier input; 28 or 32 px only);
* ``vit``: a small Vision Transformer (patch 4, dim 512, depth 6, heads 8, MLP 512),
  torchvision's ``VisionTransformer`` with a C-channel patch embedding.

``model_spec`` returns a JSON-serialisable dict with every constructor argument resolved;
``build_from_spec(spec)`` rebuilds the same architecture.

The flat parameter vector theta of a network (packing, unpacking, f(theta; x)) is in
:mod:`tesla.parameters`.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from tesla.errors import TeslaError

__all__ = [
    "AlexNet",
    "AlexNetMTT",
    "ConvNet",
    "ModelEntry",
    "VGG",
    "architecture_label",
    "available_models",
    "build_from_spec",
    "build_model",
    "model_spec",
    "model_version",
    "supports_resolution",
]

SPEC_FORMAT = "tesla-model-spec"
SPEC_VERSION = 1

NORMS = ("instancenorm", "batchnorm", "none")
POOLINGS = ("avgpool", "maxpool", "none")


# --------------------------------------------------------------------------------------
# normalisation layers (module-level functions, so built models stay picklable)
# --------------------------------------------------------------------------------------
def instance_norm(channels: int) -> nn.Module:
    """Instance norm as in MTT: GroupNorm with one group per channel, affine.

    y = gamma_c (x - mean_{n,c}) / sqrt(var_{n,c} + 1e-5) + beta_c, statistics over H x W.
    """
    return nn.GroupNorm(channels, channels, affine=True)


def batch_norm(channels: int) -> nn.Module:
    """Batch norm with running statistics (buffers ``running_mean``/``running_var``)."""
    return nn.BatchNorm2d(channels)


def _norm_layer(norm: str) -> Callable[[int], nn.Module] | None:
    if norm == "instancenorm":
        return instance_norm
    if norm == "batchnorm":
        return batch_norm
    if norm == "none":
        return None
    raise TeslaError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


# --------------------------------------------------------------------------------------
# ConvNet-D
# --------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    """ConvNet-D: D x [conv3x3(width, pad 1) -> norm -> ReLU -> pool 2x2] -> linear.

    Parameters in ``named_parameters()`` order: for each block d = 0 .. D-1
    ``features.{4d}.weight`` (width x C_in x 3 x 3), ``features.{4d}.bias``, then (unless
    norm is 'none') ``features.{4d+1}.weight``/``.bias`` (width); finally
    ``classifier.weight`` (K x width*r*r) and ``classifier.bias`` (K), r = R / 2^D (floor
    at each pooling) or R without pooling.
    Count: sum_d (9 C_in,d width + width + 2 width [norm]) + K (width r^2 + 1);
    320,010 for D=3, CIFAR-10; 2,496,360 for D=4 on 64 x 64 with 1000 classes.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        resolution: int,
        depth: int = 3,
        width: int = 128,
        norm: str = "instancenorm",
        pooling: str = "avgpool",
    ) -> None:
        super().__init__()
        norm_layer = _norm_layer(norm)
        if pooling not in POOLINGS:
            raise TeslaError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        layers: list[nn.Module] = []
        c_in, r = channels, resolution
        for _ in range(depth):
            layers.append(nn.Conv2d(c_in, width, kernel_size=3, padding=1))
            layers.append(norm_layer(width) if norm_layer is not None else nn.Identity())
            layers.append(nn.ReLU())
            if pooling == "avgpool":
                layers.append(nn.AvgPool2d(2, 2))
                r //= 2
            elif pooling == "maxpool":
                layers.append(nn.MaxPool2d(2, 2))
                r //= 2
            else:
                layers.append(nn.Identity())
            c_in = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * r * r, num_classes)
        self.feature_resolution = r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _convnet_resolution_problem(resolution: int, options: Mapping[str, Any]) -> str | None:
    depth = int(options["depth"])
    if options["pooling"] == "none":
        return None
    if resolution >> depth < 1:
        return (
            f"depth {depth} halves the image {depth} times, so it needs at least {2 ** depth} px "
            f"(got {resolution}); use a depth of at most {max(0, resolution.bit_length() - 1)} "
            f"or pooling='none'"
        )
    return None


def _build_convnet(channels: int, num_classes: int, resolution: int, **o: Any) -> nn.Module:
    return ConvNet(channels, num_classes, resolution, depth=o["depth"], width=o["width"], norm=o["norm"], pooling=o["pooling"])


# --------------------------------------------------------------------------------------
# ResNet-18 (torchvision building blocks)
# --------------------------------------------------------------------------------------
#: how a ResNet-18's layers start: ``torch-default`` (every layer's own ``reset_parameters``:
#: Kaiming-uniform with a = sqrt(5) for convolutions and the linear head, i.e. std
#: 1/sqrt(3 fan_in); the published MTT/TESLA network, PAPER.md section 10) or ``torchvision``
#: (torchvision's ResNet: Kaiming-normal fan-out convolutions, std sqrt(2/fan_out), 0.5-2.5x
#: the former's)
RESNET_INITS: tuple[str, ...] = ("torch-default", "torchvision")


def _build_resnet18(channels: int, num_classes: int, resolution: int, **o: Any) -> nn.Module:
    """torchvision ResNet-18 adapted to small inputs.

    The 7x7 stride-2 stem and the max-pool (made for 224 px) are replaced by a 3x3
    stride-1 convolution and nothing, at every resolution: 32 px inputs reach the last
    stage at 4 x 4, 64 px at 8 x 8, 28 px at 4 x 4, 8 px at 1 x 1; the adaptive average
    pool makes the head independent of R.  The rest (BasicBlock x [2, 2, 2, 2], widths
    64..512, strides 1, 2, 2, 2, 1x1 projection shortcuts) is torchvision's; the weights
    start as ``o["init"]`` says (:data:`RESNET_INITS`; norms at weight 1, bias 0 either way).
    """
    from torchvision.models.resnet import BasicBlock, ResNet

    norm_layer = _norm_layer(o["norm"])
    if norm_layer is None:
        raise TeslaError("resnet18 needs a norm: choose 'instancenorm' or 'batchnorm'")
    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, norm_layer=norm_layer)
    model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            if o["init"] == "torchvision":
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            else:
                module.reset_parameters()
    return model


def _halvings(resolution: int, times: int) -> int:
    """Spatial size after ``times`` stride-2 / ceil-mode 2x2 poolings: ceil(R / 2) repeatedly."""
    for _ in range(times):
        resolution = (resolution + 1) // 2
    return resolution


def _resnet_resolution_problem(resolution: int, options: Mapping[str, Any]) -> str | None:
    # instance norm over a 1 x 1 map outputs its bias only: the last stage needs >= 2 x 2
    if options["norm"] == "instancenorm" and _halvings(resolution, 3) < 2:
        return (
            f"its last stage would be {_halvings(resolution, 3)} x {_halvings(resolution, 3)} and instance norm "
            f"over one pixel erases the signal; use at least 9 px or norm='batchnorm'"
        )
    return None


# --------------------------------------------------------------------------------------
# VGG-11
# --------------------------------------------------------------------------------------
VGG11_CONFIG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """VGG for small inputs: [conv3x3 -> norm -> ReLU | max-pool 2x2] per config -> linear.

    Max-pools use ceil mode, so 28 px inputs (MNIST) pool 28-14-7-4-2-1 and 32 px pool down
    to 1 x 1; larger inputs (64 px: 2 x 2) are averaged to 1 x 1 before the linear head
    (512 -> K).  Convolutions have a bias only when there is no norm after them.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        config: Sequence[int | str] = VGG11_CONFIG,
        norm: str = "instancenorm",
    ) -> None:
        super().__init__()
        from torchvision.ops.misc import Conv2dNormActivation

        norm_layer = _norm_layer(norm)
        layers: list[nn.Module] = []
        c_in = channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers.append(Conv2dNormActivation(c_in, int(item), 3, norm_layer=norm_layer, inplace=False))
                c_in = int(item)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def _build_vgg11(channels: int, num_classes: int, resolution: int, **o: Any) -> nn.Module:
    return VGG(channels, num_classes, VGG11_CONFIG, norm=o["norm"])


def _vgg_resolution_problem(resolution: int, options: Mapping[str, Any]) -> str | None:
    # the last two convolutions run after four poolings; instance norm needs >= 2 x 2 there
    last = _halvings(resolution, 4)
    if options["norm"] == "instancenorm" and last < 2:
        return (
            f"its last convolutions would see {last} x {last} maps and instance norm over one pixel "
            f"erases the signal; use at least 17 px or norm='batchnorm'"
        )
    return None


# --------------------------------------------------------------------------------------
# AlexNet (small-input variant)
# --------------------------------------------------------------------------------------
def alexnet_features(
    channels: int, widths: Sequence[int], first_padding: int, ceil_mode: bool
) -> nn.Sequential:
    """AlexNet's feature stack for small inputs: conv5x5 -> ReLU -> max-pool 2x2, conv5x5 ->
    ReLU -> max-pool, three conv3x3 -> ReLU, max-pool; stride 1, later convolutions
    size-preserving (padding 2 for 5x5, 1 for 3x3); ``widths`` are the five output widths."""
    kernels = (5, 5, 3, 3, 3)
    layers: list[nn.Module] = []
    c_in = channels
    for i, (width, k) in enumerate(zip(widths, kernels)):
        layers += [nn.Conv2d(c_in, width, kernel_size=k, padding=first_padding if i == 0 else (k - 1) // 2), nn.ReLU()]
        if i in (0, 1, 4):
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=ceil_mode))
        c_in = width
    return nn.Sequential(*layers)


class AlexNet(nn.Module):
    """AlexNet for small inputs.

    torchvision's AlexNet feature widths (64, 192, 384, 256, 256) with a 5x5 stride-1 first
    convolution instead of 11x11 stride 4, max-pool 2x2 (ceil mode) after convolutions 1, 2
    and 5, an adaptive average pool to 4 x 4 (the natural size at 32 px) and one linear
    layer (256*16 -> K) instead of the two 4096-wide dropout layers made for 224 px.
    No dropout, so the functional forward is deterministic.
    """

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = alexnet_features(channels, (64, 192, 384, 256, 256), first_padding=2, ceil_mode=True)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.classifier = nn.Linear(256 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def _build_alexnet(channels: int, num_classes: int, resolution: int, **o: Any) -> nn.Module:
    return AlexNet(channels, num_classes)


def _alexnet_resolution_problem(resolution: int, options: Mapping[str, Any]) -> str | None:
    return None  # no norm; ceil-mode pooling and the adaptive pool take any size


#: MTT's AlexNet: the first convolution's padding per input size, so that it outputs 32 x 32
ALEXNET_MTT_PADDING: dict[int, int] = {32: 2, 28: 4}


class AlexNetMTT(nn.Module):
    """The AlexNet of MTT's cross-architecture evaluation (PAPER.md section 10)::

        conv5x5(C -> 128, pad p) -> ReLU -> max-pool 2x2
        conv5x5(128 -> 192, pad 2) -> ReLU -> max-pool 2x2
        conv3x3(192 -> 256, pad 1) -> ReLU
        conv3x3(256 -> 192, pad 1) -> ReLU
        conv3x3(192 -> 192, pad 1) -> ReLU -> max-pool 2x2
        linear(192 * 4 * 4 -> K)

    Given by PAPER.md: the widths 128-192-256-192-192, a 5x5 first convolution and a
    192 x 4 x 4 classifier input. Derived: 4 x 4 from 32 px is three halvings, so three
    2x2 max-pools placed as in AlexNet (after convolutions 1, 2 and 5) and every
    convolution size-preserving (stride 1, padding (k - 1)/2); the later kernel sizes follow
    AlexNet's 5-3-3-3 after the first. At 28 px (MNIST) the first convolution pads by 4, so
    its output is 32 x 32 and the rest is the same network (p = 2 at 32 px). Other sizes
    cannot reach the fixed 4 x 4 and are refused (``alexnet`` adapts to any size). No norm
    and no dropout. (The published code picks padding 4 by channel count, 1 channel, rather
    than by size; on MNIST and CIFAR the two rules build the same networks.)
    """

    def __init__(self, channels: int, num_classes: int, resolution: int) -> None:
        super().__init__()
        self.features = alexnet_features(
            channels, (128, 192, 256, 192, 192), first_padding=ALEXNET_MTT_PADDING[resolution], ceil_mode=False
        )
        self.classifier = nn.Linear(192 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _build_alexnet_mtt(channels: int, num_classes: int, resolution: int, **o: Any) -> nn.Module:
    return AlexNetMTT(channels, num_classes, resolution)


def _alexnet_mtt_resolution_problem(resolution: int, options: Mapping[str, Any]) -> str | None:
    if resolution in ALEXNET_MTT_PADDING:
        return None
    return (
        "MTT's AlexNet has a fixed 192 x 4 x 4 classifier input, which it reaches from 32 px (28 px inputs are "
        "padded to 32 by its first convolution); use 'alexnet', which adapts to any size"
    )


# --------------------------------------------------------------------------------------
# ViT (torchvision VisionTransformer)
# --------------------------------------------------------------------------------------
def _math_attention():
    """Context selecting the composite ("math") scaled-dot-product attention kernel."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False)
    return sdpa_kernel([SDPBackend.MATH])


@functools.lru_cache(maxsize=None)
def _vit_class() -> type:
    """The ViT class, created on first use so that importing tesla.models does not import
    torchvision (seconds); reachable as ``tesla.models.ViT`` (so models pickle)."""
    from torchvision.models.vision_transformer import VisionTransformer

    class ViT(VisionTransformer):
        """torchvision's VisionTransformer whose attention can run on the composite kernel.

        ``attention='math'`` (default) computes softmax(QK^T/sqrt(d))V with ordinary
        differentiable operations, so second derivatives exist (the exact matching engine
        needs Hessian-vector products); the fused CPU/GPU kernels ('fused') are faster but
        only differentiable once.
        """

        attention: str = "math"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.attention == "math":
                with _math_attention():
                    return super().forward(x)
            return super().forward(x)

    ViT.__module__ = __name__
    ViT.__qualname__ = "ViT"
    return ViT


def __getattr__(name: str) -> Any:  # PEP 562: lazy module attribute
    if name == "ViT":
        return _vit_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build_vit(channels: int, num_classes: int, resolution: int, **o: Any) -> nn.Module:
    """torchvision's VisionTransformer (pre-norm encoder, class token, learned positions).

    The patch embedding is replaced by a C-channel convolution (kernel = stride = patch),
    initialised like torchvision's (truncated normal, std sqrt(1/fan_in), zero bias).
    Dropout 0.  Tokens: (R/patch)^2 patches + 1 class token.
    """
    patch, dim = int(o["patch_size"]), int(o["dim"])
    model = _vit_class()(
        image_size=resolution,
        patch_size=patch,
        num_layers=int(o["depth"]),
        num_heads=int(o["heads"]),
        hidden_dim=dim,
        mlp_dim=int(o["mlp_dim"]),
        dropout=0.0,
        attention_dropout=0.0,
        num_classes=num_classes,
    )
    model.attention = o["attention"]
    proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
    nn.init.trunc_normal_(proj.weight, std=math.sqrt(1.0 / (channels * patch * patch)))
    nn.init.zeros_(proj.bias)
    model.conv_proj = proj
    return model


def _vit_resolution_problem(resolution: int, options: Mapping[str, Any]) -> str | None:
    patch = int(options["patch_size"])
    if resolution % patch != 0:
        return f"vit cuts the image into {patch} x {patch} patches, so the resolution must be a multiple of {patch} (got {resolution})"
    if int(options["dim"]) % int(options["heads"]) != 0:
        return f"vit: dim {options['dim']} is not divisible by heads {options['heads']}"
    return None


# --------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture: its builder, default options and resolution rule."""

    builder: Callable[..., nn.Module]
    defaults: dict[str, Any]
    resolution_problem: Callable[[int, Mapping[str, Any]], str | None]
    resolutions: str
    description: str
    choices: dict[str, tuple] = field(default_factory=dict)
    #: bumped when the same name builds another network (other results): the workflow reruns
    #: the jobs that train it (:func:`model_version`)
    version: int = 1


def _convnet_entry(depth: int) -> ModelEntry:
    return ModelEntry(
        _build_convnet,
        dict(depth=depth, width=128, norm="instancenorm", pooling="avgpool"),
        _convnet_resolution_problem,
        f"at least {2 ** depth} px with pooling (any with pooling='none')",
        f"ConvNet-{depth}: {depth} x [conv3x3(width) -> norm -> ReLU -> pool] -> linear",
        dict(norm=NORMS, pooling=POOLINGS),
    )


_REGISTRY: dict[str, ModelEntry] = {
    "convnet": _convnet_entry(3),
    **{f"convnet_d{d}": _convnet_entry(d) for d in range(1, 6)},
    **{
        name: ModelEntry(
            _build_resnet18, dict(norm=norm, init=init), _resnet_resolution_problem, sizes,
            f"ResNet-18 (torchvision BasicBlocks), {label}, 3x3 stem, {init} initialisation",
            dict(norm=("instancenorm", "batchnorm"), init=RESNET_INITS), version,
        )
        # version 2 of resnet18 / resnet18_bn: PyTorch's default initialisation (the published
        # network); version 1 had torchvision's, kept as resnet18_tv / resnet18_bn_tv
        for name, norm, init, sizes, label, version in (
            ("resnet18", "instancenorm", "torch-default", "at least 9 px", "instance norm", 2),
            ("resnet18_bn", "batchnorm", "torch-default", "any size", "batch norm", 2),
            ("resnet18_tv", "instancenorm", "torchvision", "at least 9 px", "instance norm", 1),
            ("resnet18_bn_tv", "batchnorm", "torchvision", "any size", "batch norm", 1),
        )
    },
    "vgg11": ModelEntry(
        _build_vgg11, dict(norm="instancenorm"), _vgg_resolution_problem, "at least 17 px",
        "VGG-11, instance norm", dict(norm=NORMS),
    ),
    "vgg11_bn": ModelEntry(
        _build_vgg11, dict(norm="batchnorm"), _vgg_resolution_problem, "any size",
        "VGG-11, batch norm", dict(norm=NORMS),
    ),
    "alexnet": ModelEntry(
        _build_alexnet, dict(), _alexnet_resolution_problem, "any size", "AlexNet for small inputs",
    ),
    "alexnet_mtt": ModelEntry(
        _build_alexnet_mtt, dict(), _alexnet_mtt_resolution_problem, "28 or 32 px",
        "MTT's AlexNet: widths 128-192-256-192-192, 192 x 4 x 4 into the classifier",
    ),
    "vit": ModelEntry(
        _build_vit, dict(patch_size=4, dim=512, depth=6, heads=8, mlp_dim=512, attention="math"),
        _vit_resolution_problem, "multiples of the patch size (4)", "ViT: patch 4, dim 512, depth 6, heads 8, MLP 512",
        dict(attention=("math", "fused")),
    ),
}


def available_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def model_version(name: str) -> int:
    """The version of the network a registered name builds (1 for a name unknown here: the
    workflow's own checks name those)."""
    return _REGISTRY[name].version if name in _REGISTRY else 1


def _entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise TeslaError(f"unknown model {name!r}; valid names: {', '.join(available_models())}") from None


def _resolve_options(name: str, entry: ModelEntry, options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(entry.defaults))
    if unknown:
        allowed = ", ".join(sorted(entry.defaults)) or "none"
        raise TeslaError(f"model {name!r} has no option {', '.join(map(repr, unknown))}; its options: {allowed}")
    resolved = {**entry.defaults, **options}
    for key, valid in entry.choices.items():
        if resolved[key] not in valid:
            raise TeslaError(f"model {name!r}: {key}={resolved[key]!r} is not one of {', '.join(valid)}")
    for key, default in entry.defaults.items():
        if isinstance(default, int) and not isinstance(default, bool):
            value = resolved[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TeslaError(f"model {name!r}: {key} must be a positive integer, got {value!r}")
    return resolved


def _check_shape(name: str, channels: int, num_classes: int, resolution: int) -> None:
    for label, value in (("channels", channels), ("num_classes", num_classes), ("resolution", resolution)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TeslaError(f"model {name!r}: {label} must be a positive integer, got {value!r}")


def supports_resolution(name: str, resolution: int, **options: Any) -> bool:
    """Whether ``name`` (with ``options``) can take square inputs of ``resolution`` px."""
    entry = _entry(name)
    return entry.resolution_problem(int(resolution), _resolve_options(name, entry, options)) is None


def build_model(name: str, *, channels: int, num_classes: int, resolution: int, **options: Any) -> nn.Module:
    """Build the network ``name`` for ``channels`` x ``resolution`` x ``resolution`` inputs.

    Raises :class:`TeslaError` for an unknown name (listing the valid ones), an unknown or
    invalid option, or a resolution the architecture cannot take (saying which work).
    """
    entry = _entry(name)
    _check_shape(name, channels, num_classes, resolution)
    resolved = _resolve_options(name, entry, options)
    problem = entry.resolution_problem(resolution, resolved)
    if problem is not None:
        raise TeslaError(f"model {name!r} cannot take {resolution} x {resolution} inputs: {problem} (works: {entry.resolutions})")
    return entry.builder(channels, num_classes, resolution, **resolved)


def model_spec(name: str, *, channels: int, num_classes: int, resolution: int, **options: Any) -> dict[str, Any]:
    """Everything needed to rebuild the network, JSON-serialisable, options resolved.

    ``{"format": "tesla-model-spec", "format_version": 1, "name", "channels",
    "num_classes", "resolution", "options": {...all options with defaults filled in...}}``
    """
    entry = _entry(name)
    _check_shape(name, channels, num_classes, resolution)
    resolved = _resolve_options(name, entry, options)
    spec = dict(
        format=SPEC_FORMAT,
        format_version=SPEC_VERSION,
        name=name,
        channels=int(channels),
        num_classes=int(num_classes),
        resolution=int(resolution),
        options=resolved,
    )
    json.dumps(spec)  # fail here, not when a file is written, if an option is not JSON
    return spec


def build_from_spec(spec: Mapping[str, Any] | str) -> nn.Module:
    """Rebuild a network from :func:`model_spec`'s dict (or its JSON text)."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise TeslaError(f"model spec is not valid JSON ({exc})") from None
    if not isinstance(spec, Mapping):
        raise TeslaError(f"model spec must be a dict, got {type(spec).__name__}")
    missing = [k for k in ("name", "channels", "num_classes", "resolution") if k not in spec]
    if missing:
        raise TeslaError(f"model spec lacks {', '.join(missing)}; it must come from tesla.models.model_spec")
    version = int(spec.get("format_version", SPEC_VERSION))
    if version != SPEC_VERSION:
        raise TeslaError(f"model spec format version {version}; this tesla reads version {SPEC_VERSION}")
    return build_model(
        spec["name"],
        channels=int(spec["channels"]),
        num_classes=int(spec["num_classes"]),
        resolution=int(spec["resolution"]),
        **_options_as_written(spec),
    )


def _options_as_written(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A spec's options, with what an option added later meant when the spec was written:
    a ResNet-18 spec without ``init`` comes from before the option, when every ResNet-18
    started with torchvision's initialisation."""
    options = dict(spec.get("options", {}))
    if str(spec["name"]).startswith("resnet18"):
        options.setdefault("init", "torchvision")
    return options


def architecture_label(spec: dict) -> str:
    """The name recorded in the tables: the registry name, plus every option that differs
    from that name's defaults, e.g. ``convnet_d4`` or ``convnet(width=64)``."""
    name = str(spec["name"])
    defaults = model_spec(
        name, channels=int(spec["channels"]), num_classes=int(spec["num_classes"]), resolution=int(spec["resolution"])
    )["options"]
    changed = {k: v for k, v in dict(spec.get("options", {})).items() if defaults.get(k) != v}
    if not changed:
        return name
    return f"{name}(" + ",".join(f"{k}={changed[k]}" for k in sorted(changed)) + ")"
