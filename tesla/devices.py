"""What the machine offers, found without importing torch (the workflow asks while it builds
the job graph, before any job starts)."""

from __future__ import annotations

import os
from pathlib import Path

#: where the NVIDIA driver puts its device nodes
_DEVICE_NODES = Path(os.sep) / "dev"


def nvidia_gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU to its processes: a device node
    /dev/nvidia<N> exists and CUDA_VISIBLE_DEVICES does not hide every device."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(_DEVICE_NODES.glob("nvidia[0-9]*"))
