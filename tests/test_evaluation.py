"""``tesla evaluate``: the protocol, the set's own settings, the test split's isolation, errors.

Time budget of this file: under 2 minutes on 2 CPU cores (measured 45 s to 100 s wall, about 50 s of CPU,
on the shared development machine; the MNIST test is most of it).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import tesla.training
from tesla import cli
from tesla.data import ImageSplit
from tesla.evaluation import (
    PAPER_DSA_STRATEGY,
    Protocol,
    evaluate,
    full_subject,
    random_subject,
    synthetic_subject,
    train_runs,
)
from tesla.models import build_from_spec, model_spec
from tesla.parameters import flatten_params
from tesla.synthetic import FORMAT_VERSION, SyntheticSet
from tesla.tables import RUN_COLUMNS, RUNS_FORMAT

from conftest import patch_training, require_dataset, write_prepared_split

K, R, C = 3, 8, 1  # tiny dataset: classes, resolution, channels


# -- tiny data -------------------------------------------------------------------------------
def write_split(path: Path, split: str, per_class: int, seed: int, *, k: int = K, r: int = R, c: int = C,
                dataset: str = "demo") -> Path:
    """Class c: noise around a class-specific brightness pattern, so a network can learn it."""
    g = np.random.default_rng(seed)
    images = []
    for label in range(k):
        pattern = np.zeros((r, r, c))
        pattern[:, label * r // k : (label + 1) * r // k, :] = 160
        images.append(np.clip(pattern + 40 + g.normal(0, 25, (per_class, r, r, c)), 0, 255).astype(np.uint8))
    return write_prepared_split(path, images, split=split, dataset=dataset)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return {
        "train": write_split(d / "train.h5", "train", 12, 0),
        "test": write_split(d / "test.h5", "test", 10, 1),
        "dir": d,
    }


def make_set(tiny, path: Path, *, soft: torch.Tensor | None = None, lr: float = 0.05, dsa: str = "none",
             engine: str = "exact", ipc: int = 2) -> Path:
    """A synthetic set file: real training images in network space (2 per class), ConvNet-1 width 8."""
    split = ImageSplit.open(tiny["train"])
    idx = np.concatenate([split.class_offsets[c] + np.arange(ipc) for c in range(K)])
    x, y = split.load_tensors("cpu")
    spec = model_spec("convnet_d1", channels=C, num_classes=K, resolution=R, width=8)
    s = SyntheticSet(
        images=x[idx], labels=y[idx], soft_labels=soft, lr=lr, dataset="demo", num_classes=K,
        class_ids=split.class_ids, class_names=split.class_names, mean=split.mean, std=split.std,
        dsa_strategy=dsa, model_spec=spec, ipc=ipc, engine=engine,
    )
    return s.save(path)


class TrainSpy:
    """Wraps training.train_alone (one network's training, alone or in a sequential group):
    records its data, recipe, augmentation and numerics, and the order of events."""

    def __init__(self, monkeypatch, events: list | None = None):
        self.calls: list[dict] = []
        self.events = events if events is not None else []
        real = tesla.training.train_alone

        def spy(member, recipe, dsa, input_transform, numerics, **kw):
            self.calls.append({"x": member.x, "y": member.y, **dataclasses.asdict(recipe), "dsa": dsa,
                               "numerics": numerics})
            self.events.append("train-start")
            out = real(member, recipe, dsa, input_transform, numerics, **kw)
            self.events.append("train-end")
            return out

        patch_training(monkeypatch, tesla.evaluation, "train_alone", spy)


# -- the set's own settings are used ----------------------------------------------------------
def test_learned_lr_protocol_and_dsa_come_from_the_file(tiny, monkeypatch):
    path = make_set(tiny, tiny["dir"] / "lr.h5", lr=0.0123, dsa="flip_crop")
    spy = TrainSpy(monkeypatch)
    subject = synthetic_subject(path, "cpu")
    protocol = Protocol(epochs=4, lr=subject.lr, dsa_strategy=subject.dsa_strategy)
    results = evaluate(subject, "distill", tiny["test"], protocol, runs=2, seed=3, progress=False)
    assert len(spy.calls) == 2
    for call in spy.calls:
        assert call["lr"] == pytest.approx(0.0123)
        assert call["momentum"] == 0.9 and call["weight_decay"] == 5e-4 and call["batch_size"] == 256
        assert tuple(call["lr_decay_epochs"]) == (2,)  # one x0.1 decay at half
        assert call["dsa"].families == ("flip", "crop")
        assert call["y"].dtype == torch.int64
    assert [r.lr for r in results] == [pytest.approx(0.0123)] * 2
    assert [r.seed for r in results] == [3, 4] and [r.run for r in results] == [0, 1]
    assert {r.method for r in results} == {"tesla"} and {r.engine for r in results} == {"exact"}
    assert results[0].arch == "convnet_d1(width=8)"
    assert all(0.0 <= r.test_acc <= 100.0 and np.isfinite(r.final_train_loss) for r in results)


def test_learned_lr_drives_training(tiny):
    """lr ~ 0 leaves theta_0 in place; the file's lr moves it; same seed => same network."""
    moved = {}
    for lr in (1e-12, 0.05):
        subject = synthetic_subject(make_set(tiny, tiny["dir"] / f"lr{lr}.h5", lr=lr), "cpu")
        spec = subject.model_spec
        protocol = Protocol(epochs=3, lr=subject.lr, dsa_strategy=subject.dsa_strategy)
        trained = train_runs(subject, spec, protocol, runs=1, seed=0, device="cpu", progress=False)[0]
        with torch.random.fork_rng():
            torch.manual_seed(trained.seed)
            theta0 = flatten_params(build_from_spec(spec))
        moved[lr] = float((flatten_params(trained.model) - theta0).norm() / theta0.norm())
    assert moved[1e-12] < 1e-6
    assert moved[0.05] > 1e-3


def test_soft_labels_are_used(tiny, monkeypatch):
    n = K * 2
    hard = torch.arange(K).repeat_interleave(2)
    one_hot = torch.nn.functional.one_hot(hard, K).float()
    g = torch.Generator().manual_seed(0)
    soft = torch.softmax(3 * one_hot + torch.randn(n, K, generator=g), dim=1)
    spy = TrainSpy(monkeypatch)
    thetas = {}
    for name, labels in (("hard", None), ("one_hot", one_hot), ("soft", soft)):
        subject = synthetic_subject(make_set(tiny, tiny["dir"] / f"{name}.h5", soft=labels), "cpu")
        protocol = Protocol(epochs=3, lr=subject.lr, dsa_strategy=subject.dsa_strategy)
        trained = train_runs(subject, subject.model_spec, protocol, runs=1, seed=0, device="cpu", progress=False)
        thetas[name] = flatten_params(trained[0].model)
    assert spy.calls[2]["y"].dtype == torch.float32 and torch.allclose(spy.calls[2]["y"], soft)
    # one-hot soft labels are the hard-label problem (soft-target CE = CE): same network
    assert torch.allclose(thetas["hard"], thetas["one_hot"], atol=1e-5)
    # genuinely soft labels train a different network
    assert (thetas["soft"] - thetas["hard"]).abs().max() > 1e-3


def test_test_split_is_mapped_to_the_sets_network_space(tiny, tmp_path, monkeypatch):
    """Test images get the set's mean/std and the set's embedded ZCA; --zca whitens a random draw."""
    from tesla.data import normalize
    from tesla.zca import ZCA
    from tesla.zca_fit import fit_zca_split

    train = ImageSplit.open(tiny["train"])
    test = ImageSplit.open(tiny["test"])
    zca_path = fit_zca_split(tiny["train"], progress=False).save(tmp_path / "zca.h5")
    zca = ZCA.load(zca_path)
    syn = make_set(tiny, tmp_path / "zca_set.h5")
    with h5py.File(syn, "a") as f:  # embed the artifact as 'tesla distill' does
        f.create_dataset("zca_artifact", data=np.frombuffer(zca_path.read_bytes(), dtype=np.uint8))
        f.attrs["zca"] = True
    seen = []
    real_accuracy = tesla.training.accuracy
    patch_training(monkeypatch, tesla.evaluation, "accuracy", lambda m, x, y, **kw: seen.append(x.clone()) or real_accuracy(m, x, y))
    subject = synthetic_subject(syn, "cpu")
    assert subject.space.zca is not None
    results = evaluate(subject, "distill", tiny["test"], Protocol(epochs=1, lr=subject.lr, dsa_strategy="none"),
                       runs=1, progress=False)
    expected = zca.apply(normalize(test.images_uint8(), train.mean, train.std))
    assert torch.allclose(seen[0], expected, atol=1e-4)
    assert not torch.allclose(seen[0], normalize(test.images_uint8(), test.mean, test.std), atol=1e-2)
    assert results[0].zca
    # the random baseline with --zca: draws are whitened the same way
    spy = TrainSpy(monkeypatch)
    rnd = random_subject(tiny["train"], 2, "cpu", dsa_strategy="none", zca_path=zca_path)
    evaluate(rnd, model_spec("convnet_d1", channels=C, num_classes=K, resolution=R, width=8), tiny["test"],
             Protocol(epochs=1, lr=0.01, dsa_strategy="none"), runs=1, progress=False)
    x = spy.calls[0]["x"]
    x_all = zca.apply(normalize(train.images_uint8(), train.mean, train.std))
    assert all(any(torch.allclose(x[i], x_all[j], atol=1e-4) for j in range(len(x_all))) for i in range(len(x)))


# -- the test split is touched only for the final measurement ---------------------------------
def test_test_split_is_read_only_after_all_training(tiny, monkeypatch):
    events: list[str] = []
    TrainSpy(monkeypatch, events)
    test_path = Path(tiny["test"]).resolve()
    real_open, real_load = ImageSplit.open.__func__, ImageSplit.load_tensors

    def spy_open(cls, path):
        if Path(path).resolve() == test_path:
            events.append("test-open")
        return real_open(cls, path)

    def spy_load(self, *a, **kw):
        if Path(self.path).resolve() == test_path:
            events.append("test-load")
        return real_load(self, *a, **kw)

    monkeypatch.setattr(ImageSplit, "open", classmethod(spy_open))
    monkeypatch.setattr(ImageSplit, "load_tensors", spy_load)
    for subject in (
        synthetic_subject(make_set(tiny, tiny["dir"] / "iso.h5"), "cpu"),
        random_subject(tiny["train"], 2, "cpu", dsa_strategy="none"),
    ):
        events.clear()
        protocol = Protocol(epochs=2, lr=subject.lr, dsa_strategy=subject.dsa_strategy)
        arch = "distill" if subject.method == "tesla" else model_spec("convnet_d1", channels=C, num_classes=K, resolution=R, width=8)
        results = evaluate(subject, arch, tiny["test"], protocol, runs=3, seed=0, progress=False)
        assert len(results) == 3
        first_test = min(events.index("test-open"), events.index("test-load"))
        assert events[:first_test] == ["train-start", "train-end"] * 3, events
        assert events[first_test:] == ["test-open", "test-load"], events  # loaded once, after every run


# -- the random and full baselines -----------------------------------------------------------
def test_random_baseline_draws_per_run_and_is_reproducible(tiny, monkeypatch):
    spy = TrainSpy(monkeypatch)
    subject = random_subject(tiny["train"], 2, "cpu", lr=0.01, dsa_strategy="none")
    spec = model_spec("convnet_d1", channels=C, num_classes=K, resolution=R, width=8)
    protocol = Protocol(epochs=2, lr=subject.lr, dsa_strategy="none")
    a = evaluate(subject, spec, tiny["test"], protocol, runs=2, seed=5, progress=False)
    b = evaluate(subject, spec, tiny["test"], protocol, runs=2, seed=5, progress=False)
    x0, x1 = spy.calls[0]["x"], spy.calls[1]["x"]
    assert x0.shape == (K * 2, C, R, R) and not torch.equal(x0, x1)  # a new draw per run
    assert torch.equal(spy.calls[0]["y"], torch.arange(K).repeat_interleave(2))
    assert torch.equal(spy.calls[0]["x"], spy.calls[2]["x"])  # same seed, same draw
    assert [r.test_acc for r in a] == [r.test_acc for r in b]
    assert all(r.method == "random" and r.engine == "" and r.lr == 0.01 and r.ipc == 2 for r in a)
    # the draw is in the training split's network space: (u/255 - mean)/std
    split = ImageSplit.open(tiny["train"])
    x_all, _ = split.load_tensors("cpu")
    assert any(torch.allclose(x0[0], x_all[i]) for i in range(len(x_all)))


@pytest.fixture(scope="module")
def mnist(tmp_path_factory, datasets_dir):
    """MNIST from the shared idx files: the whole train split, a 500-per-class train subset
    (the 'full' network's small budget) and 300 test images per class."""
    root = require_dataset(datasets_dir, "mnist")
    d = tmp_path_factory.mktemp("mnist")

    def idx(name: str) -> np.ndarray:
        with gzip.open(root / name, "rb") as f:
            data = f.read()
        ndim = data[3]
        dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)

    def write(path: Path, split: str, images: np.ndarray, labels: np.ndarray, per_class: int | None) -> Path:
        order = np.argsort(labels, kind="stable")
        if per_class is not None:
            order = np.concatenate([order[labels[order] == c][:per_class] for c in range(10)])
        classes = [images[order][labels[order] == c][..., None] for c in range(10)]
        return write_prepared_split(path, classes, split=split, dataset="mnist", class_ids=[str(c) for c in range(10)],
                                    source="idx")

    train_x, train_y = idx("train-images-idx3-ubyte.gz"), idx("train-labels-idx1-ubyte.gz")
    test_x, test_y = idx("t10k-images-idx3-ubyte.gz"), idx("t10k-labels-idx1-ubyte.gz")
    return {
        "train": write(d / "train.h5", "train", train_x, train_y, None),
        "subset": write(d / "subset.h5", "train", train_x, train_y, 500),
        "test": write(d / "test.h5", "test", test_x, test_y, 300),
    }


