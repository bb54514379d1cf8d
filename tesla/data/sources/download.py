"""Opt-in download (``--download``) of the datasets torchvision can fetch.

MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 are fetched with
``torchvision.datasets.<Name>(root=--input, download=True)``, which checks the official
checksums and leaves the files where the ``mnist``/``cifar`` sources look for them
(``<input>/MNIST/raw/``, ``<input>/cifar-10-batches-py/``, ...). Every network wait is
bounded by :data:`DOWNLOAD_TIMEOUT_S`; without a network the run stops with a message
saying how to place the files by hand.
"""

from __future__ import annotations

import socket
import urllib.error
from pathlib import Path

from tesla.errors import TeslaError

DOWNLOAD_TIMEOUT_S = 30.0

TORCHVISION_CLASS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}
BY_HAND = {
    "mnist": "the four files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    "t10k-labels-idx1-ubyte.gz (from the MNIST page or a mirror)",
    "fashion-mnist": "the four Fashion-MNIST idx files (train-images-idx3-ubyte.gz, ... from github.com/zalandoresearch/fashion-mnist)",
    "cifar10": "cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) or its extracted cifar-10-batches-py/ folder",
    "cifar100": "cifar-100-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) or its extracted cifar-100-python/ folder",
}


def download(source: str, folder: Path, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch ``source`` into ``folder`` with torchvision; TeslaError when offline or on failure."""
    import torchvision.datasets

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise TeslaError(f"{folder}: --download needs --input to be a folder, not a file")
    folder.mkdir(parents=True, exist_ok=True)
    cls = getattr(torchvision.datasets, TORCHVISION_CLASS[source])
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        for train in (True, False):
            cls(root=str(folder), train=train, download=True)
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError, RuntimeError) as exc:
        raise TeslaError(
            f"--download {source}: could not download into {folder} ({type(exc).__name__}: {exc}); this machine "
            f"seems to be offline or the server is unreachable. Place {BY_HAND[source]} in {folder} by hand "
            "and run again without --download"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
