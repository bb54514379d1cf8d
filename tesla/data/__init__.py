"""Prepared datasets: the class-sorted uint8 HDF5 split format and its reader.

``tesla prepare`` writes one file per split with :class:`SplitWriter`; every later stage
reads it with :class:`ImageSplit`. The format (``tesla-images``, version 1) is documented
in docs/formats.md.
"""

from tesla.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ImageSplit,
    SplitDataset,
    SplitWriter,
    normalize,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ImageSplit",
    "SplitDataset",
    "SplitWriter",
    "normalize",
]
