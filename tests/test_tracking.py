"""Live curves (``--tracker``, tesla.tracking): what TensorBoard and Weights & Biases receive
equals what the stages write (read back with TensorBoard's own event reader and from W&B's
own run file, offline: no network), a killed and resumed job gives one curve without
duplicate steps, and a tracker that fails at run time changes nothing of the job's outputs.

The extras are part of the ``test`` extra (pyproject.toml); without one, its tests skip
naming it. Time budget: about a minute on 2 cores (W&B starts a service process per run).
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tesla.distill as distill_mod
import tesla.tracking as tracking_mod
from tesla.cli import main
from tesla.distill import distill
from tesla.distill_outputs import METRICS_COLUMNS
from tesla.experts import ExpertConfig, train_experts
from tesla.synthetic import SyntheticSet
from tesla.tracking import TrackerOptions

from test_distill import _killed_in_iteration, make_split, read_metrics, settings, toy  # noqa: F401 (toy: a fixture)
from test_experts import write_split

pytestmark = pytest.mark.usefixtures("one_thread")

needs_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None,
    reason="the TensorBoard tracker's package is not installed: pip install -e '.[tensorboard]'",
)
needs_wandb = pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None, reason="the W&B tracker's package is not installed: pip install -e '.[wandb]'"
)
#: the metrics columns the tracker gets as numbers (the expert as its index; the rest as written)
NUMBER_COLUMNS = [c for c in METRICS_COLUMNS if c != "expert"]


@pytest.fixture(autouse=True)
def wandb_offline(tmp_path, monkeypatch):
    """W&B never reaches the network, and keeps its settings and caches in the test's folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))


