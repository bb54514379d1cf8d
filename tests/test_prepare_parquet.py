"""`tesla prepare parquet`: shards in both image-column layouts give the same splits as the
class-folder tree of the same images; undecodable rows, --strict and missing columns."""

from __future__ import annotations

import re

import numpy as np
import pytest

from prepare_support import interleaved, prepare, write_shard
from tesla.data import ImageSplit


@pytest.fixture(scope="module")
def shards(sample, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("parquet")
    tree = sample["root"] / "tree"
    wnids = sample["wnids"]
    rng = np.random.default_rng(3)
    out = {}
    for split in ("train", "val"):
        per_class = [[(p.read_bytes(), p.name, c) for p in sorted((tree / split / w).iterdir())] for c, w in enumerate(wnids)]
        out[split] = interleaved(per_class, rng)
    half = len(out["train"]) // 2
    for layout, names in (("struct", wnids), ("plain", None)):
        d = root / layout / "data"
        write_shard(d / "train-00000-of-00002.parquet", out["train"][:half], layout, names)
        write_shard(d / "train-00001-of-00002.parquet", out["train"][half:], layout, names)
        write_shard(d / "validation-00000-of-00001.parquet", out["val"], layout, names)
    return dict(root=root, rows=out)


def test_parquet_layouts_equal_the_folder_tree(sample, shards, tmp_path):  # noqa: F811
    r, s = sample["root"], 16
    assert prepare("imagenet", "--input", r / "tree/train", "--test-input", r / "tree/val", "--resolution", s,
                   "--workers", 1, "--out-dir", tmp_path / "tree") == 0
    ref_tr, ref_te = ImageSplit.open(tmp_path / "tree/train.h5"), ImageSplit.open(tmp_path / "tree/test.h5")
    p = shards["root"]
    assert prepare("parquet", "--input", p / "struct", "--resolution", s, "--workers", 2, "--out-dir", tmp_path / "struct") == 0
    assert prepare("parquet", "--input", p / "plain/data/train-*.parquet", "--test-input", p / "plain/data/validation-00000-of-00001.parquet",
                   "--image-column", "img", "--label-column", "y", "--resolution", s, "--workers", 1, "--out-dir", tmp_path / "plain") == 0
    # the imagenet source recognises a folder of shards (64 px by default)
    assert prepare("imagenet", "--input", p / "struct", "--resolution", s, "--out-dir", tmp_path / "auto", "--workers", 1) == 0
    for name in ("struct", "plain", "auto"):
        tr, te = ImageSplit.open(tmp_path / name / "train.h5"), ImageSplit.open(tmp_path / name / "test.h5")
        assert np.array_equal(tr.images_uint8(), ref_tr.images_uint8()), name
        assert np.array_equal(tr.labels, ref_tr.labels) and np.array_equal(te.images_uint8(), ref_te.images_uint8()), name
        assert tr.attrs["source"] == "parquet" and tr.attrs["resize_rule"] == "box"
    struct = ImageSplit.open(tmp_path / "struct/train.h5")
    assert struct.class_ids == sample["wnids"] and struct.fingerprint == ref_tr.fingerprint  # names from the metadata
    assert ImageSplit.open(tmp_path / "plain/train.h5").class_ids == [str(c) for c in range(len(sample["wnids"]))]


def test_undecodable_row_is_skipped_and_reported_or_fails_with_strict(shards, tmp_path, capsys):
    rows = list(shards["rows"]["train"]) * 2  # 4 images per class
    rows[4] = (rows[4][0][:300], rows[4][1], rows[4][2])  # truncated JPEG
    rows[5] = (b"not an image", "x.JPEG", rows[5][2])
    write_shard(tmp_path / "in/shard.parquet", rows, "struct", None)
    args = ("parquet", "--input", tmp_path / "in", "--test-fraction", 0.3, "--resolution", 8, "--workers", 2)
    assert prepare(*args, "--out-dir", tmp_path / "out") == 0
    tr, te = ImageSplit.open(tmp_path / "out/train.h5"), ImageSplit.open(tmp_path / "out/test.h5")
    assert tr.num_images + te.num_images == len(rows) - 2 and int(tr.attrs["num_skipped"]) + int(te.attrs["num_skipped"]) == 2
    report = (tmp_path / "out/prepare_report.txt").read_text()
    assert f"shard.parquet:row 5 (x.JPEG)\tUnidentifiedImageError" in report and "shard.parquet:row 4" in report
    assert prepare(*args, "--strict", "--out-dir", tmp_path / "strict") == 2
    err = capsys.readouterr().err
    assert re.search(r"shard.parquet:row [45] .*cannot decode .*run without --strict to skip it", err)
    assert list((tmp_path / "strict").iterdir()) == []


def test_parquet_errors_name_the_file_and_the_fix(shards, tmp_path, capsys):
    p = shards["root"]
    assert prepare("parquet", "--input", p / "plain/data", "--resolution", 8, "--out-dir", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "train-00000-of-00002.parquet: no column 'image' (columns: img, y)" in err and "--image-column" in err
    assert prepare("parquet", "--input", p / "plain/data", "--image-column", "img", "--label-column", "img",
                   "--resolution", 8, "--out-dir", tmp_path / "o") == 2
    assert "column 'img' is binary, not integer class labels; choose the label column with --label-column" in capsys.readouterr().err
    rows = [(b"x", "a.png", -1)] * 3
    write_shard(tmp_path / "t/train-0.parquet", shards["rows"]["train"], "struct", None)
    write_shard(tmp_path / "t/test-0.parquet", rows, "struct", None)
    assert prepare("parquet", "--input", tmp_path / "t", "--resolution", 8, "--out-dir", tmp_path / "o") == 2
    assert "test-0.parquet: row group 0 holds label -1 (an unlabelled row" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []
