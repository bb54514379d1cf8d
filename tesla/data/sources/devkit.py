"""The ILSVRC2012 development kit: ImageNet's class ids and the labels of its validation images.

The devkit (``ILSVRC2012_devkit_t12.tar.gz``, top folder ``ILSVRC2012_devkit_t12/``) numbers
the 1000 classes by *ILSVRC2012 ids* 1..1000, which are not in sorted WordNet-id order:

* ``data/meta.mat``: a MATLAB struct array ``synsets`` with fields ``ILSVRC2012_ID``, ``WNID``,
  ``words``, ``gloss``, ``num_children``, ...; the leaf synsets (no children) with ids 1..1000
  are the classes, the others (ids 1001..1860) internal nodes of the hierarchy, not read;
* ``map_clsloc.txt`` (later devkits): lines 'wnid id name', the same mapping as text;
* ``data/ILSVRC2012_validation_ground_truth.txt``: one id per line, line i the class of the
  validation image ``ILSVRC2012_val_<i as 8 digits>.JPEG``.

As ``--test-labels`` the devkit is accepted as distributed (a tar, gzip-compressed or not,
holding ``<top>/data/``), as its extracted top folder, or as its ``data/`` folder. It labels
exactly the validation images it numbers: the test input must hold the N images
``ILSVRC2012_val_00000001`` .. ``ILSVRC2012_val_<N>`` of its N ground-truth lines (a partial
extraction is an error, not a smaller test split), and its 1000 classes must be the train
split's classes.
"""

from __future__ import annotations

import gzip
import io
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, NamedTuple

import numpy as np

from tesla.errors import TeslaError

NUM_DEVKIT_IDS = 1000
META = "meta.mat"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
VALIDATION_IMAGE = re.compile(r"^ILSVRC2012_val_(\d{8})$")
#: a devkit tar has a few dozen members: a tar with more before its data/ files is something else
MAX_DEVKIT_MEMBERS = 1000
WNID = re.compile(r"^n\d{8}$")


class Synset(NamedTuple):
    """One class of the devkit: WordNet id, ILSVRC2012 id and its words."""

    wnid: str
    ident: int
    words: str


# -- the class mapping: meta.mat or map_clsloc.txt ------------------------------------------


def synsets_from_mat(source: Path | BinaryIO, name: str) -> list[Synset]:
    """The leaf synsets with ids 1..1000 of a devkit ``meta.mat`` (a path or an open binary
    file; ``name`` names it in errors)."""
    from scipy.io import loadmat

    try:
        synsets = loadmat(source, squeeze_me=True)["synsets"]
    except Exception as exc:  # noqa: BLE001
        raise TeslaError(f"{name}: not a readable devkit meta.mat with a 'synsets' table ({type(exc).__name__}: {exc}); give ILSVRC2012_devkit_t12/data/meta.mat") from None
    names = synsets.dtype.names or ()
    if not {"ILSVRC2012_ID", "WNID"} <= set(names):
        raise TeslaError(f"{name}: 'synsets' has fields {names}, not ILSVRC2012_ID and WNID; give the devkit's meta.mat")
    rows = []
    for s in np.atleast_1d(synsets):
        ident = int(s["ILSVRC2012_ID"])
        leaf = "num_children" not in names or int(s["num_children"]) == 0
        if 1 <= ident <= NUM_DEVKIT_IDS and leaf:
            rows.append(Synset(str(s["WNID"]), ident, str(s["words"]) if "words" in names else str(s["WNID"])))
    return rows


