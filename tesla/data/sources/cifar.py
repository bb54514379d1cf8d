"""CIFAR-10 and CIFAR-100 from the official "python version" pickle batches.

Layout (Krizhevsky 2009): each batch is a pickled dict with ``data`` (N x 3072 uint8,
channel-planar: 1024 red, 1024 green, 1024 blue values, rows top to bottom) and
``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100). CIFAR-10: ``data_batch_1`` ..
``data_batch_5``, ``test_batch``, ``batches.meta`` (``label_names``); CIFAR-100: ``train``,
``test``, ``meta`` (``fine_label_names``). Read from the folder ``cifar-10-batches-py`` /
``cifar-100-python``, the folder holding it, or the official ``.tar.gz``.

A pickle can run code when loaded by Python's own unpickler: the batches are read with
:func:`tesla.data.safe_pickle.load_official`, which builds only dicts, lists, strings, numbers
and NumPy arrays and refuses any other global, naming the file and member.
"""

from __future__ import annotations

import tarfile
from functools import partial
from pathlib import Path

import numpy as np

from tesla.data.safe_pickle import load_official
from tesla.data.sources.base import ArraySplit, DatasetPlan, SourceOptions
from tesla.data.sources.download import official_input, official_plan
from tesla.data.sources.options import DOWNLOAD, INPUT
from tesla.data.sources.registry import DataSource
from tesla.errors import TeslaError

LAYOUT = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        meta="batches.meta",
        names_key="label_names",
        labels_key="labels",
        num_classes=10,
    ),
    "cifar100": dict(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train=["train"],
        test=["test"],
        meta="meta",
        names_key="fine_label_names",
        labels_key="fine_labels",
        num_classes=100,
    ),
}


def _unpickle(data: bytes, where: tuple[str, str | None]) -> dict:
    """A batch dict from its bytes; ``where`` = (file, archive member or None)."""
    try:
        obj = load_official(data, file=where[0], member=where[1], what="CIFAR", encoding="bytes")
    except TeslaError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise TeslaError(f"{_named(where)}: not a readable CIFAR pickle ({type(exc).__name__}: {exc}); fetch the official archive again") from None
    if not isinstance(obj, dict):
        raise TeslaError(f"{_named(where)}: expected a pickled dict, found {type(obj).__name__}; give the official CIFAR batches")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _named(where: tuple[str, str | None]) -> str:
    """'archive/member' or the file's path, as the messages name a batch."""
    return f"{where[0]}/{where[1]}" if where[1] else where[0]


class _Files:
    """Reads batch files from a folder or from the official .tar.gz, by base name."""

    def __init__(self, path: Path, layout: dict, source: str) -> None:
        self.tar = None
        self.folder = None
        if path.is_file():
            try:
                self.tar = tarfile.open(path, "r:*")
            except tarfile.TarError as exc:
                raise TeslaError(f"{path}: not a readable tar archive ({exc}); give the official {layout['archive']}") from None
            self.members = {Path(m.name).name: m for m in self.tar.getmembers() if m.isfile()}
            self.where = str(path)
        else:
            for candidate in (path, path / layout["folder"]):
                if (candidate / layout["meta"]).is_file() or (candidate / layout["test"][0]).is_file():
                    self.folder = candidate
                    break
            archive = path / layout["archive"]
            if self.folder is None and archive.is_file():
                self.__init__(archive, layout, source)
                return
            if self.folder is None:
                raise TeslaError(
                    f"{path}: no {layout['folder']}/ batches found (looked for {layout['meta']} and {layout['test'][0]} "
                    f"in {path} and {path / layout['folder']}, and for {layout['archive']}); place the official "
                    f"python-version batches there, or add --download"
                )
            self.where = str(self.folder)

    def read(self, name: str) -> tuple[bytes, tuple[str, str | None]]:
        """The bytes of batch ``name`` and where they are: (archive, member) or (path, None)."""
        if self.tar is not None:
            m = self.members.get(name)
            if m is None:
                raise TeslaError(f"{self.where}: member {name} missing; give the complete official archive")
            return self.tar.extractfile(m).read(), (self.where, m.name)
        p = self.folder / name
        if not p.is_file():
            raise TeslaError(f"{p}: missing; the folder must hold the complete official batches")
        return p.read_bytes(), (str(p), None)


def _read_batches(files: _Files, names: list[str], layout: dict, split: str) -> ArraySplit:
    images, labels = [], []
    for name in names:
        raw, found = files.read(name)
        batch, where = _unpickle(raw, found), _named(found)
        if "data" not in batch or layout["labels_key"] not in batch:
            raise TeslaError(
                f"{where}: batch lacks 'data' or '{layout['labels_key']}' (keys: {sorted(batch)}); "
                "give the official batches of this dataset (CIFAR-10 and CIFAR-100 differ)"
            )
        data = np.asarray(batch["data"])
        lab = np.asarray(batch[layout["labels_key"]], dtype=np.int64).reshape(-1)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise TeslaError(f"{where}: 'data' is {data.dtype} {data.shape}, expected uint8 N x 3072; give the official batches")
        if len(lab) != len(data):
            raise TeslaError(f"{where}: {len(data)} images but {len(lab)} labels; the batch is damaged")
        if lab.size and (lab.min() < 0 or lab.max() >= layout["num_classes"]):
            raise TeslaError(f"{where}: label outside 0..{layout['num_classes'] - 1}; give the official batches")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    return ArraySplit(
        split=split,
        images=np.ascontiguousarray(np.concatenate(images)),
        labels=np.concatenate(labels),
        source_path=files.where,
        attrs={"batches": ",".join(names)},
    )


def plan_cifar(opts: SourceOptions, name: str | None = None, *, source: str) -> DatasetPlan:
    """CIFAR-10 / CIFAR-100: 32 x 32 x 3, class index = the official label."""
    layout = LAYOUT[source]
    path = official_input(opts, source, give=f" (the {layout['folder']} folder, its parent, or the .tar.gz)",
                          absent=f"give the {layout['folder']} folder or the .tar.gz", folder_only=False)
    files = _Files(path, layout, source)
    raw, found = files.read(layout["meta"])
    meta, where = _unpickle(raw, found), _named(found)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(layout["names_key"], [])]
    if len(names) != layout["num_classes"]:
        raise TeslaError(f"{where}: expected {layout['num_classes']} names under '{layout['names_key']}', found {len(names)}")
    return official_plan(source, name, path, names, names, channels=3, resolution=32,
                         train=_read_batches(files, layout["train"], layout, "train"),
                         test=_read_batches(files, layout["test"], layout, "test"))


def _cifar(source: str, title: str) -> DataSource:
    layout = LAYOUT[source]
    return DataSource(
        source,
        f"{title} python pickle batches, read by a restricted unpickler (plain data and NumPy arrays only)",
        partial(plan_cifar, source=source),
        (INPUT, DOWNLOAD),
        {"input": f"{layout['archive']} or its extracted {layout['folder']} folder (or the folder holding either)", "resolution": "32"},
        num_classes=layout["num_classes"],
    )


SOURCES = (_cifar("cifar10", "CIFAR-10"), _cifar("cifar100", "CIFAR-100"))
