"""Selecting a synthetic set: the validation split of ``tesla prepare``, the kept sets of
``tesla distill --keep-every`` (written, resumed after a kill) and ``tesla evaluate
--kept-sets`` (final, best by validation, best by test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tesla.distill as distill_mod
from tesla.cli import main
from tesla.data import ImageSplit
from tesla.distill import distill
from tesla.kept_sets import kept_folder, list_kept
from tesla.synthetic import SyntheticSet
from test_distill import settings, toy  # noqa: F401  (the tiny split and experts of the distillation tests)

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the validation split ------------------------------------------------------------------
def _prepare(out: Path, *extra: str) -> None:
    assert main(["prepare", "demo", "--out-dir", str(out), "--quiet", *extra]) == 0


def _rows(split: ImageSplit) -> dict[int, list[bytes]]:
    """Per class, the images as bytes (to compare splits as sets of images)."""
    return {c: [img.tobytes() for img in split.class_images(c)] for c in range(split.num_classes)}


def test_validation_split_is_disjoint_from_train_complete_and_reproducible(tmp_path):
    _prepare(tmp_path / "plain")
    _prepare(tmp_path / "held", "--validation-per-class", "4", "--validation-seed", "7")
    _prepare(tmp_path / "again", "--validation-per-class", "4", "--validation-seed", "7")
    _prepare(tmp_path / "other", "--validation-per-class", "4", "--validation-seed", "8")
    full = ImageSplit.open(tmp_path / "plain" / "train.h5")
    train, val = ImageSplit.open(tmp_path / "held" / "train.h5"), ImageSplit.open(tmp_path / "held" / "val.h5")
    assert not (tmp_path / "plain" / "val.h5").exists()
    assert np.all(np.diff(val.class_offsets) == 4) and train.num_images == full.num_images - 4 * full.num_classes
    assert val.attrs["split"] == "val" and int(train.attrs["validation_per_class"]) == 4
    f, t, v = _rows(full), _rows(train), _rows(val)
    for c in range(full.num_classes):
        # the two parts are the class's images, each exactly once: disjoint and complete
        assert sorted(t[c] + v[c]) == sorted(f[c])
        assert not set(v[c]) & set(t[c]) or len(set(f[c])) < len(f[c])
    # the documented rule: the first k of default_rng(seed).permutation(n_c), class by class
    rng = np.random.default_rng(7)
    for c in range(full.num_classes):
        held = np.sort(rng.permutation(full.class_count(c))[:4])
        assert [f[c][i] for i in held] == v[c]
    assert ImageSplit.open(tmp_path / "again" / "val.h5").fingerprint == val.fingerprint
    assert ImageSplit.open(tmp_path / "again" / "train.h5").fingerprint == train.fingerprint
    assert ImageSplit.open(tmp_path / "other" / "val.h5").fingerprint != val.fingerprint
    # the default leaves the prepared files as they were
    _prepare(tmp_path / "plain2", "--validation-per-class", "0")
    assert ImageSplit.open(tmp_path / "plain2" / "train.h5").fingerprint == full.fingerprint


def test_validation_split_larger_than_a_class_is_refused_naming_the_setting(tmp_path):
    from tesla.errors import TeslaError
    from tesla.data.sources import registry
    from tesla.data.sources.base import SourceOptions
    from tesla.prepare import Holdout, prepare_dataset

    plan = registry.plan_source("demo", SourceOptions())
    with pytest.raises(TeslaError, match=r"--validation-per-class 500 \(config key validation_per_class\).*hold out fewer"):
        prepare_dataset(plan, tmp_path / "d", resolution=8, workers=1, progress=False, validation=Holdout(500, 0))
    assert not (tmp_path / "d" / "train.h5").exists() and not (tmp_path / "d" / "val.h5").exists()


# -- kept sets -----------------------------------------------------------------------------
def _same_set(a: SyntheticSet, b: SyntheticSet) -> bool:
    return torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.lr == b.lr and a.iteration == b.iteration


def test_kept_sets_survive_a_kill_and_leave_the_final_set_unchanged(toy, tmp_path, monkeypatch):  # noqa: F811
    kw = dict(iterations=7, checkpoint_every=2)
    plain = distill(settings(toy, tmp_path / "plain", **kw))
    whole_settings = settings(toy, tmp_path / "whole", keep_every=3, **kw)
    whole = distill(whole_settings)
    assert _same_set(whole, plain)  # keeping sets changes nothing of the distillation
    kept = [(i, SyntheticSet.load(p)) for i, p in list_kept(kept_folder(whole_settings.out))]
    assert [i for i, _ in kept] == [3, 6, 7]
    assert _same_set(kept[-1][1], SyntheticSet.load(whole_settings.out))
    assert not kept_folder(whole_settings.out).with_name("syn.kept.partial").exists()

    real = distill_mod.matching_gradients
    calls = {"n": 0}

    def killed_in_7(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # the sets of iterations 3 and 6 are kept; the checkpoint holds iteration 4
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_mod, "matching_gradients", killed_in_7)
    b = settings(toy, tmp_path / "b", keep_every=3, **kw)
    with pytest.raises(KeyboardInterrupt):
        distill(b)
    partial = kept_folder(b.out).with_name("syn.kept.partial")
    assert [i for i, _ in list_kept(partial)] == [3, 6] and not kept_folder(b.out).exists()
    assert torch.load(b.checkpoint_path, weights_only=False)["iteration"] == 4
    monkeypatch.setattr(distill_mod, "matching_gradients", real)
    resumed = distill(b)
    assert _same_set(resumed, plain)
    again = [(i, SyntheticSet.load(p)) for i, p in list_kept(kept_folder(b.out))]
    assert [i for i, _ in again] == [3, 6, 7]
    assert all(_same_set(x, y) for (_, x), (_, y) in zip(again, kept))
    assert not partial.exists()


def test_rerunning_a_finished_run_keeps_its_kept_sets(toy, tmp_path):  # noqa: F811
    """The same command again resumes from the final checkpoint: OUT.kept/ keeps every set."""
    s = settings(toy, tmp_path / "r", iterations=7, checkpoint_every=2, keep_every=3)
    distill(s)
    first = [(i, SyntheticSet.load(p)) for i, p in list_kept(kept_folder(s.out))]
    assert s.checkpoint_path.exists() and [i for i, _ in first] == [3, 6, 7]
    distill(settings(toy, tmp_path / "r", iterations=7, checkpoint_every=2, keep_every=3))
    again = [(i, SyntheticSet.load(p)) for i, p in list_kept(kept_folder(s.out))]
    assert [i for i, _ in again] == [3, 6, 7]
    assert all(_same_set(x, y) for (_, x), (_, y) in zip(again, first))
    assert not kept_folder(s.out).with_name("syn.kept.partial").exists()
    # more --iterations: the earlier run's last set (7, not a multiple of 3) stays among them
    distill(settings(toy, tmp_path / "r", iterations=9, checkpoint_every=2, keep_every=3))
    assert [i for i, _ in list_kept(kept_folder(s.out))] == [3, 6, 7, 9]


def test_a_run_whose_kept_folder_cannot_be_made_opens_no_tracker(toy, tmp_path, monkeypatch):  # noqa: F811
    """RunRecord opens the tracker (which only close() closes) after the kept-set folder is made."""
    import tesla.distill_outputs as outputs
    from tesla.tracking import TrackerOptions

    opened = []
    monkeypatch.setattr(outputs, "open_tracker", lambda *a, **k: opened.append(a) or outputs.tracking_disabled())
    s = settings(toy, tmp_path / "t", iterations=2, keep_every=1)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "syn.kept.partial").write_text("a file where the folder goes")
    with pytest.raises(OSError):
        distill(s, TrackerOptions(tracker="tensorboard"))
    assert opened == []


# -- selection -----------------------------------------------------------------------------
def test_the_three_picks_by_hand():
    from tesla.errors import TeslaError
    from tesla.selection import SetScore, pick_sets, selected_index

    scores = [
        SetScore(100, "a", test_accs=[50.0, 52.0], val_accs=[70.0, 72.0]),  # best on validation (71)
        SetScore(200, "b", test_accs=[60.0, 60.0], val_accs=[60.0, 62.0]),  # best on test (60)
        SetScore(300, "c", test_accs=[55.0, 57.0], val_accs=[71.0, 71.0]),  # ties a on validation: the later wins
    ]
    assert pick_sets(scores) == {"final": 2, "validation": 2, "test": 1}
    scores[2].val_accs = [70.0, 70.0]
    assert pick_sets(scores) == {"final": 2, "validation": 0, "test": 1}
    assert selected_index(scores, "validation") == 0 and selected_index(scores, "final") == 2
    with pytest.raises(TeslaError, match="--select test: choose final, or validation"):
        selected_index(scores, "test")
    for s in scores:
        s.val_accs = None
    with pytest.raises(TeslaError, match="--select validation: choose final, or validation together with --validation"):
        selected_index(scores, "validation")
    with pytest.raises(TeslaError, match="no kept set to select from"):
        selected_index([], "validation")


def _write_split(path: Path, source: ImageSplit, shift: int) -> None:
    """``source``'s images, class c labelled (c + shift) mod K (a test split whose right
    answers are shifted: a network trained on shifted labels scores well on it)."""
    from tesla.data import SplitWriter

    k = source.num_classes
    with SplitWriter(path, dataset=source.dataset, split="test", class_ids=source.class_ids, height=source.resolution,
                     width=source.resolution, channels=source.channels, source="test") as w:
        for c in range(k):
            w.append(source.class_images((c - shift) % k), [c] * source.class_count((c - shift) % k))


def _kept_set(folder: Path, train: ImageSplit, iteration: int, shift: int) -> None:
    """Three real images per class as a set, labelled (c + shift) mod K."""
    from tesla.models import model_spec

    gen = torch.Generator().manual_seed(0)
    images, labels = train.sample_per_class(3, gen)
    x, _ = (torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0 - train.mean[0]) / train.std[0], None
    syn = SyntheticSet(
        images=x, labels=torch.as_tensor((labels + shift) % train.num_classes), lr=0.05, dataset=train.dataset,
        num_classes=train.num_classes, class_ids=train.class_ids, class_names=train.class_names, mean=train.mean,
        std=train.std, dsa_strategy="none", ipc=3, engine="exact", dataset_fingerprint=train.fingerprint,
        model_spec=model_spec("convnet_d1", channels=1, num_classes=train.num_classes, resolution=8, width=16),
        iteration=iteration,
    )
    folder.mkdir(exist_ok=True)
    syn.save(folder / f"iteration_{iteration:06d}.h5")


def test_evaluate_kept_sets_reports_final_best_by_validation_and_best_by_test(tmp_path, capsys):
    """Set A (iteration 10: true labels) wins on the validation split, set B (iteration 20:
    labels shifted by one class) on a test split whose labels are shifted the same way; the
    final set is C (iteration 30: shifted by two, poor on both)."""
    from tesla.results import read_runs
    from tesla.selection import read_sets, three_numbers

    _prepare(tmp_path / "d", "--validation-per-class", "6")
    train = ImageSplit.open(tmp_path / "d" / "train.h5")
    _write_split(tmp_path / "shifted_test.h5", ImageSplit.open(tmp_path / "d" / "test.h5"), shift=1)
    kept = tmp_path / "syn.kept"
    for iteration, shift in ((10, 0), (20, 1), (30, 2)):
        _kept_set(kept, train, iteration, shift)
    base = ["evaluate", "--kept-sets", str(kept), "--test", str(tmp_path / "shifted_test.h5"), "--arch", "distill",
            "--runs", "2", "--epochs", "60", "--device", "cpu", "--validation", str(tmp_path / "d" / "val.h5")]
    assert main([*base, "--select", "validation", "--out", str(tmp_path / "runs.csv")]) == 0
    rows = read_sets(tmp_path / "runs.sets.csv")
    assert [int(r["iteration"]) for r in rows] == [10, 20, 30]
    picks = three_numbers(rows)
    assert int(picks["final"]["iteration"]) == 30
    assert int(picks["validation"]["iteration"]) == 10
    assert int(picks["test"]["iteration"]) == 20
    val = [float(r["val_acc_mean"]) for r in rows]
    test = [float(r["test_acc_mean"]) for r in rows]
    assert val[0] > 50 > val[1] and test[1] > 50 > test[0], (val, test)
    runs = read_runs(tmp_path / "runs.csv")
    assert set(runs["iteration"]) == {"10"} and set(runs["selection"]) == {"validation"}
    assert float(runs["test_acc"].mean()) == pytest.approx(test[0], abs=1e-3)
    out = capsys.readouterr().out
    assert "best by test (published protocol: selected on the test set): iteration 20" in out
    # --select final: the runs of the last set, the same per-set table (the networks are the same)
    assert main([*base, "--out", str(tmp_path / "final.csv")]) == 0
    assert read_sets(tmp_path / "final.sets.csv") == [{**r, "source": r["source"]} for r in rows]
    assert set(read_runs(tmp_path / "final.csv")["iteration"]) == {"30"}


def test_select_validation_needs_a_validation_split_held_out_of_the_sets_training_split(tmp_path, capsys):
    _prepare(tmp_path / "d", "--validation-per-class", "6")
    _prepare(tmp_path / "e", "--validation-per-class", "6", "--validation-seed", "1")
    train = ImageSplit.open(tmp_path / "d" / "train.h5")
    _kept_set(tmp_path / "k", train, 5, 0)
    base = ["evaluate", "--kept-sets", str(tmp_path / "k"), "--test", str(tmp_path / "d" / "test.h5"), "--arch",
            "distill", "--runs", "1", "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "r.csv")]
    capsys.readouterr()
    assert main([*base, "--select", "validation"]) == 2
    assert "--select validation: choose final, or validation together with --validation" in capsys.readouterr().err
    assert main([*base, "--select", "validation", "--validation", str(tmp_path / "e" / "val.h5")]) == 2
    assert "not held out of the training split" in capsys.readouterr().err
    assert main(["evaluate", "--synthetic", str(tmp_path / "k" / "iteration_000005.h5"), "--test", "t.h5", "--arch",
                 "distill", "--out", "x.csv", "--select", "validation"]) == 2
    assert "--select applies to --kept-sets only" in capsys.readouterr().err
    assert not (tmp_path / "r.csv").exists()


def test_a_killed_kept_sets_evaluation_resumes_after_the_sets_it_finished(tmp_path, monkeypatch, capsys):
    import tesla.evaluation as evaluation
    from tesla.selection import read_sets

    _prepare(tmp_path / "d", "--validation-per-class", "6")
    train = ImageSplit.open(tmp_path / "d" / "train.h5")
    for iteration, shift in ((10, 0), (20, 1)):
        _kept_set(tmp_path / "k", train, iteration, shift)
    out = tmp_path / "runs.csv"
    argv = ["evaluate", "--kept-sets", str(tmp_path / "k"), "--test", str(tmp_path / "d" / "test.h5"), "--arch",
            "distill", "--runs", "2", "--epochs", "3", "--device", "cpu", "--validation", str(tmp_path / "d" / "val.h5"),
            "--out", str(out)]
    assert main([*argv, "--sets-out", str(tmp_path / "whole.csv")]) == 0
    real, trained = evaluation.evaluate, []

    def killed_at_the_second_set(subject, *args, **kwargs):
        trained.append(subject.iteration)
        if subject.iteration == 20 and len(trained) == 2:
            raise KeyboardInterrupt
        return real(subject, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", killed_at_the_second_set)
    out.unlink()
    assert main(argv) != 0  # interrupted
    assert not out.exists() and Path(f"{out}.ckpt.sets.json").exists()
    assert main([*argv, "--checkpoint-every", "0"]) == 0  # how often a checkpoint is saved changes no run
    assert trained == [10, 20, 20]  # the set of iteration 10 was not trained again
    assert read_sets(out.with_suffix(".sets.csv")) == read_sets(tmp_path / "whole.csv")
    assert not Path(f"{out}.ckpt.sets.json").exists() and not Path(f"{out}.ckpt").exists()


def test_the_kept_sets_loop_takes_how_one_set_is_evaluated_and_resumes_after_the_sets_it_finished(tmp_path):
    """tesla.kept_evaluation with a stand-in for the evaluate stage's evaluation of one set
    (no training): every set once, in iteration order, the selected set's runs marked, the
    finished sets kept beside the checkpoint and not evaluated again; a bad --select refused
    before any set is evaluated."""
    from tesla.errors import TeslaError
    from tesla.kept_evaluation import evaluate_kept_sets
    from tesla.tables import RunResult

    folder = tmp_path / "syn.kept"
    folder.mkdir()
    for iteration in (10, 20, 30):
        (folder / f"iteration_{iteration:06d}.h5").touch()
    val = {10: 40.0, 20: 70.0, 30: 50.0}
    trained = []

    def evaluate_set(path: Path):
        iteration = int(path.stem.split("_")[1])

        def train_and_test() -> list[RunResult]:
            trained.append(iteration)
            return [RunResult("demo", 1, "tesla", "exact", "ConvNet", r, r, 1, 0, 0.01, 1.0, 30.0 + r, 0.1, "hard",
                              "none", False, "split", 10, "cpu", str(path), iteration=iteration, val_acc=val[iteration])
                    for r in range(2)]

        return f"key {iteration}", train_and_test

    checkpoint = tmp_path / "runs.csv.ckpt"
    with pytest.raises(TeslaError, match="--select validation: choose final, or validation together with --validation"):
        evaluate_kept_sets(folder, evaluate_set, select="validation", checkpoint=checkpoint)
    assert trained == [] and not Path(f"{checkpoint}.sets.json").exists()
    per_set, scores, chosen = evaluate_kept_sets(folder, evaluate_set, validation="val.h5", select="validation",
                                                 checkpoint=checkpoint)
    assert trained == [10, 20, 30] and [s.iteration for s in scores] == [10, 20, 30] and chosen == 1
    assert [{r.selection for r in rs} for rs in per_set] == [{""}, {"validation"}, {""}]
    again, _, final = evaluate_kept_sets(folder, evaluate_set, validation="val.h5", checkpoint=checkpoint)
    assert trained == [10, 20, 30] and final == 2  # every set came from CHECKPOINT.sets.json
    assert [r.test_acc for rs in again for r in rs] == [r.test_acc for rs in per_set for r in rs]


def test_a_finished_sets_runs_are_not_reused_once_the_test_or_validation_split_at_its_path_changed(tmp_path):
    """A kept set's evaluation is keyed by the content of the test and validation splits, not
    their paths: a split rewritten in place (prepared again) between a kill and the rerun gets
    the finished sets measured again instead of their stale accuracies."""
    import shutil

    from tesla.evaluation import kept_set_evaluation
    from tesla.training_settings import Protocol

    _prepare(tmp_path / "d", "--validation-per-class", "6")
    train, test = ImageSplit.open(tmp_path / "d" / "train.h5"), ImageSplit.open(tmp_path / "d" / "test.h5")
    _kept_set(tmp_path / "k", train, 10, 0)
    path = tmp_path / "k" / "iteration_000010.h5"
    at, val = tmp_path / "test.h5", tmp_path / "val.h5"
    shutil.copy(test.path, at)
    shutil.copy(tmp_path / "d" / "val.h5", val)

    def key() -> str:
        return kept_set_evaluation("distill", at, Protocol(epochs=1), validation=val, runs=1, device="cpu")(path)[0]

    first = key()
    assert key() == first  # the same inputs: the same key (a rerun resumes)
    _write_split(at, test, shift=1)  # another test split at the same path
    shifted = key()
    assert shifted != first
    _write_split(val, ImageSplit.open(tmp_path / "d" / "val.h5"), shift=1)
    assert key() != shifted
