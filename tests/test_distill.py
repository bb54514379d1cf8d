"""``tesla distill`` and ``tesla export`` end to end on a tiny split with tiny experts."""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tesla.distill as distill_mod
import tesla.distill_checkpoint as checkpoint_mod
import tesla.distill_setup as setup_mod
from tesla.cli import main
from tesla.data import ImageSplit
from tesla.distill import DistillSettings, distill
from tesla.distill_outputs import METRICS_COLUMNS
from tesla.errors import TeslaError
from tesla.input_space import resolve_normalization
from tesla.export import embedded_zca, export_png, export_torch
from tesla.grids import grid_rows, save_class_grid, to_pixels
from tesla.models import build_model, model_spec
from tesla.parameters import flatten_params, param_layout
from tesla.synthetic import SyntheticSet
from tesla.trajectories import Trajectory, TrajectoryMeta, TrajectoryWriter
from tesla.training import train

from conftest import blob_classes, write_prepared_split

CLASSES, PER_CLASS, RES, CH = 3, 6, 8, 3
EPOCHS = 4


#: tiny tensors: one intra-op thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def make_split(path: Path, seed: int = 0, per_class: int = PER_CLASS) -> ImageSplit:
    return ImageSplit.open(write_prepared_split(path, blob_classes(np.random.default_rng(seed), CLASSES, per_class, RES, CH)))


def make_expert(
    path: Path, split: ImageSplit, seed: int, width: int = 4, epochs: int = EPOCHS, zca_fp: str = "",
    normalization: str = "split",
) -> Path:
    torch.manual_seed(seed)
    spec = model_spec("convnet_d1", channels=CH, num_classes=CLASSES, resolution=RES, width=width)
    model = build_model("convnet_d1", channels=CH, num_classes=CLASSES, resolution=RES, width=width)
    norm = resolve_normalization(normalization, split)
    x, y = split.load_tensors(mean=norm.mean, std=norm.std)
    with TrajectoryWriter(path, layout=param_layout(model)) as w:
        w.append(flatten_params(model))
        stats = train(
            model, x, y, epochs=epochs, lr=0.05, batch_size=8, generator=torch.Generator().manual_seed(seed),
            on_epoch_end=lambda s: w.append(flatten_params(model)),
        )
        w.commit(
            TrajectoryMeta(
                model_spec=spec, dataset=split.dataset, dataset_fingerprint=split.fingerprint, seed=seed, lr=0.05,
                batch_size=8, dsa="color_crop_cutout_flip_scale_rotate", epochs=epochs,
                train_loss=[s.loss for s in stats], train_accuracy=[s.accuracy for s in stats], final_test_accuracy=0.0,
                input_normalization=normalization, input_mean=norm.mean, input_std=norm.std, zca_fingerprint=zca_fp,
            )
        )
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    split = make_split(root / "train.h5")
    experts = [make_expert(root / f"expert_{k}.h5", split, seed=k) for k in range(2)]
    return root, split, experts


def settings(toy, tmp: Path, **kw) -> DistillSettings:
    root, split, experts = toy
    base = dict(
        train=str(root / "train.h5"), experts=[str(e) for e in experts], out=str(tmp / "syn.h5"), ipc=2,
        syn_steps=3, expert_epochs=2, max_start_epoch=2, lr_img=100.0, lr_lr=1e-4, lr_teacher=0.01,
        batch_syn=4, iterations=4, checkpoint_every=2, metrics=str(tmp / "metrics.csv"), grid_dir=str(tmp / "grids"),
        device="cpu", progress=False,
    )
    base.update(kw)
    return DistillSettings(**base)


def read_metrics(path) -> list[dict]:
    with open(path) as f:
        assert f.readline().startswith("# format: tesla-distill-metrics, format_version: 3")
        return list(csv.DictReader(f))


def test_cli_writes_synthetic_set_metrics_grids_and_checkpoint(toy, tmp_path):
    root, split, experts = toy
    out = tmp_path / "syn.h5"
    rc = main([
        "distill", "--train", str(root / "train.h5"), "--experts", *map(str, experts), "--out", str(out),
        "--ipc", "2", "--syn-steps", "3", "--expert-epochs", "2", "--max-start-epoch", "2", "--batch-syn", "4",
        "--iterations", "4", "--checkpoint-every", "2", "--metrics", str(tmp_path / "m.csv"),
        "--grid-dir", str(tmp_path / "grids"), "--device", "cpu", "--no-progress", "--lr-img", "100",
    ])
    assert rc == 0
    syn = SyntheticSet.load(out)
    assert syn.images.shape == (6, CH, RES, RES) and syn.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert syn.iteration == 4 and syn.engine == "exact" and syn.lr > 0 and syn.soft_labels is None
    assert syn.dsa_strategy == "color_crop_cutout_flip_scale_rotate"  # the experts' strategy by default
    assert syn.model_spec["name"] == "convnet_d1" and syn.mean == split.mean and syn.class_ids == split.class_ids
    assert syn.dataset_fingerprint == split.fingerprint and syn.settings["batch_syn"] == 4
    rows = read_metrics(tmp_path / "m.csv")
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == set(METRICS_COLUMNS)
    largest = float(syn.images.double().flatten(1).pow(2).mean(1).sqrt().max())
    assert float(rows[-1]["max_image_rms"]) == pytest.approx(largest, rel=1e-6)
    for r in rows:
        assert math.isfinite(float(r["loss"])) and float(r["loss"]) > 0 and float(r["peak_memory_mb"]) > 0
        assert r["expert"] in {e.name for e in experts} and 0 <= int(r["start_epoch"]) < 2
    assert not (tmp_path / "m.csv.partial").exists()
    assert {p.name for p in (tmp_path / "grids").iterdir()} == {"iteration_000002.png", "iteration_000004.png", "final.png"}
    ckpt = torch.load(f"{out}.ckpt", weights_only=False)
    assert ckpt["iteration"] == 4 and torch.equal(ckpt["images"], syn.images)
    # the images moved away from their real initialisation
    setup = distill_mod.build_setup(settings(toy, tmp_path / "again"))
    assert not torch.allclose(distill_mod.fresh_state(setup).images.detach(), syn.images)


def test_initial_images_are_real_images_of_their_class(toy, tmp_path):
    s = settings(toy, tmp_path)
    setup = distill_mod.build_setup(s)
    state = distill_mod.fresh_state(setup)
    x, _ = toy[1].load_tensors()
    for n in range(6):
        c = int(state.classes[n])
        lo, hi = int(toy[1].class_offsets[c]), int(toy[1].class_offsets[c + 1])
        assert any(torch.equal(state.images[n].detach(), x[i]) for i in range(lo, hi))


def test_other_engines_take_their_own_gradient_step(toy, tmp_path):
    """Two iterations per engine from the same seed (same experts, start epochs, minibatches and
    augmentation draws): `unroll` computes the same true gradient as `exact` by another route, so
    it lands on the same images and alpha (float32 round-off); `tesla` (first-order, N > 1) moves
    the images too, but elsewhere. An engine returning zero or wrong gradients fails here."""
    kw = dict(iterations=2, metrics=None, grid_dir=None)
    start = distill_mod.fresh_state(distill_mod.build_setup(settings(toy, tmp_path / "init"))).images.detach()
    runs = {e: distill(settings(toy, tmp_path / e, engine=e, **kw)) for e in ("exact", "unroll", "tesla")}
    assert {e: r.engine for e, r in runs.items()} == {e: e for e in runs}
    moved = {e: float((r.images - start).abs().max()) for e, r in runs.items()}
    assert min(moved.values()) > 1e-3, moved
    torch.testing.assert_close(runs["unroll"].images, runs["exact"].images, rtol=1e-4, atol=1e-4 * moved["exact"])
    assert runs["unroll"].lr == pytest.approx(runs["exact"].lr, rel=1e-5)
    gap = float((runs["tesla"].images - runs["exact"].images).abs().max())
    assert gap > 1e-3 * moved["exact"], "the first-order step should differ from the exact one for N > 1"


