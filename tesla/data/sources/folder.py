"""Class-folder trees: the ``folder`` source, and the tree reader of the ``imagenet`` source.

Both read a folder or an uncompressed tar (see :mod:`tesla.data.sources.tree`):

* train: ``<class>/**/<image>`` folders, a tar of them, or a tar of per-class tars
  (``ILSVRC2012_img_train.tar``); an input holding ``train/`` and ``test/`` (or ``val/``)
  folders gives both splits;
* test (``--test-input``): a class-folder tree, or a flat folder / tar of images labelled by
  ``--test-labels`` (``LOC_val_solution.csv``, 'file class' lines, or the ILSVRC2012 devkit:
  :mod:`tesla.data.sources.devkit`), e.g. ``ILSVRC2012_img_val.tar``; without one,
  ``--test-fraction`` holds out part of train.

ImageNet class folders must be WordNet ids (``n01440764``); class index = sorted ids.
"""

from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path
from typing import Callable

from tesla.data.imaging import is_image_name
from tesla.data.sources.base import DatasetPlan, EncodedSplit, SourceOptions
from tesla.data.sources.options import (
    CHANNELS,
    IGNORE_NON_IMAGES,
    INPUT,
    SYNSETS,
    TEST_FRACTION,
    TEST_FRACTION_SEED,
    TEST_INPUT,
    TEST_LABELS,
)
from tesla.data.sources.registry import DataSource
from tesla.data.sources.tarscan import member_path
from tesla.data.sources.tree import (
    TEST_SPLIT_NAMES,
    Entry,
    class_tree,
    encoded_split,
    find_split_folders,
    hold_out,
    is_flat,
    labelled_flat_split,
    list_readable,
    read_synsets,
    subtree,
    top_folders,
)
from tesla.errors import TeslaError

WNID = re.compile(r"^n\d{8}$")
#: tar members read by the early look at a tar's layout (:func:`top_level`): its first ones
PEEK_MEMBERS = 5000


def top_level(path: Path) -> tuple[set[str], set[str], bool] | None:
    """(folder names, file names, every member seen) at the top of a folder or an uncompressed
    tar, from a cheap look: a folder's own entries, a tar's first :data:`PEEK_MEMBERS` members;
    hidden names left out. None when it is neither (the planner says why)."""
    folders: set[str] = set()
    files: set[str] = set()
    if path.is_dir():
        for entry in os.scandir(path):
            (folders if entry.is_dir() else files).add(entry.name)
        return {f for f in folders if not f.startswith(".")}, {f for f in files if not f.startswith(".")}, True
    try:
        with tarfile.open(path, "r:") as tar:
            for k, member in enumerate(tar):
                if k >= PEEK_MEMBERS:
                    return folders, files, False
                rel, problem = member_path(member.name)
                if rel is None or problem or rel.startswith("."):
                    continue
                top, _, below = rel.partition("/")
                (folders if below or member.isdir() else files).add(top)
    except (tarfile.TarError, OSError):
        return None
    return folders, files, True


def tree_input_problems(opts: SourceOptions, name: Callable[[str], str]) -> list[str]:
    """What a class-folder tree's paths need together, from a cheap look at them: a test split
    (``test_input``, the input's own train/ beside val/ or test/, or ``test_fraction``), and a
    labels file for a flat test folder. Only what is certain is reported (a tar too long to
    look through is left to ``tesla prepare``)."""
    problems = []
    if opts.input is not None and opts.test_input is None and opts.test_fraction is None:
        top = top_level(Path(opts.input))
        if top is not None and top[2] and not ("train" in top[0] and any(n in top[0] for n in TEST_SPLIT_NAMES)):
            problems.append(
                f"{name('test_input')} is not set, and {opts.input} holds no test split (no train/ folder beside a val/ "
                f"or test/ folder); set it to the test images (class folders, or a flat folder or tar with "
                f"{name('test_labels')}), or hold out part of train with {name('test_fraction')} (e.g. 0.1)"
            )
    if opts.test_input is not None and opts.test_labels is None:
        top = top_level(Path(opts.test_input))
        if top is not None and not top[0] and any(is_image_name(f) for f in top[1]):
            problems.append(
                f"{name('test_labels')} is not set, but {opts.test_input} holds its images in one flat folder, which "
                "says nothing of their classes; set it to the labels file (LOC_val_solution.csv, or 'file class' "
                "lines), or sort the test images into class folders"
            )
    return problems


