"""Live curves: an optional experiment tracker (TensorBoard or Weights & Biases) for the
stages that train (``tesla experts``, ``tesla distill``, ``tesla evaluate``).

A stage writes its results and its own tables (metrics.csv, the per-run CSV) as always; with
``--tracker`` it also hands the same numbers, as they are made, to a tracker: scalars at a
step (the distillation iteration, the expert epoch, the evaluation run), images (the class
grid of the synthetic images), tables (the evaluation runs) and the run's configuration.

**Tracking never changes a result.** The tracker only reads what the stage computed: it
draws no random numbers and writes nothing the stage reads. Every call into the tracker's
package is guarded (:class:`Tracking`): the first exception (network down, quota, a full
disk, a bug of the package) is reported once on stderr and tracking is off for the rest of
the job, which goes on. Only a tracker whose package is not installed is an error, raised
before any work (:func:`check_available`), naming the pip extra that installs it.

**Series and steps.** Each call names a *series* (``""`` for the stage's main curve, or e.g.
``expert_3`` for one expert of a group) and its step. TensorBoard gets one event folder per
series (``DIR`` and ``DIR/<series>``), so experts overlay in one chart; Weights & Biases gets
one run per job, the series as a key prefix, each series plotted against its own step
(``iteration``, ``epoch`` or ``run``).

**Resumed jobs continue their tracker run.** A stage that resumes (distillation from its
checkpoint, an expert from its partial state) calls :meth:`Tracking.start` with the step it
resumes from. The last step logged of each series is kept beside the tracker's files
(``tesla-tracker-<run id>.json``, written after the backend has flushed), so steps logged
before a kill are not logged again (no duplicate steps; TensorBoard's writer also purges
anything after them, its ``purge_step``); a fresh start (step 0) starts the series over.
The W&B run id is a digest of the stage and what identifies the job's result (output paths,
settings, input fingerprints): a resumed job continues its run (``resume="allow"``), a job
with other settings gets another run.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from tesla.errors import TeslaError
from tesla.settings import command_options, from_args as settings_from_args
from tesla.tracking_settings import NO_TRACKER, TRACKERS, TrackerOptions, TrackingBlock, WandbBlock

STATE_FORMAT = "tesla-tracker-state"
STATE_VERSION = 1


class Tracker(Protocol):
    """What a tracking backend does; every method may raise (:class:`Tracking` guards them)."""

    def start(self, series: str, purge_from: int) -> None: ...
    def log_scalars(self, step: int, values: Mapping[str, float], series: str = "") -> None: ...
    def log_image(self, step: int, name: str, image: np.ndarray, series: str = "") -> None: ...
    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None: ...
    def log_config(self, config: Mapping[str, Any]) -> None: ...
    def flush(self) -> None: ...
    def state(self) -> dict: ...
    def close(self) -> None: ...


# --------------------------------------------------------------------------------------
# availability and options
# --------------------------------------------------------------------------------------
def missing_package(kind: str) -> str | None:
    """None when tracker ``kind`` can be used here, else what to install (one line)."""
    if kind not in TRACKERS:
        return f"unknown tracker {kind!r} (choose {', '.join(TRACKERS)})"
    module, extra = TRACKERS[kind]
    if importlib.util.find_spec(module) is None:
        return (f"the {kind} tracker needs the optional extra '{extra}', which is not installed: "
                f"pip install -e '.[{extra}]' (or pip install {module}) in this environment")
    return None


def check_available(kind: str | None) -> None:
    """Raise :class:`TeslaError` before any work when tracker ``kind`` cannot run here."""
    if kind is not None:
        problem = missing_package(kind)
        if problem:
            raise TeslaError(f"--tracker {kind}: {problem}; or drop --tracker")


def from_args(args: argparse.Namespace) -> TrackerOptions:
    """The tracker options of a parsed command line (its parser has the options of
    :class:`TrackerOptions`), checked (the package is installed)."""
    options = settings_from_args(TrackerOptions, args)
    check_available(options.tracker)
    return options


def run_id(stage: str, identity: Any) -> str:
    """A run id (16 lowercase hex digits) from the stage and what identifies its result."""
    text = json.dumps({"stage": stage, "identity": identity}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (an input's fingerprint in a tracker's configuration)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def numeric(values: Mapping[str, Any]) -> dict[str, float]:
    """The entries of a table row that are numbers (empty cells and names left out)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (bool, int, float, np.integer, np.floating))}


