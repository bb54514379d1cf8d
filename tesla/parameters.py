"""theta, the flat parameter vector that trajectory matching works on (PAPER.md section 2:
an expert's theta*_t and the student's theta_i are such vectors).

Trajectory matching treats a network as a function f(theta; x) of ONE vector theta.  The
order is fixed: the tensors of ``module.named_parameters()`` in that order, each flattened
row-major (``Tensor.reshape(-1)``) and concatenated::

    theta = concat_k vec(P_k),   k = 0 .. K-1 in named_parameters() order.

:class:`ParamLayout` records names, shapes and sizes, and :func:`unflatten` cuts theta
back into views; :func:`functional_forward` evaluates f(theta; x) with
``torch.func.functional_call``, so gradients flow to theta and x.  Floating-point buffers
(batch-norm running mean and variance) have their own flat vector in
``named_buffers()`` order (:func:`buffer_layout`, :func:`flatten_buffers`); integer
buffers (``num_batches_tracked``) are not part of it and stay in the module.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from tesla.errors import TeslaError

__all__ = [
    "ParamLayout",
    "buffer_layout",
    "count_params",
    "flatten_buffers",
    "flatten_params",
    "functional_forward",
    "load_flat_",
    "load_flat_buffers_",
    "param_layout",
    "unflatten",
]


def count_params(module: nn.Module) -> int:
    """Number of scalar parameters (the length of the flat vector theta)."""
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and sizes of the tensors packed into one flat vector, in order.

    Tensor k occupies ``flat[offsets[k] : offsets[k] + numels[k]]``, row-major.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, total = [], 0
        for n in self.numels:
            out.append(total)
            total += n
        return tuple(out)

    @property
    def total(self) -> int:
        return sum(self.numels)

    def __len__(self) -> int:
        return len(self.names)

    def to_json(self) -> str:
        return json.dumps({"names": list(self.names), "shapes": [list(s) for s in self.shapes], "numels": list(self.numels)})

    @classmethod
    def from_json(cls, text: str | bytes) -> "ParamLayout":
        try:
            data = json.loads(text)
            layout = cls(tuple(str(n) for n in data["names"]), tuple(tuple(int(d) for d in s) for s in data["shapes"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise TeslaError(f"parameter layout is not valid ({exc}); it must come from ParamLayout.to_json") from None
        if "numels" in data and list(layout.numels) != [int(n) for n in data["numels"]]:
            raise TeslaError("parameter layout is inconsistent: numels do not match shapes")
        return layout

    def check(self, flat: torch.Tensor, what: str = "flat parameter vector") -> None:
        if flat.ndim != 1 or flat.numel() != self.total:
            raise TeslaError(f"{what} has shape {tuple(flat.shape)}, the layout needs a 1-D vector of {self.total}")


def param_layout(module: nn.Module) -> ParamLayout:
    """Layout of ``module.named_parameters()`` (the order of theta)."""
    named = list(module.named_parameters())
    return ParamLayout(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))


def _float_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]


def buffer_layout(module: nn.Module) -> ParamLayout:
    """Layout of the floating-point buffers in ``named_buffers()`` order (e.g. BN running stats)."""
    named = _float_buffers(module)
    return ParamLayout(tuple(n for n, _ in named), tuple(tuple(b.shape) for _, b in named))


def _flatten(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None, device: Any) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0, dtype=dtype or torch.float32, device=device)
    return torch.cat([t.detach().reshape(-1).to(dtype=dtype, device=device) for t in tensors])


def flatten_params(module: nn.Module, dtype: torch.dtype | None = None, device: Any = None) -> torch.Tensor:
    """theta = concat_k vec(P_k) over ``named_parameters()``: a new, detached 1-D tensor."""
    return _flatten([p for _, p in module.named_parameters()], dtype, device)


def flatten_buffers(module: nn.Module, dtype: torch.dtype | None = None, device: Any = None) -> torch.Tensor:
    """Floating-point buffers concatenated in ``named_buffers()`` order (detached copy)."""
    return _flatten([b for _, b in _float_buffers(module)], dtype, device)


def unflatten(flat: torch.Tensor, layout: ParamLayout) -> dict[str, torch.Tensor]:
    """Cut theta into named tensors: P_k = flat[o_k : o_k + n_k].view(shape_k).

    The results are views of ``flat`` (differentiable: gradients flow back to ``flat``).
    """
    layout.check(flat)
    pieces = torch.split(flat, list(layout.numels))
    return {name: piece.view(shape) for name, piece, shape in zip(layout.names, pieces, layout.shapes)}


def functional_forward(
    module: nn.Module,
    flat: torch.Tensor,
    x: torch.Tensor,
    buffers: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    layout: ParamLayout | None = None,
) -> torch.Tensor:
    """f(theta; x): the module's forward with its parameters taken from ``flat``.

    Uses ``torch.func.functional_call``; differentiable w.r.t. ``flat`` and ``x`` (also to
    second order).  ``buffers``: ``None`` uses the module's own buffers; a 1-D tensor is
    cut with :func:`buffer_layout`; a dict maps buffer names to tensors.  In training mode
    batch norm updates the running statistics in place in whichever buffers are used.
    Pass ``layout`` (from :func:`param_layout`) to skip recomputing it in a hot loop.
    """
    tensors = unflatten(flat, layout if layout is not None else param_layout(module))
    if buffers is not None:
        if isinstance(buffers, torch.Tensor):
            tensors.update(unflatten(buffers, buffer_layout(module)))
        else:
            tensors.update(buffers)
    return functional_call(module, tensors, (x,))


def _load(named: Sequence[tuple[str, torch.Tensor]], flat: torch.Tensor, layout: ParamLayout, what: str) -> None:
    layout.check(flat, what)
    with torch.no_grad():
        for (name, target), piece in zip(named, torch.split(flat.detach(), list(layout.numels))):
            target.copy_(piece.view(target.shape))


def load_flat_(module: nn.Module, flat: torch.Tensor) -> nn.Module:
    """Copy theta into the module's parameters in place (inverse of :func:`flatten_params`)."""
    _load(list(module.named_parameters()), flat, param_layout(module), "flat parameter vector")
    return module


def load_flat_buffers_(module: nn.Module, flat: torch.Tensor) -> nn.Module:
    """Copy a flat buffer vector into the module's floating-point buffers in place."""
    _load(_float_buffers(module), flat, buffer_layout(module), "flat buffer vector")
    return module
