"""Encoders for what annotation tools import: label PNGs, COCO RLE, Label Studio brush RLE, CVAT masks.

Torch-free (numpy + PIL). Every encoder has a decoder, and every pair round-trips (tests/core).

Input conventions
=================
A *label map* is an ``(H, W)`` uint8 array in VOC label space: ``0`` background, ``c + 1`` the class
``class_names[c]``, ``255`` ignore. The per-class encoders (COCO, Label Studio, CVAT) emit only the
classes present in the map, skip background and ignore, and raise ``ValueError`` for any other value
outside ``1..len(class_names)``. A *binary mask* is any ``(H, W)`` array; non-zero means foreground.
Pixel ``(row y, column x)`` is ``mask[y, x]``; "row-major" walks ``x`` fastest, "column-major" ``y``.

1. Label PNG (:func:`label_to_png`, :func:`png_to_label`)
---------------------------------------------------------
*Palette PNG*: an 8-bit indexed ("P" mode) PNG whose pixel values are the labels themselves, with the
PASCAL VOC colour table attached (label 0 black, 1 dark red, 2 dark green, ..., 255 cream). Viewers
show colours; ``np.array(PIL.Image.open(f))`` gives the labels back unchanged. *Greyscale PNG*: an
8-bit "L" PNG with the same values (looks almost black; for tools that want raw values).
:func:`png_to_label` also reads an RGB rendering of the VOC colours back to labels.
:func:`mask_to_base64_png` / :func:`mask_from_base64_png` wrap these in base64 for JSON answers
(optionally as a ``data:image/png;base64,`` URL).

2. COCO RLE (:func:`coco_rle_encode`, :func:`coco_rle_decode`) - what pycocotools' ``mask.encode`` does
------------------------------------------------------------------------------------------------------
``{"size": [H, W], "counts": "<string>"}``. The mask is read **column-major** (down the first column,
then the second, ...) and cut into runs of equal values, alternating 0-runs and 1-runs, **starting with
a 0-run** (of length 0 when the first pixel is foreground). The run lengths ``c[0], c[1], ...`` are
then written as a string: from the fourth run on (index ``i > 2``) the value written is
``c[i] - c[i-2]`` (a signed difference), the first three are written as they are. Each value is cut
into 5-bit groups, least significant first; each group becomes one character ``48 + group``, with
``0x20`` added when more groups follow; the last group's bit ``0x10`` is the sign (the value is
sign-extended from it). So ``0..15`` are one character (``'0'..'?'``), ``-1`` is ``'O'``. Example: the
2x3 mask ``[[0,1,1],[1,0,0]]`` is, column-major, ``0 1 1 0 1 0``: runs ``[1, 2, 1, 1, 1]``, written
``1, 2, 1, 1-2=-1, 1-1=0`` = ``"121O0"``. A zero-sized mask has counts ``[0]`` (``"0"``).
The decoder also accepts ``counts`` as bytes, or as a plain list of run lengths (COCO "uncompressed
RLE").

3. Label Studio brush RLE (:func:`mask_to_brush_rle`, :func:`brush_rle_to_mask`)
-------------------------------------------------------------------------------
What a ``BrushLabels`` region's ``value.rle`` holds: a list of byte values (ints ``0..255``), the
bytes of a bit stream (most significant bit first) in the "rle-pack" scheme, over the mask expanded to
RGBA: every pixel is written 4 times (R, G, B, A) row-major, so ``W*H*4`` values, ``255`` for
foreground and ``0`` for background (Label Studio draws the alpha channel). The bit stream is:

- a header: 32 bits the number of values (``W*H*4``); 5 bits the word size minus 1 (``7``, so 8-bit
  values); four 4-bit fields, each a run-length field width minus 1: widths ``3, 4, 8, 16``;
- then runs until that many values are produced. A run is 1 flag bit (``1`` = one value repeated,
  ``0`` = a sequence of literal values), 2 bits selecting one of the four widths, the run length minus
  1 in that many bits, then the value (8 bits) once for a repeat run, or once per value for a literal
  run;
- zero bits up to a whole byte. Like the Label Studio SDK encoder, when the stream already ends on a
  byte boundary a whole zero byte is still appended (decoders ignore it; kept for byte-identity).

The encoder makes exactly the bytes of the SDK's ``mask2rle`` on the 0/255 mask: runs of one value use
a literal run of length 1 (never happens for RGBA masks); runs of 2-8 values use width 3, 9-16 width 4,
17-256 width 8, longer runs width 16, cut into pieces of 65536 values with the last piece holding the
rest. Example: a 1x1 foreground mask is 4 values of 255: header ``count=4, 7, 2, 3, 7, 15`` then the run
``1 00 011 11111111`` and 5 pad bits = ``[0, 0, 0, 4, 57, 27, 252, 127, 224]``.
:func:`labelstudio_results` builds the prediction ``result`` list, one region per present class.

4. CVAT (:func:`cvat_function_items`, :func:`cvat_encode_mask`)
---------------------------------------------------------------
*Function response* (what a serverless "detector" returns; CVAT converts it itself): a list of items
``{"label": name, "type": "mask", "mask": [...], "points": [...], "confidence": c}``. ``mask`` is the
region's bounding box cut out of the mask, **row-major**, one ``0`` or ``1`` per pixel, followed by
the box ``[xtl, ytl, xbr, ybr]`` with **inclusive** corners (a single pixel at ``(x, y)`` is
``[1, x, y, x, y]``). hsc emits **one item per connected region** (8-connected by default) of each
present class, as CVAT's own semantic-segmentation example does, or one item per class
(``per="class"``). ``points`` (per-region items only) is the region's outer outline as a polygon
``[x0, y0, x1, y1, ...]`` along pixel edges: pixel ``(x, y)`` is the square ``[x, x+1] x [y, y+1]``, so
the polygon covers exactly the region's pixels with its holes filled (polygons cannot have holes); only
corners are listed, clockwise on screen, starting at the top-left corner of the region's first pixel.
CVAT uses ``points`` instead of ``mask`` when the user ticks "convert masks to polygons".

*Stored / REST mask* (the ``points`` of a ``LabeledShape`` of type ``"mask"``, what
``cvat_sdk.masks.encode_mask`` makes): run lengths over the box, row-major, alternating 0-runs and
1-runs **starting with a 0-run** (``0`` when the box starts with foreground), followed by
``[x1, y1, x2 - 1, y2 - 1]`` where ``[x1, y1, x2, y2]`` is the box with exclusive right/bottom, i.e.
again the inclusive corners. Without a box, the box is the tight box of the foreground; an empty mask
gives ``[1, 0, 0, 0, 0]`` (a 1x1 empty box at the origin).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from PIL import Image

__all__ = [
    "IGNORE_INDEX",
    "voc_palette",
    "label_to_png",
    "png_to_label",
    "mask_to_base64_png",
    "mask_from_base64_png",
    "present_labels",
    "coco_counts_to_string",
    "coco_string_to_counts",
    "coco_rle_encode",
    "coco_rle_decode",
    "coco_rle_per_class",
    "rle_pack_encode",
    "rle_pack_decode",
    "mask_to_brush_rle",
    "brush_rle_to_mask",
    "labelstudio_results",
    "labelstudio_prediction",
    "labelstudio_results_to_label",
    "connected_regions",
    "outer_contour",
    "cvat_bitmap_with_box",
    "cvat_bitmap_with_box_decode",
    "cvat_function_items",
    "cvat_items_to_label",
    "cvat_encode_mask",
    "cvat_decode_mask",
    "cvat_mask_shapes",
]

IGNORE_INDEX = 255

# ---------------------------------------------------------------------------------------------- helpers


def _as_mask(mask: ArrayLike) -> NDArray[np.bool_]:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {m.shape}")
    return m != 0 if m.dtype != np.bool_ else m


def _as_label(label: ArrayLike) -> NDArray[np.uint8]:
    lab = np.asarray(label)
    if lab.ndim != 2 or lab.dtype != np.uint8:
        raise ValueError(f"expected an (H, W) uint8 label map, got {lab.shape} {lab.dtype}")
    return lab


def present_labels(label: ArrayLike, class_names: Sequence[str]) -> list[int]:
    """Label values (``1..len(class_names)``) present in a label map, ascending; background (0) and
    ignore (255) left out. Any other value raises ``ValueError``."""
    lab = _as_label(label)
    values = np.flatnonzero(np.bincount(lab.ravel(), minlength=256))
    bad = [int(v) for v in values if v != 0 and v != IGNORE_INDEX and v > len(class_names)]
    if bad:
        raise ValueError(f"label values {bad} are not classes (there are {len(class_names)} classes)")
    return [int(v) for v in values if 0 < v <= len(class_names)]


def _zero_first_runs(flat: NDArray[np.bool_]) -> NDArray[np.int64]:
    """Lengths of the alternating runs of a 1-D boolean array, the first one a (possibly empty) 0-run.
    An empty array gives ``[0]``."""
    n = flat.size
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [n]))
    runs = np.diff(bounds).astype(np.int64)
    if flat[0]:
        runs = np.concatenate(([0], runs))
    return runs


# ------------------------------------------------------------------------------------- 1. label PNGs


def voc_palette(n: int = 256) -> NDArray[np.uint8]:
    """The PASCAL VOC colour table, ``(n, 3)`` uint8: label ``i``'s colour from the bits of ``i``
    (bit 0 -> red, bit 1 -> green, bit 2 -> blue, from the most significant colour bit down):
    0 black, 1 (128, 0, 0), 2 (0, 128, 0), ..., 255 (224, 224, 192)."""
    idx = np.arange(n, dtype=np.int64)
    pal = np.zeros((n, 3), dtype=np.int64)
    c = idx.copy()
    for j in range(8):
        for ch in range(3):
            pal[:, ch] |= ((c >> ch) & 1) << (7 - j)
        c >>= 3
    return pal.astype(np.uint8)


def label_to_png(label: ArrayLike, *, palette: bool = True) -> bytes:
    """PNG bytes of a label map: indexed with the VOC palette (default), or plain 8-bit greyscale.
    Either way the pixel values are the labels."""
    lab = np.ascontiguousarray(_as_label(label))
    h, w = lab.shape
    if h == 0 or w == 0:
        raise ValueError("a PNG cannot be empty")
    if palette:
        img = Image.frombytes("P", (w, h), lab.tobytes())
        img.putpalette(voc_palette().reshape(-1).tolist())
    else:
        img = Image.frombytes("L", (w, h), lab.tobytes())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _colours_to_labels(rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
    pal = voc_palette().astype(np.int64)
    keys = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    order = np.argsort(keys)
    sorted_keys = keys[order]
    px = rgb.astype(np.int64)
    k = (px[..., 0] << 16) | (px[..., 1] << 8) | px[..., 2]
    pos = np.clip(np.searchsorted(sorted_keys, k), 0, len(sorted_keys) - 1)
    found = sorted_keys[pos] == k
    if not found.all():
        bad = rgb[~found][0].tolist()
        raise ValueError(f"colour {bad} is not in the VOC palette")
    return order[pos].astype(np.uint8)


def png_to_label(data: bytes) -> NDArray[np.uint8]:
    """The label map from PNG bytes: an indexed PNG gives its indices, a greyscale one its values, an
    RGB(A) one is read back through the VOC colours (``ValueError`` for any other colour)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode in ("P", "L"):
            return np.array(img, dtype=np.uint8)
        if img.mode == "1":
            return np.array(img, dtype=np.uint8)
        if img.mode in ("RGB", "RGBA"):
            return _colours_to_labels(np.array(img.convert("RGB"), dtype=np.uint8))
        if img.mode in ("I", "I;16", "I;16B", "I;16L"):
            arr = np.array(img)
            if arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
                raise ValueError("16/32-bit PNG holds values outside 0..255")
            return arr.astype(np.uint8)
        raise ValueError(f"unsupported PNG mode {img.mode!r}")


