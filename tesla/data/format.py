"""The ``tesla-images`` HDF5 format (version 1): one file per split.

Layout (see docs/formats.md for the full table):

* ``images``: uint8, shape (N, H, W, C), sorted by class, chunked a few hundred images
  at a time so that any class or minibatch is read without touching the rest;
* ``labels``: int64 (N,), non-decreasing;
* ``class_offsets``: int64 (K+1,): images of class c are ``images[offsets[c]:offsets[c+1]]``;
* ``class_ids``, ``class_names``: UTF-8 strings (K,);
* ``skipped``: UTF-8 strings, one "path<TAB>reason" per input that could not be used;
* attributes: ``format``, ``format_version``, ``dataset``, ``split``, ``num_images``,
  ``num_classes``, ``height``, ``width``, ``channels``, ``mean``/``std`` (per channel,
  of pixel values scaled to [0, 1]), ``fingerprint`` (SHA-256 of labels and pixels),
  ``source``, ``source_path``, ``resize_rule``, ``num_skipped``, ``num_converted``,
  ``tesla_version``, plus any source-specific provenance.

The writer writes to a temporary name beside the output and renames it on success, so a
run killed half-way never leaves a file at the final path.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import h5py
import numpy as np

from tesla import __version__
from tesla.errors import TeslaError
from tesla.hdf5 import open_checked

if TYPE_CHECKING:  # torch is imported where tensors are made: `tesla prepare` never needs it
    import torch

FORMAT_NAME = "tesla-images"
FORMAT_VERSION = 1
_STR = h5py.string_dtype(encoding="utf-8")


def _chunk_images(height: int, width: int, channels: int) -> int:
    """Images per HDF5 chunk: about 1 MiB of pixels, at least 1."""
    return max(1, min(1024, (1 << 20) // max(1, height * width * channels)))


#: bytes of pixels summed at a time by :func:`_channel_sums` (the uint16 squares stay in cache)
_SUM_CHUNK_BYTES = 1 << 20


def _channel_sums(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel sums of u and of u^2 over uint8 N x H x W x C pixels, as int64 (C,).

    Summed over at most 65,536 images at a time, image by image in each pixel position
    (u^2 <= 65,025 fits uint16; a position's sum over 65,536 images fits uint32), then over
    chunks and positions in uint64: ~7 us per 64 x 64 x 3 image, without the int64 copy of
    the pixels that a direct sum needs."""
    n, channels = len(images), images.shape[-1]
    rows = images.reshape(n, -1)
    step = max(1, min(1 << 16, _SUM_CHUNK_BYTES // max(1, rows.shape[1])))
    total = np.zeros(rows.shape[1], dtype=np.uint64)
    squares = np.zeros(rows.shape[1], dtype=np.uint64)
    for start in range(0, n, step):
        chunk = rows[start : start + step]
        total += np.add.reduce(chunk, axis=0, dtype=np.uint32)
        squares += np.add.reduce(np.multiply(chunk, chunk, dtype=np.uint16), axis=0, dtype=np.uint32)
    return (
        total.reshape(-1, channels).sum(axis=0).astype(np.int64),
        squares.reshape(-1, channels).sum(axis=0).astype(np.int64),
    )


class SplitWriter:
    """Stream class-sorted images into a ``tesla-images`` file.

    Use as a context manager: the file appears at ``path`` only if the block ends without
    an exception (and :meth:`commit` found every class non-empty); otherwise the temporary
    file is removed.

    >>> with SplitWriter(path, dataset="demo", split="train", class_ids=ids,
    ...                  class_names=names, height=8, width=8, channels=1) as w:
    ...     w.append(images_uint8_nhwc, labels)   # labels non-decreasing across calls
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        dataset: str,
        split: str,
        class_ids: Sequence[str],
        class_names: Sequence[str] | None = None,
        height: int,
        width: int,
        channels: int,
        source: str,
        source_path: str = "",
        resize_rule: str = "none",
        attrs: dict | None = None,
        require_all_classes: bool = True,
    ) -> None:
        self.path = Path(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.num_classes = len(class_ids)
        if self.num_classes == 0:
            raise TeslaError(f"{source_path or source}: no classes found; nothing to write to {self.path}")
        if class_names is None:
            class_names = list(class_ids)
        if len(class_names) != self.num_classes:
            raise ValueError("class_names and class_ids differ in length")
        self.height, self.width, self.channels = int(height), int(width), int(channels)
        self.require_all_classes = require_all_classes
        self._meta = dict(
            dataset=dataset,
            split=split,
            source=source,
            source_path=str(source_path),
            resize_rule=resize_rule,
        )
        self._extra_attrs = dict(attrs or {})
        self._class_ids = [str(c) for c in class_ids]
        self._class_names = [str(c) for c in class_names]
        self._counts = np.zeros(self.num_classes, dtype=np.int64)
        self._n = 0
        self._last_label = -1
        self._sum = np.zeros(self.channels, dtype=np.int64)
        self._sumsq = np.zeros(self.channels, dtype=np.int64)
        self._hash_labels = hashlib.sha256()
        self._hash_pixels = hashlib.sha256()
        self._skipped: list[str] = []
        self.num_converted = 0
        self._file: h5py.File | None = None
        self._images = None
        self._labels = None

    # -- context manager -------------------------------------------------------------
    def __enter__(self) -> "SplitWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = h5py.File(self.tmp_path, "w")
        chunk = _chunk_images(self.height, self.width, self.channels)
        self._images = self._file.create_dataset(
            "images",
            shape=(0, self.height, self.width, self.channels),
            maxshape=(None, self.height, self.width, self.channels),
            dtype=np.uint8,
            chunks=(chunk, self.height, self.width, self.channels),
        )
        self._labels = self._file.create_dataset(
            "labels", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(max(chunk, 4096),)
        )
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()

    # -- writing ---------------------------------------------------------------------
    def append(self, images: np.ndarray, labels: np.ndarray | Sequence[int]) -> None:
        """Append a block of images (uint8, N x H x W x C) with their class indices."""
        if self._file is None:
            raise RuntimeError("SplitWriter.append outside its 'with' block")
        images = np.asarray(images)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if images.ndim == 3 and self.channels == 1:
            images = images[..., None]
        expected = (self.height, self.width, self.channels)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"images must be uint8 N x {expected}, got {images.dtype} {images.shape}")
        if len(labels) != len(images):
            raise ValueError("images and labels differ in length")
        if len(labels) == 0:
            return
        if labels[0] < self._last_label or np.any(np.diff(labels) < 0):
            raise ValueError("labels must be appended in non-decreasing class order")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"label out of range 0..{self.num_classes - 1}")
        n0, n1 = self._n, self._n + len(images)
        self._images.resize(n1, axis=0)
        self._labels.resize(n1, axis=0)
        self._images[n0:n1] = images
        self._labels[n0:n1] = labels
        self._n = n1
        self._last_label = int(labels[-1])
        self._counts += np.bincount(labels, minlength=self.num_classes)
        # exact integer sums of u and u^2 per channel (scaled to [0, 1] at commit)
        images = np.ascontiguousarray(images)
        total, squares = _channel_sums(images)
        self._sum += total
        self._sumsq += squares
        self._hash_labels.update(labels.tobytes())
        self._hash_pixels.update(memoryview(images).cast("B"))  # the pixel bytes, hashed in place

    def note_skipped(self, item: str, reason: str) -> None:
        """Record an input that could not be used (listed in the file and the report)."""
        self._skipped.append(f"{item}\t{reason}")

    @property
    def skipped(self) -> list[str]:
        return list(self._skipped)

    def commit(self) -> Path:
        if self._file is None:
            raise RuntimeError("SplitWriter.commit called twice or outside its 'with' block")
        empty = np.flatnonzero(self._counts == 0)
        if self.require_all_classes and len(empty):
            names = ", ".join(self._class_ids[i] for i in empty[:5])
            more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
            raise TeslaError(
                f"{self._meta['source_path'] or self._meta['source']}: class {names}{more} has no usable "
                f"image in the {self._meta['split']} split; remove the empty class folder or add images"
            )
        f = self._file
        offsets = np.concatenate([[0], np.cumsum(self._counts)]).astype(np.int64)
        f.create_dataset("class_offsets", data=offsets)
        f.create_dataset("class_ids", data=np.array(self._class_ids, dtype=object), dtype=_STR)
        f.create_dataset("class_names", data=np.array(self._class_names, dtype=object), dtype=_STR)
        f.create_dataset("skipped", data=np.array(self._skipped, dtype=object), dtype=_STR)
        pixels = max(1, self._n * self.height * self.width)
        mean = self._sum.astype(np.float64) / (255.0 * pixels)
        std = np.sqrt(np.maximum(self._sumsq.astype(np.float64) / (255.0**2 * pixels) - mean**2, 0.0))
        fingerprint = hashlib.sha256(
            self._hash_labels.digest() + self._hash_pixels.digest() + json.dumps(self._class_ids).encode()
        ).hexdigest()
        attrs = dict(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            num_images=self._n,
            num_classes=self.num_classes,
            height=self.height,
            width=self.width,
            channels=self.channels,
            mean=mean,
            std=std,
            fingerprint=fingerprint,
            num_skipped=len(self._skipped),
            num_converted=int(self.num_converted),
            tesla_version=__version__,
            **self._meta,
        )
        for key, value in {**attrs, **self._extra_attrs}.items():
            f.attrs[key] = value
        f.close()
        self._file = None
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:
                pass
            self._file = None
        self.tmp_path.unlink(missing_ok=True)


def normalize(images_uint8: torch.Tensor | np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Network input space: x = (u / 255 - mean_c) / std_c, NHWC uint8 -> NCHW float32."""
    import torch

    x = torch.as_tensor(images_uint8)
    if x.ndim == 3:
        x = x[None]
    x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    m = torch.as_tensor(np.asarray(mean, dtype=np.float32), device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(np.asarray(std, dtype=np.float32), device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of :func:`normalize` up to quantisation: NCHW float -> NCHW float in [0, 1]."""
    import torch

    m = torch.as_tensor(np.asarray(mean, dtype=np.float32), device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(np.asarray(std, dtype=np.float32), device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


@dataclass(frozen=True)
class ImageSplit:
    """Read access to one ``tesla-images`` file.

    Small metadata is read at :meth:`open`; pixels are read on demand (whole split with
    :meth:`load_tensors`, one class with :meth:`class_images`, per-class samples with
    :meth:`sample_per_class`).
    """

    path: Path
    attrs: dict
    labels: np.ndarray
    class_offsets: np.ndarray
    class_ids: list[str]
    class_names: list[str]

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ImageSplit":
        f, attrs, path = open_checked(
            path, format_name=FORMAT_NAME, format_version=FORMAT_VERSION, kind="prepared split file", producer="tesla prepare"
        )
        with f:
            labels = f["labels"][()]
            offsets = f["class_offsets"][()]
            ids = [s.decode() if isinstance(s, bytes) else str(s) for s in f["class_ids"][()]]
            names = [s.decode() if isinstance(s, bytes) else str(s) for s in f["class_names"][()]]
        return cls(path=path, attrs=attrs, labels=labels, class_offsets=offsets, class_ids=ids, class_names=names)

    # -- metadata --------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return int(self.attrs["num_images"])

    @property
    def num_classes(self) -> int:
        return int(self.attrs["num_classes"])

    @property
    def resolution(self) -> int:
        return int(self.attrs["height"])

    @property
    def channels(self) -> int:
        return int(self.attrs["channels"])

    @property
    def mean(self) -> list[float]:
        return [float(v) for v in np.atleast_1d(self.attrs["mean"])]

    @property
    def std(self) -> list[float]:
        return [float(v) for v in np.atleast_1d(self.attrs["std"])]

    @property
    def fingerprint(self) -> str:
        return str(self.attrs["fingerprint"])

    @property
    def dataset(self) -> str:
        return str(self.attrs.get("dataset", ""))

    def class_count(self, c: int) -> int:
        return int(self.class_offsets[c + 1] - self.class_offsets[c])

    # -- pixels ----------------------------------------------------------------------
    def images_uint8(self, index: slice | np.ndarray | None = None) -> np.ndarray:
        """Raw pixels, uint8 N x H x W x C (``index``: a slice or sorted indices)."""
        with h5py.File(self.path, "r") as f:
            ds = f["images"]
            if index is None:
                return ds[()]
            if isinstance(index, slice):
                return ds[index]
            index = np.asarray(index, dtype=np.int64)
            order = np.argsort(index, kind="stable")
            out = np.empty((len(index),) + ds.shape[1:], dtype=np.uint8)
            out[order] = ds[index[order]] if len(np.unique(index)) == len(index) else np.stack(
                [ds[i] for i in index[order]]
            )
            return out

    def class_images(self, c: int) -> np.ndarray:
        return self.images_uint8(slice(int(self.class_offsets[c]), int(self.class_offsets[c + 1])))

    def sample_indices_per_class(self, k: int, generator: torch.Generator) -> np.ndarray:
        """k distinct random image indices of every class, class-major (N = K*k)."""
        import torch

        out = []
        for c in range(self.num_classes):
            n = self.class_count(c)
            if k > n:
                raise TeslaError(
                    f"{self.path}: class {self.class_ids[c]} has {n} images, fewer than the {k} asked "
                    f"for per class; lower ipc to at most {int(np.diff(self.class_offsets).min())}"
                )
            perm = torch.randperm(n, generator=generator)[:k].numpy()
            out.append(int(self.class_offsets[c]) + np.sort(perm))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def sample_per_class(self, k: int, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        """k random real images of every class: (uint8 N x H x W x C, int64 labels)."""
        idx = self.sample_indices_per_class(k, generator)
        return self.images_uint8(idx), self.labels[idx]

    def load_tensors(
        self,
        device: str | torch.device = "cpu",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        chunk: int = 8192,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split in network input space: (float32 N x C x H x W, int64 N) on ``device``.

        ``mean``/``std`` default to this split's own statistics; pass the training split's
        for a test split. Converted chunk by chunk so peak host memory stays near the
        uint8 size plus one chunk.
        """
        import torch

        mean = self.mean if mean is None else mean
        std = self.std if std is None else std
        n = self.num_images
        x = torch.empty((n, self.channels, self.resolution, int(self.attrs["width"])), dtype=torch.float32, device=device)
        with h5py.File(self.path, "r") as f:
            ds = f["images"]
            for s in range(0, n, chunk):
                block = torch.from_numpy(ds[s : s + chunk]).to(device)
                x[s : s + len(block)] = normalize(block, mean, std)
        y = torch.as_tensor(self.labels, dtype=torch.int64, device=device)
        return x, y

    def summary(self) -> str:
        counts = np.diff(self.class_offsets)
        return (
            f"{self.path}: {self.num_images} images, {self.num_classes} classes "
            f"({counts.min()}..{counts.max()} per class), {self.resolution}x{self.attrs['width']}x{self.channels}, "
            f"mean {np.round(self.mean, 4).tolist()}, std {np.round(self.std, 4).tolist()}, "
            f"{int(self.attrs.get('num_skipped', 0))} skipped"
        )
