"""Expert trajectory files: the ``tesla-trajectory`` HDF5 format (version 2; version 1 is read).

An expert trajectory is the sequence theta*_0, theta*_1, ..., theta*_S-1 of the expert's
flat parameter vector (``tesla.parameters.flatten_params`` order): theta*_0 at
initialisation, theta*_e after training epoch e.  It is stored as ONE 2-D dataset

* ``snapshots``: S x P, chunked one row per chunk (so ``snapshot(i)`` reads exactly one
  row from disk), dtype float32, float16, or bfloat16 (stored as its uint16 bit pattern,
  since HDF5 has no bfloat16 type; ``storage_dtype`` says which);
* ``buffers``: S x B float32, the floating-point buffers (batch-norm running statistics,
  ``tesla.parameters.flatten_buffers`` order) at the same moments; only when B > 0;
* ``train_loss``, ``train_accuracy``, ``epoch_seconds``: float64 (E,), per trained epoch;

with the attributes listed in :data:`REQUIRED_ATTRS` (docs/formats.md). Version 2 adds
``epochs_requested`` (``--epochs``; ``epochs`` is the number trained, which is smaller when
training stopped after the last stored snapshot), ``test_accuracy_epoch`` (the epoch after
which ``final_test_accuracy`` was measured) and ``precision`` (``float32`` or ``bf16``); a
version-1 file reads as trained to ``epochs``, tested after it, in float32.
16-bit storage rounds theta (round to nearest even); its effect on the matching loss is
measured in docs/formats.md.  Files are written to a temporary name and
renamed when complete.
"""

from __future__ import annotations

import hashlib

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np
import torch

from tesla import __version__
from tesla.errors import TeslaError
from tesla.hdf5 import open_checked

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "STORAGE_DTYPES",
    "Trajectory",
    "TrajectoryMeta",
    "TrajectoryWriter",
    "round_to_storage",
    "same_model_spec",
]

FORMAT_NAME = "tesla-trajectory"
FORMAT_VERSION = 2
#: versions :meth:`Trajectory.open` reads (v1: no epochs_requested, test_accuracy_epoch, precision)
READABLE_VERSIONS = (1, FORMAT_VERSION)
#: storage dtype name -> (HDF5/numpy dtype of the stored values)
STORAGE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),  # bit pattern of torch.bfloat16
}
REQUIRED_ATTRS = (
    "format",
    "format_version",
    "tesla_version",
    "model_spec",
    "param_layout",
    "buffer_layout",
    "num_params",
    "dataset",
    "dataset_fingerprint",
    "test_dataset_fingerprint",
    "zca_fingerprint",
    "input_mean",
    "input_std",
    "seed",
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "dsa",
    "epochs",
    "num_snapshots",
    "storage_dtype",
    "final_test_accuracy",
)
#: attributes version 2 added, and what a version-1 file means by their absence
V2_ATTRS = ("epochs_requested", "test_accuracy_epoch", "precision")


@dataclass
class TrajectoryMeta:
    """Provenance of one expert: what was trained, on what, how, and how well."""

    model_spec: dict[str, Any]
    dataset: str
    dataset_fingerprint: str
    seed: int
    lr: float
    batch_size: int
    dsa: str
    epochs: int
    train_loss: Sequence[float]
    train_accuracy: Sequence[float]
    final_test_accuracy: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    test_dataset_fingerprint: str = ""
    zca_fingerprint: str = ""
    input_normalization: str = "split"  # tesla.input_space name of (input_mean, input_std)
    input_mean: Sequence[float] = ()
    input_std: Sequence[float] = ()
    epoch_seconds: Sequence[float] = ()
    epochs_requested: int | None = None  # --epochs; None: the same as epochs (trained to the end)
    test_accuracy_epoch: int | None = None  # the epoch final_test_accuracy was measured after; None: epochs
    precision: str = "float32"  # forward pass: float32 or bf16 (tesla.precision)
    extra: dict[str, Any] = field(default_factory=dict)


def _torch_storage_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _check_storage_dtype(name: str) -> str:
    if name not in STORAGE_DTYPES:
        raise TeslaError(f"trajectory storage dtype {name!r} is not one of {', '.join(STORAGE_DTYPES)}")
    return name