def test_resume_after_kill_is_bitwise_identical(toy, tmp_path, monkeypatch):
    kw = dict(iterations=6, checkpoint_every=2, soft_labels=True)
    whole = distill(settings(toy, tmp_path / "a", **kw))

    real = distill_mod.matching_gradients
    calls = {"n": 0}

    def killed_at_6(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            # the run dies in iteration 6; iteration 5 checked the loss of the state of iteration 4
            # and then saved it
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_mod, "matching_gradients", killed_at_6)
    b = settings(toy, tmp_path / "b", **kw)
    with pytest.raises(KeyboardInterrupt):
        distill(b)
    assert not Path(b.out).exists()
    assert torch.load(b.checkpoint_path, weights_only=False)["iteration"] == 4
    monkeypatch.setattr(distill_mod, "matching_gradients", real)
    resumed = distill(b)
    assert torch.equal(resumed.images, whole.images)
    assert torch.equal(resumed.soft_labels, whole.soft_labels)
    assert resumed.lr == whole.lr and resumed.iteration == 6
    la, lb = read_metrics(tmp_path / "a" / "metrics.csv"), read_metrics(tmp_path / "b" / "metrics.csv")
    assert [r["loss"] for r in la] == [r["loss"] for r in lb] and len(lb) == 6


def _killed_in_iteration(monkeypatch, n: int):
    """Make the n-th call of the engines raise KeyboardInterrupt (a kill in iteration n)."""
    real = distill_mod.matching_gradients
    calls = {"n": 0}

    def killed(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_mod, "matching_gradients", killed)
    return real


