"""`tesla prepare imagenet-downsampled`: Downsampled-ImageNet pickle and .npz batches, devkit
class ids with and without a mapping, identity with the raw source, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prepare_support import prepare, write_pickle
from tesla.data import ImageSplit
from tesla.data.imaging import resize_array
from tesla.data.sources.downsampled import is_downsampled_input


def test_downsampled_batches_equal_the_raw_source(sample, tmp_path, capsys):
    """Raw JPEG tree (default rule, full decoding) == downsampled batches built with Pillow's box resize."""
    r, s = sample["root"], sample["size"]
    assert prepare("imagenet", "--input", r / "tree/train", "--test-input", r / "tree/val", "--resolution", s,
                   "--full-decode", "--workers", 1, "--out-dir", tmp_path / "raw") == 0
    runs = {
        "pickle_map": ("imagenet-downsampled", "--input", r / "pickle", "--synsets", r / "map_clsloc.txt"),
        "npz_mat": ("imagenet-downsampled", "--input", r / "npz", "--synsets", r / "meta.mat", "--workers", 2),
        # the imagenet source recognises the batches; --test-input names val_data explicitly
        "auto": ("imagenet", "--input", r / "pickle/train_data_batch_*", "--test-input", r / "pickle/val_data",
                 "--synsets", r / "map_clsloc.txt"),
    }
    raw_tr, raw_te = ImageSplit.open(tmp_path / "raw/train.h5"), ImageSplit.open(tmp_path / "raw/test.h5")
    for name, args in runs.items():
        assert prepare(*args, "--out-dir", tmp_path / name) == 0, name
        tr, te = ImageSplit.open(tmp_path / name / "train.h5"), ImageSplit.open(tmp_path / name / "test.h5")
        assert np.array_equal(tr.images_uint8(), raw_tr.images_uint8()), name
        assert np.array_equal(te.images_uint8(), raw_te.images_uint8()), name
        assert (tr.fingerprint, te.fingerprint) == (raw_tr.fingerprint, raw_te.fingerprint), name
        assert tr.class_ids == sample["wnids"] and tr.class_names[0] == f"name_of_{sample['wnids'][0]}"
        assert tr.attrs["class_order"] == "sorted class ids" and tr.attrs["source"] == "imagenet-downsampled"
        assert tr.attrs["resize_rule"] == "none" and tr.resolution == s
    assert is_downsampled_input(r / "npz") and not is_downsampled_input(r / "tree/train")


def test_without_mapping_the_devkit_order_is_kept_and_said(tmp_path, capsys):
    rng = np.random.default_rng(1)
    labels = np.concatenate([np.arange(1, 1001), rng.integers(1, 1001, 200)])
    rng.shuffle(labels)
    data = rng.integers(0, 256, (len(labels), 3 * 8 * 8), dtype=np.uint8)
    write_pickle(tmp_path / "in/train_data_batch_1", data, labels)
    np.savez(tmp_path / "in/val_data.npz", data=data[:50], labels=labels[:50])
    assert prepare("imagenet-downsampled", "--input", tmp_path / "in", "--out-dir", tmp_path / "out", "--workers", 1) == 0
    out = capsys.readouterr().out
    assert "devkit id order" in out and "--synsets meta.mat" in out
    tr = ImageSplit.open(tmp_path / "out/train.h5")
    assert tr.attrs["class_order"] == "devkit-ids-unmapped" and tr.class_ids[:3] == ["1", "2", "3"] and tr.num_classes == 1000
    pixels = data.reshape(-1, 3, 8, 8).transpose(0, 2, 3, 1)
    for c in (0, 499, 999):  # class c = devkit id c + 1, rows in file order
        assert np.array_equal(tr.class_images(c), pixels[labels == c + 1])
    assert "devkit id order" in (tmp_path / "out/prepare_report.txt").read_text()
    # another S than the files': box-resized from the stored pixels
    assert prepare("imagenet-downsampled", "--input", tmp_path / "in", "--resolution", 4, "--out-dir", tmp_path / "o4",
                   "--workers", 2) == 0
    t4 = ImageSplit.open(tmp_path / "o4/train.h5")
    assert t4.attrs["resize_rule"] == "box" and np.array_equal(t4.class_images(7)[0], resize_array(pixels[labels == 8][0], 4))


