"""Prepared datasets: the class-sorted uint8 HDF5 split format and its reader.

``tesla prepare`` writes one file per split with :class:`SplitWriter`; every later stage
reads it with :class:`ImageSplit`, or only its header with :func:`read_split_header`. The
format (``tesla-images``, version 1) is documented in docs/formats.md.
"""

from tesla.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ImageSplit,
    SplitWriter,
    normalize,
)
from tesla.data.header import SplitHeader, check_test_split, read_split_header

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ImageSplit",
    "SplitDataset",
    "SplitHeader",
    "SplitWriter",
    "check_test_split",
    "normalize",
    "read_split_header",
]


def __getattr__(name: str):
    """``SplitDataset`` is imported on first use: it needs torch, the format itself does not."""
    if name == "SplitDataset":
        from tesla.data.dataset import SplitDataset

        return SplitDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
