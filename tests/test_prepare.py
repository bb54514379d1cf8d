"""`tesla prepare` end to end: class-folder trees, ImageNet layouts (folders, tars, tar of tars),
bad input, interrupted runs, and the real MNIST and CIFAR-10 data."""

from __future__ import annotations

import gzip
import io
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import require_dataset
from prepare_support import jpeg, pattern, prepare
from tesla.data import ImageSplit

ROOT = Path(__file__).resolve().parents[1]


def make_tar(tar_path: Path, folder: Path, arc_root: str = "") -> Path:
    with tarfile.open(tar_path, "w") as tar:
        for p in sorted(folder.rglob("*")):
            tar.add(p, arcname=str(Path(arc_root) / p.relative_to(folder)) if arc_root else str(p.relative_to(folder)), recursive=False)
    return tar_path


def pil_reference(path_or_bytes, size: int) -> np.ndarray:
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    return np.asarray(Image.open(src).convert("RGB").resize((size, size), Image.Resampling.BOX))


# -- class-folder trees ---------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path) -> Path:
    """A small tree: 3 classes, nested subfolders, a hidden file, odd image modes."""
    root = tmp_path / "tree"
    jpeg(root / "cat/a/b/deep.jpg", pattern(1))
    jpeg(root / "cat/top.jpeg", pattern(2))
    jpeg(root / "cat/grey.png", pattern(3).convert("L"), "PNG")
    jpeg(root / "dog/x.JPEG", pattern(4).convert("CMYK"))
    jpeg(root / "dog/y.JPEG", pattern(5), "PNG")  # a PNG saved with a .JPEG name
    jpeg(root / "eel/pal.gif", pattern(6).convert("P"), "GIF")
    jpeg(root / "eel/alpha.png", pattern(7).convert("RGBA"), "PNG")
    (root / "eel/.DS_Store").write_bytes(b"\x00\x01")
    return root


def test_folder_tree_with_nested_subfolders_and_odd_modes(tree, tmp_path):
    out = tmp_path / "out"
    assert prepare("folder", "--input", tree, "--resolution", 16, "--out-dir", out, "--test-fraction", 0.5, "--workers", 1) == 0
    tr, te = ImageSplit.open(out / "train.h5"), ImageSplit.open(out / "test.h5")
    assert tr.class_ids == ["cat", "dog", "eel"]
    assert tr.num_images + te.num_images == 7
    assert list(np.diff(tr.class_offsets) + np.diff(te.class_offsets)) == [3, 2, 2]
    assert int(tr.attrs["num_converted"]) + int(te.attrs["num_converted"]) == 5  # L, CMYK, PNG-as-JPEG, P, RGBA
    report = (out / "prepare_report.txt").read_text()
    for needle in ("CMYK to RGB", "PNG named .JPEG", "L to RGB", "P to RGB", "RGBA to RGB", ".DS_Store"):
        assert needle in report
    # every stored image is Pillow's conversion + box resize of one of its class's files
    refs = {c: [pil_reference(p, 16) for p in sorted((tree / c).rglob("*")) if p.is_file() and not p.name.startswith(".")] for c in tr.class_ids}
    for split in (tr, te):
        for c in range(3):
            for img in split.class_images(c):
                assert any(np.array_equal(img, r) for r in refs[split.class_ids[c]])


