"""All-or-nothing outputs (tesla.files.atomic_output), used by every writer of the package."""

from __future__ import annotations

import pytest

from tesla.files import atomic_output


def test_output_appears_only_when_the_block_completes(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with atomic_output(target) as tmp:
        assert tmp.parent == target.parent and tmp.name != target.name
        tmp.write_bytes(b"partial")
        assert not target.exists()
    assert target.read_bytes() == b"partial"
    assert [p.name for p in target.parent.iterdir()] == ["out.bin"]


@pytest.mark.parametrize("make", ["file", "folder"])
def test_a_failed_block_leaves_neither_output_nor_temporary(tmp_path, make):
    target = tmp_path / "out"
    target.write_bytes(b"previous") if make == "file" else None
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(target) as tmp:
            if make == "file":
                tmp.write_bytes(b"half")
            else:
                (tmp / "a").mkdir(parents=True)
                (tmp / "a" / "x.png").write_bytes(b"half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if make == "file" else [])
    if make == "file":
        assert target.read_bytes() == b"previous"  # the old output is untouched


def test_a_finished_folder_is_moved_into_place(tmp_path):
    target = tmp_path / "pngs"
    with atomic_output(target) as tmp:
        (tmp / "0").mkdir(parents=True)
        (tmp / "0" / "00000.png").write_bytes(b"png")
    assert (target / "0" / "00000.png").read_bytes() == b"png"
    assert [p.name for p in tmp_path.iterdir()] == ["pngs"]
