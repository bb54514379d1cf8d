"""What a distillation over G processes cannot do, as plain arithmetic (no torch at import).

A run over G processes (:mod:`tesla.distributed`) cuts the minibatch of every student step into
G contiguous shards, one per process, and sums what the processes compute. So

* the engine must compute a student step by its parts: ``unroll`` builds one autograd graph of
  all steps and runs in one process only;
* every minibatch needs at least G images, or a process gets an empty shard: ``batch_syn``
  images, and the last minibatch of a pass over the n synthetic images, n mod ``batch_syn``
  when that is not 0;
* the network must treat each image by itself: batch norm normalises by the statistics of
  the minibatch, and each process would normalise its own share.

``tesla distill`` applies these rules when a run starts (:func:`tesla.matching.check_shardable`,
``tesla.distill_setup``), and the workflow to a config row with ``gpus: G`` while it builds
the job graph (:func:`row_problems`), so that such a row fails before any job, naming its keys.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from tesla.models import uses_batch_norm

__all__ = [
    "ONE_PROCESS_ENGINES",
    "batch_norm_problem",
    "engine_problem",
    "minibatch_problem",
    "row_problems",
    "shard_problems",
    "smallest_minibatch",
]

#: the gradient engines that cannot split a student step over processes
ONE_PROCESS_ENGINES: tuple[str, ...] = ("unroll",)


def smallest_minibatch(batch_syn: int, num_images: int) -> int:
    """The smallest minibatch of a pass over ``num_images`` synthetic images in minibatches of
    ``batch_syn``: ``batch_syn``, or the last, partial one when smaller."""
    return min(batch_syn, num_images % batch_syn or batch_syn)


def engine_problem(engine: str, processes: int, name: Callable[[str], str]) -> str | None:
    """Why ``engine`` cannot run over ``processes`` processes, or None; ``name`` names a setting in
    the message: its flag, or its config key."""
    if processes > 1 and engine in ONE_PROCESS_ENGINES:
        return f"engine {engine} runs in one process; use {name('engine')} exact or tesla"
    return None


def minibatch_problem(batch_syn: int, num_images: int, processes: int, name: Callable[[str], str]) -> str | None:
    """Why minibatches of ``batch_syn`` of ``num_images`` images cannot be cut into ``processes``
    shards (one of them would be empty), or None."""
    smallest = smallest_minibatch(batch_syn, num_images)
    if processes > 1 and smallest < processes:
        return (
            f"every minibatch is split over the processes, but minibatches of {smallest} images ({name('batch_syn')} "
            f"{batch_syn}, {num_images} images) are fewer than the processes; raise {name('batch_syn')} or use "
            "fewer processes"
        )
    return None


def shard_problems(engine: str, batch_syn: int, num_images: int, processes: int,
                   name: Callable[[str], str]) -> list[str]:
    """What a run over ``processes`` processes cannot do with this engine and minibatch (none in
    one process)."""
    found = (engine_problem(engine, processes, name), minibatch_problem(batch_syn, num_images, processes, name))
    return [p for p in found if p]


def batch_norm_problem(network: str) -> str:
    """Why a network with batch norm runs in one process (``network``: how the message names it)."""
    return (
        f"the experts' network {network} uses batch norm, whose statistics span the minibatch: each process would "
        "normalise its own share; run it in one process, or use experts with instance norm (the default)"
    )


def row_problems(row: Mapping[str, Any], key: str, num_images: int | None, network: str, network_key: str) -> list[str]:
    """The workflow's check of a distill row (schema-filled; ``key``: its config key) with
    ``gpus`` > 1: every engine of the row, its minibatches over ``num_images`` synthetic images
    (IPC x classes; None: not known before the data is prepared) and the dataset's network
    (``network_key``: the key that names it), as 'config key <key>.gpus: ...' lines."""
    processes = int(row.get("gpus", 1))
    if processes <= 1:
        return []

    def name(setting: str) -> str:
        return f"{key}.{setting}"

    found = [engine_problem(engine, processes, name) for engine in row["engine"]]
    if num_images:
        found.append(minibatch_problem(row.get("batch_syn") or num_images, num_images, processes, name))
    if uses_batch_norm(network):
        found.append(batch_norm_problem(f"{network} ({network_key})"))
    return [f"config key {key}.gpus: a run over {processes} processes: {p}" for p in found if p]
