"""Image checks and decoding (core/images.py): every accepted format, EXIF orientation, refusals from
the header (bytes, pixels, decompression bombs), non-images and broken or truncated data."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from hsc.core.images import FORMATS, ImageError, ImageInfo, decode_image, probe_image

BIG = 10**9


def rgb_array(h: int = 12, w: int = 20) -> np.ndarray:
    """An asymmetric test picture: every pixel different, so a wrong rotation or flip shows."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 12 % 256, yy * 20 % 256, (xx + yy * w) % 256], axis=2).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels, with almost no data behind it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "fmt,lossless", [("PNG", True), ("BMP", True), ("TIFF", True), ("WEBP", False), ("JPEG", False)]
)
def test_every_supported_format_decodes_to_rgb(fmt, lossless):
    arr = rgb_array()
    data = encode(arr, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    info = probe_image(data, max_bytes=BIG, max_pixels=BIG)
    assert info == ImageInfo(format=fmt, width=20, height=12, orientation=1)
    rgb, meta = decode_image(data, max_pixels=BIG)
    assert rgb.shape == (12, 20, 3) and rgb.dtype == np.uint8 and rgb.flags.writeable
    assert meta == {"width": 20, "height": 12, "format": fmt, "exif_orientation_applied": 1}
    if lossless or fmt == "WEBP":  # lossless WebP
        assert np.array_equal(rgb, arr)
    else:
        assert np.abs(rgb.astype(int) - arr).mean() < 12
    assert fmt in FORMATS


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "1"])
def test_other_modes_become_rgb(mode):
    img = Image.fromarray(rgb_array()).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if mode == "CMYK" else "PNG")
    rgb, _ = decode_image(buf.getvalue(), max_pixels=BIG)
    assert rgb.shape == (12, 20, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb, np.array(img.convert("RGB")))


def test_16_bit_greyscale_is_scaled_to_8_bits():
    grey = (np.arange(12 * 20, dtype=np.uint16).reshape(12, 20) * 273).astype(np.uint16)  # up to 65247
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    rgb, _ = decode_image(buf.getvalue(), max_pixels=BIG)
    expected = np.round(grey / 65535.0 * 255.0).astype(np.uint8)
    assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1
    assert np.array_equal(rgb[..., 0], rgb[..., 2]) and rgb.max() > 250


def test_first_frame_of_a_multi_page_tiff():
    a, b = rgb_array(), 255 - rgb_array()
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="TIFF", save_all=True, append_images=[Image.fromarray(b)])
    rgb, meta = decode_image(buf.getvalue(), max_pixels=BIG)
    assert np.array_equal(rgb, a) and meta["format"] == "TIFF"


# ----------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_orientation_is_applied_and_reported(fmt, orientation):
    arr = rgb_array()
    kw = {"exif": exif_bytes(orientation)}
    if fmt == "WEBP":
        kw["lossless"] = True
    if fmt == "JPEG":
        kw["quality"] = 100
    data = encode(arr, fmt, **kw)
    expected = np.array(
        {
            1: lambda x: x,
            2: lambda x: x[:, ::-1],
            3: lambda x: x[::-1, ::-1],
            4: lambda x: x[::-1],
            5: lambda x: x.transpose(1, 0, 2),
            6: lambda x: np.rot90(x, -1),
            7: lambda x: x.transpose(1, 0, 2)[::-1, ::-1],  # the anti-diagonal
            8: lambda x: np.rot90(x, 1),
        }[orientation](arr)
    )
    info = probe_image(data, max_bytes=BIG, max_pixels=BIG)
    rgb, meta = decode_image(data, max_pixels=BIG)
    assert info.orientation == meta["exif_orientation_applied"] == orientation
    assert (
        (info.width, info.height) == (meta["width"], meta["height"]) == (expected.shape[1], expected.shape[0])
    )
    assert rgb.shape == expected.shape
    if fmt == "JPEG":
        assert np.abs(rgb.astype(int) - expected).mean() < 8
    else:
        assert np.array_equal(rgb, expected)


def test_png_exif_after_the_pixel_data_is_found_without_decoding():
    """Pillow writes ``eXIf`` before IDAT; other writers put it after. Move it there by hand."""
    data = encode(rgb_array(), "PNG", exif=exif_bytes(6))
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append(data[pos : pos + 12 + n])
        pos += 12 + n
    exif = [c for c in chunks if c[4:8] == b"eXIf"]
    rest = [c for c in chunks if c[4:8] != b"eXIf"]
    assert len(exif) == 1 and rest[-1][4:8] == b"IEND"
    moved = data[:8] + b"".join(rest[:-1]) + exif[0] + rest[-1]
    assert moved.index(b"eXIf") > moved.index(b"IDAT")
    info = probe_image(moved, max_bytes=BIG, max_pixels=BIG)
    assert (info.orientation, info.width, info.height) == (6, 12, 20)
    rgb, _ = decode_image(moved, max_pixels=BIG)
    assert np.array_equal(rgb, np.rot90(rgb_array(), -1))


