"""Convert a raw dataset into class-sorted uint8 HDF5 splits (``tesla prepare``).

Reads one of the sources in :mod:`tesla.data.sources`, decodes and resizes the images in a
pool of worker processes (``--workers``), and streams them class by class, in blocks, into
``DIR/train.h5`` and ``DIR/test.h5`` (format ``tesla-images`` v1, see docs/formats.md),
with a list of skipped, converted and ignored files in ``DIR/prepare_report.txt``.

Both splits and the report are first written into a staging folder inside DIR and moved
into place only when all three are complete (``train.h5`` last), so a run killed half-way
leaves no output file and the rerun starts afresh. Pixels are never all in memory: at most
``4 x workers`` blocks of images are in flight.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import shutil
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import h5py
import numpy as np
from tqdm import tqdm

from tesla.data.format import SplitWriter
from tesla.data.imaging import RESIZE_RULES, decode_block, min_decoded_side, resize_block
from tesla.data.sources import SOURCES, ArraySplit, DatasetPlan, EncodedSplit, SourceOptions, plan_source
from tesla.errors import TeslaError

#: images per unit of work sent to a worker
ENCODED_BLOCK = 64
ARRAY_BLOCK = 1024
REPORT_NAME = "prepare_report.txt"
_STAGING = re.compile(r"^\.tesla-prepare\.(\d+)\.tmp$")


# -- command line --------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        choices=SOURCES,
        help="raw dataset kind: demo (scikit-learn digits, no input), mnist, fashion-mnist (idx files), "
        "cifar10, cifar100 (python pickle batches; pickles can run code, so give only files you trust), "
        "imagenet (train/<wnid>/ folders, a tar of them, or ILSVRC2012_img_train.tar), "
        "folder (any <class>/**/<image> tree, or a tar of one)",
    )
    parser.add_argument(
        "--input",
        type=Path,
        help="the raw data: for mnist/fashion-mnist the folder of idx files; for cifar the batches folder, "
        "its parent or the .tar.gz; for imagenet/folder a class-folder tree or an uncompressed tar of one "
        "(or of per-class tars), possibly holding train/ and test/ (or val/) folders; not used by demo",
    )
    parser.add_argument(
        "--test-input",
        type=Path,
        help="imagenet/folder: the test images, as a class-folder tree, or a flat folder or tar "
        "(e.g. ILSVRC2012_img_val.tar) labelled by --test-labels",
    )
    parser.add_argument(
        "--test-labels",
        type=Path,
        help="labels of a flat test folder: LOC_val_solution.csv (ImageId,PredictionString; class = first "
        "token), or lines 'file class' separated by commas, tabs or spaces; file names may omit the extension",
    )
    parser.add_argument(
        "--synsets",
        type=Path,
        help="class names for imagenet/folder: lines '<class id> <name, name2, ...>' (LOC_synset_mapping.txt)",
    )
    parser.add_argument("--out-dir", type=Path, required=True, help="output folder for train.h5, test.h5 and prepare_report.txt")
    parser.add_argument("--name", help="dataset name stored in the files; when not given, the source's name (for folder: the input's name)")
    parser.add_argument(
        "--resolution",
        type=int,
        help="output side S in pixels (S x S images); when not given, the native size (demo 8, mnist 28, cifar 32), "
        "or 64 for imagenet; required for folder",
    )
    parser.add_argument(
        "--resize",
        choices=RESIZE_RULES,
        default="box",
        help="box: the whole image box-filtered to S x S, aspect ratio not kept (the Downsampled-ImageNet rule); "
        "center-crop: the centred square of side min(w, h) box-filtered to S x S",
    )
    parser.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        help="imagenet/folder: 3 = convert to RGB, 1 = convert to greyscale (L); when not given, 3",
    )
    parser.add_argument(
        "--full-decode",
        action="store_true",
        help="always decode JPEGs at full size; without it, large JPEGs are decoded at a reduced size that keeps "
        "the shorter side >= max(256, 4 S) (measured within 0.1 grey level of full decoding on ImageNet)",
    )
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (0 = all available cores)")
    parser.add_argument("--strict", action="store_true", help="stop at the first undecodable image instead of skipping it")
    parser.add_argument(
        "--ignore-non-images",
        action="store_true",
        help="skip files whose extension is not an image's (listed in the report) instead of stopping with an error",
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        help="imagenet/folder without any test input: hold out this fraction of every class as the test split",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the --test-fraction hold-out")
    parser.add_argument(
        "--download",
        action="store_true",
        help="mnist/fashion-mnist/cifar: fetch the official files into --input with torchvision first "
        "(needs a network; fails with instructions when offline)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    if args.download and args.source not in ("mnist", "fashion-mnist", "cifar10", "cifar100"):
        raise TeslaError(f"--download: only mnist, fashion-mnist, cifar10 and cifar100 can be downloaded, not {args.source}")
    if args.channels is not None and args.source not in ("imagenet", "folder"):
        raise TeslaError(f"--channels: {args.source} has a fixed number of channels; drop --channels")
    if args.source not in ("imagenet", "folder"):
        for flag in ("test_input", "test_labels", "synsets", "test_fraction"):
            if getattr(args, flag) is not None:
                raise TeslaError(f"--{flag.replace('_', '-')}: not used by the {args.source} source (it has an official test split)")
    if args.source == "folder" and args.resolution is None:
        raise TeslaError("--resolution: required for the folder source (e.g. 32 for CIFAR-sized images, 64 for ImageNet-style)")
    opts = SourceOptions(
        input=args.input,
        test_input=args.test_input,
        test_labels=args.test_labels,
        synsets=args.synsets,
        channels=args.channels,
        download=args.download,
        ignore_non_images=args.ignore_non_images,
        test_fraction=args.test_fraction,
        seed=args.seed,
    )
    plan = plan_source(args.source, opts, args.name)
    resolution = args.resolution or plan.default_resolution
    if not resolution:
        raise TeslaError(f"--resolution: required for the {args.source} source (e.g. 32 for CIFAR-sized images, 64 for ImageNet)")
    if resolution < 1 or resolution > 4096:
        raise TeslaError(f"--resolution {resolution}: must be between 1 and 4096")
    report = prepare_dataset(
        plan,
        args.out_dir,
        resolution=resolution,
        rule=args.resize,
        workers=args.workers,
        strict=args.strict,
        reduced=not args.full_decode,
        progress=not args.quiet,
    )
    print(report.summary())
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
        lines.append(f"  wrote {self.out_dir / 'train.h5'}, {self.out_dir / 'test.h5'}, {self.out_dir / REPORT_NAME}")
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
                lines += items
        return "\n".join(lines) + "\n"


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class WorkerPool:
    """A process pool (fork where available) or, for one worker, plain calls in this process."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers or default_workers())
        self._pool = None

    def start(self):
        """The process pool, started on first use (fork where available, else spawn)."""
        if self._pool is None and self.workers > 1:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self._pool = multiprocessing.get_context(method).Pool(self.workers)
        return self._pool

    def ordered_map(self, fn: Callable, tasks: Iterable[tuple], window: int | None = None) -> Iterator[tuple[tuple, object]]:
        """Yield (task, fn(*task)) in task order, keeping at most ``window`` tasks in flight."""
        if self.start() is None:
            for t in tasks:
                yield t, fn(*t)
            return
        window = window or 4 * self.workers
        pending: deque = deque()
        for t in tasks:
            pending.append((t, self._pool.apply_async(fn, t)))
            if len(pending) >= window:
                t0, r = pending.popleft()
                yield t0, r.get()
        while pending:
            t0, r = pending.popleft()
            yield t0, r.get()

    def close(self, ok: bool) -> None:
        if self._pool is not None:
            if ok:
                self._pool.close()
            else:
                self._pool.terminate()
            self._pool.join()
            self._pool = None


