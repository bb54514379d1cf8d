"""Parquet shards of encoded images (the layout of Hugging Face hub datasets).

Input: a ``.parquet`` file, a folder of them (searched one level down, e.g. ``data/``), or a
glob. Each file has an encoded-image column (``--image-column``, default ``image``): raw
bytes, or a struct with ``bytes`` (and ``path``) fields as written by Hugging Face
``datasets``; and an integer label column (``--label-column``, default ``label``) with
classes 0..K-1. Class names come from the schema metadata when it carries them (the
``huggingface`` key: ``info.features.<label>.names``); otherwise class c is named ``c``.

Splits: a file belongs to the split named by its name's first word or its folder
(``train-00000-of-00294.parquet``, ``validation-...``, ``test/0000.parquet``). The test split
is ``--test-input``, else the validation files, else the test files, else ``--test-fraction``
of every class held out. Unlabelled rows (label < 0, e.g. Hugging Face's ImageNet test split)
are an error naming the file.

Reading: planning reads only the label column, row group by row group. Writing hands one
row group per task to the worker pool; a worker reads that row group's image column and
decodes and resizes its images exactly like JPEG files (:func:`tesla.data.imaging.load_image`),
so at most ``4 x workers`` row groups are in memory. The decoded images (S x S) go to
:class:`tesla.prepare.ClassSortingStore`, which puts them in class order through a
temporary file. Undecodable bytes are skipped and reported (or stop the run with --strict).
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np

from tesla.data.imaging import LabelledBlock, UndecodableImage, decode_images
from tesla.data.sources.base import DatasetPlan, SourceOptions, StreamedSplit, empty_split_error
from tesla.data.sources.options import CHANNELS, IMAGE_COLUMN, INPUT, LABEL_COLUMN, TEST_FRACTION, TEST_FRACTION_SEED, TEST_INPUT
from tesla.data.sources.registry import DataSource
from tesla.errors import TeslaError

TRAIN_NAMES = ("train",)
VALIDATION_NAMES = ("validation", "valid", "val")
TEST_NAMES = ("test",)
_FIRST_WORD = re.compile(r"^([A-Za-z]+)")


def _has_glob(path: Path | str) -> bool:
    return any(ch in str(path) for ch in "*?[")


def parquet_files(path: Path | str) -> list[Path]:
    """The ``.parquet`` files named by ``path`` (file, glob, or folder and its sub-folders one level down)."""
    path = Path(path)
    if _has_glob(path):
        return [Path(p) for p in sorted(glob.glob(str(path))) if p.endswith(".parquet") and Path(p).is_file()]
    if path.is_file():
        return [path] if path.name.endswith(".parquet") else []
    if path.is_dir():
        found = sorted(p for p in path.glob("*.parquet") if p.is_file())
        subdirs = [p for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        if len(subdirs) <= 64:  # a class-folder tree (1000 wnid folders) is not searched
            for sub in subdirs:
                found += sorted(p for p in sub.glob("*.parquet") if p.is_file())
        return found
    return []


def is_parquet_input(path: Path | str) -> bool:
    return bool(parquet_files(path))


def _split_of(path: Path) -> str | None:
    for word in (_FIRST_WORD.match(path.stem), _FIRST_WORD.match(path.parent.name)):
        w = word.group(1).lower() if word else ""
        if w in TRAIN_NAMES:
            return "train"
        if w in VALIDATION_NAMES:
            return "validation"
        if w in TEST_NAMES:
            return "test"
    return None


# -- planning: schema, class names, labels --------------------------------------------------


@dataclass
class ShardInfo:
    """One parquet file: its row groups' labels (int64) and the class names in its metadata."""

    path: Path
    labels: list[np.ndarray]
    names: list[str] | None

    @property
    def num_rows(self) -> int:
        return int(sum(len(a) for a in self.labels))


def _class_names(schema, label_column: str, path: Path) -> list[str] | None:
    meta = schema.metadata or {}
    raw = meta.get(b"huggingface")
    if raw is None:
        return None
    try:
        info = json.loads(raw)
        features = info.get("info", {}).get("features", {}) or info.get("features", {})
        names = features.get(label_column, {}).get("names")
    except (ValueError, AttributeError):
        return None
    return [str(n) for n in names] if isinstance(names, list) and names else None


