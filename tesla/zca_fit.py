"""ZCA whitening fitted once on a training split (``tesla zca``), saved as ``tesla-zca`` v2.

The stage: the transform of :mod:`tesla.zca` (its math there) fitted chunk by chunk on the
images of a training split in the space of a named normalisation (:mod:`tesla.normalizations`).

Command line::

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

from tesla.arguments import finite_float
from tesla.data import ImageSplit
from tesla.devices import pick_device
from tesla.errors import TeslaError
from tesla.input_space import InputSpace
from tesla.normalizations import DEFAULT_NORMALIZATION, NORMALIZATIONS, resolve_normalization
from tesla.zca import DEFAULT_EPS, ZCA, CovarianceAccumulator, decompose

__all__ = ["configure_parser", "fit_zca_split", "run"]


def fit_zca_split(
    path: str | os.PathLike,
    eps: float = DEFAULT_EPS,
    chunk: int = 4096,
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
    parser.add_argument("--train", required=True, type=Path, help="training split (tesla-images HDF5)")
    parser.add_argument("--out", required=True, type=Path, help="output ZCA file (tesla-zca HDF5)")
    parser.add_argument(
        "--normalize", default=DEFAULT_NORMALIZATION, choices=NORMALIZATIONS,
        help="the space ZCA is fitted in (and later applied after): 'split' = the split's own mean/std; 'none' = "
        "pixels in [0, 1], as the published code; or fixed published constants",
    )
    parser.add_argument("--eps", type=finite_float, default=DEFAULT_EPS, help="eigenvalue regulariser eps")
    parser.add_argument("--chunk", type=int, default=4096, help="images per covariance update")
    parser.add_argument("--device", default="cpu", help="device for the covariance: cpu, cuda, auto")


def run(args: argparse.Namespace) -> int:
    if not args.eps > 0:
        raise TeslaError(f"--eps must be positive (got {args.eps}); the paper uses 0.1")
    if args.chunk < 1:
        raise TeslaError(f"--chunk must be at least 1 (got {args.chunk})")
    if args.out.is_dir():
        raise TeslaError(f"--out {args.out} is a directory; give a file name such as {args.out / 'zca.h5'}")
    if args.out.exists() and args.out.resolve() == Path(args.train).resolve():
        raise TeslaError(f"--out {args.out} is the training split itself; choose another file name")
    zca = fit_zca_split(
        args.train, eps=args.eps, chunk=args.chunk, device=pick_device(args.device), normalization=args.normalize
    )
    zca.save(args.out)
    s = zca.eigenvalues
    print(
        f"tesla zca: wrote {args.out}: D = {zca.dim}, {zca.meta['num_images']} images, normalisation "
        f"{zca.normalization}, eps {zca.eps}, "
        f"eigenvalues {float(s.max()):.4g} .. {float(s.min()):.4g}, "
        f"{int((s > zca.eps).sum())} above eps",
        file=sys.stderr,
    )
    return 0
