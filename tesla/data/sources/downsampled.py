"""Downsampled ImageNet (Chrabaszcz, Loshchilov and Hutter 2017) exactly as distributed.

Files: ``train_data_batch_1`` .. ``train_data_batch_10`` (python pickles) or
``train_data_batch_N.npz`` (the ``_npz`` download), validation ``val_data`` / ``val_data.npz``.
Each holds ``data`` (N x 3 S S uint8, channel-planar: all red values row by row, then green,
then blue), ``labels`` (ILSVRC2012 devkit class ids 1..1000) and, in train batches, ``mean``
(not used: ``tesla prepare`` computes its own statistics). S is read from the row length
(3 S^2 values), never assumed.

Class order: the devkit ids are not sorted WordNet ids. With the devkit's ``meta.mat`` or a
'wnid id name' text file (``map_clsloc.txt``) given as ``--synsets``, class index = position
of the WordNet id in sorted order (the order of the ``imagenet`` source), names kept. Without
it, class c is devkit id c + 1 (``class_order = devkit-ids-unmapped`` in the files).

Memory: a split is streamed one batch at a time (a pickle must be loaded whole: ~1.5 GB at
64 px; ``np.load`` of an ``.npz`` member also reads it whole, there is no memory mapping of
zip members). Each batch is sorted by class and appended to a temporary file, which is then
read back class by class (:class:`tesla.prepare.ClassSortingStore`), so the peak is about one
batch, whatever the number of batches.

A pickle can run code when loaded by Python's own unpickler: the batches are read with
:func:`tesla.data.safe_pickle.load_official`, which builds only dicts, lists, strings, numbers
and NumPy arrays and refuses any other global, naming the file; ``.npz`` files are read with
``allow_pickle=False``.
"""

from __future__ import annotations

import glob
import math
import re
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from tesla.data.imaging import LabelledBlock, resize_block
from tesla.data.safe_pickle import load_official
from tesla.data.sources.base import DatasetPlan, SourceOptions, StreamedSplit
from tesla.data.sources.devkit import NUM_DEVKIT_IDS, class_mapping, read_devkit
from tesla.data.sources.options import INPUT, SYNSETS, TEST_INPUT
from tesla.data.sources.registry import DataSource
from tesla.errors import TeslaError

TRAIN_BATCH = re.compile(r"^train_data_batch_(\d+)(\.npz)?$")
VAL_BATCH = re.compile(r"^val_data(\.npz)?$")
#: rows of a batch handed on at a time (about 100 MB at 64 px)
ROWS_PER_BLOCK = 8192
RESIZE_ROWS = 1024


# -- finding the files ----------------------------------------------------------------------


def _has_glob(path: Path | str) -> bool:
    return any(ch in str(path) for ch in "*?[")


def _candidates(path: Path) -> list[Path]:
    """Files named by ``path``: a glob, a file, or a folder (and its sub-folders, one level)."""
    if _has_glob(path):
        return [Path(p) for p in sorted(glob.glob(str(path))) if Path(p).is_file()]
    if path.is_file():
        return [path]
    if path.is_dir():
        found = [p for p in sorted(path.iterdir()) if p.is_file()]
        subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(subdirs) <= 64:  # e.g. Imagenet64_train/ and Imagenet64_val/; a class-folder tree is not searched
            for sub in subdirs:
                found += [p for p in sorted(sub.iterdir()) if p.is_file()]
        return found
    return []


def is_downsampled_input(path: Path | str) -> bool:
    """True when ``path`` names or holds Downsampled-ImageNet train batches."""
    return any(TRAIN_BATCH.match(p.name) for p in _candidates(Path(path)))


def _train_files(path: Path) -> list[Path]:
    files = [p for p in _candidates(path) if TRAIN_BATCH.match(p.name)]
    if not files:
        raise TeslaError(
            f"{path}: no Downsampled-ImageNet train batches (train_data_batch_1 .. train_data_batch_10, "
            "or train_data_batch_N.npz) found there or one folder below; give the folder of the extracted "
            "Imagenet64_train (or 32/16) download, or the batch files"
        )
    by_number: dict[int, Path] = {}
    for p in files:
        n = int(TRAIN_BATCH.match(p.name).group(1))
        if n in by_number:
            raise TeslaError(f"{p}: train batch {n} is also at {by_number[n]}; keep one of them (pickle or .npz)")
        by_number[n] = p
    return [by_number[n] for n in sorted(by_number)]


