"""The options of how a training step is computed (:class:`tesla.precision.Numerics`): their
names, defaults and command-line arguments (``--precision``, ``--tf32``, ``--channels-last``).
No torch at import: the workflow checks a config's precisions while it builds the job graph.
"""

from __future__ import annotations

import argparse

__all__ = ["CHANNELS_LAST_DEFAULT", "MEMORY_FORMATS", "PRECISIONS", "add_numerics_arguments"]

#: ``--precision``: the forward pass in float32, or under a bfloat16 autocast
PRECISIONS: tuple[str, ...] = ("float32", "bf16")
#: recorded memory formats of 4-D inputs and weights
MEMORY_FORMATS: tuple[str, ...] = ("contiguous", "channels_last")
#: channels-last when not asked either way, per device type. CPU: off (PyTorch's default layout;
#: no measurement shows channels-last faster on a CPU); CUDA: off until bench/gpu_training.sh
#: has measured it.
CHANNELS_LAST_DEFAULT: dict[str, bool] = {"cpu": False, "cuda": False}


def add_numerics_arguments(parser: argparse.ArgumentParser) -> None:
    """``--precision``, ``--tf32/--no-tf32``, ``--channels-last/--no-channels-last`` (read back
    with :meth:`tesla.precision.Numerics.from_arguments`)."""
    parser.add_argument("--precision", default="float32", choices=list(PRECISIONS),
                        help="forward pass in float32, or under a bfloat16 autocast (bf16); recorded in the output")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                        help="TF32 tensor cores for float32 convolutions and matrix products (default: on where the GPU "
                             "has them; --no-tf32 turns them off); recorded in the output")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels-last memory format (default per device, from measurement: docs/benchmarks.md); "
                             "recorded in the output")
