"""The DSA augmentation of a student step as *data*, for the traced step graphs
(:mod:`tesla.step_compiler`).

A traced graph has fixed shapes, so it takes the augmentation as *data*: the step's family
index k (a 0-d tensor, -1 for none) and every family's parameters packed in one B x K float64
matrix (:func:`pack_augmentation`), and applies A(x) = A_k(x) by selection among the families
of the strategy (:func:`apply_packed`). The selected value is the one ``DSA.apply`` computes
(same operations on the same parameters); the branches not taken contribute exact zeros to the
gradient. So one graph serves every family: a run builds one ``update`` graph and one
``adjoint`` graph per minibatch size (two sizes at most: see
:func:`tesla.matching.plan_student_steps`), i.e. 2 graphs when ``batch_syn`` divides the number
of synthetic images and 4 otherwise, whatever the DSA strategy; the cost is computing the other
families' (cheap, elementwise and resampling) transforms too.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from tesla.augment import DSA, AugParams
from tesla.errors import TeslaError

__all__ = ["PACKED_FIELDS", "apply_packed", "pack_augmentation", "packed_width"]

#: each family's parameters, in packed column order, with a finite placeholder for the steps
#: that drew another family (its value never reaches the output: the family is not selected)
PACKED_FIELDS: dict[str, tuple[tuple[str, float], ...]] = {
    "color": (("brightness", 0.0), ("saturation", 1.0), ("contrast", 1.0)),
    "crop": (("dy", 0.0), ("dx", 0.0)),
    "cutout": (("cy", -1.0), ("cx", -1.0)),
    "flip": (("flip", 0.0),),
    "scale": (("sx", 1.0), ("sy", 1.0)),
    "rotate": (("degrees", 0.0),),
}
_INTEGER_FIELDS = frozenset({"dy", "dx", "cy", "cx"})
_BOOLEAN_FIELDS = frozenset({"flip"})


def _columns(families: Sequence[str]) -> dict[str, slice]:
    """Where each family's fields sit in a packed row."""
    out, start = {}, 0
    for name in families:
        width = len(PACKED_FIELDS[name])
        out[name] = slice(start, start + width)
        start += width
    return out


def packed_width(families: Sequence[str]) -> int:
    return sum(len(PACKED_FIELDS[name]) for name in families)


def _placeholders(families: Sequence[str]) -> torch.Tensor:
    """The packed row of a step that drew no family: every field's placeholder."""
    return torch.tensor([value for name in families for _, value in PACKED_FIELDS[name]], dtype=torch.float64)


def pack_augmentation(params: Any | None, families: Sequence[str], batch: int) -> tuple[int, torch.Tensor]:
    """(k, P): the index k in ``families`` of the family a step drew (-1: no augmentation) and
    the B x K float64 matrix holding its sampled parameters (placeholders for the others).

    Integer and boolean parameters are exact in float64 (|value| < 2^53)."""
    packed = _placeholders(families).expand(batch, -1).clone()
    chosen = tuple(getattr(params, "families", ()) or ()) if params is not None else ()
    if not chosen:
        return -1, packed
    if len(chosen) != 1 or chosen[0] not in families:
        raise TeslaError(
            f"a compiled student step applies one DSA family of {tuple(families)} per step; this step's "
            f"augmentation applies {chosen} (use DSA(single_family=True), or compile mode 'off')"
        )
    name = chosen[0]
    values = [torch.broadcast_to(params.values[name][key].to(torch.float64), (batch,)) for key, _ in PACKED_FIELDS[name]]
    packed[:, _columns(families)[name]] = torch.stack(values, dim=1)
    return families.index(name), packed


def _unpack(packed: torch.Tensor, name: str, cols: slice) -> dict[str, torch.Tensor]:
    values = {}
    for j, (key, _) in zip(range(cols.start, cols.stop), PACKED_FIELDS[name]):
        column = packed[:, j]
        if key in _INTEGER_FIELDS:
            column = column.to(torch.int64)
        elif key in _BOOLEAN_FIELDS:
            column = column > 0.5
        values[key] = column
    return values


def apply_packed(x: torch.Tensor, family: torch.Tensor, packed: torch.Tensor, dsa: DSA) -> torch.Tensor:
    """A(x) = A_k(x) for k = ``family`` (a 0-d integer tensor), x itself for k = -1:
    where(k == 0, A_0(x), where(k == 1, A_1(x), ... x)) with A_j = family j of the strategy,
    applied by ``dsa.apply`` with its columns of ``packed``."""
    out = x
    for k, (name, cols) in enumerate(_columns(dsa.families).items()):
        params = AugParams(tuple(x.shape), (name,), {name: _unpack(packed, name, cols)})
        out = torch.where(family == k, dsa.apply(x, params), out)
    return out
