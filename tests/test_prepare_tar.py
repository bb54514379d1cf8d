"""Tar members that must not be read (absolute paths, '..' components) and reports that are
the same from run to run."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from test_prepare import jpeg, pattern, prepare
from tesla.data import ImageSplit
from tesla.data.sources.tarscan import ABSOLUTE_PATH, PARENT_PATH, _tarfile_members, member_path, tar_members


def image_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    pattern(seed).save(buf, format="JPEG")
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A regular member stored under exactly ``name`` (tarfile.add would strip a leading '/')."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


#: members of the archive below, as stored
SAFE = ["cat/a.JPEG", "cat/b.JPEG", "dog/c.JPEG", "./dog/d.JPEG"]
UNSAFE = {
    "/tmp/x/EVIL.JPEG": ABSOLUTE_PATH,
    "/cat/e.JPEG": ABSOLUTE_PATH,
    "../evil.JPEG": PARENT_PATH,
    "cat/../../up.JPEG": PARENT_PATH,
    "dog/sub/../f.JPEG": PARENT_PATH,
}


@pytest.fixture
def crafted_tar(tmp_path) -> Path:
    path = tmp_path / "crafted.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for k, name in enumerate(SAFE + list(UNSAFE)):
            add_member(tar, name, image_bytes(k))
    return path


def test_member_paths():
    assert member_path("./a/b.JPEG") == ("a/b.JPEG", "")
    assert member_path("a/") == ("a", "")
    assert member_path("./") == (None, "")
    assert member_path("a..b/c..JPEG") == ("a..b/c..JPEG", "")  # '..' inside a name is harmless
    for name, problem in UNSAFE.items():
        assert member_path(name) == (name, problem)


def test_the_header_walk_and_tarfile_agree_on_unsafe_members(crafted_tar):
    size = crafted_tar.stat().st_size
    walked = tar_members(crafted_tar)
    assert walked == _tarfile_members(crafted_tar, 0, size, str(crafted_tar))
    assert {m.path: m.problem for m in walked if m.problem} == UNSAFE
    assert sorted(m.path for m in walked if not m.problem) == sorted(p.removeprefix("./") for p in SAFE)


def test_unsafe_members_are_not_read_and_are_listed_with_their_reason(crafted_tar, tmp_path):
    out = tmp_path / "out"
    assert prepare("folder", "--input", crafted_tar, "--resolution", 8, "--test-fraction", 0.5, "--out-dir", out, "--workers", 1) == 0
    tr, te = ImageSplit.open(out / "train.h5"), ImageSplit.open(out / "test.h5")
    assert tr.class_ids == ["cat", "dog"]  # no class 'tmp', no class '..'
    assert tr.num_images + te.num_images == len(SAFE)
    report = (out / "prepare_report.txt").read_text()
    for name, problem in UNSAFE.items():
        assert f"{crafted_tar}/{name}\t{problem}" in report
    assert "hidden file or folder" not in report


def test_unsafe_members_of_a_class_tar_are_listed(tmp_path):
    """ILSVRC2012_img_train.tar layout: the inner tar of a class holds an absolute member."""
    inner = {}
    for cls, names in (("n00000001", ["n00000001_1.JPEG", "/etc/n00000001_9.JPEG"]), ("n00000002", ["n00000002_1.JPEG", "n00000002_2.JPEG"])):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for k, name in enumerate(names):
                add_member(tar, name, image_bytes(k))
        inner[cls] = buf.getvalue()
    outer = tmp_path / "train.tar"
    with tarfile.open(outer, "w") as tar:
        for cls, data in inner.items():
            add_member(tar, f"{cls}.tar", data)
    val = tmp_path / "val"
    for cls in inner:
        jpeg(val / cls / "v.JPEG", pattern(7))
    out = tmp_path / "out"
    assert prepare("imagenet", "--input", outer, "--test-input", val, "--resolution", 8, "--out-dir", out, "--workers", 1) == 0
    assert ImageSplit.open(out / "train.h5").num_images == 3
    assert f"{outer}/n00000001.tar//etc/n00000001_9.JPEG\t{ABSOLUTE_PATH}" in (out / "prepare_report.txt").read_text()


def test_two_runs_write_the_same_report(tmp_path):
    """Skip reasons name no memory address (Pillow names an in-memory file by its address)."""
    root = tmp_path / "tree"
    for cls in ("a", "b"):
        for k in range(3):
            jpeg(root / cls / f"{k}.jpg", pattern(k))
    (root / "a" / "junk.jpg").write_bytes(b"this is not an image at all")
    reports = []
    for run in ("one", "two"):
        out = tmp_path / run
        assert prepare("folder", "--input", root, "--resolution", 8, "--test-fraction", 0.4, "--out-dir", out, "--workers", 1) == 0
        reports.append((out / "prepare_report.txt").read_text())
    assert reports[0] == reports[1]
    assert f"{root / 'a' / 'junk.jpg'}\tUnidentifiedImageError: not an image format Pillow can identify" in reports[0]
    assert " at 0x" not in reports[0]
