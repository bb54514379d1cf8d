"""Class-folder trees and flat labelled folders, on disk or inside uncompressed tars.

A *container* is a folder or an uncompressed tar, listed as (relative path, ref) entries.
Tars are read in place: a member is a byte range (:class:`ImageRef` offset/size) of the tar
file, so workers read images with positional reads and nothing is extracted to disk. A tar
member ``<class>.tar`` at the class level (the layout of ``ILSVRC2012_img_train.tar``) is a
class whose images are listed from that inner tar only when the class is reached.

Rules (documented in docs/formats.md, section *prepare*):

* a class is a top-level folder ``<class>/`` (images anywhere below it, nested folders
  allowed) or a top-level ``<class>.tar``; class index = position in the sorted class names;
* images are files with an image extension (:data:`tesla.data.imaging.IMAGE_EXTENSIONS`),
  taken in sorted path order within their class;
* hidden files (name starting with '.') and files named ``Thumbs.db`` are ignored and
  listed in the report; any other non-image file is an error naming it, unless
  ``--ignore-non-images`` (then ignored and listed);
* an empty class folder (or class tar) is an error naming it.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable

import numpy as np

from tesla.data.imaging import ImageRef, is_image_name
from tesla.data.sources.base import ClassFiles, EncodedSplit
from tesla.errors import TeslaError

TEST_SPLIT_NAMES = ("test", "val", "validation")
_ALWAYS_IGNORED = {"thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class Entry:
    """A regular file (``ref`` set) or a folder (``ref`` None) of a container."""

    rel: str
    ref: ImageRef | None

    @property
    def parts(self) -> tuple[str, ...]:
        return _path_parts(self.rel)


def _path_parts(rel: str) -> tuple[str, ...]:
    """``PurePosixPath(rel).parts``, by a split on '/' when the path is plain (no empty or '.'
    component, not absolute): the listing of millions of members calls this once per member."""
    parts = rel.split("/")
    if "" in parts or "." in parts:
        return PurePosixPath(rel).parts
    return tuple(parts)


def _base_name(rel: str) -> str:
    """``PurePosixPath(rel).name``, by string operations when the path does not end in '/' or '.'."""
    base = rel.rpartition("/")[2]
    return base if base and base != "." else PurePosixPath(rel).name


class _Window(io.RawIOBase):
    """A read-only, seekable view of ``size`` bytes at ``base`` in an open file."""

    def __init__(self, f, base: int, size: int) -> None:
        self._f, self._base, self._size, self._pos = f, base, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = {0: pos, 1: self._pos + pos, 2: self._size + pos}[whence]
        return self._pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self._size - self._pos))
        self._f.seek(self._base + self._pos)
        data = self._f.read(n)
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)


_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def _check_uncompressed(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(6)
    for magic, kind in _COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            raise TeslaError(
                f"{path}: a {kind}-compressed tar cannot be read in place; decompress it first "
                f"(e.g. '{ {'gzip': 'gunzip', 'bzip2': 'bunzip2', 'xz': 'unxz', 'zstd': 'unzstd'}[kind]} -k {path.name}') "
                "or extract it and give the folder"
            )


def _tar_entries(path: Path, base: int = 0, size: int | None = None, label: str | None = None) -> list[Entry]:
    """Members of an uncompressed tar (or of a tar stored at ``base`` in ``path``) as entries.

    Read by :func:`_scan_tar`; an archive using a tar feature it leaves alone (see
    :class:`_LeaveToTarfile`) is read again with :mod:`tarfile`, which gives the same entries."""
    label = label or str(path)
    total = os.path.getsize(path) - base if size is None else size
    try:
        return _scan_tar(path, base, total, label)
    except _LeaveToTarfile:
        return _tarfile_entries(path, base, total, label)


def _tarfile_entries(path: Path, base: int, total: int, label: str) -> list[Entry]:
    """:func:`_tar_entries` by :mod:`tarfile` (every header parsed in Python: ~25 us per member)."""
    entries: list[Entry] = []
    with open(path, "rb") as raw:
        window = io.BufferedReader(_Window(raw, base, total), buffer_size=1 << 16)
        try:
            tar = tarfile.open(fileobj=window, mode="r:")
        except tarfile.TarError as exc:
            raise TeslaError(f"{label}: not a readable tar archive ({exc}); give a folder or an uncompressed .tar") from None
        with tar:
            while True:
                try:
                    member = tar.next()
                except tarfile.TarError as exc:
                    raise TeslaError(f"{label}: damaged tar archive ({exc}); re-download or re-create it") from None
                if member is None:
                    break
                tar.members.clear()  # keep memory flat for archives of millions of members
                rel = _member_rel(member.name)
                if rel is None:
                    continue
                if member.isdir():
                    entries.append(Entry(rel, None))
                elif member.isfile():
                    if member.offset_data + member.size > total:
                        raise TeslaError(f"{label}: member {rel} runs past the end of the archive (truncated download?)")
                    ref = ImageRef(name=f"{label}/{rel}", path=str(path), offset=base + member.offset_data, size=member.size)
                    entries.append(Entry(rel, ref))
    return entries


def _member_rel(name: str) -> str | None:
    """A member name as an entry path: leading './' and surrounding '/' removed; None for the root."""
    if name.startswith("./"):
        while name.startswith("./"):
            name = name[2:]
    if name.startswith("/") or name.endswith("/"):
        name = name.strip("/")
    return None if not name or name == "." else name


# -- the tar lister ---------------------------------------------------------------------
#
# A tar is a sequence of 512-byte headers, each followed by its member's data padded to a
# multiple of 512 bytes, and ends with a zero block (POSIX.1-1988 ustar, with the pax
# extended headers of POSIX.1-2001 and GNU tar's long names). Header fields used here:
# name [0:100], size [124:136] (octal digits, or base-256 when the first byte has its high
# bit set), checksum [148:156], type flag [156], prefix [345:500] (joined as prefix/name).
# Only the headers are read (one pread per header, or per few consecutive headers); the
# checksums are verified in batches with numpy. The entries are those tarfile gives.

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_READ = 4096  # bytes read at a header (a page): covers a pax header, its records and the member's header
_CHECK_EVERY = 4096  # headers whose checksums are verified together
#: member types whose data (if any) tarfile does not skip: links, character/block devices, folders, FIFOs
_NO_DATA_TYPES = frozenset(b"123456")
_REGULAR_TYPES = frozenset(b"07\0")
#: pax keys that change the listed entries
_PAX_KEYS_USED = ("path", "size")


class _LeaveToTarfile(Exception):
    """The archive uses a tar feature the lister leaves to :mod:`tarfile`: GNU sparse files,
    Solaris 'X' headers, global pax headers that set a path or size, two extended headers
    for one member, or an irregular pax record."""


class _TarDamage(Exception):
    """A structural problem at byte ``at`` of the archive (its message is shown to the user)."""

    def __init__(self, message: str, at: int) -> None:
        super().__init__(message)
        self.at = at


def _tar_number(field: bytes) -> int:
    """A numeric header field: octal digits (up to the first NUL, blanks allowed) or base-256."""
    if field[0] & 0x80:
        if field[0] != 0x80:  # 0xff: a negative base-256 number
            raise _LeaveToTarfile
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0]
    try:
        return int(digits, 8)
    except ValueError:
        return int(digits.strip() or b"0", 8)


def _pax_records(data: bytes) -> dict[str, bytes]:
    """The 'LENGTH KEY=VALUE\\n' records of a pax extended header (trailing NULs ignored)."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 21)
        if space < 0 or not data[pos:space].isdigit():
            raise _LeaveToTarfile
        end = pos + int(data[pos:space])
        equals = data.find(b"=", space, end)
        if end > len(data) or end <= space + 2 or data[end - 1] != 0x0A or equals < 0:
            raise _LeaveToTarfile
        records[data[space + 1 : equals].decode("utf-8", "surrogateescape")] = data[equals + 1 : end - 1]
        pos = end
    return records


