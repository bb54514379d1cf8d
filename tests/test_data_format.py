"""The tesla-images split format: writer and reader."""

import h5py
import numpy as np
import pytest
import torch

from tesla.data import FORMAT_VERSION, ImageSplit, SplitDataset, SplitWriter, normalize
from tesla.errors import TeslaError

from conftest import assert_refuses_files_of_others


def _write(path, counts=(3, 2, 4), hw=4, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    imgs = [rng.integers(0, 256, size=(n, hw, hw, channels), dtype=np.uint8) for n in counts]
    with SplitWriter(path, dataset="toy", split="train", class_ids=["b", "a", "c"][: len(counts)],
                     height=hw, width=hw, channels=channels, source="test") as w:
        for c, block in enumerate(imgs):
            # append in two pieces to exercise streaming
            w.append(block[:1], [c])
            w.append(block[1:], [c] * (len(block) - 1))
        w.note_skipped("bad.jpg", "truncated")
    return np.concatenate(imgs)


def test_round_trip_and_statistics(tmp_path):
    path = tmp_path / "train.h5"
    pixels = _write(path)
    s = ImageSplit.open(path)
    assert s.num_images == 9 and s.num_classes == 3 and s.resolution == 4 and s.channels == 3
    assert s.class_offsets.tolist() == [0, 3, 5, 9]
    assert s.labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert np.array_equal(s.images_uint8(), pixels)
    assert np.array_equal(s.class_images(1), pixels[3:5])
    flat = pixels.reshape(-1, 3) / 255.0
    assert np.allclose(s.mean, flat.mean(0)) and np.allclose(s.std, flat.std(0))
    assert s.attrs["num_skipped"] == 1 and s.attrs["format_version"] == FORMAT_VERSION
    x, y = s.load_tensors(chunk=4)
    assert x.shape == (9, 3, 4, 4) and torch.equal(y, torch.as_tensor(s.labels))
    assert torch.allclose(x, normalize(pixels, s.mean, s.std))
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    ds = SplitDataset(path)
    img, label = ds[4]
    assert label == 1 and torch.allclose(img, x[4])


def test_per_class_sampling(tmp_path):
    path = tmp_path / "train.h5"
    pixels = _write(path)
    s = ImageSplit.open(path)
    imgs, labels = s.sample_per_class(2, torch.Generator().manual_seed(1))
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    for img, lab in zip(imgs, labels):
        lo, hi = s.class_offsets[lab], s.class_offsets[lab + 1]
        assert any(np.array_equal(img, p) for p in pixels[lo:hi])
    with pytest.raises(TeslaError, match="lower ipc to at most 2"):
        s.sample_per_class(3, torch.Generator().manual_seed(1))


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "train.h5"
    with pytest.raises(RuntimeError):
        with SplitWriter(path, dataset="toy", split="train", class_ids=["a"], height=2, width=2,
                         channels=1, source="test") as w:
            w.append(np.zeros((1, 2, 2, 1), np.uint8), [0])
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("labels, error, message", [
    ([[0]], TeslaError, "class b has no usable image"),
    ([[1], [0]], ValueError, "non-decreasing"),
], ids=["class b empty", "class a after class b"])
def test_a_split_the_writer_cannot_store_is_refused_and_leaves_nothing(tmp_path, labels, error, message):
    with pytest.raises(error, match=message):
        with SplitWriter(tmp_path / "t.h5", dataset="toy", split="train", class_ids=["a", "b"], height=2,
                         width=2, channels=1, source="test") as w:
            for batch in labels:
                w.append(np.zeros((len(batch), 2, 2, 1), np.uint8), batch)
    assert list(tmp_path.iterdir()) == []


def test_reader_errors(tmp_path):
    assert_refuses_files_of_others(ImageSplit.open, tmp_path, "prepared split file", other_format="tesla-synthetic")
    path = tmp_path / "train.h5"
    _write(path)
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(TeslaError, match="version 99"):
        ImageSplit.open(path)


@pytest.mark.parametrize("shape", [(7, 5, 3, 3), (3, 64, 64, 3), (70_000, 1, 1, 1), (2, 9, 4, 1)])
def test_channel_sums_are_exact(shape):
    from tesla.data.format import _channel_sums

    rng = np.random.default_rng(len(shape) + shape[0])
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    images[: shape[0] // 2] = 255  # the largest squares, many times over
    planes = images.reshape(-1, shape[-1]).astype(np.int64)
    total, squares = _channel_sums(images)
    assert total.dtype == np.int64 and total.tolist() == planes.sum(axis=0).tolist()
    assert squares.tolist() == (planes * planes).sum(axis=0).tolist()


def test_statistics_and_fingerprint_from_exact_sums(tmp_path):
    """mean/std come from exact integer sums and the fingerprint hashes labels and pixel bytes,
    whatever the blocks the images were appended in."""
    import hashlib
    import json

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(50, 6, 5, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(2), 25)
    for blocks in ([50], [1, 7, 42], [20, 30]):
        path = tmp_path / f"{len(blocks)}.h5"
        with SplitWriter(path, dataset="toy", split="train", class_ids=["a", "b"], height=6, width=5, channels=3, source="test") as w:
            start = 0
            for n in blocks:
                w.append(pixels[start : start + n], labels[start : start + n])
                start += n
        with h5py.File(path) as f:
            flat = pixels.reshape(-1, 3).astype(np.int64)
            mean = flat.sum(axis=0).astype(np.float64) / (255.0 * len(flat))
            std = np.sqrt(np.maximum((flat * flat).sum(axis=0).astype(np.float64) / (255.0**2 * len(flat)) - mean**2, 0.0))
            assert f.attrs["mean"].tolist() == mean.tolist() and f.attrs["std"].tolist() == std.tolist()
            digest = hashlib.sha256(
                hashlib.sha256(labels.astype(np.int64).tobytes()).digest() + hashlib.sha256(pixels.tobytes()).digest() + json.dumps(["a", "b"]).encode()
            ).hexdigest()
            assert f.attrs["fingerprint"] == digest