@pytest.mark.slow
def test_mnist_random_baseline_is_sane_and_full_data_beats_it(mnist):
    """Short protocol (ConvNet-3 of width 16): random IPC 10 lands in a sane range, and one
    epoch on 5,000 real images (the 'full' network on a small budget: lr 0.05, no DSA) beats it."""
    spec = model_spec("convnet", channels=1, num_classes=10, resolution=28, width=16)
    rnd = random_subject(mnist["train"], 10, "cpu", lr=0.01)
    random_runs = evaluate(rnd, spec, mnist["test"], Protocol(epochs=30, lr=0.01), runs=2, seed=0, progress=False)
    full = full_subject(mnist["subset"], "cpu", lr=0.05, dsa_strategy="none")
    full_runs = evaluate(full, spec, mnist["test"], Protocol(epochs=1, lr=0.05, dsa_strategy="none"), runs=1, seed=0,
                         progress=False)
    random_acc = np.mean([r.test_acc for r in random_runs])
    full_acc = full_runs[0].test_acc
    print(f"MNIST random IPC 10: {[round(r.test_acc, 2) for r in random_runs]}; full (1 epoch, 5000 images): {full_acc:.2f}")
    assert 50.0 <= random_acc <= 90.0
    assert full_acc > random_acc + 3.0
    assert full_runs[0].ipc == 0 and full_runs[0].num_images == 5000


