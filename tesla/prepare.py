"""Convert a raw dataset into class-sorted uint8 HDF5 splits (``tesla prepare``).

Reads one of the sources in :mod:`tesla.data.sources`, decodes and resizes the images in a
pool of worker processes (``--workers``), and streams them class by class, in blocks, into
``DIR/train.h5`` and ``DIR/test.h5`` (format ``tesla-images`` v1, see docs/formats.md),
with a list of skipped, converted and ignored files in ``DIR/prepare_report.txt``.

Both splits and the report are first written into a staging folder inside DIR and moved
into place only when all three are complete (``train.h5`` last), so a run killed half-way
leaves no output file and the rerun starts afresh. Pixels are never all in memory: at most
``3 x workers`` blocks of images are in flight, their pixels returned by the workers through
shared memory (see :class:`tesla.data.pool.WorkerPool`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
from tqdm import tqdm

from tesla.data.format import SplitWriter
from tesla.data.pool import RESULT_SLOT_BYTES, WorkerPool, process_exists
from tesla.data.imaging import decode_block, min_decoded_side, parse_resize_rule, resize_block, resize_rule_name
from tesla.data.sources import ArraySplit, DatasetPlan, EncodedSplit, StreamedSplit, registry
from tesla.data.sources.base import Split, empty_split_error, single_class_error
from tesla.data.sources.options import RESOLUTION_RANGE
from tesla.data.sources.tarscan import LINK_REASONS
from tesla.errors import TeslaError
from tesla.locks import acquire

#: images per unit of work sent to a worker (fewer when their pixels would not fit a result slot,
#: or when the split is too small to give every worker two blocks)
ENCODED_BLOCK = 128
ARRAY_BLOCK = 1024
REPORT_NAME = "prepare_report.txt"
#: lines of one list (skipped, converted, ignored) written into the report; the rest are counted
REPORT_LIST_LIMIT = 1000
#: the lock file of a preparation in its output folder (tesla-lock; one preparation per folder at a time)
LOCK_NAME = ".tesla-prepare.lock"
_STAGING = re.compile(r"^\.tesla-prepare\.(\d+)\.tmp$")


# -- command line --------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The source and every option, from the registry of data sources."""
    registry.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    values = vars(args)
    source = registry.get_source(args.source)
    registry.check_options(source, values)
    plan = source.plan(registry.source_options(values), args.name)
    resolution = args.resolution or plan.default_resolution or _native_resolution(plan)
    if not resolution:
        raise TeslaError(f"--resolution: required for the {args.source} source (e.g. 32 for CIFAR-sized images, 64 for ImageNet)")
    low, high = RESOLUTION_RANGE
    if not low <= resolution <= high:
        raise TeslaError(f"the images' own side {resolution} is outside the allowed range {low}-{high}; give --resolution")
    report = prepare_dataset(
        plan,
        args.out_dir,
        resolution=resolution,
        rule=resize_rule_name(args.resize, args.resize_filter),
        workers=args.workers,
        strict=args.strict,
        reduced=not args.full_decode,
        progress=not args.quiet,
        validation=Holdout(args.validation_per_class, args.validation_seed),
    )
    print(report.summary())
    return 0


def _native_resolution(plan: DatasetPlan) -> int:
    """The side S stored in a streamed source's files (read only when --resolution is not given)."""
    for split in (plan.test, plan.train):
        native = split.native_resolution() if isinstance(split, StreamedSplit) else None
        if native:
            return int(native)
    return 0


# -- the pipeline --------------------------------------------------------------------------


@dataclass
class SplitReport:
    """What happened to one split."""

    split: str
    path: Path
    counts: np.ndarray
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return int(self.counts.sum())

    def line(self) -> str:
        c = self.counts
        return (
            f"{self.split}: {self.num_images} images, {len(c)} classes ({int(c.min())}..{int(c.max())} per class), "
            f"{len(self.converted)} converted, {len(self.skipped)} skipped, {len(self.ignored)} ignored"
        )


