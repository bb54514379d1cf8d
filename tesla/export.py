"""``tesla export``: a synthetic set as PNG files or as a plain torch tensor file.

For people who use other tools. PNG files show the images as pixels: the set's input space
(``tesla.input_space``) is mapped back by inverting ZCA (when the set used it) and the
normalisation, u = clamp(T^-1(x) * std_c + mean_c, 0, 1), then quantised to 8 bits. The torch file keeps the
exact float tensors in network input space together with what is needed to use them.

"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from tesla.errors import TeslaError
from tesla.files import atomic_output
from tesla.grids import to_uint8_hwc
from tesla.settings import add_arguments, from_args, setting
from tesla.synthetic import SyntheticSet

TORCH_EXPORT_FORMAT = "tesla-synthetic-torch"
TORCH_EXPORT_VERSION = 1


def embedded_zca(synthetic: SyntheticSet):
    """The ZCA transform embedded in a synthetic set (None without ZCA)."""
    return synthetic.zca()


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "class"


def export_png(synthetic: SyntheticSet, out_dir: str | os.PathLike) -> list[Path]:
    """One PNG per image in ``out_dir/<index>_<class id>/<n>.png`` (class folders in class order).

    Written into a temporary sibling directory that is renamed to ``out_dir`` when complete
    (``out_dir`` must not exist, or be empty).
    """
    import shutil

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise TeslaError(f"{out_dir}: exists and is not an empty directory; give a new --png-dir or empty it")
    pixels = synthetic.input_space().to_pixels(synthetic.images)
    labels = synthetic.labels.cpu()
    width = len(str(max(1, synthetic.num_classes - 1)))
    relative: list[Path] = []
    counters: dict[int, int] = {}
    with atomic_output(out_dir) as tmp:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run with the same process id
        for n in range(synthetic.num_images):
            c = int(labels[n])
            folder = Path(f"{c:0{width}d}_{_safe_name(synthetic.class_ids[c])}")
            (tmp / folder).mkdir(parents=True, exist_ok=True)
            k = counters.get(c, 0)
            counters[c] = k + 1
            Image.fromarray(to_uint8_hwc(pixels[n])).save(tmp / folder / f"{k:05d}.png", format="PNG")
            relative.append(folder / f"{k:05d}.png")
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above): replaced by the finished folder
    return [out_dir / r for r in relative]


def export_torch(synthetic: SyntheticSet, path: str | os.PathLike) -> Path:
    """A plain ``torch.save`` dict: images (network input space), labels, soft labels, lr,
    mean/std, class ids/names, ZCA matrices (if any) and provenance; written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": TORCH_EXPORT_FORMAT,
        "format_version": TORCH_EXPORT_VERSION,
        "images": synthetic.images.detach().cpu().to(torch.float32),
        "labels": synthetic.labels.detach().cpu().to(torch.int64),
        "soft_labels": None if synthetic.soft_labels is None else synthetic.soft_labels.detach().cpu(),
        "lr": float(synthetic.lr),
        "mean": list(synthetic.mean),
        "std": list(synthetic.std),
        "normalization": synthetic.normalization,
        "input_space": synthetic.input_space().key,
        "class_ids": list(synthetic.class_ids),
        "class_names": list(synthetic.class_names),
        "dataset": synthetic.dataset,
        "dsa_strategy": synthetic.dsa_strategy,
        "model_spec": dict(synthetic.model_spec),
        "ipc": int(synthetic.ipc),
        "engine": synthetic.engine,
        "zca": synthetic.zca_artifact is not None,
        "zca_artifact": synthetic.zca_artifact,
        "settings": dict(synthetic.settings),
    }
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)
    return path


_TARGET = "target"


@dataclass(frozen=True)
class ExportCommand:
    """Everything ``tesla export`` is told: the synthetic set and one target."""

    synthetic: str = setting(help="synthetic set file written by 'tesla distill'", required=True, config=None)
    png_dir: str | None = setting(None, exclusive=_TARGET, required=True, config=None,
                                  help="write one PNG per image into class folders under this directory")
    torch_file: str | None = setting(None, flag="--torch", exclusive=_TARGET, required=True, config=None,
                                     help="write a plain torch.save file {images, labels, lr, ...}")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, ExportCommand)


def run(args: argparse.Namespace) -> int:
    command = from_args(ExportCommand, args)
    synthetic = SyntheticSet.load(command.synthetic)
    if command.png_dir:
        out = Path(command.png_dir)
        written = export_png(synthetic, out)
        print(f"wrote {len(written)} PNG files under {out}")
    else:
        export_torch(synthetic, command.torch_file)
        print(f"wrote {command.torch_file}")
    return 0
