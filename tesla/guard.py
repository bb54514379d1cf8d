"""The divergence guard of ``tesla distill``: every iteration is checked for sanity, not only
for finiteness, and only a state that passed is ever checkpointed.

Notation, iteration k: S_{k-1} = (X, alpha) is the state before the update and S_k the
state after it; L_k, dL/dX and dL/dalpha are the matching loss of S_{k-1} and its gradients
(PAPER.md section 1); rho(x_n) = sqrt(mean over the pixels of x_n^2) is the RMS of image n in
network input space, rho(X) = max_n rho(x_n) the largest of them, rho_0 = rho(X_0) its value
for the initial images, and alpha_0 = lr_teacher.

Rules, in this order (the first breach stops the run):

1. before the update, the state S_{k-1} is judged by its loss (:func:`check_match`):

   (a) L_k, dL/dX and dL/dalpha are finite;
   (d) L_k <= max_loss (default 10). L is about 1 at the start by construction (a small
       alpha leaves theta_N near theta*_t, at distance sqrt(D) from the target) and normal
       runs stay below about 2; L = 10 means that the student ended sqrt(10) ~ 3.2 times
       as far from the target as it started: it is moving away from the expert.

2. after the update, the state S_k (:func:`check_state`, also applied to a resumed state):

   (a) every x in X and alpha are finite;
   (b) alpha <= max_lr (default 100 alpha_0). The floor min_lr (default alpha_0 / 1000) is
       a projection, not a breach. Published runs keep alpha within a few times alpha_0;
       100 alpha_0 is a student step that no expert trajectory was trained with;
   (c) rho(X) <= max_image_growth * rho_0 (default 100): the largest image RMS, so that one
       image blowing up is seen among thousands of sane ones (a global RMS would grow by only
       sqrt(1/N) of it).

With learned labels the logits Z are part of the state: rule 1(a) also asks dL/dZ and Z to be
finite, rule 2(a) Z (:func:`check_labels`; the labels' probabilities softmax(Z / T) are then
finite and sum to 1); the setting named is ``lr_label``.

Checkpoints: S_k is written only after iteration k+1 has checked its loss (before S_k is
updated), so a state whose own loss explodes is never saved and a rerun never resumes from a
poisoned state; the last iteration's state, which has no next loss, is written with the
output after passing rule 2.

Cause (:func:`suspects`), the setting named in the advice:

* alpha out of range or not finite: ``lr_lr``;
* images out of range or not finite: ``lr_img``;
* a loss or gradient breach: judged against the run's own evidence, its history (kept in the
  checkpoint, so a resumed run keeps it). A state S_j is *healthy* when its loss L_{j+1} was
  at most the larger of :data:`HEALTHY_LOSS` = 1 (the student ended nearer its target than it
  started; a student that does not move has L = 1) and, once the history holds
  :data:`LEVEL_ITERATIONS` iterations, its median loss (:func:`healthy_loss_bound`: a run
  whose normal loss stays between 1 and 2, as the published CIFAR runs do, still has healthy
  states, its better half; a few iterations do not show a run's level). Against the latest healthy state S_r of the run
  (:func:`last_healthy`), whichever of alpha (``lr_lr``) and the largest image RMS
  (``lr_img``) has grown by a factor of at least :data:`DRIFT` is a suspect, the larger
  growth first: the state moved away from one that matched well, and the loss followed.
  When neither has, or when no state of the run was healthy (the loss was high before the
  images or alpha had moved: typically a new lr_teacher from iteration 0, or a larger
  syn_steps on resume), the cause is the student's trajectory itself: ``lr_teacher`` (its
  step alpha starts too large) or ``syn_steps`` (too many steps). Growth since the run's
  start is no evidence: a healthy run's images grow too (about 3 x in the demo's 200
  iterations), so a stop after a change of syn_steps would be blamed on lr_img.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from tesla.settings import Wording
from tesla.settings import message_value as format_value

__all__ = [
    "DRIFT",
    "HEALTHY_LOSS",
    "LEVEL_ITERATIONS",
    "Breach",
    "Healthy",
    "Limits",
    "Start",
    "Wording",
    "check_match",
    "check_state",
    "explain",
    "format_value",
    "healthy_loss_bound",
    "image_rms",
    "largest_image_rms",
    "last_healthy",
    "suspects",
]

# the limits' defaults are those of the settings max_lr, max_image_growth and max_loss
# (declared in tesla.distill_settings)
#: a quantity that has grown by this factor since the last healthy state is a suspect of a loss breach
DRIFT = 2.0
#: a state whose matching loss is at most this (or the run's median loss, if larger) is healthy:
#: the student ended nearer its target than it started
HEALTHY_LOSS = 1.0
#: iterations of history from which the run's median loss shows its normal level
LEVEL_ITERATIONS = 10


@dataclass(frozen=True)
class Limits:
    """The bounds of rules (b), (c), (d)."""

    max_lr: float
    max_image_growth: float
    max_loss: float


@dataclass(frozen=True)
class Start:
    """Where the run started: alpha_0 and rho_0 (kept in the checkpoint)."""

    alpha: float
    largest_image_rms: float

    @classmethod
    def of(cls, alpha: float, images: torch.Tensor) -> Start:
        """alpha_0 and rho_0 = rho(X_0), the largest RMS of the initial images."""
        return cls(float(alpha), largest_image_rms(images))


@dataclass(frozen=True)
class Breach:
    """A failed rule: what was seen, and the settings most likely responsible."""

    rule: str  # "finite", "loss", "alpha" or "images"
    what: str  # the observation, with its values
    suspects: tuple[str, ...]  # settings to lower, the most likely first
    limit: str | None = None  # the bound that was exceeded (to raise if the value is intended)


def image_rms(images: torch.Tensor) -> torch.Tensor:
    """rho(x_n) for every image, as ||x_n|| / sqrt(pixels) (float32, no copy of the images:
    they may be gigabytes on a GPU)."""
    x = images.detach().flatten(1)
    return torch.linalg.vector_norm(x, dim=1) / math.sqrt(x.shape[1])


def largest_image_rms(images: torch.Tensor) -> float:
    """rho(X) = max_n sqrt(mean over the pixels of x_n^2): the largest per-image RMS."""
    return float(image_rms(images).max())


@dataclass(frozen=True)
class Healthy:
    """The latest healthy state S_r of a run (its loss at most HEALTHY_LOSS): r, alpha, rho."""

    iteration: int
    alpha: float
    largest_image_rms: float


def healthy_loss_bound(history: Sequence[Mapping[str, Any]]) -> float:
    """max(HEALTHY_LOSS, median of the run's losses): the loss of a healthy state, measured on
    the run itself (HEALTHY_LOSS alone before LEVEL_ITERATIONS iterations)."""
    losses = sorted(float(r["loss"]) for r in history if math.isfinite(float(r["loss"])))
    if len(losses) < LEVEL_ITERATIONS:
        return HEALTHY_LOSS
    middle = len(losses) // 2
    median = losses[middle] if len(losses) % 2 else (losses[middle - 1] + losses[middle]) / 2
    return max(HEALTHY_LOSS, median)


def last_healthy(history: Sequence[Mapping[str, Any]], start: Start) -> Healthy | None:
    """The latest state S_r of the run whose own loss was at most :func:`healthy_loss_bound`,
    from the metrics rows of its iterations (row k: the loss L_k of S_{k-1}, then alpha and the
    largest image RMS of S_k; S_0 is the start); None when there is none. Rows without the
    image RMS (written before it was recorded) cannot serve."""
    rows = {int(r["iteration"]): r for r in history}
    bound = healthy_loss_bound(history)
    for k in sorted(rows, reverse=True):
        if not float(rows[k]["loss"]) <= bound:
            continue
        if k == 1:
            return Healthy(0, start.alpha, start.largest_image_rms)
        before = rows.get(k - 1)
        if before is not None and before.get("max_image_rms") not in (None, ""):
            return Healthy(k - 1, float(before["alpha"]), float(before["max_image_rms"]))
    return None


def suspects(alpha: float, largest_rms: float, healthy: Healthy | None) -> tuple[str, ...]:
    """The settings behind a loss or gradient breach of a state (alpha, largest image RMS):
    the quantities that grew by >= DRIFT since the run's last healthy state, else (and when
    the run had none) lr_teacher/syn_steps."""
    if healthy is None:
        return ("lr_teacher", "syn_steps")
    drifts = [(alpha / healthy.alpha, "lr_lr"), (largest_rms / healthy.largest_image_rms, "lr_img")]
    drifted = tuple(name for ratio, name in sorted(drifts, reverse=True) if not ratio < DRIFT)
    return drifted or ("lr_teacher", "syn_steps")


def _evidence(alpha: float, largest_rms: float, healthy: Healthy | None, bound: float) -> str:
    """How the state compares with the run's last healthy one (the grounds of the cause named)."""
    if healthy is None:
        return f"no state of this run had a loss of at most {bound:.3g} (1, or the median loss of a longer history if larger)"
    return (
        f"since iteration {healthy.iteration}, the last state with a loss of at most {bound:.3g}, alpha changed "
        f"{alpha / healthy.alpha:.3g} x and the largest image RMS {largest_rms / healthy.largest_image_rms:.3g} x"
    )


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def check_match(
    loss: float,
    grad_images: torch.Tensor,
    grad_alpha: float,
    alpha: float,
    images: torch.Tensor,
    start: Start,
    limits: Limits,
    history: Sequence[Mapping[str, Any]] = (),
) -> Breach | None:
    """Rules 1(a) and 1(d) for the state (``alpha``, ``images``) whose matching loss and
    gradients were just computed; ``history``: the metrics rows of the iterations before
    (the evidence of :func:`suspects`)."""
    if not math.isfinite(loss):
        rule, what = "finite", f"the matching loss is not finite ({loss})"
    elif not _finite(grad_images) or not math.isfinite(grad_alpha):
        rule, what = "finite", f"the gradient of the matching loss is not finite (the loss is {loss:.4g})"
    elif loss > limits.max_loss:
        rule = "loss"
        what = f"the matching loss {loss:.4g} is above its limit {limits.max_loss:g} (it starts near 1; this far above, the student moves away from the expert)"
    else:
        return None
    peak = largest_image_rms(images)
    state = (
        f"alpha {alpha:.4g} ({alpha / start.alpha:.3g} x its start), largest image RMS {peak:.4g} "
        f"({peak / start.largest_image_rms:.3g} x its initial value {start.largest_image_rms:.4g})"
    )
    healthy = last_healthy(history, start)
    what = f"{what}; the state: {state}; {_evidence(alpha, peak, healthy, healthy_loss_bound(history))}"
    return Breach(rule, what, suspects(alpha, peak, healthy), "max_loss" if rule == "loss" else None)