def synsets_from_text(path: Path) -> list[Synset]:
    """The classes of a 'wnid id name' file (``map_clsloc.txt``)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            parts = text.split(None, 2)
            if len(parts) < 2 or not WNID.match(parts[0]) or not parts[1].isdigit():
                raise TeslaError(
                    f"{path}, line {lineno}: expected 'wnid id name' (the devkit's map_clsloc.txt layout, e.g. "
                    f"'n02119789 1 kit_fox'), got {text!r}; a 'wnid name' list such as LOC_synset_mapping.txt has no "
                    "devkit ids: give map_clsloc.txt or meta.mat"
                )
            rows.append(Synset(parts[0], int(parts[1]), parts[2].strip() if len(parts) > 2 else parts[0]))
    return rows


def checked_synsets(rows: list[Synset], name: str) -> dict[int, Synset]:
    """The classes by ILSVRC2012 id; ids outside 1..1000 and ids or WordNet ids given twice are errors."""
    if not rows:
        raise TeslaError(f"{name}: no classes with devkit ids 1..1000 found; give the devkit's meta.mat or map_clsloc.txt")
    by_id: dict[int, Synset] = {}
    wnids: set[str] = set()
    for row in rows:
        if not 1 <= row.ident <= NUM_DEVKIT_IDS:
            raise TeslaError(f"{name}: devkit id {row.ident} of {row.wnid} is outside 1..1000; fix the mapping file")
        if row.ident in by_id or row.wnid in wnids:
            raise TeslaError(f"{name}: devkit id {row.ident} or WordNet id {row.wnid} appears twice; fix the mapping file")
        by_id[row.ident] = row
        wnids.add(row.wnid)
    return by_id


def class_mapping(path: Path) -> dict[int, Synset]:
    """The classes by ILSVRC2012 id from ``meta.mat`` or a 'wnid id name' file."""
    rows = synsets_from_mat(path, str(path)) if path.suffix.lower() == ".mat" else synsets_from_text(path)
    return checked_synsets(rows, str(path))


# -- the devkit as distributed --------------------------------------------------------------


@dataclass(frozen=True)
class Devkit:
    """The devkit's two files that label the validation images, read (names: their paths,
    inside a tar ``<tar>/<member>``)."""

    path: Path
    meta_name: str
    truth_name: str
    synsets: dict[int, Synset]
    truth: list[int]


def _folder_files(path: Path) -> tuple[Path, Path] | None:
    """(meta.mat, ground truth) of a devkit folder: the top folder or its data/ folder."""
    for folder in (path / "data", path):
        if (folder / META).is_file() and (folder / GROUND_TRUTH).is_file():
            return folder / META, folder / GROUND_TRUTH
    return None


def _tar_files(path: Path) -> tuple[str, bytes, str, bytes] | None:
    """(member name, bytes) of meta.mat and the ground truth in a devkit tar: ``data/`` at the
    top or one folder down (``ILSVRC2012_devkit_t12/data/``)."""
    found: dict[tuple[str, str], tarfile.TarInfo] = {}
    with tarfile.open(path, "r:*") as tar:
        for count, member in enumerate(tar, start=1):
            parts = PurePosixPath(member.name.removeprefix("./")).parts
            if member.isfile() and parts[-1] in (META, GROUND_TRUTH) and len(parts) in (2, 3) and parts[-2] == "data":
                found[(str(PurePosixPath(*parts[:-1])), parts[-1])] = member
            folders = {folder for folder, _ in found}
            both = [f for f in sorted(folders) if (f, META) in found and (f, GROUND_TRUTH) in found]
            if both:
                meta, truth = found[(both[0], META)], found[(both[0], GROUND_TRUTH)]
                return meta.name, tar.extractfile(meta).read(), truth.name, tar.extractfile(truth).read()
            if count >= MAX_DEVKIT_MEMBERS:
                break
    return None


def _ground_truth(text: str, name: str) -> list[int]:
    """The ids of the ground-truth file, line i = image i; every line an id 1..1000."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise TeslaError(f"{name}: empty; the devkit's ground truth holds one class id per validation image: re-extract the devkit")
    truth = []
    for lineno, line in enumerate(lines, start=1):
        value = line.strip()
        if not value.isdigit() or not 1 <= int(value) <= NUM_DEVKIT_IDS:
            raise TeslaError(
                f"{name}, line {lineno}: expected one ILSVRC2012 class id 1..1000 (line i labels ILSVRC2012_val_<i>), "
                f"got {line!r}; the file is damaged: re-extract it from ILSVRC2012_devkit_t12.tar.gz"
            )
        truth.append(int(value))
    return truth