def mask_to_base64_png(label: ArrayLike, *, palette: bool = True, data_url: bool = False) -> str:
    """A label map as base64 PNG text (see :func:`label_to_png`), optionally a ``data:`` URL."""
    text = base64.b64encode(label_to_png(label, palette=palette)).decode("ascii")
    return "data:image/png;base64," + text if data_url else text


def mask_from_base64_png(text: str) -> NDArray[np.uint8]:
    """The label map from base64 PNG text or a ``data:image/png;base64,`` URL."""
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ValueError("expected a base64 data URL")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"not valid base64: {e}") from None
    return png_to_label(data)


# -------------------------------------------------------------------------------------- 2. COCO RLE


def coco_counts_to_string(counts: Sequence[int] | NDArray[np.integer]) -> str:
    """Run lengths -> the COCO compressed string (see the module docstring)."""
    cnts = [int(c) for c in counts]
    out: list[str] = []
    for i, c in enumerate(cnts):
        x = c - cnts[i - 2] if i > 2 else c
        more = True
        while more:
            group = x & 0x1F
            x >>= 5  # arithmetic shift: Python ints keep the sign
            more = (x != -1) if (group & 0x10) else (x != 0)
            if more:
                group |= 0x20
            out.append(chr(group + 48))
    return "".join(out)


