"""ZCA whitening (tesla.zca) and the ``tesla zca`` command (tesla.zca_fit)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from tesla.cli import main
from tesla.data import ImageSplit, normalize
from tesla.errors import TeslaError
from tesla.zca import ZCA, CovarianceAccumulator, fit_zca
from tesla.zca_fit import fit_zca_split

from conftest import assert_refuses_files_of_others, blob_classes, write_prepared_split


def correlated_images(n: int = 600, shape=(2, 4, 4), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = int(np.prod(shape))
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.linspace(0.05, 2.0, d, dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix.T + 3.0
    return z.view(n, *shape)


def test_whitened_covariance_has_eigenvalues_s_over_s_plus_eps():
    x = correlated_images()
    zca = fit_zca(x, eps=0.1, chunk=97)  # chunks that do not divide N
    flat = x.reshape(len(x), -1)
    cov = torch.cov(flat.T)
    torch.testing.assert_close(zca.mean, flat.mean(0))
    s, _ = torch.linalg.eigh(cov)
    torch.testing.assert_close(zca.eigenvalues, s.clamp_min(0), rtol=1e-9, atol=1e-9)
    white = zca.apply(x).reshape(len(x), -1)
    w_cov = torch.cov(white.T)
    got = torch.linalg.eigvalsh(w_cov)
    torch.testing.assert_close(got, s / (s + 0.1), rtol=1e-8, atol=1e-8)
    # ZCA (not PCA): W is symmetric, so whitened images stay close to the originals
    w = zca.matrix()
    torch.testing.assert_close(w, w.T)
    assert white.mean(0).abs().max() < 1e-10


def test_invert_apply_is_identity_float32_and_float64():
    x = correlated_images(200)
    zca = fit_zca(x, eps=0.1)
    torch.testing.assert_close(zca.invert(zca.apply(x)), x, rtol=1e-9, atol=1e-9)
    x32 = x.float()
    torch.testing.assert_close(zca.invert(zca.apply(x32)), x32, rtol=1e-4, atol=1e-4)
    big = x32.clone()
    torch.testing.assert_close(zca.apply_chunked(big, chunk=33), zca.apply(x32))


def test_apply_is_differentiable():
    zca = fit_zca(correlated_images(100), eps=0.1)
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    (g,) = torch.autograd.grad(zca.apply(x).square().sum(), x)
    assert g.abs().sum() > 0


def test_streaming_covariance_matches_direct():
    x = torch.randn(1000, 5, dtype=torch.float64) * 10 + 1e4  # large offset: no cancellation
    acc = CovarianceAccumulator(5)
    for s in range(0, 1000, 64):
        acc.update(x[s : s + 64])
    torch.testing.assert_close(acc.covariance(), torch.cov(x.T), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(acc.mean(), x.mean(0))


def test_save_load_roundtrip(tmp_path):
    x = correlated_images(150)
    zca = fit_zca(x, eps=0.05)
    path = zca.save(tmp_path / "zca.h5")
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "tesla-zca" and f.attrs["format_version"] == 2
        assert f.attrs["normalization"] == "split"
    back = ZCA.load(path)
    assert back.eps == 0.05 and back.image_shape == (2, 4, 4) and back.normalization == "split"
    assert torch.equal(back.eigenvectors, zca.eigenvectors) and torch.equal(back.mean, zca.mean)
    torch.testing.assert_close(back.apply(x), zca.apply(x))
    assert not list(tmp_path.glob(".*tmp"))


def test_bad_files(tmp_path):
    assert_refuses_files_of_others(ZCA.load, tmp_path, "ZCA file")
    zca = fit_zca(correlated_images(50), eps=0.1)
    path = zca.save(tmp_path / "v3.h5")
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 3
    with pytest.raises(TeslaError, match="version 3, this tesla reads version 1 and 2"):
        ZCA.load(path)
    with pytest.raises(TeslaError, match="shape"):
        zca.apply(torch.zeros(1, 3, 4, 4))
    with pytest.raises(TeslaError, match="eps must be positive"):
        fit_zca(correlated_images(50), eps=0.0)


def write_split(path, n_per_class=40, classes=3, size=6, channels=3, seed=0):
    images = blob_classes(np.random.default_rng(seed), classes, n_per_class, size, channels, noise=(-40, 41))
    return write_prepared_split(path, images, dataset="tiny")


def test_cli_fits_on_split_in_network_space(tmp_path, capsys):
    train = write_split(tmp_path / "train.h5")
    out = tmp_path / "sub" / "zca.h5"
    assert main(["zca", "--train", str(train), "--out", str(out), "--eps", "0.1", "--chunk", "7"]) == 0
    zca = ZCA.load(out)
    split = ImageSplit.open(train)
    x = normalize(split.images_uint8(), split.mean, split.std).double()
    ref = fit_zca(x, eps=0.1)
    torch.testing.assert_close(zca.mean, ref.mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(zca.matrix(), ref.matrix(), rtol=1e-5, atol=1e-5)
    assert zca.meta["train_fingerprint"] == split.fingerprint and zca.meta["num_images"] == 120
    assert "wrote" in capsys.readouterr().err


def test_cli_errors(tmp_path, capsys):
    assert main(["zca", "--train", str(tmp_path / "nope.h5"), "--out", str(tmp_path / "z.h5")]) == 2
    assert "no such prepared split file" in capsys.readouterr().err
    train = write_split(tmp_path / "train.h5", n_per_class=2)
    with pytest.raises(SystemExit) as refused:  # as the arguments are parsed (tests/test_zca_settings.py)
        main(["zca", "--train", str(train), "--out", str(tmp_path / "z.h5"), "--eps", "-1"])
    assert refused.value.code == 2
    assert "argument --eps: -1.0 is outside the allowed range above 0" in capsys.readouterr().err
    assert not (tmp_path / "z.h5").exists()
    assert main(["zca", "--train", str(train), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_published_fit_equals_an_independent_float64_computation(tmp_path):
    """``tesla zca --normalize none``: the published way (pixels in [0, 1], no mean/std before
    it), checked against numpy: unbiased covariance, eigh, W = U diag(1/sqrt(s + eps)) U^T."""
    train = write_split(tmp_path / "train.h5", n_per_class=30, size=4)  # N = 90 images, D = 48
    out = tmp_path / "zca.h5"
    assert main(["zca", "--train", str(train), "--out", str(out), "--normalize", "none", "--chunk", "17"]) == 0
    zca = ZCA.load(out)
    assert zca.normalization == "none"
    split = ImageSplit.open(train)
    u = split.images_uint8()
    x = u.astype(np.float64).transpose(0, 3, 1, 2).reshape(len(u), -1) / 255.0  # C x H x W order, pixels in [0, 1]
    mu = x.mean(axis=0)
    cov = (x - mu).T @ (x - mu) / (len(x) - 1)
    s, vectors = np.linalg.eigh(cov)
    w = vectors @ np.diag(1.0 / np.sqrt(np.clip(s, 0, None) + 0.1)) @ vectors.T
    expected = (x - mu) @ w
    # the fit reads float32 network input (u/255 rounded to float32, ~3e-8), then sums in float64
    np.testing.assert_allclose(zca.mean.numpy(), mu, rtol=0, atol=1e-7)
    np.testing.assert_allclose(zca.matrix().numpy(), w, rtol=0, atol=1e-5)
    from tesla.input_space import open_input_space

    got = open_input_space(split, None, out).to_input(u).reshape(len(u), -1).numpy()  # the float32 path stages use
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f.attrs["normalization_mean"], [0.0, 0.0, 0.0])
        np.testing.assert_array_equal(f.attrs["normalization_std"], [1.0, 1.0, 1.0])
    # the default (split statistics) is a different transform of the same pixels
    split_fit = fit_zca_split(train, progress=False)
    assert split_fit.normalization == "split"
    assert (split_fit.eigenvalues > 0.1).sum() > (zca.eigenvalues > 0.1).sum()  # eps weaker against larger variances


def test_covariance_convention_is_kornias_unbiased_default():
    """kornia's own test case: ZCAWhitening() on [[0,1],[1,0],[-1,0],[0,-1]] gives
    sqrt(1.5) * sign(x) with unbiased=True (the default MTT used), sqrt(2) with unbiased=False."""
    data = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    white = fit_zca(data.view(4, 2, 1, 1), eps=1e-12).apply(data.view(4, 2, 1, 1)).view(4, 2)
    torch.testing.assert_close(white, data * 1.5**0.5, rtol=1e-9, atol=1e-9)


def test_cli_refuses_a_normalisation_for_other_channels(tmp_path, capsys):
    train = write_split(tmp_path / "train.h5", n_per_class=3)
    assert main(["zca", "--train", str(train), "--out", str(tmp_path / "z.h5"), "--normalize", "mnist"]) == 2
    assert "constants are for 1-channel images" in capsys.readouterr().err
    assert not (tmp_path / "z.h5").exists()