def test_folder_with_train_and_test_folders_and_its_tar_agree(tree, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(tree, ds / "train")
    jpeg(ds / "test/cat/t1.jpg", pattern(11))
    jpeg(ds / "test/eel/nested/t2.jpg", pattern(12))
    assert prepare("folder", "--input", ds, "--resolution", 8, "--out-dir", tmp_path / "a", "--workers", 1) == 0
    a_tr, a_te = ImageSplit.open(tmp_path / "a/train.h5"), ImageSplit.open(tmp_path / "a/test.h5")
    assert a_tr.num_images == 7 and list(np.diff(a_te.class_offsets)) == [1, 0, 1]
    assert "class(es) without test images: dog" in (tmp_path / "a/prepare_report.txt").read_text()
    tar = make_tar(tmp_path / "ds.tar", ds, "./")
    assert prepare("folder", "--input", tar, "--resolution", 8, "--out-dir", tmp_path / "b", "--workers", 2) == 0
    assert ImageSplit.open(tmp_path / "b/train.h5").fingerprint == a_tr.fingerprint
    assert ImageSplit.open(tmp_path / "b/test.h5").fingerprint == a_te.fingerprint


def test_flat_test_folder_with_labels_file(tree, tmp_path):
    flat = tmp_path / "flat"
    jpeg(flat / "v1.jpg", pattern(21))
    jpeg(flat / "v2.png", pattern(22), "PNG")
    jpeg(flat / "v3.jpg", pattern(23))
    labels = tmp_path / "labels.tsv"
    labels.write_text("file\tclass\nv1.jpg\teel\nv2\tcat\nv3.jpg\teel\nnot_there.jpg\tdog\n")
    out = tmp_path / "out"
    assert prepare("folder", "--input", tree, "--test-input", flat, "--test-labels", labels, "--resolution", 8, "--out-dir", out) == 0
    te = ImageSplit.open(out / "test.h5")
    assert list(np.diff(te.class_offsets)) == [1, 0, 2]
    assert np.array_equal(te.class_images(0)[0], pil_reference(flat / "v2.png", 8))


@pytest.mark.parametrize(
    "damage, message",
    [
        ("empty_class", "eel: empty class folder"),
        ("non_image", "notes.txt: not an image file"),
        ("loose_image", "stray.jpg: image not inside a class folder"),
        ("missing", "no such file or folder (given as --input)"),
        ("gzip", "gzip-compressed tar cannot be read in place"),
    ],
)
def test_bad_trees_fail_early_naming_the_file(tree, tmp_path, capsys, damage, message):
    src = tree
    if damage == "empty_class":
        shutil.rmtree(tree / "eel")
        (tree / "eel").mkdir()
    elif damage == "non_image":
        (tree / "dog/notes.txt").write_text("hello")
    elif damage == "loose_image":
        jpeg(tree / "stray.jpg", pattern(9))
    elif damage == "missing":
        src = tmp_path / "nowhere"
    elif damage == "gzip":
        src = tmp_path / "tree.tar.gz"
        with tarfile.open(src, "w:gz") as t:
            t.add(tree, arcname="tree")
    out = tmp_path / "out"
    assert prepare("folder", "--input", src, "--resolution", 8, "--out-dir", out, "--test-fraction", 0.3) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (out / "train.h5").exists() and not (out / "test.h5").exists()


def test_non_image_files_can_be_ignored_and_listed(tree, tmp_path):
    (tree / "dog/notes.txt").write_text("hello")
    out = tmp_path / "out"
    assert prepare("folder", "--input", tree, "--resolution", 8, "--out-dir", out, "--test-fraction", 0.3, "--ignore-non-images") == 0
    assert "notes.txt\tnot an image file" in (out / "prepare_report.txt").read_text()


def test_labels_errors(tree, tmp_path, capsys):
    flat = tmp_path / "flat"
    jpeg(flat / "v1.jpg", pattern(21))
    jpeg(flat / "v2.jpg", pattern(22))
    labels = tmp_path / "labels.csv"
    labels.write_text("v1.jpg,eel\n")
    args = ["folder", "--input", tree, "--test-input", flat, "--resolution", 8, "--out-dir", tmp_path / "o"]
    assert prepare(*args, "--test-labels", labels) == 2
    assert "v2.jpg: test image has no label in" in capsys.readouterr().err
    labels.write_text("v1.jpg,eel\nv2.jpg,fox\n")
    assert prepare(*args, "--test-labels", labels) == 2
    assert "line 2: label 'fox' for v2.jpg is not a train class" in capsys.readouterr().err
    assert prepare(*args) == 2
    assert "need a labels file; give --test-labels" in capsys.readouterr().err
    assert prepare("folder", "--input", tree, "--resolution", 8, "--out-dir", tmp_path / "o") == 2
    assert "no test split" in capsys.readouterr().err
    assert not (tmp_path / "o/train.h5").exists()


def test_truncated_image_is_skipped_and_reported_or_fails_with_strict(tree, tmp_path, capsys):
    data = (tree / "cat/top.jpeg").read_bytes()
    (tree / "cat/top.jpeg").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    args = ["folder", "--input", tree, "--resolution", 8, "--out-dir", out, "--test-fraction", 0.3]
    assert prepare(*args, "--strict") == 2
    assert "top.jpeg: cannot decode" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir()), "a failed run leaves nothing behind"
    assert prepare(*args) == 0
    assert "1 skipped" in capsys.readouterr().out
    with h5py.File(out / "train.h5") as f_tr, h5py.File(out / "test.h5") as f_te:
        skipped = [s.decode() for s in f_tr["skipped"][()]] + [s.decode() for s in f_te["skipped"][()]]
        assert int(f_tr.attrs["num_skipped"]) + int(f_te.attrs["num_skipped"]) == 1
    assert len(skipped) == 1 and skipped[0].startswith(str(tree / "cat/top.jpeg"))
    assert str(tree / "cat/top.jpeg") in (out / "prepare_report.txt").read_text()


