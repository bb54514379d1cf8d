"""Network input space (tesla.input_space): named normalisations, ZCA, the key."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from tesla.data import ImageSplit
from tesla.errors import TeslaError
from tesla.input_space import InputSpace, open_input_space
from tesla.normalizations import NORMALIZATIONS, PUBLISHED_CONSTANTS, input_space_key, resolve_normalization
from tesla.zca_fit import fit_zca_split

from conftest import write_prepared_split

pytestmark = pytest.mark.usefixtures("one_thread")


def write_split(path, channels: int = 3, size: int = 4, per_class: int = 20, seed: int = 0) -> ImageSplit:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, size=(per_class, size, size, channels), dtype=np.uint8) for _ in range(2)]
    return ImageSplit.open(write_prepared_split(path, images, class_ids=["a", "b"]))


@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("rgb") / "train.h5")


def reference_input(u: np.ndarray, mean, std) -> np.ndarray:
    """x = (u/255 - mean_c)/std_c in float64, N x H x W x C -> N x C x H x W (numpy, independently)."""
    x = u.astype(np.float64) / 255.0
    x = (x - np.asarray(mean, dtype=np.float64)) / np.asarray(std, dtype=np.float64)
    return x.transpose(0, 3, 1, 2)


@pytest.mark.parametrize("name", ["split", "none", "cifar10", "cifar100", "imagenet"])
def test_each_normalisation_maps_pixels_as_its_constants_say(rgb, name):
    u = rgb.images_uint8(slice(0, 7))
    mean, std = {
        "split": (rgb.mean, rgb.std),
        "none": ([0.0] * 3, [1.0] * 3),
        "cifar10": ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
        "cifar100": ([0.5071, 0.4866, 0.4409], [0.2673, 0.2564, 0.2762]),
        "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    }[name]
    space = InputSpace(resolve_normalization(name, rgb))
    got = space.to_input(u)
    assert got.dtype == torch.float32 and got.shape == (7, 3, 4, 4)
    np.testing.assert_allclose(got.numpy(), reference_input(u, mean, std), rtol=1e-6, atol=1e-6)
    if name == "none":
        np.testing.assert_allclose(got.numpy(), u.transpose(0, 3, 1, 2) / 255.0, rtol=1e-7, atol=1e-7)
    # the way back to pixels (for grids and PNG export) inverts it
    torch.testing.assert_close(space.to_pixels(got), torch.from_numpy(u).permute(0, 3, 1, 2) / 255.0, atol=1e-6, rtol=0)


def test_channel_count_is_checked(rgb, tmp_path):
    with pytest.raises(TeslaError, match=r"--normalize mnist: its constants are for 1-channel images.*has 3 channels"):
        resolve_normalization("mnist", rgb)
    grey = write_split(tmp_path / "grey.h5", channels=1)
    assert resolve_normalization("mnist", grey).mean == (0.1307,)
    with pytest.raises(TeslaError, match=r"cifar10: its constants are for 3-channel.*choose split, none, mnist"):
        resolve_normalization("cifar10", grey)
    assert resolve_normalization("none", grey).std == (1.0,)
    with pytest.raises(TeslaError, match="'cifar' is not a normalisation; choose one of split, none, cifar10"):
        resolve_normalization("cifar", rgb)
    assert set(NORMALIZATIONS) == {"split", "none", *PUBLISHED_CONSTANTS}


def test_minibatch_transform_equals_to_input(rgb, tmp_path):
    u = torch.from_numpy(rgb.images_uint8())
    zca_path = fit_zca_split(rgb.path, progress=False).save(tmp_path / "zca.h5")
    for space in (InputSpace(resolve_normalization("cifar10", rgb)), open_input_space(rgb, None, zca_path)):
        got = space.minibatch_transform("cpu")(u[:9])
        assert got.is_contiguous()
        assert torch.equal(got, space.to_input(u[:9].numpy()))


def test_key_names_the_space_from_settings_alone(rgb, tmp_path):
    assert input_space_key("split") == "split"
    assert input_space_key("cifar10") == "cifar10"
    assert input_space_key("none", 0.1) == "none+zca-eps0.1"
    assert input_space_key("split", 0.05) == "split+zca-eps0.05"
    with pytest.raises(TeslaError, match="eps must be positive"):
        input_space_key("none", 0.0)
    with pytest.raises(TeslaError, match="not a normalisation"):
        input_space_key("cifar-10")
    # the key of a space opened from files is the key of its settings
    zca_path = fit_zca_split(rgb.path, progress=False, normalization="none", eps=0.1).save(tmp_path / "zca.h5")
    assert open_input_space(rgb, None, zca_path).key == input_space_key("none", 0.1)
    assert open_input_space(rgb, "imagenet").key == "imagenet"
    assert open_input_space(rgb).key == "split"


def test_zca_decides_the_normalisation_and_a_contradiction_is_refused(rgb, tmp_path):
    zca_path = fit_zca_split(rgb.path, progress=False, normalization="none").save(tmp_path / "zca.h5")
    space = open_input_space(rgb, None, zca_path)
    assert space.name == "none" and space.mean == [0.0] * 3 and space.zca is not None
    assert open_input_space(rgb, "none", zca_path).name == "none"  # saying the same is fine
    with pytest.raises(TeslaError, match=r"--normalize split contradicts --zca .*fitted in normalisation none"):
        open_input_space(rgb, "split", zca_path)
    # x = W(u/255 - mu): no split statistics anywhere
    u = rgb.images_uint8(slice(0, 5))
    expected = space.zca.apply(torch.from_numpy(reference_input(u, [0.0] * 3, [1.0] * 3)))
    torch.testing.assert_close(space.to_input(u).double(), expected, rtol=1e-5, atol=1e-5)


def test_a_v1_zca_file_is_read_as_split_normalised(rgb, tmp_path):
    path = fit_zca_split(rgb.path, progress=False).save(tmp_path / "zca.h5")
    with h5py.File(path, "a") as f:  # what tesla-zca v1 files look like
        f.attrs["format_version"] = 1
        del f.attrs["normalization"]
    space = open_input_space(rgb, None, path)
    assert space.name == "split" and space.mean == rgb.mean and space.key == "split+zca-eps0.1"
    with pytest.raises(TeslaError, match="contradicts"):
        open_input_space(rgb, "none", path)


def test_a_zca_of_another_split_or_shape_is_refused(rgb, tmp_path):
    other = write_split(tmp_path / "other.h5", seed=5)
    zca_path = fit_zca_split(other.path, progress=False).save(tmp_path / "zca.h5")
    with pytest.raises(TeslaError, match="fitted on another training split"):
        open_input_space(rgb, None, zca_path)
    small = write_split(tmp_path / "small.h5", size=2)
    with pytest.raises(TeslaError, match=r"fitted on images of shape \(3, 2, 2\)"):
        open_input_space(rgb, None, fit_zca_split(small.path, progress=False).save(tmp_path / "small_zca.h5"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CUDA path of the input space)")
def test_cuda_input_equals_cpu_input(rgb, tmp_path):
    zca_path = fit_zca_split(rgb.path, progress=False, normalization="none").save(tmp_path / "zca.h5")
    u = rgb.images_uint8()
    for space in (InputSpace(resolve_normalization("cifar10", rgb)), open_input_space(rgb, None, zca_path)):
        cpu = space.to_input(u)
        torch.testing.assert_close(space.to_input(u, "cuda").cpu(), cpu, rtol=1e-5, atol=1e-5)
        batch = space.minibatch_transform("cuda")(torch.from_numpy(u).cuda())
        torch.testing.assert_close(batch.cpu(), cpu, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(space.to_pixels(batch), space.to_pixels(cpu), rtol=1e-5, atol=1e-5)


def test_the_experts_zca_is_refused_like_any_zca_of_another_split_or_shape(rgb, tmp_path):
    """experts_input_space checks the experts' ZCA file as open_input_space does (one check)."""
    from types import SimpleNamespace

    from tesla.input_space import experts_input_space
    from tesla.zca import ZCA, zca_fingerprint

    other = write_split(tmp_path / "other.h5", seed=5)
    foreign = fit_zca_split(other.path, progress=False).save(tmp_path / "zca.h5")
    small = write_split(tmp_path / "small.h5", size=2)
    tiny = fit_zca_split(small.path, progress=False).save(tmp_path / "small_zca.h5")
    for path, message in ((foreign, "fitted on another training split"), (tiny, r"fitted on images of shape \(3, 2, 2\)")):
        expert = SimpleNamespace(path="e.h5", zca_fingerprint=zca_fingerprint(ZCA.load(path)), input_normalization="split",
                                 input_mean=None, input_std=None)
        with pytest.raises(TeslaError, match=message):
            experts_input_space([expert], rgb, path)
