"""`tesla report` (tesla/report.py): the plots the workflow's report rule makes.

Time budget: about 3 s.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from PIL import Image

from tesla.errors import TeslaError
from tesla.report import configure_parser, enlarge_png, moving_average, plot_curves, read_metrics, run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(path, n=30):
    rows = ["# format: tesla-distill-metrics, format_version: 1", "iteration,expert,start_epoch,loss,alpha,seconds"]
    rows += [f"{i},e.h5,0,{1.0 / i:.6f},{0.01 + 1e-4 * i:.6f},0.1" for i in range(1, n + 1)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _args(argv):
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(argv)


def test_moving_average_is_the_mean_of_the_last_w_values():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_allclose(moving_average(x, 2), [1.0, 1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(moving_average(x, 1), x)
    np.testing.assert_allclose(moving_average(x, 10), np.cumsum(x) / np.arange(1, 6))


def test_read_metrics_takes_the_curve_columns(tmp_path):
    m = read_metrics(_metrics(tmp_path / "metrics.csv"))
    assert set(m) == {"iteration", "loss", "alpha"}
    assert m["iteration"][0] == 1 and m["loss"][1] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("iteration,loss\n1,0.5\n", "alpha"),
        ("iteration,loss,alpha\n", "no iterations"),
    ],
)
def test_read_metrics_refuses_what_is_not_a_metrics_file(tmp_path, content, message):
    path = tmp_path / "metrics.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TeslaError, match=message):
        read_metrics(path)


def _colour_rows(rgb: np.ndarray, colour: tuple[int, int, int], tolerance: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) indices of the pixels within ``tolerance`` of ``colour`` (per channel)."""
    close = (np.abs(rgb.astype(np.int16) - np.array(colour, dtype=np.int16)) <= tolerance).all(axis=2)
    return np.nonzero(close)


def test_curves_png_draws_the_loss_left_and_alpha_right_with_their_trends(tmp_path):
    """The curves PNG is decoded and read back: the loss (moving average, colour C0) is drawn in the
    left panel and falls (1/i: its line ends lower than it starts), alpha (colour C1) is drawn in the
    right panel and rises. A blank, swapped or flat plot fails."""
    out = plot_curves(read_metrics(_metrics(tmp_path / "m.csv")), tmp_path / "sub" / "curves.png", title="t")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temporary left
    with Image.open(out) as img:
        rgb = np.asarray(img.convert("RGB"))
    half = rgb.shape[1] // 2
    for colour, panel, falls in (((31, 119, 180), slice(0, half), True), ((255, 127, 14), slice(half, None), False)):
        rows, cols = _colour_rows(rgb[:, panel], colour)
        assert len(rows) > 100, f"no curve of colour {colour} in its panel"
        other = slice(half, None) if panel.start == 0 else slice(0, half)
        assert len(_colour_rows(rgb[:, other], colour)[0]) < len(rows) // 10, "the curve is in the wrong panel"
        left, right = cols <= np.percentile(cols, 10), cols >= np.percentile(cols, 90)
        start, end = rows[left].mean(), rows[right].mean()  # image rows grow downwards
        assert (end > start + 20) if falls else (end < start - 20), (colour, start, end)


def test_enlarge_png_replicates_pixels_by_an_integer_factor(tmp_path):
    path = tmp_path / "g.png"
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(pixels).save(path)
    enlarge_png(path, min_width=10)
    with Image.open(path) as img:
        big = np.asarray(img)
    assert big.shape == (9, 12)  # k = ceil(10 / 4) = 3
    np.testing.assert_array_equal(big[::3, ::3], pixels)
    np.testing.assert_array_equal(big[2::3, 2::3], pixels)
    before = path.read_bytes()
    enlarge_png(path, min_width=10)  # wide enough now: unchanged
    assert path.read_bytes() == before


def test_cli_needs_an_output_and_its_input(tmp_path):
    with pytest.raises(TeslaError, match="nothing to do"):
        run(_args([]))
    with pytest.raises(TeslaError, match="--curves needs --metrics"):
        run(_args(["--curves", str(tmp_path / "c.png")]))
    with pytest.raises(TeslaError, match="--grid needs --synthetic"):
        run(_args(["--grid", str(tmp_path / "g.png")]))
    metrics = _metrics(tmp_path / "m.csv")
    assert run(_args(["--metrics", str(metrics), "--curves", str(tmp_path / "c.png")])) == 0
    direct = plot_curves(read_metrics(metrics), tmp_path / "direct.png", title=metrics.parent.name)
    with Image.open(tmp_path / "c.png") as a, Image.open(direct) as b:  # the CLI draws the same figure
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_grid_of_a_synthetic_set_has_one_row_per_class_and_is_enlarged(tmp_path):
    import torch

    from tesla.report import MIN_GRID_WIDTH, plot_grid
    from tesla.synthetic import SyntheticSet

    classes, ipc = 3, 2
    syn = SyntheticSet(
        images=torch.randn(classes * ipc, 1, 8, 8),
        labels=torch.arange(classes).repeat_interleave(ipc),
        lr=0.01,
        dataset="toy",
        num_classes=classes,
        class_ids=["a", "b", "c"],
        class_names=["a", "b", "c"],
        mean=[0.5],
        std=[0.25],
        dsa_strategy="none",
        model_spec={"name": "convnet_d1"},
        ipc=ipc,
        engine="exact",
    )
    syn.save(tmp_path / "synthetic.h5")
    out = plot_grid(tmp_path / "synthetic.h5", tmp_path / "grid.png")
    with Image.open(out) as img:
        grid = np.asarray(img)
    # 3 rows x 2 columns of 8 px tiles with 2 px of white padding: 22 x 32 px, enlarged by an
    # integer factor k until at least MIN_GRID_WIDTH wide
    k = -(-MIN_GRID_WIDTH // 22)
    assert grid.shape == (32 * k, 22 * k)
    small = grid[::k, ::k]
    np.testing.assert_array_equal(grid, np.kron(small, np.ones((k, k), dtype=grid.dtype)))  # blocks, no blur
    # every tile is its image mapped back to pixels, u = clamp(x * std + mean, 0, 1), row = class
    expected = np.floor(np.clip(syn.images.numpy() * 0.25 + 0.5, 0, 1) * 255 + 0.5).astype(np.uint8)
    for n in range(classes * ipc):
        r, c = divmod(n, ipc)
        y, x = 2 + r * 10, 2 + c * 10
        np.testing.assert_array_equal(small[y : y + 8, x : x + 8], expected[n, 0])
    assert (small[:2] == 255).all() and (small[:, :2] == 255).all()  # the padding is white
