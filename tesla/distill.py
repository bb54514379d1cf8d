"""``tesla distill``: learn a synthetic set by matching expert trajectories (MTT / TESLA).

Each iteration (PAPER.md section 1):

1. pick an expert e ~ U{experts} and a start epoch t ~ U{T- .. T+(i) - 1} (the matching
   window: T- = ``min_start_epoch``, T+(i) = ``max_start_epoch`` or, with a schedule, growing
   to ``max_start_epoch_final`` by iteration ``window_iterations``: :func:`start_window`);
   read only the snapshots theta*_t and theta*_{t+M} (M = ``expert_epochs``) from its file;
2. labels (``soft_labels``): ``none``, the class indices; ``tesla``, relabel the synthetic
   images with the target expert, Y = softmax(f_{theta*_{t+M}}(X)); ``learned``, Y =
   softmax(Z / T) with learned logits Z (:mod:`tesla.soft_labels`);
3. compute the matching loss L = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2
   of an N-step student and its gradients dL/dX, dL/dalpha (and dL/dZ for learned labels)
   with the chosen engine (``exact``, ``tesla`` or ``unroll``, see :mod:`tesla.matching`);
4. X <- SGD(c lr_img, momentum 0.5),  alpha <- SGD(lr_lr, momentum 0.5), then
   alpha <- max(alpha, min_lr) (projected SGD: alpha can never become zero or negative);
   learned labels: Z <- SGD(lr_label, momentum 0.5).
   c is the step-size convention of lr_img (``--lr-img-convention``): 1 for ``gradient``
   (lr_img multiplies dL/dX as the engine computes it), 1/2 for ``tesla-published`` (the
   published TESLA code's image gradient is 0.5x the first-order gradient, PAPER.md
   section 10, so its published lr_img values can be copied verbatim).

The initial images are random real images of each class (``init: real``), only those that a
chosen expert snapshot classifies correctly (``real-correct``, :mod:`tesla.initialisation`),
or noise. The same snapshot (``init_expert``, ``init_epoch``) initialises learned labels:
Z_0 = f_{theta*}(X_0).

The images live in the experts' input space (``tesla.input_space``: the normalisation and
ZCA they were trained with, recorded in their files; all experts must agree).

Every iteration passes the divergence guard (:mod:`tesla.guard`: finite values, alpha
below its ceiling, images within bounds, a loss that does not explode) before anything is
saved; a breach stops the run with the setting that most likely caused it, named as it was
set (a flag, or a config key inside the workflow), and what a rerun will do.

Outputs: the synthetic set file (``tesla-synthetic``, the last iteration's images), a
per-iteration metrics CSV, PNG grids of the images at checkpoints and at the end, and a
checkpoint from which a killed run resumes (on the CPU, bitwise identical to an
uninterrupted run with the same seed). One run at a time per output: the run holds
exclusive locks (:mod:`tesla.locks`) on ``OUT.lock`` and ``CHECKPOINT.lock`` from start to end.

Started by torchrun or srun, a run is one job of several processes (:mod:`tesla.distributed`):
each student step's minibatch is split over them and the sums over it all-reduced, so the result
is the one-process result up to float round-off; rank 0 writes every file and holds the locks,
and a checkpoint resumes with any number of processes.

This module holds the command and the loop (the settings are declared in
:mod:`tesla.distill_settings`); the pieces the loop works on have
modules of their own: the opened inputs (:mod:`tesla.distill_setup`), the learned state and its
start (:mod:`tesla.distill_state`), the checkpoint (:mod:`tesla.distill_checkpoint`) and the
other outputs: metrics, grids, the synthetic set, the tracker (:mod:`tesla.distill_outputs`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tesla import distributed, guard
from tesla.distill_checkpoint import load_checkpoint, save_checkpoint
from tesla.distill_outputs import RunRecord, grid_image, metrics_row, save_grid, synthetic_set
from tesla.distill_setup import DistillSetup, open_setup, result_key
from tesla.distill_state import DistillState, fresh_state
from tesla.distributed import SINGLE, Ranks
from tesla.errors import TeslaError
from tesla.locks import acquire
from tesla.distill_settings import RESUME_TUNABLE, DistillSettings, check_settings, start_window
from tesla.settings import add_arguments, from_args
from tesla.matching import MatchResult, matching_gradients
from tesla.soft_labels import assign_soft_labels, label_logit_gradient, learned_soft_labels
from tesla.synthetic import SyntheticSet
from tesla.tracking import TrackerOptions, Tracking
from tesla.tracking import from_args as tracking_options



def build_setup(s: DistillSettings, ranks: Ranks = SINGLE) -> DistillSetup:
    """Refuse settings that cannot work, then open and cross-check the inputs
    (:func:`tesla.distill_setup.open_setup`); raise TeslaError with the fix for anything
    wrong. ``ranks``: the processes of a distributed job (:mod:`tesla.distributed`)."""
    check_settings(s)
    return open_setup(s, ranks)


# ---------------------------------------------------------------------------------------
# the divergence guard's stop
# ---------------------------------------------------------------------------------------
class Diverged(TeslaError):
    """A state that failed the divergence guard (:mod:`tesla.guard`): the run stops with the
    setting that most likely caused it and what a rerun will do."""


def _rerun_note(s: DistillSettings, last_saved: int | None, breach: guard.Breach) -> str:
    """What happens when the user reruns: where it resumes, and how to change a setting
    that only acts from iteration 0 (lr_teacher)."""
    wording, ckpt = s.wording, s.checkpoint_path
    resumes = f"resumes from iteration {last_saved} ({ckpt})" if last_saved else "starts from iteration 0"
    if wording.in_workflow:  # the checkpoint is named by a digest of the settings and inputs (--checkpoint-dir)
        return (
            f"Nothing was saved from this state. Change the setting in the config and run snakemake again: "
            f"with changed distill settings this distillation starts afresh (its checkpoint is named by its "
            f"settings and inputs); a raised limit does not rename the checkpoint: the rerun {resumes}."
        )
    if last_saved is None:
        return "Nothing was checkpointed yet: the next run starts afresh from iteration 0."
    resumable = [k for k in (*breach.suspects, breach.limit) if k in RESUME_TUNABLE]
    fixed = [k for k in breach.suspects if k not in RESUME_TUNABLE]
    note = f"Nothing was saved from this state; the last good state, iteration {last_saved}, stays in {ckpt}"
    if resumable:
        note += f": the same command with a changed {' or '.join(map(wording.name, resumable))} resumes from it"
    if fixed:
        note += (
            f". {' and '.join(wording.name(k) for k in fixed)} cannot change on resume"
            f"{' (alpha starts from lr_teacher: it only acts at iteration 0)' if 'lr_teacher' in fixed else ''}; "
            f"to start over with a new value, {s.start_over()}"
        )
    return note + "."


def _stop(s: DistillSettings, iteration: int, breach: guard.Breach, last_saved: int | None) -> Diverged:
    return Diverged(f"{guard.explain(breach, iteration, s.effective(), s.wording)} {_rerun_note(s, last_saved, breach)}")


def _headroom(state: DistillState, limits: guard.Limits) -> str:
    """The run's peaks against the guard's limits (how close it came to a stop)."""
    rows = state.log
    loss = max((float(r["loss"]) for r in rows), default=math.nan)
    alpha = max((float(r["alpha"]) for r in rows), default=math.nan)
    rms = max((float(r["max_image_rms"]) for r in rows if r.get("max_image_rms") not in (None, "")), default=math.nan)
    return (
        f"guard peaks over {len(rows)} iterations: loss {loss:.4g} (limit {limits.max_loss:g}), alpha {alpha:.4g} "
        f"(ceiling {limits.max_lr:g}), largest image RMS {rms / state.start.largest_image_rms:.3g} x its initial value "
        f"(limit {limits.max_image_growth:g} x)"
    )


# ---------------------------------------------------------------------------------------
# one iteration
# ---------------------------------------------------------------------------------------
def distill_iteration(setup: DistillSetup, state: DistillState) -> tuple[MatchResult, dict]:
    """One iteration: choose (expert, t in the window), read theta*_t and theta*_{t+M}, label
    (soft: assigned or learned), match."""
    s, g = setup.settings, state.generator
    e = int(torch.randint(len(setup.experts), (1,), generator=g))
    lower, upper = start_window(s, state.iteration + 1)
    t = lower + int(torch.randint(upper - lower, (1,), generator=g))
    expert = setup.experts[e]
    theta_start = expert.snapshot(t).to(setup.device, torch.float32)
    theta_target = expert.snapshot(t + s.expert_epochs).to(setup.device, torch.float32)
    images = state.images.detach()
    if s.soft_labels == "tesla":
        state.soft_labels = setup.ranks.assemble_rows(  # the labelling pass, shared by the processes
            len(images), lambda rows: assign_soft_labels(setup.model, theta_target, images[rows], s.label_chunk)
        )
        targets = state.soft_labels
    elif s.learned_labels:
        targets = learned_soft_labels(state.label_logits, s.label_temperature)
    else:
        targets = state.classes.to(setup.device)
    result = matching_gradients(
        s.engine,
        setup.loss_fn,
        theta_start,
        theta_target,
        images,
        targets,
        float(state.alpha.detach()),
        s.syn_steps,
        setup.batch_syn,
        setup.dsa,
        g,
        compiler=setup.compiler,
        learn_labels=s.learned_labels,
        ranks=setup.ranks,
    )
    return result, {"expert": Path(s.experts[e]).name, "start_epoch": t, "window_min": lower, "window_max": upper}


def update(state: DistillState, s: DistillSettings, result: MatchResult, grad_logits: torch.Tensor | None) -> None:
    """The iteration's update: X <- SGD(c lr_img) on dL/dX, alpha <- SGD(lr_lr) on dL/dalpha,
    learned labels Z <- SGD(lr_label) on dL/dZ (all momentum 0.5), then alpha <- max(alpha,
    min_lr): projected SGD, alpha can never become zero or negative."""
    state.images.grad = result.grad_images.to(state.images.dtype)
    state.alpha.grad = torch.tensor(result.grad_alpha, dtype=state.alpha.dtype, device=state.alpha.device)
    state.opt_images.step()
    state.opt_alpha.step()
    if state.opt_labels is not None:
        state.label_logits.grad = grad_logits.to(state.label_logits.dtype)
        state.opt_labels.step()
    with torch.no_grad():
        state.alpha.clamp_(min=s.alpha_floor)  # projected SGD: alpha >= min_lr > 0


@dataclass
class CheckpointCadence:
    """When the state is saved. A state is due every ``checkpoint_every`` iterations, but it
    is saved only once its own matching loss has passed the guard: in the next iteration,
    after that check and before the update (so a checkpoint never holds a state whose loss
    explodes). The last iteration's state is saved at once (its output is written with it).
    Over several processes rank 0 writes the file, its grid and the tracker's image."""

    setup: DistillSetup
    state: DistillState
    tracker: Tracking
    last_saved: int | None = None  # the iteration of the state in the checkpoint file
    due: bool = False

    def save(self, generator_state: torch.Tensor) -> None:
        setup, state = self.setup, self.state
        if setup.ranks.writes:
            save_checkpoint(setup.settings.checkpoint_path, setup, state, generator_state)
            save_grid(setup, state, f"iteration_{state.iteration:06d}.png")
            self.tracker.log_image(state.iteration, "synthetic images", lambda: grid_image(setup, state))
        self.last_saved, self.due = state.iteration, False

    def save_if_due(self, generator_state: torch.Tensor) -> None:
        """In an iteration whose loss passed the guard: save the state it started from, if due."""
        if self.due:
            self.save(generator_state)

    def iteration_done(self) -> None:
        it, s = self.state.iteration, self.setup.settings
        if it == s.iterations:  # no next loss to wait for: saved with the output
            self.save(self.state.generator.get_state())
        elif it % s.checkpoint_every == 0:
            self.due = True


