"""ZCA whitening fitted once on a training split (``tesla zca``), saved as ``tesla-zca`` v2.

The stage: the transform of :mod:`tesla.zca` (its math there) fitted chunk by chunk on the
images of a training split in the space of a named normalisation (:mod:`tesla.normalizations`).

Command line (its options declared in :mod:`tesla.zca_settings`)::

    tesla zca --train DIR/train.h5 --out DIR/zca.h5 [--normalize split|none|cifar10|...] [--eps 0.1]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from tesla.data import ImageSplit
from tesla.devices import pick_device
from tesla.errors import TeslaError
from tesla.input_space import InputSpace
from tesla.normalizations import DEFAULT_NORMALIZATION, resolve_normalization
from tesla.settings import add_arguments, from_args
from tesla.zca import ZCA, CovarianceAccumulator, decompose
from tesla.zca_settings import DEFAULT_CHUNK, DEFAULT_EPS, ZcaSettings

__all__ = ["check_paths", "configure_parser", "fit_zca_split", "run"]


def fit_zca_split(
    path: str | os.PathLike,
    eps: float = DEFAULT_EPS,
    chunk: int = DEFAULT_CHUNK,
    device: torch.device | str = "cpu",
    progress: bool = True,
    normalization: str = DEFAULT_NORMALIZATION,
) -> ZCA:
    """Fit ZCA on a ``tesla-images`` training split in the space of ``normalization``
    (``split``: its own mean/std; ``none``: pixels in [0, 1], the published way), chunk by chunk."""
    split = ImageSplit.open(path)
    space = InputSpace(resolve_normalization(normalization, split))
    c, h, w = split.channels, split.resolution, int(split.attrs["width"])
    dim = c * h * w
    if dim > 20000:
        print(
            f"tesla zca: {path}: D = {dim} features, the covariance alone takes {dim * dim * 8 / 2**30:.1f} GiB "
            "and its eigen-decomposition is slow; ZCA is meant for CIFAR-size images",
            file=sys.stderr,
        )
    acc = CovarianceAccumulator(dim, device=device)
    n = split.num_images
    with h5py.File(split.path, "r") as f, tqdm(
        total=n, desc="zca covariance", unit="img", disable=not progress, file=sys.stderr
    ) as bar:
        images = f["images"]
        for s in range(0, n, chunk):
            block = images[s : s + chunk]
            acc.update(space.to_input(block, device))
            bar.update(len(block))
    if progress:
        print(f"tesla zca: eigen-decomposition of the {dim} x {dim} covariance ...", file=sys.stderr)
    meta = {
        "dataset": split.dataset,
        "train_fingerprint": split.fingerprint,
        "train_path": str(split.path),
        "normalization_mean": np.asarray(space.mean, dtype=np.float64),
        "normalization_std": np.asarray(space.std, dtype=np.float64),
    }
    return decompose(acc, eps, (c, h, w), normalization, meta)


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The options of ``tesla zca``: every declared setting (:class:`tesla.zca_settings.ZcaSettings`),
    their bounds checked as the arguments are parsed."""
    add_arguments(parser, ZcaSettings)


def check_paths(settings: ZcaSettings) -> None:
    """Refuse an ``--out`` that would not be a new file beside the training split."""
    out = settings.out
    if out.is_dir():
        raise TeslaError(f"--out {out} is a directory; give a file name such as {out / 'zca.h5'}")
    if out.exists() and out.resolve() == Path(settings.train).resolve():
        raise TeslaError(f"--out {out} is the training split itself; choose another file name")


def run(args: argparse.Namespace) -> int:
    s = from_args(ZcaSettings, args)
    check_paths(s)
    zca = fit_zca_split(s.train, eps=s.eps, chunk=s.chunk, device=pick_device(s.device), normalization=s.normalize)
    zca.save(s.out)
    values = zca.eigenvalues
    print(
        f"tesla zca: wrote {s.out}: D = {zca.dim}, {zca.meta['num_images']} images, normalisation "
        f"{zca.normalization}, eps {zca.eps}, "
        f"eigenvalues {float(values.max()):.4g} .. {float(values.min()):.4g}, "
        f"{int((values > zca.eps).sum())} above eps",
        file=sys.stderr,
    )
    return 0