def test_checkpoint_dir_names_the_checkpoint_by_the_result_settings_and_the_inputs(toy, tmp_path, monkeypatch):
    """--checkpoint-dir: a killed run resumes only when rerun with the same result settings
    on the same inputs (a limit or the device may change); another step size or another
    expert trajectory starts afresh beside it; success removes every checkpoint there."""
    root, split, experts = toy
    folder = tmp_path / "job"
    kw = dict(iterations=6, checkpoint_every=2, checkpoint=None, checkpoint_dir=str(folder), metrics=None, grid_dir=None)
    real = _killed_in_iteration(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        distill(settings(toy, tmp_path, **kw))
    (first,) = folder.glob("checkpoint-*.pt")
    assert torch.load(first, weights_only=False)["iteration"] == 4
    monkeypatch.setattr(distill_mod, "matching_gradients", real)
    # a step size is a result setting: another name, a fresh start (no foreign state resumed)
    s = settings(toy, tmp_path, **{**kw, "iterations": 1}, lr_img=200.0)
    distill_mod.distill(s)
    assert Path(s.checkpoint).parent == folder and Path(s.checkpoint).name != first.name
    assert not first.exists()  # the finished run removed every checkpoint of its folder
    # the same settings on another expert trajectory: another key; on a copy of the same file: the same
    real = _killed_in_iteration(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        distill(settings(toy, tmp_path, **kw))
    (kept,) = folder.glob("checkpoint-*.pt")
    monkeypatch.setattr(distill_mod, "matching_gradients", real)
    (tmp_path / "copy").mkdir()
    (tmp_path / "retrained").mkdir()
    copy = shutil.copy(experts[0], tmp_path / "copy" / Path(experts[0]).name)
    retrained = make_expert(tmp_path / "retrained" / Path(experts[0]).name, split, seed=7)

    def key(first_expert) -> str:
        s = settings(toy, tmp_path, **kw, experts=[str(first_expert), str(experts[1])])
        return distill_mod.result_key(distill_mod.build_setup(s))

    assert key(experts[0]) == key(copy) == kept.name[len("checkpoint-"):-len(".pt")]
    assert key(retrained) != key(experts[0])
    # a changed limit (not a result setting) keeps the name: the killed run resumes
    resumed = settings(toy, tmp_path, **kw, max_loss=50.0)
    syn = distill(resumed)
    assert Path(resumed.checkpoint).name == kept.name and syn.iteration == 6
    assert not list(folder.glob("checkpoint-*.pt"))
    with pytest.raises(TeslaError, match="give one"):
        distill(settings(toy, tmp_path, checkpoint=str(tmp_path / "c.pt"), checkpoint_dir=str(folder)))


def test_soft_labels_are_the_target_experts_softmax(toy, tmp_path):
    syn = distill(settings(toy, tmp_path, soft_labels=True, iterations=2, grid_dir=None))
    assert syn.soft_labels.shape == (6, CLASSES)
    torch.testing.assert_close(syn.soft_labels.sum(1), torch.ones(6))
    assert syn.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_only_the_two_needed_snapshots_are_read(toy, tmp_path, monkeypatch):
    reads = []
    real = Trajectory.snapshot

    def spy(self, i, device=None):
        reads.append(i)
        return real(self, i, device)

    monkeypatch.setattr(Trajectory, "snapshot", spy)
    distill(settings(toy, tmp_path, iterations=3, metrics=None, grid_dir=None))
    assert len(reads) == 6
    for t, target in zip(reads[::2], reads[1::2]):
        assert target == t + 2 and 0 <= t < 2


def _scaled_alpha_gradient(monkeypatch, factor):
    real = distill_mod.matching_gradients

    def scaled(*args, **kwargs):
        r = real(*args, **kwargs)
        r.grad_alpha = abs(r.grad_alpha) * factor + factor
        return r

    monkeypatch.setattr(distill_mod, "matching_gradients", scaled)


def test_alpha_never_becomes_negative(toy, tmp_path, monkeypatch):
    _scaled_alpha_gradient(monkeypatch, 1e6)  # a step that would drive alpha far below zero
    syn = distill(settings(toy, tmp_path, iterations=3, lr_lr=1.0, min_lr=1e-5, grid_dir=None))
    alphas = [float(r["alpha"]) for r in read_metrics(tmp_path / "metrics.csv")]
    assert all(a == pytest.approx(1e-5, rel=1e-6) for a in alphas)  # clamped at min_lr every time
    assert syn.lr == pytest.approx(1e-5) and syn.lr > 0


def _loss_at(monkeypatch, call: int, value: float) -> None:
    """Make the matching loss of the ``call``-th iteration of this process ``value``."""
    real = distill_mod.matching_gradients
    calls = {"n": 0}

    def patched(*args, **kwargs):
        calls["n"] += 1
        r = real(*args, **kwargs)
        if calls["n"] == call:
            r.loss = value
        return r

    monkeypatch.setattr(distill_mod, "matching_gradients", patched)


def test_non_finite_loss_stops_with_the_iteration_and_the_settings_to_lower(toy, tmp_path, monkeypatch):
    _loss_at(monkeypatch, 3, float("nan"))
    s = settings(toy, tmp_path, iterations=5, checkpoint_every=10)
    with pytest.raises(
        distill_mod.Diverged,
        match=r"iteration 3: the matching loss is not finite.*--lr-teacher \(now 0.01\) or --syn-steps \(now 3\) is too large",
    ) as err:
        distill(s)
    assert "Nothing was checkpointed yet: the next run starts afresh from iteration 0" in str(err.value)
    assert not Path(s.out).exists() and not s.checkpoint_path.exists()  # no state was due for a checkpoint


def test_non_finite_gradient_is_caught(toy, tmp_path, monkeypatch):
    real = distill_mod.matching_gradients

    def inf_grad(*args, **kwargs):
        r = real(*args, **kwargs)
        r.grad_images[0, 0, 0, 0] = float("inf")
        return r

    monkeypatch.setattr(distill_mod, "matching_gradients", inf_grad)
    with pytest.raises(TeslaError, match="iteration 1: the gradient of the matching loss is not finite"):
        distill(settings(toy, tmp_path))


# ---------------------------------------------------------------------------------------
# the divergence guard (issue 16, item 1): each case of the issue, then the rules themselves
# ---------------------------------------------------------------------------------------
def test_alpha_blow_up_is_never_checkpointed_and_a_sane_lr_lr_resumes(toy, tmp_path):
    good = distill(settings(toy, tmp_path, iterations=2, checkpoint_every=1))
    ckpt = settings(toy, tmp_path).checkpoint_path
    with pytest.raises(distill_mod.Diverged) as err:  # --lr-lr 1e6 from iteration 3 on
        distill(settings(toy, tmp_path, iterations=4, checkpoint_every=1, lr_lr=1e6))
    msg = str(err.value)
    assert re.search(r"iteration 3: alpha \(the learned learning rate\) is [0-9.e+]+, .* above its ceiling 1\.", msg), msg
    assert "Most likely cause: --lr-lr (now 1e+06) is too large; lower it (or, if such values are expected here, raise --max-lr, now 1)" in msg
    assert f"the last good state, iteration 2, stays in {ckpt}: the same command with a changed --lr-lr or --max-lr resumes from it" in msg
    saved = torch.load(ckpt, weights_only=False)
    assert saved["iteration"] == 2 and torch.equal(saved["images"], good.images) and float(saved["alpha"]) == good.lr
    # the advice works: a sane --lr-lr resumes from iteration 2 and finishes
    syn = distill(settings(toy, tmp_path, iterations=4, checkpoint_every=1, lr_lr=1e-4))
    assert syn.iteration == 4 and syn.lr < 1


def test_loss_explosion_at_the_start_names_lr_teacher_and_lowering_it_works(toy, tmp_path):
    with pytest.raises(distill_mod.Diverged) as err:
        distill(settings(toy, tmp_path, lr_teacher=100.0))
    msg = str(err.value)
    assert re.search(r"iteration 1: the matching loss [0-9.e+]+ is above its limit 10 ", msg), msg
    assert "alpha 100 (1 x its start)" in msg
    assert "Most likely cause: --lr-teacher (now 100) or --syn-steps (now 3) is too large; lower one of them" in msg
    assert "Nothing was checkpointed yet: the next run starts afresh from iteration 0." in msg
    assert not settings(toy, tmp_path).checkpoint_path.exists() and not Path(settings(toy, tmp_path).out).exists()
    syn = distill(settings(toy, tmp_path, lr_teacher=0.01))  # not refused: no checkpoint of other settings
    assert syn.iteration == 4


def test_images_growing_stop_the_run_although_nothing_diverges(toy, tmp_path):
    # the network is scale invariant (instance norm): the loss stays finite while the images explode
    s = settings(toy, tmp_path, lr_img=1e9)
    with pytest.raises(distill_mod.Diverged) as err:
        distill(s)
    msg = str(err.value)
    assert re.search(r"iteration 1: the largest image RMS is [0-9.e+]+, [0-9.e+]+ x its initial value [0-9.]+, above its limit of 100 x", msg), msg
    assert "Most likely cause: --lr-img (now 1e+09) is too large; lower it (or, if such values are expected here, raise --max-image-growth, now 100)" in msg
    assert not Path(s.out).exists()
    # the same run with the limit raised goes through: the finite loss alone would not have stopped it
    syn = distill(settings(toy, tmp_path, lr_img=1e9, max_image_growth=1e12, iterations=2))
    x0 = distill_mod.fresh_state(distill_mod.build_setup(s)).images.detach()
    assert syn.images.flatten(1).pow(2).mean(1).sqrt().max() > 1e4 * x0.pow(2).mean().sqrt()


@pytest.mark.parametrize("where", ["command line", "workflow"])
def test_advice_names_settings_where_they_were_set(toy, tmp_path, capsys, where):
    root, _, experts = toy
    prefix = ["--config-key-prefix", "datasets.demo.distill.1"] if where == "workflow" else []
    rc = main([
        "distill", "--train", str(root / "train.h5"), "--experts", *map(str, experts), "--out", str(tmp_path / "syn.h5"),
        "--ipc", "2", "--syn-steps", "3", "--max-start-epoch", "2", "--batch-syn", "4", "--iterations", "2",
        "--device", "cpu", "--no-progress", "--lr-lr", "1e6", *prefix,
    ])
    err = capsys.readouterr().err
    assert rc == 2 and "tesla distill: error: iteration 1: alpha" in err
    if where == "workflow":
        assert "Most likely cause: datasets.demo.distill.1.lr_lr (now 1e+06) is too large" in err
        assert "raise datasets.demo.distill.1.max_lr, now 1" in err
        assert "Change the setting in the config and run snakemake again" in err
        assert "--lr-lr" not in err and "--max-lr" not in err
    else:
        assert "Most likely cause: --lr-lr (now 1e+06) is too large" in err and "raise --max-lr, now 1" in err
        assert "datasets." not in err and "snakemake" not in err


def test_a_state_whose_own_loss_explodes_is_never_checkpointed(toy, tmp_path, monkeypatch):
    _loss_at(monkeypatch, 3, 50.0)  # the loss of the state of iteration 2
    s = settings(toy, tmp_path, iterations=5, checkpoint_every=1)
    with pytest.raises(distill_mod.Diverged) as err:
        distill(s)
    msg = str(err.value)
    assert "iteration 3: the matching loss 50 is above its limit 10" in msg
    # alpha and the images are still near their start: the step is too large from the start
    assert "--lr-teacher (now 0.01) or --syn-steps (now 3) is too large" in msg
    assert f"the last good state, iteration 1, stays in {s.checkpoint_path}: the same command with a changed --syn-steps or --max-loss resumes from it" in msg
    assert f"--lr-teacher cannot change on resume (alpha starts from lr_teacher: it only acts at iteration 0); to start over with a new value, run the same command with --restart (it discards {s.checkpoint_path})" in msg
    saved = torch.load(s.checkpoint_path, weights_only=False)
    one = distill(settings(toy, tmp_path / "one", iterations=1))
    assert saved["iteration"] == 1 and torch.equal(saved["images"], one.images)  # not iteration 2
    rows = read_metrics(Path(f"{s.metrics}.partial"))
    assert [int(r["iteration"]) for r in rows] == [1, 2]  # the partial metrics keep what ran


def test_changing_lr_teacher_on_resume_says_how_to_start_over_and_restart_does(toy, tmp_path, capsys):
    distill(settings(toy, tmp_path, iterations=2))
    s = settings(toy, tmp_path, iterations=3, lr_teacher=0.02)
    with pytest.raises(TeslaError) as err:
        distill(s)
    msg = str(err.value)
    assert "lr_teacher: checkpoint 0.01 vs now 0.02" in msg and "lr_teacher is alpha's initial value" in msg
    assert f"run the same command with --restart (it discards {s.checkpoint_path})" in msg
    with pytest.raises(TeslaError, match=f"delete {re.escape(str(s.checkpoint_path))} and run snakemake again"):
        distill(settings(toy, tmp_path, iterations=3, lr_teacher=0.02, config_key_prefix="datasets.demo.distill.2"))
    capsys.readouterr()
    restarted = distill(settings(toy, tmp_path, iterations=3, lr_teacher=0.02, restart=True))
    assert "--restart: removed" in capsys.readouterr().err
    fresh = distill(settings(toy, tmp_path / "fresh", iterations=3, lr_teacher=0.02))
    assert torch.equal(restarted.images, fresh.images) and restarted.lr == fresh.lr
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == ["final.png", "iteration_000002.png", "iteration_000003.png"]


def test_step_size_changes_resume_and_are_reported(toy, tmp_path, capsys):
    distill(settings(toy, tmp_path, iterations=2))
    capsys.readouterr()
    syn = distill(settings(toy, tmp_path, iterations=3, lr_lr=1e-5, lr_img=50.0, max_loss=5.0))
    err = capsys.readouterr().err
    assert "resuming from" in err and "at iteration 2" in err
    assert "with changed settings: lr_img 100 -> 50, lr_lr 0.0001 -> 1e-05, max_loss 10 -> 5" in err
    assert syn.iteration == 3


def _as_version_1(path: Path) -> dict:
    """Rewrite a checkpoint as the version-1 format wrote it (no guard_start, no settings)."""
    payload = torch.load(path, weights_only=False)
    start = payload.pop("guard_start")
    del payload["settings"]
    payload["format_version"] = 1
    torch.save(payload, path)
    return start


def test_version_1_checkpoints_resume_and_a_poisoned_one_is_refused(toy, tmp_path):
    whole = distill(settings(toy, tmp_path / "whole", iterations=4))
    s = settings(toy, tmp_path, iterations=2)
    distill(s)
    start = _as_version_1(s.checkpoint_path)
    x0 = distill_mod.fresh_state(distill_mod.build_setup(s)).images.detach().double()
    assert start["largest_image_rms"] == pytest.approx(float(x0.flatten(1).pow(2).mean(1).sqrt().max()), rel=1e-6)
    resumed = distill(settings(toy, tmp_path, iterations=4))
    assert torch.equal(resumed.images, whole.images) and resumed.lr == whole.lr  # the same run
    # what the old code saved as the "last good state" after --lr-lr 1e6: finite, absurd
    payload = torch.load(s.checkpoint_path, weights_only=False)
    payload["alpha"] = torch.tensor(3256666.0)
    torch.save(payload, s.checkpoint_path)
    _as_version_1(s.checkpoint_path)
    with pytest.raises(TeslaError) as err:
        distill(settings(toy, tmp_path, iterations=6))
    msg = str(err.value)
    assert "holds a state that fails the divergence guard (written by a tesla before version-2 checkpoints" in msg
    assert "alpha (the learned learning rate) is 3.257e+06" in msg and "--restart" in msg
    syn = distill(settings(toy, tmp_path, iterations=2, restart=True))
    assert syn.iteration == 2 and syn.lr < 1


def test_a_limit_lowered_below_the_checkpoint_is_refused_with_both_ways_out(toy, tmp_path):
    first = distill(settings(toy, tmp_path, iterations=2))
    with pytest.raises(TeslaError) as err:
        distill(settings(toy, tmp_path, iterations=3, max_lr=first.lr * 0.99))
    msg = str(err.value)
    assert "fails the divergence guard: alpha" in msg and "version-2" not in msg
    assert "if the value is intended, raise --max-lr" in msg and "--restart" in msg


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(max_lr=0.01), r"--max-lr \(0.01\) must be above --lr-teacher"),
        (dict(max_loss=1.0), "--max-loss must be a finite number above 1"),
        (dict(max_image_growth=float("inf")), "--max-image-growth must be a finite number above 1"),
        (dict(checkpoint="SAME"), "is the --out file"),
        (dict(max_loss=0.5, config_key_prefix="datasets.demo.distill.2"), "datasets.demo.distill.2.max_loss must be a finite"),
    ],
)
def test_bad_guard_settings_are_refused_before_any_work(toy, tmp_path, change, message):
    if change.get("checkpoint") == "SAME":
        change = dict(checkpoint=str(tmp_path / "syn.h5"))
    with pytest.raises(TeslaError, match=message):
        distill(settings(toy, tmp_path, **change))
    assert list(tmp_path.iterdir()) == []


