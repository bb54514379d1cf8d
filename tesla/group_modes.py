"""How a group of networks with the same settings trains in one process: the names of the
group modes, what ``auto`` means per device, and the resolution of a ``--group-mode`` value
(the option of ``tesla experts`` and ``tesla evaluate`` is declared in
:mod:`tesla.training_settings`). No torch at import: the
workflow checks a config's group modes while it builds the job graph. The loops themselves are
in :mod:`tesla.training` (one network, and networks interleaved on CUDA streams) and
:mod:`tesla.group_training` (the group, and the stacked vmap loop).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tesla.errors import TeslaError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from tesla.precision import Numerics

__all__ = ["AUTO_GROUP_MODE", "GROUP_MODES", "resolve_group_mode"]

#: how a group of networks with the same settings trains in one process (:func:`tesla.group_training.train_group`)
GROUP_MODES: tuple[str, ...] = ("sequential", "streams", "vmap")
#: what ``--group-mode auto`` means per device type. CPU: measured (docs/benchmarks.md,
#: "Running several runs together (torch.func.vmap)?": vmap is 2.6x slower at IPC 10 there). CUDA: chosen by argument before any
#: GPU measurement, to be confirmed by bench/gpu_training.sh: streams run the same kernels as
#: alone, so they cannot lose much, and they let the GPU work on other networks while one
#: network's step waits for the host (each DSA call copies its parameters from pageable host
#: memory, which synchronises that network's stream)
AUTO_GROUP_MODE: dict[str, str] = {"cpu": "sequential", "cuda": "streams"}


def _device_type(device: "torch.device | str") -> str:
    """``cuda`` for ``torch.device('cuda', 1)`` or ``'cuda:1'``: the type of a device or a device name."""
    return device.type if hasattr(device, "type") else str(device).split(":")[0]


def resolve_group_mode(mode: str, device: "torch.device | str", networks: int, numerics: "Numerics | None" = None) -> str:
    """``auto`` -> the mode chosen for ``device`` (:data:`AUTO_GROUP_MODE`: measured on the CPU, argued for
    CUDA until measured there); one
    network, or a channels-last layout (which vmap cannot keep), -> ``sequential``.
    Other names are checked and returned."""
    if mode != "auto" and mode not in GROUP_MODES:
        raise TeslaError(f"--group-mode {mode!r}: choose one of auto, {', '.join(GROUP_MODES)}")
    channels_last = numerics is not None and numerics.channels_last
    if mode == "vmap" and channels_last:
        raise TeslaError(
            "--group-mode vmap stacks the networks into grouped convolutions, which have no channels-last layout; "
            "drop --channels-last (or give --no-channels-last), or use --group-mode sequential or streams"
        )
    if mode != "auto":
        return mode
    if networks <= 1 or channels_last:
        return "sequential"
    return AUTO_GROUP_MODE.get(_device_type(device), "sequential")
