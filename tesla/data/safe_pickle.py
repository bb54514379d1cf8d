"""The one reader of python pickles in the package: it loads only what official batches hold.

Rule: a pickle may build dicts, lists, tuples, str, bytes, numbers, booleans and None (no
global is needed for those), and NumPy arrays and dtypes through the functions NumPy itself
names when it pickles them (``numpy.ndarray``, ``numpy.dtype``, ``_reconstruct`` of
``numpy.core.multiarray`` / ``numpy._core.multiarray``, ``_frombuffer`` of
``numpy.core.numeric`` / ``numpy._core.numeric`` (protocol 5), under the NumPy 1.x and 2.x
module paths), and bytes written by Python 3 under protocols 0-2 (``_codecs.encode(text,
"latin1")``). Every other global (a class, a function, anything else) is refused before it is
looked up, so a crafted file cannot run code: loading stops with one line naming the file,
the archive member and the refused name.

These are exactly the globals of the official CIFAR-10/100 "python version" batches (Python
2, protocol 2: ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``),
of the Downsampled-ImageNet batches, and of such dicts written by NumPy 1.24-2.x under
Python 3 with protocols 0 to 5 (tests/test_safe_pickle.py records them).
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
from typing import Any, BinaryIO, Callable

import numpy as np

from tesla.errors import TeslaError

#: the spelling Python 3 uses when it pickles bytes under protocols 0-2
LATIN1 = "latin1"


def _latin1_encode(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as Python 3's pickler uses it for bytes (protocols 0-2), and only so.

    ``_codecs.encode`` is a pure function (text in, bytes out; it touches no file, process
    or module state beyond the codec lookup), but its encoding name selects a codec: limiting
    it to latin-1 leaves it nothing to choose, so it can only turn the file's own text back
    into the bytes it came from."""
    if encoding != LATIN1 or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} (only {LATIN1!r} is allowed)")
    return text.encode(LATIN1)


def _numpy_reconstructors() -> dict[str, Callable]:
    """The functions this NumPy names when it pickles an array (protocol 2 and 5), taken from
    NumPy's own reduction so they are right under either module path."""
    by_protocol_2 = np.zeros(1).__reduce_ex__(2)[0]
    by_protocol_5 = np.zeros(1).__reduce_ex__(5)[0]
    return {"_reconstruct": by_protocol_2, "_frombuffer": by_protocol_5}


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) as written in a file -> the object it may stand for.

    Why these are safe: ``_reconstruct(subtype, shape, dtype)`` makes an empty array of an
    ndarray subtype (NumPy checks it is one; the only type a file can name is ``ndarray``
    itself), and BUILD then hands ``ndarray.__setstate__`` the shape, dtype and raw bytes,
    whose sizes NumPy checks; ``numpy.dtype(spec, align, copy)`` parses a type code;
    ``numpy.ndarray(...)`` called directly checks that a given buffer is large enough;
    ``_frombuffer(buf, dtype, shape, order)`` is ``frombuffer`` and ``reshape``. None of them
    imports, opens or calls anything named by the file; the elements of an object array are
    built by this same unpickler.

    Not here, on purpose: ``copyreg._reconstructor`` / ``copy_reg._reconstructor`` (Python's
    way to pickle plain class instances under protocols 0-1). ``_reconstructor(cls, base,
    state)`` calls ``object.__new__(cls)``, or ``base.__new__(cls, state)`` and then
    ``base.__init__(obj, state)``, so it constructs and initialises whatever classes it is
    handed: it would be harmless only if ``cls`` and ``base`` were themselves allowed globals,
    and then it would add nothing, since no NumPy array, dtype or official batch uses it.
    Likewise ``numpy.core.multiarray.scalar`` (NumPy scalars) is not in the official files and
    stays refused."""
    numpy_funcs = _numpy_reconstructors()
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):  # NumPy 1.x and 2.x write different paths
        allowed[(f"{core}.multiarray", "_reconstruct")] = numpy_funcs["_reconstruct"]
        allowed[(f"{core}.numeric", "_frombuffer")] = numpy_funcs["_frombuffer"]
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


ALLOWED_GLOBALS = _allowed_globals()


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global outside :data:`ALLOWED_GLOBALS`."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualified_name = f"{module}.{name}"
        # Python 2 names (protocols 0-2 write them), mapped as pickle itself maps them
        renamed = _compat_pickle.IMPORT_MAPPING.get(module, module), name
        python3 = ".".join(_compat_pickle.NAME_MAPPING.get((module, name), renamed))
        if python3 != self.qualified_name:
            self.qualified_name += f" (Python 3: {python3})"


class BatchUnpickler(pickle.Unpickler):
    """An unpickler whose only globals are :data:`ALLOWED_GLOBALS` (nothing is imported)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None


def refusal_message(file: str, member: str | None, refused: str, what: str) -> str:
    """The one-line error for a refused global."""
    where = f"{file}, member {member}" if member else file
    return (
        f"{where}: refuses to load the Python global {refused}: this file is not an official {what} batch "
        "(those hold only dicts, lists, strings, numbers and NumPy arrays) and may have been made to run code; "
        "nothing was written: fetch the official files again"
    )


def load_official(
    source: bytes | BinaryIO, *, file: str, member: str | None, what: str, encoding: str
) -> Any:
    """Unpickle ``source`` (bytes or a binary file) with :class:`BatchUnpickler`.

    A refused global raises :class:`TeslaError` naming ``file``, ``member`` (an archive
    member, or None) and the global; other unpickling errors propagate for the caller to
    word as a damaged file. ``encoding`` decodes Python 2 strings (``"bytes"`` or ``"latin1"``)."""
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        return BatchUnpickler(stream, encoding=encoding).load()
    except RefusedGlobal as refused:
        raise TeslaError(refusal_message(file, member, refused.qualified_name, what)) from None
