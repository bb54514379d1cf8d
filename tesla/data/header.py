"""The header of a prepared split: what a ``tesla-images`` file says about itself.

Read without touching a single image or label, so that a stage can check, before any
training, that a test split belongs to the dataset it evaluates (:func:`check_test_split`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from tesla.data.format import FORMAT_NAME, FORMAT_VERSION
from tesla.errors import TeslaError
from tesla.hdf5 import open_checked


@dataclass(frozen=True)
class SplitHeader:
    """What a split file says about itself (attributes and class ids): no pixels, no labels."""

    path: Path
    dataset: str
    split: str
    num_classes: int
    channels: int
    height: int
    width: int
    class_ids: list[str]


def read_split_header(path: str | os.PathLike) -> SplitHeader:
    """Read a ``tesla-images`` file's header only, so the test split can be checked before
    training without reading a single test image or label."""
    f, a, path = open_checked(
        path, format_name=FORMAT_NAME, format_version=FORMAT_VERSION, kind="prepared split file", producer="tesla prepare"
    )
    with f:
        ids = [s.decode() if isinstance(s, bytes) else str(s) for s in f["class_ids"][()]]
    return SplitHeader(
        path=path,
        dataset=str(a.get("dataset", "")),
        split=str(a.get("split", "")),
        num_classes=int(a["num_classes"]),
        channels=int(a["channels"]),
        height=int(a["height"]),
        width=int(a["width"]),
        class_ids=ids,
    )


class InputSpace(Protocol):
    """The images a network was trained on, as far as a test split must match them
    (e.g. :class:`tesla.evaluation.NetworkSpace`)."""

    dataset: str
    num_classes: int
    channels: int
    resolution: int
    class_ids: Sequence[str]


def check_test_split(header: SplitHeader, space: InputSpace, what: str, expected: str = "test") -> None:
    """Refuse a test split that is not the real test split of the evaluated set's dataset
    (``expected``: the split it should be, ``test`` or ``val``, the validation split)."""
    problems = []
    if space.dataset and header.dataset and header.dataset != space.dataset:
        problems.append(f"dataset {header.dataset!r} but {what} is {space.dataset!r}")
    if header.num_classes != space.num_classes:
        problems.append(f"{header.num_classes} classes but {what} has {space.num_classes}")
    elif header.class_ids != list(space.class_ids):
        problems.append(f"class ids differ from those of {what}")
    if header.channels != space.channels:
        problems.append(f"{header.channels} channels but {what} has {space.channels}")
    if (header.height, header.width) != (space.resolution, space.resolution):
        problems.append(f"{header.height}x{header.width} images but {what} is {space.resolution}x{space.resolution}")
    if problems:
        raise TeslaError(
            f"{header.path}: this {expected} split does not match {what}: " + "; ".join(problems)
            + f"; give the {expected} split prepared together with the training split of that dataset "
            + ("(--test)" if expected == "test" else "(--validation)")
        )
    if header.split and header.split != expected:
        print(f"tesla evaluate: warning: {header.path} is a {header.split!r} split, not {expected!r}", file=sys.stderr)
