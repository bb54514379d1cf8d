"""Devices: what the machine offers, found without importing torch (the workflow asks while it
builds the job graph, before any job starts), and the device a stage's ``--device`` names.

Importing this module does not import torch: :func:`pick_device` imports it when called
(the workflow imports this module at parse time, where torch would cost about a second).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from tesla.errors import TeslaError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["DEVICE_NAMES", "DEVICE_PATTERN", "nvidia_gpu_visible", "pick_device"]

#: the device names every stage's ``--device`` (and the config's ``device``) takes; not MPS,
#: which has no float64 (every stage keeps some on its device: the epoch tallies of the
#: training loop, the matching's one transfer, the ZCA covariance)
DEVICE_NAMES = "auto (CUDA when present, else the CPU), cpu, cuda or cuda:N"
#: the same names as a regular expression (the config schema's)
DEVICE_PATTERN = "^(auto|cpu|cuda(:[0-9]+)?)$"

#: where the NVIDIA driver puts its device nodes
_DEVICE_NODES = Path(os.sep) / "dev"


def nvidia_gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU to its processes: a device node
    /dev/nvidia<N> exists and CUDA_VISIBLE_DEVICES does not hide every device."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(_DEVICE_NODES.glob("nvidia[0-9]*"))


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when present, else the CPU; otherwise the named device.

    Raises TeslaError for a device this machine does not have.
    """
    import torch  # here, not at the top: the workflow imports this module without torch

    name = (name or "auto").strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise TeslaError(f"--device {name!r} is not a device name; use {DEVICE_NAMES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TeslaError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TeslaError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); use cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type == "mps":
        raise TeslaError(f"--device {name}: MPS has no float64, which every stage keeps on its device (the training "
                         "loop's epoch tallies, the matching's one transfer, the ZCA covariance); use --device cpu")
    elif device.type != "cpu":
        raise TeslaError(f"--device {name}: unsupported device type {device.type!r}; use {DEVICE_NAMES}")
    return device