def _remove_stale_staging(out_dir: Path) -> None:
    """Remove staging folders left by killed runs (their process no longer exists)."""
    for p in out_dir.iterdir():
        m = _STAGING.match(p.name)
        if not m or not p.is_dir():
            continue
        pid = int(m.group(1))
        alive = True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive or pid == os.getpid():
            shutil.rmtree(p, ignore_errors=True)


def prepare_dataset(
    plan: DatasetPlan,
    out_dir: str | os.PathLike,
    resolution: int,
    rule: str = "box",
    workers: int = 0,
    strict: bool = False,
    reduced: bool = True,
    progress: bool = True,
) -> PrepareReport:
    """Write ``out_dir``/train.h5, test.h5 and prepare_report.txt from ``plan`` (see module doc)."""
    if rule not in RESIZE_RULES:
        raise TeslaError(f"--resize {rule}: choose one of {', '.join(RESIZE_RULES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out_dir)
    staging = out_dir / f".tesla-prepare.{os.getpid()}.tmp"
    staging.mkdir()
    pool = None
    ok = False
    try:
        pool = WorkerPool(workers)
        if any(isinstance(s, EncodedSplit) or s.images.shape[1:3] != (resolution, resolution) for s in (plan.train, plan.test)):
            # start the workers before any HDF5 file is open: forked children must not inherit its descriptor and lock
            pool.start()
        reports = [
            write_split(plan, split, staging / f"{split.split}.h5", resolution, rule, pool, strict, reduced, progress)
            for split in (plan.train, plan.test)
        ]
        pool.close(ok=True)
        header = [
            f"source: {plan.source}",
            f"name: {plan.name}",
            *(f"{k}: {v}" for k, v in plan.attrs.items()),
            f"resolution: {resolution}",
            f"resize rule: {rule}, box filter"
            + (
                f"; JPEGs decoded at reduced size only down to a shorter side >= {min_decoded_side(resolution)} px"
                if reduced
                else "; JPEGs decoded at full size"
            ),
            f"channels: {plan.channels}",
            f"workers: {pool.workers}",
        ]
        report = PrepareReport(plan.source, plan.name, out_dir, resolution, rule, reduced, reports, header)
        (staging / REPORT_NAME).write_text(report.text(), encoding="utf-8")
        final = ["test.h5", REPORT_NAME, "train.h5"]  # train.h5 last: its presence means all are complete
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


def _split_attrs(plan: DatasetPlan, split: EncodedSplit | ArraySplit, rule: str, reduced: bool, resolution: int) -> dict:
    attrs = {f"source_{k}": str(v) for k, v in plan.attrs.items()}
    attrs.update({f"source_{k}": str(v) for k, v in split.attrs.items()})
    attrs["class_order"] = "official label order" if plan.source in ("mnist", "fashion-mnist", "cifar10", "cifar100", "demo") else "sorted class ids"
    if isinstance(split, EncodedSplit):
        attrs["resize_filter"] = "box"
        attrs["jpeg_reduced_decoding"] = bool(reduced)
        attrs["jpeg_min_decoded_side"] = min_decoded_side(resolution) if reduced else 0
    return attrs


def write_split(
    plan: DatasetPlan,
    split: EncodedSplit | ArraySplit,
    path: Path,
    resolution: int,
    rule: str,
    pool: WorkerPool,
    strict: bool,
    reduced: bool,
    progress: bool,
) -> SplitReport:
    """Decode, resize and append one split to a :class:`SplitWriter`, class by class."""
    if isinstance(split, ArraySplit):
        native = split.images.shape[1:3]
        rule_used = "none" if tuple(native) == (resolution, resolution) else rule
    else:
        rule_used = rule
    report = SplitReport(split=split.split, path=path, counts=np.zeros(len(plan.class_ids), dtype=np.int64))
    report.notes += list(split.notes)
    report.ignored += list(getattr(split, "ignored", []))
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
        if isinstance(split, ArraySplit):
            _write_arrays(split, writer, report, resolution, rule, pool, progress, plan.name)
        else:
            _write_encoded(split, writer, report, resolution, rule, plan.mode, pool, strict, reduced, progress, plan.name)
        # ignored files found while listing lazily (inner tars) join the report
        report.ignored = list(dict.fromkeys(report.ignored + list(getattr(split, "ignored", []))))
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
    (fewer, larger HDF5 writes when classes are small; memory stays bounded by ``limit``)."""

    def __init__(self, writer: SplitWriter, limit: int = 16 << 20) -> None:
        self.writer, self.limit = writer, limit
        self.images: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.nbytes = 0

    def add(self, images: np.ndarray, labels: np.ndarray) -> None:
        if len(images):
            self.images.append(images)
            self.labels.append(labels)
            self.nbytes += images.nbytes
        if self.nbytes >= self.limit:
            self.flush()

    def flush(self) -> None:
        if self.images:
            self.writer.append(np.concatenate(self.images), np.concatenate(self.labels))
        self.images, self.labels, self.nbytes = [], [], 0


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True, mininterval=0.5)


def _write_arrays(split: ArraySplit, writer: SplitWriter, report: SplitReport, resolution: int, rule: str, pool: WorkerPool, progress: bool, name: str) -> None:
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


def _write_encoded(
    split: EncodedSplit,
    writer: SplitWriter,
    report: SplitReport,
    resolution: int,
    rule: str,
    mode: str,
    pool: WorkerPool,
    strict: bool,
    reduced: bool,
    progress: bool,
    name: str,
) -> None:
    bar = _bar(split.estimated_total(), f"{name} {split.split}", progress)
    measured = {"bytes": 0, "images": 0}

    def tasks() -> Iterator[tuple]:
        """Blocks of ENCODED_BLOCK images in class order (a block may span small classes)."""
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
            for ref in refs:
                refs_block.append(ref)
                labels_block.append(cf.index)
                if len(refs_block) == ENCODED_BLOCK:
                    yield (refs_block, resolution, rule, mode, reduced, np.asarray(labels_block, dtype=np.int64))
                    refs_block, labels_block = [], []
        if refs_block:
            yield (refs_block, resolution, rule, mode, reduced, np.asarray(labels_block, dtype=np.int64))

    buffer = BlockBuffer(writer)
    try:
        for (refs, *_, labels), result in pool.ordered_map(_decode_task, tasks()):
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
            kept_labels = labels[result.kept]
            buffer.add(result.images, kept_labels)
            report.counts += np.bincount(kept_labels, minlength=len(report.counts))
            bar.update(len(refs))
        buffer.flush()
    finally:
        bar.close()


def _decode_task(refs, resolution, rule, mode, reduced, labels):
    """Worker entry point: one block of images (``labels`` stay with the task in the parent)."""
    return decode_block(refs, resolution, rule, mode, reduced)
