"""Decoding and resizing one raw image into the S x S pixels of a prepared split.

The resize rules (documented in docs/formats.md, section *prepare*):

* ``box`` (default; the Downsampled-ImageNet rule of Chrabaszcz et al. 2017): the whole
  image, no crop, converted to RGB (or L for 1-channel datasets), box-filtered to S x S
  (the aspect ratio is not kept). Output pixel (i, j) is the area-weighted mean of the
  source pixels under the cell [j w/S, (j+1) w/S) x [i h/S, (i+1) h/S).
* ``center-crop``: the centred square of side min(w, h) is box-filtered to S x S (same
  as resizing the shorter side to S, then cropping the centre, without the intermediate
  rounding).
* either geometry with another resampling filter: ``box/lanczos``, ``center-crop/bicubic``
  (filters: box, bilinear, bicubic, lanczos; Pillow's antialiased resampling).

Reduced-size JPEG decoding (libjpeg's DCT scaling by 1/2, 1/4, 1/8) is used only at the
largest reduction that still leaves the shorter side at least ``max(256, 4 S)`` pixels
(:func:`min_decoded_side`); on the shared ImageNet sample this keeps the mean absolute
difference against a full decode followed by the same box resize far below 0.5 grey levels
(tests/test_prepare_imaging.py measures it). Images already at S x S are not resized.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

#: file name extensions that are read as images (case-insensitive)
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
#: the image format Pillow reports for each extension (to notice e.g. a PNG named .JPEG)
_FORMAT_OF_EXTENSION = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF",
    ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP", ".ppm": "PPM", ".pgm": "PPM", ".pbm": "PPM",
}
RESIZE_RULES = ("box", "center-crop")
#: resampling filters a rule may name after a slash ("center-crop/lanczos"); box is the default
RESIZE_FILTERS = {
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def resize_rule_name(geometry: str, filter_name: str = "box") -> str:
    """The rule string for a geometry and a filter: ``box``, ``center-crop/lanczos``, ..."""
    rule = geometry if filter_name == "box" else f"{geometry}/{filter_name}"
    parse_resize_rule(rule)
    return rule


def parse_resize_rule(rule: str) -> tuple[str, str]:
    """``GEOMETRY`` or ``GEOMETRY/FILTER`` -> (geometry, filter); ValueError when unknown."""
    geometry, _, filter_name = rule.partition("/")
    filter_name = filter_name or "box"
    if geometry not in RESIZE_RULES or filter_name not in RESIZE_FILTERS:
        raise ValueError(
            f"unknown resize rule {rule!r}; choose a geometry of {RESIZE_RULES}, optionally followed by "
            f"'/' and a filter of {tuple(RESIZE_FILTERS)}"
        )
    return geometry, filter_name
#: reduced JPEG decoding never leaves fewer than this many pixels on the shorter side
MIN_DECODED_SIDE = 256


class UndecodableImage(Exception):
    """The bytes are not a complete image Pillow can decode (reason in the message)."""


#: an object's default repr, e.g. ``<_io.BytesIO object at 0x7f3a...>``
_OBJECT_AT_ADDRESS = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


def undecodable_reason(exc: BaseException) -> str:
    """The reason an image is skipped, as the report shows it: the exception's type and message,
    the same from run to run (Pillow names the in-memory file it read by its memory address)."""
    if isinstance(exc, UnidentifiedImageError):
        return f"{type(exc).__name__}: not an image format Pillow can identify"
    return f"{type(exc).__name__}: " + _OBJECT_AT_ADDRESS.sub(r"<\1>", str(exc))


def is_image_name(name: str) -> bool:
    """True when the file name's extension is one of :data:`IMAGE_EXTENSIONS`."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def min_decoded_side(size: int) -> int:
    """Smallest shorter side a reduced JPEG decode may leave for target size S: max(256, 4 S)."""
    return max(MIN_DECODED_SIDE, 4 * int(size))


@dataclass(frozen=True)
class ImageRef:
    """One encoded image: a whole file on disk, or ``size`` bytes at ``offset`` in ``path``
    (a member of an uncompressed tar, possibly inside another tar). ``name`` is what reports show."""

    name: str
    path: str
    offset: int = 0
    size: int = -1


_open_files: dict[str, int] = {}


def read_bytes(ref: ImageRef) -> bytes:
    """The encoded bytes of ``ref`` (positional reads on a per-process cached descriptor)."""
    if ref.size < 0:
        with open(ref.path, "rb") as f:
            return f.read()
    fd = _open_files.get(ref.path)
    if fd is None:
        fd = os.open(ref.path, os.O_RDONLY)
        _open_files[ref.path] = fd
    data = os.pread(fd, ref.size, ref.offset)
    if len(data) != ref.size:
        raise UndecodableImage(f"archive ends after {len(data)} of {ref.size} bytes")
    return data


