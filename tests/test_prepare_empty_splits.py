"""Every source refuses a split without images, and a train class without images, before it
writes anything, with one message: '<where>: the <split> split has no images (...); nothing was
written: <the fix>'."""

from __future__ import annotations

import io
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prepare_support import jpeg, pattern, prepare, write_cifar10, write_idx_set, write_pickle, write_shard

EMPTY_TEST = re.compile(
    r": the test split has no images( \([^)]*\))?; nothing was written: give a test split that holds images \(or, with a "
    r"source that takes it, hold out part of train with --test-fraction: a class needs two images or more to give one\)"
)


def refused(out: Path, capsys, pattern_: re.Pattern | str) -> str:
    """The run's error, after checking that it names the problem and left no output behind."""
    err = capsys.readouterr().err
    assert re.search(pattern_, err), err
    assert not (out / "train.h5").exists() and not (out / "test.h5").exists() and not (out / "prepare_report.txt").exists()
    return err


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    pattern(seed).save(buf, format="PNG")
    return buf.getvalue()


def test_folder_hold_out_of_one_image_per_class(tmp_path, capsys):
    for cls in ("a", "b"):
        jpeg(tmp_path / "tree" / cls / "only.png", pattern(1), "PNG")
    out = tmp_path / "out"
    assert prepare("folder", "--input", tmp_path / "tree", "--resolution", 8, "--test-fraction", 0.3, "--out-dir", out) == 2
    err = refused(out, capsys, EMPTY_TEST)
    assert f"{tmp_path / 'tree'}: the test split" in err


def test_parquet_hold_out_of_one_image_per_class(tmp_path, capsys):
    rows = [(png(c), f"{c}.png", c) for c in range(3)]
    write_shard(tmp_path / "shards" / "train-00000-of-00001.parquet", rows, "struct", ["a", "b", "c"])
    out = tmp_path / "out"
    assert prepare("parquet", "--input", tmp_path / "shards", "--test-fraction", 0.2, "--resolution", 8, "--out-dir", out) == 2
    refused(out, capsys, EMPTY_TEST)
    assert not out.exists() or not any(out.iterdir()), "refused before the output folder is touched"


def test_parquet_train_class_without_rows(tmp_path, capsys):
    rows = [(png(k), f"{k}.png", c) for k, c in enumerate([0, 0, 2, 2])]
    write_shard(tmp_path / "shards" / "train-00000-of-00001.parquet", rows, "struct", ["a", "b", "c"])
    write_shard(tmp_path / "shards" / "validation-00000-of-00001.parquet", rows[:1], "struct", ["a", "b", "c"])
    out = tmp_path / "out"
    assert prepare("parquet", "--input", tmp_path / "shards", "--resolution", 8, "--out-dir", out) == 2
    refused(out, capsys, r": class 'b' has no images in the train split; nothing was written: give images of every class, or remove the class")


def test_idx_files_without_test_images(tmp_path, capsys):
    write_idx_set(tmp_path / "in", n_test=0)
    out = tmp_path / "out"
    assert prepare("mnist", "--input", tmp_path / "in", "--out-dir", out) == 2
    err = refused(out, capsys, EMPTY_TEST)
    assert "t10k-images-idx3-ubyte.gz: the test split" in err


def test_cifar_test_batch_without_rows(tmp_path, capsys):
    write_cifar10(tmp_path / "in")
    empty = {b"batch_label": b"x", b"labels": [], b"data": np.zeros((0, 3072), np.uint8)}
    (tmp_path / "in/cifar-10-batches-py/test_batch").write_bytes(pickle.dumps(empty))
    out = tmp_path / "out"
    assert prepare("cifar10", "--input", tmp_path / "in", "--out-dir", out) == 2
    refused(out, capsys, EMPTY_TEST)


def test_downsampled_validation_batch_without_rows(tmp_path, capsys):
    """A streamed split knows its size only once read: refused then, before its file is written."""
    (tmp_path / "map_clsloc.txt").write_text("n00000001 1 one\nn00000002 2 two\n")
    rng = np.random.default_rng(0)
    write_pickle(tmp_path / "in/train_data_batch_1", rng.integers(0, 256, (6, 3 * 4 * 4), dtype=np.uint8), [1, 2] * 3)
    np.savez(tmp_path / "in/val_data.npz", data=np.zeros((0, 3 * 4 * 4), np.uint8), labels=np.zeros(0, np.int64))
    out = tmp_path / "out"
    assert prepare("imagenet-downsampled", "--input", tmp_path / "in", "--synsets", tmp_path / "map_clsloc.txt",
                   "--out-dir", out, "--workers", 1) == 2
    err = refused(out, capsys, EMPTY_TEST)
    assert "val_data.npz: the test split has no images (its input holds none)" in err
    assert sorted(p.name for p in out.iterdir()) == [], "the staging folder is gone too"