def _iterate(setup: DistillSetup, state: DistillState, checkpoints: CheckpointCadence, limits: guard.Limits) -> dict:
    """Iteration i = state.iteration + 1: match; the guard checks the loss and the gradients
    (and only then may the state of i - 1 be saved); update; the guard checks the new state.
    Returns the iteration's metrics row."""
    s, it = setup.settings, state.iteration + 1
    generator_state = state.generator.get_state()
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
    t0 = time.perf_counter()
    result, info = distill_iteration(setup, state)
    grad_logits = None
    if result.grad_labels is not None:
        grad_logits = label_logit_gradient(state.label_logits, s.label_temperature, result.grad_labels)
    alpha = float(state.alpha.detach())
    breach = guard.check_match(
        result.loss, result.grad_images, result.grad_alpha, alpha, state.images, state.start, limits, state.log
    )
    breach = breach or guard.check_labels(state.label_logits, grad_logits)
    if breach is not None:
        raise _stop(s, it, breach, checkpoints.last_saved)
    checkpoints.save_if_due(generator_state)  # the state of iteration it - 1 passed its loss check
    update(state, s, result, grad_logits)
    breach = guard.check_state(float(state.alpha.detach()), state.images, state.start, limits)
    breach = breach or guard.check_labels(state.label_logits)
    if breach is not None:
        raise _stop(s, it, breach, checkpoints.last_saved)
    state.iteration = it
    return metrics_row(state, info, result, grad_logits, t0, setup.device)


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------
def distill(settings: DistillSettings, tracking: TrackerOptions | None = None) -> SyntheticSet:
    """Run (or resume) a distillation; returns the final :class:`tesla.synthetic.SyntheticSet`.

    The inputs are checked first; then the run holds exclusive locks on ``OUT.lock`` and
    ``CHECKPOINT.lock`` (:func:`tesla.locks.acquire`) until it ends, so a second run on the
    same output or checkpoint is refused with the first one's pid and host. With
    ``--checkpoint-dir`` the checkpoint is ``DIR/checkpoint-<result_key>.pt``, removed (with
    any other ``checkpoint-*.pt`` left there by runs of other settings) once the output is
    written. ``tracking``: the live curves (:func:`open_tracker`; none by default), kept by
    rank 0 alone over several processes."""
    check_settings(settings)  # before any process group is joined or file opened
    ranks = distributed.join(settings.device)
    try:
        setup = open_setup(settings, ranks)
        s = settings
        if s.checkpoint_dir is not None:
            s.checkpoint = str(Path(s.checkpoint_dir) / f"checkpoint-{result_key(setup)}.pt")
        if ranks.distributed and ranks.writes:
            print(f"tesla distill: one run over {ranks.describe()}", file=sys.stderr)
        with distributed.held_by_rank_zero(ranks, lambda: _output_locks(s)):
            return _distill_locked(setup, tracking or TrackerOptions())
    finally:
        distributed.leave(ranks)


