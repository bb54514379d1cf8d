"""Array sources (demo, idx, CIFAR pickles), --download, and the labels / synsets parsers."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tesla.cli import main
from tesla.data import ImageSplit
from tesla.data.sources import SourceOptions, plan_source
from tesla.data.sources.demo import demo_digits
from tesla.data.sources.tree import read_labels, read_synsets
from tesla.errors import TeslaError


def prepare(*argv: str) -> int:
    return main(["prepare", *argv, "--quiet"])


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


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, n_train=30, n_test=10, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        for kind, arr, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
            raw = idx_bytes(arr, magic)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)
        data[prefix] = (images, labels)
    return data


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


def cifar_batch(n: int, num_classes: int, labels_key: bytes, seed: int) -> tuple[dict, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hwc = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, n)
    labels[:num_classes] = np.arange(num_classes)  # every class present
    data = hwc.transpose(0, 3, 1, 2).reshape(n, 3072)  # official channel-planar rows
    return {b"batch_label": b"x", labels_key: labels.tolist(), b"data": data}, hwc, labels


def write_cifar10(folder: Path, per_batch=12) -> tuple[np.ndarray, np.ndarray]:
    d = folder / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")]
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}))
    all_x, all_y = [], []
    for i in range(1, 6):
        batch, x, y = cifar_batch(per_batch, 10, b"labels", i)
        (d / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
        all_x.append(x)
        all_y.append(y)
    batch, _, _ = cifar_batch(10, 10, b"labels", 99)
    (d / "test_batch").write_bytes(pickle.dumps(batch))
    return np.concatenate(all_x), np.concatenate(all_y)


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
    assert "--download: only mnist" in capsys.readouterr().err


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


# -- tar listing ----------------------------------------------------------------------------


def tarfile_view(path: Path) -> list[tuple]:
    """The entries the tar lister must give, read with tarfile directly: (path, None) for a
    folder, (path, data offset, size) for a regular file; other members left out."""
    out = []
    with tarfile.open(path) as tar:
        for m in tar:
            rel = m.name
            while rel.startswith("./"):
                rel = rel[2:]
            rel = rel.strip("/")
            if not rel or rel == ".":
                continue
            if m.isdir():
                out.append((rel, None))
            elif m.isfile():
                out.append((rel, m.offset_data, m.size))
    return out


def lister_view(path: Path) -> list[tuple]:
    from tesla.data.sources.tree import list_container

    return [(e.rel, None) if e.ref is None else (e.rel, e.ref.offset, e.ref.size) for e in list_container(path, "--input")]


@pytest.fixture
def no_tarfile_fallback(monkeypatch):
    """Fail if the lister hands the archive to tarfile (the archive should be read natively)."""
    from tesla.data.sources import tree

    def refuse(*args):
        raise AssertionError("the lister fell back to tarfile")

    monkeypatch.setattr(tree, "_tarfile_entries", refuse)


def member_tree(root: Path) -> Path:
    """Files and folders with the names tar formats treat differently: long (> 100 bytes) names
    and long folder paths, non-ASCII names, an empty file, a symlink and a hard link."""
    (root / "a" / ("deep_" * 25)).mkdir(parents=True)
    (root / "a" / ("deep_" * 25) / ("long_name_" * 12 + ".jpg")).write_bytes(b"x" * 1000)
    (root / "a" / "caf\u00e9 \u6771\u4eac.png").write_bytes(b"y" * 513)
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "b").mkdir()
    (root / "b" / "short.jpg").write_bytes(bytes(range(256)) * 40)
    (root / "b" / "link.jpg").symlink_to(root / "b" / "short.jpg")
    os.link(root / "b" / "short.jpg", root / "b" / "hard.jpg")
    return root


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_lister_gives_tarfiles_entries(tmp_path, fmt, no_tarfile_fallback):
    root = member_tree(tmp_path / "src")
    tar_path = tmp_path / "t.tar"
    with tarfile.open(tar_path, "w", format=fmt) as tar:
        for p in sorted(root.rglob("*")):
            try:
                tar.add(p, arcname=f"./{p.relative_to(root)}", recursive=False)
            except ValueError:  # "name is too long": beyond ustar's prefix (155) + name (100)
                assert fmt == tarfile.USTAR_FORMAT
    expected = tarfile_view(tar_path)
    assert any(len(e[0]) > 100 for e in expected), "a long name (ustar: prefix/name) is in the archive"
    assert any(e[0].endswith("caf\u00e9 \u6771\u4eac.png") for e in expected)
    assert lister_view(tar_path) == expected


def test_tar_lister_on_the_sample_tar(datasets_dir, tmp_path, no_tarfile_fallback):
    """The ImageNet-layout tar of the benchmark (Python's tarfile writes a pax header per member)."""
    sample = datasets_dir / "imagenet-sample" / "train"
    if not sample.is_dir():
        pytest.skip(f"{sample} not found")
    tar_path = tmp_path / "sample.tar"
    with tarfile.open(tar_path, "w") as tar:
        for f in sorted(sample.rglob("*")):
            tar.add(f, arcname=f"train/{f.relative_to(sample)}", recursive=False)
    expected = tarfile_view(tar_path)
    assert len([e for e in expected if e[1] is not None]) == len([f for f in sample.rglob("*") if f.is_file()])
    assert lister_view(tar_path) == expected


def _set_header(data: bytearray, at: int, field: slice, value: bytes) -> None:
    """Write ``value`` into a header field and recompute the header's checksum."""
    data[field] = value
    data[at + 148 : at + 156] = b" " * 8
    data[at + 148 : at + 156] = b"%06o\0 " % sum(data[at : at + 512])


def test_tar_lister_reads_base256_sizes_and_skips_global_headers(tmp_path, no_tarfile_fallback):
    """GNU tar writes sizes of 8 GiB and more in base-256; a global pax header ('g') is skipped."""
    tar_path = tmp_path / "t.tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "made for a test"}) as tar:
        for name, size in (("c/one.jpg", 700), ("c/two.jpg", 3000)):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(b"z" * size))
    data = bytearray(tar_path.read_bytes())
    assert data[156:157] == b"g"
    with tarfile.open(tar_path) as tar:
        second = [m for m in tar][1]
    at = second.offset_data - 512  # the header of c/two.jpg
    assert data[at : at + 9] == b"c/two.jpg"
    _set_header(data, at, slice(at + 124, at + 136), b"\x80" + (3000).to_bytes(11, "big"))
    tar_path.write_bytes(bytes(data))
    expected = tarfile_view(tar_path)
    assert [e[0] for e in expected] == ["c/one.jpg", "c/two.jpg"] and expected[1][2] == 3000
    assert lister_view(tar_path) == expected