def read_devkit(path: Path) -> Devkit | None:
    """The devkit at ``path`` (its tar, top folder or data/ folder), or None when ``path`` holds
    no ``data/meta.mat`` beside ``data/ILSVRC2012_validation_ground_truth.txt``."""
    path = Path(path)
    if path.is_dir():
        files = _folder_files(path)
        if files is None:
            return None
        meta, truth = files
        meta_name, synsets, truth_name = str(meta), synsets_from_mat(meta, str(meta)), str(truth)
        text = truth.read_bytes()
    elif path.is_file() and tarfile.is_tarfile(path):
        try:
            members = _tar_files(path)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise TeslaError(
                f"{path}: a damaged archive ({type(exc).__name__}: {exc}) given as --test-labels; download "
                "ILSVRC2012_devkit_t12.tar.gz again"
            ) from None
        if members is None:
            return None
        meta_name, truth_name = f"{path}/{members[0]}", f"{path}/{members[2]}"
        synsets, text = synsets_from_mat(io.BytesIO(members[1]), meta_name), members[3]
    else:
        return None
    by_id = checked_synsets(synsets, meta_name)
    truth = _ground_truth(text.decode("utf-8", errors="replace"), truth_name)
    for lineno, ident in enumerate(truth, start=1):
        if ident not in by_id:
            raise TeslaError(
                f"{truth_name}, line {lineno}: class id {ident} is not a class of {meta_name}; the two files are not "
                "from the same devkit: give ILSVRC2012_devkit_t12.tar.gz as distributed"
            )
    return Devkit(path, meta_name, truth_name, by_id, truth)


# -- the labels of the validation images ----------------------------------------------------


def _and_more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def _check_classes(devkit: Devkit, class_ids: list[str], train_source: str) -> None:
    """The devkit's classes must be the train split's classes."""
    wnids = {s.wnid: s.ident for s in devkit.synsets.values()}
    extra = sorted(set(wnids) - set(class_ids))
    missing = sorted(set(class_ids) - set(wnids))
    fix = "the devkit and the train data must hold the same ImageNet-1K classes: give the matching devkit or train data"
    if extra:
        raise TeslaError(
            f"{devkit.meta_name}: class {extra[0]} (ILSVRC2012 id {wnids[extra[0]]}){_and_more(extra)} is not a class "
            f"of the train split {train_source}; {fix}"
        )
    if missing:
        raise TeslaError(f"{train_source}: train class {missing[0]}{_and_more(missing)} has no ILSVRC2012 id in {devkit.meta_name}; {fix}")


def _image_numbers(devkit: Devkit, image_names: list[str], test_source: str) -> list[int]:
    """The number of each validation image (ILSVRC2012_val_<number>.<ext>); exactly the
    images 1..N of the N ground-truth lines."""
    numbers = []
    for name in image_names:
        match = VALIDATION_IMAGE.match(name.rsplit(".", 1)[0])
        if match is None:
            raise TeslaError(
                f"{test_source}/{name}: not named as an official validation image (ILSVRC2012_val_<8 digits>.JPEG), "
                f"so {devkit.path} (given as --test-labels) has no label for it; give ILSVRC2012_img_val.tar or its "
                "extracted folder, or label these images with 'file class' lines"
            )
        numbers.append(int(match.group(1)))
    expected = set(range(1, len(devkit.truth) + 1))
    if len(numbers) != len(set(numbers)) or set(numbers) != expected:
        missing, beyond = sorted(expected - set(numbers)), sorted(set(numbers) - expected)
        which = (
            f"ILSVRC2012_val_{beyond[0]:08d} is beyond its lines" if beyond
            else f"ILSVRC2012_val_{missing[0]:08d} is missing" if missing
            else "a number appears twice"
        )
        raise TeslaError(
            f"{test_source}: holds {len(numbers)} validation images, but {devkit.truth_name} labels "
            f"{len(devkit.truth)} (ILSVRC2012_val_00000001 .. {len(devkit.truth):08d}); {which}: give the complete "
            "validation set (ILSVRC2012_img_val.tar), or label a subset with 'file class' lines"
        )
    return numbers


def validation_labels(devkit: Devkit, image_names: list[str], class_ids: list[str], test_source: str, train_source: str) -> dict[str, int]:
    """{image name: class index} of the validation images: the class whose WordNet id the
    image's ground-truth id maps to, its index among ``class_ids`` (the train classes)."""
    _check_classes(devkit, class_ids, train_source)
    numbers = _image_numbers(devkit, image_names, test_source)
    index = {c: i for i, c in enumerate(class_ids)}
    return {name: index[devkit.synsets[devkit.truth[n - 1]].wnid] for name, n in zip(image_names, numbers)}
