"""The ZCA whitening transform: fitted on images, applied, inverted, fingerprinted, and kept in
a ``tesla-zca`` v2 file (``tesla zca``, :mod:`tesla.zca_fit`, fits it on a training split).

The images are taken in the space of a named normalisation (``tesla.normalizations``),
z = (u/255 - mean_c)/std_c, flattened to D = C*H*W: ``--normalize split`` (default) uses
the training split's own mean/std; ``--normalize none`` takes the pixels in [0, 1] as they
are, which is how the published MTT/TESLA code fits it (kornia's ZCAWhitening(eps=0.1) on
``ToTensor()`` images, PAPER.md section 10).  With the data centred,

    mu = (1/N) sum_n z_n,   Sigma = 1/(N-1) sum_n (z_n - mu)(z_n - mu)^T = U diag(s) U^T,
    W = U diag(1/sqrt(s + eps)) U^T            (eps = 0.1, PAPER.md section 4),
    zca(z) = W (z - mu),       zca^{-1}(y) = U diag(sqrt(s + eps)) U^T y + mu.

Sigma is the unbiased (N - 1) estimate, which is kornia's default (``unbiased=True``).
W is symmetric, so the whitened data have covariance W Sigma W = U diag(s/(s+eps)) U^T:
directions with variance well above eps come out at unit variance, the weak ones (noise)
are damped instead of amplified.  eps acts on the variances of z, so the same eps is a
different regulariser in different normalisations (pixels in [0, 1] have std_c^2 times the
variance of split-normalised ones, about 1/17 to 1/15 on CIFAR-10): the file records the
normalisation.

The covariance is accumulated chunk by chunk in float64 (sums of z - c and of
(z - c)(z - c)^T around a shift c, the first chunk's mean, to avoid cancellation), so the
split never needs to be in memory as float64 at once: memory is O(D^2), not O(N D).
"""

from __future__ import annotations

import hashlib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch

from tesla import __version__
from tesla.errors import TeslaError
from tesla.files import atomic_output
from tesla.hdf5 import open_checked
from tesla.normalizations import DEFAULT_NORMALIZATION, check_normalization_name
from tesla.zca_settings import DEFAULT_CHUNK, DEFAULT_EPS  # declared with `tesla zca`'s settings (no torch there)

__all__ = [
    "DEFAULT_EPS",
    "ZCA",
    "CovarianceAccumulator",
    "decompose",
    "fit_zca",
    "zca_fingerprint",
]

FORMAT_NAME = "tesla-zca"
#: v2 added the ``normalization`` attribute; v1 files were all fitted in the split's own
#: normalisation and are read as such
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