@dataclass
class PrepareReport:
    plan_source: str
    name: str
    out_dir: Path
    resolution: int
    rule: str
    reduced: bool
    splits: list[SplitReport]
    header: list[str]

    def summary(self) -> str:
        lines = [f"{self.name}: {self.resolution}x{self.resolution}, resize rule {self.rule}"]
        lines += [f"  {s.line()}" for s in self.splits]
        lines += [f"  note: {n}" for s in self.splits for n in s.notes]
        files = [s.path.name for s in self.splits] + [REPORT_NAME]
        lines.append("  wrote " + ", ".join(str(self.out_dir / name) for name in files))
        return "\n".join(lines)

    def text(self) -> str:
        lines = ["# tesla prepare report", *self.header, ""]
        for s in self.splits:
            lines.append(s.line())
            lines += [f"  mean {np.round(s.mean, 6).tolist()}, std {np.round(s.std, 6).tolist()}"]
            lines += [f"  note: {n}" for n in s.notes]
        for s in self.splits:
            for title, items in (("skipped (undecodable)", s.skipped), ("converted", s.converted), ("ignored", s.ignored)):
                lines += ["", f"[{s.split}] {title}: {len(items)} (path<TAB>reason)"]
                lines += items[:REPORT_LIST_LIMIT]
                if len(items) > REPORT_LIST_LIMIT:
                    lines.append(f"... and {len(items) - REPORT_LIST_LIMIT} more, not listed (the first {REPORT_LIST_LIMIT} are)")
        return "\n".join(lines) + "\n"