def _mentions_used_keys(data: bytes) -> bool:
    """Whether pax records may set a key that changes the listing (path, size, GNU.sparse.*)."""
    return b"path=" in data or b"size=" in data or b"GNU.sparse." in data


def _read_at(fd: int, base: int, total: int, pos: int, n: int) -> bytes:
    """At least ``min(n, total - pos)`` bytes at ``pos`` of the archive (up to ``_READ`` more)."""
    return os.pread(fd, max(n, min(_READ, total - pos)), base + pos)[: max(0, total - pos)]


class _ChecksumBatch:
    """Headers whose checksums are still to be verified (all at once, with numpy)."""

    def __init__(self) -> None:
        self.blocks = bytearray()
        self.where: list[int] = []

    def add(self, header: bytes, pos: int) -> None:
        self.blocks += header
        self.where.append(pos)
        if len(self.where) >= _CHECK_EVERY:
            self.verify()

    def first_bad(self) -> int | None:
        """Position of the first header added since the last call whose checksum field does not
        hold the unsigned or the signed sum of its bytes (the field itself counted as eight
        spaces), if any."""
        if len(self.where) < 32:  # few headers (a small inner tar): numpy's call overhead dominates
            blocks, where, self.blocks, self.where = bytes(self.blocks), self.where, bytearray(), []
            return next((at for i, at in enumerate(where) if not _checksum_ok(blocks[i * _BLOCK : (i + 1) * _BLOCK])), None)
        h = np.frombuffer(bytes(self.blocks), dtype=np.uint8).reshape(-1, _BLOCK)
        where, self.blocks, self.where = self.where, bytearray(), []
        field = h[:, 148:156]
        unsigned = h.sum(axis=1, dtype=np.int64) - field.sum(axis=1, dtype=np.int64) + 8 * 32
        signed = unsigned - 256 * (np.count_nonzero(h >= 128, axis=1) - np.count_nonzero(field >= 128, axis=1))
        stored = _octal_fields(field)
        bad = np.flatnonzero((stored != unsigned) & (stored != signed))
        return where[int(bad[0])] if len(bad) else None

    def verify(self) -> None:
        bad = self.first_bad()
        if bad is not None:
            raise _TarDamage("bad checksum", bad)


