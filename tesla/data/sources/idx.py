"""MNIST and Fashion-MNIST from the official idx files (``.gz`` or uncompressed).

idx layout (LeCun et al.): a big-endian header ``0x00 0x00 <type> <ndim>`` (type 0x08 =
unsigned byte), then ``ndim`` big-endian uint32 sizes, then the values. Images files are
``ndim = 3`` (N x 28 x 28, magic 2051), label files ``ndim = 1`` (N, magic 2049).
The files are looked up in ``--input`` and in the ``<Name>/raw/`` folder that
torchvision's downloader creates there.
"""

from __future__ import annotations

import gzip
import zlib
from functools import partial
from pathlib import Path

import numpy as np

from tesla.data.sources.base import ArraySplit, DatasetPlan, SourceOptions
from tesla.data.sources.download import official_input, official_plan
from tesla.data.sources.options import DOWNLOAD, INPUT
from tesla.data.sources.registry import DataSource
from tesla.errors import TeslaError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASS_NAMES = {
    "mnist": [str(d) for d in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}
TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def find_idx_file(folder: Path, stem: str, source: str) -> Path:
    """``stem`` or ``stem.gz`` (also spelled with '.' before 'idx') in ``folder`` or its torchvision raw/ folder."""
    candidates = []
    for d in (folder, folder / TORCHVISION_FOLDER[source] / "raw", folder / "raw"):
        for s in (stem, stem.replace("-idx", ".idx")):
            candidates += [d / s, d / f"{s}.gz"]
    for c in candidates:
        if c.is_file():
            return c
    raise TeslaError(
        f"{folder}: {stem}[.gz] not found (looked in {folder} and {folder / TORCHVISION_FOLDER[source] / 'raw'}); "
        f"place the four official {source} idx files there, or add --download"
    )


def read_idx(path: Path, magic: int, shape_tail: tuple[int, ...]) -> np.ndarray:
    """The uint8 array of an idx file, after checking its magic number, sizes and length."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise TeslaError(f"{path}: cannot read ({exc}); the download is damaged, fetch the file again") from None
    ndim = 1 + len(shape_tail)
    if len(raw) < 4 + 4 * ndim:
        raise TeslaError(f"{path}: only {len(raw)} bytes, too short for an idx header; fetch the file again")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        kind = "images (idx3)" if magic == IMAGES_MAGIC else "labels (idx1)"
        raise TeslaError(
            f"{path}: magic number {got} (0x{got:08x}), expected {magic} (0x{magic:08x}) for an idx {kind} file; "
            "the file is not the official one or was swapped with another"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if dims[1:] != shape_tail:
        raise TeslaError(f"{path}: sizes {dims}, expected N x {' x '.join(map(str, shape_tail))}; give the official file")
    expected = int(np.prod(dims))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != expected:
        raise TeslaError(
            f"{path}: header announces {dims[0]} items ({expected} bytes) but the file holds {data.size}; "
            "the download is truncated or damaged, fetch it again"
        )
    return data.reshape(dims)


def read_split(folder: Path, split: str, source: str) -> ArraySplit:
    images_file = find_idx_file(folder, SPLIT_FILES[split][0], source)
    labels_file = find_idx_file(folder, SPLIT_FILES[split][1], source)
    images = read_idx(images_file, IMAGES_MAGIC, (28, 28))
    labels = read_idx(labels_file, LABELS_MAGIC, ())
    if len(images) != len(labels):
        raise TeslaError(
            f"{images_file} holds {len(images)} images but {labels_file} holds {len(labels)} labels; "
            "the two files must come from the same split of the same release"
        )
    if labels.size and labels.max() > 9:
        raise TeslaError(f"{labels_file}: label {int(labels.max())} outside 0..9; give the official labels file")
    return ArraySplit(
        split=split,
        images=images[..., None].copy(),
        labels=labels.astype(np.int64),
        source_path=str(images_file),
        attrs={"images_file": str(images_file), "labels_file": str(labels_file)},
    )


def plan_idx(opts: SourceOptions, name: str | None = None, *, source: str) -> DatasetPlan:
    """MNIST / Fashion-MNIST: 28 x 28 x 1, class index = the official digit / item label."""
    folder = official_input(opts, source, give=", the folder holding the four idx files (add --download to fetch them)",
                            absent=f"give the folder holding the {source} idx files", folder_only=True)
    return official_plan(source, name, folder, [str(i) for i in range(10)], CLASS_NAMES[source], channels=1, resolution=28,
                         train=read_split(folder, "train", source), test=read_split(folder, "test", source))


_IDX_NOTES = {
    "input": "the folder holding the four official idx files (train-images-idx3-ubyte.gz, ...; also found in the "
    "MNIST/raw/ or FashionMNIST/raw/ folder torchvision's download makes there)",
    "resolution": "28",
}
SOURCES = (
    DataSource("mnist", "MNIST idx files", partial(plan_idx, source="mnist"), (INPUT, DOWNLOAD), _IDX_NOTES,
               num_classes=len(CLASS_NAMES["mnist"])),
    DataSource("fashion-mnist", "Fashion-MNIST idx files", partial(plan_idx, source="fashion-mnist"), (INPUT, DOWNLOAD), _IDX_NOTES,
               num_classes=len(CLASS_NAMES["fashion-mnist"])),
)
