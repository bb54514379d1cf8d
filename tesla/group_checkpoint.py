"""The resumable state of a group of networks in training (the runs of one ``tesla evaluate``).

A checkpoint (``tesla-group-checkpoint`` version 1, docs/formats.md) holds, for every network
k of a group that :func:`tesla.group_training.train_group` trains, the state from which its
training continues exactly: its parameters and buffers, its optimizer's state (the SGD
momentum buffers), its generator (minibatch order and augmentation draws), the number E_k
of epochs it has completed and their statistics; and the process's global torch generators
(the CPU's, and CUDA's when there is a GPU), so that no random state is left out. Restored
into freshly built networks, these give the same next epoch, bit for bit, as the process
that saved them would have computed.

**When.** A state is saved only when every network's recorded epoch E_k is that of its
parameters: in the group mode ``sequential`` after any epoch (the other networks are
between two epochs), in the modes that step the networks together (``streams``, ``vmap``)
once every network has completed the epoch. Of those moments, one is saved when ``every``
seconds have passed since the last save (or since training began): every epoch or every
``every`` seconds, whichever is rarer. The file is replaced atomically
(:func:`tesla.files.atomic_output`): a kill at any moment leaves the previous state or the
new one, never a mixture.

**Which.** A checkpoint records its ``identity`` (everything the networks depend on: the
settings and the fingerprints of the inputs, JSON) and the SHA-256 ``key`` of it. Only a
checkpoint of the same key is resumed. Any other (other settings, other inputs, an
unreadable or truncated file, another format version) is set aside with a log line that
says why, and training starts from epoch 0; its first save replaces the file. A checkpoint
is only saved time: starting afresh costs time, resuming a foreign state would give a wrong
result without a word.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from tesla import __version__
from tesla.errors import TeslaError
from tesla.files import atomic_output
from tesla.training import EpochStats, GroupMember

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "GroupCheckpoint", "NetworkState", "identity_key", "remove_checkpoint"]

CHECKPOINT_FORMAT = "tesla-group-checkpoint"
CHECKPOINT_VERSION = 1


def identity_key(identity: dict[str, Any]) -> str:
    """SHA-256 of the identity's canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=repr).encode()).hexdigest()


@dataclass
class NetworkState:
    """One network's saved state: E_k epochs completed, then what continues from there."""

    epoch: int
    model: dict
    optimizer: dict
    generator: torch.Tensor
    history: list[EpochStats]

    @classmethod
    def of(cls, member: GroupMember, history: Sequence[EpochStats], epoch: int) -> NetworkState:
        return cls(epoch, member.model.state_dict(), member.optimizer.state_dict(), member.generator.get_state(),
                   list(history))

    def record(self) -> dict:
        return dict(epoch=self.epoch, model=self.model, optimizer=self.optimizer, generator=self.generator,
                    history=[s.as_dict() for s in self.history])

    @classmethod
    def from_record(cls, d: dict) -> NetworkState:
        return cls(int(d["epoch"]), d["model"], d["optimizer"], d["generator"], [EpochStats(**s) for s in d["history"]])

    def restore(self, member: GroupMember) -> None:
        """Network, optimizer and generator of ``member`` as saved; it resumes at epoch E_k."""
        member.model.load_state_dict(self.model)
        member.optimizer.load_state_dict(self.optimizer)
        member.generator.set_state(self.generator.cpu())
        member.start_epoch = self.epoch


