"""Array sources (demo, idx, CIFAR pickles), --download, and the labels / synsets parsers."""

from __future__ import annotations

import gzip
import pickle
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest

from prepare_support import cifar_batch, idx_bytes, prepare, write_cifar10, write_idx_set
from tesla.data import ImageSplit
from tesla.data.sources import SourceOptions, plan_source
from tesla.data.sources.demo import demo_digits
from tesla.data.sources.tree import read_labels, read_synsets
from tesla.errors import TeslaError


# -- demo -------------------------------------------------------------------------------


def test_demo_source_is_a_fixed_stratified_split_of_all_digits(tmp_path, capsys):
    assert prepare("demo", "--out-dir", str(tmp_path / "a")) == 0
    assert prepare("demo", "--out-dir", str(tmp_path / "b")) == 0
    tr, te = ImageSplit.open(tmp_path / "a/train.h5"), ImageSplit.open(tmp_path / "a/test.h5")
    assert tr.num_images + te.num_images == 1797
    assert (tr.resolution, tr.channels, tr.num_classes) == (8, 1, 10)
    counts_all = np.bincount(np.concatenate([tr.labels, te.labels]), minlength=10)
    assert np.array_equal(np.diff(te.class_offsets), np.round(0.2 * counts_all).astype(int))
    images, labels = demo_digits()
    assert images.max() == 255 and images.min() == 0
    # every stored image is one of the digits of its class, and train and test are disjoint
    pix = {(int(l), im.tobytes()) for im, l in zip(images, labels)}
    got = [(int(l), im.tobytes()) for im, l in zip(np.concatenate([tr.images_uint8(), te.images_uint8()]), np.concatenate([tr.labels, te.labels]))]
    assert all(g in pix for g in got)
    assert ImageSplit.open(tmp_path / "b/train.h5").fingerprint == tr.fingerprint  # fixed split
    assert tr.attrs["resize_rule"] == "none"
    # --resolution upsamples
    assert prepare("demo", "--out-dir", str(tmp_path / "c"), "--resolution", "16") == 0
    up = ImageSplit.open(tmp_path / "c/train.h5")
    assert up.resolution == 16 and up.attrs["resize_rule"] == "box"


# -- MNIST idx ---------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files_are_read_in_class_order(tmp_path, gz):
    data = write_idx_set(tmp_path / "in", gz=gz)
    assert prepare("mnist", "--input", str(tmp_path / "in"), "--out-dir", str(tmp_path / "out")) == 0
    tr = ImageSplit.open(tmp_path / "out/train.h5")
    images, labels = data["train"]
    order = np.argsort(labels, kind="stable")
    assert np.array_equal(tr.images_uint8()[..., 0], images[order])
    assert np.array_equal(tr.labels, labels[order])
    assert tr.class_ids == [str(d) for d in range(10)]
    assert ImageSplit.open(tmp_path / "out/test.h5").num_images == 10


def test_fashion_mnist_in_torchvision_raw_folder_has_item_names(tmp_path):
    write_idx_set(tmp_path / "in/FashionMNIST/raw", gz=False)
    assert prepare("fashion-mnist", "--input", str(tmp_path / "in"), "--out-dir", str(tmp_path / "out")) == 0
    tr = ImageSplit.open(tmp_path / "out/train.h5")
    assert tr.class_names[0] == "T-shirt/top" and tr.class_names[9] == "Ankle boot"


def test_idx_errors_name_the_file(tmp_path):
    write_idx_set(tmp_path / "in")
    f = tmp_path / "in/train-images-idx3-ubyte.gz"
    raw = gzip.decompress(f.read_bytes())
    opts = SourceOptions(input=tmp_path / "in")
    # wrong magic number (a labels file in place of an images file)
    f.write_bytes(gzip.compress((2049).to_bytes(4, "big") + raw[4:]))
    with pytest.raises(TeslaError, match=r"train-images-idx3-ubyte.gz: magic number 2049"):
        plan_source("mnist", opts)
    # truncated pixels
    f.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(TeslaError, match=r"train-images-idx3-ubyte.gz: header announces 30 items"):
        plan_source("mnist", opts)
    # damaged gzip stream
    f.write_bytes(gzip.compress(raw)[:-20])
    with pytest.raises(TeslaError, match=r"train-images-idx3-ubyte.gz: cannot read"):
        plan_source("mnist", opts)
    # count mismatch between images and labels
    f.write_bytes(gzip.compress(idx_bytes(np.zeros((29, 28, 28), np.uint8), 2051)))
    with pytest.raises(TeslaError, match=r"29 images but .*train-labels-idx1-ubyte.gz holds 30 labels"):
        plan_source("mnist", opts)
    # missing file
    f.unlink()
    with pytest.raises(TeslaError, match=r"train-images-idx3-ubyte\[.gz\] not found.*--download"):
        plan_source("mnist", opts)


# -- CIFAR pickles -------------------------------------------------------------------------