# --------------------------------------------------------------------------------------
# the guard around a backend, and the resume bookkeeping
# --------------------------------------------------------------------------------------
def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Tracking:
    """A backend behind a guard: the first exception is reported once (``warn``) and every
    later call does nothing; steps at or below a series' last logged step are skipped."""

    backend: Tracker | None
    state_path: Path | None = None
    warn: Callable[[str], None] = _warn
    label: str = "tracker"
    last: dict[str, int] = field(default_factory=dict)
    started: set[str] = field(default_factory=set)

    @property
    def active(self) -> bool:
        return self.backend is not None

    def _call(self, what: str, fn: Callable[[Tracker], Any]) -> None:
        if self.backend is None:
            return
        try:
            fn(self.backend)
        except Exception as exc:  # a tracker never stops the job
            self.warn(f"{self.label}: {what} failed ({type(exc).__name__}: {exc}); tracking is off for the rest of "
                      "this job, which goes on (its results do not depend on tracking)")
            backend, self.backend = self.backend, None
            try:
                backend.close()
            except Exception:
                pass

    def start(self, start_step: int = 0, series: str = "") -> None:
        """A series begins at ``start_step``: 0 = fresh (the series starts over), > 0 =
        resumed (steps up to the last one logged before, at least ``start_step``, are not
        logged again)."""
        self.last[series] = max(self.last.get(series, 0), start_step) if start_step > 0 else 0
        self.started.add(series)
        self._call("starting", lambda b: b.start(series, self.last.get(series, 0) + 1))

    def _begin(self, series: str) -> None:
        if series not in self.started:  # not started by the stage: continue after its last step
            self.start(self.last.get(series, 0), series)

    def log_scalars(self, step: int, values: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
                    series: str = "") -> None:
        """The numbers among ``values`` (a metrics row: names and empty cells are left out);
        ``values`` may be a function that makes them (called only while tracking is on)."""
        if self.backend is None or step <= self.last.get(series, 0):
            return
        self._begin(series)
        self._call("logging scalars", lambda b: (
            b.log_scalars(step, numeric(values() if callable(values) else values), series), b.flush()))
        if self.backend is not None:
            self.last[series] = step
            self._save_state()

    def log_image(self, step: int, name: str, image: np.ndarray | Callable[[], np.ndarray], series: str = "") -> None:
        """An H x W (x C) uint8 picture; ``image`` may be a function that makes it (called
        only while tracking is on)."""
        if self.backend is not None:
            self._begin(series)
            self._call(f"logging image {name}",
                       lambda b: b.log_image(step, name, image() if callable(image) else image, series))
            self._save_state()

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self._call(f"logging table {name}", lambda b: b.log_table(name, list(columns), [list(r) for r in rows]))
        self._save_state()

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._call("logging the configuration", lambda b: b.log_config(config))

    def close(self) -> None:
        self._call("closing", lambda b: b.close())
        self.backend = None

    def _save_state(self) -> None:
        def write(backend: Tracker) -> None:
            payload = {"format": STATE_FORMAT, "format_version": STATE_VERSION, "last_step": self.last,
                       "backend": backend.state()}
            tmp = self.state_path.with_name(f".{self.state_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(payload, sort_keys=True))
            os.replace(tmp, self.state_path)

        if self.state_path is not None:
            self._call("saving its state", write)


def read_state(path: Path) -> tuple[dict[str, int], dict]:
    """(last step per series, backend state) from a tracker state file ({} when absent or unreadable)."""
    try:
        payload = json.loads(path.read_text())
        return {str(k): int(v) for k, v in payload["last_step"].items()}, dict(payload.get("backend", {}))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}, {}


def disabled() -> Tracking:
    """Tracking that does nothing (no --tracker)."""
    return Tracking(backend=None)


