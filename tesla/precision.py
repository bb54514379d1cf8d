"""How the training step is computed: TF32, a bf16 autocast, and the memory layout.

None of these changes *what* a step computes,

    theta <- theta - lr_e * (grad_theta l(f_theta(A(x_b)), y_b) + wd * theta)   (+ momentum),

only the arithmetic and the layout it is computed with:

* **TF32** (CUDA GPUs of compute capability 8.0 or more): float32 convolutions and matrix
  products read their inputs with a 10-bit mantissa on the tensor cores and accumulate in
  float32. On by default where the GPU has it; ``--no-tf32`` turns it off. A process-wide
  switch (``torch.backends``), so every network of a process shares it.
* **bf16 autocast** (``--precision bf16``): the forward pass runs under ``torch.autocast``
  with bfloat16, which computes convolutions and linear layers in bfloat16 (8-bit mantissa)
  and keeps reductions such as the losses in float32; parameters, gradients and the SGD
  update stay float32. Off by default (``float32``) until its effect on accuracy is measured.
* **channels-last** (``--channels-last``): 4-D inputs and weights stored N x H x W x C
  (``torch.channels_last``) instead of N x C x H x W; the values are the same, the kernels
  differ. Default per device type (:data:`CHANNELS_LAST_DEFAULT`): off on the CPU, and off on
  CUDA until a measurement shows it faster there.

With the defaults on the CPU (float32, no TF32, contiguous) a step is exactly what it was
before these options existed. Every file that training writes records the three settings
(:meth:`Numerics.record`). The final test accuracy is always measured in float32.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator

import torch
import torch.nn as nn

from tesla.errors import TeslaError
from tesla.numerics_options import CHANNELS_LAST_DEFAULT, PRECISIONS

__all__ = [
    "Numerics",
    "has_tf32",
    "ieee_float32",
]

def has_tf32(device: torch.device | str) -> bool:
    """Whether ``device`` is a CUDA GPU with TF32 tensor cores (compute capability >= 8.0)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _set_tf32(enabled: bool) -> None:
    """TF32 for float32 convolutions (cuDNN) and matrix products (cuBLAS), process-wide.

    torch >= 2.9 has ``fp32_precision`` ('tf32' or 'ieee') per backend and deprecates the
    ``allow_tf32`` flags; older versions have only the flags.
    """
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision") and hasattr(getattr(conv, "conv", None), "fp32_precision"):
        value = "tf32" if enabled else "ieee"
        matmul.fp32_precision = value
        conv.conv.fp32_precision = value
    else:  # pragma: no cover - torch < 2.9
        matmul.allow_tf32 = enabled
        conv.allow_tf32 = enabled


@dataclass(frozen=True)
class Numerics:
    """The arithmetic and layout of training steps: ``precision`` (``float32`` | ``bf16``),
    ``tf32`` (effective: True only on a GPU that has it) and ``channels_last``."""

    precision: str = "float32"
    tf32: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise TeslaError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")

    @classmethod
    def resolve(
        cls,
        device: torch.device | str,
        precision: str = "float32",
        tf32: bool | None = None,
        channels_last: bool | None = None,
    ) -> "Numerics":
        """The settings a run on ``device`` uses: ``tf32`` None means on where the device has
        it (asking for TF32 elsewhere is not an error: there is nothing to turn on, and the
        files record False); ``channels_last`` None means :data:`CHANNELS_LAST_DEFAULT`."""
        device = torch.device(device)
        if precision not in PRECISIONS:
            raise TeslaError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        use_tf32 = has_tf32(device) and (tf32 is None or bool(tf32))
        layout = CHANNELS_LAST_DEFAULT.get(device.type, False) if channels_last is None else bool(channels_last)
        return cls(precision=precision, tf32=use_tf32, channels_last=layout)

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, device: torch.device | str) -> "Numerics":
        """The settings of the options ``--precision``, ``--tf32``, ``--channels-last``
        (:mod:`tesla.training_settings`), resolved for ``device``."""
        return cls.resolve(device, args.precision, args.tf32, args.channels_last)

    # -- applying ------------------------------------------------------------------------
    def apply(self, device: torch.device | str) -> None:
        """Set the process-wide TF32 switch for a CUDA ``device`` (nothing to do elsewhere)."""
        if torch.device(device).type == "cuda":
            _set_tf32(self.tf32)

    def autocast(self, device: torch.device | str) -> ContextManager:
        """The context of a forward pass: a bfloat16 autocast for ``bf16``, else nothing."""
        if self.precision == "bf16":
            return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def memory_format(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    def model(self, model: nn.Module) -> nn.Module:
        """The model with its 4-D weights in this memory format (in place; a no-op when contiguous)."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """A 4-D batch in this memory format (``x`` itself when contiguous)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    # -- recording -----------------------------------------------------------------------
    def record(self) -> dict[str, object]:
        """What the output files record: precision, tf32, memory_format."""
        return {"precision": self.precision, "tf32": bool(self.tf32), "memory_format": self.memory_format}

    def describe(self) -> str:
        return f"{self.precision}{', TF32' if self.tf32 else ''}, {self.memory_format.replace('_', '-')}"


# -- float32 exactly, immune to a global TF32 setting (the matching engines) -------------------
def _precision_switches() -> list[Any]:
    """The backends whose ``fp32_precision`` (torch >= 2.9) lets float32 products use TF32 or
    bf16: cuBLAS, cuDNN convolutions and oneDNN (CPU) products and convolutions."""
    b = torch.backends
    objects = [b.cuda.matmul, getattr(b.cudnn, "conv", None), getattr(b.mkldnn, "matmul", None), getattr(b.mkldnn, "conv", None)]
    return [o for o in objects if o is not None and hasattr(o, "fp32_precision")]


def _legacy_precision() -> tuple[str, bool] | None:
    """(float32 matmul precision, cudnn.allow_tf32) through the legacy API, or None when torch
    refuses to read it (the caller set precisions through the new per-backend API only)."""
    try:
        return torch.get_float32_matmul_precision(), bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        return None


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """Run float32 matrix products and convolutions in IEEE float32 (no TF32, no bf16),
    restoring the caller's settings afterwards.

    PyTorch's own default lets cuDNN convolutions use TF32 (``cudnn.allow_tf32 = True``), and a
    workflow may enable TF32 for experts and evaluation; the matching engines inherit neither
    (docs/benchmarks.md: the gradient's error in lower precisions). Both APIs are set, legacy
    first (it updates the new one too), so that code reading either inside (TorchInductor reads
    the legacy flags when it compiles) sees IEEE float32 and no mix of the two."""
    switches = _precision_switches()
    saved = [o.fp32_precision for o in switches]
    legacy = _legacy_precision()
    try:
        if legacy is not None:
            torch.set_float32_matmul_precision("highest")
            torch.backends.cudnn.allow_tf32 = False
        for o in switches:
            o.fp32_precision = "ieee"
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy[0])
            torch.backends.cudnn.allow_tf32 = legacy[1]
        for o, value in zip(switches, saved):
            o.fp32_precision = value
