"""ImageNet's validation labels as the official release has them: `--test-labels` takes the
ILSVRC2012 devkit (the .tar.gz as distributed, its extracted folder, or that folder's data/),
whose ground truth numbers the images of ILSVRC2012_img_val.tar by ILSVRC2012 id and whose
meta.mat turns the ids into WordNet ids. A devkit that does not match the data is refused
before anything is written."""

from __future__ import annotations

import shlex
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prepare_support import jpeg, pattern, prepare, write_devkit
from tesla.data import ImageSplit
from tesla.data.sources.workflow import config_properties, prepare_command, raw_data_problems

#: the train classes and their ILSVRC2012 ids (not in sorted WordNet-id order)
IDS = {"n01440764": 449, "n01443537": 1, "n01484850": 391, "n01491361": 3}
WNIDS = sorted(IDS)
#: the class (index into WNIDS) of validation image i + 1
VAL_CLASSES = [2, 0, 3, 3, 1, 0, 2, 2, 1]
SIZE = 8


def val_name(i: int) -> str:
    return f"ILSVRC2012_val_{i:08d}.JPEG"


def truth() -> list[int]:
    return [IDS[WNIDS[c]] for c in VAL_CLASSES]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict:
    """The official layouts in miniature: ILSVRC2012_img_train.tar (a tar of <wnid>.tar, two
    images each), ILSVRC2012_img_val.tar (flat ILSVRC2012_val_<n>.JPEG) and the devkit, plus a
    'file wnid' list of the same labels, written from VAL_CLASSES directly."""
    root = tmp_path_factory.mktemp("release")
    for k, w in enumerate(WNIDS):
        for j in range(2):
            jpeg(root / "train" / w / f"{w}_{j}.JPEG", pattern(10 * k + j), quality=95)
        with tarfile.open(root / f"{w}.tar", "w") as tar:
            tar.add(root / "train" / w, arcname=".")
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as tar:
        for w in WNIDS:
            tar.add(root / f"{w}.tar", arcname=f"{w}.tar")
    for i in range(1, len(VAL_CLASSES) + 1):
        jpeg(root / "val" / val_name(i), pattern(100 + i), quality=95)
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as tar:
        for i in range(1, len(VAL_CLASSES) + 1):
            tar.add(root / "val" / val_name(i), arcname=val_name(i))
    (root / "val_labels.txt").write_text("".join(f"{val_name(i + 1)} {WNIDS[c]}\n" for i, c in enumerate(VAL_CLASSES)))
    devkit = write_devkit(root / "devkit", IDS, truth())
    return dict(root=root, train=root / "ILSVRC2012_img_train.tar", val=root / "ILSVRC2012_img_val.tar", **devkit)


def run(release: dict, labels: Path, out: Path, test_input: Path | None = None) -> int:
    return prepare("imagenet", "--input", release["train"], "--test-input", test_input or release["val"],
                   "--test-labels", labels, "--resolution", SIZE, "--out-dir", out, "--workers", 1)


def test_devkit_as_distributed_and_extracted_labels_the_validation_images(release, tmp_path):
    root = release["root"]
    assert run(release, root / "val_labels.txt", tmp_path / "reference") == 0
    reference = ImageSplit.open(tmp_path / "reference/test.h5")
    for layout in ("tar", "folder", "data"):
        out = tmp_path / layout
        assert run(release, release[layout], out) == 0, layout
        te = ImageSplit.open(out / "test.h5")
        assert te.class_ids == WNIDS and te.fingerprint == reference.fingerprint, layout
        assert te.attrs["source_labels_file"] == str(release[layout])
    # each image is in the class its ground-truth id maps to (meta.mat), in file order
    te = ImageSplit.open(tmp_path / "tar/test.h5")
    assert list(np.diff(te.class_offsets)) == [VAL_CLASSES.count(c) for c in range(len(WNIDS))]
    for c in range(len(WNIDS)):
        files = [root / "val" / val_name(i + 1) for i, k in enumerate(VAL_CLASSES) if k == c]
        expect = np.stack([np.asarray(Image.open(f).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BOX)) for f in files])
        assert np.array_equal(te.class_images(c), expect), c
    # the extracted validation folder is labelled the same
    assert run(release, release["tar"], tmp_path / "valfolder", test_input=root / "val") == 0
    assert ImageSplit.open(tmp_path / "valfolder/test.h5").fingerprint == reference.fingerprint


def bad_devkit(folder: Path, leaves: dict[str, int] = IDS, lines: list[int] | None = None, text: str | None = None) -> Path:
    devkit = write_devkit(folder, leaves, truth() if lines is None else lines)["tar"]
    if text is not None:
        (folder / "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt").write_text(text)
        return folder / "ILSVRC2012_devkit_t12"
    return devkit