def read_shard(path: Path, image_column: str, label_column: str) -> ShardInfo:
    """Check a file's columns and read its label column (only), row group by row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - damaged or not parquet
        raise TeslaError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc}); re-download or remove it") from None
    schema = pf.schema_arrow
    names = schema.names
    missing = [c for c in (image_column, label_column) if c not in names]
    if missing:
        raise TeslaError(
            f"{path}: no column {missing[0]!r} (columns: {', '.join(names)}); name the image and label columns with "
            f"--image-column and --label-column (now {image_column!r} and {label_column!r})"
        )
    itype = schema.field(image_column).type
    ok_image = pa.types.is_binary(itype) or pa.types.is_large_binary(itype) or (
        pa.types.is_struct(itype) and itype.get_field_index("bytes") >= 0
        and (pa.types.is_binary(itype.field("bytes").type) or pa.types.is_large_binary(itype.field("bytes").type))
    )
    if not ok_image:
        raise TeslaError(
            f"{path}: column {image_column!r} is {itype}, not encoded image bytes (binary, or a struct with a 'bytes' "
            "field); choose the image column with --image-column"
        )
    if not pa.types.is_integer(schema.field(label_column).type):
        raise TeslaError(
            f"{path}: column {label_column!r} is {schema.field(label_column).type}, not integer class labels; "
            "choose the label column with --label-column"
        )
    labels = []
    for rg in range(pf.num_row_groups):
        col = pf.read_row_group(rg, columns=[label_column]).column(0)
        if col.null_count:
            raise TeslaError(f"{path}: row group {rg} has {col.null_count} rows without a label; remove them or fill the labels")
        labels.append(col.to_numpy().astype(np.int64))
    return ShardInfo(path, labels, _class_names(schema, label_column, path))


# -- the split ------------------------------------------------------------------------------


@dataclass
class RowGroupUnit:
    """The rows of one row group that belong to a split (``rows`` None: all), with their labels."""

    path: str
    row_group: int
    first_row: int
    rows: np.ndarray | None
    labels: np.ndarray


@dataclass
class ParquetSplit(StreamedSplit):
    """A split as row groups of parquet files, decoded in the pool in :meth:`blocks`."""

    units: list[RowGroupUnit]
    image_column: str

    def estimated_total(self) -> int:
        return int(sum(len(u.labels) for u in self.units))

    def class_counts(self, num_classes: int) -> list[int | None]:
        """Rows per class, from the label column read at planning."""
        counts = np.zeros(num_classes, dtype=np.int64)
        for u in self.units:
            counts += np.bincount(u.labels, minlength=num_classes)
        return counts.tolist()

    def blocks(self, pool, resolution: int, rule: str, mode: str, reduced: bool) -> Iterator[LabelledBlock]:
        tasks = (
            (u.path, u.row_group, u.first_row, u.rows, self.image_column, resolution, rule, mode, reduced)
            for u in self.units
            if len(u.labels)
        )
        units = iter(u for u in self.units if len(u.labels))
        for _, (images, kept, converted, skipped) in pool.ordered_map(decode_row_group, tasks):
            unit = next(units)
            yield LabelledBlock(images, unit.labels[kept], len(unit.labels), skipped, converted)


_readers: dict[str, object] = {}


def decode_row_group(path: str, row_group: int, first_row: int, rows: np.ndarray | None, column: str,
                     size: int, rule: str, mode: str, reduced: bool):
    """Worker entry point: read one row group's image column, decode and resize the selected rows.

    Returns (images K x S x S x C, kept positions among the selected rows, converted and
    skipped (name, reason) pairs); a row is named ``<file>:row <n>`` and its stored path.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    key = f"{os.getpid()}:{path}"
    pf = _readers.get(key)
    if pf is None:
        pf = _readers[key] = pq.ParquetFile(path)
    col = pf.read_row_group(row_group, columns=[column]).column(0).combine_chunks()
    if pa.types.is_struct(col.type):
        data = col.field("bytes")
        paths = col.field("path").to_pylist() if col.type.get_field_index("path") >= 0 else [None] * len(col)
    else:
        data, paths = col, [None] * len(col)
    select = range(len(col)) if rows is None else rows.tolist()
    names = [f"{path}:row {first_row + i}" + (f" ({paths[i]})" if paths[i] else "") for i in select]
    block = decode_images([(paths[i] or "", partial(_row_bytes, data, i)) for i in select], size, rule, mode, reduced)
    converted = [(names[k], note) for k, note in block.converted]
    skipped = [(names[k], reason) for k, reason in block.skipped]
    return block.images, np.asarray(block.kept, dtype=np.int64), converted, skipped


def _row_bytes(data, i: int) -> bytes:
    """The encoded bytes of row ``i`` of an image column (a pyarrow binary array)."""
    value = data[i].as_py() if data[i].is_valid else None
    if not value:
        raise UndecodableImage("no image bytes")
    return value