class CovarianceAccumulator:
    """Streaming mean and covariance of row vectors in float64.

    With c the shift (first chunk's mean), a = sum (x - c), B = sum (x - c)(x - c)^T:
    mu = c + a/N,  Sigma = (B - a a^T / N) / (N - 1).
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.dim = int(dim)
        self.device = torch.device(device)
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.sum = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.reshape(len(rows), -1).to(device=self.device, dtype=torch.float64)
        if rows.shape[1] != self.dim:
            raise ValueError(f"rows have {rows.shape[1]} features, expected {self.dim}")
        if len(rows) == 0:
            return
        if self.shift is None:
            self.shift = rows.mean(dim=0)
        centred = rows - self.shift
        self.n += len(rows)
        self.sum += centred.sum(dim=0)
        self.outer.addmm_(centred.T, centred)

    def mean(self) -> torch.Tensor:
        return self.shift + self.sum / self.n

    def covariance(self) -> torch.Tensor:
        if self.n < 2:
            raise TeslaError(f"ZCA needs at least 2 images to estimate a covariance, got {self.n}")
        a = self.sum
        return (self.outer - torch.outer(a, a) / self.n) / (self.n - 1)


@dataclass
class ZCA:
    """A fitted ZCA transform: mu, the eigen-decomposition U diag(s) U^T of Sigma, and eps."""

    mean: torch.Tensor  # (D,) float64
    eigenvectors: torch.Tensor  # (D, D) float64, columns = U
    eigenvalues: torch.Tensor  # (D,) float64, s >= 0
    eps: float
    image_shape: tuple[int, int, int]  # (C, H, W)
    normalization: str = DEFAULT_NORMALIZATION  # the space it was fitted in (tesla.input_space)
    meta: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def dim(self) -> int:
        return int(self.mean.numel())

    def fingerprint(self) -> str:
        """SHA-256 of the transform: mu, s, U as float64 bytes, then ``repr(eps)``."""
        h = hashlib.sha256()
        for t in (self.mean, self.eigenvalues, self.eigenvectors):
            h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
        h.update(repr(float(self.eps)).encode())
        return h.hexdigest()

    def matrix(self, power: float = -0.5) -> torch.Tensor:
        """U diag((s + eps)^power) U^T in float64: power -1/2 whitens, +1/2 inverts."""
        scale = (self.eigenvalues + self.eps).pow(power)
        return (self.eigenvectors * scale) @ self.eigenvectors.T

    def _operators(self, power: float, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (power, str(device), dtype)
        if key not in self._cache:
            self._cache[key] = (
                self.matrix(power).to(device=device, dtype=dtype),
                self.mean.to(device=device, dtype=dtype),
            )
        return self._cache[key]

    def check_shape(self, shape: Sequence[int], where: str, what: str, fix: str) -> None:
        """TeslaError unless ``shape`` (C x H x W) is that of the images the transform was fitted
        on: '<where>: fitted on images of shape (C, H, W) (C x H x W), but <what>; <fix>'."""
        if tuple(int(v) for v in shape) != tuple(self.image_shape):
            raise TeslaError(f"{where}: fitted on images of shape {tuple(self.image_shape)} (C x H x W), but {what}; {fix}")

    def _check(self, x: torch.Tensor) -> None:
        shape = tuple(x.shape[1:]) if x.ndim == 4 else ()  # () matches no image shape: N x C x H x W only
        self.check_shape(shape, "ZCA", f"got a batch of shape {tuple(x.shape)}", "use the zca.h5 of this dataset")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """zca(x) = W (x - mu) per image (N x C x H x W in, same out), on x's device."""
        self._check(x)
        w, mu = self._operators(-0.5, x.device, x.dtype)
        return ((x.reshape(len(x), -1) - mu) @ w).view_as(x)

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        """zca^{-1}(z) = U diag(sqrt(s + eps)) U^T z + mu (back to network space, for viewing)."""
        self._check(z)
        w_inv, mu = self._operators(0.5, z.device, z.dtype)
        return (z.reshape(len(z), -1) @ w_inv + mu).view_as(z)

    def apply_chunked(self, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """:meth:`apply` in place over chunks of a large tensor (no second full copy)."""
        self._check(x)
        with torch.no_grad():
            for s in range(0, len(x), chunk):
                x[s : s + chunk] = self.apply(x[s : s + chunk])
        return x

    # -- file --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write a ``tesla-zca`` v2 file (temporary name, renamed when complete)."""
        path = Path(path)
        with atomic_output(path) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("mean", data=self.mean.cpu().numpy().astype(np.float64))
                f.create_dataset("eigenvalues", data=self.eigenvalues.cpu().numpy().astype(np.float64))
                f.create_dataset(
                    "eigenvectors",
                    data=self.eigenvectors.cpu().numpy().astype(np.float64),
                    chunks=(min(self.dim, 256), self.dim),
                )
                f.attrs["format"] = FORMAT_NAME
                f.attrs["format_version"] = FORMAT_VERSION
                f.attrs["eps"] = float(self.eps)
                f.attrs["normalization"] = self.normalization
                f.attrs["channels"], f.attrs["height"], f.attrs["width"] = (int(v) for v in self.image_shape)
                f.attrs["centered"] = True
                f.attrs["covariance"] = "unbiased: sum (x - mu)(x - mu)^T / (N - 1)"
                f.attrs["tesla_version"] = __version__
                for key, value in self.meta.items():
                    f.attrs[key] = value
        return path

    @classmethod
    def load(cls, path: "str | os.PathLike | typing.BinaryIO") -> "ZCA":
        """Read a ``tesla-zca`` file (a path, or a binary file object such as the artifact
        embedded in a synthetic set); clear errors for missing, foreign or wrong-version files."""
        f, attrs, path = open_checked(
            path, format_name=FORMAT_NAME, format_version=READABLE_VERSIONS, kind="ZCA file", producer="tesla zca"
        )
        with f:
            try:
                mean = torch.from_numpy(f["mean"][()])
                values = torch.from_numpy(f["eigenvalues"][()])
                vectors = torch.from_numpy(f["eigenvectors"][()])
                shape = (int(attrs["channels"]), int(attrs["height"]), int(attrs["width"]))
                eps = float(attrs["eps"])
                # v1: always fitted in the training split's own normalisation
                normalization = str(attrs["normalization"]) if int(attrs["format_version"]) >= 2 else DEFAULT_NORMALIZATION
            except KeyError as exc:
                raise TeslaError(f"{path}: incomplete ZCA file (missing {exc}); re-run 'tesla zca'") from None
        d = int(np.prod(shape))
        if mean.shape != (d,) or values.shape != (d,) or vectors.shape != (d, d):
            raise TeslaError(f"{path}: ZCA arrays do not match the image shape {shape}; re-run 'tesla zca'")
        check_normalization_name(normalization, f"{path}: normalization")
        known = {
            "format", "format_version", "eps", "channels", "height", "width", "centered", "covariance",
            "tesla_version", "normalization",
        }
        meta = {k: v for k, v in attrs.items() if k not in known}
        return cls(mean, vectors, values, eps, shape, normalization=normalization, meta=meta)


def zca_fingerprint(zca: ZCA | None) -> str:
    """:meth:`ZCA.fingerprint`, or '' for no ZCA (what expert files record)."""
    return "" if zca is None else zca.fingerprint()


def decompose(
    acc: CovarianceAccumulator, eps: float, image_shape: Sequence[int], normalization: str, meta: dict
) -> ZCA:
    """The transform of the accumulated covariance: Sigma = U diag(s) U^T (eigenvalues clamped
    at 0), with ``meta`` and the number of images recorded."""
    if not eps > 0:
        raise TeslaError(f"--eps must be positive (got {eps}); the paper uses 0.1")
    cov = acc.covariance()
    values, vectors = torch.linalg.eigh(cov)
    values = values.clamp_min(0.0)  # round-off can make tiny eigenvalues negative
    return ZCA(
        acc.mean().cpu(),
        vectors.cpu(),
        values.cpu(),
        float(eps),
        tuple(int(v) for v in image_shape),
        normalization=normalization,
        meta={"num_images": int(acc.n), **meta},
    )


def fit_zca(
    x: torch.Tensor, eps: float = DEFAULT_EPS, chunk: int = DEFAULT_CHUNK, normalization: str = DEFAULT_NORMALIZATION
) -> ZCA:
    """Fit ZCA on images x (N x C x H x W): W = U diag(1/sqrt(s+eps)) U^T.

    ``normalization`` names the space x is in (recorded, not applied: x is used as given).
    """
    if x.ndim != 4:
        raise TeslaError(f"fit_zca expects N x C x H x W images, got shape {tuple(x.shape)}")
    check_normalization_name(normalization, "normalization")
    acc = CovarianceAccumulator(x[0].numel(), device=x.device)
    for s in range(0, len(x), chunk):
        acc.update(x[s : s + chunk])
    return decompose(acc, eps, x.shape[1:], normalization, {})