# --------------------------------------------------------------------------------------
# reading back what the trackers hold, with their own readers
# --------------------------------------------------------------------------------------
def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them (its reader: purged events left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_images(folder: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}


def wandb_records(path: Path):
    """The records of a W&B run file (``run-<id>.wandb``: a header, then records in 32 KiB
    blocks, each a W&B protobuf ``Record``; W&B's own message classes parse them)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, payloads = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            payloads.append(payload)
        elif kind in (2, 3):  # first, middle
            pending = (b"" if kind == 2 else pending) + payload
        elif kind == 4:  # last
            payloads.append(pending + payload)
    for payload in payloads:
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def wandb_runs(folder: Path) -> list[Path]:
    """The run files of the offline runs under ``folder``/wandb, oldest first."""
    return sorted((folder / "wandb").glob("offline-run-*/run-*.wandb"))


def wandb_history(path: Path) -> list[dict]:
    rows = []
    for r in wandb_records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


def wandb_config(path: Path) -> dict:
    config = {}
    for r in wandb_records(path):
        if r.WhichOneof("record_type") == "config":
            config.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.config.update})
    return config


def run_id_of(path: Path) -> str:
    return next(r.run.run_id for r in wandb_records(path) if r.WhichOneof("record_type") == "run")


def expert_index(toy, row: dict) -> int:
    return [e.name for e in toy[2]].index(row["expert"])


# --------------------------------------------------------------------------------------
# distillation
# --------------------------------------------------------------------------------------
@needs_tensorboard
def test_tensorboard_scalars_equal_metrics_csv(toy, tmp_path):
    s = settings(toy, tmp_path, iterations=4, soft_labels="learned")
    distill(s, TrackerOptions(tracker="tensorboard"))
    rows = read_metrics(s.metrics)
    scalars = tensorboard_scalars(tmp_path / "tensorboard")  # the default: beside the output
    for column in NUMBER_COLUMNS:
        assert scalars[column] == [(int(r["iteration"]), float(np.float32(r[column]))) for r in rows], column
    assert scalars["expert"] == [(int(r["iteration"]), float(expert_index(toy, r))) for r in rows]
    # the guard's state and the learned labels' entropy (at most log K, K = 3 classes)
    assert [step for step, _ in scalars["image_growth"]] == [1, 2, 3, 4]
    assert all(0 < v <= np.log(3) + 1e-6 for _, v in scalars["label_entropy"])
    assert tensorboard_images(tmp_path / "tensorboard") == {"synthetic images": [2, 4]}  # at every checkpoint


@needs_wandb
def test_wandb_offline_run_folder_holds_the_same_history(toy, tmp_path):
    s = settings(toy, tmp_path, iterations=4)
    distill(s, TrackerOptions(tracker="wandb", tracker_dir=str(tmp_path), tracker_group="toy_ipc2",
                              tracker_mode="offline"))
    rows = read_metrics(s.metrics)
    [run] = wandb_runs(tmp_path)
    history = [h for h in wandb_history(run) if "loss" in h]
    assert [h["iteration"] for h in history] == [1, 2, 3, 4]
    for h, r in zip(history, rows):
        assert {c: h[c] for c in NUMBER_COLUMNS if r[c] != ""} == {c: float(r[c]) for c in NUMBER_COLUMNS if r[c] != ""}
        assert h["expert"] == expert_index(toy, r)
    images = [h for h in wandb_history(run) if "synthetic images" in h or "synthetic images/_type" in h]
    assert [h["iteration"] for h in images] == [2, 4]
    config = wandb_config(run)
    assert config["settings"]["lr_img"] == s.lr_img and config["inputs"]["train"] == toy[1].fingerprint
    assert config["result_key"] == distill_mod.result_key(distill_mod.build_setup(s))
    assert next(r.run.run_group for r in wandb_records(run) if r.WhichOneof("record_type") == "run") == "toy_ipc2"


@pytest.mark.parametrize("kind", [pytest.param("tensorboard", marks=needs_tensorboard), pytest.param("wandb", marks=needs_wandb)])
def test_kill_and_resume_gives_one_run_without_duplicate_steps(toy, tmp_path, monkeypatch, kind):
    """Killed in iteration 6 (iterations 1..5 tracked, the checkpoint of 4 saved), then resumed:
    one curve 1..7, each step once, equal to the metrics of the finished run."""
    s = settings(toy, tmp_path, iterations=7, checkpoint_every=2)
    options = TrackerOptions(tracker=kind, tracker_dir=str(tmp_path / "tracker"))
    real = _killed_in_iteration(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        distill(s, options)
    assert torch.load(s.checkpoint_path, weights_only=False)["iteration"] == 4
    monkeypatch.setattr(distill_mod, "matching_gradients", real)
    distill(s, options)
    rows = read_metrics(s.metrics)
    if kind == "tensorboard":
        losses = tensorboard_scalars(tmp_path / "tracker")["loss"]
        assert losses == [(int(r["iteration"]), float(np.float32(r["loss"]))) for r in rows]
        return
    runs = wandb_runs(tmp_path / "tracker")
    assert len(runs) == 2 and len({run_id_of(r) for r in runs}) == 1  # one W&B run, resumed
    history = [h for run in runs for h in wandb_history(run)]
    steps = [h["_step"] for h in history]
    assert steps == sorted(set(steps))  # W&B's step only grows across the resume
    curve = [(h["iteration"], h["loss"]) for h in history if "loss" in h]
    assert curve == [(int(r["iteration"]), float(r["loss"])) for r in rows]  # bitwise: the resume is


class FailingWriter:
    """A TensorBoard writer whose second scalar fails (a full disk, a lost mount)."""

    calls = 0

    def __init__(self, *args, **kwargs) -> None:
        pass

    def add_scalar(self, *args, **kwargs) -> None:
        FailingWriter.calls += 1
        if FailingWriter.calls == 2:
            raise OSError(28, "No space left on device")

    def add_text(self, *args, **kwargs) -> None:
        pass

    add_image = add_text
    flush = add_text
    close = add_text


@needs_tensorboard
def test_a_tracker_failing_at_run_time_warns_once_and_changes_no_output(toy, tmp_path, monkeypatch, capsys):
    plain = settings(toy, tmp_path / "plain", iterations=4, soft_labels="learned")
    distill(plain)
    monkeypatch.setattr("torch.utils.tensorboard.SummaryWriter", FailingWriter)
    tracked = settings(toy, tmp_path / "tracked", iterations=4, soft_labels="learned")
    capsys.readouterr()
    distill(tracked, TrackerOptions(tracker="tensorboard"))
    err = capsys.readouterr().err
    assert err.count("tracking is off") == 1 and "No space left on device" in err
    a, b = SyntheticSet.load(plain.out), SyntheticSet.load(tracked.out)
    assert torch.equal(a.images, b.images) and torch.equal(a.label_logits, b.label_logits) and a.lr == b.lr
    timing = ("seconds", "peak_memory_mb")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(read_metrics(plain.metrics)) == strip(read_metrics(tracked.metrics))
    for name in ("iteration_000002.png", "iteration_000004.png", "final.png"):
        assert (Path(plain.grid_dir) / name).read_bytes() == (Path(tracked.grid_dir) / name).read_bytes()


@needs_wandb
def test_a_tracker_that_cannot_start_warns_and_the_job_goes_on(toy, tmp_path, monkeypatch, capsys):
    import wandb

    def unreachable(**kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", unreachable)
    s = settings(toy, tmp_path, iterations=2)
    distill(s, TrackerOptions(tracker="wandb", tracker_dir=str(tmp_path), tracker_mode="online"))
    assert "could not start" in capsys.readouterr().err and Path(s.out).exists()


@pytest.mark.parametrize("kind, extra", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_tracker_whose_extra_is_missing_is_refused_before_any_work(toy, tmp_path, monkeypatch, capsys, kind, extra):
    real = importlib.util.find_spec
    monkeypatch.setattr(tracking_mod.importlib.util, "find_spec", lambda name, *a: None if name == kind else real(name, *a))
    root, _, experts = toy
    rc = main(["distill", "--train", str(root / "train.h5"), "--experts", *map(str, experts), "--out",
               str(tmp_path / "syn.h5"), "--ipc", "1", "--device", "cpu", "--tracker", kind])
    err = capsys.readouterr().err
    assert rc == 2 and f"pip install -e '.[{extra}]'" in err and "--tracker" in err, err
    assert list(tmp_path.iterdir()) == []
    problem = tracking_mod.config_problem({"tracker": kind})
    assert problem.startswith("config key tracking.tracker") and f".[{extra}]" in problem


# --------------------------------------------------------------------------------------
# experts and evaluation
# --------------------------------------------------------------------------------------
@needs_tensorboard
def test_experts_track_loss_and_accuracy_per_epoch_and_resume_without_duplicates(tmp_path):
    train = write_split(tmp_path / "train.h5", 8)
    test = write_split(tmp_path / "test.h5", 4, seed=1, split="test")
    cfgs = [ExpertConfig(train=train, test=test, out=tmp_path / f"expert_{k}.h5", seed=k, model="convnet_d1", epochs=3,
                         lr=0.05, batch_size=16) for k in (0, 1)]
    options = TrackerOptions(tracker="tensorboard")
    train_experts(cfgs, stop_after_epochs=2, progress=False, log=lambda m: None, tracking=options)  # killed
    train_experts(cfgs, progress=False, log=lambda m: None, tracking=options)  # resumed
    from tesla.trajectories import Trajectory

    for cfg in cfgs:
        scalars = tensorboard_scalars(tmp_path / "tensorboard" / f"expert_{cfg.seed}")
        with Trajectory.open(cfg.out) as t:
            losses, accuracy = list(t.train_loss), float(t.attrs["final_test_accuracy"])
        assert scalars["loss"] == [(e + 1, float(np.float32(v))) for e, v in enumerate(losses)]
        assert scalars["test_accuracy"] == [(3, float(np.float32(accuracy)))]


@needs_tensorboard
def test_evaluation_tracks_each_run_and_the_table(toy, tmp_path):
    s = settings(toy, tmp_path, iterations=2)
    distill(s)
    test = make_split(tmp_path / "test.h5", seed=1)
    out = tmp_path / "eval" / "exact_convnet.csv"
    assert main(["evaluate", "--synthetic", s.out, "--test", str(test.path), "--arch", "distill", "--runs", "2",
                 "--epochs", "2", "--device", "cpu", "--out", str(out), "--tracker", "tensorboard"]) == 0
    with open(out) as f:
        f.readline()
        runs = list(csv.DictReader(f))
    scalars = tensorboard_scalars(tmp_path / "eval" / "tensorboard" / "exact_convnet")
    assert scalars["test_acc"] == [(int(r["run"]) + 1, float(np.float32(r["test_acc"]))) for r in runs]
    summary = tensorboard_scalars(tmp_path / "eval" / "tensorboard" / "exact_convnet" / "summary")
    mean = np.mean([float(r["test_acc"]) for r in runs])
    assert summary["test_acc_mean"] == [(2, pytest.approx(mean, rel=1e-6))]


# --------------------------------------------------------------------------------------
# the workflow's options
# --------------------------------------------------------------------------------------
def test_workflow_options_place_events_per_job_and_group_wandb_runs_per_target():
    block = {"tracker": "tensorboard", "tensorboard": {"dir": None}}
    assert tracking_mod.workflow_options(block, "distill", "results/demo_ipc1/exact/synthetic.h5") == ["--tracker tensorboard"]
    block["tensorboard"]["dir"] = "tb"
    assert tracking_mod.workflow_options(block, "evaluate", "results/demo_ipc1/eval/exact_convnet.csv") == [
        "--tracker tensorboard", "--tracker-dir tb/demo_ipc1/eval/exact_convnet"]
    wb = {"tracker": "wandb", "wandb": {"project": "p", "entity": None, "group": None, "mode": "offline", "dir": "results"}}
    assert tracking_mod.workflow_options(wb, "experts", "results/demo/experts/split/expert_0.h5") == [
        "--tracker wandb", "--tracker-dir results", "--tracker-project p", "--tracker-group demo_experts",
        "--tracker-mode offline"]
    assert "--tracker-group demo_ipc3" in tracking_mod.workflow_options(wb, "distill", "results/demo_ipc3/exact/synthetic.h5")
    assert tracking_mod.workflow_options({"tracker": "none"}, "distill", "results/x_ipc1/exact/synthetic.h5") == []
