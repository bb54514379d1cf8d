"""Opt-in download (``--download``) of the datasets torchvision can fetch.

MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 are fetched with torchvision's downloader
(``torchvision.datasets.utils.download_and_extract_archive``, with the URLs, mirrors and MD5
sums of the ``torchvision.datasets.<Name>`` class), which checks the official checksums and
leaves the files where the ``mnist``/``cifar`` sources look for them (``<input>/MNIST/raw/``,
``<input>/cifar-10-batches-py/``, ...). The dataset classes themselves are not built: their
constructors would read the files with their own loaders (``pickle.load`` for CIFAR); the
``mnist``/``cifar`` sources read them instead (CIFAR through :mod:`tesla.data.safe_pickle`).
Files already in place are kept (CIFAR: when every batch has its official MD5 sum). Every
network wait is bounded by :data:`DOWNLOAD_TIMEOUT_S`; without a network the run stops with a
message saying how to place the files by hand.

The ``mnist`` and ``cifar`` sources share the rest of their planning too: ``--input`` (fetched
first with ``--download``) by :func:`official_input`, the plan of an official release (class
index = the official label) by :func:`official_plan`.
"""

from __future__ import annotations

import socket
import urllib.error
from pathlib import Path

from tesla.data.sources.base import ArraySplit, DatasetPlan, SourceOptions
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


def _archives(cls: type, folder: Path) -> list[tuple[list[str], Path, str, str]]:
    """(URLs to try in turn, folder to extract into, file name, MD5) of each file of a
    torchvision dataset class: one archive for CIFAR, four idx files (over mirrors) for MNIST."""
    if hasattr(cls, "tgz_md5"):
        return [([cls.url], folder, cls.filename, cls.tgz_md5)]
    raw = folder / cls.__name__ / "raw"  # torchvision's MNIST layout
    return [([mirror + name for mirror in cls.mirrors], raw, name, md5) for name, md5 in cls.resources]


def _in_place(cls: type, folder: Path) -> bool:
    """True when the files are already there: CIFAR batches with their official MD5 sums, or
    the extracted idx files."""
    from torchvision.datasets.utils import check_integrity

    if hasattr(cls, "tgz_md5"):
        base = folder / cls.base_folder
        return all(check_integrity(str(base / name), md5) for name, md5 in [*cls.train_list, *cls.test_list])
    raw = folder / cls.__name__ / "raw"
    return all((raw / Path(name).stem).is_file() for name, _ in cls.resources)


def _fetch(urls: list[str], root: Path, filename: str, md5: str) -> None:
    """Download ``filename`` (checking ``md5``) from the first URL that answers, and extract it."""
    from torchvision.datasets import utils

    for i, url in enumerate(urls):
        try:
            utils.download_and_extract_archive(url, str(root), filename=filename, md5=md5)
            return
        except (urllib.error.URLError, socket.timeout, ConnectionError):
            if i == len(urls) - 1:
                raise


def download(source: str, folder: Path, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch ``source`` into ``folder`` with torchvision's downloader; TeslaError when offline
    or on failure. Nothing is unpickled here (see the module doc)."""
    import torchvision.datasets

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise TeslaError(f"{folder}: --download needs --input to be a folder, not a file")
    folder.mkdir(parents=True, exist_ok=True)
    cls = getattr(torchvision.datasets, TORCHVISION_CLASS[source])
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        if not _in_place(cls, folder):
            for urls, root, filename, md5 in _archives(cls, folder):
                _fetch(urls, root, filename, md5)
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError, RuntimeError) as exc:
        raise TeslaError(
            f"--download {source}: could not download into {folder} ({type(exc).__name__}: {exc}); this machine "
            f"seems to be offline or the server is unreachable. Place {BY_HAND[source]} in {folder} by hand "
            "and run again without --download"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def official_input(opts: SourceOptions, source: str, *, give: str, absent: str, folder_only: bool) -> Path:
    """``--input`` of an official release: required (else ``{source}: give --input{give}``),
    fetched into first with ``--download``, and then a folder (``folder_only``) or any existing
    path (else an error ending with ``absent``, what to give)."""
    if opts.input is None:
        raise TeslaError(f"{source}: give --input{give}")
    path = Path(opts.input)
    if opts.download:
        download(source, path)
    if not (path.is_dir() if folder_only else path.exists()):
        what = "folder" if folder_only else "file or folder"
        raise TeslaError(f"{path}: no such {what} (given as --input); {absent}")
    return path


def official_plan(source: str, name: str | None, path: Path, class_ids: list[str], class_names: list[str], *,
                  channels: int, resolution: int, train: ArraySplit, test: ArraySplit) -> DatasetPlan:
    """The plan of an official release read from ``path``: its two decoded splits, class
    index = the official label."""
    return DatasetPlan(
        source=source,
        name=name or source,
        class_ids=list(class_ids),
        class_names=list(class_names),
        channels=channels,
        default_resolution=resolution,
        train=train,
        test=test,
        attrs={"input": str(path)},
        class_order="official label order",
    )
