"""What a source hands to ``tesla prepare``: the classes and, per split, the images in class order.

A source never decodes JPEGs itself. It returns a :class:`DatasetPlan` whose splits are
either

* :class:`EncodedSplit`: per class, the list of encoded images (:class:`ImageRef`: a file,
  or a byte range in an uncompressed tar), possibly listed only when that class is reached
  (the inner tars of ``ILSVRC2012_img_train.tar``), decoded later in a worker pool; or
* :class:`ArraySplit`: pixels already decoded (MNIST, CIFAR, the demo digits: at most a
  few hundred MB), sorted by class; or
* a :class:`StreamedSplit`: images that arrive in file order, not class order (Downsampled
  ImageNet batches, parquet row groups), delivered as :class:`LabelledBlock` and sorted into
  class order by ``tesla prepare``.

Every split says how many images each class holds before anything is decoded, where that is
known (:meth:`class_counts`), so that an empty split is refused before anything is written
(:func:`empty_split_error`, the one message of every source).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import numpy as np

from tesla.data.imaging import ImageRef, LabelledBlock
from tesla.errors import TeslaError


@dataclass
class SourceOptions:
    """The settings a source's planner reads (declared in :mod:`tesla.data.sources.options`,
    see ``tesla prepare --help``); ``extra`` holds those of options a source module declares
    for itself, by key."""

    input: Path | None = None
    test_input: Path | None = None
    test_labels: Path | None = None
    synsets: Path | None = None
    channels: int | None = None
    download: bool = False
    ignore_non_images: bool = False
    test_fraction: float | None = None
    test_fraction_seed: int = 0
    image_column: str = "image"  # parquet: encoded-image column (bytes, or struct with bytes)
    label_column: str = "label"  # parquet: integer class column
    extra: dict[str, Any] = field(default_factory=dict)


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

    def class_counts(self, num_classes: int) -> list[int | None]:
        """Images per class; None for a class tar not listed yet (it holds at least one file)."""
        return [None if c.refs is None else len(c.refs) for c in self.classes]

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
    ignored: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        order = np.argsort(self.labels, kind="stable")
        if np.any(order != np.arange(len(order))):
            self.images = self.images[order]
            self.labels = self.labels[order]
        if self.images.ndim == 3:
            self.images = self.images[..., None]

    def class_counts(self, num_classes: int) -> list[int | None]:
        """Images per class."""
        return np.bincount(self.labels, minlength=num_classes).tolist()


@dataclass
class StreamedSplit(ABC):
    """A split whose images arrive in any class order, block by block (:meth:`blocks`), and
    are sorted into class order by ``tesla prepare`` through a temporary file. Subclasses are
    dataclasses that add their own fields after ``split`` and ``source_path``; ``notes``,
    ``attrs`` and ``ignored`` are given by keyword."""

    split: str
    source_path: str
    notes: list[str] = field(default_factory=list, kw_only=True)
    attrs: dict = field(default_factory=dict, kw_only=True)
    ignored: list[str] = field(default_factory=list, kw_only=True)
    #: the blocks are decoded from encoded images (the resize filter and JPEG decoding are recorded)
    encoded: ClassVar[bool] = True

    @abstractmethod
    def blocks(self, pool, resolution: int, rule: str, mode: str, reduced: bool) -> Iterator[LabelledBlock]:
        """The split's images at ``resolution`` in ``mode``, in any class order (``pool``: a
        :class:`tesla.data.pool.WorkerPool` for the decoding or resizing)."""

    @abstractmethod
    def estimated_total(self) -> int:
        """Images in the split, as far as known (for progress bars)."""

    def class_counts(self, num_classes: int) -> list[int | None] | None:
        """Images per class, or None when known only once the split is read."""
        return None

    def native_resolution(self) -> int | None:
        """The side S of the stored images when they are stored decoded at one size, else None."""
        return None

    def resize_rule(self, resolution: int, rule: str) -> str:
        """The rule the output records: ``none`` at the native size, else ``rule``."""
        return "none" if resolution == self.native_resolution() else rule


Split = EncodedSplit | ArraySplit | StreamedSplit


@dataclass
class DatasetPlan:
    """Everything ``tesla prepare`` needs from a source."""

    source: str
    name: str
    class_ids: list[str]
    class_names: list[str]
    channels: int
    default_resolution: int
    train: Split
    test: Split
    attrs: dict = field(default_factory=dict)
    #: how class indices were assigned (stored as the files' ``class_order`` attribute)
    class_order: str = "sorted class ids"

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"


def empty_split_error(split: str, where: str, why: str = "") -> TeslaError:
    """The error of every source for a split that would hold no image."""
    if split == "train":
        fix = "give training data with images of every class"
    else:
        fix = (
            "give a test split that holds images (or, with a source that takes it, hold out part of train with "
            "--test-fraction: a class needs two images or more to give one)"
        )
    because = f" ({why})" if why else ""
    return TeslaError(f"{where}: the {split} split has no images{because}; nothing was written: {fix}")


def empty_class_error(classes: list[str], where: str) -> TeslaError:
    """The error of every source for train classes that would hold no image."""
    more = f" (and {len(classes) - 1} more)" if len(classes) > 1 else ""
    return TeslaError(
        f"{where}: class {classes[0]!r}{more} has no images in the train split; nothing was written: "
        "give images of every class, or remove the class"
    )


def single_class_error(classes: list[str], where: str) -> TeslaError:
    """The error of every source for a train split with images of fewer than two classes."""
    what = f"images of one class only ({classes[0]!r})" if classes else "no class"
    return TeslaError(
        f"{where}: the train split has {what}; a classifier needs at least 2 classes (trained on one, it "
        "reaches loss 0 and 100 % without learning anything); nothing was written: give the images of two "
        "classes or more (for a class-folder tree: one folder per class)"
    )


def refuse_empty_splits(plan: DatasetPlan) -> None:
    """Before anything is decoded: at least two classes; no split may be empty, no train class
    may be empty, as far as the split knows its counts (see :meth:`EncodedSplit.class_counts`)."""
    if len(plan.class_ids) < 2:
        raise single_class_error(plan.class_ids, plan.train.source_path)
    for split in (plan.train, plan.test):
        counts = split.class_counts(len(plan.class_ids))
        if counts is None:
            continue  # a streamed split: checked once it is read
        if all(c == 0 for c in counts):
            raise empty_split_error(split.split, split.source_path)
        if split.split == "train":
            empty = [cls for cls, c in zip(plan.class_ids, counts) if c == 0]
            if empty:
                raise empty_class_error(empty, split.source_path)
