"""The embedded demo dataset: scikit-learn's handwritten digits (no download).

1,797 greyscale 8 x 8 images of the digits 0..9 (UCI "optical recognition of handwritten
digits"; each pixel counts the set pixels of a 4 x 4 block, 0..16). Pixels are scaled to
uint8 by u = round(v * 255 / 16). Fixed split: in every class, a permutation drawn from
``numpy.random.default_rng(DEMO_SEED)`` puts round(0.2 * n_c) images in test, the rest in
train (1,438 train / 359 test images), each split in the original order within its class.
"""

from __future__ import annotations

import numpy as np

from tesla.data.sources.base import ArraySplit, DatasetPlan, SourceOptions
from tesla.data.sources.registry import DataSource

DEMO_SEED = 0
DEMO_TEST_FRACTION = 0.2
DEMO_CLASSES = 10


def demo_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as (uint8 N x 8 x 8 x 1, int64 labels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int64)


def demo_split(labels: np.ndarray) -> np.ndarray:
    """Boolean mask of the test images: round(0.2 n_c) per class by a seeded permutation."""
    rng = np.random.default_rng(DEMO_SEED)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(round(DEMO_TEST_FRACTION * len(idx)))
        test[np.sort(rng.permutation(idx)[:k])] = True
    return test


def plan_demo(opts: SourceOptions, name: str | None = None) -> DatasetPlan:
    images, labels = demo_digits()
    test = demo_split(labels)
    attrs = {"split_seed": DEMO_SEED, "test_fraction": DEMO_TEST_FRACTION}
    return DatasetPlan(
        source="demo",
        name=name or "demo",
        class_ids=[str(d) for d in range(DEMO_CLASSES)],
        class_names=[str(d) for d in range(DEMO_CLASSES)],
        channels=1,
        default_resolution=8,
        train=ArraySplit("train", images[~test], labels[~test], "sklearn.datasets.load_digits", attrs=dict(attrs)),
        test=ArraySplit("test", images[test], labels[test], "sklearn.datasets.load_digits", attrs=dict(attrs)),
        attrs={"input": "sklearn.datasets.load_digits"},
        class_order="official label order",
    )


SOURCES = (
    DataSource("demo", "scikit-learn's handwritten digits, no input", plan_demo, notes={"resolution": "8"}, num_classes=DEMO_CLASSES),
)