def test_cifar10_pickles_folder_and_tar_gz_give_the_same_split(tmp_path):
    x, y = write_cifar10(tmp_path / "in")
    assert prepare("cifar10", "--input", str(tmp_path / "in"), "--out-dir", str(tmp_path / "a")) == 0
    tr = ImageSplit.open(tmp_path / "a/train.h5")
    order = np.argsort(y, kind="stable")
    assert np.array_equal(tr.images_uint8(), x[order])  # pixels decoded from the planar layout
    assert tr.class_ids[0] == "airplane" and tr.num_classes == 10
    assert np.allclose(tr.mean, (x / 255.0).reshape(-1, 3).mean(0), atol=1e-9)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "in/cifar-10-batches-py", arcname="cifar-10-batches-py")
    assert prepare("cifar10", "--input", str(tmp_path / "cifar-10-python.tar.gz"), "--out-dir", str(tmp_path / "b")) == 0
    assert ImageSplit.open(tmp_path / "b/train.h5").fingerprint == tr.fingerprint


def test_cifar100_uses_fine_labels(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    names = [f"c{i:03d}".encode() for i in range(100)]
    (d / "meta").write_bytes(pickle.dumps({b"fine_label_names": names, b"coarse_label_names": names[:20]}))
    batch, x, y = cifar_batch(120, 100, b"fine_labels", 1)
    batch[b"coarse_labels"] = [0] * 120
    (d / "train").write_bytes(pickle.dumps(batch))
    tb, _, _ = cifar_batch(100, 100, b"fine_labels", 2)
    (d / "test").write_bytes(pickle.dumps(tb))
    assert prepare("cifar100", "--input", str(tmp_path), "--out-dir", str(tmp_path / "out")) == 0
    tr = ImageSplit.open(tmp_path / "out/train.h5")
    assert tr.num_classes == 100 and np.array_equal(np.diff(tr.class_offsets), np.bincount(y, minlength=100))


def test_cifar_errors_name_the_file(tmp_path):
    write_cifar10(tmp_path / "in")
    d = tmp_path / "in/cifar-10-batches-py"
    (d / "data_batch_3").write_bytes(b"garbage, not a pickle")
    with pytest.raises(TeslaError, match="data_batch_3: not a readable CIFAR pickle"):
        plan_source("cifar10", SourceOptions(input=tmp_path / "in"))
    (d / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(TeslaError, match=r"data_batch_3: 'data' is uint8 \(2, 100\)"):
        plan_source("cifar10", SourceOptions(input=tmp_path / "in"))
    (d / "data_batch_3").unlink()
    with pytest.raises(TeslaError, match="data_batch_3: missing"):
        plan_source("cifar10", SourceOptions(input=tmp_path / "in"))
    with pytest.raises(TeslaError, match="no cifar-100-python/ batches found"):
        plan_source("cifar100", SourceOptions(input=tmp_path / "in"))


# -- --download -----------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["mnist", "cifar10"])
def test_download_offline_fails_fast_with_instructions(tmp_path, monkeypatch, capsys, source):
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    code = prepare(source, "--input", str(tmp_path / "raw"), "--out-dir", str(tmp_path / "out"), "--download")
    err = capsys.readouterr().err
    assert code == 2 and calls, "torchvision's downloader must have been asked"
    assert "offline" in err and "by hand" in err and str(tmp_path / "raw") in err
    assert not (tmp_path / "out").exists()


def test_download_is_refused_for_sources_without_one(tmp_path, capsys):
    assert prepare("folder", "--input", str(tmp_path), "--out-dir", str(tmp_path / "o"), "--download") == 2
    assert "--download: not used by the folder source (it is for mnist, fashion-mnist, cifar10, cifar100)" in capsys.readouterr().err


# -- labels and synsets ---------------------------------------------------------------------


CLASSES = ["n01440764", "n01443537", "n01484850"]


def test_labels_file_layouts(tmp_path):
    loc = tmp_path / "LOC_val_solution.csv"
    loc.write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000001,n01443537 10 20 30 40 n01443537 1 2 3 4\n"
        "ILSVRC2012_val_00000002,n01484850 5 6 7 8\n"
    )
    lab = read_labels(loc, CLASSES)
    assert lab["ILSVRC2012_val_00000001"] == 1 and lab["ILSVRC2012_val_00000002"] == 2
    for sep in (" ", "\t", ","):
        f = tmp_path / "labels.txt"
        f.write_text(f"file{sep}class\n# comment\n\nimg1.JPEG{sep}n01440764\nsub/img2.png{sep}n01484850{sep}extra\n")
        lab = read_labels(f, CLASSES)
        assert lab["img1.JPEG"] == 0 and lab["img1"] == 0 and lab["img2.png"] == 2 and lab["sub/img2.png"] == 2


def test_labels_file_errors(tmp_path):
    f = tmp_path / "labels.txt"
    f.write_text("a.jpg n01440764\nb.jpg n09999999\n")
    with pytest.raises(TeslaError, match=r"labels.txt, line 2: label 'n09999999' for b.jpg is not a train class"):
        read_labels(f, CLASSES)
    f.write_text("a.jpg n01440764\na.jpg n01443537\n")
    with pytest.raises(TeslaError, match="labelled twice"):
        read_labels(f, CLASSES)
    f.write_text("a.jpg\n")
    with pytest.raises(TeslaError, match="line 1: expected 'file class'"):
        read_labels(f, CLASSES)
    with pytest.raises(TeslaError, match="labels file not found"):
        read_labels(tmp_path / "nope.csv", CLASSES)


def test_synsets(tmp_path):
    f = tmp_path / "LOC_synset_mapping.txt"
    f.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn01484850 great white shark\nn09999999 extra\n")
    assert read_synsets(f, CLASSES) == ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark"]
    with pytest.raises(TeslaError, match="no name for class n01500000"):
        read_synsets(f, CLASSES + ["n01500000"])