def _test_file(opts: SourceOptions, train_files: list[Path]) -> Path:
    if opts.test_input is not None:
        path = Path(opts.test_input)
        if not path.exists() and not _has_glob(path):
            raise TeslaError(f"{path}: no such file or folder (given as --test-input); give val_data or val_data.npz")
        found = [p for p in _candidates(path) if VAL_BATCH.match(p.name)] if path.is_dir() else _candidates(path)
    else:
        folders = {p.parent for p in train_files} | ({Path(opts.input)} if Path(opts.input).is_dir() else set())
        found = sorted({p for d in folders for p in _candidates(d) if VAL_BATCH.match(p.name)})
    if len(found) != 1:
        where = opts.test_input if opts.test_input is not None else f"beside the train batches ({train_files[0].parent})"
        what = "no val_data or val_data.npz" if not found else f"{len(found)} validation files ({', '.join(map(str, found[:3]))})"
        raise TeslaError(f"{where}: {what}; give the validation batch with --test-input /path/to/val_data(.npz)")
    return found[0]


# -- reading one batch ----------------------------------------------------------------------


def load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data N x L uint8, labels N int64) of a pickle or .npz batch (the whole file is read)."""
    try:
        if path.name.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                keys = set(z.files)
                if not {"data", "labels"} <= keys:
                    raise TeslaError(f"{path}: holds {sorted(keys)}, not 'data' and 'labels'; give a Downsampled-ImageNet batch")
                data, labels = z["data"], z["labels"]
        else:
            with open(path, "rb") as f:
                obj = load_official(f, file=str(path), member=None, what="Downsampled-ImageNet", encoding="latin1")
            if not isinstance(obj, dict):
                raise TeslaError(f"{path}: expected a pickled dict, found {type(obj).__name__}; give a Downsampled-ImageNet batch")
            obj = {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}
            if not {"data", "labels"} <= set(obj):
                raise TeslaError(f"{path}: holds {sorted(map(str, obj))}, not 'data' and 'labels'; give a Downsampled-ImageNet batch")
            data, labels = obj["data"], obj["labels"]
    except TeslaError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file
        raise TeslaError(f"{path}: not a readable Downsampled-ImageNet batch ({type(exc).__name__}: {exc}); re-download it") from None
    data = np.asarray(data)
    labels = np.asarray(labels).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2:
        raise TeslaError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 N x 3*S*S; give a Downsampled-ImageNet batch")
    if len(labels) != len(data):
        raise TeslaError(f"{path}: {len(data)} images but {len(labels)} labels; the batch is damaged, re-download it")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TeslaError(f"{path}: labels are {labels.dtype}, expected integers 1..1000; give a Downsampled-ImageNet batch")
    return data, labels.astype(np.int64)


def side_of_row(row_length: int, where: Path | str) -> int:
    """S with 3 S^2 == ``row_length``, or an error naming the file."""
    s = math.isqrt(row_length // 3) if row_length % 3 == 0 else 0
    if s == 0 or 3 * s * s != row_length:
        raise TeslaError(
            f"{where}: rows of 'data' hold {row_length} values, not 3 x S x S for a whole S (e.g. 12288 for 64 x 64, "
            "3072 for 32 x 32); the file is damaged or not a Downsampled-ImageNet batch: re-download it"
        )
    return s


def _npz_rows(path: Path) -> int | None:
    """(rows of 'data') from the .npz header, without reading the pixels; None if unreadable."""
    try:
        with zipfile.ZipFile(path) as z, z.open("data.npy") as f:
            version = np.lib.format.read_magic(f)
            shape, _, _ = (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
        return int(shape[1]) if len(shape) == 2 else None
    except Exception:  # noqa: BLE001 - decided when the batch is read
        return None


# -- class order ----------------------------------------------------------------------------


@dataclass
class DevkitClasses:
    """Class ids, names and the lookup devkit id -> class index (-1: not a class)."""

    class_ids: list[str]
    class_names: list[str]
    lookup: np.ndarray
    order: str
    mapping_file: str = ""


def unmapped_classes() -> DevkitClasses:
    ids = [str(i) for i in range(1, NUM_DEVKIT_IDS + 1)]
    lookup = np.concatenate([[-1], np.arange(NUM_DEVKIT_IDS)]).astype(np.int64)
    return DevkitClasses(ids, list(ids), lookup, "devkit-ids-unmapped")


def devkit_classes(path: Path) -> DevkitClasses:
    """Classes in sorted-WordNet-id order from the devkit (``ILSVRC2012_devkit_t12.tar.gz`` as
    distributed, its folder or data/), its ``meta.mat``, or a 'wnid id name' file."""
    path = Path(path)
    if path.is_dir() or (path.is_file() and tarfile.is_tarfile(path)):
        kit = read_devkit(path)
        if kit is None:
            raise TeslaError(
                f"{path}: no devkit here (data/meta.mat beside data/ILSVRC2012_validation_ground_truth.txt), given as "
                "--synsets; give ILSVRC2012_devkit_t12.tar.gz, its extracted folder, its meta.mat or map_clsloc.txt"
            )
        by_id = kit.synsets
    elif path.is_file():
        by_id = class_mapping(path)
    else:
        raise TeslaError(f"{path}: class mapping not found (given as --synsets); give the devkit (its tar.gz or folder), "
                         "its meta.mat or map_clsloc.txt")
    rows = sorted(by_id.values())
    lookup = np.full(NUM_DEVKIT_IDS + 1, -1, dtype=np.int64)
    for c, row in enumerate(rows):
        lookup[row.ident] = c
    return DevkitClasses([r.wnid for r in rows], [r.words for r in rows], lookup, "sorted class ids", str(path))


# -- the split ------------------------------------------------------------------------------


@dataclass
class DownsampledSplit(StreamedSplit):
    """One split as a list of batch files, streamed in :meth:`blocks` (see the module doc)."""

    files: list[Path]
    classes: DevkitClasses
    #: S and the file it was read from, shared by the train and test splits of one plan
    side: dict = field(default_factory=lambda: {"side": 0, "file": None})
    encoded = False  # decoded pixels: resized only away from their native size
    _rows_read: int = 0
    _files_read: int = 0

    def native_resolution(self) -> int:
        """S of the data (from an .npz header, or by loading this split's smallest batch: val_data)."""
        if not self.side["side"]:
            first = self.side.get("probe") or min(self.files, key=lambda p: p.stat().st_size)
            row = _npz_rows(first) if first.name.endswith(".npz") else None
            if row is None:
                row = load_batch(first)[0].shape[1]
            self.side.update(side=side_of_row(row, first), file=first)
        return self.side["side"]

    def estimated_total(self) -> int:
        if not self._files_read:
            return 0
        return int(round(self._rows_read * len(self.files) / self._files_read))

    def _labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        bad = (raw < 1) | (raw > NUM_DEVKIT_IDS)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise TeslaError(
                f"{path}: label {int(raw[i])} (row {i}) is outside the devkit ids 1..1000; the batch is damaged or "
                "not Downsampled ImageNet: re-download it"
            )
        labels = self.classes.lookup[raw]
        if (labels < 0).any():
            i = int(np.flatnonzero(labels < 0)[0])
            raise TeslaError(
                f"{path}: label {int(raw[i])} (row {i}) has no class in {self.classes.mapping_file}; give the "
                "complete mapping (the devkit's meta.mat or map_clsloc.txt with all 1000 classes)"
            )
        return labels

    def blocks(self, pool, resolution: int, rule: str, mode: str, reduced: bool) -> Iterator[LabelledBlock]:
        """Each batch in turn, its rows sorted by class, in blocks of at most ROWS_PER_BLOCK."""
        if mode != "RGB":
            raise TeslaError("--channels: Downsampled ImageNet is RGB; drop --channels 1")
        for path in self.files:
            data, raw = load_batch(path)
            side = side_of_row(data.shape[1], path)
            known, where = self.side["side"], self.side["file"]
            if known and side != known:
                raise TeslaError(
                    f"{path}: {side} x {side} images, but {where} holds {known} x {known}; give batches of one "
                    f"resolution (the train and val files of the same Imagenet{known} download)"
                )
            if not known:
                self.side.update(side=side, file=path)
            labels = self._labels(raw, path)
            order = np.argsort(labels, kind="stable")
            for s in range(0, len(order), ROWS_PER_BLOCK):
                rows = order[s : s + ROWS_PER_BLOCK]
                # channel-planar rows -> N x S x S x 3
                pixels = np.ascontiguousarray(data[rows].reshape(-1, 3, side, side).transpose(0, 2, 3, 1))
                if resolution != side:
                    tasks = ((pixels[a : a + RESIZE_ROWS], resolution, rule) for a in range(0, len(pixels), RESIZE_ROWS))
                    pixels = np.concatenate([out for _, out in pool.ordered_map(resize_block, tasks)])
                yield LabelledBlock(pixels, labels[rows], len(rows), [], [])
            self._rows_read += len(data)
            self._files_read += 1
            del data, raw


def plan_downsampled(opts: SourceOptions, name: str | None = None) -> DatasetPlan:
    """Downsampled ImageNet batches; class index = sorted WordNet ids with --synsets, else devkit ids."""
    if opts.input is None:
        raise TeslaError("imagenet-downsampled: give --input (the folder of train_data_batch_* files, or the files)")
    path = Path(opts.input)
    if not path.exists() and not _has_glob(path):
        raise TeslaError(f"{path}: no such file or folder (given as --input); give the folder of train_data_batch_* files")
    for flag, value in (("test-labels", opts.test_labels), ("test-fraction", opts.test_fraction)):
        if value is not None:
            raise TeslaError(f"--{flag}: not used by Downsampled ImageNet (val_data holds the labelled validation split); drop it")
    if opts.channels not in (None, 3):
        raise TeslaError("--channels: Downsampled ImageNet is RGB; drop --channels")
    train_files = _train_files(path)
    test_file = _test_file(opts, train_files)
    classes = devkit_classes(opts.synsets) if opts.synsets is not None else unmapped_classes()
    notes = []
    if opts.synsets is None:
        notes.append(
            "classes kept in the files' devkit id order 1..1000 (class c = devkit id c+1), NOT sorted WordNet ids; "
            "give --synsets meta.mat (or map_clsloc.txt) for the class order and names of the imagenet source"
        )
    attrs = {"input": str(path), "test_input": str(test_file)}
    if opts.synsets is not None:
        attrs["synsets_file"] = str(opts.synsets)
    side: dict = {"side": 0, "file": None, "probe": test_file}  # val_data: the smallest file to read S from
    train = DownsampledSplit("train", str(path), train_files, classes, notes=notes,
                             attrs={"batches": ",".join(p.name for p in train_files)}, side=side)
    test = DownsampledSplit("test", str(test_file), [test_file], classes, attrs={"batches": test_file.name}, side=side)
    return DatasetPlan(
        source="imagenet-downsampled",
        name=name or "imagenet-downsampled",
        class_ids=classes.class_ids,
        class_names=classes.class_names,
        channels=3,
        default_resolution=0,  # the files' own S, read when needed (StreamedSplit.native_resolution)
        train=train,
        test=test,
        attrs=attrs,
        class_order=classes.order,
    )


SOURCES = (
    DataSource(
        "imagenet-downsampled",
        "train_data_batch_1..10 python pickles or .npz, val_data or val_data.npz of Downsampled ImageNet 8/16/32/64 px; "
        "pickles are read by a restricted unpickler (plain data and NumPy arrays only)",
        plan_downsampled,
        (INPUT, TEST_INPUT, SYNSETS),
        {
            "input": "a folder holding train_data_batch_1..10 (python pickles) or train_data_batch_N.npz (also one "
            "level down, e.g. Imagenet64_train/), one batch file, or a glob",
            "test_input": "val_data or val_data.npz (else found beside the train batches)",
            "synsets": "the devkit (ILSVRC2012_devkit_t12.tar.gz as distributed, or its folder), its meta.mat or lines "
            "'wnid id name' (map_clsloc.txt) to turn the batches' devkit ids "
            "1..1000 into sorted WordNet ids with names (without it the devkit order is kept and recorded)",
            "resolution": "the files' own size",
        },
    ),
)