def test_tar_lister_leaves_unusual_archives_to_tarfile(tmp_path, monkeypatch):
    """A Solaris 'X' extended header (read by tarfile like 'x') is listed by tarfile."""
    from tesla.data.sources import tree

    tar_path = tmp_path / "t.tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("c/" + "n" * 120 + ".jpg")  # > 100 bytes: a pax 'x' header carries the path
        info.size = 10
        tar.addfile(info, io.BytesIO(b"q" * 10))
    data = bytearray(tar_path.read_bytes())
    assert data[156:157] == b"x"
    _set_header(data, 0, slice(156, 157), b"X")
    tar_path.write_bytes(bytes(data))
    calls = []
    real = tree._tarfile_entries
    monkeypatch.setattr(tree, "_tarfile_entries", lambda *a: calls.append(a) or real(*a))
    assert lister_view(tar_path) == tarfile_view(tar_path) == [("c/" + "n" * 120 + ".jpg", 1536, 10)]
    assert len(calls) == 1


def _two_member_tar(path: Path) -> tuple[bytes, int]:
    """An ustar tar of c/a.jpg (1000 bytes) and c/b.jpg (3000 bytes), and where b's header starts."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, size in (("c/a.jpg", 1000), ("c/b.jpg", 3000)):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(b"w" * size))
    return path.read_bytes(), 512 + 1024


@pytest.mark.parametrize(
    "cut, message",
    [
        (512 + 1024 + 512 + 2000, "c/b.jpg runs past the end of the archive (truncated download?)"),
        (512 + 1024 + 300, "damaged tar archive (truncated header at byte 1536)"),
        (512 + 1024 + 512 + 3000 + 10, "damaged tar archive (unexpected end of data at byte 5120)"),
    ],
)
def test_truncated_tar_is_reported(tmp_path, cut, message):
    data, _ = _two_member_tar(tmp_path / "full.tar")
    (tmp_path / "t.tar").write_bytes(data[:cut])
    with pytest.raises(TeslaError, match=re.escape(message)):
        lister_view(tmp_path / "t.tar")


def test_damaged_tar_headers_are_reported(tmp_path):
    from tesla.data.sources.tree import _tar_entries

    data, second = _two_member_tar(tmp_path / "full.tar")
    damaged = bytearray(data)
    damaged[second + 3] ^= 0x01  # a bit flipped in c/b.jpg's name
    (tmp_path / "t.tar").write_bytes(bytes(damaged))
    with pytest.raises(TeslaError, match=re.escape("damaged tar archive (bad checksum at byte 1536); re-download")):
        lister_view(tmp_path / "t.tar")
    damaged = bytearray(data)
    damaged[124 + 5] ^= 0x02  # a bit flipped in c/a.jpg's size: also caught before any entry is used
    (tmp_path / "t.tar").write_bytes(bytes(damaged))
    with pytest.raises(TeslaError, match=re.escape("not a readable tar archive (bad checksum)")):
        _tar_entries(tmp_path / "t.tar")
    (tmp_path / "t.tar").write_bytes(b"")
    with pytest.raises(TeslaError, match=re.escape("not a readable tar archive (empty file)")):
        _tar_entries(tmp_path / "t.tar")
