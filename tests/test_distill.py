"""``tesla distill`` and ``tesla export`` end to end on a tiny split with tiny experts."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tesla.distill as distill_mod
from tesla.cli import main
from tesla.data import ImageSplit, SplitWriter
from tesla.distill import DistillSettings, distill
from tesla.errors import TeslaError
from tesla.export import embedded_zca, export_png, export_torch, grid_rows, save_class_grid, to_pixels
from tesla.models import build_model, flatten_params, model_spec, param_layout
from tesla.synthetic import SyntheticSet
from tesla.trajectories import Trajectory, TrajectoryMeta, TrajectoryWriter
from tesla.training import train

CLASSES, PER_CLASS, RES, CH = 3, 6, 8, 3
EPOCHS = 4


#: tiny tensors: one intra-op thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def make_split(path: Path, seed: int = 0, per_class: int = PER_CLASS) -> ImageSplit:
    rng = np.random.default_rng(seed)
    with SplitWriter(
        path, dataset="toy", split="train", class_ids=[f"c{i}" for i in range(CLASSES)],
        height=RES, width=RES, channels=CH, source="test",
    ) as w:
        for c in range(CLASSES):
            base = rng.integers(0, 256, size=(1, RES, RES, CH))
            noise = rng.integers(-40, 40, size=(per_class, RES, RES, CH))
            w.append(np.clip(base + noise, 0, 255).astype(np.uint8), [c] * per_class)
    return ImageSplit.open(path)


def make_expert(
    path: Path, split: ImageSplit, seed: int, width: int = 4, epochs: int = EPOCHS, zca_fp: str = ""
) -> Path:
    torch.manual_seed(seed)
    spec = model_spec("convnet_d1", channels=CH, num_classes=CLASSES, resolution=RES, width=width)
    model = build_model("convnet_d1", channels=CH, num_classes=CLASSES, resolution=RES, width=width)
    x, y = split.load_tensors()
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
                input_mean=split.mean, input_std=split.std, zca_fingerprint=zca_fp,
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
        assert f.readline().startswith("# format: tesla-distill-metrics, format_version: 1")
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
    assert set(rows[0]) == set(distill_mod.METRICS_COLUMNS)
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


@pytest.mark.parametrize("engine", ["tesla", "unroll"])
def test_other_engines_run(toy, tmp_path, engine):
    syn = distill(settings(toy, tmp_path, engine=engine, iterations=2, metrics=None, grid_dir=None))
    assert syn.engine == engine and bool(torch.isfinite(syn.images).all())


def test_resume_after_kill_is_bitwise_identical(toy, tmp_path, monkeypatch):
    kw = dict(iterations=6, checkpoint_every=2, soft_labels=True)
    whole = distill(settings(toy, tmp_path / "a", **kw))

    real = distill_mod.matching_gradients
    calls = {"n": 0}

    def killed_at_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # the run dies in iteration 5, after the checkpoint of iteration 4
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_mod, "matching_gradients", killed_at_5)
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


def test_non_finite_loss_stops_with_the_iteration_and_the_settings_to_lower(toy, tmp_path, monkeypatch):
    real = distill_mod.matching_gradients
    calls = {"n": 0}

    def nan_at_3(*args, **kwargs):
        calls["n"] += 1
        r = real(*args, **kwargs)
        if calls["n"] == 3:
            r.loss = float("nan")
        return r

    monkeypatch.setattr(distill_mod, "matching_gradients", nan_at_3)
    s = settings(toy, tmp_path, iterations=5, checkpoint_every=10)
    with pytest.raises(TeslaError, match=r"iteration 3: the matching loss is not finite.*--lr-img.*--lr-lr.*--syn-steps"):
        distill(s)
    assert not Path(s.out).exists()
    ckpt = torch.load(s.checkpoint_path, weights_only=False)
    assert ckpt["iteration"] == 2 and bool(torch.isfinite(ckpt["images"]).all())


def test_non_finite_gradient_is_caught(toy, tmp_path, monkeypatch):
    real = distill_mod.matching_gradients

    def inf_grad(*args, **kwargs):
        r = real(*args, **kwargs)
        r.grad_images[0, 0, 0, 0] = float("inf")
        return r

    monkeypatch.setattr(distill_mod, "matching_gradients", inf_grad)
    with pytest.raises(TeslaError, match="iteration 1: the gradient is not finite"):
        distill(settings(toy, tmp_path))


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
    monkeypatch.setattr(distill_mod, "resolve_compile_mode", lambda mode, device: "trace")
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
