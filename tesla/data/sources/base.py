"""What a source hands to ``tesla prepare``: the classes and, per split, the images in class order.

A source never decodes JPEGs itself. It returns a :class:`DatasetPlan` whose splits are
either

* :class:`EncodedSplit`: per class, the list of encoded images (:class:`ImageRef`: a file,
  or a byte range in an uncompressed tar), possibly listed only when that class is reached
  (the inner tars of ``ILSVRC2012_img_train.tar``), decoded later in a worker pool; or
* :class:`ArraySplit`: pixels already decoded (MNIST, CIFAR, the demo digits: at most a
  few hundred MB), sorted by class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from tesla.data.imaging import ImageRef


@dataclass
class SourceOptions:
    """The command-line settings a source reads (see ``tesla prepare --help``)."""

    input: Path | None = None
    test_input: Path | None = None
    test_labels: Path | None = None
    synsets: Path | None = None
    channels: int | None = None
    download: bool = False
    ignore_non_images: bool = False
    test_fraction: float | None = None
    seed: int = 0
    image_column: str = "image"  # parquet: encoded-image column (bytes, or struct with bytes)
    label_column: str = "label"  # parquet: integer class column


@dataclass
class ClassFiles:
    """The encoded images of one class in one split, listed now or on first use."""

    index: int
    refs: list[ImageRef] | None = None
    lister: Callable[[], list[ImageRef]] | None = None
    nbytes: int = 0

    def list(self) -> list[ImageRef]:
        if self.refs is None:
            assert self.lister is not None
            self.refs = self.lister()
            self.lister = None
        return self.refs

    @property
    def listed(self) -> bool:
        return self.refs is not None


@dataclass
class EncodedSplit:
    """A split of encoded image files, class by class (``classes[c].index == c``)."""

    split: str
    classes: list[ClassFiles]
    source_path: str
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)

    def estimated_total(self, bytes_per_image: float | None = None) -> int:
        """Images in the split: exact once every class is listed, else estimated from byte sizes."""
        known = sum(len(c.refs) for c in self.classes if c.refs is not None)
        unlisted = sum(c.nbytes for c in self.classes if c.refs is None)
        if unlisted == 0:
            return known
        per = bytes_per_image or 110_000.0  # a typical ImageNet JPEG until measured
        return known + int(round(unlisted / per))


@dataclass
class ArraySplit:
    """A split already decoded: uint8 N x H x W x C pixels sorted by (non-decreasing) label."""

    split: str
    images: np.ndarray
    labels: np.ndarray
    source_path: str
    notes: list[str] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        order = np.argsort(self.labels, kind="stable")
        if np.any(order != np.arange(len(order))):
            self.images = self.images[order]
            self.labels = self.labels[order]
        if self.images.ndim == 3:
            self.images = self.images[..., None]


@dataclass
class DatasetPlan:
    """Everything ``tesla prepare`` needs from a source."""

    source: str
    name: str
    class_ids: list[str]
    class_names: list[str]
    channels: int
    default_resolution: int
    train: EncodedSplit | ArraySplit
    test: EncodedSplit | ArraySplit
    attrs: dict = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"