def _global_generators() -> dict:
    """The process's torch generators: the CPU's, and every CUDA device's where there is one."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"cpu": torch.get_rng_state(), "cuda": list(cuda)}


def _set_global_generators(saved: dict) -> None:
    torch.set_rng_state(saved["cpu"])
    if saved["cuda"] and torch.cuda.is_available() and len(saved["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(saved["cuda"])


class GroupCheckpoint:
    """The checkpoint file of one group at ``path``, for the group described by ``identity``.

    :meth:`resume` restores the members from the file when it is this group's (else logs
    why not); :meth:`follow` makes the members save the group after their epochs."""

    def __init__(self, path: str | Path, identity: dict[str, Any], *, every: float,
                 log: Callable[[str], None]) -> None:
        self.path = Path(path)
        self.identity = json.loads(json.dumps(identity, sort_keys=True, default=repr))
        self.key = identity_key(self.identity)
        self.every = float(every)
        self.log = log

    # -- reading ------------------------------------------------------------------------
    def _read(self, networks: int) -> tuple[list[NetworkState], dict] | None:
        """The states saved for this group, or None (with a log line saying why)."""
        if not self.path.exists():
            self.log(f"training from epoch 0; the state is saved to {self.path} every epoch or every {self.every:g} s, "
                     "whichever is rarer")
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
            if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"not a {CHECKPOINT_FORMAT} file")
        except Exception as exc:  # truncated, damaged, not ours: only time is lost
            self.log(f"checkpoint {self.path} is unreadable ({type(exc).__name__}: {exc}); starting from epoch 0 "
                     "(the file will be replaced)")
            return None
        if payload.get("format_version") != CHECKPOINT_VERSION:
            self.log(f"checkpoint {self.path} has format version {payload.get('format_version')!r} (this tesla reads "
                     f"{CHECKPOINT_VERSION}); starting from epoch 0 (the file will be replaced)")
            return None
        if payload.get("key") != self.key:
            self.log(f"checkpoint {self.path} belongs to another evaluation ({self._difference(payload)}); starting "
                     "from epoch 0 (the file will be replaced)")
            return None
        try:
            states = [NetworkState.from_record(d) for d in payload["networks"]]
            if len(states) != networks:
                raise ValueError(f"{len(states)} networks saved, {networks} expected")
            return states, payload["generators"]
        except Exception as exc:
            self.log(f"checkpoint {self.path} is damaged ({type(exc).__name__}: {exc}); starting from epoch 0 "
                     "(the file will be replaced)")
            return None

    def _difference(self, payload: dict) -> str:
        """What differs between a foreign checkpoint's identity and this group's, in words."""
        try:
            theirs = json.loads(payload.get("identity", "{}"))
        except (TypeError, ValueError):
            return "its identity is unreadable"
        parts = []
        for part in sorted(set(theirs) | set(self.identity)):
            a, b = theirs.get(part, {}), self.identity.get(part, {})
            if not (isinstance(a, dict) and isinstance(b, dict)):
                if a != b:
                    parts.append(f"{part} differ")
                continue
            changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            if changed:
                parts.append(f"{part} differ: {', '.join(changed)}")
        return "; ".join(parts) or "another identity"

    def resume(self, members: Sequence[GroupMember]) -> list[list[EpochStats]]:
        """Restore every member (network, optimizer, generator, start epoch) and the global
        generators from this group's checkpoint; returns each member's statistics of the
        epochs it had completed (empty lists when it starts afresh)."""
        read = self._read(len(members))
        if read is None:
            return [[] for _ in members]
        states, generators = read
        try:
            for member, state in zip(members, states):
                state.restore(member)
            _set_global_generators(generators)
        except Exception as exc:  # the networks are now partly restored: no fresh start from here
            raise TeslaError(f"checkpoint {self.path}: its state does not fit these networks ({type(exc).__name__}: "
                             f"{exc}); delete it to start from epoch 0") from None
        epochs = ", ".join(f"{m.name} at epoch {s.epoch}" for m, s in zip(members, states))
        self.log(f"resumed from {self.path}: {epochs}")
        return [list(s.history) for s in states]

    # -- writing ------------------------------------------------------------------------
    def save(self, members: Sequence[GroupMember], histories: Sequence[Sequence[EpochStats]],
             epochs: Sequence[int]) -> None:
        """Write the group's state (every member at its completed epoch), atomically."""
        payload = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "tesla_version": __version__,
            "key": self.key,
            "identity": json.dumps(self.identity, sort_keys=True),
            "networks": [NetworkState.of(m, h, e).record() for m, h, e in zip(members, histories, epochs)],
            "generators": _global_generators(),
        }
        with atomic_output(self.path) as tmp:
            torch.save(payload, tmp)

    def follow(self, members: Sequence[GroupMember], earlier: Sequence[Sequence[EpochStats]], *, sequential: bool) -> None:
        """Give every member an ``on_epoch_end`` that records its epoch and saves the group
        when its state is whole and a save is due (see the module's docstring); ``earlier``:
        each member's statistics of the epochs completed before (from :meth:`resume`)."""
        histories = [list(h) for h in earlier]
        done = [m.start_epoch for m in members]
        last_save = [time.monotonic()]

        def after(k: int, stats: EpochStats) -> None:
            histories[k].append(stats)
            done[k] = stats.epoch
            whole = sequential or len(set(done)) == 1
            if whole and time.monotonic() - last_save[0] >= self.every:
                t0 = time.perf_counter()
                self.save(members, histories, done)
                last_save[0] = time.monotonic()
                self.log(f"saved {self.path}: {', '.join(f'{m.name} at epoch {e}' for m, e in zip(members, done))} "
                         f"({time.perf_counter() - t0:.1f} s)")

        for k, member in enumerate(members):
            member.on_epoch_end = lambda stats, k=k: after(k, stats)


def remove_checkpoint(path: str | Path) -> None:
    """The result is safe elsewhere: remove the checkpoint, and any temporary that a save
    killed half-way left beside it (``atomic_output``'s ``.NAME.PID.tmp``). Call it while
    holding the checkpoint's lock."""
    path = Path(path)
    path.unlink(missing_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