# -- ImageNet layouts built from the shared sample ------------------------------------------


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory, datasets_dir):
    """12 classes of the shared sample as: train/<wnid>/ folders, a tar of them, a tar of
    per-class tars (ILSVRC2012_img_train.tar), and a flat val folder, its tar, a LOC csv and a
    'file class' list. Class 0 also holds a CMYK JPEG and a PNG named .JPEG; one val image is
    truncated."""
    sample = require_dataset(datasets_dir, "imagenet-sample/train")
    root = tmp_path_factory.mktemp("imagenet")
    wnids = sorted(p.name for p in sample.iterdir())[:12]
    train, val = root / "train", root / "val"
    val.mkdir()
    solution = ["ImageId,PredictionString"]
    plain = []
    k = 0
    for i, w in enumerate(wnids):
        src = next((sample / w).iterdir())
        (train / w).mkdir(parents=True)
        shutil.copy(src, train / w / src.name)
        img = Image.open(src)
        jpeg(train / w / f"{w}_2.JPEG", img.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT), quality=90)
        for _ in range(2 if i < 3 else 1):
            k += 1
            name = f"ILSVRC2012_val_{k:08d}"
            jpeg(val / f"{name}.JPEG", img.convert("RGB").rotate(90 * k, expand=True), quality=85)
            solution.append(f"{name},{w} 1 2 3 4 {w} 5 6 7 8")
            plain.append(f"{name}.JPEG {w}")
    jpeg(train / wnids[0] / f"{wnids[0]}_cmyk.JPEG", Image.open(next((sample / wnids[0]).iterdir())).convert("RGB").convert("CMYK"))
    jpeg(train / wnids[0] / f"{wnids[0]}_png.JPEG", Image.open(next((sample / wnids[1]).iterdir())).convert("RGB"), "PNG")
    bad = val / "ILSVRC2012_val_00000001.JPEG"
    bad.write_bytes(bad.read_bytes()[:2000])
    (root / "LOC_val_solution.csv").write_text("\n".join(solution) + "\n")
    (root / "val_labels.txt").write_text("\n".join(plain) + "\n")
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} name of {w}, alias\n" for w in sorted(p.name for p in sample.iterdir())))
    make_tar(root / "train_folders.tar", train)
    inner = root / "inner"
    inner.mkdir()
    for w in reversed(wnids):  # outer member order need not be sorted
        make_tar(inner / f"{w}.tar", train / w)
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as tar:
        for w in reversed(wnids):
            tar.add(inner / f"{w}.tar", arcname=f"{w}.tar")
    make_tar(root / "ILSVRC2012_img_val.tar", val)
    return dict(root=root, wnids=wnids, train=train, val=val)


