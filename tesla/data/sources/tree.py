"""Class-folder trees and flat labelled folders, on disk or inside uncompressed tars.

A *container* is a folder or an uncompressed tar, listed as (relative path, ref) entries.
Tars are read in place (:mod:`tesla.data.sources.tarscan`): a member is a byte range
(:class:`ImageRef` offset/size) of the tar file, so workers read images with positional
reads and nothing is extracted to disk. A tar member ``<class>.tar`` at the class level (the
layout of ``ILSVRC2012_img_train.tar``) is a class whose images are listed from that inner
tar only when the class is reached.

Rules (documented in docs/formats.md, section *prepare*):

* a class is a top-level folder ``<class>/`` (images anywhere below it, nested folders
  allowed) or a top-level ``<class>.tar``; class index = position in the sorted class names;
* images are files with an image extension (:data:`tesla.data.imaging.IMAGE_EXTENSIONS`),
  taken in sorted path order within their class;
* hidden files (name starting with '.') and files named ``Thumbs.db`` are ignored and
  listed in the report; any other non-image file is an error naming it, unless
  ``--ignore-non-images`` (then ignored and listed);
* an empty class folder (or class tar) is an error naming it;
* tar members with an absolute path or a '..' component are never read: they are set
  aside (:func:`set_aside_unsafe`) and listed in the report with that reason.
"""

from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable

import numpy as np

from tesla.data.imaging import ImageRef, is_image_name
from tesla.data.sources.base import ClassFiles, EncodedSplit
from tesla.data.sources.devkit import GROUND_TRUTH, META, read_devkit, validation_labels
from tesla.data.sources.tarscan import check_uncompressed, tar_members
from tesla.errors import TeslaError