def test_guard_rules_against_an_independent_computation():
    from tesla import guard

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1000, 3, 4, 4, generator=g)
    start = guard.Start.of(0.01, x0)
    per_image = np.sqrt((x0.numpy().astype(np.float64).reshape(1000, -1) ** 2).mean(axis=1))
    assert start.largest_image_rms == pytest.approx(per_image.max(), rel=1e-6)
    limits = guard.Limits(max_lr=1.0, max_image_growth=100.0, max_loss=10.0)
    assert guard.check_state(1.0, x0, start, limits) is None  # the bounds themselves pass
    assert guard.check_state(1.0001, x0, start, limits).rule == "alpha"
    # one image of a thousand blown up 300x: the global RMS grows less than 10x, the largest image's
    # RMS more than 100x its initial value
    x = x0.clone()
    x[17] *= 300
    assert float(x.pow(2).mean().sqrt()) < 10 * float(x0.pow(2).mean().sqrt())
    b = guard.check_state(0.01, x, start, limits)
    assert b.rule == "images" and b.suspects == ("lr_img",) and b.limit == "max_image_growth"
    assert guard.largest_image_rms(x) == pytest.approx(float(x[17].double().pow(2).mean().sqrt()), rel=1e-6)
    assert guard.check_state(0.01, x0 * 1e20, start, limits).rule == "images"  # finite, its float32 norm is not
    x[3, 0, 0, 0] = float("nan")
    assert guard.check_state(0.01, x, start, limits).rule == "finite"
    assert guard.check_state(float("inf"), x0, start, limits).suspects == ("lr_lr",)
    grad = torch.zeros_like(x0)
    assert guard.check_match(10.0, grad, 0.0, 0.01, x0, start, limits) is None
    assert guard.check_match(10.01, grad, 0.0, 0.01, x0, start, limits).limit == "max_loss"
    grad[0, 0, 0, 0] = float("inf")
    assert guard.check_match(1.0, grad, 0.0, 0.01, x0, start, limits).rule == "finite"
    b = guard.check_match(1e12, grad, 0.0, 0.01, x0, start, limits)  # both: the gradient is what failed
    assert b.rule == "finite" and b.limit is None and "gradient of the matching loss is not finite (the loss is 1e+12)" in b.what
    # learned labels: Z and dL/dZ finite, or lr_label is named; nothing to check without them
    logits = torch.zeros(4, 3)
    assert guard.check_labels(None) is None and guard.check_labels(logits, torch.ones(4, 3)) is None
    b = guard.check_labels(logits, torch.full((4, 3), float("nan")))
    assert b.rule == "finite" and b.suspects == ("lr_label",) and "gradient of the learned labels" in b.what
    logits[1, 2] = float("inf")
    assert "learned label logits are not finite" in guard.check_labels(logits).what
    # causes of a loss breach: what grew by DRIFT (2x) or more since the run's last healthy state
    # (loss <= 1), the larger growth first; no healthy state, or no growth: lr_teacher/syn_steps
    rho = 1.5
    healthy = guard.Healthy(7, 0.01, rho)
    assert guard.suspects(0.0199, 1.99 * rho, healthy) == ("lr_teacher", "syn_steps")
    assert guard.suspects(0.02, rho, healthy) == ("lr_lr",)
    assert guard.suspects(0.001, 2 * rho, healthy) == ("lr_img",)  # alpha at its floor is no suspect
    assert guard.suspects(0.05, 3 * rho, healthy) == ("lr_lr", "lr_img")
    assert guard.suspects(0.03, 4 * rho, healthy) == ("lr_img", "lr_lr")
    assert guard.suspects(1.0, 100 * rho, None) == ("lr_teacher", "syn_steps")
    # the last healthy state of a history: row k holds the loss of S_{k-1} and alpha, RMS of S_k
    rows = [dict(iteration=k, loss=loss, alpha=0.01 * k, max_image_rms=float(k)) for k, loss in
            [(1, 0.8), (2, 0.9), (3, 1.5), (4, 3.0)]]
    assert guard.last_healthy(rows, start) == guard.Healthy(1, 0.01, 1.0)  # S_1, judged by row 2
    assert guard.last_healthy(rows[:1], start) == guard.Healthy(0, start.alpha, start.largest_image_rms)
    assert guard.last_healthy(rows[2:], start) is None
    assert guard.last_healthy([], start) is None
    # a resumed history (the checkpoint's rows first) and one without the image RMS
    assert guard.last_healthy([{**r, "iteration": r["iteration"] + 50} for r in rows], start).iteration == 51
    assert guard.last_healthy([{**r, "max_image_rms": ""} for r in rows], start).iteration == 0
    b = guard.check_match(12.0, torch.zeros_like(x0), 0.0, 0.01, x0, start, limits, rows)
    assert b.suspects == ("lr_teacher", "syn_steps") and "since iteration 1, the last state with a loss of at most 1," in b.what
    # a run whose normal loss stays above 1 (published CIFAR runs: 1 to 2): its better half is healthy
    high = [dict(iteration=k, loss=loss, alpha=0.01, max_image_rms=1.0) for k, loss in
            enumerate([1.3, 1.8, 1.4, 1.7, 1.5, 1.9, 1.6, 1.75, 1.85, 1.95], start=1)]
    assert guard.healthy_loss_bound(high) == pytest.approx(1.725) and guard.healthy_loss_bound(high[:9]) == 1.0  # a level needs 10
    assert guard.last_healthy(high, start) == guard.Healthy(6, 0.01, 1.0)  # row 7 (1.6) judged S_6
    assert guard.last_healthy(high[:9], start) is None
    grown = guard.check_match(12.0, torch.zeros_like(x0), 0.01, 0.01, 3 * x0, start, limits, high)
    assert grown.suspects == ("lr_img",), grown.what  # the images tripled since S_6: lr_img


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(ipc=7), "lower --ipc to at most 6"),
        (dict(batch_syn=7), "lower --batch-syn to at most 6"),
        (dict(max_start_epoch=3), "lower --max-start-epoch to at most 2"),
        (dict(expert_epochs=4, max_start_epoch=1), "lower --max-start-epoch"),
        (dict(engine="fast"), "--engine"),
        (dict(lr_img=-1.0), "--lr-img must be"),
        (dict(syn_steps=0), "--syn-steps must be"),
        (dict(dsa="color_blur"), "unknown famil"),
        (dict(experts=[]), "at least one expert"),
        (dict(zca="nonexistent_zca.h5"), "trained without ZCA"),
    ],
)
def test_bad_settings_are_refused_before_any_work(toy, tmp_path, change, message):
    s = settings(toy, tmp_path, **change)
    with pytest.raises(TeslaError, match=message):
        distill(s)
    assert list(tmp_path.iterdir()) == []