def round_to_storage(theta: torch.Tensor, dtype: str) -> torch.Tensor:
    """theta as it reads back after storage in ``dtype`` (float32 result, round to nearest even)."""
    return theta.detach().to(_torch_storage_dtype(_check_storage_dtype(dtype))).to(torch.float32)


def _encode(theta: torch.Tensor, dtype: str) -> np.ndarray:
    """float32 vector -> the stored representation."""
    t = theta.detach().to("cpu", torch.float32).reshape(-1)
    if dtype == "float32":
        return t.numpy()
    if dtype == "float16":
        return t.to(torch.float16).numpy()
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _decode(row: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored representation -> float32 tensor."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(row).view(np.int16)).view(torch.bfloat16).to(torch.float32)
    return torch.from_numpy(np.ascontiguousarray(row)).to(torch.float32)


def _canonical_spec(spec: Mapping[str, Any] | str) -> dict[str, Any]:
    if isinstance(spec, str):
        spec = json.loads(spec)
    return {k: spec.get(k) for k in ("name", "channels", "num_classes", "resolution", "options")}


def same_model_spec(a: Mapping[str, Any] | str, b: Mapping[str, Any] | str) -> bool:
    """Whether two model specs build the same architecture (name, shape and every option)."""
    return json.dumps(_canonical_spec(a), sort_keys=True) == json.dumps(_canonical_spec(b), sort_keys=True)


def _describe_spec(spec: Mapping[str, Any] | str) -> str:
    s = _canonical_spec(spec)
    opts = ", ".join(f"{k}={v}" for k, v in sorted((s.get("options") or {}).items()))
    return f"{s['name']}({s['channels']} ch, {s['num_classes']} classes, {s['resolution']} px{', ' + opts if opts else ''})"


class TrajectoryWriter:
    """Stream snapshots theta*_0, theta*_1, ... into a ``tesla-trajectory`` file.

    >>> with TrajectoryWriter(path, layout=param_layout(model), dtype="float32") as w:
    ...     w.append(flatten_params(model))            # theta*_0, then one per epoch
    ...     w.commit(meta)                              # attributes; renames into place

    The file appears at ``path`` only after :meth:`commit`; leaving the block without it
    (or with an exception) removes the temporary file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        layout: Any,
        buffer_layout: Any | None = None,
        dtype: str = "float32",
        expected_snapshots: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.dtype = _check_storage_dtype(dtype)
        self.layout = layout
        self.buffer_layout = buffer_layout
        self.num_params = int(layout.total)
        self.num_buffers = int(buffer_layout.total) if buffer_layout is not None else 0
        self.expected = expected_snapshots
        self.count = 0
        self._file: h5py.File | None = None
        self._committed = False

    def __enter__(self) -> "TrajectoryWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = h5py.File(self.tmp_path, "w")
        self._snapshots = self._file.create_dataset(
            "snapshots",
            shape=(0, self.num_params),
            maxshape=(None, self.num_params),
            dtype=STORAGE_DTYPES[self.dtype],
            chunks=(1, self.num_params),
        )
        self._buffers = None
        if self.num_buffers:
            self._buffers = self._file.create_dataset(
                "buffers",
                shape=(0, self.num_buffers),
                maxshape=(None, self.num_buffers),
                dtype=np.float32,
                chunks=(1, self.num_buffers),
            )
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()

    def append(self, theta: torch.Tensor, buffers: torch.Tensor | None = None) -> None:
        """Add the next snapshot (theta: 1-D of P values; buffers: 1-D of B values when B > 0)."""
        if self._file is None:
            raise RuntimeError("TrajectoryWriter.append outside its 'with' block")
        if theta.ndim != 1 or theta.numel() != self.num_params:
            raise ValueError(f"snapshot has shape {tuple(theta.shape)}, expected ({self.num_params},)")
        i = self.count
        self._snapshots.resize(i + 1, axis=0)
        self._snapshots[i] = _encode(theta, self.dtype)
        if self._buffers is not None:
            if buffers is None or buffers.numel() != self.num_buffers:
                raise ValueError(f"this model has {self.num_buffers} buffer values per snapshot; pass them")
            self._buffers.resize(i + 1, axis=0)
            self._buffers[i] = buffers.detach().to("cpu", torch.float32).reshape(-1).numpy()
        self.count += 1

    def commit(self, meta: TrajectoryMeta) -> Path:
        """Write the attributes and histories, close, and rename into place."""
        if self._file is None:
            raise RuntimeError("TrajectoryWriter.commit outside its 'with' block")
        if self.count == 0:
            raise ValueError("a trajectory needs at least one snapshot")
        if self.expected is not None and self.count != self.expected:
            raise ValueError(f"{self.count} snapshots appended, {self.expected} expected")
        f = self._file
        f.create_dataset("train_loss", data=np.asarray(meta.train_loss, dtype=np.float64))
        f.create_dataset("train_accuracy", data=np.asarray(meta.train_accuracy, dtype=np.float64))
        f.create_dataset("epoch_seconds", data=np.asarray(meta.epoch_seconds, dtype=np.float64))
        empty_layout = json.dumps({"names": [], "shapes": [], "numels": []})
        attrs = dict(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            tesla_version=__version__,
            model_spec=json.dumps(dict(meta.model_spec), sort_keys=True),
            param_layout=self.layout.to_json(),
            buffer_layout=self.buffer_layout.to_json() if self.buffer_layout is not None else empty_layout,
            num_params=self.num_params,
            dataset=str(meta.dataset),
            dataset_fingerprint=str(meta.dataset_fingerprint),
            test_dataset_fingerprint=str(meta.test_dataset_fingerprint),
            zca_fingerprint=str(meta.zca_fingerprint or ""),
            input_normalization=str(meta.input_normalization),
            input_mean=np.asarray(meta.input_mean, dtype=np.float64),
            input_std=np.asarray(meta.input_std, dtype=np.float64),
            seed=int(meta.seed),
            lr=float(meta.lr),
            momentum=float(meta.momentum),
            weight_decay=float(meta.weight_decay),
            batch_size=int(meta.batch_size),
            dsa=str(meta.dsa),
            epochs=int(meta.epochs),
            epochs_requested=int(meta.epochs if meta.epochs_requested is None else meta.epochs_requested),
            test_accuracy_epoch=int(meta.epochs if meta.test_accuracy_epoch is None else meta.test_accuracy_epoch),
            precision=str(meta.precision),
            num_snapshots=int(self.count),
            storage_dtype=self.dtype,
            final_test_accuracy=float(meta.final_test_accuracy),
        )
        for key, value in {**attrs, **{k: v for k, v in meta.extra.items() if k not in attrs}}.items():
            f.attrs[key] = value
        f.close()
        self._file = None
        os.replace(self.tmp_path, self.path)
        self._committed = True
        return self.path

    def abort(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:
                pass
            self._file = None
        self.tmp_path.unlink(missing_ok=True)


class Trajectory:
    """A ``tesla-trajectory`` file opened for reading; ``snapshot(i)`` reads one row only.

    Keeps one HDF5 handle open (closed by :meth:`close` or a ``with`` block; reopened on
    demand, also after pickling into a worker process).
    """

    def __init__(self, path: Path, attrs: dict[str, Any], train_loss: np.ndarray, train_accuracy: np.ndarray, epoch_seconds: np.ndarray) -> None:
        self.path = path
        self.attrs = attrs
        self.train_loss = train_loss
        self.train_accuracy = train_accuracy
        self.epoch_seconds = epoch_seconds
        self._file: h5py.File | None = None

    # -- opening -----------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "Trajectory":
        """Open and validate ``path``: our format and version, all attributes, consistent shapes."""
        f, attrs, path = open_checked(
            path, format_name=FORMAT_NAME, format_version=READABLE_VERSIONS, kind="expert trajectory file",
            producer="tesla experts",
        )
        with f:
            required = REQUIRED_ATTRS + (V2_ATTRS if int(attrs["format_version"]) >= 2 else ())
            missing = [k for k in required if k not in attrs]
            if missing or "snapshots" not in f:
                what = ", ".join(missing) if missing else "the 'snapshots' dataset"
                raise TeslaError(f"{path}: incomplete expert trajectory (missing {what}); re-run 'tesla experts'")
            dtype = str(attrs["storage_dtype"])
            if dtype not in STORAGE_DTYPES:
                raise TeslaError(f"{path}: unknown storage dtype {dtype!r}; re-run 'tesla experts'")
            shape = f["snapshots"].shape
            if shape != (int(attrs["num_snapshots"]), int(attrs["num_params"])):
                raise TeslaError(
                    f"{path}: snapshots have shape {shape}, the attributes say "
                    f"({attrs['num_snapshots']}, {attrs['num_params']}); the file is damaged, re-run 'tesla experts'"
                )
            loss = f["train_loss"][()] if "train_loss" in f else np.zeros(0)
            acc = f["train_accuracy"][()] if "train_accuracy" in f else np.zeros(0)
            secs = f["epoch_seconds"][()] if "epoch_seconds" in f else np.zeros(0)
        return cls(path, attrs, loss, acc, secs)

    def _h5(self) -> h5py.File:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "Trajectory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None
        return state

    def __repr__(self) -> str:
        return f"Trajectory({str(self.path)!r}, {self.num_snapshots} snapshots x {self.num_params} params, {self.storage_dtype})"

    # -- snapshots -------------------------------------------------------------------
    def _row(self, name: str, i: int) -> np.ndarray:
        n = self.num_snapshots
        if not isinstance(i, (int, np.integer)) or not (-n <= i < n):
            raise TeslaError(
                f"{self.path}: snapshot {i} asked for, the file keeps snapshots 0..{n - 1}; re-run 'tesla experts' "
                f"with a larger --keep-snapshots/--epochs, or lower --max-start-epoch (or --max-start-epoch-final) + "
                f"--expert-epochs, and --init-epoch, to at most {n - 1}"
            )
        return self._h5()[name][int(i) % n]

    def snapshot(self, i: int, device: torch.device | str | None = None) -> torch.Tensor:
        """theta*_i as a float32 1-D tensor (i = 0: initialisation, i = e: after epoch e)."""
        theta = _decode(self._row("snapshots", i), self.storage_dtype)
        return theta if device is None else theta.to(device)

    def content_fingerprint(self) -> str:
        """SHA-256 of what this trajectory is: its attributes and recorded curves, and the
        bytes of its first and last snapshots (two rows read, whatever the file's size). Two
        files of the same training (same settings and data, same device) agree; a retrained
        expert with anything changed does not. Keys the checkpoint of a distillation."""
        h = hashlib.sha256()
        for key in sorted(self.attrs):
            h.update(f"{key}={self.attrs[key]!r};".encode())
        for curve in (self.train_loss, self.train_accuracy):
            h.update(np.ascontiguousarray(curve).tobytes())
        for i in (0, self.num_snapshots - 1):
            h.update(np.ascontiguousarray(self._row("snapshots", i)).tobytes())
        return h.hexdigest()

    def buffers(self, i: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The floating-point buffers at snapshot i (empty tensor for buffer-free models)."""
        if self.num_buffers == 0:
            return torch.zeros(0, dtype=torch.float32, device=device)
        row = torch.from_numpy(np.ascontiguousarray(self._row("buffers", i))).to(torch.float32)
        return row if device is None else row.to(device)

    # -- metadata --------------------------------------------------------------------
    @property
    def num_snapshots(self) -> int:
        return int(self.attrs["num_snapshots"])

    @property
    def num_params(self) -> int:
        return int(self.attrs["num_params"])

    @property
    def num_buffers(self) -> int:
        return sum(int(n) for n in json.loads(self.attrs["buffer_layout"]).get("numels", []))

    @property
    def model_spec(self) -> dict[str, Any]:
        return json.loads(self.attrs["model_spec"])

    @property
    def param_layout(self):
        from tesla.parameters import ParamLayout

        return ParamLayout.from_json(self.attrs["param_layout"])

    @property
    def dataset(self) -> str:
        return str(self.attrs["dataset"])

    @property
    def dataset_fingerprint(self) -> str:
        return str(self.attrs["dataset_fingerprint"])

    @property
    def zca_fingerprint(self) -> str:
        return str(self.attrs["zca_fingerprint"])

    @property
    def seed(self) -> int:
        return int(self.attrs["seed"])

    @property
    def lr(self) -> float:
        return float(self.attrs["lr"])

    @property
    def momentum(self) -> float:
        return float(self.attrs["momentum"])

    @property
    def batch_size(self) -> int:
        return int(self.attrs["batch_size"])

    @property
    def dsa(self) -> str:
        return str(self.attrs["dsa"])

    @property
    def format_version(self) -> int:
        return int(self.attrs["format_version"])

    @property
    def epochs(self) -> int:
        """Epochs trained (the length of ``train_loss``)."""
        return int(self.attrs["epochs"])

    @property
    def epochs_requested(self) -> int:
        """``--epochs`` of the run; more than :attr:`epochs` when training stopped after the
        last stored snapshot (version-1 files: :attr:`epochs`)."""
        return int(self.attrs.get("epochs_requested", self.epochs))

    @property
    def test_accuracy_epoch(self) -> int:
        """The epoch after which :attr:`final_test_accuracy` was measured (version 1: :attr:`epochs`)."""
        return int(self.attrs.get("test_accuracy_epoch", self.epochs))

    @property
    def precision(self) -> str:
        """The forward pass's arithmetic, ``float32`` or ``bf16`` (version 1: ``float32``)."""
        return str(self.attrs.get("precision", "float32"))

    @property
    def storage_dtype(self) -> str:
        return str(self.attrs["storage_dtype"])

    @property
    def final_test_accuracy(self) -> float:
        return float(self.attrs["final_test_accuracy"])

    @property
    def input_mean(self) -> list[float]:
        return [float(v) for v in np.atleast_1d(self.attrs["input_mean"])]

    @property
    def input_std(self) -> list[float]:
        return [float(v) for v in np.atleast_1d(self.attrs["input_std"])]

    @property
    def input_normalization(self) -> str:
        """The name of the normalisation (``tesla.input_space``) that ``input_mean``/``input_std``
        come from; files written before it was recorded used the split's own: ``split``."""
        return str(self.attrs.get("input_normalization", "split"))

    def build_model(self):
        """A fresh network of this trajectory's architecture (parameters: its own init)."""
        from tesla.models import build_from_spec

        return build_from_spec(self.model_spec)

    # -- compatibility -----------------------------------------------------------------
    def check_compatible(
        self,
        *,
        model_spec: Mapping[str, Any] | str | None = None,
        dataset_fingerprint: str | None = None,
        zca_fingerprint: str | None = None,
        needed_snapshots: int | None = None,
    ) -> None:
        """Raise TeslaError (naming this file and the mismatch) unless the trajectory fits.

        ``needed_snapshots``: how many snapshots the consumer reads (0 .. needed - 1),
        e.g. max_start_epoch + expert_epochs + 1 for distillation.
        """
        if model_spec is not None and not same_model_spec(model_spec, self.model_spec):
            raise TeslaError(
                f"{self.path}: expert trained for {_describe_spec(self.model_spec)}, but {_describe_spec(model_spec)} "
                f"is needed; use experts trained with the same --model on the same dataset"
            )
        if dataset_fingerprint is not None and dataset_fingerprint != self.dataset_fingerprint:
            raise TeslaError(
                f"{self.path}: expert trained on another training split (dataset {self.dataset!r}, fingerprint "
                f"{self.dataset_fingerprint[:12]}..., expected {dataset_fingerprint[:12]}...); use experts trained on "
                f"this train.h5"
            )
        if zca_fingerprint is not None and (zca_fingerprint or "") != self.zca_fingerprint:
            have = self.zca_fingerprint[:12] + "..." if self.zca_fingerprint else "no ZCA"
            want = zca_fingerprint[:12] + "..." if zca_fingerprint else "no ZCA"
            raise TeslaError(
                f"{self.path}: expert trained with {have} whitening, but {want} is used here; give the same --zca "
                f"(or none) as for 'tesla experts'"
            )
        if needed_snapshots is not None and needed_snapshots > self.num_snapshots:
            raise TeslaError(
                f"{self.path}: {needed_snapshots} snapshots (0..{needed_snapshots - 1}) are needed but the file keeps "
                f"{self.num_snapshots} (0..{self.num_snapshots - 1}); lower --max-start-epoch (or "
                f"--max-start-epoch-final) + --expert-epochs, and --init-epoch, to at most {self.num_snapshots - 1}, "
                f"or re-run 'tesla experts' with more --epochs/--keep-snapshots"
            )