def test_imagenet_layouts_give_identical_splits(imagenet, tmp_path):
    r = imagenet["root"]
    common = ["--synsets", r / "LOC_synset_mapping.txt", "--resolution", 32, "--workers", 2]
    runs = {
        "folders": ["--input", imagenet["train"], "--test-input", imagenet["val"], "--test-labels", r / "LOC_val_solution.csv"],
        "tar": ["--input", r / "train_folders.tar", "--test-input", r / "ILSVRC2012_img_val.tar", "--test-labels", r / "val_labels.txt"],
        "tar_of_tars": ["--input", r / "ILSVRC2012_img_train.tar", "--test-input", r / "ILSVRC2012_img_val.tar", "--test-labels", r / "LOC_val_solution.csv"],
    }
    prints = {}
    for name, args in runs.items():
        assert prepare("imagenet", *args, *common, "--out-dir", tmp_path / name) == 0
        tr, te = ImageSplit.open(tmp_path / name / "train.h5"), ImageSplit.open(tmp_path / name / "test.h5")
        prints[name] = (tr.fingerprint, te.fingerprint)
    assert len(set(prints.values())) == 1, prints
    tr, te = ImageSplit.open(tmp_path / "folders/train.h5"), ImageSplit.open(tmp_path / "folders/test.h5")
    wnids = imagenet["wnids"]
    assert tr.class_ids == wnids and tr.class_names[0] == f"name of {wnids[0]}, alias"
    assert list(np.diff(tr.class_offsets)) == [4] + [2] * 11
    assert int(tr.attrs["num_converted"]) >= 2 and tr.attrs["resize_rule"] == "box"
    assert list(np.diff(te.class_offsets)) == [1, 2, 2] + [1] * 9  # one val image is truncated: skipped
    assert int(te.attrs["num_skipped"]) == 1
    report = (tmp_path / "tar_of_tars/prepare_report.txt").read_text()
    assert "ILSVRC2012_val_00000001.JPEG" in report and "CMYK to RGB" in report and "PNG named .JPEG" in report
    # pixels: train image 1 of class 1 is the box-resized sample file (sorted order within class)
    for c in range(len(wnids)):
        files = sorted((imagenet["train"] / wnids[c]).iterdir())
        if min(Image.open(files[0]).size) < 512:  # no reduced-size decoding: exactly Pillow's pixels
            assert np.array_equal(tr.class_images(c)[0], pil_reference(files[0], 32))


def test_imagenet_class_folders_as_validation_and_non_wnid_error(imagenet, tmp_path, capsys):
    val_tree = tmp_path / "valtree"
    for w in imagenet["wnids"][:4]:
        src = next((imagenet["train"] / w).iterdir())
        jpeg(val_tree / w / "v.JPEG", Image.open(src).convert("RGB"))
    assert prepare("imagenet", "--input", imagenet["train"], "--test-input", val_tree, "--out-dir", tmp_path / "o", "--workers", 1) == 0
    te = ImageSplit.open(tmp_path / "o/test.h5")
    assert te.resolution == 64 and list(np.diff(te.class_offsets)) == [1] * 4 + [0] * 8
    jpeg(val_tree / "cats" / "v.JPEG", pattern(1))
    assert prepare("imagenet", "--input", val_tree, "--test-fraction", 0.5, "--out-dir", tmp_path / "p") == 2
    assert "class 'cats' is not a WordNet id" in capsys.readouterr().err


def test_imagenet_folder_with_train_val_and_unlabelled_test(imagenet, tmp_path):
    """Kaggle's CLS-LOC layout: train/<wnid>/, flat val/ (labelled by the csv), flat unlabelled test/."""
    kaggle = tmp_path / "CLS-LOC"
    kaggle.mkdir()
    (kaggle / "train").symlink_to(imagenet["train"], target_is_directory=True)
    (kaggle / "val").symlink_to(imagenet["val"], target_is_directory=True)
    jpeg(kaggle / "test/ILSVRC2012_test_00000001.JPEG", pattern(3))
    out = tmp_path / "out"
    assert prepare("imagenet", "--input", kaggle, "--test-labels", imagenet["root"] / "LOC_val_solution.csv",
                   "--out-dir", out, "--resolution", 16, "--resize", "center-crop", "--channels", 1, "--workers", 1) == 0
    tr, te = ImageSplit.open(out / "train.h5"), ImageSplit.open(out / "test.h5")
    assert (tr.num_images, te.num_images, tr.channels, tr.attrs["resize_rule"]) == (26, 14, 1, "center-crop")
    f = sorted((imagenet["train"] / imagenet["wnids"][2]).iterdir())[0]
    img = Image.open(f)
    if min(img.size) < 512:
        w, h = img.size
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        expect = np.asarray(img.convert("L").resize((16, 16), Image.Resampling.BOX, box=box))
        assert np.array_equal(tr.class_images(2)[0][..., 0], expect)


def test_killed_run_leaves_no_output_and_rerun_succeeds(imagenet, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tesla.cli", "prepare", "imagenet", "--input", str(imagenet["root"] / "ILSVRC2012_img_train.tar"),
           "--test-input", str(imagenet["val"]), "--test-labels", str(imagenet["root"] / "LOC_val_solution.csv"),
           "--out-dir", str(out), "--workers", "1", "--resolution", "64", "--full-decode", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if any(out.glob(".tesla-prepare.*.tmp/*")):  # a split is being written
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "train.h5").exists() and not (out / "test.h5").exists()
    assert any(out.glob(".tesla-prepare.*.tmp")), "the killed run's staging folder is left"
    assert prepare("imagenet", "--input", imagenet["root"] / "ILSVRC2012_img_train.tar", "--test-input", imagenet["val"],
                   "--test-labels", imagenet["root"] / "LOC_val_solution.csv", "--out-dir", out, "--workers", 1) == 0
    assert ImageSplit.open(out / "train.h5").num_images == 26
    assert sorted(p.name for p in out.iterdir()) == ["prepare_report.txt", "test.h5", "train.h5"]