def _units(shards: list[ShardInfo], keep: list[list[np.ndarray]] | None = None) -> list[RowGroupUnit]:
    units = []
    for s_i, shard in enumerate(shards):
        first = 0
        for rg, labels in enumerate(shard.labels):
            if keep is None:
                units.append(RowGroupUnit(str(shard.path), rg, first, None, labels))
            else:
                rows = np.flatnonzero(keep[s_i][rg])
                units.append(RowGroupUnit(str(shard.path), rg, first, rows, labels[rows]))
            first += len(labels)
    return units


def _check_labels(shards: list[ShardInfo], num_classes: int, names_known: bool) -> None:
    for shard in shards:
        for rg, labels in enumerate(shard.labels):
            if not len(labels):
                continue
            if labels.min() < 0:
                raise TeslaError(
                    f"{shard.path}: row group {rg} holds label {int(labels.min())} (an unlabelled row, as in Hugging Face's "
                    "ImageNet test split); give labelled shards, e.g. the validation files as --test-input"
                )
            if labels.max() >= num_classes:
                how = "the class names in its metadata" if names_known else "the train labels"
                raise TeslaError(
                    f"{shard.path}: label {int(labels.max())} is not a class ({num_classes} classes from {how}); "
                    "give shards of one dataset, or fix the --label-column"
                )


def _hold_out(shards: list[ShardInfo], fraction: float, seed: int) -> tuple[list, list]:
    """Per class, round(fraction n_c) rows (at least 1 when n_c >= 2) go to test, by a seeded permutation."""
    if not 0.0 < fraction < 1.0:
        raise TeslaError(f"--test-fraction {fraction}: must be between 0 and 1 (e.g. 0.1)")
    labels = np.concatenate([a for s in shards for a in s.labels])
    test = np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng(seed)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = len(idx)
        k = min(max(int(round(fraction * n)), 1), n - 1) if n >= 2 else 0
        test[idx[rng.permutation(n)[:k]]] = True
    masks_train, masks_test, pos = [], [], 0
    for s in shards:
        tr, te = [], []
        for a in s.labels:
            m = test[pos : pos + len(a)]
            tr.append(~m)
            te.append(m)
            pos += len(a)
        masks_train.append(tr)
        masks_test.append(te)
    return masks_train, masks_test


def plan_parquet(opts: SourceOptions, name: str | None = None, default_resolution: int = 0) -> DatasetPlan:
    """Parquet shards; class index = the label column's integer, names from the schema metadata."""
    if opts.input is None:
        raise TeslaError("parquet: give --input (a .parquet file, a folder of them, or a glob such as 'data/train-*.parquet')")
    for flag, value in (("test-labels", opts.test_labels), ("synsets", opts.synsets)):
        if value is not None:
            raise TeslaError(f"--{flag}: not used by parquet shards (labels and class names are in the files); drop it")
    train_files, inner_test, notes = _split_shards(opts.input)
    test_files = _test_shards(opts, inner_test)
    train = [read_shard(f, opts.image_column, opts.label_column) for f in train_files]
    test = [read_shard(f, opts.image_column, opts.label_column) for f in test_files]
    names = _shared_class_names(train, test)
    all_train = np.concatenate([a for s in train for a in s.labels]) if train else np.zeros(0, np.int64)
    if not len(all_train):
        raise empty_split_error("train", str(opts.input), "the train shards hold no rows")
    num_classes = len(names) if names else int(all_train.max()) + 1
    _check_labels(train + test, num_classes, names is not None)
    class_names = names or [str(c) for c in range(num_classes)]
    attrs = {"input": str(opts.input), "image_column": opts.image_column, "label_column": opts.label_column}
    if opts.test_input is not None:
        attrs["test_input"] = str(opts.test_input)
    train_split, test_split = _parquet_splits(opts, (train, train_files, notes), (test, test_files))
    return DatasetPlan(
        source="parquet",
        name=name or "parquet",
        class_ids=list(class_names),
        class_names=list(class_names),
        channels=opts.channels or 3,
        default_resolution=default_resolution,
        train=train_split,
        test=test_split,
        attrs=attrs,
        class_order="label column order" + (" (names from the schema metadata)" if names else ""),
    )