BAD_DEVKITS = {
    "too_few_lines": (dict(lines=truth()[:-1]), ["holds 9 validation images, but", "labels 8", "ILSVRC2012_val_00000009 is beyond"]),
    "too_many_lines": (dict(lines=truth() + [1]), ["holds 9 validation images, but", "labels 10", "ILSVRC2012_val_00000010 is missing"]),
    "id_out_of_range": (dict(lines=truth()[:4] + [1001] + truth()[5:]), ["ground_truth.txt, line 5: expected one ILSVRC2012 class id 1..1000", "'1001'"]),
    "id_zero": (dict(text="449\n0\n"), ["ground_truth.txt, line 2: expected one ILSVRC2012 class id 1..1000"]),
    "not_an_id": (dict(text="449\n\n3\n"), ["ground_truth.txt, line 2: expected one ILSVRC2012 class id"]),
    "id_without_synset": (dict(lines=truth()[:3] + [500] + truth()[4:]), ["ground_truth.txt, line 4: class id 500 is not a class of", "meta.mat"]),
    "wnid_not_a_train_class": (
        dict(leaves={**IDS, "n09999999": 7}),
        ["meta.mat: class n09999999 (ILSVRC2012 id 7) is not a class of the train split", "ILSVRC2012_img_train.tar"],
    ),
    "train_class_not_in_meta": (
        dict(leaves={w: i for w, i in IDS.items() if w != WNIDS[1]}, lines=[IDS[WNIDS[c]] for c in VAL_CLASSES if c != 1]),
        [f"ILSVRC2012_img_train.tar: train class {WNIDS[1]} has no ILSVRC2012 id in", "meta.mat"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DEVKITS))
def test_devkit_that_does_not_match_fails_clearly_and_writes_nothing(release, tmp_path, capsys, case):
    kwargs, messages = BAD_DEVKITS[case]
    out = tmp_path / "out"
    assert run(release, bad_devkit(tmp_path / "devkit", **kwargs), out) == 2
    err = capsys.readouterr().err
    for message in messages:
        assert message in err, (case, err)
    assert not out.exists() or not any(out.iterdir())


def test_labels_that_are_not_a_devkit_nor_a_labels_file(release, tmp_path, capsys):
    out = tmp_path / "out"
    accepted = "accepted: LOC_val_solution.csv, lines 'file class'"
    (tmp_path / "empty").mkdir()
    with tarfile.open(tmp_path / "other.tar.gz", "w:gz") as tar:
        tar.add(release["folder"] / "readme.txt", arcname="readme.txt")
    (tmp_path / "damaged.tar.gz").write_bytes(release["tar"].read_bytes()[:600])
    cases = {
        tmp_path / "damaged.tar.gz": ["damaged.tar.gz: a damaged archive", "download ILSVRC2012_devkit_t12.tar.gz again"],
        tmp_path / "empty": ["empty: a folder without the devkit's data/meta.mat", accepted],
        tmp_path / "other.tar.gz": ["other.tar.gz: a tar archive without the devkit's data/meta.mat", accepted],
        release["data"] / "meta.mat": ["meta.mat: not a text labels file", accepted],
        release["data"] / "ILSVRC2012_validation_ground_truth.txt": ["line 1: expected 'file class'", "needs its meta.mat: give the devkit"],
        tmp_path / "missing": ["missing: not found (given as --test-labels)", "ILSVRC2012_devkit_t12.tar.gz"],
    }
    for labels, messages in cases.items():
        assert run(release, labels, out) == 2, labels
        err = capsys.readouterr().err
        for message in messages:
            assert message in err, (labels, err)
        assert not out.exists()


def test_devkit_labels_only_the_official_validation_images(release, tmp_path, capsys):
    val = tmp_path / "val"
    shutil.copytree(release["root"] / "val", val)
    (val / val_name(3)).rename(val / "holiday.JPEG")
    assert run(release, release["tar"], tmp_path / "out", test_input=val) == 2
    err = capsys.readouterr().err
    assert "holiday.JPEG: not named as an official validation image" in err and "'file class' lines" in err
    (val / "holiday.JPEG").unlink()
    assert run(release, release["folder"], tmp_path / "out", test_input=val) == 2
    err = capsys.readouterr().err
    assert "holds 8 validation images" in err and "ILSVRC2012_val_00000003 is missing" in err


def test_workflow_entry_with_the_devkit_as_test_labels(release, tmp_path):
    """A dataset entry's `test_labels` key takes the devkit (tar or folder): its raw-data check
    passes and its prepare command line labels the validation images."""
    defaults = {k: v["default"] for k, v in config_properties().items() if "default" in v}
    for layout in ("tar", "folder"):
        entry = {**defaults, "source": "imagenet", "input": str(release["train"]), "test_input": str(release["val"]),
                 "test_labels": str(release[layout]), "resolution": SIZE}
        assert raw_data_problems(entry, "datasets.in1k") == []
        command = prepare_command(entry, "in1k")
        assert f"--test-labels {release[layout]}" in command
        out = tmp_path / layout
        assert prepare(*shlex.split(command), "--out-dir", out, "--workers", 1) == 0
        te = ImageSplit.open(out / "test.h5")
        assert list(np.diff(te.class_offsets)) == [VAL_CLASSES.count(c) for c in range(len(WNIDS))]
