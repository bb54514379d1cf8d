"""The tesla-trajectory file: round trip, 16-bit storage, per-snapshot chunks, validation."""

from __future__ import annotations

import h5py
import pytest
import torch

from tesla.errors import TeslaError
from tesla.models import build_model, model_spec
from tesla.parameters import buffer_layout, flatten_buffers, flatten_params, param_layout
from tesla.trajectories import (
    FORMAT_VERSION,
    Trajectory,
    TrajectoryMeta,
    TrajectoryWriter,
    round_to_storage,
)

from conftest import assert_refuses_files_of_others

SPEC = model_spec("convnet_d1", channels=1, num_classes=3, resolution=8, width=4)


def meta(**kw) -> TrajectoryMeta:
    base = dict(
        model_spec=SPEC, dataset="toy", dataset_fingerprint="f" * 64, seed=7, lr=0.01, batch_size=256,
        dsa="color_crop", epochs=2, train_loss=[1.5, 1.0], train_accuracy=[0.4, 0.6], final_test_accuracy=0.55,
        input_mean=[0.5], input_std=[0.25], epoch_seconds=[1.0, 1.1],
    )
    base.update(kw)
    return TrajectoryMeta(**base)


def write(path, snapshots, dtype="float32", model=None, **kw):
    model = model if model is not None else build_model("convnet_d1", channels=1, num_classes=3, resolution=8, width=4)
    with TrajectoryWriter(path, layout=param_layout(model), buffer_layout=buffer_layout(model), dtype=dtype) as w:
        for s in snapshots:
            w.append(s, flatten_buffers(model) if w.num_buffers else None)
        w.commit(meta(**kw))
    return path


def snaps(n=3, p=None, seed=0):
    p = p or param_layout(build_model("convnet_d1", channels=1, num_classes=3, resolution=8, width=4)).total
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p, generator=g) * 0.1 for _ in range(n)]


def test_float32_round_trip_and_metadata(tmp_path):
    s = snaps()
    path = write(tmp_path / "e.h5", s)
    with Trajectory.open(path) as t:
        assert t.num_snapshots == 3 and t.num_params == s[0].numel()
        for i in range(3):
            got = t.snapshot(i)
            assert got.dtype == torch.float32 and torch.equal(got, s[i])
        assert torch.equal(t.snapshot(-1), s[2])
        assert t.seed == 7 and t.lr == 0.01 and t.dsa == "color_crop" and t.epochs == 2
        assert t.model_spec["name"] == "convnet_d1" and t.model_spec["options"]["width"] == 4
        assert t.param_layout.total == s[0].numel()
        assert t.final_test_accuracy == pytest.approx(0.55)
        assert list(t.train_loss) == [1.5, 1.0] and list(t.train_accuracy) == [0.4, 0.6]
        assert t.input_mean == [0.5] and t.storage_dtype == "float32"
        net = t.build_model()
        assert sum(p.numel() for p in net.parameters()) == t.num_params
    with h5py.File(path) as f:
        assert f.attrs["format"] == "tesla-trajectory" and f.attrs["format_version"] == FORMAT_VERSION
        assert f["snapshots"].chunks == (1, s[0].numel())  # one snapshot per chunk


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_storage_rounds_to_nearest_and_halves_the_file(tmp_path, dtype):
    s = snaps(n=2, seed=1)
    path = write(tmp_path / f"{dtype}.h5", s, dtype=dtype)
    full = write(tmp_path / "full.h5", s)
    with Trajectory.open(path) as t:
        assert t.storage_dtype == dtype
        for i in range(2):
            got = t.snapshot(i)
            assert got.dtype == torch.float32
            assert torch.equal(got, round_to_storage(s[i], dtype))
            rel = (got - s[i]).abs().max() / s[i].abs().max()
            assert 0 < rel < (2**-10 if dtype == "float16" else 2**-7)
    with h5py.File(path) as f, h5py.File(full) as g:
        assert f["snapshots"].dtype.itemsize == 2 and g["snapshots"].dtype.itemsize == 4


def test_buffers_are_stored_for_batch_norm_models(tmp_path):
    torch.manual_seed(0)
    model = build_model("convnet_d1", channels=1, num_classes=3, resolution=8, width=4, norm="batchnorm")
    model(torch.randn(4, 1, 8, 8))  # update running statistics
    theta = flatten_params(model)
    path = write(tmp_path / "bn.h5", [theta, theta], model=model)
    with Trajectory.open(path) as t:
        assert t.num_buffers == 8
        assert torch.equal(t.buffers(1), flatten_buffers(model))