def _split_shards(given: Path) -> tuple[list[Path], list[Path], list[str]]:
    """The files of ``--input`` by split, from their names: (train files, the validation files,
    else the test files, among them; notes). Files all without a split name are all train."""
    files = parquet_files(given)
    if not files:
        raise TeslaError(f"{given}: no .parquet files found (given as --input); give a .parquet file, a folder of them or a glob")
    by_split: dict[str | None, list[Path]] = {}
    for f in files:
        by_split.setdefault(_split_of(f), []).append(f)
    if set(by_split) == {None}:
        return files, [], []
    if None in by_split:
        raise TeslaError(
            f"{by_split[None][0]}: not named after a split (train-*, validation-*, test-*) while other files are; "
            "rename or move it, or give the train files as a glob"
        )
    train_files = by_split.get("train", [])
    if not train_files:
        raise TeslaError(f"{given}: no train-*.parquet files among {len(files)} shards; give the train shards as --input")
    notes = []
    if by_split.get("validation") and by_split.get("test"):
        notes.append(f"{len(by_split['test'])} test-* shard(s) not used: the validation shards are the test split")
    return train_files, by_split.get("validation") or by_split.get("test", []), notes


def _test_shards(opts: SourceOptions, inner_test: list[Path]) -> list[Path]:
    """The test split's files: ``--test-input``, else the input's own test shards; none when
    ``--test-fraction`` holds out part of train (the other combinations are refused)."""
    if opts.test_input is not None:
        if opts.test_fraction is not None:
            raise TeslaError("--test-fraction: a test split is given with --test-input; drop --test-fraction")
        test_files = parquet_files(opts.test_input)
        if not test_files:
            raise TeslaError(f"{opts.test_input}: no .parquet files found (given as --test-input); give a file, folder or glob")
        return test_files
    if inner_test and opts.test_fraction is None:
        return inner_test
    if opts.test_fraction is not None:
        if inner_test:
            raise TeslaError(f"--test-fraction: the input already has test shards ({inner_test[0].name}); drop --test-fraction")
        return []
    raise TeslaError(
        f"{opts.input}: no test split; give --test-input (parquet shards), put validation-*.parquet beside the "
        "train shards, or hold out part of train with --test-fraction 0.1"
    )


def _shared_class_names(train: list[ShardInfo], test: list[ShardInfo]) -> list[str] | None:
    """The class names of the shards' metadata (the first train shard that has them), which
    every shard that has names must share; None when no train shard has them."""
    names = next((s.names for s in train if s.names), None)
    for s in train + test:
        if s.names is not None and names is not None and s.names != names:
            raise TeslaError(f"{s.path}: its class names differ from those of {train[0].path}; give shards of one dataset")
    return names


def _parquet_splits(opts: SourceOptions, train_shards: tuple[list[ShardInfo], list[Path], list[str]],
                    test_shards: tuple[list[ShardInfo], list[Path]]) -> tuple[ParquetSplit, ParquetSplit]:
    """The train and test splits (from (shards, files, notes) of train and (shards, files) of
    test): the test shards' row groups, or the rows ``--test-fraction`` holds out of every
    train row group (the train split keeps the others)."""
    (train, train_files, notes), (test, test_files) = train_shards, test_shards
    image_column = opts.image_column
    if opts.test_fraction is not None:
        keep_train, keep_test = _hold_out(train, opts.test_fraction, opts.test_fraction_seed)
        train_units, test_units = _units(train, keep_train), _units(train, keep_test)
        test_notes = [f"test split held out from train: {opts.test_fraction:g} of each class, seed {opts.test_fraction_seed}"]
        test_attrs = {"held_out_fraction": opts.test_fraction, "held_out_seed": opts.test_fraction_seed}
        test_path = str(opts.input)
    else:
        train_units, test_units = _units(train), _units(test)
        test_notes, test_attrs = [], {"files": ",".join(p.name for p in test_files)}
        test_path = str(opts.test_input or (test_files[0].parent if test_files else opts.input))
    return (
        ParquetSplit("train", str(opts.input), train_units, image_column, notes=notes,
                     attrs={"files": ",".join(p.name for p in train_files)}),
        ParquetSplit("test", test_path, test_units, image_column, notes=test_notes, attrs=test_attrs),
    )

SOURCES = (
    DataSource(
        "parquet",
        "*.parquet shards with an encoded-image column and an integer label column, e.g. a Hugging Face dataset's "
        "data/ folder",
        plan_parquet,
        (INPUT, TEST_INPUT, CHANNELS, TEST_FRACTION, TEST_FRACTION_SEED, IMAGE_COLUMN, LABEL_COLUMN),
        {
            "input": "a .parquet file, a folder of them (train-*.parquet and validation-*/test-*.parquet split by "
            "name; searched one level down, e.g. data/) or a glob such as 'data/train-*.parquet'",
            "test_input": "a file, folder or glob of test shards",
            "resolution": "required",
        },
        resolution_required=True,
        explicit_defaults=("resize", "image_column", "label_column"),
    ),
)