def test_experts_of_another_dataset_or_model_are_refused(toy, tmp_path):
    root, split, experts = toy
    other = make_split(tmp_path / "other.h5", seed=5)
    foreign = make_expert(tmp_path / "foreign.h5", other, seed=0, epochs=EPOCHS)
    wide = make_expert(tmp_path / "wide.h5", split, seed=0, width=6)
    with pytest.raises(TeslaError, match="another training split"):
        distill(settings(toy, tmp_path / "o", experts=[str(experts[0]), str(foreign)]))
    with pytest.raises(TeslaError, match="expert trained for"):
        distill(settings(toy, tmp_path / "o", experts=[str(experts[0]), str(wide)]))
    assert not (tmp_path / "o").exists()


def test_checkpoint_of_other_settings_is_refused(toy, tmp_path):
    distill(settings(toy, tmp_path, iterations=2))
    with pytest.raises(TeslaError, match="other settings.*ipc"):
        distill(settings(toy, tmp_path, iterations=3, ipc=3))
    # tunable settings may change: more iterations continue the run
    syn = distill(settings(toy, tmp_path, iterations=3, lr_img=10.0))
    assert syn.iteration == 3


# ---------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------
def test_export_png_and_torch(toy, tmp_path):
    syn = distill(settings(toy, tmp_path, iterations=1, grid_dir=None, metrics=None))
    pngs = export_png(syn, tmp_path / "png")
    assert len(pngs) == 6 and sorted({p.parent.name for p in pngs}) == ["0_c0", "1_c1", "2_c2"]
    pixels = to_pixels(syn.images, syn.mean, syn.std)
    first = np.asarray(Image.open(tmp_path / "png" / "0_c0" / "00000.png"))
    assert first.shape == (RES, RES, CH)
    np.testing.assert_allclose(first / 255.0, pixels[0].permute(1, 2, 0).numpy(), atol=0.5 / 255 + 1e-6)
    export_torch(syn, tmp_path / "syn.pt")
    payload = torch.load(tmp_path / "syn.pt", weights_only=False)
    assert torch.equal(payload["images"], syn.images) and payload["lr"] == syn.lr
    assert payload["labels"].tolist() == syn.labels.tolist() and payload["format"] == "tesla-synthetic-torch"
    assert main(["export", "--synthetic", syn_path(tmp_path), "--torch", str(tmp_path / "cli.pt")]) == 0
    assert main(["export", "--synthetic", syn_path(tmp_path), "--png-dir", str(tmp_path / "cli_png")]) == 0
    assert len(list((tmp_path / "cli_png").rglob("*.png"))) == 6
    assert main(["export", "--synthetic", syn_path(tmp_path), "--png-dir", str(tmp_path / "cli_png")]) == 2


def syn_path(tmp_path) -> str:
    return str(tmp_path / "syn.h5")


def test_to_pixels_inverts_zca_and_normalisation():
    from tesla.zca import fit_zca

    g = torch.Generator().manual_seed(0)
    u = torch.rand(64, 1, 4, 4, generator=g)
    mean, std = [0.3], [0.2]
    x = (u - 0.3) / 0.2
    zca = fit_zca(x, eps=0.1)
    torch.testing.assert_close(to_pixels(zca.apply(x), mean, std, zca), u, atol=1e-4, rtol=0)


def test_grid_has_one_row_per_class_capped(tmp_path):
    assert grid_rows(5, 20) == [0, 1, 2, 3, 4]
    rows = grid_rows(1000, 20)
    assert len(rows) == 20 and rows[0] == 0 and rows[-1] == 999
    images = torch.zeros(2000, 3, 4, 4)
    classes = torch.arange(1000).repeat_interleave(2)
    path = save_class_grid(images, classes, 1000, tmp_path / "g.png", [0.5] * 3, [0.5] * 3, max_rows=20, padding=2)
    w, h = Image.open(path).size
    assert h == 20 * (4 + 2) + 2 and w == 2 * (4 + 2) + 2


def test_zca_experts_need_the_same_zca_file_and_the_set_embeds_it(toy, tmp_path):
    from tesla.experts import zca_fingerprint
    from tesla.zca import fit_zca

    root, split, _ = toy
    x, _ = split.load_tensors()
    zca = fit_zca(x, eps=0.1)
    zca.save(tmp_path / "zca.h5")
    expert = make_expert(tmp_path / "zexpert.h5", split, seed=3, zca_fp=zca_fingerprint(zca))
    s = settings(toy, tmp_path / "run", experts=[str(expert)], iterations=1, metrics=None)
    with pytest.raises(TeslaError, match="ZCA-whitened images; give the same file with --zca"):
        distill(s)
    other = fit_zca(x, eps=0.5)
    other.save(tmp_path / "other_zca.h5")
    with pytest.raises(TeslaError, match="not the ZCA file the experts were trained with"):
        distill(settings(toy, tmp_path / "run", experts=[str(expert)], zca=str(tmp_path / "other_zca.h5")))
    s = settings(toy, tmp_path / "run", experts=[str(expert)], zca=str(tmp_path / "zca.h5"), iterations=1, metrics=None)
    setup = distill_mod.build_setup(s)
    init = distill_mod.fresh_state(setup).images.detach()
    syn = distill(s)
    assert syn.zca_artifact == (tmp_path / "zca.h5").read_bytes()
    loaded = embedded_zca(SyntheticSet.load(s.out))
    torch.testing.assert_close(loaded.invert(init), zca.invert(init), rtol=0, atol=1e-6)
    assert len(export_png(SyntheticSet.load(s.out), tmp_path / "png")) == 6
    assert (tmp_path / "run" / "grids" / "final.png").exists()
    # the initial images are whitened real images: their inverse is a real image of their class
    u = to_pixels(init, split.mean, split.std, zca)
    real = torch.from_numpy(split.images_uint8()).permute(0, 3, 1, 2).float() / 255
    for n in range(len(u)):
        assert float((real - u[n]).abs().flatten(1).max(1).values.min()) < 1e-3


