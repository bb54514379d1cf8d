"""Tiny ImageNet as distributed, prepared through the workflow.

tiny-imagenet-200/ holds train/<wnid>/images/<wnid>_<k>.JPEG with a <wnid>_boxes.txt beside
the images folder of every class, val/images/val_<k>.JPEG labelled by val/val_annotations.txt
('file<TAB>wnid<TAB>box'), and words.txt ('wnid<TAB>names'). The text files in the class
folders need `tesla prepare --ignore-non-images`, which the workflow passes for the config key
`ignore_non_images: true`. A small tree of this layout (generated 64 x 64 JPEGs) is prepared
by the real `snakemake` and `tesla prepare`.

Time budget: about 20 s on 2 cores.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from workflow_support import SNAKEMAKE, make_workdir, planned_jobs, snakemake, write_config
from tesla.data import ImageSplit

pytestmark = pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed in this environment")

WNIDS = ["n01443537", "n01629819", "n02099601"]
TRAIN_PER_CLASS = 3
VAL_LABELS = [2, 0, 1, 0, 2]  # class of val_0 .. val_4


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((64, 64), Image.Resampling.BILINEAR)


def tiny_imagenet(root):
    """The tiny-imagenet-200 layout, 3 classes."""
    for c, wnid in enumerate(WNIDS):
        folder = root / "train" / wnid
        (folder / "images").mkdir(parents=True)
        boxes = []
        for k in range(TRAIN_PER_CLASS):
            picture(10 * c + k).save(folder / "images" / f"{wnid}_{k}.JPEG", quality=90)
            boxes.append(f"{wnid}_{k}.JPEG\t0\t0\t63\t63")
        (folder / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for k, c in enumerate(VAL_LABELS):
        picture(100 + k).save(root / "val" / "images" / f"val_{k}.JPEG", quality=90)
        lines.append(f"val_{k}.JPEG\t{WNIDS[c]}\t1\t2\t60\t61")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "test" / "images").mkdir(parents=True)
    picture(999).save(root / "test" / "images" / "test_0.JPEG")  # unlabelled: not used
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    words = {"n01443537": "goldfish, Carassius auratus", "n01629819": "European fire salamander", "n02099601": "golden retriever",
             "n00001740": "entity"}
    (root / "words.txt").write_text("".join(f"{w}\t{n}\n" for w, n in words.items()))
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("wf-tiny")
    root = tiny_imagenet(base / "tiny-imagenet-200")
    workdir = make_workdir(base / "work")
    entry = {
        "source": "imagenet",
        "input": str(root / "train"),
        "test_input": str(root / "val" / "images"),
        "test_labels": str(root / "val" / "val_annotations.txt"),
        "synsets": str(root / "words.txt"),
        "ignore_non_images": True,
        "resolution": 64,
        "distill": {1: {"iterations": 1}},
    }
    write_config(workdir, {"datasets": {"tiny": entry}}, "tiny.yaml")
    result = snakemake(workdir, "resources/tiny/train.h5", "resources/tiny/test.h5", "--cores", "2", "--configfile", "tiny.yaml")
    log = workdir / "results" / "logs" / "prepare" / "tiny.log"
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + (log.read_text() if log.exists() else "")
    return workdir, root


def test_tiny_imagenet_is_prepared_through_the_workflow(prepared):
    workdir, root = prepared
    train, test = ImageSplit.open(workdir / "resources/tiny/train.h5"), ImageSplit.open(workdir / "resources/tiny/test.h5")
    assert train.class_ids == WNIDS and train.class_names[0] == "goldfish, Carassius auratus"
    assert list(np.diff(train.class_offsets)) == [TRAIN_PER_CLASS] * len(WNIDS)
    assert list(np.diff(test.class_offsets)) == np.bincount(VAL_LABELS, minlength=len(WNIDS)).tolist()
    assert (train.resolution, train.attrs["resize_rule"]) == (64, "box")
    # 64 x 64 JPEGs are stored as decoded: the first image of class 1 is its first file's pixels
    expected = np.asarray(Image.open(root / "train" / WNIDS[1] / "images" / f"{WNIDS[1]}_0.JPEG").convert("RGB"))
    assert np.array_equal(train.class_images(1)[0], expected)
    report = (workdir / "resources/tiny/prepare_report.txt").read_text()
    for wnid in WNIDS:
        assert f"{root / 'train' / wnid / f'{wnid}_boxes.txt'}\tnot an image file" in report


def test_the_prepared_data_is_up_to_date(prepared):
    workdir, _ = prepared
    result = snakemake(workdir, "resources/tiny/train.h5", "resources/tiny/test.h5", "--dry-run", "--cores", "1", "--configfile", "tiny.yaml")
    assert result.returncode == 0, result.stderr
    assert planned_jobs(result.stdout + result.stderr) == {}


def test_without_the_key_the_text_files_stop_prepare_naming_them(prepared, tmp_path):
    workdir, root = prepared
    cfg = yaml.safe_load((workdir / "tiny.yaml").read_text())
    cfg["datasets"]["tiny"]["ignore_non_images"] = False
    write_config(workdir, cfg, "strict.yaml")
    result = snakemake(workdir, "resources/tiny/train.h5", "--cores", "1", "--configfile", "strict.yaml", "--forcerun", "prepare")
    assert result.returncode != 0
    log = (workdir / "results" / "logs" / "prepare" / "tiny.log").read_text()
    assert f"{WNIDS[0]}_boxes.txt: not an image file" in log and "--ignore-non-images" in log