def _checksum_ok(header: bytes) -> bool:
    """Whether one header's checksum field holds the unsigned or signed sum of its bytes."""
    try:
        stored = _tar_number(header[148:156])
    except (ValueError, _LeaveToTarfile):
        return False
    unsigned = sum(header[:148]) + sum(header[156:]) + 8 * 32
    return stored == unsigned or stored == unsigned - 256 * sum(b >= 128 for b in header[:148] + header[156:])


def _octal_fields(fields: np.ndarray) -> np.ndarray:
    """:func:`_tar_number` of every row of a uint8 array of numeric header fields: vectorised for
    the usual layout (octal digits, then NULs or spaces), one by one for the others."""
    digit = (fields >= 0x30) & (fields <= 0x37)
    leading = np.cumprod(digit, axis=1).astype(bool)  # the octal digits the field starts with
    count = leading.sum(axis=1)
    powers = np.where(leading, count[:, None] - 1 - np.arange(fields.shape[1]), 0)
    values = ((fields.astype(np.int64) - 0x30) * leading * (np.int64(8) ** powers)).sum(axis=1)
    usual = (count > 0) & ~np.any(~leading & (fields != 0) & (fields != 0x20), axis=1)
    for i in np.flatnonzero(~usual):
        try:
            values[i] = _tar_number(fields[i].tobytes())
        except (ValueError, _LeaveToTarfile):
            values[i] = -1  # not a checksum: the header is damaged
    return values


