"""Opening our own HDF5 files: one check of existence, format name and version for all.

Every file tesla writes carries ``format`` and ``format_version`` attributes
(docs/formats.md). :func:`open_checked` refuses a missing file, a non-HDF5 file, another
program's file and another version, each with a message that names the file and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO

import h5py

from tesla.errors import TeslaError


def decoded_attrs(obj: h5py.File | h5py.Group) -> dict[str, Any]:
    """The attributes of an HDF5 object, byte strings decoded as UTF-8."""
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in obj.attrs.items()}


def open_checked(
    path: str | os.PathLike | BinaryIO,
    *,
    format_name: str,
    format_version: int | tuple[int, ...],
    kind: str,
    producer: str,
) -> tuple[h5py.File, dict[str, Any], Path]:
    """Open ``path`` read-only and check that it is a ``format_name`` file of ``format_version``.

    ``kind`` names what the file is for people ("expert trajectory", "ZCA file", ...) and
    ``producer`` the command that writes it ("tesla experts"). ``format_version`` is the
    version read, or a tuple of the versions read (the current one last). ``path`` may also
    be a binary file object (an artifact embedded in another file). Returns the open file
    (close it, or use it in a ``with`` block), its decoded attributes, and the path used in
    messages.
    """
    readable = (format_version,) if isinstance(format_version, int) else tuple(format_version)
    if hasattr(path, "read"):
        source: Any = path
        shown = Path(f"<embedded {kind}>")
    else:
        shown = Path(path)
        source = shown
        if not shown.exists():
            raise TeslaError(f"{shown}: no such {kind}; run '{producer}' first (or fix the path)")
    try:
        f = h5py.File(source, "r")
    except OSError as exc:
        raise TeslaError(f"{shown}: not an HDF5 file ({exc}); give a file written by '{producer}'") from None
    attrs = decoded_attrs(f)
    if attrs.get("format") != format_name:
        f.close()
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        raise TeslaError(
            f"{shown}: not {article} {kind} (format attribute {attrs.get('format')!r}, expected {format_name!r}); "
            f"give a file written by '{producer}'"
        )
    version = int(attrs.get("format_version", -1))
    if version not in readable:
        f.close()
        versions = " and ".join(str(v) for v in readable)
        raise TeslaError(
            f"{shown}: {format_name} format version {version}, this tesla reads version {versions}; "
            f"re-run '{producer}' with this version of tesla"
        )
    return f, attrs, shown
