"""A torch ``Dataset`` view of a prepared split, for users' own DataLoader loops.

Kept apart from :mod:`tesla.data.format` so that reading and writing the HDF5 format (and so
``tesla prepare`` and its worker processes) never imports torch.
"""

from __future__ import annotations

import os
from typing import Sequence

import h5py
import torch

from tesla.data.format import ImageSplit, normalize


class SplitDataset(torch.utils.data.Dataset):
    """A map-style torch Dataset over a split: item i = (float C x H x W tensor, label).

    Opens the HDF5 file lazily in each worker process, so it works with DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        self.split = ImageSplit.open(path)
        self.mean = self.split.mean if mean is None else list(mean)
        self.std = self.split.std if std is None else list(std)
        self._file: h5py.File | None = None

    def __len__(self) -> int:
        return self.split.num_images

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._file is None:
            self._file = h5py.File(self.split.path, "r")
        img = self._file["images"][i]
        return normalize(img, self.mean, self.std)[0], int(self.split.labels[i])

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None
        return state
