"""The tar scanner (tesla.data.sources.tarscan): the members tarfile gives, from the headers
alone; damaged archives; members that must not be read (absolute paths, '..' components);
and reports that are the same from run to run."""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path

import pytest

from prepare_support import jpeg, pattern, prepare
from tesla.data import ImageSplit
from tesla.data.sources import tarscan
from tesla.data.sources.tarscan import (
    ABSOLUTE_PATH,
    HARD_LINK,
    PARENT_PATH,
    SYMBOLIC_LINK,
    _tarfile_members,
    member_path,
    tar_members,
)
from tesla.errors import TeslaError


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


def add_link(tar: tarfile.TarFile, name: str, target: str, kind: bytes) -> None:
    """A link member: kind tarfile.SYMTYPE or tarfile.LNKTYPE, pointing at ``target`` as stored."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    tar.addfile(info)


#: link members of the archive below -> the reason they are not read (None: read as their target)
LINKS = {
    "train/cat/s.png": (SYMBOLIC_LINK.format(target="a.png"), "a.png", tarfile.SYMTYPE),
    "train/dog/d.png": (None, "./train/cat/a.png", tarfile.LNKTYPE),  # a regular member: read (as a dog)
    "train/dog/gone.png": (HARD_LINK.format(target="train/none.png"), "train/none.png", tarfile.LNKTYPE),
    "train/dog/up.png": (SYMBOLIC_LINK.format(target="../../../etc/passwd"), "../../../etc/passwd", tarfile.SYMTYPE),
}


@pytest.fixture(params=[tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def linked_tar(tmp_path, request) -> Path:
    path = tmp_path / "linked.tar"
    with tarfile.open(path, "w", format=request.param) as tar:
        for k, name in enumerate(["train/cat/a.png", "train/cat/b.png", "train/dog/c.png", "test/cat/t.png", "test/dog/u.png"]):
            add_member(tar, name, image_bytes(k))
        for name, (_, target, kind) in LINKS.items():
            add_link(tar, name, target, kind)
    return path


def test_links_are_listed_with_their_reason_and_hard_links_to_members_read(linked_tar):
    walked = tar_members(linked_tar)
    assert walked == _tarfile_members(linked_tar, 0, linked_tar.stat().st_size, str(linked_tar))
    by_path = {m.path: m for m in walked}
    for name, (reason, _, _) in LINKS.items():
        assert by_path[name].problem == (reason or ""), name
    a, d = by_path["train/cat/a.png"], by_path["train/dog/d.png"]
    assert (d.offset, d.size) == (a.offset, a.size)  # the bytes of the member it links to


def test_links_in_a_tar_appear_in_the_report_instead_of_vanishing(linked_tar, tmp_path):
    out = tmp_path / "out"
    assert prepare("folder", "--input", linked_tar, "--resolution", 8, "--out-dir", out, "--workers", 1) == 0
    train = ImageSplit.open(out / "train.h5")
    assert train.num_images == 4  # a, b, c and the hard link d
    report = (out / "prepare_report.txt").read_text()
    not_read = {name: reason for name, (reason, _, _) in LINKS.items() if reason}
    for name, reason in not_read.items():
        assert f"{linked_tar}/{name}\t{reason}" in report
    assert f"note: {len(not_read)} tar member(s) are symbolic links, or hard links to no regular member" in report
    assert f"{linked_tar}/train/dog/d.png\thard link" not in report  # read: not among the ignored


def test_a_long_list_in_the_report_is_cut_and_counted(tmp_path, monkeypatch):
    import tesla.prepare

    monkeypatch.setattr(tesla.prepare, "REPORT_LIST_LIMIT", 2)
    path = tmp_path / "many.tar"
    with tarfile.open(path, "w") as tar:
        for k, name in enumerate(["cat/a.png", "cat/c.png", "dog/b.png", "dog/d.png"]):
            add_member(tar, name, image_bytes(k))
        for k in range(5):
            add_link(tar, f"cat/l{k}.png", "a.png", tarfile.SYMTYPE)
    out = tmp_path / "out"
    assert prepare("folder", "--input", path, "--resolution", 8, "--test-fraction", 0.5, "--out-dir", out, "--workers", 1) == 0
    report = (out / "prepare_report.txt").read_text()
    assert "[train] ignored: 5 (path<TAB>reason)" in report
    assert report.count("\tsymbolic link to a.png") == 2
    assert "... and 3 more, not listed (the first 2 are)" in report
    assert "note: 5 tar member(s) are symbolic links" in report


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


# -- tar listing ----------------------------------------------------------------------------


def tarfile_view(path: Path) -> list[tuple]:
    """The entries the tar lister must give, read with tarfile directly: (path, None) for a
    folder, (path, data offset, size) for a regular file or a hard link to one (its target's
    bytes), (path, 'not read') for other links; other members left out."""
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
            elif m.islnk():  # read as the regular member it links to, when there is one
                target = next((e for e in out if e[0] == m.linkname.removeprefix("./") and len(e) == 3), None)
                out.append((rel, *target[1:]) if target else (rel, "not read"))
            elif m.issym():
                out.append((rel, "not read"))
    return out


def lister_view(path: Path) -> list[tuple]:
    from tesla.data.sources.tree import list_container

    return [
        (e.rel, None) if e.ref is None else (e.rel, "not read") if e.problem else (e.rel, e.ref.offset, e.ref.size)
        for e in list_container(path, "--input")
    ]


@pytest.fixture
def no_tarfile_fallback(monkeypatch):
    """Fail if the lister hands the archive to tarfile (the archive should be read natively)."""
    def refuse(*args):
        raise AssertionError("the lister fell back to tarfile")

    monkeypatch.setattr(tarscan, "_tarfile_members", refuse)


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
    real = tarscan._tarfile_members
    monkeypatch.setattr(tarscan, "_tarfile_members", lambda *a: calls.append(a) or real(*a))
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
        tar_members(tmp_path / "t.tar")
    (tmp_path / "t.tar").write_bytes(b"")
    with pytest.raises(TeslaError, match=re.escape("not a readable tar archive (empty file)")):
        tar_members(tmp_path / "t.tar")
