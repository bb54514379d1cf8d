"""The members of an uncompressed tar, listed from their 512-byte headers.

A tar is a sequence of 512-byte headers, each followed by its member's data padded to a
multiple of 512 bytes, and ends with a zero block (POSIX.1-1988 ustar, with the pax
extended headers of POSIX.1-2001 and GNU tar's long names). :func:`tar_members` walks the
headers of a tar file (or of a tar stored at an offset inside another tar) and returns each
regular file and folder as a :class:`TarMember`: its path and the byte range of its data, so
that images are read in place with positional reads and nothing is extracted. An archive
using a feature the walk leaves alone (GNU sparse files, Solaris 'X' headers, global pax
headers that set a path or size, two extended headers for one member) is read again with
:mod:`tarfile`, which gives the same members.

Member paths (:func:`member_path`): a leading './' and a trailing '/' are dropped. A member
whose stored name is absolute (``/tmp/x/a.JPEG``) or has a ``..`` component cannot be placed
in the archive's tree; it is listed with that reason in :attr:`TarMember.problem`, never
read, and the caller lists it in the report.

Links: a hard link to a regular member of the same archive is listed as a file with that
member's bytes (extracting the archive gives the same file at both paths, so the archive
reads as its extracted folder). A symbolic link, or a hard link to anything else, is listed
with the reason it is not read (:data:`SYMBOLIC_LINK`, :data:`HARD_LINK`): a link inside an
archive may point anywhere, and following it could read a file outside the dataset.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tesla.errors import TeslaError

#: :attr:`TarMember.problem` of members that are never read
ABSOLUTE_PATH = "absolute member path (a dataset archive holds relative paths); not read"
PARENT_PATH = "member path leaves the archive's folders through '..'; not read"
SYMBOLIC_LINK = (
    "symbolic link to {target}; links are not followed in an archive, not read (re-create the tar with "
    "'tar --dereference', or extract it and give the folder)"
)
HARD_LINK = "hard link to {target}, which is not a regular file of this archive; not read"
#: how the reasons of links begin (the report counts them)
LINK_REASONS = ("symbolic link to ", "hard link to ")


class TarMember(NamedTuple):
    """A regular file (``is_dir`` False) or a folder of a tar: its path in the archive, the
    position of its data in the file and its size; ``problem`` says why it must not be read."""

    path: str
    offset: int
    size: int
    is_dir: bool
    problem: str = ""


def _member(fields: tuple) -> TarMember:
    """``TarMember(*fields)`` at about the cost of a plain tuple: the walk makes one per member,
    and the NamedTuple constructor (a Python-level call) measured several times slower."""
    return tuple.__new__(TarMember, fields)


def member_path(name: str) -> tuple[str | None, str]:
    """(path, problem) of a stored member name: './' prefixes and trailing '/' removed, None for
    the archive's root; an absolute name or one with a '..' component is kept as stored, with
    the reason it is not read."""
    if name.startswith("/"):
        return name, ABSOLUTE_PATH
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    if not name or name == ".":
        return None, ""
    if ".." in name and ".." in name.split("/"):
        return name, PARENT_PATH
    return name, ""


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


def check_uncompressed(path: Path) -> None:
    """Refuse a compressed tar, naming the command that decompresses it."""
    with open(path, "rb") as f:
        head = f.read(6)
    for magic, kind in _COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            raise TeslaError(
                f"{path}: a {kind}-compressed tar cannot be read in place; decompress it first "
                f"(e.g. '{ {'gzip': 'gunzip', 'bzip2': 'bunzip2', 'xz': 'unxz', 'zstd': 'unzstd'}[kind]} -k {path.name}') "
                "or extract it and give the folder"
            )


def tar_members(path: Path, base: int = 0, size: int | None = None, label: str | None = None) -> list[TarMember]:
    """The members of an uncompressed tar (or of a tar of ``size`` bytes stored at ``base`` in
    ``path``); ``label`` names the archive in errors (default: ``path``).

    Read by :func:`_scan_tar`; an archive using a tar feature it leaves alone (see
    :class:`_LeaveToTarfile`) is read again with :mod:`tarfile`, which gives the same members."""
    label = label or str(path)
    total = os.path.getsize(path) - base if size is None else size
    try:
        return _scan_tar(path, base, total, label)
    except _LeaveToTarfile:
        return _tarfile_members(path, base, total, label)


def _tarfile_members(path: Path, base: int, total: int, label: str) -> list[TarMember]:
    """:func:`tar_members` by :mod:`tarfile` (every header parsed in Python: ~25 us per member)."""
    members: list[TarMember] = []
    links: list[tuple[int, str, str]] = []
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
                rel, problem = member_path(member.name)
                if rel is None:
                    continue
                if member.isdir():
                    members.append(TarMember(rel, base + member.offset_data, 0, True, problem))
                elif member.isfile():
                    if member.offset_data + member.size > total:
                        raise TeslaError(f"{label}: member {rel} runs past the end of the archive (truncated download?)")
                    members.append(TarMember(rel, base + member.offset_data, member.size, False, problem))
                elif member.issym() or member.islnk():
                    links.append(_link(members, rel, problem, member.linkname, member.islnk(), base + member.offset_data))
    return _resolve_hard_links(members, links)


def _link(members: list[TarMember], rel: str, problem: str, target: str, hard: bool, at: int) -> tuple[int, str, str]:
    """List a link member as a file not to read, with its reason; (its index, the target path
    of a hard link or '', its own path problem) for :func:`_resolve_hard_links`."""
    reason = (HARD_LINK if hard else SYMBOLIC_LINK).format(target=target)
    members.append(_member((rel, at, 0, False, problem or reason)))
    return len(members) - 1, (member_path(target)[0] or "") if hard else "", problem


def _resolve_hard_links(members: list[TarMember], links: list[tuple[int, str, str]]) -> list[TarMember]:
    """Hard links to a regular member of the archive take that member's bytes (and are read,
    unless their own path is unsafe); the other links keep the reason they are not read."""
    wanted = {target for _, target, _ in links if target}
    if not wanted:
        return members
    found = {m.path: m for m in members if not m.is_dir and not m.problem and m.path in wanted}
    for i, target, own_problem in links:
        regular = found.get(target)
        if regular is not None and not own_problem:
            members[i] = _member((members[i].path, regular.offset, regular.size, False, ""))
    return members


# -- the tar lister ---------------------------------------------------------------------
#
# A tar is a sequence of 512-byte headers, each followed by its member's data padded to a
# multiple of 512 bytes, and ends with a zero block (POSIX.1-1988 ustar, with the pax
# extended headers of POSIX.1-2001 and GNU tar's long names). Header fields used here:
# name [0:100], size [124:136] (octal digits, or base-256 when the first byte has its high
# bit set), checksum [148:156], type flag [156], prefix [345:500] (joined as prefix/name).
# Only the headers are read (one pread per header, or per few consecutive headers); the
# checksums are verified in batches with numpy. The members are those tarfile gives.

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_READ = 4096  # bytes read at a header (a page): covers a pax header, its records and the member's header
_CHECK_EVERY = 4096  # headers whose checksums are verified together
#: member types whose data (if any) tarfile does not skip: links, character/block devices, folders, FIFOs
_NO_DATA_TYPES = frozenset(b"123456")
_REGULAR_TYPES = frozenset(b"07\0")
#: pax keys that change the listed members
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


def _scan_tar(path: Path, base: int, total: int, label: str) -> list[TarMember]:
    """:func:`tar_members` from the headers alone, with the errors :func:`_tarfile_members` raises.

    Two damages that tarfile passes over silently (it just stops listing) are errors here: a
    header after the first that is not a valid header, and an archive that ends inside a header."""
    fd = os.open(path, os.O_RDONLY)
    checks = _ChecksumBatch()
    try:
        try:
            return _scan_headers(fd, checks, base, total, label)
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


def _scan_headers(fd: int, checks: _ChecksumBatch, base: int, total: int, label: str) -> list[TarMember]:
    """The members of the archive, walking its headers (see the notes above :class:`_LeaveToTarfile`)."""
    return _HeaderWalk(fd, checks, base, total, label).members()


class _HeaderWalk:
    """One walk through an archive's headers: each header (one read per header, or per few
    consecutive headers), the extended headers that describe the next member, and the members."""

    def __init__(self, fd: int, checks: _ChecksumBatch, base: int, total: int, label: str) -> None:
        self.fd, self.checks, self.base, self.total, self.label = fd, checks, base, total, label
        self.buf, self.start = b"", 0  # bytes of the archive read at ``start``
        self.listed: list[TarMember] = []
        self.links: list[tuple[int, str, str]] = []
        self.long_name: bytes | None = None  # from a GNU 'L' header, for the next member
        self.long_link: bytes | None = None  # from a GNU 'K' header: the next member's link target
        self.pax: dict[str, bytes] | None = None  # from a pax 'x' header, for the next member

    @property
    def pending(self) -> bool:
        """Whether an extended header waits for its member."""
        return self.long_name is not None or self.pax is not None

    def members(self) -> list[TarMember]:
        """Every member, hard links resolved, once every header's checksum is verified."""
        pos = 0
        while (header := self._header(pos)) is not None:
            self.checks.add(header, pos)
            try:
                size = _tar_number(header[124:136])
            except ValueError:
                raise _TarDamage("invalid header", pos) from None
            kind = header[156]
            if kind in b"xLKg":  # extended headers: their data describes the next member(s)
                self._extended(kind, pos + _BLOCK, size)
                pos += _BLOCK + _padded(size)
            else:
                pos = self._member(header, kind, pos + _BLOCK, size)
        self.checks.verify()
        return _resolve_hard_links(self.listed, self.links)

    def _read(self, pos: int, n: int) -> bytes:
        """``n`` bytes at ``pos`` (fewer at the end of the archive), from the bytes read last when they hold them."""
        off = pos - self.start
        if off < 0 or off + n > len(self.buf):
            self.buf, self.start, off = _read_at(self.fd, self.base, self.total, pos, n), pos, 0
        return self.buf[off : off + n]

    def _header(self, pos: int) -> bytes | None:
        """The header at ``pos``, or None at the end of the archive (a zero block, or the end of
        the data after a member)."""
        if pos > self.total:
            raise _TarDamage("unexpected end of data", pos)
        header = self._read(pos, _BLOCK)
        if not header and pos > 0 and not self.pending:
            return None  # no end-of-archive block: tarfile stops here too
        if len(header) < _BLOCK:
            raise _TarDamage("empty file" if pos == 0 and not header else "truncated header", pos)
        if header == _ZERO_BLOCK:
            if self.pending:
                raise _TarDamage("end of archive after an extended header", pos)
            return None
        if pos == 0 and not _checksum_ok(header):
            raise _TarDamage("bad checksum", pos)
        return header

    def _extended(self, kind: int, data_at: int, size: int) -> None:
        """Keep what an extended header ('x', 'L', 'K', 'g') says of the next member."""
        if data_at + size > self.total:
            raise _TarDamage("unexpected end of data", data_at - _BLOCK)
        if size > 1 << 20:
            self.checks.verify()
            raise _LeaveToTarfile
        data = self._read(data_at, size)
        if kind in b"xL" and self.pending:
            raise _LeaveToTarfile
        if kind == 0x78:  # 'x' (tarfile's own archives have one per member, for the mtime)
            self.pax = _pax_records(data) if _mentions_used_keys(data) else {}
            if any(k.startswith("GNU.sparse.") for k in self.pax):
                raise _LeaveToTarfile
        elif kind == 0x4C:  # 'L'
            self.long_name = data.split(b"\0", 1)[0]
        elif kind == 0x4B:  # 'K'
            self.long_link = data.split(b"\0", 1)[0]
        elif kind == 0x67 and _mentions_used_keys(data):  # 'g' (global): skipped unless it changes what is listed
            if any(k in _PAX_KEYS_USED or k.startswith("GNU.sparse.") for k in _pax_records(data)):
                raise _LeaveToTarfile

    def _member(self, header: bytes, kind: int, data_at: int, size: int) -> int:
        """List the member of ``header`` (with what the extended headers before it said) when it
        is a folder, a regular file or a link; the position of the next header."""
        if kind in b"SX":
            raise _LeaveToTarfile
        name_field = header[:100].split(b"\0", 1)[0]
        is_dir = kind == 0x35 or (kind == 0 and name_field.endswith(b"/"))  # '5', or a v7 folder
        name = self._name(header, name_field)
        if self.pax is not None and "size" in self.pax:
            try:
                size = int(self.pax["size"])
            except ValueError:
                raise _LeaveToTarfile from None
        if kind in b"12":  # a link: its target (GNU 'K' header, pax linkpath, or the header's linkname field)
            link = self.long_link or (self.pax or {}).get("linkpath") or header[157:257].split(b"\0", 1)[0]
        self.long_name = self.long_link = self.pax = None
        # data follows regular files and members of unknown types; folders, links and devices have none
        after = data_at if is_dir or kind in _NO_DATA_TYPES else data_at + _padded(size)
        rel, problem = member_path(name.decode("utf-8", "surrogateescape"))
        if rel is None:
            return after
        if is_dir:
            self.listed.append(_member((rel, self.base + data_at, 0, True, problem)))
        elif kind in _REGULAR_TYPES:
            if data_at + size > self.total:
                self.checks.verify()
                raise TeslaError(f"{self.label}: member {rel} runs past the end of the archive (truncated download?)")
            self.listed.append(_member((rel, self.base + data_at, size, False, problem)))
        elif kind in b"12":  # hard link, symbolic link
            target = link.decode("utf-8", "surrogateescape")
            self.links.append(_link(self.listed, rel, problem, target, kind == 0x31, self.base + data_at))
        return after

    def _name(self, header: bytes, name_field: bytes) -> bytes:
        """The member's stored path: a GNU long name, a pax path, or the header's prefix/name."""
        if self.long_name is not None:
            return self.long_name
        if self.pax is not None and "path" in self.pax:
            return self.pax["path"]
        if header[345]:  # ustar prefix
            return header[345:500].split(b"\0", 1)[0] + b"/" + name_field
        return name_field

def _padded(size: int) -> int:
    """Bytes a member's data occupies: ``size`` rounded up to whole 512-byte blocks."""
    return -(-size // _BLOCK) * _BLOCK