def decode(data: bytes, name: str, size: int, mode: str = "RGB", reduced: bool = True) -> tuple[Image.Image, tuple[float, float, float, float], str]:
    """Decode ``data`` fully (``reduced`` False) or at the allowed JPEG reduction.

    Returns (image in ``mode``, the box of the original picture in the decoded image's
    coordinates, a note saying what was converted, '' if nothing). Raises
    :class:`UndecodableImage` for truncated or unknown data.
    """
    try:
        img = Image.open(io.BytesIO(data))
        box = (0.0, 0.0, float(img.size[0]), float(img.size[1]))
        notes = []
        fmt = "JPEG" if img.format == "MPO" else img.format  # MPO: a JPEG with multi-picture extras
        expected = _FORMAT_OF_EXTENSION.get(os.path.splitext(name)[1].lower())
        if expected is not None and fmt != expected:
            notes.append(f"{img.format} named {os.path.splitext(name)[1]}")
        if reduced and fmt == "JPEG" and min(img.size) >= 2 * min_decoded_side(size):
            m = min_decoded_side(size)
            drafted = img.draft(None, (m, m))
            if drafted is not None:
                box = tuple(float(v) for v in drafted[1])
        img.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UndecodableImage(undecodable_reason(exc)) from None
    if img.mode != mode:
        notes.append(f"{img.mode} to {mode}")
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: scale to 8 bits
            arr = np.asarray(img, dtype=np.float64) / (65535.0 if img.mode.startswith("I;16") else max(1.0, float(np.max(img))))
            img = Image.fromarray(np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8), "L")
        img = img.convert(mode)
    return img, box, "; ".join(notes)


def resize_square(img: Image.Image, size: int, rule: str = "box", box: Sequence[float] | None = None) -> Image.Image:
    """Resample the picture (``box``: its extent in ``img``) to ``size`` x ``size`` by ``rule``:
    the whole picture (``box``) or its centred square (``center-crop``), with the box filter
    unless the rule names another (``center-crop/lanczos``)."""
    geometry, filter_name = parse_resize_rule(rule)
    w, h = img.size
    x0, y0, x1, y1 = box if box is not None else (0.0, 0.0, float(w), float(h))
    if geometry == "center-crop":
        side = min(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
        x0, x1, y0, y1 = cx - side / 2.0, cx + side / 2.0, cy - side / 2.0, cy + side / 2.0
    if (w, h) == (size, size) and (x0, y0, x1, y1) == (0.0, 0.0, float(w), float(h)):
        return img
    return img.resize((size, size), RESIZE_FILTERS[filter_name], box=(x0, y0, x1, y1))


def to_array(img: Image.Image) -> np.ndarray:
    """H x W x C uint8 pixels (C = 1 for mode L)."""
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def load_image(data: bytes, name: str, size: int, rule: str = "box", mode: str = "RGB", reduced: bool = True) -> tuple[np.ndarray, str]:
    """Encoded bytes -> (size x size x C uint8, conversion note) by the resize rule."""
    img, box, note = decode(data, name, size, mode, reduced)
    return to_array(resize_square(img, size, rule, box)), note


def resize_array(pixels: np.ndarray, size: int, rule: str = "box") -> np.ndarray:
    """Resize one H x W x C uint8 image (C = 1 or 3) to size x size x C by ``rule``."""
    if pixels.shape[0] == size and pixels.shape[1] == size:
        return pixels
    img = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    return to_array(resize_square(img, size, rule))


@dataclass
class BlockResult:
    """Decoded images of one block of refs: ``images[k]`` belongs to ``refs[kept[k]]``."""

    images: np.ndarray
    kept: list[int]
    converted: list[tuple[int, str]]
    skipped: list[tuple[int, str]]


def decode_block(refs: Sequence[ImageRef], size: int, rule: str, mode: str, reduced: bool = True) -> BlockResult:
    """Read, decode and resize a block of images (the unit of work of a pool worker)."""
    return decode_images([(ref.name, partial(read_bytes, ref)) for ref in refs], size, rule, mode, reduced)


def decode_images(inputs: Sequence[tuple[str, Callable[[], bytes]]], size: int, rule: str, mode: str,
                  reduced: bool = True) -> BlockResult:
    """Decode and resize each input, given as (its file name, a function reading its bytes) by
    :func:`load_image`; an input whose bytes cannot be read or decoded (:class:`UndecodableImage`,
    :class:`OSError`) is skipped with its reason, by position among ``inputs``."""
    channels = 1 if mode == "L" else 3
    out = np.empty((len(inputs), size, size, channels), dtype=np.uint8)
    kept: list[int] = []
    converted: list[tuple[int, str]] = []
    skipped: list[tuple[int, str]] = []
    for i, (name, read) in enumerate(inputs):
        try:
            data = read()
            pixels, note = load_image(data, name, size, rule, mode, reduced)
        except UndecodableImage as exc:
            skipped.append((i, str(exc)))
            continue
        except OSError as exc:
            skipped.append((i, f"unreadable: {exc}"))
            continue
        out[len(kept)] = pixels
        kept.append(i)
        if note:
            converted.append((i, note))
    return BlockResult(images=out[: len(kept)], kept=kept, converted=converted, skipped=skipped)


@dataclass
class LabelledBlock:
    """A block of decoded images in any class order, from a source that streams its split
    (Downsampled-ImageNet batches, parquet row groups): ``images[k]`` has class ``labels[k]``;
    ``skipped``/``converted`` are (input name, reason) pairs; ``inputs`` counts the inputs read."""

    images: np.ndarray
    labels: np.ndarray
    inputs: int
    skipped: list[tuple[str, str]]
    converted: list[tuple[str, str]]


def resize_block(pixels: np.ndarray, size: int, rule: str) -> np.ndarray:
    """Resize a block of N x H x W x C uint8 images to N x size x size x C."""
    return np.stack([resize_array(p, size, rule) for p in pixels]) if len(pixels) else pixels[:, :size, :size]