@contextlib.contextmanager
def _output_locks(s: DistillSettings):
    """The exclusive locks of a run on ``OUT.lock`` and ``CHECKPOINT.lock`` (held by rank 0 for
    the whole job when it runs over several processes)."""
    with acquire(f"{s.out}.lock", stage="tesla distill", protects=f"--out {s.out}"), acquire(
        f"{s.checkpoint_path}.lock", stage="tesla distill", protects=f"the checkpoint {s.checkpoint_path}"
    ):
        yield


def _restart(s: DistillSettings) -> None:
    """--restart: discard the checkpoint and the grids of an earlier run (under the lock)."""
    ckpt = s.checkpoint_path
    if ckpt.exists():
        ckpt.unlink()
        print(f"tesla distill: --restart: removed {ckpt}; starting from iteration 0", file=sys.stderr)
    if s.grid_dir and Path(s.grid_dir).is_dir():
        for old in Path(s.grid_dir).glob("iteration_*.png"):
            old.unlink()


def _resume_or_start(setup: DistillSetup) -> DistillState:
    """The state to go on from: the checkpoint's (none after --restart), else iteration 0."""
    s = setup.settings
    if s.restart and setup.ranks.writes:
        _restart(s)
    setup.ranks.barrier()  # every rank reads the checkpoint (or none) as rank 0 left it
    return load_checkpoint(s.checkpoint_path, setup) if s.checkpoint_path.exists() else fresh_state(setup)


