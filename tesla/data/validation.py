"""The validation split: images held out of the training split to select a synthetic set.

``tesla prepare --validation-per-class k`` (config key ``validation_per_class``) writes the
training images of every class c once more, divided in two ``tesla-images`` files:
``val.h5`` holds k of them and ``train.h5`` the other n_c - k. The experts, the ZCA fit and
distillation read ``train.h5`` only, so the held-out images never shape a synthetic set; the
split's mean and std are those of the images that remain in it.

Which images, per class (the rule is fixed and documented so that it can be reproduced):
a NumPy generator ``numpy.random.default_rng(seed)`` draws, for c = 0, 1, ..., K-1 in class
order, one permutation of the class's n_c positions (``rng.permutation(n_c)``); the first k
positions of it go to the validation split. Both files keep the class order and, within a
class, the order of the images in the full split. A class needs at least k + 1 images.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from tesla.data.format import ImageSplit, SplitWriter
from tesla.errors import TeslaError

#: attributes every ``tesla-images`` file computes itself (not copied from the full split)
_COMPUTED = frozenset({
    "format", "format_version", "num_images", "num_classes", "height", "width", "channels", "mean", "std",
    "fingerprint", "num_skipped", "num_converted", "tesla_version", "dataset", "split", "source", "source_path",
    "resize_rule",
})  # fmt: skip


def validation_positions(counts: np.ndarray | list[int], per_class: int, seed: int) -> list[np.ndarray]:
    """Per class, the sorted positions (0..n_c-1 within the class) of its validation images:
    the first ``per_class`` of ``default_rng(seed).permutation(n_c)``, drawn class by class."""
    rng = np.random.default_rng(seed)
    return [np.sort(rng.permutation(int(n))[:per_class]) for n in counts]


def check_class_sizes(split: ImageSplit, per_class: int) -> None:
    """Every class must keep at least one training image."""
    counts = np.diff(split.class_offsets)
    small = [split.class_ids[c] for c in np.flatnonzero(counts <= per_class)]
    if small:
        more = f" (and {len(small) - 1} more)" if len(small) > 1 else ""
        raise TeslaError(
            f"--validation-per-class {per_class} (config key validation_per_class): class {small[0]!r}{more} of "
            f"{split.path} has only {int(counts.min())} images; hold out fewer (at most {int(counts.min()) - 1}) so "
            "that every class keeps training images"
        )


def _writer(split: ImageSplit, path: Path, name: str, per_class: int, seed: int, **extra) -> SplitWriter:
    a = split.attrs
    attrs = {k: v for k, v in a.items() if k not in _COMPUTED}
    attrs.update(validation_per_class=int(per_class), validation_seed=int(seed), **extra)
    return SplitWriter(
        path, dataset=str(a["dataset"]), split=name, class_ids=split.class_ids, class_names=split.class_names,
        height=int(a["height"]), width=int(a["width"]), channels=int(a["channels"]), source=str(a["source"]),
        source_path=str(a["source_path"]), resize_rule=str(a["resize_rule"]), attrs=attrs,
    )


def hold_out_validation(full: Path, train_out: Path, val_out: Path, per_class: int, seed: int) -> None:
    """Divide the prepared split ``full`` into ``train_out`` and ``val_out`` (see the module
    doc), class by class: only one class's pixels are in memory at a time."""
    split = ImageSplit.open(full)
    check_class_sizes(split, per_class)
    positions = validation_positions(np.diff(split.class_offsets), per_class, seed)
    with h5py.File(full, "r") as f:
        skipped = [s.decode() if isinstance(s, bytes) else str(s) for s in f["skipped"][()]]
    with _writer(split, train_out, "train", per_class, seed) as train:
        for c, held in enumerate(positions):
            images = split.class_images(c)
            train.append(np.delete(images, held, axis=0), np.full(len(images) - len(held), c, dtype=np.int64))
        for line in skipped:
            item, _, reason = line.partition("\t")
            train.note_skipped(item, reason)
        train.num_converted = int(split.attrs.get("num_converted", 0))
    held_out_of = ImageSplit.open(train_out).fingerprint  # recorded: evaluation checks the set was distilled on it
    with _writer(split, val_out, "val", per_class, seed, train_fingerprint=held_out_of) as val:
        for c, held in enumerate(positions):
            val.append(split.images_uint8(int(split.class_offsets[c]) + held), np.full(len(held), c, dtype=np.int64))