# -- real data ------------------------------------------------------------------------------


def test_real_mnist(datasets_dir, tmp_path):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    folder = require_dataset(datasets_dir, "mnist")
    out = tmp_path / "mnist"
    assert prepare("mnist", "--input", folder, "--out-dir", out) == 0
    for split, prefix, n in (("train", "train", 60000), ("test", "t10k", 10000)):
        s = ImageSplit.open(out / f"{split}.h5")
        assert s.num_images == n and (s.resolution, s.channels) == (28, 1)
        # independent reader: torchvision's idx parser on the decompressed files
        for kind in ("images-idx3", "labels-idx1"):
            (tmp_path / f"{prefix}-{kind}-ubyte").write_bytes(gzip.decompress((folder / f"{prefix}-{kind}-ubyte.gz").read_bytes()))
        images = read_image_file(str(tmp_path / f"{prefix}-images-idx3-ubyte")).numpy()
        labels = read_label_file(str(tmp_path / f"{prefix}-labels-idx1-ubyte")).numpy()
        order = np.argsort(labels, kind="stable")
        assert np.array_equal(s.labels, labels[order])
        assert np.array_equal(s.images_uint8()[..., 0], images[order])


@pytest.mark.slow
def test_real_cifar10_jpeg_tar_end_to_end(datasets_dir, tmp_path):
    tar_path = require_dataset(datasets_dir, "cifar10-jpg.tar")
    out = tmp_path / "cifar"
    assert prepare("folder", "--input", tar_path, "--resolution", 32, "--out-dir", out, "--name", "cifar10", "--workers", 2) == 0
    tr, te = ImageSplit.open(out / "train.h5"), ImageSplit.open(out / "test.h5")
    assert (tr.num_images, te.num_images) == (50000, 10000)
    assert list(np.diff(tr.class_offsets)) == [5000] * 10 and list(np.diff(te.class_offsets)) == [1000] * 10
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert tr.class_ids == classes and int(tr.attrs["num_skipped"]) == 0
    # independent statistics: decode every train JPEG with Pillow straight from the tar
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    firsts = {}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            if not (m.isfile() and m.name.startswith("train/")):
                continue
            px = np.asarray(Image.open(tar.extractfile(m)).convert("RGB"), dtype=np.float64) / 255.0
            total += px.sum((0, 1))
            total_sq += (px**2).sum((0, 1))
            count += px.shape[0] * px.shape[1]
            cls = m.name.split("/")[1]
            if cls not in firsts or m.name < firsts[cls][0]:
                firsts[cls] = (m.name, (px * 255).round().astype(np.uint8))
    mean = total / count
    std = np.sqrt(total_sq / count - mean**2)
    assert np.allclose(tr.mean, mean, atol=1e-4) and np.allclose(tr.std, std, atol=1e-4)
    for c, cls in enumerate(classes):  # first image of each class = its first file in sorted order
        assert np.array_equal(tr.class_images(c)[0], firsts[cls][1])


@pytest.mark.parametrize("geometry,filter_name", [("box", "lanczos"), ("center-crop", "bicubic")])
def test_resize_filter_option_is_applied_and_recorded(tmp_path, geometry, filter_name):
    root = tmp_path / "tree"
    files = {c: [jpeg(root / c / f"{k}.png", pattern(10 * i + k, 48, 40), "PNG") for k in range(2)] for i, c in enumerate("ab")}
    out = tmp_path / "out"
    assert prepare("folder", "--input", root, "--resolution", 8, "--test-fraction", 0.5, "--resize", geometry,
                   "--resize-filter", filter_name, "--out-dir", out, "--workers", 1) == 0
    filt = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC}[filter_name]
    box = (4.0, 0.0, 44.0, 40.0) if geometry == "center-crop" else None  # the centred 40x40 square
    refs = {c: [np.asarray(Image.open(f).convert("RGB").resize((8, 8), filt, box=box)) for f in fs] for c, fs in files.items()}
    stored = 0
    for split_name in ("train", "test"):
        split = ImageSplit.open(out / f"{split_name}.h5")
        assert split.attrs["resize_rule"] == f"{geometry}/{filter_name}"
        assert split.attrs["resize_filter"] == filter_name
        for c in range(split.num_classes):
            for img in split.class_images(c):
                assert any(np.array_equal(img, r) for r in refs[split.class_ids[c]])
                stored += 1
    assert stored == 4