# -- the command line, output file and bad input ----------------------------------------------
def read_runs_csv(path: Path) -> list[dict]:
    with open(path) as f:
        first = f.readline()
        assert first.startswith(f"# format: {RUNS_FORMAT}, format_version: 4")
        return list(csv.DictReader(f))


def test_cli_synthetic_and_random(tiny, tmp_path):
    syn = make_set(tiny, tmp_path / "syn.h5", engine="tesla", lr=0.02, dsa=PAPER_DSA_STRATEGY)
    out = tmp_path / "runs" / "runs_tesla.csv"
    rc = cli.main(["evaluate", "--synthetic", str(syn), "--test", str(tiny["test"]), "--arch", "distill",
                   "--runs", "2", "--epochs", "2", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    rows = read_runs_csv(out)
    assert len(rows) == 2 and list(rows[0]) == list(RUN_COLUMNS)
    assert {r["method"] for r in rows} == {"tesla"} and {r["engine"] for r in rows} == {"tesla"}
    assert {float(r["lr"]) for r in rows} == {0.02} and {r["epochs"] for r in rows} == {"2"}
    assert {r["dsa"] for r in rows} == {PAPER_DSA_STRATEGY} and {r["labels"] for r in rows} == {"hard"}
    assert all(0 <= float(r["test_acc"]) <= 100 for r in rows)
    # v4: the distillation iteration of the set (make_set's), no selection among kept sets
    assert {r["iteration"] for r in rows} == {str(SyntheticSet.load(syn).iteration)} and {r["selection"] for r in rows} == {""}
    out2 = tmp_path / "runs_random.csv"
    rc = cli.main(["evaluate", "--random", "--train", str(tiny["train"]), "--ipc", "3", "--test", str(tiny["test"]),
                   "--arch", "convnet_d1", "--runs", "1", "--epochs", "1", "--device", "cpu", "--out", str(out2)])
    rows = read_runs_csv(out2)
    assert rc == 0 and rows[0]["method"] == "random" and rows[0]["engine"] == "" and rows[0]["arch"] == "convnet_d1"
    assert rows[0]["ipc"] == "3" and float(rows[0]["lr"]) == 0.01 and rows[0]["num_images"] == str(3 * K)
    out3 = tmp_path / "runs_full.csv"
    rc = cli.main(["evaluate", "--full", "--train", str(tiny["train"]), "--test", str(tiny["test"]), "--arch", "convnet_d1",
                   "--runs", "1", "--epochs", "1", "--lr-random", "0.02", "--device", "cpu", "--out", str(out3)])
    rows = read_runs_csv(out3)
    assert rc == 0 and rows[0]["method"] == "full" and rows[0]["ipc"] == "" and rows[0]["num_images"] == str(12 * K)
    assert float(rows[0]["lr"]) == 0.02
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def _bad(tiny, tmp_path, capsys, argv: list[str], match: str, monkeypatch) -> None:
    spy = TrainSpy(monkeypatch)
    out = tmp_path / "bad.csv"
    rc = cli.main(["evaluate", *argv, "--epochs", "1", "--runs", "1", "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert match in err, err
    assert spy.calls == []  # refused before any training
    assert not out.exists()


def test_bad_input_is_refused_before_training(tiny, tmp_path, capsys, monkeypatch):
    syn = make_set(tiny, tmp_path / "syn.h5")
    test = str(tiny["test"])
    # a synthetic file of another format version
    old = make_set(tiny, tmp_path / "old.h5")
    with h5py.File(old, "a") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    _bad(tiny, tmp_path, capsys, ["--synthetic", str(old), "--test", test, "--arch", "distill"], "format version", monkeypatch)
    # test splits of another dataset: class count, channels, resolution, class ids
    # (each refusal names its own reason: one shared phrase would let a wrong reason pass)
    other = {
        f"4 classes but synthetic set {syn} has 3": write_split(tmp_path / "k4.h5", "test", 4, 2, k=4),
        f"3 channels but synthetic set {syn} has 1": write_split(tmp_path / "c3.h5", "test", 4, 2, c=3),
        f"12x12 images but synthetic set {syn} is 8x8": write_split(tmp_path / "r12.h5", "test", 4, 2, r=12),
        f"dataset 'other' but synthetic set {syn} is 'demo'": write_split(tmp_path / "ds.h5", "test", 4, 2,
                                                                          dataset="other"),
    }
    for reason, path in other.items():
        _bad(tiny, tmp_path, capsys, ["--synthetic", str(syn), "--test", str(path), "--arch", "distill"],
             f"{path}: this test split does not match synthetic set {syn}", monkeypatch)
        _bad(tiny, tmp_path, capsys, ["--synthetic", str(syn), "--test", str(path), "--arch", "distill"],
             reason, monkeypatch)
    # architectures that cannot take 8 px images, or do not exist
    _bad(tiny, tmp_path, capsys, ["--synthetic", str(syn), "--test", test, "--arch", "convnet_d5"],
         "cannot take 8x8", monkeypatch)
    _bad(tiny, tmp_path, capsys, ["--synthetic", str(syn), "--test", test, "--arch", "nope"], "unknown architecture",
         monkeypatch)
    _bad(tiny, tmp_path, capsys, ["--random", "--train", str(tiny["train"]), "--ipc", "2", "--test", test,
                                  "--arch", "distill"], "no distillation network", monkeypatch)
    _bad(tiny, tmp_path, capsys, ["--random", "--train", str(tiny["train"]), "--ipc", "50", "--test", test,
                                  "--arch", "convnet_d1"], "lower --ipc", monkeypatch)
    _bad(tiny, tmp_path, capsys, ["--synthetic", str(syn), "--ipc", "2", "--test", test, "--arch", "distill"],
         "applies to --random only", monkeypatch)
    _bad(tiny, tmp_path, capsys, ["--random", "--train", str(tiny["train"]), "--ipc", "2", "--test", test,
                                  "--arch", "convnet_d1", "--dsa", "blur"], "unknown famil", monkeypatch)
    _bad(tiny, tmp_path, capsys, ["--random", "--train", str(tiny["train"]), "--ipc", "2", "--test", test,
                                  "--arch", "convnet_d1", "--lr-random", "-1"], "learning rate -1", monkeypatch)
    _bad(tiny, tmp_path, capsys, ["--synthetic", str(syn), "--lr-random", "0.1", "--test", test, "--arch", "distill"],
         "--lr-random applies to --random only", monkeypatch)
    _bad(tiny, tmp_path, capsys, ["--synthetic", str(tmp_path / "missing.h5"), "--test", test, "--arch", "distill"],
         "no such synthetic set", monkeypatch)
    _bad(tiny, tmp_path, capsys, ["--synthetic", str(syn), "--test", str(tmp_path / "none.h5"), "--arch", "distill"],
         "no such prepared split", monkeypatch)


# -- the published protocol's schedule and the baselines' input space --------------------------
def test_published_schedule_is_expressible():
    """1001 epochs, x0.1 after 502: epochs 0..501 at alpha, 502..1000 at 0.1 alpha."""
    from tesla.training import epoch_lr

    protocol = Protocol(epochs=1001, lr=0.01, lr_decay_epoch=502)
    protocol.check()
    lrs = [epoch_lr(0.01, e, protocol.lr_decay_epochs) for e in range(1001)]
    assert lrs[:502] == [0.01] * 502 and lrs[502:] == [pytest.approx(0.001)] * 499
    assert Protocol(epochs=1000).lr_decay_epochs == (500,)  # the default: at half
    assert Protocol(epochs=1).lr_decay_epochs == ()
    for bad in (0, 1001, 2000):
        with pytest.raises(Exception, match=f"--lr-decay-epoch {bad}: .* must be in 1..1000"):
            Protocol(epochs=1001, lr_decay_epoch=bad).check()


def test_cli_lr_decay_epoch_and_input_space_are_applied_and_recorded(tiny, tmp_path, monkeypatch):
    spy = TrainSpy(monkeypatch)
    seen = []
    real_accuracy = tesla.training.accuracy
    patch_training(monkeypatch, tesla.evaluation, "accuracy", lambda m, x, y, **kw: seen.append(x.clone()) or real_accuracy(m, x, y))
    out = tmp_path / "runs_random.csv"
    rc = cli.main(["evaluate", "--random", "--train", str(tiny["train"]), "--ipc", "2", "--test", str(tiny["test"]),
                   "--arch", "convnet_d1", "--runs", "1", "--epochs", "5", "--lr-decay-epoch", "3", "--dsa", "none",
                   "--normalize", "none", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    assert tuple(spy.calls[0]["lr_decay_epochs"]) == (3,)
    # --normalize none: the draw and the test split are pixels in [0, 1], nothing else
    train_pixels = torch.from_numpy(ImageSplit.open(tiny["train"]).images_uint8()).permute(0, 3, 1, 2).float() / 255
    x = spy.calls[0]["x"]
    assert all(any(torch.equal(x[i], train_pixels[j]) for j in range(len(train_pixels))) for i in range(len(x)))
    test_pixels = torch.from_numpy(ImageSplit.open(tiny["test"]).images_uint8()).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(seen[0], test_pixels)
    rows = read_runs_csv(out)
    assert rows[0]["lr_decay_epoch"] == "3" and rows[0]["input_space"] == "none" and rows[0]["epochs"] == "5"
    # the default stays: decay at half, the split's own statistics
    out2 = tmp_path / "runs_default.csv"
    assert cli.main(["evaluate", "--random", "--train", str(tiny["train"]), "--ipc", "2", "--test", str(tiny["test"]),
                     "--arch", "convnet_d1", "--runs", "1", "--epochs", "4", "--device", "cpu", "--out", str(out2)]) == 0
    rows = read_runs_csv(out2)
    assert rows[0]["lr_decay_epoch"] == "2" and rows[0]["input_space"] == "split"


def test_a_set_is_evaluated_in_its_recorded_normalisation(tiny, tmp_path, monkeypatch):
    path = make_set(tiny, tmp_path / "mnist_norm.h5")
    with h5py.File(path, "a") as f:  # a set distilled from experts trained with --normalize mnist
        f.attrs["normalization"], f.attrs["mean"], f.attrs["std"] = "mnist", [0.1307], [0.3081]
    seen = []
    real_accuracy = tesla.training.accuracy
    patch_training(monkeypatch, tesla.evaluation, "accuracy", lambda m, x, y, **kw: seen.append(x.clone()) or real_accuracy(m, x, y))
    subject = synthetic_subject(path, "cpu")
    assert subject.space.input_space.key == "mnist"
    results = evaluate(subject, "distill", tiny["test"], Protocol(epochs=1, lr=subject.lr, dsa_strategy="none"),
                       runs=1, progress=False)
    u = ImageSplit.open(tiny["test"]).images_uint8().astype(np.float64).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(seen[0].numpy(), (u / 255 - 0.1307) / 0.3081, rtol=1e-6, atol=1e-6)
    assert results[0].input_space == "mnist"
    with h5py.File(path, "a") as f:  # a name whose constants the file contradicts: damaged
        f.attrs["mean"] = [0.5]
    with pytest.raises(Exception, match="records normalisation mnist with mean"):
        synthetic_subject(path, "cpu")


def test_normalize_is_refused_for_a_synthetic_set_and_checked_for_baselines(tiny, tmp_path, capsys, monkeypatch):
    syn = make_set(tiny, tmp_path / "syn.h5")
    test = str(tiny["test"])
    _bad(tiny, tmp_path, capsys, ["--synthetic", str(syn), "--normalize", "none", "--test", test, "--arch", "distill"],
         "--normalize applies to --random only", monkeypatch)
    _bad(tiny, tmp_path, capsys, ["--random", "--train", str(tiny["train"]), "--ipc", "2", "--test", test,
                                  "--arch", "convnet_d1", "--normalize", "cifar10"], "constants are for 3-channel",
         monkeypatch)
    _bad(tiny, tmp_path, capsys, ["--random", "--train", str(tiny["train"]), "--ipc", "2", "--test", test,
                                  "--arch", "convnet_d1", "--lr-decay-epoch", "1"], "--lr-decay-epoch 1", monkeypatch)


# -- the runs of a job as one group; precision and the momentum restart -------------------------
@pytest.mark.parametrize("mode", ["streams", "vmap"])
def test_runs_trained_as_a_group_equal_runs_trained_alone(tiny, mode):
    """Each run keeps its seed's initialisation, random draw, order and augmentation."""
    subject = random_subject(tiny["train"], 2, "cpu", lr=0.05, dsa_strategy=PAPER_DSA_STRATEGY)
    spec = model_spec("convnet_d1", channels=C, num_classes=K, resolution=R, width=8)
    protocol = Protocol(epochs=4, lr=subject.lr, dsa_strategy=subject.dsa_strategy, reset_momentum_at_decay=True)
    alone = train_runs(subject, spec, protocol, runs=3, seed=5, device="cpu", progress=False, group_mode="sequential")
    group = train_runs(subject, spec, protocol, runs=3, seed=5, device="cpu", progress=False, group_mode=mode)
    for a, g in zip(alone, group):
        assert (a.run, a.seed) == (g.run, g.seed)
        if mode == "streams":  # interleaved on the CPU: the same computation
            assert torch.equal(flatten_params(a.model), flatten_params(g.model)) and a.final_train_loss == g.final_train_loss
        else:
            torch.testing.assert_close(flatten_params(g.model), flatten_params(a.model), rtol=1e-4, atol=1e-5)
            assert g.final_train_loss == pytest.approx(a.final_train_loss, rel=1e-4)
    assert not torch.allclose(flatten_params(alone[0].model), flatten_params(alone[1].model))


def test_cli_group_mode_precision_and_momentum_restart_are_applied_and_recorded(tiny, tmp_path, monkeypatch):
    spy = TrainSpy(monkeypatch)
    out = tmp_path / "runs.csv"
    rc = cli.main(["evaluate", "--random", "--train", str(tiny["train"]), "--ipc", "2", "--test", str(tiny["test"]),
                   "--arch", "convnet_d1", "--runs", "2", "--epochs", "4", "--reset-momentum-at-decay", "--precision", "bf16",
                   "--group-mode", "sequential", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    assert [c["reset_momentum_at_decay"] for c in spy.calls] == [True, True]
    assert all(c["numerics"].precision == "bf16" for c in spy.calls)
    rows = read_runs_csv(out)
    assert {(r["reset_momentum_at_decay"], r["precision"], r["tf32"], r["memory_format"], r["group_mode"]) for r in rows} == \
        {("True", "bf16", "False", "contiguous", "sequential")}
    out2 = tmp_path / "vmap.csv"
    assert cli.main(["evaluate", "--random", "--train", str(tiny["train"]), "--ipc", "2", "--test", str(tiny["test"]),
                     "--arch", "convnet_d1", "--runs", "2", "--epochs", "2", "--group-mode", "vmap", "--device", "cpu",
                     "--out", str(out2)]) == 0
    rows = read_runs_csv(out2)
    assert {(r["reset_momentum_at_decay"], r["precision"], r["group_mode"]) for r in rows} == {("False", "float32", "vmap")}


def test_vmap_with_channels_last_is_refused_before_training(tiny, tmp_path, capsys, monkeypatch):
    syn = make_set(tiny, tmp_path / "syn.h5")
    _bad(tiny, tmp_path, capsys, ["--synthetic", str(syn), "--test", str(tiny["test"]), "--arch", "distill",
                                  "--group-mode", "vmap", "--channels-last"], "no channels-last layout", monkeypatch)
