"""The synthetic set file: round trip, atomic write, clear errors."""

import h5py
import pytest
import torch

from tesla.errors import TeslaError
from tesla.synthetic import FORMAT_VERSION, SyntheticSet

from conftest import assert_refuses_files_of_others


def _set(soft: bool = False) -> SyntheticSet:
    g = torch.Generator().manual_seed(0)
    n, k = 6, 3
    soft_labels = torch.softmax(torch.randn(n, k, generator=g), 1) if soft else None
    return SyntheticSet(
        images=torch.randn(n, 1, 8, 8, generator=g),
        labels=torch.tensor([0, 0, 1, 1, 2, 2]),
        soft_labels=soft_labels,
        lr=0.0123,
        dataset="demo",
        num_classes=k,
        class_ids=["a", "b", "c"],
        class_names=["A", "B", "C"],
        mean=[0.5],
        std=[0.25],
        dsa_strategy="color_crop_cutout_flip_scale_rotate",
        model_spec={"name": "convnet", "depth": 2},
        ipc=2,
        engine="exact",
        zca_artifact=b"\x89HDF-not-really",
        settings={"syn_steps": 4},
        iteration=7,
    )


@pytest.mark.parametrize("soft", [False, True])
def test_round_trip(tmp_path, soft):
    s = _set(soft)
    path = s.save(tmp_path / "syn.h5")
    t = SyntheticSet.load(path)
    assert torch.equal(t.images, s.images)
    assert torch.equal(t.labels, s.labels)
    assert (t.soft_labels is None) == (not soft)
    if soft:
        assert torch.allclose(t.soft_labels, s.soft_labels)
        assert t.targets is t.soft_labels
    else:
        assert t.targets is t.labels
    assert t.lr == pytest.approx(0.0123)
    assert t.class_names == ["A", "B", "C"]
    assert t.model_spec == {"name": "convnet", "depth": 2}
    assert t.zca_artifact == s.zca_artifact and t.uses_zca
    assert t.settings == {"syn_steps": 4} and t.iteration == 7
    assert (t.ipc, t.engine, t.resolution, t.channels) == (2, "exact", 8, 1)
    assert [p.name for p in tmp_path.iterdir()] == ["syn.h5"]


def test_wrong_version_and_foreign_file(tmp_path):
    path = _set().save(tmp_path / "syn.h5")
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(TeslaError, match="format version"):
        SyntheticSet.load(path)
    assert_refuses_files_of_others(SyntheticSet.load, tmp_path, "synthetic set file")


def test_invalid_set_is_not_written(tmp_path):
    s = _set()
    s.lr = float("nan")
    with pytest.raises(ValueError):
        s.save(tmp_path / "syn.h5")
    assert list(tmp_path.iterdir()) == []


def test_embedded_zca_round_trip(tmp_path):
    from tesla.zca import fit_zca

    x = torch.randn(40, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    zca = fit_zca(x, eps=0.1)
    zca.save(tmp_path / "zca.h5")
    s = _set()
    s.images = zca.apply(torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(4)))
    s.zca_artifact = (tmp_path / "zca.h5").read_bytes()
    loaded = SyntheticSet.load(s.save(tmp_path / "syn.h5")).zca()
    assert torch.allclose(loaded.apply(x), zca.apply(x), atol=1e-6)


def test_input_space_is_recorded_and_older_files_read_as_split(tmp_path):
    s = _set()
    s.zca_artifact = None
    s.normalization, s.mean, s.std = "none", [0.0], [1.0]
    path = s.save(tmp_path / "syn.h5")
    t = SyntheticSet.load(path)
    assert t.normalization == "none" and t.input_space().key == "none"
    with h5py.File(path, "a") as f:  # as written before the name was recorded
        del f.attrs["normalization"]
        f.attrs["mean"], f.attrs["std"] = [0.5], [0.25]
    t = SyntheticSet.load(path)
    assert t.normalization == "split" and t.input_space().mean == [0.5]


def test_learned_labels_round_trip_with_logits_and_temperature(tmp_path):
    s = _set()
    z = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    s.label_logits, s.label_temperature = z, 2.0
    s.soft_labels = torch.softmax(z / 2.0, dim=1)
    path = s.save(tmp_path / "syn.h5")
    with h5py.File(path) as f:
        assert f.attrs["label_kind"] == "learned" and f.attrs["format_version"] == FORMAT_VERSION == 2
    t = SyntheticSet.load(path)
    assert t.label_kind == "learned" and t.label_temperature == 2.0
    assert torch.equal(t.label_logits, z) and t.targets is t.soft_labels
    torch.testing.assert_close(t.soft_labels, torch.softmax(t.label_logits / 2.0, dim=1))
    s.label_temperature = None
    with pytest.raises(ValueError, match="temperature"):
        s.save(tmp_path / "bad.h5")
    assert not (tmp_path / "bad.h5").exists()


@pytest.mark.parametrize("soft", [False, True])
def test_version_1_files_are_still_read(tmp_path, soft):
    """A file as version 1 wrote it (no label_logits, no temperature, version 1) reads unchanged."""
    path = _set(soft).save(tmp_path / "syn.h5")
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 1
        f.attrs["label_kind"] = "soft" if soft else "hard"
    t = SyntheticSet.load(path)
    assert t.label_logits is None and t.label_temperature is None
    assert t.label_kind == ("soft" if soft else "hard")