def test_flat_test_folder_without_images(tmp_path, capsys):
    for cls in ("n00000001", "n00000002"):
        jpeg(tmp_path / "train" / cls / "x.JPEG", pattern(2))
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "readme.txt").write_text("the images come later")
    (tmp_path / "labels.txt").write_text("v1.JPEG n00000001\n")
    out = tmp_path / "out"
    assert prepare("imagenet", "--input", tmp_path / "train", "--test-input", tmp_path / "val", "--test-labels",
                   tmp_path / "labels.txt", "--ignore-non-images", "--out-dir", out) == 2
    refused(out, capsys, EMPTY_TEST)


def test_test_split_of_undecodable_images_only(tmp_path, capsys):
    """Known only once decoded: refused before the split's file is written."""
    for cls in ("a", "b"):
        jpeg(tmp_path / "ds" / "train" / cls / "x.png", pattern(3), "PNG")
        (tmp_path / "ds" / "test" / cls).mkdir(parents=True)
        (tmp_path / "ds" / "test" / cls / "broken.png").write_bytes(png(4)[:40])
    out = tmp_path / "out"
    assert prepare("folder", "--input", tmp_path / "ds", "--resolution", 8, "--out-dir", out, "--workers", 1) == 2
    err = refused(out, capsys, EMPTY_TEST)
    assert "(all 2 of its images are undecodable, e.g. " in err and "broken.png: " in err


@pytest.mark.parametrize("source", ["folder", "imagenet"])
def test_no_test_split_at_all_is_still_asked_for(tmp_path, capsys, source):
    """Not an empty split: a source with no test data at all says how to give one (unchanged)."""
    for cls in ("n00000001", "n00000002"):
        jpeg(tmp_path / "tree" / cls / "x.png", Image.new("RGB", (4, 4)), "PNG")
    assert prepare(source, "--input", tmp_path / "tree", "--resolution", 8, "--out-dir", tmp_path / "out") == 2
    assert "no test split; give --test-input" in capsys.readouterr().err


ONE_CLASS = r": the train split has images of one class only \('{}'\); a classifier needs at least 2 classes"


@pytest.mark.parametrize("layout", ["folder", "tar"])
def test_a_single_class_tree_is_refused(tmp_path, capsys, layout):
    """Trained on one class, a network reaches loss 0 and 100 % and learns nothing: refused."""
    for split in ("train", "test"):
        for k in range(2):
            jpeg(tmp_path / "ds" / split / "cat" / f"{k}.png", pattern(k), "PNG")
    given = tmp_path / "ds"
    if layout == "tar":
        given = tmp_path / "ds.tar"
        with tarfile.open(given, "w") as tar:
            tar.add(tmp_path / "ds", arcname=".")
    out = tmp_path / "out"
    assert prepare("folder", "--input", given, "--resolution", 8, "--out-dir", out) == 2
    err = refused(out, capsys, ONE_CLASS.format("cat"))
    assert f"{given}" in err


def test_downsampled_rows_of_a_single_class_are_refused(tmp_path, capsys):
    """Two classes in the mapping, rows of one: known only once the streamed split is read, refused then."""
    (tmp_path / "map_clsloc.txt").write_text("n00000001 1 one\nn00000002 2 two\n")
    rng = np.random.default_rng(0)
    write_pickle(tmp_path / "in/train_data_batch_1", rng.integers(0, 256, (6, 3 * 4 * 4), dtype=np.uint8), [1] * 6)
    np.savez(tmp_path / "in/val_data.npz", data=rng.integers(0, 256, (2, 3 * 4 * 4), dtype=np.uint8), labels=np.ones(2, np.int64))
    out = tmp_path / "out"
    assert prepare("imagenet-downsampled", "--input", tmp_path / "in", "--synsets", tmp_path / "map_clsloc.txt",
                   "--out-dir", out, "--workers", 1) == 2
    refused(out, capsys, ONE_CLASS.format("n00000001"))
    assert sorted(p.name for p in out.iterdir()) == [], "the staging folder is gone too"
