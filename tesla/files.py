"""Outputs that appear at their final path complete or not at all."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Write ``path`` all or nothing.

    Yields a temporary name beside it (``.NAME.PID.tmp``, a file or a folder, whatever the
    block makes there); when the block ends normally the temporary is renamed to ``path``
    (an atomic replace on one file system), and when it raises or is interrupted the
    temporary is removed, so a partial output never stands at the final name. The parent
    folder is created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
