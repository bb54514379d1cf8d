"""The checkpoint of a distillation (``tesla-distill-checkpoint``, docs/formats.md): the
state of :mod:`tesla.distill_state` after an iteration, from which a killed run resumes
(on the CPU bitwise identical to an uninterrupted run with the same seed).

A checkpoint is resumed only by a run of the same identity (the settings outside
``RESUME_TUNABLE``, on the same training split), and only when its state passes the
divergence guard's state rules. Step sizes and the guard's limits may change on resume; a
change of those in :data:`RESUME_REPORTED` is reported. Versions 1 and 2 are still read:
version 1 has no ``guard_start`` (recomputed from the seed's initial images); before version 3
``soft_labels`` was a boolean and the learned-label, window and initialising-snapshot settings
did not exist (those runs had today's defaults).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import torch

from tesla import __version__, guard
from tesla.distill_settings import RESUME_REPORTED, DistillSettings
from tesla.distill_setup import DistillSetup
from tesla.distill_state import DistillState, restored_state
from tesla.errors import TeslaError
from tesla.files import atomic_output


CHECKPOINT_FORMAT = "tesla-distill-checkpoint"
#: 2: adds ``guard_start`` and ``settings``; 3: adds ``label_logits`` and ``opt_labels``
#: (learned labels) and the window settings; versions 1 and 2 are still read (see load_checkpoint)
CHECKPOINT_VERSION = 3
#: identity settings added by checkpoint version 3, with the value every earlier run had
_ADDED_IN_VERSION_3 = ("label_temperature", "init_expert", "init_epoch", "min_start_epoch", "max_start_epoch_final", "window_iterations")


def save_checkpoint(path: Path, setup: DistillSetup, state: DistillState, generator_state: torch.Tensor) -> None:
    """Write the state atomically (temporary file, then rename)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "tesla_version": __version__,
        "identity": setup.settings.identity(),
        "dataset_fingerprint": setup.split.fingerprint,
        "iteration": state.iteration,
        "images": state.images.detach().cpu(),
        "classes": state.classes,
        "alpha": state.alpha.detach().cpu(),
        "soft_labels": None if state.soft_labels is None else state.soft_labels.cpu(),
        "opt_images": state.opt_images.state_dict(),
        "opt_alpha": state.opt_alpha.state_dict(),
        "generator": generator_state,
        "log": state.log,
        "guard_start": asdict(state.start),
        "settings": asdict(setup.settings),
        "label_logits": None if state.label_logits is None else state.label_logits.detach().cpu(),
        "opt_labels": None if state.opt_labels is None else state.opt_labels.state_dict(),
    }
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, setup: DistillSetup) -> DistillState:
    """Restore a state saved by :func:`save_checkpoint`
    (:func:`tesla.distill_state.restored_state`), refusing one of a different run or one whose
    state fails the guard's state rules (an old version-1 checkpoint may hold a state saved
    without them). Versions 1 and 2 (no learned labels, no window schedule) are read as runs
    with today's defaults for those settings."""
    payload, version = _read_payload(path, setup)
    _check_identity(path, setup.settings, payload, version)
    state = restored_state(payload, setup)
    _check_guard(path, setup.settings, state, version)
    _report_changed_settings(path, setup.settings, payload)
    return state


def _read_payload(path: Path, setup: DistillSetup) -> tuple[dict[str, Any], int]:
    """The checkpoint's content and format version: a readable file of our format, of a
    version this tesla reads, written by a run on the same training split."""
    s = setup.settings
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file
        raise TeslaError(f"{path}: cannot read this checkpoint ({exc}); to start over, {s.start_over()}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise TeslaError(f"{path}: not a tesla distill checkpoint; give another --checkpoint path or delete it")
    version = int(payload.get("format_version", -1))
    if version not in (1, 2, CHECKPOINT_VERSION):
        raise TeslaError(
            f"{path}: checkpoint format version {payload.get('format_version')} (this tesla reads 1 to "
            f"{CHECKPOINT_VERSION}); to start over, {s.start_over()}"
        )
    if payload["dataset_fingerprint"] != setup.split.fingerprint:
        raise TeslaError(f"{path}: checkpoint of a run on another dataset; give another --checkpoint or, to start over, {s.start_over()}")
    return payload, version


def _identity_of_version(identity: dict[str, Any], version: int, settings: DistillSettings) -> dict[str, Any]:
    """A checkpoint's identity in today's terms: before version 3, ``soft_labels`` was a
    boolean and the label/window/init-snapshot settings did not exist (their defaults are what
    those runs did). ``settings``: today's settings, whose fields hold those defaults and whose
    class reads the boolean form of ``soft_labels``."""
    if version >= 3:
        return identity
    defaults = {f.name: f.default for f in fields(settings)}
    upgraded = {**identity, **{k: defaults[k] for k in _ADDED_IN_VERSION_3}}
    if isinstance(identity.get("soft_labels"), bool):
        upgraded["soft_labels"] = replace(settings, soft_labels=identity["soft_labels"]).soft_labels
    return upgraded


def _check_identity(path: Path, s: DistillSettings, payload: dict[str, Any], version: int) -> None:
    """Refuse the checkpoint of a run with other settings than those that may change on
    resume, listing the differences (and why a new lr_teacher cannot act on a resumed run)."""
    theirs, ours = _identity_of_version(payload["identity"], version, s), s.identity()
    diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if not diff:
        return
    listed = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs now {ours.get(k)!r}" for k in diff)
    why = ""
    if "lr_teacher" in diff:
        why = (
            f" (lr_teacher is alpha's initial value: the checkpoint's alpha has moved on from it to "
            f"{float(payload['alpha']):.4g}, so a new lr_teacher only acts from iteration 0)"
        )
    raise TeslaError(
        f"{path}: checkpoint (iteration {payload['iteration']}) of a run with other settings ({listed}){why}; "
        f"on resume only {', '.join(RESUME_REPORTED)}, the iterations, the device and the paths may change. "
        f"Use the checkpoint's settings to resume it, give another --checkpoint, or, to start over with these "
        f"settings, {s.start_over()}"
    )


def _check_guard(path: Path, s: DistillSettings, state: DistillState, version: int) -> None:
    """Refuse a restored state that fails the guard's state rules (resuming it would continue
    from a diverged state)."""
    alpha, limits = float(state.alpha.detach()), s.guard_limits()
    breach = guard.check_state(alpha, state.images, state.start, limits) or guard.check_labels(state.label_logits)
    if breach is None:
        return
    old = " (written by a tesla before version-2 checkpoints, which saved states without these checks)" if version == 1 else ""
    limit = f"; if the value is intended, raise {s.wording.name(breach.limit)}" if breach.limit else ""
    raise TeslaError(
        f"{path}: the checkpoint (iteration {state.iteration}) holds a state that fails the divergence guard"
        f"{old}: {breach.what}. Resuming it would continue from a diverged state; to start over, {s.start_over()}"
        f"{limit}"
    )


def _report_changed_settings(path: Path, s: DistillSettings, payload: dict[str, Any]) -> None:
    """Say on stderr which of :data:`RESUME_REPORTED` differ from the checkpoint's run."""
    changed = {k: v for k, v in payload.get("settings", {}).items() if k in RESUME_REPORTED and v != getattr(s, k)}
    if changed:
        listed = ", ".join(f"{k} {guard.format_value(v)} -> {guard.format_value(getattr(s, k))}" for k, v in changed.items())
        print(f"tesla distill: resuming {path} with changed settings: {listed}", file=sys.stderr)
