"""The options of how a training step is computed (:class:`tesla.precision.Numerics`): their
names and defaults (the options ``--precision``, ``--tf32``, ``--channels-last`` themselves are
declared in :mod:`tesla.training_settings`).
No torch at import: the workflow checks a config's precisions while it builds the job graph.
"""

from __future__ import annotations


__all__ = ["CHANNELS_LAST_DEFAULT", "MEMORY_FORMATS", "PRECISIONS"]

#: ``--precision``: the forward pass in float32, or under a bfloat16 autocast
PRECISIONS: tuple[str, ...] = ("float32", "bf16")
#: recorded memory formats of 4-D inputs and weights
MEMORY_FORMATS: tuple[str, ...] = ("contiguous", "channels_last")
#: channels-last when not asked either way, per device type. CPU: off (PyTorch's default layout;
#: no measurement shows channels-last faster on a CPU); CUDA: off until bench/gpu_training.sh
#: has measured it.
CHANNELS_LAST_DEFAULT: dict[str, bool] = {"cpu": False, "cuda": False}