def test_broken_exif_means_no_orientation():
    data = encode(rgb_array(), "JPEG", exif=b"Exif\x00\x00garbage-not-tiff")
    assert probe_image(data, max_bytes=BIG, max_pixels=BIG).orientation == 1
    rgb, meta = decode_image(data, max_pixels=BIG)
    assert rgb.shape == (12, 20, 3) and meta["exif_orientation_applied"] == 1


# ----------------------------------------------------------------------------- refusals


def refusal(fn, *args, **kw) -> ImageError:
    with pytest.raises(ImageError) as e:
        fn(*args, **kw)
    return e.value


def test_too_many_bytes():
    data = encode(rgb_array(), "PNG")
    e = refusal(probe_image, data, max_bytes=len(data) - 1, max_pixels=BIG)
    assert (e.code, e.status) == ("too_large", 413) and str(len(data)) in e.detail
    assert probe_image(data, max_bytes=len(data), max_pixels=BIG).width == 20


def test_too_many_pixels_from_the_header():
    data = encode(rgb_array(), "PNG")
    e = refusal(probe_image, data, max_bytes=BIG, max_pixels=239)
    assert (e.code, e.status) == ("too_large", 413) and "240" in e.detail
    assert refusal(decode_image, data, max_pixels=239).code == "too_large"
    assert decode_image(data, max_pixels=240)[0].shape == (12, 20, 3)


def test_decompression_bomb_is_refused_before_decoding():
    """A 200 000 x 200 000 header (40 gigapixels, 120 GB as RGB) in a few hundred bytes."""
    bomb = bomb_png(200_000, 200_000)
    assert len(bomb) < 200
    t0 = time.perf_counter()
    for fn in (lambda: probe_image(bomb, max_bytes=BIG, max_pixels=50_000_000),
               lambda: decode_image(bomb, max_pixels=50_000_000)):  # fmt: skip
        e = refusal(fn)
        assert (e.code, e.status) == ("too_large", 413)
    # above Pillow's own bomb limit too, with our limit out of the way
    assert refusal(decode_image, bomb, max_pixels=10**12).code == "too_large"
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, not an image at all",
        b"%PDF-1.4\n" + b"x" * 100,
        b"GIF89a" + b"\x00" * 50,
    ],
)
def test_non_images_are_unsupported_media(data):
    e = refusal(probe_image, data, max_bytes=BIG, max_pixels=BIG)
    assert (e.code, e.status) == ("unsupported_media", 415)
    assert refusal(decode_image, data, max_pixels=BIG).code == "unsupported_media"


def test_a_real_gif_is_unsupported_media():
    data = encode(rgb_array(), "GIF")
    e = refusal(probe_image, data, max_bytes=BIG, max_pixels=BIG)
    assert e.code == "unsupported_media" and "JPEG" in e.detail


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF"])
def test_broken_header_is_corrupt(fmt):
    data = encode(rgb_array(), fmt)
    broken = data[:16] + bytes(64)  # right magic bytes, nonsense after them
    e = refusal(probe_image, broken, max_bytes=BIG, max_pixels=BIG)
    assert (e.code, e.status) == ("corrupt_image", 422)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_pixel_data_is_corrupt(fmt):
    data = encode(rgb_array(64, 80), fmt)
    cut = data[: len(data) * 2 // 3]
    assert probe_image(cut, max_bytes=BIG, max_pixels=BIG).width == 80  # the header is intact
    e = refusal(decode_image, cut, max_pixels=BIG)
    assert (e.code, e.status) == ("corrupt_image", 422)


def test_bad_png_crc_is_corrupt():
    data = bytearray(encode(rgb_array(), "PNG"))
    i = data.index(b"IDAT")
    data[i + 8] ^= 0xFF  # a flipped byte inside the compressed data: CRC mismatch
    assert refusal(decode_image, bytes(data), max_pixels=BIG).code == "corrupt_image"


def test_image_error_fields():
    e = ImageError("corrupt_image", "bad")
    assert (e.code, e.detail, e.status) == ("corrupt_image", "bad", 422) and isinstance(e, ValueError)
    assert ImageError("too_large", "x", 400).status == 400
    with pytest.raises(ValueError, match="unknown image error code"):
        ImageError("nope", "x")