def test_writer_leaves_nothing_on_error(tmp_path):
    model = build_model("convnet_d1", channels=1, num_classes=3, resolution=8, width=4)
    path = tmp_path / "e.h5"
    with pytest.raises(RuntimeError):
        with TrajectoryWriter(path, layout=param_layout(model)) as w:
            w.append(flatten_params(model))
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with TrajectoryWriter(path, layout=param_layout(model)) as w:
        with pytest.raises(ValueError, match="shape"):
            w.append(torch.zeros(3))
    assert list(tmp_path.iterdir()) == []


def test_open_rejects_files_that_are_not_ours(tmp_path):
    assert_refuses_files_of_others(Trajectory.open, tmp_path, "expert trajectory file")
    path = write(tmp_path / "e.h5", snaps(n=1))
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(TeslaError, match="version 99"):
        Trajectory.open(path)
    path = write(tmp_path / "e2.h5", snaps(n=1))
    with h5py.File(path, "r+") as f:
        del f.attrs["seed"]
    with pytest.raises(TeslaError, match="missing seed"):
        Trajectory.open(path)


def test_check_compatible_names_the_file_and_the_mismatch(tmp_path):
    path = write(tmp_path / "e.h5", snaps(n=3))
    t = Trajectory.open(path)
    t.check_compatible(model_spec=SPEC, dataset_fingerprint="f" * 64, zca_fingerprint="", needed_snapshots=3)
    other_model = model_spec("convnet_d1", channels=1, num_classes=3, resolution=8, width=8)
    with pytest.raises(TeslaError, match=r"e\.h5: expert trained for convnet_d1.*width=4.*width=8"):
        t.check_compatible(model_spec=other_model)
    with pytest.raises(TeslaError, match="another training split"):
        t.check_compatible(dataset_fingerprint="0" * 64)
    with pytest.raises(TeslaError, match="ZCA"):
        t.check_compatible(zca_fingerprint="a" * 64)
    with pytest.raises(TeslaError, match=r"4 snapshots \(0\.\.3\) are needed but the file keeps 3"):
        t.check_compatible(needed_snapshots=4)
    with pytest.raises(TeslaError, match="snapshot 3 asked for"):
        t.snapshot(3)


def test_input_normalisation_is_recorded_and_older_files_read_as_split(tmp_path):
    path = write(tmp_path / "e.h5", snaps(), input_normalization="mnist", input_mean=[0.1307], input_std=[0.3081])
    with Trajectory.open(path) as t:
        assert t.input_normalization == "mnist" and t.input_mean == [0.1307] and t.input_std == [0.3081]
    with h5py.File(path, "a") as f:  # as written before the name was recorded
        del f.attrs["input_normalization"]
    with Trajectory.open(path) as t:
        assert t.input_normalization == "split"


def test_version_2_records_the_epochs_trained_and_tested_and_version_1_still_reads(tmp_path):
    path = write(tmp_path / "e.h5", snaps(), epochs=2, epochs_requested=50, test_accuracy_epoch=2, precision="bf16")
    with Trajectory.open(path) as t:
        assert t.format_version == 2 == FORMAT_VERSION
        assert (t.epochs, t.epochs_requested, t.test_accuracy_epoch, t.precision) == (2, 50, 2, "bf16")
    defaults = write(tmp_path / "d.h5", snaps(), epochs=2)
    with Trajectory.open(defaults) as t:  # trained to the end, tested after it, float32
        assert (t.epochs, t.epochs_requested, t.test_accuracy_epoch, t.precision) == (2, 2, 2, "float32")
    with h5py.File(path, "a") as f:  # as tesla-trajectory v1 wrote it
        f.attrs["format_version"] = 1
        for key in ("epochs_requested", "test_accuracy_epoch", "precision"):
            del f.attrs[key]
    with Trajectory.open(path) as t:
        assert t.format_version == 1
        assert (t.epochs, t.epochs_requested, t.test_accuracy_epoch, t.precision) == (2, 2, 2, "float32")
        assert torch.equal(t.snapshot(1), snaps()[1])
    damaged = write(tmp_path / "x.h5", snaps())
    with h5py.File(damaged, "a") as f:  # a v2 file without a v2 attribute
        del f.attrs["test_accuracy_epoch"]
    with pytest.raises(TeslaError, match="incomplete expert trajectory .*test_accuracy_epoch"):
        Trajectory.open(damaged)
    with h5py.File(damaged, "a") as f:
        f.attrs["format_version"] = 3
    with pytest.raises(TeslaError, match="format version 3, this tesla reads version 1 and 2"):
        Trajectory.open(damaged)