def open_tracking(
    options: TrackerOptions,
    *,
    stage: str,
    identity: Any,
    default_dir: str | os.PathLike,
    step_name: str,
    name: str,
    config: Mapping[str, Any] | None = None,
    start: int | None = None,
) -> Tracking:
    """The job's tracking: none without ``options.tracker``; otherwise the backend, opened behind
    the guard (a backend that fails to open warns once and the job goes on untracked).

    ``identity`` decides the W&B run id (:func:`run_id`); ``default_dir`` is TensorBoard's event
    folder unless ``--tracker-dir`` names one; ``step_name`` names the steps (``iteration``,
    ``epoch``, ``run``); ``name`` is the run's display name unless ``--tracker-name`` gives one;
    ``start``: the step the main series starts from (:meth:`Tracking.start`), if the job has one.
    """
    if options.tracker is None:
        return disabled()
    check_available(options.tracker)
    rid = run_id(stage, identity)
    tracking = Tracking(backend=None, label=f"tesla {stage}: {options.tracker} tracker")
    try:
        if options.tracker == "tensorboard":
            root = Path(options.tracker_dir) if options.tracker_dir else Path(default_dir)
        else:
            root = Path(options.tracker_dir or ".") / "wandb"
        root.mkdir(parents=True, exist_ok=True)
        state_path = root / f"tesla-tracker-{rid}.json"
        tracking.last, backend_state = read_state(state_path)
        if options.tracker == "tensorboard":
            backend: Tracker = TensorBoardTracker(root)
        else:
            backend = WandbTracker(options, rid, stage, options.tracker_name or name, step_name, backend_state)
    except Exception as exc:
        tracking.warn(f"{tracking.label}: could not start ({type(exc).__name__}: {exc}); the job goes on without "
                      "tracking (its results do not depend on it)")
        return tracking
    tracking.backend, tracking.state_path = backend, state_path
    if start is not None:
        tracking.start(start)
    if config is not None:
        tracking.log_config(config)
    return tracking


# --------------------------------------------------------------------------------------
# backends (their packages are imported here, only when asked for)
# --------------------------------------------------------------------------------------
class TensorBoardTracker:
    """Event files for TensorBoard: one folder per series (``root``, ``root/<series>``)."""

    def __init__(self, root: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer_class = SummaryWriter
        self.root = root
        self.writers: dict[str, Any] = {}

    def start(self, series: str, purge_from: int) -> None:
        """A new event file whose ``purge_step`` hides every event of an earlier file from
        step ``purge_from`` on (a fresh run: all of them; a resumed one: those after its last step)."""
        if series in self.writers:
            self.writers.pop(series).close()
        folder = self.root / series if series else self.root
        self.writers[series] = self._writer_class(str(folder), purge_step=purge_from)

    def _writer(self, series: str):
        if series not in self.writers:
            self.start(series, 1)
        return self.writers[series]

    def log_scalars(self, step: int, values: Mapping[str, float], series: str = "") -> None:
        writer = self._writer(series)
        for key, value in values.items():
            writer.add_scalar(key, value, step)

    def log_image(self, step: int, name: str, image: np.ndarray, series: str = "") -> None:
        self._writer(series).add_image(name, image, step, dataformats="HWC" if image.ndim == 3 else "HW")

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self._writer("").add_text(name, markdown_table(columns, rows), 0)

    def log_config(self, config: Mapping[str, Any]) -> None:
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        self._writer("").add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)

    def flush(self) -> None:
        for writer in self.writers.values():
            writer.flush()

    def state(self) -> dict:
        return {}

    def close(self) -> None:
        writers, self.writers = self.writers, {}
        for writer in writers.values():
            writer.close()


