"""Networks by name: the registry of architectures, their specs and how they are built.

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

This module declares the names (options, the sizes each network takes, its version) without
importing torch: the workflow checks a config's networks while it builds the job graph. The
networks themselves are in :mod:`tesla.networks`; each entry names its builder there
(``module:function``), imported when a network is first built.

The flat parameter vector theta of a network (packing, unpacking, f(theta; x)) is in
:mod:`tesla.parameters`.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from tesla.errors import TeslaError

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

__all__ = [
    "ALEXNET_MTT_PADDING",
    "NORMS",
    "POOLINGS",
    "RESNET_INITS",
    "ModelEntry",
    "architecture_label",
    "available_models",
    "build_from_spec",
    "build_model",
    "model_spec",
    "model_version",
    "supports_resolution",
    "uses_batch_norm",
]

SPEC_FORMAT = "tesla-model-spec"
SPEC_VERSION = 1

NORMS = ("instancenorm", "batchnorm", "none")
POOLINGS = ("avgpool", "maxpool", "none")


# --------------------------------------------------------------------------------------
# the sizes each architecture can take
# --------------------------------------------------------------------------------------

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


#: how a ResNet-18's layers start: ``torch-default`` (every layer's own ``reset_parameters``:
#: Kaiming-uniform with a = sqrt(5) for convolutions and the linear head, i.e. std
#: 1/sqrt(3 fan_in); the published MTT/TESLA network, PAPER.md section 10) or ``torchvision``
#: (torchvision's ResNet: Kaiming-normal fan-out convolutions, std sqrt(2/fan_out), 0.5-2.5x
#: the former's)
RESNET_INITS: tuple[str, ...] = ("torch-default", "torchvision")


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


def _vgg_resolution_problem(resolution: int, options: Mapping[str, Any]) -> str | None:
    # the last two convolutions run after four poolings; instance norm needs >= 2 x 2 there
    last = _halvings(resolution, 4)
    if options["norm"] == "instancenorm" and last < 2:
        return (
            f"its last convolutions would see {last} x {last} maps and instance norm over one pixel "
            f"erases the signal; use at least 17 px or norm='batchnorm'"
        )
    return None


def _alexnet_resolution_problem(resolution: int, options: Mapping[str, Any]) -> str | None:
    return None  # no norm; ceil-mode pooling and the adaptive pool take any size


#: MTT's AlexNet: the first convolution's padding per input size, so that it outputs 32 x 32
ALEXNET_MTT_PADDING: dict[int, int] = {32: 2, 28: 4}


def _alexnet_mtt_resolution_problem(resolution: int, options: Mapping[str, Any]) -> str | None:
    if resolution in ALEXNET_MTT_PADDING:
        return None
    return (
        "MTT's AlexNet has a fixed 192 x 4 x 4 classifier input, which it reaches from 32 px (28 px inputs are "
        "padded to 32 by its first convolution); use 'alexnet', which adapts to any size"
    )


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
    """One registered architecture: where its builder is (``module:function``, imported when a
    network is built), default options and resolution rule."""

    builder: str
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
        "tesla.networks:build_convnet",
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
            "tesla.networks:build_resnet18", dict(norm=norm, init=init), _resnet_resolution_problem, sizes,
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
        "tesla.networks:build_vgg11", dict(norm="instancenorm"), _vgg_resolution_problem, "at least 17 px",
        "VGG-11, instance norm", dict(norm=NORMS),
    ),
    "vgg11_bn": ModelEntry(
        "tesla.networks:build_vgg11", dict(norm="batchnorm"), _vgg_resolution_problem, "any size",
        "VGG-11, batch norm", dict(norm=NORMS),
    ),
    "alexnet": ModelEntry(
        "tesla.networks:build_alexnet", dict(), _alexnet_resolution_problem, "any size", "AlexNet for small inputs",
    ),
    "alexnet_mtt": ModelEntry(
        "tesla.networks:build_alexnet_mtt", dict(), _alexnet_mtt_resolution_problem, "28 or 32 px",
        "MTT's AlexNet: widths 128-192-256-192-192, 192 x 4 x 4 into the classifier",
    ),
    "vit": ModelEntry(
        "tesla.networks:build_vit", dict(patch_size=4, dim=512, depth=6, heads=8, mlp_dim=512, attention="math"),
        _vit_resolution_problem, "multiples of the patch size (4)", "ViT: patch 4, dim 512, depth 6, heads 8, MLP 512",
        dict(attention=("math", "fused")),
    ),
}


def available_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def uses_batch_norm(name: str, **options: Any) -> bool:
    """Whether the network ``name`` (with ``options``) normalises by batch statistics (its
    ``norm`` option is batchnorm): the output for one image depends on the rest of its minibatch."""
    entry = _entry(name)
    return _resolve_options(name, entry, options).get("norm") == "batchnorm"


def model_version(name: str) -> int:
    """The version of the network a registered name builds (1 for a name unknown here: the
    workflow's own checks name those)."""
    return _REGISTRY[name].version if name in _REGISTRY else 1


def _entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise TeslaError(f"unknown model {name!r}; valid names: {', '.join(available_models())}") from None


def _builder(entry: ModelEntry) -> Callable[..., "nn.Module"]:
    """The function ``entry.builder`` names (``module:function``), its module imported on first use."""
    module, _, function = entry.builder.partition(":")
    return getattr(importlib.import_module(module), function)


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


def build_model(name: str, *, channels: int, num_classes: int, resolution: int, **options: Any) -> "nn.Module":
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
    return _builder(entry)(channels, num_classes, resolution, **resolved)


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


def build_from_spec(spec: Mapping[str, Any] | str) -> "nn.Module":
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
