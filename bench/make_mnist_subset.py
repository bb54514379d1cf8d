"""A class-balanced MNIST subset as a tar of PNG class folders (train/<digit>/, test/<digit>/), for
``bench/reproduce_published.py --dataset mnist --channels 1`` on a CPU (docs/benchmarks.md).

    python bench/make_mnist_subset.py --mnist $TESLA_DATASETS/mnist --train-per-class 100 \\
        --test-per-class 200 --out /tmp/mnist-subset.tar

The first N images of each class in file order, from the official idx files.
"""

from __future__ import annotations

import argparse
import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def read_idx(path: Path) -> np.ndarray:
    """The array of an idx file (gzip): magic 0x0000 08 D, then D big-endian int32 sizes, then uint8 data."""
    raw = gzip.open(path, "rb").read()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mnist", type=Path, required=True, help="folder with the four official idx .gz files")
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--test-per-class", type=int, default=200)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    tmp = a.out.with_name(a.out.name + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        for split, prefix, per in (("train", "train", a.train_per_class), ("test", "t10k", a.test_per_class)):
            images, labels = read_idx(a.mnist / f"{prefix}-images-idx3-ubyte.gz"), read_idx(a.mnist / f"{prefix}-labels-idx1-ubyte.gz")
            for digit in range(10):
                for k, i in enumerate(np.flatnonzero(labels == digit)[:per]):
                    buf = io.BytesIO()
                    Image.fromarray(images[i], mode="L").save(buf, format="PNG")
                    info = tarfile.TarInfo(f"{split}/{digit}/{k:05d}.png")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)
    tmp.replace(a.out)
    print(f"{a.out}: {10 * a.train_per_class} train + {10 * a.test_per_class} test images")


if __name__ == "__main__":
    main()