class WandbTracker:
    """One W&B run per job: id from the job's identity, ``resume="allow"``; each series is a
    key prefix plotted against its own step; W&B's own step counts the calls and is kept
    across a resume (``state()``), so it only grows."""

    def __init__(self, options: TrackerOptions, rid: str, stage: str, name: str, step_name: str, state: dict) -> None:
        import wandb

        self._wandb = wandb
        self.step_name = step_name
        self.calls = int(state.get("calls", 0))
        self.defined: set[str] = set()
        self.run = wandb.init(
            project=options.tracker_project, entity=options.tracker_entity, group=options.tracker_group,
            job_type=stage, name=name, id=rid, resume="allow", mode=options.tracker_mode,
            dir=options.tracker_dir or ".",
            settings=wandb.Settings(console="off", silent=True, disable_git=True, save_code=False),
        )

    def _key(self, series: str, key: str) -> str:
        return f"{series}/{key}" if series else key

    def start(self, series: str, purge_from: int) -> None:
        if series not in self.defined:
            step_key = self._key(series, self.step_name)
            self.run.define_metric(step_key)
            self.run.define_metric(self._key(series, "*"), step_metric=step_key)
            self.defined.add(series)

    def _log(self, step: int, values: Mapping[str, Any], series: str) -> None:
        self.calls += 1
        payload = {self._key(series, k): v for k, v in values.items()}
        self.run.log({**payload, self._key(series, self.step_name): step}, step=self.calls)

    def log_scalars(self, step: int, values: Mapping[str, float], series: str = "") -> None:
        self._log(step, values, series)

    def log_image(self, step: int, name: str, image: np.ndarray, series: str = "") -> None:
        self._log(step, {name: self._wandb.Image(image)}, series)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.calls += 1
        self.run.log({name: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])}, step=self.calls)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(json.loads(json.dumps(dict(config), default=str)), allow_val_change=True)

    def flush(self) -> None:
        pass  # the W&B service process writes the run file itself

    def state(self) -> dict:
        return {"calls": self.calls}

    def close(self) -> None:
        self.run.finish()


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A table as Markdown (TensorBoard's text panel renders it)."""
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# the workflow's `tracking:` block -> a job's options
# --------------------------------------------------------------------------------------
def _tracker(block: Mapping[str, Any]) -> str | None:
    """The tracker of the config's ``tracking`` block (None: none)."""
    kind = block.get("tracker", TrackingBlock.tracker)
    return None if kind in (None, NO_TRACKER) else kind


def config_problem(block: Mapping[str, Any]) -> str | None:
    """None when the config's ``tracking`` block can run here, else the problem (the key, the
    extra to install, the pip command)."""
    kind = _tracker(block)
    problem = None if kind is None else missing_package(kind)
    return f"config key tracking.tracker: {kind}: {problem}; or set tracking.tracker: {NO_TRACKER}" if problem else None


#: the order in which the workflow writes the options (earlier workflows' order)
_WORKFLOW_ORDER = ("tracker", "tracker_dir", "tracker_project", "tracker_group", "tracker_mode", "tracker_entity")


def workflow_options(block: Mapping[str, Any], stage: str, out: str | os.PathLike) -> list[str]:
    """The ``--tracker*`` options of a workflow job from the config's ``tracking`` block
    (:class:`tesla.tracking_settings.TrackingBlock`), written from their declaration
    (:class:`TrackerOptions`).

    ``out`` is the job's (first) output, ``results/<target>/...``: TensorBoard's events go
    beside it (the stage's default) or, with ``tensorboard.dir`` D, to D/<its folder under
    results/> (evaluation: D/<folder>/<file name>); the W&B group is ``wandb.group`` or the
    target folder (``<dataset>_ipc<N>``; experts: ``<dataset>_experts``), so all jobs of one
    target show together. An empty or null W&B key takes its default."""
    kind = _tracker(block)
    if kind is None:
        return []
    out = Path(out)
    parts = out.parts[1:] if out.parts and out.parts[0] == "results" else out.parts
    values: dict[str, Any] = {"tracker": kind}
    if kind == "tensorboard":
        tb_dir = (block.get("tensorboard") or {}).get("dir")
        if tb_dir:
            folder = Path(tb_dir).joinpath(*parts[:-1])
            values["tracker_dir"] = folder / out.stem if stage == "evaluate" else folder
    else:
        wb = block.get("wandb") or {}
        target = parts[0] if parts else TrackerOptions.tracker_project  # no target folder: the project's name
        values.update(
            tracker_dir=wb.get("dir") or WandbBlock.dir, tracker_project=wb.get("project") or WandbBlock.project,
            tracker_group=wb.get("group") or (f"{target}_experts" if stage == "experts" else target),
            tracker_mode=wb.get("mode") or WandbBlock.mode, tracker_entity=wb.get("entity") or None,
        )
    return command_options(TrackerOptions, {}, result=False, order=_WORKFLOW_ORDER, given=values)