def _test_split(
    opts: SourceOptions,
    inner: tuple[list[Entry], str] | None,
    class_ids: list[str],
    class_names: list[str],
    train: EncodedSplit,
) -> tuple[EncodedSplit, EncodedSplit]:
    """The test split from --test-input, else the input's test/ or val/ folder, else held out."""
    unsafe: list[str] = []
    if opts.test_input is not None:
        root = str(opts.test_input)
        entries, unsafe = list_readable(opts.test_input, "--test-input")
    elif inner is not None:
        entries, root = inner
    elif opts.test_fraction is not None:
        return hold_out(train, opts.test_fraction, opts.test_fraction_seed)
    else:
        raise TeslaError(
            f"{opts.input}: no test split; give --test-input (a class-folder tree, or a flat folder/tar with "
            "--test-labels), put train/ and test/ folders in the input, or hold out part of train with --test-fraction 0.1"
        )
    if opts.test_fraction is not None:
        raise TeslaError(f"--test-fraction: the input already has a test split ({root}); drop --test-fraction")
    if is_flat(entries):
        test = labelled_flat_split(
            "test", entries, opts.test_labels, class_ids, class_names, root, opts.ignore_non_images, train.source_path
        )
    else:
        if opts.test_labels is not None:
            raise TeslaError(
                f"--test-labels {opts.test_labels}: the test input {root} is sorted into class folders, which give "
                "the labels; drop --test-labels or give a flat test folder"
            )
        test = encoded_split("test", class_tree(entries, root, opts.ignore_non_images), class_ids, root, "the test input")
    test.ignored[:0] = unsafe  # in place: inner tars listed later add to the same list
    return train, test


def plan_tree(opts: SourceOptions, source: str, name: str, wnids: bool, default_resolution: int = 0) -> DatasetPlan:
    """A dataset plan from a class-folder tree (``wnids``: class folders must be WordNet ids)."""
    if opts.input is None:
        raise TeslaError(f"{source}: give --input (a class-folder tree, or a tar of one)")
    entries, unsafe = list_readable(opts.input, "--input")
    root = str(opts.input)
    inner_test = None
    # ImageNet trees (e.g. Kaggle's CLS-LOC/) keep the labelled images in val/ and unlabelled ones in test/
    splits = find_split_folders(entries, ("val", "validation", "test") if wnids else TEST_SPLIT_NAMES)
    if splits is not None:
        extra = sorted(t for t in top_folders(entries) - {"train", *TEST_SPLIT_NAMES} if not t.startswith("."))
        if extra and not wnids:
            raise TeslaError(
                f"{root}: holds train/ and {splits[1] or 'no test'}/ split folders but also {extra[0]!r}; "
                "remove it, or give the class-folder tree itself as --input"
            )
        if splits[1] is not None and opts.test_input is None:
            inner_test = (subtree(entries, splits[1]), f"{root}/{splits[1]}")
        entries, root = subtree(entries, "train"), f"{root}/train"
    tree = class_tree(entries, root, opts.ignore_non_images)
    class_ids = list(tree.classes)
    if wnids:
        bad = [c for c in class_ids if not WNID.match(c)]
        if bad:
            raise TeslaError(
                f"{root}: class {bad[0]!r} is not a WordNet id (n + 8 digits) as in ImageNet's train/<wnid>/ "
                "folders or <wnid>.tar members; give the ImageNet train folder or tar, or use the 'folder' source"
            )
    class_names = read_synsets(opts.synsets, class_ids) if opts.synsets is not None else list(class_ids)
    train = encoded_split("train", tree, class_ids, root, "train")
    train.ignored[:0] = unsafe  # in place: inner tars listed later add to the same list
    train, test = _test_split(opts, inner_test, class_ids, class_names, train)
    attrs = {"input": str(opts.input)}
    if opts.test_input is not None:
        attrs["test_input"] = str(opts.test_input)
    if opts.synsets is not None:
        attrs["synsets_file"] = str(opts.synsets)
    return DatasetPlan(
        source=source,
        name=name,
        class_ids=class_ids,
        class_names=class_names,
        channels=opts.channels or 3,
        default_resolution=default_resolution,
        train=train,
        test=test,
        attrs=attrs,
    )


def plan_folder(opts: SourceOptions, name: str | None = None) -> DatasetPlan:
    """Any class-folder tree (or a tar of one); class index = sorted folder names."""
    if name is None and opts.input is not None:
        name = Path(opts.input).name.split(".")[0] or "folder"
    return plan_tree(opts, "folder", name or "folder", wnids=False)


#: the options of a class-folder tree (the ``imagenet`` source takes them too)
TREE_OPTIONS = (INPUT, TEST_INPUT, TEST_LABELS, SYNSETS, CHANNELS, IGNORE_NON_IMAGES, TEST_FRACTION, TEST_FRACTION_SEED)

SOURCES = (
    DataSource(
        "folder",
        "any <class>/**/<image> tree, or a tar of one",
        plan_folder,
        TREE_OPTIONS,
        {
            "input": "a folder of class folders <class>/<image> (images may sit in nested folders), or one with "
            "train/<class>/... and test/<class>/... (or val/) inside, or an uncompressed .tar of either layout "
            "(e.g. cifar10-jpg.tar)",
            "test_input": "a second class-folder tree, or a flat folder or tar of images labelled by the test labels file",
            "synsets": "lines '<class id> <name, name2, ...>'",
            "resolution": "required",
        },
        resolution_required=True,
        explicit_defaults=("resize",),
        input_problems=tree_input_problems,
    ),
)
