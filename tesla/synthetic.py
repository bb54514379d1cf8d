"""The synthetic set file (HDF5, ``tesla-synthetic`` version 2; version 1 is still read).

It carries everything evaluation needs to train on the set exactly as distillation
assumed: images in the network's input space, hard and (optionally) soft labels, the
learned learning rate alpha, the input space (the normalisation's name and constants, and
the ZCA artifact, embedded byte for byte, so the file is self-contained), the augmentation
strategy, the model it was distilled for, and the settings of the run. See docs/formats.md.

Version 2 adds learned labels (``tesla distill --soft-labels learned``): the label logits z
and the temperature T next to the probabilities y = softmax(z / T) that evaluation trains on;
``label_kind`` is then ``learned``. A version-1 file reads as before (no logits).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from tesla import __version__
from tesla.files import atomic_output
from tesla.hdf5 import open_checked
from tesla.input_space import space_of_record
from tesla.zca import ZCA

FORMAT_NAME = "tesla-synthetic"
FORMAT_VERSION = 2
#: versions :meth:`SyntheticSet.load` reads (the current one last)
READABLE_VERSIONS = (1, 2)


@dataclass
class SyntheticSet:
    """A distilled (or baseline) training set in network input space.

    ``images``: float32 N x C x H x W in the input space x = T((u/255 - mean)/std) of the
    experts (``tesla.input_space``: normalisation ``normalization`` with constants
    ``mean``/``std``, T the embedded ZCA or the identity);
    ``labels``: int64 (N,), the class each image stands for (argmax of the soft label when
    soft labels are used); ``soft_labels``: float32 N x K probabilities or None;
    ``lr``: the learned learning rate alpha (evaluation trains with it);
    ``label_logits``: float32 N x K learned label logits z with ``soft_labels`` = softmax(z / T),
    T = ``label_temperature`` (learned labels only, else None).
    """

    images: torch.Tensor
    labels: torch.Tensor
    lr: float
    dataset: str
    num_classes: int
    class_ids: list[str]
    class_names: list[str]
    mean: list[float]
    std: list[float]
    dsa_strategy: str
    model_spec: dict
    ipc: int
    engine: str
    soft_labels: torch.Tensor | None = None
    dataset_fingerprint: str = ""
    normalization: str = "split"
    zca_artifact: bytes | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    iteration: int = 0
    label_logits: torch.Tensor | None = None
    label_temperature: float | None = None

    # -- derived -------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def resolution(self) -> int:
        return int(self.images.shape[2])

    @property
    def label_kind(self) -> str:
        """``hard`` (class indices), ``soft`` (assigned probabilities) or ``learned`` (learned logits)."""
        if self.label_logits is not None:
            return "learned"
        return "soft" if self.soft_labels is not None else "hard"

    @property
    def uses_zca(self) -> bool:
        return self.zca_artifact is not None

    @property
    def targets(self) -> torch.Tensor:
        """What the student is trained against: soft labels if present, else hard labels."""
        return self.soft_labels if self.soft_labels is not None else self.labels

    def zca(self):
        """The embedded ZCA transform (``tesla.zca.ZCA``), or None."""
        if self.zca_artifact is None:
            return None
        return ZCA.load(io.BytesIO(self.zca_artifact))

    def input_space(self, where: str | os.PathLike = "synthetic set"):
        """The set's input space (``tesla.input_space.InputSpace``): normalisation and ZCA."""
        return space_of_record(self.normalization, self.mean, self.std, self.zca(), where)

    # -- I/O -----------------------------------------------------------------------
    def validate(self) -> None:
        n = self.num_images
        if self.images.ndim != 4:
            raise ValueError(f"images must be N x C x H x W, got {tuple(self.images.shape)}")
        if self.labels.shape != (n,):
            raise ValueError("labels must have one entry per image")
        if self.soft_labels is not None and tuple(self.soft_labels.shape) != (n, self.num_classes):
            raise ValueError("soft_labels must be N x num_classes")
        if self.label_logits is not None:
            if self.soft_labels is None or self.label_logits.shape != self.soft_labels.shape:
                raise ValueError("label_logits need soft_labels of the same N x num_classes shape")
            t = self.label_temperature
            if t is None or not (t > 0 and np.isfinite(t)):
                raise ValueError(f"learned labels need a positive finite label_temperature, got {t}")
        if len(self.class_ids) != self.num_classes or len(self.class_names) != self.num_classes:
            raise ValueError("class_ids/class_names must have num_classes entries")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ValueError(f"learning rate must be positive and finite, got {self.lr}")

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a temporary file beside ``path``, renamed when complete."""
        self.validate()
        path = Path(path)
        with atomic_output(path) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("images", data=self.images.detach().cpu().to(torch.float32).numpy())
                f.create_dataset("labels", data=self.labels.detach().cpu().to(torch.int64).numpy())
                if self.soft_labels is not None:
                    f.create_dataset("soft_labels", data=self.soft_labels.detach().cpu().to(torch.float32).numpy())
                if self.label_logits is not None:
                    f.create_dataset("label_logits", data=self.label_logits.detach().cpu().to(torch.float32).numpy())
                if self.zca_artifact is not None:
                    f.create_dataset("zca_artifact", data=np.frombuffer(self.zca_artifact, dtype=np.uint8))
                attrs = {
                    "format": FORMAT_NAME,
                    "format_version": FORMAT_VERSION,
                    "lr": float(self.lr),
                    "dataset": self.dataset,
                    "dataset_fingerprint": self.dataset_fingerprint,
                    "num_classes": int(self.num_classes),
                    "class_ids": json.dumps(list(self.class_ids)),
                    "class_names": json.dumps(list(self.class_names)),
                    "mean": np.asarray(self.mean, dtype=np.float64),
                    "std": np.asarray(self.std, dtype=np.float64),
                    "normalization": self.normalization,
                    "dsa_strategy": self.dsa_strategy,
                    "model_spec": json.dumps(self.model_spec, sort_keys=True),
                    "ipc": int(self.ipc),
                    "engine": self.engine,
                    "label_kind": self.label_kind,
                    "zca": bool(self.zca_artifact is not None),
                    "settings": json.dumps(self.settings, sort_keys=True, default=str),
                    "iteration": int(self.iteration),
                    "tesla_version": __version__,
                }
                if self.label_logits is not None:
                    attrs["label_temperature"] = float(self.label_temperature)
                for key, value in attrs.items():
                    f.attrs[key] = value
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "SyntheticSet":
        f, a, path = open_checked(
            path, format_name=FORMAT_NAME, format_version=READABLE_VERSIONS, kind="synthetic set file", producer="tesla distill"
        )
        with f:
            soft = torch.from_numpy(f["soft_labels"][()]).to(device) if "soft_labels" in f else None
            logits = torch.from_numpy(f["label_logits"][()]).to(device) if "label_logits" in f else None
            zca = f["zca_artifact"][()].tobytes() if "zca_artifact" in f else None
            return cls(
                images=torch.from_numpy(f["images"][()]).to(device),
                labels=torch.from_numpy(f["labels"][()]).to(device),
                soft_labels=soft,
                lr=float(a["lr"]),
                dataset=str(a["dataset"]),
                dataset_fingerprint=str(a.get("dataset_fingerprint", "")),
                num_classes=int(a["num_classes"]),
                class_ids=json.loads(a["class_ids"]),
                class_names=json.loads(a["class_names"]),
                mean=[float(v) for v in np.atleast_1d(a["mean"])],
                std=[float(v) for v in np.atleast_1d(a["std"])],
                normalization=str(a.get("normalization", "split")),  # not recorded before: the split's own
                dsa_strategy=str(a["dsa_strategy"]),
                model_spec=json.loads(a["model_spec"]),
                ipc=int(a["ipc"]),
                engine=str(a["engine"]),
                zca_artifact=zca,
                settings=json.loads(a.get("settings", "{}")),
                iteration=int(a.get("iteration", 0)),
                label_logits=logits,
                label_temperature=float(a["label_temperature"]) if "label_temperature" in a else None,
            )
