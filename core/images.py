"""Uploaded images: check them from the header (:func:`probe_image`), then decode them to RGB with the
EXIF orientation applied (:func:`decode_image`). Pillow + numpy only (the API uses the probe, the
workers the decoder).

Accepted: JPEG (also multi-picture JPEG, which Pillow calls MPO), PNG, WebP, BMP, TIFF (first frame).
Refusals are :class:`ImageError` with a stable ``code`` and the HTTP status the API answers with:

* ``too_large`` (413): more bytes than allowed, or more pixels than allowed, read from the header,
  so a decompression bomb is refused before any pixel is decoded;
* ``unsupported_media`` (415): not an image, or an image format outside the list above;
* ``corrupt_image`` (422): the header or the pixel data is broken or truncated.

Sizes are the *displayed* ones: an EXIF orientation of 5-8 (a quarter turn) swaps width and height.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["FORMATS", "ImageError", "ImageInfo", "decode_image", "probe_image"]

#: Pillow format names we decode; MPO (a JPEG with extra pictures) is reported as JPEG.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")  # the JPEG opener also gives MPO
_STATUS = {"too_large": 413, "unsupported_media": 415, "corrupt_image": 422}
_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that shows the image upright (as PIL.ImageOps.exif_transpose)
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageError(ValueError):
    """An image the service refuses: ``code`` (stable), ``detail`` (what is wrong), ``status`` (HTTP)."""

    def __init__(self, code: str, detail: str, status: int | None = None) -> None:
        if code not in _STATUS:
            raise ValueError(f"unknown image error code {code!r}")
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.status = _STATUS[code] if status is None else int(status)


@dataclass(frozen=True)
class ImageInfo:
    """What the header says. ``width``/``height`` are the displayed (oriented) size; ``orientation``
    is the EXIF orientation tag (1 = none or absent)."""

    format: str
    width: int
    height: int
    orientation: int


def _sniff(data: bytes) -> str | None:
    """The supported format the magic bytes announce, or ``None``."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    return None


def _png_exif_chunk(data: bytes) -> bytes | None:
    """The payload of a PNG's ``eXIf`` chunk (which may follow the pixel data) without decoding."""
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"eXIf":
            return data[pos + 8 : pos + 8 + length]
        if kind == b"IEND":
            return None
        pos += 12 + length
    return None


def _orientation(img: Image.Image, data: bytes) -> int:
    """The EXIF orientation tag (1..8), read without decoding pixels; 1 when absent or unreadable."""
    try:
        if img.format == "PNG":
            raw = img.info.get("exif") or _png_exif_chunk(data)
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        value = int(exif.get(_ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block is not a broken image: show it as stored
        return 1
    return value if 1 <= value <= 8 else 1


def _stored_size(img: Image.Image) -> tuple[int, int]:
    """Width and height as stored (before any EXIF orientation). Recent Pillow versions report a TIFF's
    ``size`` already oriented and rotate it while loading; its tags still hold the stored size."""
    if img.format == "TIFF":
        tags = getattr(img, "tag_v2", {})
        if 256 in tags and 257 in tags:  # ImageWidth, ImageLength
            return int(tags[256]), int(tags[257])
    return img.size


def _orientation_left(img: Image.Image, orientation: int) -> int:
    """The orientation still to apply to a loaded image: recent Pillow versions apply a TIFF's itself while
    loading and then drops the tag."""
    if img.format == "TIFF" and _ORIENTATION_TAG not in getattr(img, "tag_v2", {}):
        return 1
    return orientation


def _open(data: bytes, max_pixels: int) -> tuple[Image.Image, ImageInfo]:
    """Open ``data`` (header only) and check format and size."""
    if not data:
        raise ImageError("unsupported_media", "the upload is empty")
    sniffed = _sniff(data)
    try:
        img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", str(e)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        if sniffed is None:
            raise ImageError(
                "unsupported_media", f"not an image in a supported format ({', '.join(FORMATS)})"
            ) from None
        raise ImageError("corrupt_image", f"broken {sniffed} header: {e}") from None
    fmt = "JPEG" if img.format == "MPO" else str(img.format)
    width, height = _stored_size(img)
    if width < 1 or height < 1:
        img.close()
        raise ImageError("corrupt_image", f"{fmt} header gives an empty image ({width}x{height})")
    if width * height > max_pixels:
        img.close()
        raise ImageError(
            "too_large", f"{width}x{height} = {width * height} pixels, more than the limit of {max_pixels}"
        )
    orientation = _orientation(img, data)
    if orientation >= 5:
        width, height = height, width
    return img, ImageInfo(format=fmt, width=int(width), height=int(height), orientation=orientation)


def probe_image(data: bytes, *, max_bytes: int, max_pixels: int) -> ImageInfo:
    """Format, displayed size and EXIF orientation of an encoded image, from its header only.

    Raises :class:`ImageError`: ``too_large`` (more than ``max_bytes`` bytes or ``max_pixels``
    pixels), ``unsupported_media`` (not a JPEG/PNG/WebP/BMP/TIFF), ``corrupt_image`` (broken header).
    """
    if len(data) > max_bytes:
        raise ImageError("too_large", f"{len(data)} bytes, more than the limit of {max_bytes}")
    img, info = _open(data, max_pixels)
    img.close()
    return info


def _to_rgb(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB of any Pillow mode; 16/32-bit and float greyscale scaled to 8 bits."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            top = 1.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 255.0
        else:
            top = 255.0 if float(arr.max(initial=0.0)) <= 255.0 else 65535.0
        grey = np.clip(np.nan_to_num(arr) * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)


def decode_image(data: bytes, *, max_pixels: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode an image upright: ``(rgb, info)``.

    ``rgb`` is a writeable ``(H, W, 3)`` uint8 RGB array at the displayed size (EXIF orientation
    applied; the first frame of a multi-page TIFF); ``info`` is ``{"width", "height", "format",
    "exif_orientation_applied"}`` (the orientation tag that was applied, 1 for none). Raises
    :class:`ImageError` as :func:`probe_image` does, and ``corrupt_image`` for truncated or broken
    pixel data.
    """
    img, info = _open(data, max_pixels)
    try:
        try:
            img.seek(0)
            img.load()
            left = _orientation_left(img, info.orientation)
            upright = img.transpose(_TRANSPOSE[left]) if left in _TRANSPOSE else img
            rgb = _to_rgb(upright)
        except MemoryError:
            raise
        except Exception as e:  # Pillow reports broken data with many exception types
            raise ImageError("corrupt_image", f"broken {info.format} data: {e}") from None
    finally:
        img.close()
    if rgb.shape[:2] != (info.height, info.width):  # Pillow and the header disagree
        raise ImageError("corrupt_image", f"decoded size {rgb.shape[:2]} differs from the header's")
    meta = {
        "width": info.width,
        "height": info.height,
        "format": info.format,
        "exif_orientation_applied": info.orientation,
    }
    return rgb, meta