# -- the worker pool ------------------------------------------------------------------------


def _arrays_task(k: int, n: int):
    """A pool task returning a small array (pickled), a block of pixels (through a result slot)
    and, for k == 3, a block too big for one slot (pickled)."""
    from tesla.data.pool import RESULT_SLOT_BYTES

    big = np.full((n, 64, 64, 3), k, dtype=np.uint8)
    if k == 3:
        big = np.full((RESULT_SLOT_BYTES // 4096 + 1, 64, 64, 1), k, dtype=np.uint8)
    return np.arange(k + 1), big, f"task {k}"


@pytest.mark.parametrize("borrow", [False, True])
def test_worker_pool_returns_results_through_slots_and_pipes_alike(borrow):
    from tesla.data.pool import WorkerPool

    tasks = [(k, 16 + k) for k in range(12)]
    expected = [_arrays_task(*t) for t in tasks]
    for shared in (True, False):
        pool = WorkerPool(2, shared_results=shared)
        try:
            got = [(t, (small, big.copy(), text)) for t, (small, big, text) in pool.ordered_map(_arrays_task, tasks, borrow=borrow)]
            assert [t for t, _ in got] == tasks
            for (_, r), e in zip(got, expected):
                assert np.array_equal(r[0], e[0]) and np.array_equal(r[1], e[1]) and r[2] == e[2]
            if shared:
                assert sorted(pool._free_slots) == list(range(pool.window)), "every slot is free again"
                # a consumer that stops early: the slots still in use are not handed out again
                gen = pool.ordered_map(_arrays_task, tasks, borrow=borrow)
                next(gen)
                gen.close()
                assert len(pool._free_slots) < pool.window
                again = [(t, big.copy()) for t, (_, big, _) in pool.ordered_map(_arrays_task, tasks, borrow=borrow)]
                assert all(np.array_equal(b, e[1]) for (_, b), e in zip(again, expected))
        finally:
            pool.close(ok=True)


def test_encoded_block_size():
    from tesla.data.pool import RESULT_SLOT_BYTES
    from tesla.prepare import ENCODED_BLOCK, encoded_block_size

    assert encoded_block_size(64, 3, 1_281_167, 16) == ENCODED_BLOCK
    assert encoded_block_size(64, 3, 660, 16) == 21  # two tasks per worker on a small split
    assert encoded_block_size(512, 3, 1_281_167, 16) == RESULT_SLOT_BYTES // (512 * 512 * 3)
    assert encoded_block_size(2048, 3, 10, 2) == 1
    assert encoded_block_size(64, 3, 10, 1) == ENCODED_BLOCK


def test_pool_with_pickled_results_writes_the_same_files(tree, tmp_path, monkeypatch):
    """The pixels returned through shared memory and through the pool's pipes give identical files."""
    import tesla.prepare
    from tesla.data.sources import SourceOptions, plan_source
    from tesla.data.pool import WorkerPool
    from tesla.prepare import prepare_dataset

    prints = []
    for shared in (True, False):
        monkeypatch.setattr(tesla.prepare, "WorkerPool", lambda workers, shared=shared: WorkerPool(workers, shared_results=shared))
        plan = plan_source("folder", SourceOptions(input=tree, test_fraction=0.3))
        prepare_dataset(plan, tmp_path / str(shared), resolution=8, workers=2, progress=False)
        tr, te = ImageSplit.open(tmp_path / str(shared) / "train.h5"), ImageSplit.open(tmp_path / str(shared) / "test.h5")
        prints.append((tr.fingerprint, te.fingerprint, tr.mean, tr.std))
    assert prints[0] == prints[1]


def test_prepare_does_not_import_torch():
    """`tesla prepare` and its pool's workers stay light: the HDF5 format needs no torch
    (importing it costs ~1.3 s per command, and each worker imports the decoding modules)."""
    import subprocess
    import sys

    code = "import sys, tesla.prepare, tesla.data; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