def _damage(kind: str, folder: Path) -> str:
    rng = np.random.default_rng(2)
    good = rng.integers(0, 256, (20, 3 * 4 * 4), dtype=np.uint8)
    lab = np.arange(20) % 10 + 1
    write_pickle(folder / "train_data_batch_1", good, lab)
    np.savez(folder / "val_data.npz", data=good[:5], labels=lab[:5])
    if kind == "row length":
        write_pickle(folder / "train_data_batch_2", rng.integers(0, 256, (20, 100), dtype=np.uint8), lab)
        return r"train_data_batch_2: rows of 'data' hold 100 values, not 3 x S x S .*re-download"
    if kind == "mixed":
        write_pickle(folder / "train_data_batch_2", rng.integers(0, 256, (20, 3 * 8 * 8), dtype=np.uint8), lab)
        return r"train_data_batch_2: 8 x 8 images, but .*val_data.npz holds 4 x 4; give batches of one resolution"
    if kind == "label range":
        write_pickle(folder / "train_data_batch_2", good, np.where(lab == 3, 1001, lab))
        return r"train_data_batch_2: label 1001 \(row 2\) is outside the devkit ids 1..1000"
    if kind == "not mapped":
        write_pickle(folder / "train_data_batch_2", good, np.where(lab == 3, 77, lab))
        return r"train_data_batch_2: label 77 \(row 2\) has no class in .*map.txt; give the complete mapping"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["row length", "mixed", "label range", "not mapped"])
def test_bad_batches_fail_naming_the_file_without_output(tmp_path, capsys, kind):
    message = _damage(kind, tmp_path / "in")
    (tmp_path / "map.txt").write_text("".join(f"n{i:08d} {i} c{i}\n" for i in range(1, 11)))
    out = tmp_path / "out"
    assert prepare("imagenet-downsampled", "--input", tmp_path / "in", "--synsets", tmp_path / "map.txt",
                   "--out-dir", out, "--workers", 1) == 2
    import re

    assert re.search(message, capsys.readouterr().err), kind
    assert list(out.iterdir()) == []  # no output, no staging folder left


def test_mapping_file_errors(tmp_path, capsys):
    _damage("row length", tmp_path / "in")
    (tmp_path / "loc.txt").write_text("n01440764 tench, Tinca tinca\n")
    assert prepare("imagenet-downsampled", "--input", tmp_path / "in", "--synsets", tmp_path / "loc.txt", "--out-dir", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "loc.txt, line 1: expected 'wnid id name'" in err and "give map_clsloc.txt or meta.mat" in err
    (tmp_path / "in/val_data.npz").unlink()
    assert prepare("imagenet-downsampled", "--input", tmp_path / "in", "--out-dir", tmp_path / "o") == 2
    assert "no val_data or val_data.npz; give the validation batch with --test-input" in capsys.readouterr().err


def test_the_devkit_as_distributed_maps_the_classes_as_its_meta_mat(tmp_path, capsys):
    """--synsets takes ILSVRC2012_devkit_t12.tar.gz, its folder or its data/ folder: the same
    split as its meta.mat; a folder or tar without a devkit is refused, naming what is accepted."""
    from prepare_support import write_devkit

    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(1, 11), 3)
    data = rng.integers(0, 256, (len(labels), 3 * 8 * 8), dtype=np.uint8)
    write_pickle(tmp_path / "in/train_data_batch_1", data, labels)
    np.savez(tmp_path / "in/val_data.npz", data=data[:10], labels=labels[:10])
    leaves = {f"n{9 - k:08d}": k + 1 for k in range(10)}  # devkit id order is not the WordNet id order
    kit = write_devkit(tmp_path / "kit", leaves, truth=[1, 2, 3])
    outs = {}
    for name, mapping in [("mat", kit["data"] / "meta.mat"), *kit.items()]:
        assert prepare("imagenet-downsampled", "--input", tmp_path / "in", "--synsets", mapping, "--workers", 1,
                       "--out-dir", tmp_path / name) == 0, capsys.readouterr().err
        outs[name] = ImageSplit.open(tmp_path / name / "train.h5")
    assert outs["mat"].class_ids == sorted(leaves)
    for name, split in outs.items():
        assert split.class_ids == outs["mat"].class_ids and split.fingerprint == outs["mat"].fingerprint, name
    assert np.array_equal(outs["tar"].class_images(0), data.reshape(-1, 3, 8, 8).transpose(0, 2, 3, 1)[labels == 10])
    (tmp_path / "empty").mkdir()
    assert prepare("imagenet-downsampled", "--input", tmp_path / "in", "--synsets", tmp_path / "empty",
                   "--out-dir", tmp_path / "bad") == 2
    err = capsys.readouterr().err
    assert "empty: no devkit here" in err and "give ILSVRC2012_devkit_t12.tar.gz, its extracted folder" in err
    assert not (tmp_path / "bad").exists() or list((tmp_path / "bad").iterdir()) == []