def _scan_tar(path: Path, base: int, total: int, label: str) -> list[Entry]:
    """:func:`_tar_entries` from the headers alone, with the errors :func:`_tarfile_entries` raises.

    Two damages that tarfile passes over silently (it just stops listing) are errors here: a
    header after the first that is not a valid header, and an archive that ends inside a header."""
    fd = os.open(path, os.O_RDONLY)
    checks = _ChecksumBatch()
    try:
        try:
            return _scan_headers(fd, checks, str(path), base, total, label)
        except _TarDamage as exc:
            damage = exc
        except _LeaveToTarfile:
            bad = checks.first_bad()  # a damaged header is not a tar feature to leave to tarfile
            if bad is None:
                raise
            damage = _TarDamage("bad checksum", bad)
        bad = checks.first_bad()  # a damaged header explains what went wrong after it
        if bad is not None:
            damage = _TarDamage("bad checksum", bad)
        if damage.at == 0:
            raise TeslaError(f"{label}: not a readable tar archive ({damage}); give a folder or an uncompressed .tar")
        raise TeslaError(f"{label}: damaged tar archive ({damage} at byte {damage.at}); re-download or re-create it")
    finally:
        os.close(fd)


def _scan_headers(fd: int, checks: _ChecksumBatch, path: str, base: int, total: int, label: str) -> list[Entry]:
    """The entries of the archive, walking its headers (see the notes above :class:`_LeaveToTarfile`)."""
    entries: list[Entry] = []
    buf, start = b"", 0  # bytes of the archive read at ``start``
    pos = 0
    long_name: bytes | None = None  # from a GNU 'L' header, for the next member
    pax: dict[str, bytes] | None = None  # from a pax 'x' header, for the next member
    while True:
        if pos > total:
            raise _TarDamage("unexpected end of data", pos)
        off = pos - start
        if off < 0 or off + _BLOCK > len(buf):
            buf, start, off = _read_at(fd, base, total, pos, _BLOCK), pos, 0
        header = buf[off : off + _BLOCK]
        pending = long_name is not None or pax is not None
        if not header and pos > 0 and not pending:
            break  # no end-of-archive block: tarfile stops here too
        if len(header) < _BLOCK:
            raise _TarDamage("empty file" if pos == 0 and not header else "truncated header", pos)
        if header == _ZERO_BLOCK:
            if pending:
                raise _TarDamage("end of archive after an extended header", pos)
            break
        if pos == 0 and not _checksum_ok(header):
            raise _TarDamage("bad checksum", pos)
        checks.add(header, pos)
        try:
            size = _tar_number(header[124:136])
        except ValueError:
            raise _TarDamage("invalid header", pos) from None
        kind = header[156]
        data_at = pos + _BLOCK
        if kind in b"xLKg":  # extended headers: their data describes the next member(s)
            if data_at + size > total:
                raise _TarDamage("unexpected end of data", pos)
            if size > 1 << 20:
                checks.verify()
                raise _LeaveToTarfile
            off = data_at - start
            if off + size > len(buf):
                buf, start, off = _read_at(fd, base, total, data_at, size), data_at, 0
            data = buf[off : off + size]
            if kind in b"xL" and pending:
                raise _LeaveToTarfile
            if kind == 0x78:  # 'x' (tarfile's own archives have one per member, for the mtime)
                pax = _pax_records(data) if _mentions_used_keys(data) else {}
                if any(k.startswith("GNU.sparse.") for k in pax):
                    raise _LeaveToTarfile
            elif kind == 0x4C:  # 'L'
                long_name = data.split(b"\0", 1)[0]
            elif kind == 0x67 and _mentions_used_keys(data):  # 'g' (global): skipped unless it changes what is listed
                if any(k in _PAX_KEYS_USED or k.startswith("GNU.sparse.") for k in _pax_records(data)):
                    raise _LeaveToTarfile
            pos = data_at + _padded(size)
            continue
        if kind in b"SX":
            raise _LeaveToTarfile
        name_field = header[:100].split(b"\0", 1)[0]
        is_dir = kind == 0x35 or (kind == 0 and name_field.endswith(b"/"))  # '5', or a v7 folder
        if long_name is not None:
            name = long_name
        elif pax is not None and "path" in pax:
            name = pax["path"]
        elif header[345]:  # ustar prefix
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name_field
        else:
            name = name_field
        if pax is not None and "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise _LeaveToTarfile from None
        long_name = pax = None
        # data follows regular files and members of unknown types; folders, links and devices have none
        pos = data_at if is_dir or kind in _NO_DATA_TYPES else data_at + _padded(size)
        rel = _member_rel(name.decode("utf-8", "surrogateescape"))
        if rel is None:
            continue
        if is_dir:
            entries.append(Entry(rel, None))
        elif kind in _REGULAR_TYPES:
            if data_at + size > total:
                checks.verify()
                raise TeslaError(f"{label}: member {rel} runs past the end of the archive (truncated download?)")
            entries.append(Entry(rel, ImageRef(name=f"{label}/{rel}", path=path, offset=base + data_at, size=size)))
    checks.verify()
    return entries


