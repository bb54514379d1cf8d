"""The networks themselves (torch modules) and their builders, one per architecture family,
which the registry of :mod:`tesla.models` names (``tesla.networks:build_convnet``, ...): build
networks with :func:`tesla.models.build_model`, which checks the name, options and size first.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from tesla.errors import TeslaError
from tesla.models import ALEXNET_MTT_PADDING, NORMS, POOLINGS

__all__ = [
    "AlexNet",
    "AlexNetMTT",
    "ConvNet",
    "VGG",
    "build_alexnet",
    "build_alexnet_mtt",
    "build_convnet",
    "build_resnet18",
    "build_vgg11",
    "build_vit",
]


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


def build_convnet(channels: int, num_classes: int, resolution: int, **o: Any) -> nn.Module:
    return ConvNet(channels, num_classes, resolution, depth=o["depth"], width=o["width"], norm=o["norm"], pooling=o["pooling"])


def build_resnet18(channels: int, num_classes: int, resolution: int, **o: Any) -> nn.Module:
    """torchvision ResNet-18 adapted to small inputs.

    The 7x7 stride-2 stem and the max-pool (made for 224 px) are replaced by a 3x3
    stride-1 convolution and nothing, at every resolution: 32 px inputs reach the last
    stage at 4 x 4, 64 px at 8 x 8, 28 px at 4 x 4, 8 px at 1 x 1; the adaptive average
    pool makes the head independent of R.  The rest (BasicBlock x [2, 2, 2, 2], widths
    64..512, strides 1, 2, 2, 2, 1x1 projection shortcuts) is torchvision's; the weights
    start as ``o["init"]`` says (:data:`tesla.models.RESNET_INITS`; norms at weight 1, bias 0 either way).
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


def build_vgg11(channels: int, num_classes: int, resolution: int, **o: Any) -> nn.Module:
    return VGG(channels, num_classes, VGG11_CONFIG, norm=o["norm"])


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


def build_alexnet(channels: int, num_classes: int, resolution: int, **o: Any) -> nn.Module:
    return AlexNet(channels, num_classes)


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


def build_alexnet_mtt(channels: int, num_classes: int, resolution: int, **o: Any) -> nn.Module:
    return AlexNetMTT(channels, num_classes, resolution)


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
    """The ViT class, created on first use so that importing tesla.networks does not import
    torchvision (seconds); reachable as ``tesla.networks.ViT`` (so models pickle)."""
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


def build_vit(channels: int, num_classes: int, resolution: int, **o: Any) -> nn.Module:
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