TEST_SPLIT_NAMES = ("test", "val", "validation")
_ALWAYS_IGNORED = {"thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class Entry:
    """A regular file (``ref`` set) or a folder (``ref`` None) of a container; ``problem``
    (tar members only) says why it must not be read."""

    rel: str
    ref: ImageRef | None
    problem: str = ""

    @property
    def parts(self) -> tuple[str, ...]:
        return _path_parts(self.rel)


def _path_parts(rel: str) -> tuple[str, ...]:
    """``PurePosixPath(rel).parts``, by a split on '/' when the path is plain (no empty or '.'
    component, not absolute): the listing of millions of members calls this once per member."""
    parts = rel.split("/")
    if "" in parts or "." in parts:
        return PurePosixPath(rel).parts
    return tuple(parts)


def _base_name(rel: str) -> str:
    """``PurePosixPath(rel).name``, by string operations when the path does not end in '/' or '.'."""
    base = rel.rpartition("/")[2]
    return base if base and base != "." else PurePosixPath(rel).name


def _tar_entries(path: Path, base: int = 0, size: int | None = None, label: str | None = None) -> list[Entry]:
    """The members of a tar (see :func:`tesla.data.sources.tarscan.tar_members`) as entries;
    a file's ref is named ``<label>/<member path>``."""
    label = label or str(path)
    file = str(path)
    return [
        Entry(rel, None if is_dir else ImageRef(f"{label}/{rel}", file, offset, length), problem)
        for rel, offset, length, is_dir, problem in tar_members(path, base, size, label)
    ]


def set_aside_unsafe(entries: list[Entry]) -> tuple[list[Entry], list[str]]:
    """(the entries that may be read, 'name<TAB>reason' report lines of the tar members that
    must not: absolute paths, '..' components). Folders among the latter hold nothing to list."""
    if not any(e.problem for e in entries):
        return entries, []
    unsafe = [f"{e.ref.name}\t{e.problem}" for e in entries if e.problem and e.ref is not None]
    return [e for e in entries if not e.problem], unsafe


def _dir_entries(path: Path) -> list[Entry]:
    entries: list[Entry] = []
    for root, dirs, files in os.walk(path, followlinks=True):
        dirs.sort()
        rel_root = os.path.relpath(root, path)
        for d in dirs:
            entries.append(Entry(d if rel_root == "." else f"{rel_root}/{d}".replace(os.sep, "/"), None))
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = name if rel_root == "." else f"{rel_root}/{name}".replace(os.sep, "/")
            entries.append(Entry(rel, ImageRef(name=full, path=full)))
    return entries


def list_container(path: Path, what: str) -> list[Entry]:
    """All entries of a folder or an uncompressed tar; ``what`` names the setting in errors."""
    path = Path(path)
    if not path.exists():
        raise TeslaError(f"{path}: no such file or folder (given as {what}); check the path")
    if path.is_dir():
        return _dir_entries(path)
    if not tarfile.is_tarfile(path):
        check_uncompressed(path)
        raise TeslaError(f"{path}: neither a folder nor a tar archive (given as {what}); give a class-folder tree or a .tar of one")
    check_uncompressed(path)
    return _tar_entries(path)


def list_readable(path: Path, what: str) -> tuple[list[Entry], list[str]]:
    """:func:`list_container`, the tar members that must not be read set aside as report lines
    (see :func:`set_aside_unsafe`)."""
    return set_aside_unsafe(list_container(path, what))


def subtree(entries: Iterable[Entry], prefix: str) -> list[Entry]:
    """Entries below the folder ``prefix``, with paths relative to it."""
    p = prefix.strip("/") + "/"
    return [Entry(e.rel[len(p):], e.ref) for e in entries if e.rel.startswith(p) and len(e.rel) > len(p)]


def top_folders(entries: Iterable[Entry]) -> set[str]:
    out = set()
    for e in entries:
        parts = e.parts
        if len(parts) > 1 or e.ref is None:
            out.add(parts[0])
    return out


def find_split_folders(entries: list[Entry], prefer: tuple[str, ...] = TEST_SPLIT_NAMES) -> tuple[str, str | None] | None:
    """('train', the first of ``prefer`` present, or None) when the container holds split folders."""
    tops = top_folders(entries)
    if "train" not in tops:
        return None
    test = next((t for t in prefer if t in tops), None)
    return "train", test


def _is_ignorable(name: str) -> bool:
    """Hidden (name starting with '.') or a system file (Thumbs.db, desktop.ini), by the last component."""
    base = _base_name(name)
    return base.startswith(".") or base.lower() in _ALWAYS_IGNORED


def _non_image_error(ref_name: str, where: str) -> TeslaError:
    return TeslaError(
        f"{ref_name}: not an image file (its extension is not one of .jpg .jpeg .png .bmp .gif .tif .webp ...) "
        f"in {where}; move it out of the dataset, rename it if it is an image, or pass --ignore-non-images "
        "to skip such files (they are then listed in prepare_report.txt)"
    )


@dataclass
class ClassTree:
    """Class name -> its images (listed, or a lazily listed inner tar), plus ignored files."""

    classes: dict[str, ClassFiles]
    ignored: list[str]


def _inner_tar_lister(ref: ImageRef, cls: str, ignore_non_images: bool, ignored: list[str]):
    def lister() -> list[ImageRef]:
        size = ref.size if ref.size >= 0 else os.path.getsize(ref.path)
        entries, unsafe = set_aside_unsafe(_tar_entries(Path(ref.path), base=ref.offset, size=size, label=ref.name))
        ignored.extend(unsafe)
        refs: list[ImageRef] = []
        for e in entries:
            if e.ref is None:
                continue
            if is_image_name(e.rel):
                refs.append(e.ref)
            elif _is_ignorable(e.rel) or ignore_non_images:
                ignored.append(f"{e.ref.name}\tnot an image file")
            else:
                raise _non_image_error(e.ref.name, f"class tar {ref.name}")
        if not refs:
            raise TeslaError(f"{ref.name}: class {cls} has no image files; remove the empty class tar or add images")
        refs.sort(key=lambda r: r.name)
        return refs

    return lister


def class_tree(entries: list[Entry], root: str, ignore_non_images: bool) -> ClassTree:
    """Group a container's entries into classes (see the module docstring for the rules)."""
    files: dict[str, list[ImageRef]] = {}
    tars: dict[str, ImageRef] = {}
    folders: set[str] = set()
    ignored: list[str] = []
    for e in entries:
        parts = e.parts
        if e.ref is None:
            if not _is_ignorable(parts[0]):
                folders.add(parts[0])
            continue
        if len(parts) == 1:
            name = parts[0]
            if name.lower().endswith(".tar") and not _is_ignorable(name):
                tars[name[:-4]] = e.ref
            elif _is_ignorable(name) or (ignore_non_images and not is_image_name(name)):
                ignored.append(f"{e.ref.name}\tnot inside a class folder")
            elif is_image_name(name):
                raise TeslaError(
                    f"{e.ref.name}: image not inside a class folder of {root}; a class-folder tree holds "
                    "<class>/<image> (move it into its class folder, or give a flat test folder with --test-input and --test-labels)"
                )
            else:
                raise _non_image_error(e.ref.name, root)
            continue
        cls = parts[0]
        if _is_ignorable(cls) or any(_is_ignorable(p) for p in parts[1:]):
            ignored.append(f"{e.ref.name}\thidden file or folder")
            continue
        folders.add(cls)
        if is_image_name(parts[-1]):
            files.setdefault(cls, []).append(e.ref)
        elif ignore_non_images:
            ignored.append(f"{e.ref.name}\tnot an image file")
        else:
            raise _non_image_error(e.ref.name, f"class folder {root}/{cls}")
    both = sorted(set(tars) & folders)
    if both:
        raise TeslaError(f"{root}: class {both[0]} is both a folder and a .tar; keep one of them")
    classes: dict[str, ClassFiles] = {}
    for cls in sorted(folders | set(tars)):
        if cls in tars:
            ref = tars[cls]
            size = ref.size if ref.size >= 0 else os.path.getsize(ref.path)
            if size < 1024:
                raise TeslaError(f"{ref.name}: class tar {cls}.tar is empty; remove it or re-download it")
            classes[cls] = ClassFiles(index=-1, lister=_inner_tar_lister(ref, cls, ignore_non_images, ignored), nbytes=size)
        else:
            refs = files.get(cls, [])
            if not refs:
                raise TeslaError(f"{root}/{cls}: empty class folder (no image files); remove it or add its images")
            refs.sort(key=lambda r: r.name)
            classes[cls] = ClassFiles(index=-1, refs=refs)
    if not classes:
        raise TeslaError(f"{root}: no class folders found; a class-folder tree holds <class>/<image files>")
    return ClassTree(classes=classes, ignored=ignored)


def encoded_split(split: str, tree: ClassTree, class_ids: list[str], source_path: str, what: str) -> EncodedSplit:
    """Put a tree's classes in the order of ``class_ids`` (the train classes)."""
    index = {c: i for i, c in enumerate(class_ids)}
    unknown = sorted(set(tree.classes) - set(index))
    if unknown:
        raise TeslaError(
            f"{source_path}: {what} has class folder {unknown[0]!r}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + " that is not a train class; remove it or add that class to the train split"
        )
    classes = []
    for i, c in enumerate(class_ids):
        cf = tree.classes.get(c) or ClassFiles(index=i, refs=[])
        cf.index = i
        classes.append(cf)
    return EncodedSplit(split=split, classes=classes, source_path=source_path, ignored=tree.ignored)


# -- flat test folders with a labels file -----------------------------------------------

#: what --test-labels takes, for the errors that list it
LABELS_ACCEPTED = (
    "LOC_val_solution.csv, lines 'file class' (comma, tab or space separated), or the ILSVRC2012 devkit "
    "(ILSVRC2012_devkit_t12.tar.gz as distributed, its extracted folder or that folder's data/)"
)
_LOC_HEADER = re.compile(r"^\s*imageid\s*,\s*predictionstring\s*$", re.IGNORECASE)


def read_labels(path: Path, class_ids: list[str], class_names: list[str] | None = None) -> dict[str, int]:
    """Labels file -> {file name or stem: class index}.

    Accepted layouts: ``LOC_val_solution.csv`` (header ``ImageId,PredictionString``; the
    class is the first token of the prediction string), or lines whose first two fields
    (separated by commas, tabs or spaces) are the file name and the class id; blank lines
    and lines starting with '#' are skipped, and so is a first line that is a header.
    """
    path = Path(path)
    if not path.is_file():
        raise TeslaError(f"{path}: labels file not found (given as --test-labels); check the path")
    index = {c: i for i, c in enumerate(class_ids)}
    by_name = {n: i for i, n in enumerate(class_names or []) if n not in index}
    labels: dict[str, int] = {}
    lines = _label_lines(path)
    loc = bool(lines) and bool(_LOC_HEADER.match(lines[0]))
    first_line = True
    for lineno, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#") or (loc and lineno == 1):
            continue
        if loc:
            key, _, pred = text.partition(",")
            fields = [key.strip(), pred.split()[0] if pred.split() else ""]
        else:
            fields = [t for t in re.split(r"[,\t ]+", text) if t]
        if len(fields) < 2 or not fields[1]:
            hint = f"; a file of class ids alone such as the devkit's {GROUND_TRUTH} needs its meta.mat: give the devkit" if text.isdigit() else ""
            raise TeslaError(f"{path}, line {lineno}: expected 'file class' (comma, tab or space separated), got {line!r}{hint}")
        key, cls = fields[0].strip().strip('"'), fields[1].strip().strip('"')
        was_first, first_line = first_line, False
        if cls in index:
            label = index[cls]
        elif cls in by_name:
            label = by_name[cls]
        elif was_first:
            continue  # a header line such as 'file,class'
        else:
            example = ", ".join(class_ids[:3])
            raise TeslaError(
                f"{path}, line {lineno}: label {cls!r} for {key} is not a train class (classes are e.g. {example}); "
                "fix the labels file or give the matching train data"
            )
        for k in {key, PurePosixPath(key).name, _stem(key)}:
            if k in labels and labels[k] != label:
                raise TeslaError(f"{path}, line {lineno}: {key} is labelled twice with different classes; keep one line")
            labels[k] = label
    if not labels:
        raise TeslaError(f"{path}: no labels found; expected 'file class' lines or a LOC_val_solution.csv")
    return labels


def _label_lines(path: Path) -> list[str]:
    """The lines of a text labels file; anything else is an error listing what is accepted."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except UnicodeDecodeError:
        raise TeslaError(f"{path}: not a text labels file (given as --test-labels); accepted: {LABELS_ACCEPTED}") from None


def _stem(name: str) -> str:
    base = _base_name(name)
    return base.rsplit(".", 1)[0] if "." in base else base


def read_test_labels(
    path: Path,
    class_ids: list[str],
    class_names: list[str],
    image_names: list[str],
    test_source: str,
    train_source: str,
) -> dict[str, int]:
    """{file name or stem: class index} of the test images from ``--test-labels``, told apart by
    content: the ILSVRC2012 devkit (its tar, or folder: :mod:`tesla.data.sources.devkit`),
    else a labels file (:func:`read_labels`)."""
    path = Path(path)
    if not path.exists():
        raise TeslaError(f"{path}: not found (given as --test-labels); check the path. Accepted: {LABELS_ACCEPTED}")
    devkit = read_devkit(path)
    if devkit is not None:
        return validation_labels(devkit, image_names, class_ids, test_source, train_source)
    if path.is_dir() or tarfile.is_tarfile(path):
        raise TeslaError(
            f"{path}: a {'folder' if path.is_dir() else 'tar archive'} without the devkit's data/{META} and "
            f"data/{GROUND_TRUTH} (given as --test-labels); accepted: {LABELS_ACCEPTED}"
        )
    return read_labels(path, class_ids, class_names)


def _flat_images(entries: list[Entry], source_path: str, ignore_non_images: bool) -> tuple[list[Entry], list[str]]:
    """(the image files of a flat test folder, report lines of the files ignored)."""
    images: list[Entry] = []
    ignored: list[str] = []
    for e in entries:
        if e.ref is None:
            continue
        if _is_ignorable(e.rel):
            ignored.append(f"{e.ref.name}\thidden file")
        elif is_image_name(e.parts[-1]):
            images.append(e)
        elif ignore_non_images:
            ignored.append(f"{e.ref.name}\tnot an image file")
        else:
            raise _non_image_error(e.ref.name, source_path)
    return images, ignored


def labelled_flat_split(
    split: str,
    entries: list[Entry],
    labels_path: Path | None,
    class_ids: list[str],
    class_names: list[str],
    source_path: str,
    ignore_non_images: bool,
    train_source: str = "",
) -> EncodedSplit:
    """A flat folder (or tar) of test images labelled by ``--test-labels`` (:func:`read_test_labels`;
    ``train_source`` names the train split in its errors)."""
    if labels_path is None:
        raise TeslaError(
            f"{source_path}: the test images are in one flat folder, so they need a labels file; "
            f"give --test-labels ({LABELS_ACCEPTED}), or sort them into class folders"
        )
    images, ignored = _flat_images(entries, source_path, ignore_non_images)
    names = [e.parts[-1] for e in images]
    labels = read_test_labels(labels_path, class_ids, class_names, names, source_path, train_source)
    per_class: list[list[ImageRef]] = [[] for _ in class_ids]
    for e, name in zip(images, names):
        label = labels.get(e.rel, labels.get(name, labels.get(_stem(name))))
        if label is None:
            raise TeslaError(
                f"{e.ref.name}: test image has no label in {labels_path}; add a line '{name} <class>' "
                "or remove the image from the test input"
            )
        per_class[label].append(e.ref)
    for refs in per_class:
        refs.sort(key=lambda r: r.name)
    classes = [ClassFiles(index=i, refs=r) for i, r in enumerate(per_class)]
    split_obj = EncodedSplit(split=split, classes=classes, source_path=source_path, ignored=ignored, notes=[])
    split_obj.attrs["labels_file"] = str(labels_path)
    return split_obj


def is_flat(entries: list[Entry]) -> bool:
    """True when the container holds image files only at its top level."""
    return all(len(e.parts) == 1 for e in entries if e.ref is not None and is_image_name(e.rel))


def hold_out(train: EncodedSplit, fraction: float, seed: int) -> tuple[EncodedSplit, EncodedSplit]:
    """Split every class into train and test: round(fraction * n_c) test images per class
    (at least one when the class has two or more), chosen by a permutation from ``seed``."""
    if not 0.0 < fraction < 1.0:
        raise TeslaError(f"--test-fraction {fraction}: must be between 0 and 1 (e.g. 0.1)")
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for cf in train.classes:
        refs = cf.list()
        n = len(refs)
        k = int(round(fraction * n))
        if n >= 2:
            k = min(max(k, 1), n - 1)
        else:
            k = 0
        pick = set(rng.permutation(n)[:k].tolist())
        tr.append(ClassFiles(index=cf.index, refs=[r for j, r in enumerate(refs) if j not in pick]))
        te.append(ClassFiles(index=cf.index, refs=[r for j, r in enumerate(refs) if j in pick]))
    note = f"test split held out from train: {fraction:g} of each class, seed {seed}"
    a = EncodedSplit("train", tr, train.source_path, train.ignored, list(train.notes), dict(train.attrs))
    b = EncodedSplit("test", te, train.source_path, [], [note], {"held_out_fraction": fraction, "held_out_seed": seed})
    return a, b


def read_synsets(path: Path, class_ids: list[str]) -> list[str]:
    """Human-readable class names from a ``LOC_synset_mapping.txt``-style file ('wnid name, name2')."""
    path = Path(path)
    if not path.is_file():
        raise TeslaError(f"{path}: synset mapping file not found (given as --synsets); check the path")
    names: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            parts = re.split(r"[\t ,]+", text, maxsplit=1)
            if len(parts) < 2:
                raise TeslaError(f"{path}, line {lineno}: expected '<class id> <name, name2, ...>', got {text!r}")
            names[parts[0]] = parts[1].strip()
    missing = [c for c in class_ids if c not in names]
    if missing:
        raise TeslaError(
            f"{path}: no name for class {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; give the mapping file that matches the data (e.g. LOC_synset_mapping.txt)"
        )
    return [names[c] for c in class_ids]