def encoded_block_size(resolution: int, channels: int, images: int, workers: int) -> int:
    """Images per task for a split of about ``images`` encoded images: :data:`ENCODED_BLOCK`,
    or fewer so that the decoded pixels fit one result slot of :class:`WorkerPool` and that
    every worker gets at least two tasks (a small split would otherwise leave workers idle)."""
    fit = RESULT_SLOT_BYTES // (resolution * resolution * channels)
    share = -(-images // (2 * workers)) if workers > 1 else ENCODED_BLOCK
    return max(1, min(ENCODED_BLOCK, fit, share))


def _remove_stale_staging(out_dir: Path) -> None:
    """Remove staging folders left by killed runs (their process no longer exists)."""
    for p in out_dir.iterdir():
        m = _STAGING.match(p.name)
        if not m or not p.is_dir():
            continue
        pid = int(m.group(1))
        if not process_exists(pid) or pid == os.getpid():
            shutil.rmtree(p, ignore_errors=True)


@dataclass(frozen=True)
class Holdout:
    """The validation split held out of the training split (``--validation-per-class``,
    ``--validation-seed``; :mod:`tesla.data.validation`): ``per_class`` 0 writes none."""

    per_class: int = 0
    seed: int = 0


def prepare_dataset(
    plan: DatasetPlan,
    out_dir: str | os.PathLike,
    resolution: int,
    rule: str = "box",
    workers: int = 0,
    strict: bool = False,
    reduced: bool = True,
    progress: bool = True,
    validation: Holdout = Holdout(),
) -> PrepareReport:
    """Write ``out_dir``/train.h5, test.h5 and prepare_report.txt from ``plan`` (see module doc),
    and val.h5 when ``validation`` holds images out of train.h5.

    With ``workers`` other than 1 the workers are new processes that import the calling
    script's main module, as Python's ``spawn`` does: in a script of your own, call this under
    ``if __name__ == "__main__":``."""
    try:
        _, filter_name = parse_resize_rule(rule)
    except ValueError as exc:
        raise TeslaError(f"--resize {rule}: {exc}") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with acquire(out_dir / LOCK_NAME, stage="tesla prepare", protects=f"--out-dir {out_dir}"):
        return _prepare_locked(plan, out_dir, resolution, rule, filter_name, workers, strict, reduced, progress, validation)


def _prepare_locked(
    plan: DatasetPlan, out_dir: Path, resolution: int, rule: str, filter_name: str, workers: int, strict: bool,
    reduced: bool, progress: bool, validation: Holdout = Holdout(),
) -> PrepareReport:
    """:func:`prepare_dataset` while it holds the folder's lock: no other preparation writes there."""
    _remove_stale_staging(out_dir)
    staging = out_dir / f".tesla-prepare.{os.getpid()}.tmp"
    staging.mkdir()
    pool = None
    ok = False
    try:
        pool = WorkerPool(workers)  # started by the first split that needs it
        reports = [
            write_split(plan, split, staging / f"{split.split}.h5", resolution, rule, pool, strict, reduced, progress)
            for split in (plan.train, plan.test)
        ]
        pool.close(ok=True)
        if validation.per_class:
            reports = _hold_out(reports, validation)
        header = [
            f"source: {plan.source}",
            f"name: {plan.name}",
            *(f"{k}: {v}" for k, v in plan.attrs.items()),
            f"class_order: {plan.class_order}",
            f"resolution: {resolution}",
            f"resize rule: {plan.train.resize_rule(resolution, rule) if isinstance(plan.train, StreamedSplit) else rule}, {filter_name} filter"
            + (
                f"; JPEGs decoded at reduced size only down to a shorter side >= {min_decoded_side(resolution)} px"
                if reduced
                else "; JPEGs decoded at full size"
            ),
            f"channels: {plan.channels}",
            f"workers: {pool.workers}",
            *([f"validation: {validation.per_class} images per class held out of train (seed {validation.seed})"]
              if validation.per_class else []),
        ]
        report = PrepareReport(plan.source, plan.name, out_dir, resolution, rule, reduced, reports, header)
        (staging / REPORT_NAME).write_text(report.text(), encoding="utf-8")
        final = [*(r.path.name for r in reports[1:]), REPORT_NAME, "train.h5"]  # train.h5 last: all are complete
        (out_dir / "val.h5").unlink(missing_ok=True)  # a validation split of an earlier preparation
        for name in final:
            (out_dir / name).unlink(missing_ok=True)
        for name in final:
            os.replace(staging / name, out_dir / name)
        for r in reports:
            r.path = out_dir / r.path.name
        ok = True
        return report
    finally:
        if pool is not None:
            pool.close(ok=ok)
        shutil.rmtree(staging, ignore_errors=True)


def _hold_out(reports: list[SplitReport], validation: Holdout) -> list[SplitReport]:
    """Divide the staged train.h5 into train.h5 and val.h5 (:mod:`tesla.data.validation`);
    the reports of train, test and val."""
    from tesla.data.validation import hold_out_validation

    train = reports[0]
    full = train.path.with_name("train.full.h5")
    os.replace(train.path, full)
    val_path = train.path.with_name("val.h5")
    hold_out_validation(full, train.path, val_path, validation.per_class, validation.seed)
    full.unlink()
    note = f"{validation.per_class} images per class held out as val.h5 (seed {validation.seed})"
    val = SplitReport(split="val", path=val_path, counts=np.zeros_like(train.counts), notes=[note])
    for report in (train, val):
        with h5py.File(report.path, "r") as f:
            report.counts = np.diff(f["class_offsets"][()])
            report.mean = [float(v) for v in np.atleast_1d(f.attrs["mean"])]
            report.std = [float(v) for v in np.atleast_1d(f.attrs["std"])]
    return [*reports, val]


def _split_attrs(plan: DatasetPlan, split: Split, rule: str, reduced: bool, resolution: int) -> dict:
    attrs = {f"source_{k}": str(v) for k, v in plan.attrs.items()}
    attrs.update({f"source_{k}": str(v) for k, v in split.attrs.items()})
    attrs["class_order"] = plan.class_order
    if isinstance(split, EncodedSplit) or (isinstance(split, StreamedSplit) and split.encoded):
        attrs["resize_filter"] = parse_resize_rule(rule)[1]
        attrs["jpeg_reduced_decoding"] = bool(reduced)
        attrs["jpeg_min_decoded_side"] = min_decoded_side(resolution) if reduced else 0
    return attrs


@dataclass(frozen=True)
class Conversion:
    """How every split of one ``prepare`` run is converted (the settings the writers share)."""

    name: str  # dataset name (progress bars)
    resolution: int
    rule: str  # resize rule asked for (``box`` or ``center-crop``, with its filter)
    mode: str  # PIL mode of the output: "L" or "RGB"
    pool: WorkerPool
    strict: bool  # an undecodable image is an error (else skipped and reported)
    reduced: bool  # reduced-size JPEG decoding where it keeps the fidelity bound
    progress: bool


def write_split(
    plan: DatasetPlan,
    split: Split,
    path: Path,
    resolution: int,
    rule: str,
    pool: WorkerPool,
    strict: bool,
    reduced: bool,
    progress: bool,
) -> SplitReport:
    """Decode, resize and append one split to a :class:`SplitWriter`, class by class.

    A :class:`StreamedSplit` (Downsampled-ImageNet batches, parquet shards) yields its
    images in any class order; they are sorted into class order through a
    :class:`ClassSortingStore` beside ``path``. A split left without any image (every image
    undecodable, or a streamed input without rows) is refused before its file is written."""
    streamed = isinstance(split, StreamedSplit)
    if streamed:
        rule_used = split.resize_rule(resolution, rule)
    elif isinstance(split, ArraySplit):
        native = split.images.shape[1:3]
        rule_used = "none" if tuple(native) == (resolution, resolution) else rule
    else:
        rule_used = rule
    report = SplitReport(split=split.split, path=path, counts=np.zeros(len(plan.class_ids), dtype=np.int64))
    report.notes += list(split.notes)
    report.ignored += list(split.ignored)
    with SplitWriter(
        path,
        dataset=plan.name,
        split=split.split,
        class_ids=plan.class_ids,
        class_names=plan.class_names,
        height=resolution,
        width=resolution,
        channels=plan.channels,
        source=plan.source,
        source_path=split.source_path,
        resize_rule=rule_used,
        attrs=_split_attrs(plan, split, rule, reduced, resolution),
        require_all_classes=split.split == "train",
    ) as writer:
        conv = Conversion(plan.name, resolution, rule, plan.mode, pool, strict, reduced, progress)
        if streamed:
            _write_streamed(split, writer, report, conv, path.parent)
        elif isinstance(split, ArraySplit):
            _write_arrays(split, writer, report, conv)
        else:
            _write_encoded(split, writer, report, conv)
        # ignored files found while listing lazily (inner tars) join the report
        report.ignored = list(dict.fromkeys(report.ignored + list(split.ignored)))
        links = sum(line.partition("\t")[2].startswith(LINK_REASONS) for line in report.ignored)
        if links:
            report.notes.append(f"{links} tar member(s) are symbolic links, or hard links to no regular member of their "
                                "archive: not read (listed among the ignored files, with their targets)")
        if not report.counts.any():
            why = f"all {len(report.skipped)} of its images are undecodable, e.g. {report.skipped[0]}" if report.skipped else "its input holds none"
            raise empty_split_error(split.split, split.source_path, why.replace("\t", ": "))
        filled = [plan.class_ids[c] for c in np.flatnonzero(report.counts)]
        if split.split == "train" and len(filled) < 2:  # a streamed split's classes, or undecodable ones
            raise single_class_error(filled, split.source_path)
    with h5py.File(path, "r") as f:
        report.mean = [float(v) for v in np.atleast_1d(f.attrs["mean"])]
        report.std = [float(v) for v in np.atleast_1d(f.attrs["std"])]
    empty = [plan.class_ids[c] for c in np.flatnonzero(report.counts == 0)]
    if empty:
        report.notes.append(
            f"{len(empty)} class(es) without {split.split} images: {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}"
        )
    return report


class BlockBuffer:
    """Collects decoded blocks and appends them to the writer in blocks of about ``limit`` bytes
    (fewer, larger HDF5 writes when classes are small), copied into one array allocated once
    (memory stays bounded by ``limit``; the blocks added may be borrowed views)."""

    def __init__(self, writer: SplitWriter, limit: int = 16 << 20) -> None:
        self.writer = writer
        image_shape = (writer.height, writer.width, writer.channels)
        self.capacity = max(1, limit // int(np.prod(image_shape)))
        self.image_shape = image_shape
        self.images: np.ndarray | None = None  # allocated on first use
        self.labels = np.empty(self.capacity, dtype=np.int64)
        self.count = 0

    def add(self, images: np.ndarray, labels: np.ndarray) -> None:
        """Copy a block of uint8 images (N x H x W x C, or N x H x W for one channel) and their labels."""
        if images.dtype != np.uint8 or images.shape[1:] not in (self.image_shape, self.image_shape[:2] if self.image_shape[2] == 1 else None):
            raise ValueError(f"images must be uint8 N x {self.image_shape}, got {images.dtype} {images.shape}")
        done = 0
        while done < len(images):
            if self.images is None:
                self.images = np.empty((self.capacity, *self.image_shape), dtype=np.uint8)
            k = min(self.capacity - self.count, len(images) - done)
            self.images[self.count : self.count + k] = images[done : done + k].reshape(k, *self.image_shape)
            self.labels[self.count : self.count + k] = labels[done : done + k]
            self.count += k
            done += k
            if self.count == self.capacity:
                self.flush()

    def flush(self) -> None:
        if self.count:
            self.writer.append(self.images[: self.count], self.labels[: self.count])
        self.count = 0


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True, mininterval=0.5)


def _write_arrays(split: ArraySplit, writer: SplitWriter, report: SplitReport, conv: Conversion) -> None:
    """Decoded pixels (MNIST, CIFAR, the demo): appended as they are, or resized in the pool."""
    name, resolution, rule, pool, progress = conv.name, conv.resolution, conv.rule, conv.pool, conv.progress
    images, labels = split.images, split.labels
    with _bar(len(images), f"{name} {split.split}", progress) as bar:
        if images.shape[1:3] == (resolution, resolution):
            for s in range(0, len(images), ARRAY_BLOCK):
                writer.append(images[s : s + ARRAY_BLOCK], labels[s : s + ARRAY_BLOCK])
                bar.update(len(labels[s : s + ARRAY_BLOCK]))
        else:
            tasks = ((images[s : s + ARRAY_BLOCK], resolution, rule) for s in range(0, len(images), ARRAY_BLOCK))
            s = 0
            for (block, _, _), out in pool.ordered_map(resize_block, tasks):
                writer.append(out, labels[s : s + len(block)])
                s += len(block)
                bar.update(len(block))
    report.counts += np.bincount(labels, minlength=len(report.counts))


def _write_encoded(split: EncodedSplit, writer: SplitWriter, report: SplitReport, conv: Conversion) -> None:
    """Encoded images listed in class order: decoded and resized in the pool, appended in order."""
    name, resolution, rule, mode, pool = conv.name, conv.resolution, conv.rule, conv.mode, conv.pool
    strict, reduced, progress = conv.strict, conv.reduced, conv.progress
    bar = _bar(split.estimated_total(), f"{name} {split.split}", progress)
    measured = {"bytes": 0, "images": 0}

    block = encoded_block_size(resolution, 1 if mode == "L" else 3, split.estimated_total(), pool.workers)

    def tasks() -> Iterator[tuple]:
        """Blocks of ``block`` images in class order (a block may span small classes)."""
        refs_block: list = []
        labels_block: list[int] = []
        for cf in split.classes:
            was_listed = cf.listed
            refs = cf.list()
            if not was_listed:  # an inner tar just listed: refine the progress total
                measured["bytes"] += cf.nbytes
                measured["images"] += len(refs)
                bar.total = split.estimated_total(measured["bytes"] / max(1, measured["images"]))
                bar.refresh()
            done = 0
            while done < len(refs):
                k = min(block - len(refs_block), len(refs) - done)
                refs_block += refs[done : done + k]
                labels_block += [cf.index] * k
                done += k
                if len(refs_block) == block:
                    yield (refs_block, resolution, rule, mode, reduced, np.asarray(labels_block, dtype=np.int64))
                    refs_block, labels_block = [], []
        if refs_block:
            yield (refs_block, resolution, rule, mode, reduced, np.asarray(labels_block, dtype=np.int64))

    buffer = BlockBuffer(writer)
    try:
        for (refs, *_, labels), result in pool.ordered_map(_decode_task, tasks(), borrow=True):
            for i, reason in result.skipped:
                if strict:
                    raise TeslaError(
                        f"{refs[i].name}: cannot decode ({reason}); replace or remove the file, "
                        "or run without --strict to skip it (it is then listed in prepare_report.txt)"
                    )
                writer.note_skipped(refs[i].name, reason)
                report.skipped.append(f"{refs[i].name}\t{reason}")
            for i, note in result.converted:
                writer.num_converted += 1
                report.converted.append(f"{refs[i].name}\t{note}")
            kept_labels = labels[result.kept] if len(result.kept) < len(labels) else labels
            buffer.add(result.images, kept_labels)  # copies the borrowed pixels
            report.counts += np.bincount(kept_labels, minlength=len(report.counts))
            bar.update(len(refs))
        buffer.flush()
    finally:
        bar.close()


class ClassSortingStore:
    """Images that arrive in any class order, kept in a temporary file and read back class by class.

    Each block is sorted by label (stable) and appended to the file; the store remembers, per
    class, the runs of rows it occupies (a run that continues the previous one is extended).
    Reading back in class order visits, for c = 0 .. K-1, the runs of class c in arrival
    order, so the output is the stable sort of all images by class. Memory: one block plus
    the run list (a few per class and block), never the split.
    """

    def __init__(self, path: Path, num_classes: int, image_shape: tuple[int, int, int]) -> None:
        self.path = Path(path)
        self.image_shape = tuple(image_shape)
        self.row_bytes = int(np.prod(self.image_shape))
        self.runs: list[list[list[int]]] = [[] for _ in range(num_classes)]
        self.rows = 0
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def add(self, images: np.ndarray, labels: np.ndarray) -> None:
        """Append a block (uint8 N x H x W x C, labels in 0..K-1, any order)."""
        if len(labels) == 0:
            return
        labels = np.asarray(labels, dtype=np.int64)
        order = np.argsort(labels, kind="stable")
        if np.any(np.diff(order) != 1):
            images, labels = images[order], labels[order]
        data = memoryview(np.ascontiguousarray(images, dtype=np.uint8)).cast("B")
        offset, done = self.rows * self.row_bytes, 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], offset + done)
        starts = np.concatenate([[0], np.flatnonzero(np.diff(labels)) + 1])
        ends = np.concatenate([starts[1:], [len(labels)]])
        for a, b in zip(starts.tolist(), ends.tolist()):
            runs = self.runs[int(labels[a])]
            first = self.rows + a
            if runs and runs[-1][0] + runs[-1][1] == first:
                runs[-1][1] += b - a
            else:
                runs.append([first, b - a])
        self.rows += len(labels)

    def in_class_order(self, max_rows: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(images, labels) blocks of at most ``max_rows`` images, in class order."""
        for c, runs in enumerate(self.runs):
            for first, count in runs:
                for s in range(0, count, max_rows):
                    n = min(max_rows, count - s)
                    raw = os.pread(self._fd, n * self.row_bytes, (first + s) * self.row_bytes)
                    if len(raw) != n * self.row_bytes:
                        raise TeslaError(f"{self.path}: temporary file shorter than written (disk full?); free space and rerun")
                    yield np.frombuffer(raw, dtype=np.uint8).reshape(n, *self.image_shape), np.full(n, c, dtype=np.int64)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)


def _write_streamed(split: StreamedSplit, writer: SplitWriter, report: SplitReport, conv: Conversion, tmp_dir: Path) -> None:
    """Stream a split's blocks into a :class:`ClassSortingStore`, then append it class by class."""
    name, resolution, rule, mode, pool = conv.name, conv.resolution, conv.rule, conv.mode, conv.pool
    strict, reduced, progress = conv.strict, conv.reduced, conv.progress
    store = ClassSortingStore(tmp_dir / f".{split.split}.class-sort.tmp", len(report.counts), (resolution, resolution, writer.channels))
    bar = _bar(split.estimated_total(), f"{name} {split.split}", progress)
    try:
        for block in split.blocks(pool, resolution, rule, mode, reduced):
            for item, reason in block.skipped:
                if strict:
                    raise TeslaError(
                        f"{item}: cannot decode ({reason}); replace or remove that image, "
                        "or run without --strict to skip it (it is then listed in prepare_report.txt)"
                    )
                writer.note_skipped(item, reason)
                report.skipped.append(f"{item}\t{reason}")
            for item, note in block.converted:
                writer.num_converted += 1
                report.converted.append(f"{item}\t{note}")
            store.add(block.images, block.labels)
            report.counts += np.bincount(block.labels, minlength=len(report.counts))
            total = split.estimated_total()
            if total != bar.total:
                bar.total = total
                bar.refresh()
            bar.update(block.inputs)
        bar.close()
        buffer = BlockBuffer(writer)
        with _bar(store.rows, f"{name} {split.split} (class order)", progress) as bar2:
            for images, labels in store.in_class_order():
                buffer.add(images, labels)
                bar2.update(len(labels))
        buffer.flush()
    finally:
        bar.close()
        store.close()


def _decode_task(refs, resolution, rule, mode, reduced, labels):
    """Worker entry point: one block of images (``labels`` stay with the task in the parent)."""
    return decode_block(refs, resolution, rule, mode, reduced)
