"""One distillation over several processes: torch.distributed, started by torchrun or srun.

A launcher starts G copies of ``tesla distill``; each is one *rank* r = 0..G-1. Every rank
holds the whole synthetic set, its labels, alpha and their optimiser state (replicated), draws
the same plan from the same generator, and computes the same updates. What is divided is the
work of each student step: its minibatch b_i (B rows) is cut into G contiguous shards, rank r
taking rows ``shard(B)``, and the quantities that are sums over the minibatch are summed over
the ranks (one all-reduce each)::

    l(theta; b_i) = (1/B) sum_{n in b_i} l_n = sum_r [ (1/B) sum_{n in shard r} l_n ]

so rank r differentiates its shard's sum divided by the FULL batch size (its shard's mean
times |shard| / B), and the all-reduced sum of the ranks' g_i, H_i w and dL/dalpha parts is
the one-process value up to the order of float additions. The image and label gradients are
row-wise: each rank fills its shards' rows, and one all-reduce of the rows any step touched
gives every rank the whole gradient.

Per-sample operations only: a batch-statistics layer (batch norm) would normalise each shard
by its own statistics and change the result, so a batch-norm network is refused; instance norm
(the distillation networks' default) normalises each image by itself.

Launchers: torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``)
or SLURM's srun (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``; the master is
``SLURM_LAUNCH_NODE_IPADDR`` or the first host of ``SLURM_JOB_NODELIST``). Without either (or
with one process) nothing here talks to the network: :data:`SINGLE` is the identity.

A rank that dies leaves the others waiting in a collective: every collective has a timeout
(``TESLA_DIST_TIMEOUT`` seconds, default 600) and a failed one ends the process with a
:class:`tesla.errors.TeslaError` that says so (torchrun and ``srun --kill-on-bad-exit`` also
stop the whole job when one process exits with an error).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from tesla.errors import TeslaError

#: seconds a collective may wait for the other ranks before the job fails
DEFAULT_TIMEOUT_S = 600.0
#: the port of the rendezvous when srun starts the ranks and MASTER_PORT is not set
#: (offset by the job id, so that two jobs sharing a node do not collide)
SLURM_PORT_BASE = 29500


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the job, as the launcher's environment says."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" or "srun"

    @property
    def init_method(self) -> str:
        """torchrun's workers join through its own store (``env://``); srun's tasks meet at the
        master's address."""
        return "env://" if self.launcher == "torchrun" else f"tcp://{self.master_addr}:{self.master_port}"


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``gpu[07-09,12],cpu3`` -> ``gpu07``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise TeslaError(f"SLURM_JOB_NODELIST {nodelist!r}: cannot read a host name from it; set MASTER_ADDR")
    prefix, ranges = match.group(1), match.group(2)
    return prefix if ranges is None else prefix + ranges.split(",")[0].split("-")[0]


