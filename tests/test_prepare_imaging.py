"""Decoding and resizing of single images (tesla.data.imaging): rules, conversions, fidelity bound."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from conftest import require_dataset
from tesla.data.imaging import (
    ImageRef,
    UndecodableImage,
    decode,
    decode_block,
    is_image_name,
    load_image,
    min_decoded_side,
    read_bytes,
    resize_array,
)


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(w: int, h: int, mode: str = "RGB") -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), (xx + yy) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB").convert(mode)


def test_box_rule_is_the_area_mean_of_the_whole_image():
    # a 4x2 image box-filtered to 2x2: each output pixel is the mean of a 2x1 cell (aspect not kept)
    px = np.array([[0, 10, 20, 30], [40, 50, 60, 70]], dtype=np.uint8)
    out, note = load_image(encode(Image.fromarray(px, "L"), "PNG"), "a.png", 2, "box", mode="L")
    assert note == ""
    assert out.shape == (2, 2, 1)
    assert out[..., 0].tolist() == [[5, 25], [45, 65]]


def test_center_crop_rule_uses_the_centred_square():
    px = np.zeros((2, 6), dtype=np.uint8)
    px[:, 2:4] = 200  # the centred 2x2 square
    out, _ = load_image(encode(Image.fromarray(px, "L"), "PNG"), "a.png", 2, "center-crop", mode="L")
    assert out[..., 0].tolist() == [[200, 200], [200, 200]]
    out_box, _ = load_image(encode(Image.fromarray(px, "L"), "PNG"), "a.png", 2, "box", mode="L")
    assert out_box[..., 0].tolist() == [[67, 67], [67, 67]]


def test_image_already_at_target_size_is_not_resized():
    px = (np.arange(32 * 32 * 3) % 251).astype(np.uint8).reshape(32, 32, 3)
    out, note = load_image(encode(Image.fromarray(px), "PNG"), "x.png", 32)
    assert note == "" and np.array_equal(out, px)
    assert resize_array(px, 32) is px


@pytest.mark.parametrize(
    "mode, fmt, name, expect",
    [
        ("L", "JPEG", "g.JPEG", "L to RGB"),
        ("CMYK", "JPEG", "c.JPEG", "CMYK to RGB"),
        ("P", "PNG", "p.png", "P to RGB"),
        ("RGBA", "PNG", "a.png", "RGBA to RGB"),
        ("RGB", "PNG", "n01440764_fake.JPEG", "PNG named .JPEG"),
    ],
)
def test_unusual_images_are_converted_and_reported(mode, fmt, name, expect):
    img = gradient(40, 30, "RGB").convert(mode)
    out, note = load_image(encode(img, fmt), name, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert expect in note
    reference = np.asarray(img.convert("RGB").resize((16, 16), Image.Resampling.BOX))
    if fmt == "PNG":  # lossless: exactly Pillow's conversion followed by the box resize
        assert np.array_equal(out, reference)


def test_greyscale_target_converts_rgb_to_l():
    img = gradient(20, 20)
    out, note = load_image(encode(img, "PNG"), "x.png", 10, mode="L")
    assert out.shape == (10, 10, 1) and note == "RGB to L"
    assert np.array_equal(out[..., 0], np.asarray(img.convert("L").resize((10, 10), Image.Resampling.BOX)))


def test_truncated_and_garbage_bytes_are_undecodable():
    data = encode(gradient(300, 200), quality=90)
    with pytest.raises(UndecodableImage):
        load_image(data[: len(data) // 2], "t.JPEG", 16)
    with pytest.raises(UndecodableImage):
        load_image(b"this is not an image", "x.jpg", 16)
    with pytest.raises(UndecodableImage):
        load_image(b"", "empty.jpg", 16)


def test_decode_block_keeps_good_images_in_order_and_reports_bad_ones(tmp_path):
    good = [gradient(50, 40 + 5 * i) for i in range(3)]
    paths = []
    for i, img in enumerate(good):
        p = tmp_path / f"{i}.jpg"
        p.write_bytes(encode(img))
        paths.append(p)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(encode(gradient(300, 200))[:500])
    refs = [ImageRef(str(paths[0]), str(paths[0])), ImageRef(str(bad), str(bad)), ImageRef(str(paths[1]), str(paths[1])),
            ImageRef(str(tmp_path / "missing.jpg"), str(tmp_path / "missing.jpg")), ImageRef(str(paths[2]), str(paths[2]))]
    res = decode_block(refs, 8, "box", "RGB")
    assert res.kept == [0, 2, 4]
    assert [i for i, _ in res.skipped] == [1, 3]
    assert res.images.shape == (3, 8, 8, 3)
    for k, i in enumerate(res.kept):
        assert np.array_equal(res.images[k], load_image(read_bytes(refs[i]), refs[i].name, 8)[0])


def test_read_bytes_of_a_byte_range(tmp_path):
    p = tmp_path / "blob"
    p.write_bytes(b"0123456789")
    assert read_bytes(ImageRef("x", str(p), offset=3, size=4)) == b"3456"
    with pytest.raises(UndecodableImage):
        read_bytes(ImageRef("x", str(p), offset=8, size=4))


def test_image_names():
    assert is_image_name("a/b/N01.JPEG") and is_image_name("x.png") and is_image_name("y.webp")
    assert not is_image_name("labels.txt") and not is_image_name("n01440764.tar") and not is_image_name("noext")


def test_reduced_decoding_keeps_at_least_the_minimum_side():
    img = gradient(1600, 1100)
    data = encode(img, quality=92)
    for s in (16, 32, 64, 128):
        dec, box, _ = decode(data, "big.jpg", s)
        assert min(dec.size) >= min_decoded_side(s)
    dec, box, _ = decode(data, "big.jpg", 64)
    assert dec.size == (400, 275)  # scale 1/4: 275 >= 256 while 1/8 would leave 138
    assert box == (0.0, 0.0, 400.0, 275.0)
    dec, box, _ = decode(data, "big.jpg", 128)  # 4 S = 512: only scale 1/2 keeps 550 >= 512
    assert dec.size == (800, 550) and box == (0.0, 0.0, 800.0, 550.0)
    dec_full, _, _ = decode(data, "big.jpg", 64, reduced=False)
    assert dec_full.size == (1600, 1100)


def test_fidelity_of_the_default_rule_on_the_imagenet_sample(datasets_dir):
    """Issue 9 bound: mean |ours - (full decode, RGB, box to S x S)| over all pixels <= 0.5 level."""
    sample = require_dataset(datasets_dir, "imagenet-sample/train")
    files = sorted(sample.glob("*/*.JPEG"))
    assert len(files) >= 200
    for size in (32, 64):
        total, count, reduced = 0.0, 0, 0
        for f in files:
            data = f.read_bytes()
            ours, _ = load_image(data, f.name, size)
            full = Image.open(io.BytesIO(data)).convert("RGB")
            reference = np.asarray(full.resize((size, size), Image.Resampling.BOX))
            total += np.abs(ours.astype(np.int64) - reference.astype(np.int64)).sum()
            count += reference.size
            reduced += min(full.size) >= 2 * min_decoded_side(size)
        mad = total / count
        assert reduced >= 5, "the sample must exercise reduced-size decoding for this test to mean anything"
        assert mad <= 0.5, f"S={size}: mean absolute difference {mad:.3f} grey levels exceeds 0.5"
        # and --full-decode gives exactly the reference pixels
        f = files[0]
        full_ours, _ = load_image(f.read_bytes(), f.name, size, reduced=False)
        assert np.array_equal(full_ours, np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.Resampling.BOX)))