def _padded(size: int) -> int:
    """Bytes a member's data occupies: ``size`` rounded up to whole 512-byte blocks."""
    return -(-size // _BLOCK) * _BLOCK


def _dir_entries(path: Path) -> list[Entry]:
    entries: list[Entry] = []
    for root, dirs, files in os.walk(path, followlinks=True):
        dirs.sort()
        rel_root = os.path.relpath(root, path)
        for d in dirs:
            entries.append(Entry(d if rel_root == "." else f"{rel_root}/{d}".replace(os.sep, "/"), None))
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = name if rel_root == "." else f"{rel_root}/{name}".replace(os.sep, "/")
            entries.append(Entry(rel, ImageRef(name=full, path=full)))
    return entries


def list_container(path: Path, what: str) -> list[Entry]:
    """All entries of a folder or an uncompressed tar; ``what`` names the setting in errors."""
    path = Path(path)
    if not path.exists():
        raise TeslaError(f"{path}: no such file or folder (given as {what}); check the path")
    if path.is_dir():
        return _dir_entries(path)
    if not tarfile.is_tarfile(path):
        _check_uncompressed(path)
        raise TeslaError(f"{path}: neither a folder nor a tar archive (given as {what}); give a class-folder tree or a .tar of one")
    _check_uncompressed(path)
    return _tar_entries(path)


def subtree(entries: Iterable[Entry], prefix: str) -> list[Entry]:
    """Entries below the folder ``prefix``, with paths relative to it."""
    p = prefix.strip("/") + "/"
    return [Entry(e.rel[len(p):], e.ref) for e in entries if e.rel.startswith(p) and len(e.rel) > len(p)]


def top_folders(entries: Iterable[Entry]) -> set[str]:
    out = set()
    for e in entries:
        parts = e.parts
        if len(parts) > 1 or e.ref is None:
            out.add(parts[0])
    return out


def find_split_folders(entries: list[Entry], prefer: tuple[str, ...] = TEST_SPLIT_NAMES) -> tuple[str, str | None] | None:
    """('train', the first of ``prefer`` present, or None) when the container holds split folders."""
    tops = top_folders(entries)
    if "train" not in tops:
        return None
    test = next((t for t in prefer if t in tops), None)
    return "train", test


def _is_ignorable(name: str) -> bool:
    """Hidden (name starting with '.') or a system file (Thumbs.db, desktop.ini), by the last component."""
    base = _base_name(name)
    return base.startswith(".") or base.lower() in _ALWAYS_IGNORED


def _non_image_error(ref_name: str, where: str) -> TeslaError:
    return TeslaError(
        f"{ref_name}: not an image file (its extension is not one of .jpg .jpeg .png .bmp .gif .tif .webp ...) "
        f"in {where}; move it out of the dataset, rename it if it is an image, or pass --ignore-non-images "
        "to skip such files (they are then listed in prepare_report.txt)"
    )


def _entry_name(e: Entry, root: str) -> str:
    return e.ref.name if e.ref is not None else f"{root}/{e.rel}"


@dataclass
class ClassTree:
    """Class name -> its images (listed, or a lazily listed inner tar), plus ignored files."""

    classes: dict[str, ClassFiles]
    ignored: list[str]


def _inner_tar_lister(ref: ImageRef, cls: str, ignore_non_images: bool, ignored: list[str]):
    def lister() -> list[ImageRef]:
        size = ref.size if ref.size >= 0 else os.path.getsize(ref.path)
        entries = _tar_entries(Path(ref.path), base=ref.offset, size=size, label=ref.name)
        refs: list[ImageRef] = []
        for e in entries:
            if e.ref is None:
                continue
            if is_image_name(e.rel):
                refs.append(e.ref)
            elif _is_ignorable(e.rel) or ignore_non_images:
                ignored.append(f"{e.ref.name}\tnot an image file")
            else:
                raise _non_image_error(e.ref.name, f"class tar {ref.name}")
        if not refs:
            raise TeslaError(f"{ref.name}: class {cls} has no image files; remove the empty class tar or add images")
        refs.sort(key=lambda r: r.name)
        return refs

    return lister


def class_tree(entries: list[Entry], root: str, ignore_non_images: bool) -> ClassTree:
    """Group a container's entries into classes (see the module docstring for the rules)."""
    files: dict[str, list[ImageRef]] = {}
    tars: dict[str, ImageRef] = {}
    folders: set[str] = set()
    ignored: list[str] = []
    for e in entries:
        parts = e.parts
        if e.ref is None:
            if not _is_ignorable(parts[0]):
                folders.add(parts[0])
            continue
        if len(parts) == 1:
            name = parts[0]
            if name.lower().endswith(".tar") and not _is_ignorable(name):
                tars[name[:-4]] = e.ref
            elif _is_ignorable(name) or (ignore_non_images and not is_image_name(name)):
                ignored.append(f"{e.ref.name}\tnot inside a class folder")
            elif is_image_name(name):
                raise TeslaError(
                    f"{e.ref.name}: image not inside a class folder of {root}; a class-folder tree holds "
                    "<class>/<image> (move it into its class folder, or give a flat test folder with --test-input and --test-labels)"
                )
            else:
                raise _non_image_error(e.ref.name, root)
            continue
        cls = parts[0]
        if _is_ignorable(cls) or any(_is_ignorable(p) for p in parts[1:]):
            ignored.append(f"{e.ref.name}\thidden file or folder")
            continue
        folders.add(cls)
        if is_image_name(parts[-1]):
            files.setdefault(cls, []).append(e.ref)
        elif ignore_non_images:
            ignored.append(f"{e.ref.name}\tnot an image file")
        else:
            raise _non_image_error(e.ref.name, f"class folder {root}/{cls}")
    both = sorted(set(tars) & folders)
    if both:
        raise TeslaError(f"{root}: class {both[0]} is both a folder and a .tar; keep one of them")
    classes: dict[str, ClassFiles] = {}
    for cls in sorted(folders | set(tars)):
        if cls in tars:
            ref = tars[cls]
            size = ref.size if ref.size >= 0 else os.path.getsize(ref.path)
            if size < 1024:
                raise TeslaError(f"{ref.name}: class tar {cls}.tar is empty; remove it or re-download it")
            classes[cls] = ClassFiles(index=-1, lister=_inner_tar_lister(ref, cls, ignore_non_images, ignored), nbytes=size)
        else:
            refs = files.get(cls, [])
            if not refs:
                raise TeslaError(f"{root}/{cls}: empty class folder (no image files); remove it or add its images")
            refs.sort(key=lambda r: r.name)
            classes[cls] = ClassFiles(index=-1, refs=refs)
    if not classes:
        raise TeslaError(f"{root}: no class folders found; a class-folder tree holds <class>/<image files>")
    return ClassTree(classes=classes, ignored=ignored)


def encoded_split(split: str, tree: ClassTree, class_ids: list[str], source_path: str, what: str) -> EncodedSplit:
    """Put a tree's classes in the order of ``class_ids`` (the train classes)."""
    index = {c: i for i, c in enumerate(class_ids)}
    unknown = sorted(set(tree.classes) - set(index))
    if unknown:
        raise TeslaError(
            f"{source_path}: {what} has class folder {unknown[0]!r}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + " that is not a train class; remove it or add that class to the train split"
        )
    classes = []
    for i, c in enumerate(class_ids):
        cf = tree.classes.get(c) or ClassFiles(index=i, refs=[])
        cf.index = i
        classes.append(cf)
    return EncodedSplit(split=split, classes=classes, source_path=source_path, ignored=tree.ignored)


# -- flat test folders with a labels file -----------------------------------------------

_LOC_HEADER = re.compile(r"^\s*imageid\s*,\s*predictionstring\s*$", re.IGNORECASE)


def read_labels(path: Path, class_ids: list[str], class_names: list[str] | None = None) -> dict[str, int]:
    """Labels file -> {file name or stem: class index}.

    Accepted layouts: ``LOC_val_solution.csv`` (header ``ImageId,PredictionString``; the
    class is the first token of the prediction string), or lines whose first two fields
    (separated by commas, tabs or spaces) are the file name and the class id; blank lines
    and lines starting with '#' are skipped, and so is a first line that is a header.
    """
    path = Path(path)
    if not path.is_file():
        raise TeslaError(f"{path}: labels file not found (given as --test-labels); check the path")
    index = {c: i for i, c in enumerate(class_ids)}
    by_name = {n: i for i, n in enumerate(class_names or []) if n not in index}
    labels: dict[str, int] = {}
    with open(path, encoding="utf-8-sig") as f:
        lines = f.read().splitlines()
    loc = bool(lines) and bool(_LOC_HEADER.match(lines[0]))
    first_line = True
    for lineno, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#") or (loc and lineno == 1):
            continue
        if loc:
            key, _, pred = text.partition(",")
            fields = [key.strip(), pred.split()[0] if pred.split() else ""]
        else:
            fields = [t for t in re.split(r"[,\t ]+", text) if t]
        if len(fields) < 2 or not fields[1]:
            raise TeslaError(f"{path}, line {lineno}: expected 'file class' (comma, tab or space separated), got {line!r}")
        key, cls = fields[0].strip().strip('"'), fields[1].strip().strip('"')
        was_first, first_line = first_line, False
        if cls in index:
            label = index[cls]
        elif cls in by_name:
            label = by_name[cls]
        elif was_first:
            continue  # a header line such as 'file,class'
        else:
            example = ", ".join(class_ids[:3])
            raise TeslaError(
                f"{path}, line {lineno}: label {cls!r} for {key} is not a train class (classes are e.g. {example}); "
                "fix the labels file or give the matching train data"
            )
        for k in {key, PurePosixPath(key).name, _stem(key)}:
            if k in labels and labels[k] != label:
                raise TeslaError(f"{path}, line {lineno}: {key} is labelled twice with different classes; keep one line")
            labels[k] = label
    if not labels:
        raise TeslaError(f"{path}: no labels found; expected 'file class' lines or a LOC_val_solution.csv")
    return labels


def _stem(name: str) -> str:
    base = _base_name(name)
    return base.rsplit(".", 1)[0] if "." in base else base


def labelled_flat_split(
    split: str,
    entries: list[Entry],
    labels_path: Path | None,
    class_ids: list[str],
    class_names: list[str],
    source_path: str,
    ignore_non_images: bool,
) -> EncodedSplit:
    """A flat folder (or tar) of test images labelled by a labels file."""
    if labels_path is None:
        raise TeslaError(
            f"{source_path}: the test images are in one flat folder, so they need a labels file; "
            "give --test-labels (LOC_val_solution.csv, or 'file class' lines), or sort them into class folders"
        )
    labels = read_labels(labels_path, class_ids, class_names)
    per_class: list[list[ImageRef]] = [[] for _ in class_ids]
    ignored: list[str] = []
    for e in entries:
        if e.ref is None:
            continue
        name = e.parts[-1]
        if _is_ignorable(e.rel):
            ignored.append(f"{e.ref.name}\thidden file")
            continue
        if not is_image_name(name):
            if ignore_non_images:
                ignored.append(f"{e.ref.name}\tnot an image file")
                continue
            raise _non_image_error(e.ref.name, source_path)
        label = labels.get(e.rel, labels.get(name, labels.get(_stem(name))))
        if label is None:
            raise TeslaError(
                f"{e.ref.name}: test image has no label in {labels_path}; add a line '{name} <class>' "
                "or remove the image from the test input"
            )
        per_class[label].append(e.ref)
    if sum(len(r) for r in per_class) == 0:
        raise TeslaError(f"{source_path}: no test images found; check --test-input")
    notes = []
    for refs in per_class:
        refs.sort(key=lambda r: r.name)
    classes = [ClassFiles(index=i, refs=r) for i, r in enumerate(per_class)]
    split_obj = EncodedSplit(split=split, classes=classes, source_path=source_path, ignored=ignored, notes=notes)
    split_obj.attrs["labels_file"] = str(labels_path)
    return split_obj


def is_flat(entries: list[Entry]) -> bool:
    """True when the container holds image files only at its top level."""
    return all(len(e.parts) == 1 for e in entries if e.ref is not None and is_image_name(e.rel))


def hold_out(train: EncodedSplit, fraction: float, seed: int) -> tuple[EncodedSplit, EncodedSplit]:
    """Split every class into train and test: round(fraction * n_c) test images per class
    (at least one when the class has two or more), chosen by a permutation from ``seed``."""
    if not 0.0 < fraction < 1.0:
        raise TeslaError(f"--test-fraction {fraction}: must be between 0 and 1 (e.g. 0.1)")
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for cf in train.classes:
        refs = cf.list()
        n = len(refs)
        k = int(round(fraction * n))
        if n >= 2:
            k = min(max(k, 1), n - 1)
        else:
            k = 0
        pick = set(rng.permutation(n)[:k].tolist())
        tr.append(ClassFiles(index=cf.index, refs=[r for j, r in enumerate(refs) if j not in pick]))
        te.append(ClassFiles(index=cf.index, refs=[r for j, r in enumerate(refs) if j in pick]))
    if not any(c.refs for c in te):
        raise TeslaError(
            f"{train.source_path}: --test-fraction {fraction:g} holds out no image (every class has fewer than 2 "
            "images, or the fraction is too small); give a test split with --test-input instead"
        )
    note = f"test split held out from train: {fraction:g} of each class, seed {seed}"
    a = EncodedSplit("train", tr, train.source_path, train.ignored, list(train.notes), dict(train.attrs))
    b = EncodedSplit("test", te, train.source_path, [], [note], {"held_out_fraction": fraction, "held_out_seed": seed})
    return a, b


def read_synsets(path: Path, class_ids: list[str]) -> list[str]:
    """Human-readable class names from a ``LOC_synset_mapping.txt``-style file ('wnid name, name2')."""
    path = Path(path)
    if not path.is_file():
        raise TeslaError(f"{path}: synset mapping file not found (given as --synsets); check the path")
    names: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            parts = re.split(r"[\t ,]+", text, maxsplit=1)
            if len(parts) < 2:
                raise TeslaError(f"{path}, line {lineno}: expected '<class id> <name, name2, ...>', got {text!r}")
            names[parts[0]] = parts[1].strip()
    missing = [c for c in class_ids if c not in names]
    if missing:
        raise TeslaError(
            f"{path}: no name for class {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; give the mapping file that matches the data (e.g. LOC_synset_mapping.txt)"
        )
    return [names[c] for c in class_ids]