def check_state(alpha: float, images: torch.Tensor, start: Start, limits: Limits) -> Breach | None:
    """Rules 2(a)-(c) for a state after its update (or read from a checkpoint)."""
    if not math.isfinite(alpha):
        return Breach("finite", f"alpha (the learned learning rate) is not finite ({alpha})", ("lr_lr",))
    rms = image_rms(images)
    if not _finite(rms) and not _finite(images):  # the full check only when an RMS is not finite
        return Breach("finite", "the synthetic images are not finite", ("lr_img",))
    if alpha > limits.max_lr:
        return Breach(
            "alpha",
            f"alpha (the learned learning rate) is {alpha:.4g}, {alpha / start.alpha:.3g} x its start {start.alpha:g}, "
            f"above its ceiling {limits.max_lr:g}",
            ("lr_lr",),
            "max_lr",
        )
    peak = float(rms.max())
    if peak > limits.max_image_growth * start.largest_image_rms:
        return Breach(
            "images",
            f"the largest image RMS is {peak:.4g}, {peak / start.largest_image_rms:.3g} x its initial value "
            f"{start.largest_image_rms:.4g}, above its limit of {limits.max_image_growth:g} x",
            ("lr_img",),
            "max_image_growth",
        )
    return None


def check_labels(logits: torch.Tensor | None, grad_logits: torch.Tensor | None = None) -> Breach | None:
    """Rules 1(a) and 2(a) for learned labels: the logits Z (and, when given, dL/dZ) finite;
    nothing to check without learned labels (``logits`` None)."""
    if grad_logits is not None and not _finite(grad_logits):
        return Breach("finite", "the gradient of the learned labels is not finite", ("lr_label",))
    if logits is not None and not _finite(logits.detach()):
        return Breach("finite", "the learned label logits are not finite", ("lr_label",))
    return None


def explain(breach: Breach, iteration: int, values: Mapping[str, Any], wording: Wording) -> str:
    """The first part of the stop message: what failed, its likely cause, the limit to raise
    if intended. ``values``: the run's settings (limits with their effective values)."""
    lower = "lower it" if len(breach.suspects) == 1 else "lower one of them"
    text = (
        f"iteration {iteration}: {breach.what}. Most likely cause: {wording.names(breach.suspects, values)} "
        f"is too large; {lower}"
    )
    if breach.limit:
        text += f" (or, if such values are expected here, raise {wording.name(breach.limit)}, now {format_value(values[breach.limit])})"
    return text + "."