# ---------------------------------------------------------------------------------------
# one run per output (issue 16, item 2)
# ---------------------------------------------------------------------------------------
def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 180.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, f"the first run ended early (status {process.returncode})"
        assert time.monotonic() < deadline, f"{path} did not appear within {seconds} s"
        time.sleep(0.2)


def test_a_second_run_on_the_same_out_is_refused_and_a_killed_one_leaves_no_stale_lock(toy, tmp_path):
    root, _, experts = toy
    s = settings(toy, tmp_path)
    tesla = shutil.which("tesla", path=str(Path(sys.executable).parent))
    first = subprocess.Popen(
        [
            tesla, "distill", "--train", s.train, "--experts", *s.experts, "--out", s.out, "--ipc", "2",
            "--syn-steps", "3", "--max-start-epoch", "2", "--batch-syn", "4", "--lr-img", "100", "--lr-lr", "1e-4",
            "--iterations", "1000000", "--checkpoint-every", "2", "--metrics", s.metrics, "--device", "cpu",
            "--no-progress",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        _wait_for(s.checkpoint_path, first)  # the first run is under way and has saved a state
        with pytest.raises(TeslaError) as err:  # (without a lock it would resume the first run's checkpoint)
            distill(settings(toy, tmp_path, iterations=3))
        msg = str(err.value)
        assert f"--out {s.out} is in use by another 'tesla distill' run: pid {first.pid} on host {socket.gethostname()}" in msg
        assert "command: tesla distill --train" in msg and f"kill {first.pid}" in msg
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert Path(f"{s.out}.lock").exists()  # the file stays after SIGKILL; the lock went with the process
    saved = torch.load(s.checkpoint_path, weights_only=False)
    k = saved["iteration"]
    assert k >= 2 and len(read_metrics(f"{s.metrics}.partial")) >= k
    resumed = distill(settings(toy, tmp_path, iterations=k + 2))
    assert resumed.iteration == k + 2
    rows = read_metrics(s.metrics)
    assert [int(r["iteration"]) for r in rows] == list(range(1, k + 3))
    assert [float(r["loss"]) for r in rows[:k]] == [r["loss"] for r in saved["log"]]  # the first run's rows
    assert not Path(f"{s.out}.lock").exists() and not Path(f"{s.checkpoint_path}.lock").exists()


# ---------------------------------------------------------------------------------------
# the experts' input space, and the lr_img convention
# ---------------------------------------------------------------------------------------
def test_images_live_in_the_experts_input_space(toy, tmp_path):
    root, split, experts = toy
    plain = [make_expert(tmp_path / f"none_{k}.h5", split, seed=k, normalization="none") for k in range(2)]
    s = settings(toy, tmp_path / "run", experts=[str(p) for p in plain], iterations=1, metrics=None)
    init = distill_mod.fresh_state(distill_mod.build_setup(s)).images.detach()
    real = torch.from_numpy(split.images_uint8()).permute(0, 3, 1, 2).float() / 255  # pixels in [0, 1]
    for n in range(len(init)):
        assert float((real - init[n]).abs().flatten(1).max(1).values.min()) < 1e-6
    syn = distill(s)
    assert syn.normalization == "none" and syn.mean == [0.0] * CH and syn.std == [1.0] * CH
    assert SyntheticSet.load(s.out).input_space().key == "none"
    # export maps back with the set's own space: pixels are the images themselves here
    export_torch(syn, tmp_path / "syn.pt")
    payload = torch.load(tmp_path / "syn.pt", weights_only=False)
    assert payload["normalization"] == "none" and payload["input_space"] == "none"
    export_png(syn, tmp_path / "png")
    first = np.asarray(Image.open(tmp_path / "png" / "0_c0" / "00000.png")) / 255.0
    np.testing.assert_allclose(first, syn.images[0].clamp(0, 1).permute(1, 2, 0).numpy(), atol=0.5 / 255 + 1e-6)
    with pytest.raises(TeslaError, match="give experts of one input space"):
        distill(settings(toy, tmp_path / "mixed", experts=[str(experts[0]), str(plain[1])]))
    assert not (tmp_path / "mixed").exists()


def first_order_image_gradient(setup, images, classes, theta_start, theta_target, alpha, steps):
    """dL/dX of TESLA's first-order procedure, computed independently of tesla.matching: the
    student recursion with every theta_i detached, so autograd sees only g_i's explicit
    dependence on X: dL/dX = -alpha v^T sum_i J_i (all images in every step, no augmentation)."""
    from tesla.parameters import functional_forward

    layout = param_layout(setup.model)
    x = images.clone().requires_grad_(True)
    theta, g_sum = theta_start.clone(), torch.zeros_like(theta_start)
    for _ in range(steps):
        leaf = theta.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(functional_forward(setup.model, leaf, x, layout=layout), classes)
        (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
        g_sum = g_sum + g
        theta = theta.detach() - alpha * g.detach()
    theta_n = theta_start - alpha * g_sum
    matching = (theta_n - theta_target).square().sum() / (theta_start - theta_target).square().sum()
    (grad,) = torch.autograd.grad(matching, x)
    return grad


@pytest.mark.parametrize("convention, factor", [("tesla-published", 0.5), ("gradient", 1.0)])
def test_lr_img_convention_scales_the_first_image_step(toy, tmp_path, convention, factor):
    root, split, experts = toy
    s = settings(toy, tmp_path, experts=[str(experts[0])], engine="tesla", lr_img_convention=convention,
                 max_start_epoch=1, expert_epochs=2, syn_steps=3, dsa="none", batch_syn=None, iterations=1,
                 lr_img=50.0, metrics=None, grid_dir=None)
    setup = distill_mod.build_setup(s)
    x0 = distill_mod.fresh_state(setup).images.detach().clone()
    traj = Trajectory.open(experts[0])  # one expert, start epoch 0: the draw is forced
    g = first_order_image_gradient(setup, x0, torch.arange(CLASSES).repeat_interleave(2), traj.snapshot(0),
                                   traj.snapshot(2), s.lr_teacher, s.syn_steps)
    syn = distill(s)
    # the first SGD step with momentum: buffer = gradient, X_1 = X_0 - c lr_img g
    step = syn.images - x0
    torch.testing.assert_close(step, -factor * s.lr_img * g, rtol=1e-3, atol=1e-4 * float(step.abs().max()))
    assert float(step.abs().max()) > 1e-3  # the step is visible, so c is measured, not lost in round-off
    assert syn.settings["lr_img_convention"] == convention
    assert syn.settings["lr_img_effective"] == factor * s.lr_img


def test_lr_img_convention_is_checked_and_may_change_on_resume(toy, tmp_path, capsys):
    with pytest.raises(TeslaError, match="--lr-img-convention 'half'"):
        distill(settings(toy, tmp_path, lr_img_convention="half"))
    distill(settings(toy, tmp_path, iterations=2, metrics=None, grid_dir=None))
    resumed = distill(settings(toy, tmp_path, iterations=3, metrics=None, grid_dir=None,
                               lr_img_convention="tesla-published"))
    assert resumed.iteration == 3
    root, _, experts = toy
    assert main(["distill", "--train", str(root / "train.h5"), "--experts", str(experts[0]), "--out",
                 str(tmp_path / "cli.h5"), "--ipc", "1", "--max-start-epoch", "1", "--iterations", "1",
                 "--syn-steps", "2", "--lr-img-convention", "tesla-published", "--device", "cpu",
                 "--no-progress"]) == 0
    assert SyntheticSet.load(tmp_path / "cli.h5").settings["lr_img_convention"] == "tesla-published"


# ---------------------------------------------------------------------------------------
# --compile (the student-step graphs of tesla.student_steps)
# ---------------------------------------------------------------------------------------
def test_compile_mode_is_resolved_for_the_device_before_any_work(toy, tmp_path):
    from tesla.distill import build_setup

    assert build_setup(settings(toy, tmp_path, compile="auto")).compiler is None  # CPU: eager
    assert build_setup(settings(toy, tmp_path, compile="off")).compiler is None
    assert build_setup(settings(toy, tmp_path, compile="inductor")).compiler.mode == "inductor"
    for mode, message in (("cudagraph", "needs a CUDA device"), ("fast", "--compile 'fast' is not a compile mode")):
        with pytest.raises(TeslaError, match=message):
            distill(settings(toy, tmp_path, compile=mode))
    assert list(tmp_path.iterdir()) == []


def test_a_run_resumes_under_another_compile_mode(toy, tmp_path, monkeypatch):
    """compile may change on resume (RESUME_TUNABLE): graph steps continue an eager run to the
    eager run's numbers within float32 round-off. (The 'inductor' setting is served by the
    traced graphs without the compiler here, to keep the test fast; tests/test_matching.py
    compares inductor itself.)"""
    kw = dict(iterations=4, checkpoint_every=2, soft_labels=True, grid_dir=None)
    whole = distill(settings(toy, tmp_path / "a", compile="off", **kw))
    half = settings(toy, tmp_path / "b", compile="off", **dict(kw, iterations=2))
    distill(half)
    monkeypatch.setattr(setup_mod, "resolve_compile_mode", lambda mode, device: "trace")
    real, modes = distill_mod.matching_gradients, []

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        modes.append(result.compile)
        return result

    monkeypatch.setattr(distill_mod, "matching_gradients", spy)
    rc = main([
        "distill", "--train", half.train, "--experts", *half.experts, "--out", half.out, "--ipc", "2", "--syn-steps", "3",
        "--max-start-epoch", "2", "--lr-img", "100", "--lr-lr", "1e-4", "--batch-syn", "4", "--iterations", "4",
        "--checkpoint-every", "2", "--soft-labels", "--metrics", half.metrics, "--device", "cpu", "--no-progress",
        "--compile", "inductor",
    ])
    assert rc == 0 and modes == ["trace", "trace"]
    resumed = SyntheticSet.load(half.out)
    assert resumed.iteration == 4 and resumed.settings["compile"] == "inductor"
    assert torch.allclose(resumed.images, whole.images, rtol=0, atol=1e-5)
    losses_a = [float(r["loss"]) for r in read_metrics(tmp_path / "a" / "metrics.csv")]
    losses_b = [float(r["loss"]) for r in read_metrics(half.metrics)]
    assert losses_b == pytest.approx(losses_a, rel=1e-5)


# ---------------------------------------------------------------------------------------
# beyond TESLA (issue 17): learned labels, a moving window, real-correct initialisation
# ---------------------------------------------------------------------------------------
def _snapshot_predictions(toy, expert: int, epoch: int) -> torch.Tensor:
    """Independent classification of every training image by an expert snapshot: the nn.Module
    itself with the snapshot's parameters loaded (not the functional forward)."""
    root, split, experts = toy
    traj = Trajectory.open(experts[expert])
    model = build_model("convnet_d1", channels=CH, num_classes=CLASSES, resolution=RES, width=4)
    torch.nn.utils.vector_to_parameters(traj.snapshot(epoch).float(), model.parameters())
    norm = resolve_normalization("split", split)
    x, _ = split.load_tensors(mean=norm.mean, std=norm.std)
    with torch.no_grad():
        return model(x).argmax(1), x


def test_learned_labels_start_from_the_snapshot_logits_move_and_are_saved(toy, tmp_path):
    s = settings(toy, tmp_path, soft_labels="learned", label_temperature=2.0, lr_label=50.0, init_expert=1,
                 init_epoch=3, iterations=3)
    setup = distill_mod.build_setup(s)
    state = distill_mod.fresh_state(setup)
    traj = Trajectory.open(toy[2][1])
    model = build_model("convnet_d1", channels=CH, num_classes=CLASSES, resolution=RES, width=4)
    torch.nn.utils.vector_to_parameters(traj.snapshot(3).float(), model.parameters())
    with torch.no_grad():
        expected = model(state.images.detach())
    torch.testing.assert_close(state.label_logits.detach(), expected, rtol=1e-5, atol=1e-5)
    syn = distill(s)
    assert syn.label_kind == "learned" and syn.label_temperature == 2.0
    torch.testing.assert_close(syn.soft_labels, torch.softmax(syn.label_logits / 2.0, dim=1))
    assert float((syn.label_logits - expected).abs().max()) > 1e-4  # learned: they moved
    rows = read_metrics(tmp_path / "metrics.csv")
    assert all(float(r["grad_norm_labels"]) > 0 for r in rows)
    again = SyntheticSet.load(s.out)
    assert torch.equal(again.label_logits, syn.label_logits) and again.targets is again.soft_labels


def test_learned_labels_take_the_exact_label_gradient_step(toy, tmp_path, monkeypatch):
    """One iteration, momentum buffer empty: Z_1 = Z_0 - lr_label dL/dZ with dL/dZ the chain rule
    of the engine's dL/dY through softmax(Z / T) (autograd here, independently)."""
    seen = {}
    real = distill_mod.matching_gradients

    def spy(*args, **kwargs):
        r = real(*args, **kwargs)
        seen["grad_y"] = r.grad_labels.clone()
        return r

    monkeypatch.setattr(distill_mod, "matching_gradients", spy)
    s = settings(toy, tmp_path, soft_labels="learned", label_temperature=0.5, lr_label=3.0, iterations=1, grid_dir=None)
    z0 = distill_mod.fresh_state(distill_mod.build_setup(s)).label_logits.detach().clone()
    syn = distill(s)
    z = z0.clone().requires_grad_(True)
    (grad_z,) = torch.autograd.grad(torch.softmax(z / 0.5, dim=1), z, seen["grad_y"])
    torch.testing.assert_close(syn.label_logits, z0 - 3.0 * grad_z, rtol=1e-5, atol=1e-6)


def test_soft_labels_flag_forms(toy, tmp_path):
    """The bare flag (and the boolean of earlier versions) means TESLA's labels."""
    from tesla.cli import build_parser

    parser = build_parser("distill")
    base = ["distill", "--train", "t", "--experts", "e", "--out", "o", "--ipc", "1"]
    assert parser.parse_args(base).soft_labels == "none"
    assert parser.parse_args(base + ["--soft-labels"]).soft_labels == "tesla"
    assert parser.parse_args(base + ["--soft-labels", "learned"]).soft_labels == "learned"
    assert settings(toy, tmp_path, soft_labels=True).soft_labels == "tesla"
    assert settings(toy, tmp_path, soft_labels=False).soft_labels == "none"
    with pytest.raises(TeslaError, match="--soft-labels 'maybe'"):
        distill(settings(toy, tmp_path, soft_labels="maybe"))


def test_the_window_grows_on_schedule_and_is_recorded(toy, tmp_path):
    s = settings(toy, tmp_path, min_start_epoch=1, max_start_epoch=2, max_start_epoch_final=3, window_iterations=3,
                 expert_epochs=1, iterations=5, grid_dir=None)
    assert [distill_mod.start_window(s, i) for i in range(6)] == [(1, 2), (1, 2), (1, 2), (1, 3), (1, 3), (1, 3)]
    distill(s)
    rows = read_metrics(tmp_path / "metrics.csv")
    for r in rows:  # recorded, and the start epoch inside it
        lo, hi = int(r["window_min"]), int(r["window_max"])
        assert (lo, hi) == distill_mod.start_window(s, int(r["iteration"])) and lo <= int(r["start_epoch"]) < hi
    # T+(i) = 2 + floor(4 min(i, 4) / 4): 3, 4, 5, 6, 6
    grown = settings(toy, tmp_path, max_start_epoch=2, max_start_epoch_final=6, window_iterations=4)
    assert [distill_mod.start_window(grown, i)[1] for i in range(1, 6)] == [3, 4, 5, 6, 6]


@pytest.mark.parametrize("change, message", [
    (dict(min_start_epoch=2), "--min-start-epoch 2 must be >= 0 and below --max-start-epoch 2"),
    (dict(max_start_epoch_final=3), "go together"),
    (dict(window_iterations=3), "go together"),
    (dict(max_start_epoch_final=1, window_iterations=3), "the window only grows"),
    (dict(max_start_epoch_final=4, window_iterations=3), r"the window's largest upper bound \(--max-start-epoch-final\) 4"),
    (dict(label_temperature=0.0), "--label-temperature"),
    (dict(lr_label=-1.0), "--lr-label"),
    (dict(soft_labels="learned", init_expert=2), "--init-expert 2: there are only 2 --experts"),
    (dict(init="real-correct", init_epoch=5), "--init-epoch 5 .* at most 4"),
])
def test_bad_window_label_and_init_settings_are_refused(toy, tmp_path, change, message):
    with pytest.raises(TeslaError, match=message):
        distill(settings(toy, tmp_path, **change))
    assert not (tmp_path / "syn.h5").exists()


def test_real_correct_images_are_classified_correctly_reproducible_and_differ_from_real(toy, tmp_path):
    """Expert 0 at epoch 1 classifies 2 of class c0's 6 images correctly (and all of c1, c2)."""
    predicted, x = _snapshot_predictions(toy, 0, 1)
    labels = torch.as_tensor(toy[1].labels)
    assert int(((predicted == labels) & (labels == 0)).sum()) == 2  # the premise
    kw = dict(init="real-correct", init_expert=0, init_epoch=1)
    s = settings(toy, tmp_path, **kw)
    first = distill_mod.fresh_state(distill_mod.build_setup(s)).images.detach()
    again = distill_mod.fresh_state(distill_mod.build_setup(s)).images.detach()
    assert torch.equal(first, again)
    for n in range(len(first)):  # each one a real image of its class, classified correctly
        i = [j for j in range(len(x)) if torch.equal(x[j], first[n])]
        assert i and int(labels[i[0]]) == n // 2 and int(predicted[i[0]]) == n // 2
    other = distill_mod.fresh_state(distill_mod.build_setup(settings(toy, tmp_path, seed=1, **kw))).images.detach()
    assert torch.equal(other[:2], first[:2])  # class c0: the only two correct images
    real = [distill_mod.fresh_state(distill_mod.build_setup(settings(toy, tmp_path, seed=k))).images.detach() for k in range(4)]
    assert any(not torch.equal(r[:2], first[:2]) for r in real)


def test_real_correct_names_the_class_without_enough_correct_images(toy, tmp_path):
    with pytest.raises(TeslaError) as err:  # expert 1 at epoch 1 gets no image of c1 right
        distill(settings(toy, tmp_path, init="real-correct", init_expert=1, init_epoch=1))
    msg = str(err.value)
    assert "class c1 has only 0 of its 6 training images classified correctly, fewer than --ipc 2" in msg
    assert "--init-epoch" in msg and "--init real" in msg


def test_resume_with_learned_labels_window_and_real_correct_is_bitwise_identical(toy, tmp_path, monkeypatch):
    kw = dict(iterations=6, checkpoint_every=2, soft_labels="learned", lr_label=20.0, init="real-correct",
              init_epoch=2, max_start_epoch=1, max_start_epoch_final=2, window_iterations=4)
    whole = distill(settings(toy, tmp_path / "a", **kw))
    _killed_in_iteration(monkeypatch, 6)
    b = settings(toy, tmp_path / "b", **kw)
    with pytest.raises(KeyboardInterrupt):
        distill(b)
    ckpt = torch.load(b.checkpoint_path, weights_only=False)
    assert ckpt["iteration"] == 4 and ckpt["format_version"] == 3 and ckpt["label_logits"] is not None
    monkeypatch.undo()
    resumed = distill(b)
    assert torch.equal(resumed.images, whole.images) and torch.equal(resumed.label_logits, whole.label_logits)
    assert resumed.lr == whole.lr
    la, lb = read_metrics(tmp_path / "a" / "metrics.csv"), read_metrics(tmp_path / "b" / "metrics.csv")
    assert [(r["loss"], r["window_max"], r["start_epoch"]) for r in la] == [(r["loss"], r["window_max"], r["start_epoch"]) for r in lb]


def test_version_2_checkpoints_of_boolean_soft_labels_resume(toy, tmp_path):
    whole = distill(settings(toy, tmp_path / "whole", iterations=4, soft_labels="tesla"))
    s = settings(toy, tmp_path, iterations=2, soft_labels="tesla")
    distill(s)
    payload = torch.load(s.checkpoint_path, weights_only=False)
    payload["format_version"] = 2  # as version 2 wrote it
    payload["identity"]["soft_labels"] = True
    for key in checkpoint_mod._ADDED_IN_VERSION_3:
        del payload["identity"][key]
    del payload["label_logits"], payload["opt_labels"]
    torch.save(payload, s.checkpoint_path)
    resumed = distill(settings(toy, tmp_path, iterations=4, soft_labels=True))
    assert torch.equal(resumed.images, whole.images) and torch.equal(resumed.soft_labels, whole.soft_labels)


def test_non_finite_label_logits_stop_the_run_naming_lr_label(toy, tmp_path, monkeypatch):
    real = distill_mod.matching_gradients

    def inf_labels(*args, **kwargs):
        r = real(*args, **kwargs)
        r.grad_labels[0, 0] = float("inf")
        return r

    monkeypatch.setattr(distill_mod, "matching_gradients", inf_labels)
    with pytest.raises(TeslaError, match="iteration 1: the gradient of the learned labels is not finite. Most likely cause: --lr-label"):
        distill(settings(toy, tmp_path, soft_labels="learned"))


def test_report_reads_metrics_of_every_version_and_draws_the_window(toy, tmp_path):
    from tesla.report import plot_curves, read_metrics as report_metrics

    s = settings(toy, tmp_path, max_start_epoch=1, max_start_epoch_final=2, window_iterations=2, iterations=3, grid_dir=None)
    distill(s)
    m = report_metrics(s.metrics)
    assert m["window_max"].tolist() == [1.0, 2.0, 2.0] and m["loss"].shape == (3,)
    assert plot_curves(m, tmp_path / "curves.png").stat().st_size > 0
    old = tmp_path / "v2.csv"  # a version-2 file: no window columns
    lines = Path(s.metrics).read_text().splitlines()
    header = lines[1].split(",")
    keep = [i for i, c in enumerate(header) if c not in ("window_min", "window_max", "grad_norm_labels")]
    old.write_text("\n".join(["# format: tesla-distill-metrics, format_version: 2"]
                             + [",".join(row.split(",")[i] for i in keep) for row in lines[1:]]) + "\n")
    m2 = report_metrics(old)
    assert "window_max" not in m2 and m2["loss"].tolist() == m["loss"].tolist()
    assert plot_curves(m2, tmp_path / "curves2.png").stat().st_size > 0