def _integer(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise TeslaError(f"the launcher's {name}={env[name]!r} is not an integer") from None


def detect_launch(env: Mapping[str, str] = os.environ) -> Launch | None:
    """The launch this process belongs to, or None when it runs alone (no launcher, or one
    process). torchrun's variables win over SLURM's (torchrun inside a SLURM job)."""
    if "WORLD_SIZE" in env and "RANK" in env:
        world = _integer(env, "WORLD_SIZE")
        if world <= 1:
            return None
        return Launch(
            _integer(env, "RANK"), world, _integer(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500")), "torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:  # a task of an srun step
        world = _integer(env, "SLURM_STEP_NUM_TASKS")
        if world <= 1:
            return None
        addr = env.get("MASTER_ADDR") or env.get("SLURM_LAUNCH_NODE_IPADDR") or first_host(env.get("SLURM_JOB_NODELIST", ""))
        port = int(env.get("MASTER_PORT") or SLURM_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % 10000)
        return Launch(_integer(env, "SLURM_PROCID"), world, int(env.get("SLURM_LOCALID", "0")), addr, port, "srun")
    return None


def _timeout_s(env: Mapping[str, str] = os.environ) -> float:
    raw = env.get("TESLA_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise TeslaError(f"TESLA_DIST_TIMEOUT={raw!r}: give the collective timeout in seconds, a positive number")
    return value


@dataclass(frozen=True)
class Ranks:
    """The processes of one job and this one's place among them; ``Ranks()`` is one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"
    timeout_s: float = DEFAULT_TIMEOUT_S
    owns_group: bool = False  # this join created the process group (and :func:`leave` ends it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def writes(self) -> bool:
        """Whether this rank writes outputs, metrics, grids and checkpoints (rank 0)."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of n rows: sizes differ by at most one, the first
        n mod G ranks taking one more."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def _collective(self, what: str, call: Callable[[], Any]) -> Any:
        """Run a collective, turning a dead or silent peer into a TeslaError that says what to do."""
        try:
            return call()
        except (RuntimeError, OSError) as exc:  # DistBackendError and gloo/NCCL errors are RuntimeErrors
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise TeslaError(
                f"process {self.rank} of {self.world_size}: {what} failed ({first}): another process of the job "
                f"stopped or did not answer within {self.timeout_s:g} s (TESLA_DIST_TIMEOUT). The job stops; run "
                "it again to resume from its last checkpoint"
            ) from None

    def sum(self, tensor: torch.Tensor, what: str = "summing over the processes") -> torch.Tensor:
        """sum_r tensor_r, in place (every rank gets the same bits); the identity in one process."""
        if self.distributed:
            import torch.distributed as dist

            self._collective(what, lambda: dist.all_reduce(tensor))
        return tensor

    def assemble_rows(self, n: int, compute: Callable[[slice], torch.Tensor]) -> torch.Tensor:
        """An n-row result computed row-wise by ``compute(rows)``, each rank computing its
        shard's rows and one all-reduce assembling them (adding exact zeros elsewhere)."""
        if not self.distributed:
            return compute(slice(0, n))
        rows = self.shard(n)
        part = compute(rows)
        whole = torch.zeros((n, *part.shape[1:]), dtype=part.dtype, device=part.device)
        whole[rows] = part
        return self.sum(whole)

    def agree(self, ok: bool, what: str) -> bool:
        """Whether every rank is ok (one all-reduce of the failures); False on all ranks if any failed."""
        if not self.distributed:
            return ok
        flag = torch.tensor([0.0 if ok else 1.0], device=self.device_for_collectives())
        return float(self.sum(flag, what)) == 0.0

    def barrier(self) -> None:
        if self.distributed:
            self.agree(True, "waiting for the other processes")

    def device_for_collectives(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def describe(self) -> str:
        if not self.distributed:
            return "1 process"
        return f"{self.world_size} processes ({self.backend}, this is rank {self.rank})"


SINGLE = Ranks()


def join(device_name: str = "auto", env: Mapping[str, str] = os.environ) -> Ranks:
    """Join the job this process was launched in (torch.distributed ``init_process_group`` with
    a timeout: NCCL when the run is on CUDA, gloo on the CPU), or :data:`SINGLE` without a
    launcher. On CUDA, rank r uses the GPU of its ``LOCAL_RANK`` (``SLURM_LOCALID``)."""
    launch = detect_launch(env)
    if launch is None:
        return SINGLE
    import torch.distributed as dist

    on_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    backend = "nccl" if on_cuda else "gloo"
    timeout = _timeout_s(env)
    if on_cuda:
        torch.cuda.set_device(launch.local_rank % max(1, torch.cuda.device_count()))
    owns = not dist.is_initialized()  # else a caller joined already and leaves itself
    if owns:
        try:
            dist.init_process_group(
                backend, init_method=launch.init_method, rank=launch.rank,
                world_size=launch.world_size, timeout=datetime.timedelta(seconds=timeout),
            )
        except (RuntimeError, ValueError, OSError) as exc:
            raise TeslaError(
                f"process {launch.rank} of {launch.world_size} ({launch.launcher}): could not join the job at "
                f"{launch.master_addr}:{launch.master_port} ({str(exc).splitlines()[0][:300] if str(exc) else exc!r}); "
                "check that every process was started by the same launcher and that the port is free"
            ) from None
    return Ranks(launch.rank, launch.world_size, launch.local_rank, backend, timeout, owns)


def leave(ranks: Ranks) -> None:
    """Leave the job (destroy the process group) after the last collective, when this
    process's :func:`join` created it."""
    if ranks.distributed and ranks.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def local_device(device: torch.device, ranks: Ranks) -> torch.device:
    """The device of this rank: its own GPU (``cuda:LOCAL_RANK``, chosen by :func:`join`) when
    the run is on CUDA, else ``device``. A GPU named by index would be every rank's: refused."""
    if not ranks.distributed or device.type != "cuda":
        return device
    if device.index is not None:
        raise TeslaError(
            f"--device {device}: over {ranks.world_size} processes each takes the GPU of its local rank; give "
            "--device cuda (or auto), and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", torch.cuda.current_device())


@contextlib.contextmanager
def held_by_rank_zero(ranks: Ranks, hold: Callable[[], contextlib.AbstractContextManager]) -> Iterator[None]:
    """Rank 0 enters ``hold()`` (a lock) for the whole block; the other ranks wait for it. When
    rank 0 cannot (the lock is held by another run), every rank stops: rank 0 with its own
    error, the others with a TeslaError that points to it."""
    with contextlib.ExitStack() as stack:
        error: BaseException | None = None
        if ranks.writes:
            try:
                stack.enter_context(hold())
            except Exception as exc:  # reported by rank 0 itself, after the others know
                error = exc
        if not ranks.agree(error is None, "taking the output lock"):
            if error is not None:
                raise error
            raise TeslaError(f"process {ranks.rank} of {ranks.world_size}: process 0 could not start the run (see its message)")
        yield