def _distill_locked(setup: DistillSetup, tracking: TrackerOptions) -> SyntheticSet:
    """The run under its locks: resume or start, iterate up to ``iterations`` (recording each
    iteration, :class:`tesla.distill_outputs.RunRecord`, and saving checkpoints), then write
    the outputs."""
    s, writes = setup.settings, setup.ranks.writes  # over several processes rank 0 writes every file
    state = _resume_or_start(setup)
    if state.iteration > 0 and writes:
        print(f"tesla distill: resuming from {s.checkpoint_path} at iteration {state.iteration}", file=sys.stderr)
    record = RunRecord(setup, state, tracking)
    limits = s.guard_limits()
    checkpoints = CheckpointCadence(setup, state, record.tracker, state.iteration if s.checkpoint_path.exists() else None)
    try:
        while state.iteration < s.iterations:
            row = _iterate(setup, state, checkpoints, limits)
            state.log.append(row)
            record.iteration(row)
            checkpoints.iteration_done()
    finally:
        record.close()
    final = synthetic_set(setup, state)
    if writes:
        record.finish(final)
        print(f"tesla distill: {_headroom(state, limits)}", file=sys.stderr)
    setup.ranks.barrier()  # the job ends once the output is written
    return final


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The options of ``tesla distill``: every declared setting (:mod:`tesla.distill_settings`)
    and the tracking options."""
    add_arguments(parser, DistillSettings)
    add_arguments(parser, TrackerOptions)


def settings_from_args(args: argparse.Namespace) -> DistillSettings:
    return from_args(DistillSettings, args)


def run(args: argparse.Namespace) -> int:
    final = distill(settings_from_args(args), tracking_options(args))
    print(
        f"wrote {args.out}: {final.num_images} images ({final.ipc} per class), alpha {final.lr:.4g}, "
        f"{final.iteration} iterations",
        file=sys.stderr,
    )
    return 0