def coco_string_to_counts(s: str | bytes) -> list[int]:
    """The COCO compressed string -> run lengths (inverse of :func:`coco_counts_to_string`)."""
    data = s.encode("ascii") if isinstance(s, str) else bytes(s)
    cnts: list[int] = []
    p = 0
    while p < len(data):
        x = 0
        k = 0
        more = True
        while more:
            if p >= len(data):
                raise ValueError("COCO counts string ends inside a value")
            c = data[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid character {chr(data[p])!r} in COCO counts string")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(cnts) > 2:
            x += cnts[-2]
        cnts.append(x)
    return cnts


def coco_rle_encode(mask: ArrayLike) -> dict[str, Any]:
    """``{"size": [H, W], "counts": str}`` exactly as ``pycocotools.mask.encode`` gives it (with
    ``counts`` decoded to text)."""
    m = _as_mask(mask)
    h, w = m.shape
    runs = _zero_first_runs(m.ravel(order="F"))
    return {"size": [int(h), int(w)], "counts": coco_counts_to_string(runs)}


def coco_rle_decode(rle: Mapping[str, Any]) -> NDArray[np.bool_]:
    """The ``(H, W)`` boolean mask of a COCO RLE (compressed string/bytes or a list of run lengths)."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    cnts = coco_string_to_counts(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if any(c < 0 for c in cnts) or sum(cnts) != h * w:
        raise ValueError(f"COCO RLE run lengths do not add up to {h}x{w} pixels")
    values = np.arange(len(cnts)) % 2 == 1
    flat = np.repeat(values, cnts)
    return flat.reshape(w, h).T.copy()


def coco_rle_per_class(label: ArrayLike, class_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{class name: COCO RLE}`` for every class present in a label map."""
    lab = _as_label(label)
    return {class_names[v - 1]: coco_rle_encode(lab == v) for v in present_labels(lab, class_names)}


# ------------------------------------------------------------------------- 3. Label Studio brush RLE

_RLE_WIDTHS = (3, 4, 8, 16)  # run-length field widths the Label Studio SDK writes
_PIECE = 1 << 16  # longest run one width-16 field can hold


def _pack_bits(values: NDArray[np.int64], widths: NDArray[np.int64]) -> tuple[bytes, int]:
    """Concatenate fields (``values[i]`` in ``widths[i]`` bits, most significant bit first) and pack
    them into bytes, zero-padded; also returns the number of bits."""
    out = bytearray()
    carry = np.zeros(0, dtype=np.uint8)
    total = 0
    step = 1 << 15  # fields per chunk, bounds the temporary bit arrays
    for a in range(0, len(values), step):
        v, wd = values[a : a + step], widths[a : a + step]
        nbits = int(wd.sum())
        total += nbits
        field = np.repeat(np.arange(len(v)), wd)
        start = np.cumsum(wd) - wd
        shift = wd[field] - 1 - (np.arange(nbits) - start[field])
        bits = np.concatenate((carry, ((v[field] >> shift) & 1).astype(np.uint8)))
        whole = len(bits) // 8 * 8
        out += np.packbits(bits[:whole]).tobytes()
        carry = bits[whole:]
    if len(carry):
        out += np.packbits(carry).tobytes()
    return bytes(out), total


def _runs_to_fields(lengths: NDArray[np.int64], values: NDArray[np.int64]) -> tuple[NDArray, NDArray]:
    """Run-pack fields for runs of equal 8-bit values, as the Label Studio SDK chooses them. Flag,
    selector, length and value of a run are one field (14 to 27 bits)."""
    n_pieces = np.where(lengths > 256, (lengths - 1) // _PIECE + 1, 1)
    run = np.repeat(np.arange(len(lengths)), n_pieces)
    piece = np.arange(len(run)) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
    last = piece == n_pieces[run] - 1
    # all pieces but the last hold 65536 values; the last holds the rest (1..65536)
    plen = np.where(last, lengths[run] - (n_pieces[run] - 1) * _PIECE, _PIECE)
    long_run = lengths[run] > 256
    sel = np.select([long_run, plen > 16, plen > 8], [3, 2, 1], default=0)
    width = np.asarray(_RLE_WIDTHS, dtype=np.int64)[sel]
    flag = (plen > 1) | long_run  # a run of one value is written as a literal sequence of one
    fields = (flag.astype(np.int64) << (width + 10)) | (sel << (width + 8)) | ((plen - 1) << 8) | values[run]
    return fields, width + 11


def rle_pack_encode(values: ArrayLike) -> list[int]:
    """Encode a 1-D sequence of 8-bit values (``0..255``) in the rle-pack scheme Label Studio reads,
    byte for byte as the SDK's ``encode_rle`` does. Returns the byte values as ints."""
    v = np.asarray(values).ravel()
    if v.size and (v.min() < 0 or v.max() > 255):
        raise ValueError("values must be in 0..255")
    v = v.astype(np.int64)
    if v.size:
        ends = np.concatenate((np.flatnonzero(v[1:] != v[:-1]), [v.size - 1]))
        lengths = np.diff(np.concatenate(([-1], ends)))
        fields, widths = _runs_to_fields(lengths, v[ends])
    else:
        fields = widths = np.zeros(0, dtype=np.int64)
    return _rle_pack_stream(v.size, fields, widths)


def _rle_pack_stream(count: int, fields: NDArray[np.int64], widths: NDArray[np.int64]) -> list[int]:
    if count >= 1 << 32:
        raise ValueError("too many values for a 32-bit count")
    header = [count, 8 - 1, *(w - 1 for w in _RLE_WIDTHS)]
    header_widths = [32, 5, 4, 4, 4, 4]
    all_fields = np.concatenate((np.asarray(header, dtype=np.int64), fields))
    all_widths = np.concatenate((np.asarray(header_widths, dtype=np.int64), widths))
    data, nbits = _pack_bits(all_fields, all_widths)
    out = list(data)
    if nbits % 8 == 0:
        out.append(0)  # the SDK pads with 8 - nbits % 8 zero bits, a whole byte when already aligned
    return out


def rle_pack_decode(rle: Sequence[int] | bytes) -> NDArray[np.integer]:
    """Decode an rle-pack byte stream (any word size and field widths from its header) to its 1-D
    values (uint8 for words up to 8 bits)."""
    data = bytes(bytearray(rle))
    bits = (np.unpackbits(np.frombuffer(data, dtype=np.uint8)) + ord("0")).tobytes().decode("ascii")
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        if pos + n > len(bits):
            raise ValueError("brush RLE stream is truncated")
        x = int(bits[pos : pos + n], 2) if n else 0
        pos += n
        return x

    num = read(32)
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    dtype: type[np.integer] = np.uint8 if word <= 8 else np.uint16 if word <= 16 else np.uint32
    out: NDArray[np.integer] = np.zeros(num, dtype=dtype)
    i = 0
    while i < num:
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        if j > num:
            raise ValueError("brush RLE run goes past the value count")
        if repeat:
            out[i:j] = read(word)
        else:
            for k in range(i, j):
                out[k] = read(word)
        i = j
    return out


def mask_to_brush_rle(mask: ArrayLike) -> list[int]:
    """Label Studio brush RLE of a binary mask (foreground -> 255 in all four RGBA channels); the same
    bytes as the SDK's ``mask2rle(mask_as_0_or_255_uint8)``."""
    m = _as_mask(mask)
    flat = m.ravel()
    n = flat.size
    if n == 0:
        return _rle_pack_stream(0, np.zeros(0, np.int64), np.zeros(0, np.int64))
    ends = np.concatenate((np.flatnonzero(flat[1:] != flat[:-1]), [n - 1]))
    lengths = np.diff(np.concatenate(([-1], ends))) * 4
    values = flat[ends].astype(np.int64) * 255
    fields, widths = _runs_to_fields(lengths, values)
    return _rle_pack_stream(4 * n, fields, widths)


def brush_rle_to_mask(rle: Sequence[int] | bytes, height: int, width: int) -> NDArray[np.bool_]:
    """The ``(height, width)`` boolean mask of a Label Studio brush RLE (alpha channel non-zero)."""
    values = rle_pack_decode(rle)
    if values.size != height * width * 4:
        raise ValueError(f"brush RLE holds {values.size} values, not {height}x{width}x4")
    return values.reshape(height, width, 4)[..., 3] != 0


def _region_scores(
    lab: NDArray[np.uint8],
    v: int,
    name: str,
    confidence: NDArray[np.floating] | None,
    scores: Mapping[str, float] | None,
) -> float | None:
    if confidence is not None:
        return round(float(confidence[lab == v].mean()), 4)
    if scores is not None and name in scores:
        return float(scores[name])
    return None


def _check_confidence(confidence: ArrayLike | None, shape: tuple[int, ...]) -> NDArray | None:
    if confidence is None:
        return None
    conf = np.asarray(confidence, dtype=np.float64)
    if conf.shape != shape:
        raise ValueError(f"confidence map {conf.shape} and label map {shape} differ in size")
    return conf


def labelstudio_results(
    label: ArrayLike,
    class_names: Sequence[str],
    *,
    from_name: str,
    to_name: str,
    label_map: Mapping[str, str] | None = None,
    confidence: ArrayLike | None = None,
    scores: Mapping[str, float] | None = None,
    id_prefix: str = "hsc",
) -> list[dict[str, Any]]:
    """Label Studio prediction ``result`` regions, one ``brushlabels`` region per present class.

    ``label_map`` renames model classes to the project's ``<Label value>``; the region ``score`` is the
    mean of ``confidence`` (an ``(H, W)`` map) over the class's pixels, else ``scores[name]``, else
    left out. Region ids are ``f"{id_prefix}_{label value}"``: stable, unique within the result.
    """
    lab = _as_label(label)
    conf = _check_confidence(confidence, lab.shape)
    h, w = lab.shape
    out = []
    for v in present_labels(lab, class_names):
        name = class_names[v - 1]
        region: dict[str, Any] = {
            "id": f"{id_prefix}_{v}",
            "from_name": from_name,
            "to_name": to_name,
            "type": "brushlabels",
            "original_width": int(w),
            "original_height": int(h),
            "image_rotation": 0,
            "value": {
                "format": "rle",
                "rle": mask_to_brush_rle(lab == v),
                "brushlabels": [label_map.get(name, name) if label_map else name],
            },
            "readonly": False,
        }
        score = _region_scores(lab, v, name, conf, scores)
        if score is not None:
            region["score"] = score
        out.append(region)
    return out


def labelstudio_prediction(
    results: list[dict[str, Any]], *, score: float | None = None, model_version: str | None = None
) -> dict[str, Any]:
    """One Label Studio prediction (what ``/predict`` answers per task, or ``/api/predictions`` takes):
    ``{"result": [...], "score": s, "model_version": v}``, without the keys that are ``None``."""
    pred: dict[str, Any] = {"result": results}
    if score is not None:
        pred["score"] = float(score)
    if model_version is not None:
        pred["model_version"] = model_version
    return pred


def labelstudio_results_to_label(
    results: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    *,
    label_map: Mapping[str, str] | None = None,
) -> NDArray[np.uint8]:
    """Paint ``brushlabels`` regions back into a label map (later regions over earlier ones)."""
    names = {(label_map.get(n, n) if label_map else n): i + 1 for i, n in enumerate(class_names)}
    brushes = [r for r in results if r.get("type") == "brushlabels"]
    if not brushes:
        raise ValueError("no brushlabels regions")
    h, w = int(brushes[0]["original_height"]), int(brushes[0]["original_width"])
    out = np.zeros((h, w), dtype=np.uint8)
    for r in brushes:
        value = r["value"]
        out[brush_rle_to_mask(value["rle"], h, w)] = names[value["brushlabels"][0]]
    return out


# --------------------------------------------------------------------------------------------- 4. CVAT


def connected_regions(mask: ArrayLike, connectivity: Literal[4, 8] = 8) -> tuple[NDArray[np.int32], int]:
    """Label the connected regions of a binary mask: ``(labels, n)``, ``labels`` int32 with 0 outside
    and ``1..n`` numbered in the order of each region's first pixel (row-major)."""
    if connectivity not in (4, 8):
        raise ValueError("connectivity must be 4 or 8")
    m = _as_mask(mask)
    h, w = m.shape
    labels = np.zeros((h, w), dtype=np.int32)
    if m.size == 0 or not m.any():
        return labels, 0
    # horizontal runs, row by row: start column and end column (exclusive)
    d = np.diff(np.pad(m, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    row, start = np.nonzero(d == 1)
    _, end = np.nonzero(d == -1)
    k = 1 if connectivity == 8 else 0
    stride = w + 2
    key_start = row * stride + start
    key_end = row * stride + end
    # runs of the row above that touch each run: end > start - k and start < end + k
    lo = np.searchsorted(key_end, (row - 1) * stride + start - k, side="right")
    hi = np.searchsorted(key_start, (row - 1) * stride + end + k, side="left")
    cnt = np.maximum(hi - lo, 0)
    a = np.repeat(np.arange(len(row)), cnt)
    b = np.repeat(lo, cnt) + (np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt))
    parent = list(range(len(row)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in zip(a.tolist(), b.tolist()):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([find(i) for i in range(len(row))], dtype=np.int64)
    uniq, first = np.unique(roots, return_index=True)
    rank = np.empty(len(uniq), dtype=np.int32)
    rank[np.argsort(first)] = np.arange(1, len(uniq) + 1, dtype=np.int32)
    comp = rank[np.searchsorted(uniq, roots)]
    lengths = end - start
    flat_start = row * w + start
    idx = np.repeat(flat_start - (np.cumsum(lengths) - lengths), lengths) + np.arange(lengths.sum())
    labels.ravel()[idx] = np.repeat(comp, lengths)
    return labels, len(uniq)


# direction: 0 east, 1 south, 2 west, 3 north (image coordinates, y down)
_DX = (1, 0, -1, 0)
_DY = (0, 1, 0, -1)
# pixel (column offset, row offset) ahead-left and ahead-right of vertex (x, y) when moving in a direction
_AHEAD_LEFT = ((0, -1), (0, 0), (-1, 0), (-1, -1))
_AHEAD_RIGHT = ((0, 0), (-1, 0), (-1, -1), (0, -1))


def outer_contour(region: ArrayLike, connectivity: Literal[4, 8] = 8) -> list[int]:
    """The outer outline of one connected region as a polygon ``[x0, y0, x1, y1, ...]`` along pixel
    edges (pixel ``(x, y)`` is the square ``[x, x+1] x [y, y+1]``), corners only, clockwise on screen,
    starting at the top-left corner of the first foreground pixel (row-major). The polygon encloses
    the region with its holes filled. With several regions in ``region``, the first one is traced;
    ``connectivity`` must be the one the region was found with (8: diagonal neighbours belong to it).
    """
    m = _as_mask(region)
    if not m.any():
        raise ValueError("empty region")
    p = np.pad(m, 1).astype(np.uint8)
    wp = p.shape[1]
    grid = p.tobytes()
    first = int(np.flatnonzero(p.ravel())[0])
    y0, x0 = divmod(first, wp)
    x, y, d = x0, y0, 0
    pts = [x0 - 1, y0 - 1]
    while True:
        x += _DX[d]
        y += _DY[d]
        if x == x0 and y == y0:
            break
        lx, ly = _AHEAD_LEFT[d]
        rx, ry = _AHEAD_RIGHT[d]
        left = grid[(y + ly) * wp + x + lx]
        right = grid[(y + ry) * wp + x + rx]
        if left and (right or connectivity == 8):
            nd = (d + 3) % 4  # turn left
        elif right:
            nd = d  # straight on
        else:
            nd = (d + 1) % 4  # turn right
        if nd != d:
            pts += [x - 1, y - 1]
            d = nd
    return pts


def cvat_bitmap_with_box(mask: ArrayLike) -> list[int]:
    """CVAT function-response ``mask``: the tight box of the foreground cut out row-major as 0/1,
    followed by the inclusive box ``[xtl, ytl, xbr, ybr]``. ``ValueError`` for an empty mask."""
    m = _as_mask(mask)
    if not m.any():
        raise ValueError("empty mask")
    return _bitmap_box(*_tight_crop(m))


def cvat_bitmap_with_box_decode(encoded: Sequence[float], *, image_width: int, image_height: int) -> NDArray:
    """The full-image boolean mask of a CVAT function-response ``mask`` (bitmap + inclusive box)."""
    if len(encoded) < 5:
        raise ValueError("too few elements")
    x1, y1, x2, y2 = (int(v) for v in encoded[-4:])
    if not (0 <= x1 <= x2 < image_width and 0 <= y1 <= y2 < image_height):
        raise ValueError("box outside the image")
    bitmap = np.asarray(encoded[:-4])
    if bitmap.size != (x2 - x1 + 1) * (y2 - y1 + 1):
        raise ValueError("bitmap size does not match the box")
    out = np.zeros((image_height, image_width), dtype=bool)
    out[y1 : y2 + 1, x1 : x2 + 1] = bitmap.reshape(y2 - y1 + 1, x2 - x1 + 1) != 0
    return out


def _tight_crop(m: NDArray[np.bool_]) -> tuple[NDArray[np.bool_], int, int]:
    ys, xs = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
    y0, x0 = int(ys[0]), int(xs[0])
    return m[y0 : int(ys[-1]) + 1, x0 : int(xs[-1]) + 1], x0, y0


def _class_parts(
    lab: NDArray[np.uint8], v: int, per: str, connectivity: Literal[4, 8], min_area: int
) -> list[tuple[NDArray[np.bool_], int, int]]:
    """The pixels of class ``v`` as ``(tight crop, x0, y0)``: one part, or one per connected region."""
    m = lab == v
    if per == "class":
        return [_tight_crop(m)] if int(m.sum()) >= min_area else []
    if per != "region":
        raise ValueError("per must be 'region' or 'class'")
    regions, n = connected_regions(m, connectivity)
    ys, xs = np.nonzero(regions)
    r = regions[ys, xs]
    areas = np.bincount(r, minlength=n + 1)
    big = np.iinfo(np.int64).max
    x_lo, y_lo = np.full(n + 1, big), np.full(n + 1, big)
    x_hi, y_hi = np.full(n + 1, -1), np.full(n + 1, -1)
    np.minimum.at(x_lo, r, xs)
    np.minimum.at(y_lo, r, ys)
    np.maximum.at(x_hi, r, xs)
    np.maximum.at(y_hi, r, ys)
    parts = []
    for k in range(1, n + 1):
        if areas[k] >= min_area:
            x0, y0 = int(x_lo[k]), int(y_lo[k])
            parts.append((regions[y0 : y_hi[k] + 1, x0 : x_hi[k] + 1] == k, x0, y0))
    return parts


def _bitmap_box(crop: NDArray[np.bool_], x0: int, y0: int) -> list[int]:
    h, w = crop.shape
    return crop.astype(np.uint8).ravel().tolist() + [x0, y0, x0 + w - 1, y0 + h - 1]


def cvat_function_items(
    label: ArrayLike,
    class_names: Sequence[str],
    *,
    per: Literal["region", "class"] = "region",
    connectivity: Literal[4, 8] = 8,
    min_area: int = 1,
    points: bool = True,
    confidence: ArrayLike | None = None,
    scores: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """What a CVAT serverless detector returns for a label map: per present class, one item per
    connected region (default) or one per class, each ``{"label", "type": "mask", "mask",
    "confidence"}`` plus ``"points"`` (outer outline, see :func:`outer_contour`) for regions when
    ``points``. Regions smaller than ``min_area`` pixels are skipped. ``confidence`` is the mean of an
    ``(H, W)`` confidence map over the item's pixels, else ``scores[name]``, else ``None``."""
    lab = _as_label(label)
    conf = _check_confidence(confidence, lab.shape)
    items: list[dict[str, Any]] = []
    for v in present_labels(lab, class_names):
        name = class_names[v - 1]
        for crop, x0, y0 in _class_parts(lab, v, per, connectivity, min_area):
            if conf is not None:
                h, w = crop.shape
                c: float | None = round(float(conf[y0 : y0 + h, x0 : x0 + w][crop].mean()), 4)
            else:
                c = float(scores[name]) if scores is not None and name in scores else None
            item: dict[str, Any] = {"label": name, "type": "mask", "mask": _bitmap_box(crop, x0, y0)}
            if points and per == "region":
                outline = outer_contour(crop, connectivity)
                item["points"] = [p + (x0 if i % 2 == 0 else y0) for i, p in enumerate(outline)]
            item["confidence"] = c
            items.append(item)
    return items


def cvat_items_to_label(
    items: Sequence[Mapping[str, Any]], class_names: Sequence[str], *, height: int, width: int
) -> NDArray[np.uint8]:
    """Paint CVAT function-response mask items back into a label map (later items over earlier)."""
    index = {n: i + 1 for i, n in enumerate(class_names)}
    out = np.zeros((height, width), dtype=np.uint8)
    for it in items:
        if it.get("type") != "mask":
            continue
        out[cvat_bitmap_with_box_decode(it["mask"], image_width=width, image_height=height)] = index[
            it["label"]
        ]
    return out


def cvat_encode_mask(bitmap: ArrayLike, bbox: Sequence[float] | None = None) -> list[int]:
    """CVAT's stored mask (the ``points`` of a ``type="mask"`` shape), as ``cvat_sdk.masks.encode_mask``:
    row-major run lengths over the box starting with a 0-run, then ``[x1, y1, x2 - 1, y2 - 1]``.
    ``bbox`` is ``[x1, y1, x2, y2]`` with exclusive ``x2, y2`` (floored / ceiled); without it, the tight
    box of the foreground (``[0, 0, 1, 1]`` for an empty mask)."""
    m = _as_mask(bitmap)
    if bbox is None:
        ys, xs = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
        if ys.size == 0:
            x1 = y1 = 0
            x2 = y2 = 1
        else:
            x1, y1, x2, y2 = int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1
    else:
        x1, y1 = math.floor(bbox[0]), math.floor(bbox[1])
        x2, y2 = math.ceil(bbox[2]), math.ceil(bbox[3])
        if not (0 <= x1 < x2 <= m.shape[1] and 0 <= y1 < y2 <= m.shape[0]):
            raise ValueError("bbox has invalid coordinates")
    runs = _zero_first_runs(m[y1:y2, x1:x2].ravel())
    return runs.tolist() + [x1, y1, x2 - 1, y2 - 1]


def cvat_decode_mask(encoded: Sequence[float], *, image_width: int, image_height: int) -> NDArray[np.bool_]:
    """The ``(image_height, image_width)`` boolean mask of a CVAT stored mask."""
    if len(encoded) < 5:
        raise ValueError("too few elements in encoded mask")
    vals = []
    for x in encoded:
        if isinstance(x, float) and not x.is_integer():
            raise ValueError(f"non-integer value in encoded mask: {x!r}")
        vals.append(int(x))
    *runs, x1, y1, x2, y2 = vals
    x2 += 1
    y2 += 1
    if not (0 <= x1 < x2 <= image_width and 0 <= y1 < y2 <= image_height):
        raise ValueError("invalid encoded bounding box")
    if any(r < 0 for r in runs) or sum(runs) != (y2 - y1) * (x2 - x1):
        raise ValueError("encoded bitmap does not match encoded bounding box")
    flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
    out = np.zeros((image_height, image_width), dtype=bool)
    out[y1:y2, x1:x2] = flat.reshape(y2 - y1, x2 - x1)
    return out


def cvat_mask_shapes(
    label: ArrayLike,
    class_names: Sequence[str],
    *,
    per: Literal["region", "class"] = "class",
    connectivity: Literal[4, 8] = 8,
    min_area: int = 1,
) -> list[dict[str, Any]]:
    """CVAT shapes for the REST API / SDK: ``{"label": name, "type": "mask", "points": stored mask}``
    per present class (default) or per connected region; the caller adds ``frame`` and ``label_id``."""
    lab = _as_label(label)
    return [
        {
            "label": class_names[v - 1],
            "type": "mask",
            "points": _zero_first_runs(crop.ravel()).tolist()
            + [x0, y0, x0 + crop.shape[1] - 1, y0 + crop.shape[0] - 1],
        }
        for v in present_labels(lab, class_names)
        for crop, x0, y0 in _class_parts(lab, v, per, connectivity, min_area)
    ]
