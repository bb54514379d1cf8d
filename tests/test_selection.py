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
