"""Shared test fixtures.

Real datasets are found through ONE setting: the environment variable ``TESLA_DATASETS``
(CI sets it to ``../shared/datasets``). Tests that need them skip with a reason when it is
unset or the folder lacks the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytest
import torch

DATASETS_ENV = "TESLA_DATASETS"


def shared_datasets() -> Path | None:
    value = os.environ.get(DATASETS_ENV)
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    """The shared real-dataset folder, or skip."""
    path = shared_datasets()
    if path is None:
        pytest.skip(f"real datasets not available: set {DATASETS_ENV} to the folder holding them (CI: ../shared/datasets)")
    return path


def require_dataset(datasets_dir: Path, relative: str) -> Path:
    path = datasets_dir / relative
    if not path.exists():
        pytest.skip(f"{path} not found in {DATASETS_ENV}={datasets_dir}")
    return path


def write_prepared_split(path: Path, classes: Sequence[np.ndarray], *, split: str = "train", dataset: str = "toy",
                         class_ids: Sequence[str] | None = None, source: str = "test", source_path: str = "") -> Path:
    """A prepared split (a ``tesla-images`` HDF5 file, written by ``SplitWriter`` as
    ``tesla prepare`` writes one): ``classes[c]`` are the uint8 N_c x H x W x C images of class c;
    the class ids are c0, c1, ... unless given."""
    from tesla.data import SplitWriter

    height, width, channels = np.asarray(classes[0]).shape[1:]
    ids = list(class_ids) if class_ids is not None else [f"c{i}" for i in range(len(classes))]
    with SplitWriter(path, dataset=dataset, split=split, class_ids=ids, height=height, width=width, channels=channels,
                     source=source, source_path=source_path) as writer:
        for c, images in enumerate(classes):
            writer.append(np.asarray(images), np.full(len(images), c, dtype=np.int64))
    return Path(path)


def assert_refuses_files_of_others(load: Callable[[Path], object], folder: Path, kind: str, *,
                                   other_format: str = "tesla-images") -> None:
    """``load`` (the reader of one of tesla's HDF5 formats, through tesla.hdf5.open_checked)
    refuses a missing file, a file that is not HDF5 and an HDF5 file of ``other_format``, each
    with a TeslaError that names the file; the missing and the foreign one also name the
    ``kind`` of file expected."""
    import h5py

    from tesla.errors import TeslaError

    with pytest.raises(TeslaError, match=rf"missing\.h5: no such {re.escape(kind)}"):
        load(folder / "missing.h5")
    text = folder / "text.h5"
    text.write_text("hello")
    with pytest.raises(TeslaError, match=r"text\.h5: not an HDF5 file"):
        load(text)
    other = folder / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["format"] = other_format
    with pytest.raises(TeslaError, match=rf"other\.h5: not an? {re.escape(kind)} \(format attribute '{other_format}'"):
        load(other)


def process_running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not ended: a zombie (ended, not yet reaped by its
    parent) has (Linux's /proc)."""
    from tesla.data.pool import process_exists

    stat = Path(f"/proc/{pid}/stat")
    try:
        zombie = stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        zombie = False
    return process_exists(pid) and not zombie


def patch_training(monkeypatch, stage, name: str, replacement) -> None:
    """Replace a function of tesla.training where a stage finds it: in the stage's module
    ``stage`` (which imports it by name) and in tesla.training (through which the group
    loops call it)."""
    import tesla.training

    for module in (tesla.training, stage):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, replacement)


def blob_classes(rng: np.random.Generator, classes: int, per_class: int, size: int, channels: int,
                 noise: tuple[int, int] = (-40, 40)) -> list[np.ndarray]:
    """Per class, one random picture plus integer noise drawn from [noise[0], noise[1]) for each
    of its images, clipped to uint8 (the picture, then the noise, drawn class by class)."""
    return [np.clip(rng.integers(0, 256, size=(1, size, size, channels))
                    + rng.integers(noise[0], noise[1], size=(per_class, size, size, channels)), 0, 255).astype(np.uint8)
            for _ in range(classes)]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest and immune to a loaded machine
    (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sample(tmp_path_factory, datasets_dir):
    """Ten classes of the shared ImageNet sample as a class-folder tree, the same images as
    Downsampled-ImageNet batches (16 px, devkit id order), map_clsloc.txt and meta.mat
    (prepare_support.build_imagenet_sample); used by the downsampled and parquet tests."""
    from prepare_support import build_imagenet_sample

    src = require_dataset(datasets_dir, "imagenet-sample/train")
    return build_imagenet_sample(src, tmp_path_factory.mktemp("downsampled"))


#: the modules that take minutes (the local SLURM cluster, the demo end to end, kills and
#: reruns, real data): collected first, so that with `-n 2` (pyproject's addopts) one worker
#: starts on them while the other works through the many short modules
LONG_MODULES = ("test_slurm.py", "test_workflow_demo.py", "test_rerun_after_kill.py", "test_workflow_report.py",
                "test_workflow_tiny_imagenet.py", "test_distributed.py", "test_workflow_distributed.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = Path(str(item.fspath)).name
        return LONG_MODULES.index(name) if name in LONG_MODULES else len(LONG_MODULES)

    items.sort(key=rank)  # stable: the order within a module is kept
