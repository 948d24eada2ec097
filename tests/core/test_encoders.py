"""Encoders for annotation tools (hsc.core.encoders): hand-worked vectors from the format descriptions,
round trips on random / empty / full / 1x1 / odd-sized masks, and, where the reference packages are
installed (pycocotools, label-studio-sdk or label-studio-converter, cvat-sdk), byte-identity with them."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from hsc.core import encoders as E

CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle"]
SHAPES = [(1, 1), (1, 7), (7, 1), (2, 3), (5, 9), (13, 17), (31, 24)]


def _masks(seed: int = 0):
    """(name, mask) pairs: empty, full, random densities, a disc touching the right/bottom border."""
    rng = np.random.default_rng(seed)
    for shape in SHAPES:
        h, w = shape
        yield f"{shape}-empty", np.zeros(shape, bool)
        yield f"{shape}-full", np.ones(shape, bool)
        for p in (0.1, 0.5, 0.9):
            yield f"{shape}-rand{p}", rng.random(shape) < p
        yy, xx = np.mgrid[:h, :w]
        yield f"{shape}-disc", (yy - h) ** 2 + (xx - w) ** 2 < (max(h, w) * 0.6) ** 2


MASKS = list(_masks())


def _label_map(seed: int = 1, shape=(23, 31)) -> np.ndarray:
    """A label map with classes 1, 2, 4 (class 3 'bird' and 5 'bottle' absent), background and ignore."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.uint8)
    lab[2:12, 3:15] = 1
    lab[14:, 18:] = 4  # touches the bottom and right border
    lab[rng.random(shape) < 0.05] = 2  # scattered single pixels
    lab[0, 0] = 2
    lab[5:7, 20:22] = 255
    return lab


# ------------------------------------------------------------------------------------------- PNG


def test_voc_palette_known_colours():
    pal = E.voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[0].tolist() == [0, 0, 0]
    assert pal[1].tolist() == [128, 0, 0]
    assert pal[2].tolist() == [0, 128, 0]
    assert pal[15].tolist() == [192, 128, 128]  # person
    assert pal[255].tolist() == [224, 224, 192]  # ignore
    assert len({tuple(c) for c in pal.tolist()}) == 256  # every label has its own colour


@pytest.mark.parametrize("palette", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (375, 500), (7, 2)])
def test_label_png_round_trip(palette, shape):
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 21, size=shape).astype(np.uint8)
    lab.ravel()[:: max(1, lab.size // 3)] = 255
    data = E.label_to_png(lab, palette=palette)
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG" and img.mode == ("P" if palette else "L") and img.size == shape[::-1]
    assert np.array_equal(np.array(img), lab)  # the pixel values are the labels
    if palette:
        assert img.getpalette()[: 3 * 3] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
    assert np.array_equal(E.png_to_label(data), lab)


def test_png_to_label_reads_voc_colours_and_refuses_others():
    lab = _label_map()
    rgb = E.voc_palette()[lab]
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    assert np.array_equal(E.png_to_label(buf.getvalue()), lab)
    rgb[0, 0] = (1, 2, 3)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    with pytest.raises(ValueError, match="not in the VOC palette"):
        E.png_to_label(buf.getvalue())


def test_base64_png_helpers():
    lab = _label_map()
    text = E.mask_to_base64_png(lab)
    assert np.array_equal(np.array(Image.open(io.BytesIO(base64.b64decode(text)))), lab)
    assert np.array_equal(E.mask_from_base64_png(text), lab)
    url = E.mask_to_base64_png(lab, palette=False, data_url=True)
    assert url.startswith("data:image/png;base64,")
    assert np.array_equal(E.mask_from_base64_png(url), lab)
    with pytest.raises(ValueError):
        E.mask_from_base64_png("not base64!")


def test_label_inputs_are_checked():
    with pytest.raises(ValueError):
        E.label_to_png(np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError):
        E.label_to_png(np.zeros((0, 3), np.uint8))
    with pytest.raises(ValueError, match="not classes"):
        E.present_labels(np.full((2, 2), 9, np.uint8), CLASSES)
    assert E.present_labels(_label_map(), CLASSES) == [1, 2, 4]


# -------------------------------------------------------------------------------------- COCO RLE


@pytest.mark.parametrize(
    "mask, counts",
    [
        # column-major 0 1 1 0 1 0 -> runs [1, 2, 1, 1, 1] -> 1, 2, 1, (1-2 = -1 -> 'O'), (1-1 = 0)
        ([[0, 1, 1], [1, 0, 0]], "121O0"),
        (np.zeros((2, 3)), "6"),  # one 0-run of 6
        (np.ones((2, 3)), "06"),  # empty 0-run, then a 1-run of 6
        ([[0]], "1"),
        ([[1]], "01"),
        (np.zeros((0, 3)), "0"),  # pycocotools writes counts [0] for a zero-sized mask
    ],
)
def test_coco_rle_hand_vectors(mask, counts):
    m = np.asarray(mask)
    rle = E.coco_rle_encode(m)
    assert rle == {"size": list(m.shape), "counts": counts}
    assert np.array_equal(E.coco_rle_decode(rle), m != 0)


def test_coco_rle_large_counts_and_signs():
    # runs [1600, 400, 248000]: 1600 = 0b1_10010_00000 -> groups 0, 18, 1 -> 'P' (0|0x20), 'b' (18|0x20),
    # '1'; 400 -> '`' '<'; 248000 - 1600 = 246400 -> 'P' 'V' 'b' '7'. (pycocotools 2.0.11 agrees.)
    m = np.zeros((500, 500), bool)
    m[100:, 3] = True
    assert E.coco_rle_encode(m)["counts"] == "Pb1`<PVb7"
    counts = [3, 70000, 2, 1, 123456, 0, 7, 5]
    assert E.coco_string_to_counts(E.coco_counts_to_string(counts)) == counts


@pytest.mark.parametrize("name, mask", MASKS, ids=[n for n, _ in MASKS])
def test_coco_rle_round_trip(name, mask):
    rle = E.coco_rle_encode(mask)
    json.dumps(rle)
    assert rle["size"] == list(mask.shape)
    assert np.array_equal(E.coco_rle_decode(rle), mask)
    assert np.array_equal(E.coco_rle_decode({"size": rle["size"], "counts": rle["counts"].encode()}), mask)


def test_coco_rle_decoder_accepts_uncompressed_and_checks_size():
    assert np.array_equal(
        E.coco_rle_decode({"size": [2, 3], "counts": [1, 2, 1, 1, 1]}), [[0, 1, 1], [1, 0, 0]]
    )
    with pytest.raises(ValueError):
        E.coco_rle_decode({"size": [2, 3], "counts": [1, 2]})
    with pytest.raises(ValueError):
        E.coco_rle_decode({"size": [2, 3], "counts": "1!"})


def test_coco_rle_per_class():
    lab = _label_map()
    out = E.coco_rle_per_class(lab, CLASSES)
    assert list(out) == ["aeroplane", "bicycle", "boat"]  # absent classes and ignore left out
    for name, rle in out.items():
        assert np.array_equal(E.coco_rle_decode(rle), lab == CLASSES.index(name) + 1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' own, under numpy 2
def test_coco_rle_matches_pycocotools():
    mask_utils = pytest.importorskip("pycocotools.mask")
    for _, m in MASKS + [("big", np.random.default_rng(3).random((120, 97)) < 0.3)]:
        ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        ours = E.coco_rle_encode(m)
        assert ours == {"size": ref["size"], "counts": ref["counts"].decode()}
        back = mask_utils.decode({"size": ours["size"], "counts": ours["counts"].encode()})
        assert np.array_equal(back, m.astype(np.uint8))
        assert np.array_equal(E.coco_rle_decode(ref), m)


# ------------------------------------------------------------------------- Label Studio brush RLE

# header after the 32-bit count: 5 bits word size - 1 (00111), widths - 1: 0010 0011 0111 1111
_HDR = "001110010001101111111"


def _bits_to_bytes(bits: str) -> list[int]:
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


@pytest.mark.parametrize(
    "mask, expected",
    [
        # 1x1 foreground: 4 values of 255 -> repeat run 1 00 011 11111111, 5 pad bits
        ([[1]], [0, 0, 0, 4, 57, 27, 252, 127, 224]),
        # 1x1 background: the same run of 0s
        ([[0]], [0, 0, 0, 4, 57, 27, 252, 96, 0]),
        # 1x5 foreground: 20 values -> 1 10 00010011 11111111; the stream ends on a byte boundary
        # (32 + 21 + 19 = 72 bits) and, as in the SDK, a whole zero byte follows
        ([[1, 1, 1, 1, 1]], [0, 0, 0, 20, 57, 27, 254, 19, 255, 0]),
    ],
)
def test_brush_rle_hand_vectors(mask, expected):
    m = np.asarray(mask)
    assert E.mask_to_brush_rle(m) == expected
    assert np.array_equal(E.brush_rle_to_mask(expected, *m.shape), m != 0)


def test_brush_rle_bit_layout_of_mixed_runs():
    # 1x3 mask [1, 0, 0] -> runs of 4 x 255 (width 3) and 8 x 0 (width 3)
    bits = f"{12:032b}" + _HDR + "1" + "00" + "011" + "11111111" + "1" + "00" + "111" + "00000000"
    bits += "0" * (-len(bits) % 8 or 8)
    assert E.mask_to_brush_rle(np.array([[1, 0, 0]])) == _bits_to_bytes(bits)
    # a single value is a literal run of one: 0 00 000 value
    assert E.rle_pack_encode(np.array([5])) == [0, 0, 0, 1, 57, 27, 248, 0, 160]


def test_brush_rle_long_runs_are_cut_in_pieces_of_65536():
    m = np.zeros((129, 128), bool)  # 16512 px = 66048 values: 65536 + 512, both width-16 fields
    bits = f"{66048:032b}" + _HDR
    bits += "1" + "11" + f"{65535:016b}" + "00000000" + "1" + "11" + f"{511:016b}" + "00000000"
    bits += "0" * (-len(bits) % 8 or 8)
    assert E.mask_to_brush_rle(m) == _bits_to_bytes(bits)
    assert not E.brush_rle_to_mask(E.mask_to_brush_rle(m), 129, 128).any()


def test_rle_pack_decoder_reads_literal_runs_and_other_widths():
    # word size 4, widths 2,2,2,2: a literal run of 3 words (1, 2, 3), then a repeat of 4 x 9
    bits = f"{7:032b}" + "00011" + "0001" * 4
    bits += "0" + "00" + "10" + "0001" + "0010" + "0011"
    bits += "1" + "00" + "11" + "1001"
    bits += "0" * (-len(bits) % 8)
    assert E.rle_pack_decode(_bits_to_bytes(bits)).tolist() == [1, 2, 3, 9, 9, 9, 9]
    with pytest.raises(ValueError, match="truncated"):
        E.rle_pack_decode(_bits_to_bytes(bits)[:-2])


@pytest.mark.parametrize("name, mask", MASKS, ids=[n for n, _ in MASKS])
def test_brush_rle_round_trip(name, mask):
    rle = E.mask_to_brush_rle(mask)
    assert all(isinstance(b, int) and 0 <= b <= 255 for b in rle)
    values = E.rle_pack_decode(rle)
    assert values.size == mask.size * 4
    assert np.array_equal(values.reshape(*mask.shape, 4), np.repeat(mask[..., None], 4, axis=2) * 255)
    assert np.array_equal(E.brush_rle_to_mask(rle, *mask.shape), mask)


def test_rle_pack_round_trip_of_arbitrary_values():
    rng = np.random.default_rng(5)
    v = rng.integers(0, 3, 3000).astype(np.uint8)
    v[100:400] = 200
    v[1000 : 70000 - 68000 + 1000] = 7
    assert np.array_equal(E.rle_pack_decode(E.rle_pack_encode(v)), v)
    assert E.rle_pack_decode(E.rle_pack_encode(np.zeros(0, np.uint8))).size == 0


def _sdk_brush():
    for mod in ("label_studio_sdk.converter.brush", "label_studio_converter.brush"):
        try:
            return __import__(mod, fromlist=["mask2rle"])
        except ImportError:
            continue
    pytest.skip("neither label-studio-sdk nor label-studio-converter is installed")


def test_brush_rle_is_byte_identical_to_the_label_studio_sdk():
    brush = _sdk_brush()
    for _, m in MASKS:
        ours = E.mask_to_brush_rle(m)
        assert ours == brush.mask2rle(m.astype(np.uint8) * 255)
        decoded = brush.decode_rle(ours).reshape(*m.shape, 4)[..., 3]
        assert np.array_equal(decoded > 0, m)
    v = np.random.default_rng(2).integers(0, 4, 5000).astype(np.uint8)
    assert E.rle_pack_encode(v) == brush.encode_rle(v)


def test_labelstudio_results():
    lab = _label_map()
    conf = np.linspace(0, 1, lab.size).reshape(lab.shape)
    res = E.labelstudio_results(
        lab, CLASSES, from_name="tag", to_name="image", label_map={"boat": "Boat"}, confidence=conf
    )
    json.dumps(res)
    assert [r["value"]["brushlabels"] for r in res] == [["aeroplane"], ["bicycle"], ["Boat"]]
    assert len({r["id"] for r in res}) == 3
    for r in res:
        assert r["type"] == "brushlabels" and r["from_name"] == "tag" and r["to_name"] == "image"
        assert (r["original_width"], r["original_height"]) == (31, 23)
        assert r["value"]["format"] == "rle"
        assert 0 <= r["score"] <= 1
    assert res[0]["score"] == pytest.approx(conf[lab == 1].mean(), abs=1e-4)
    back = E.labelstudio_results_to_label(res, CLASSES, label_map={"boat": "Boat"})
    expected = lab.copy()
    expected[expected == 255] = 0
    assert np.array_equal(back, expected)
    pred = E.labelstudio_prediction(res, score=0.5, model_version="hsc@1")
    assert pred == {"result": res, "score": 0.5, "model_version": "hsc@1"}
    only_scores = E.labelstudio_results(lab, CLASSES, from_name="t", to_name="i", scores={"bicycle": 0.3})
    assert [r.get("score") for r in only_scores] == [None, 0.3, None]
    assert E.labelstudio_results(np.zeros((3, 3), np.uint8), CLASSES, from_name="t", to_name="i") == []


# ------------------------------------------------------------------------------------------- CVAT


def _decode_function_mask(encoded, width, height):
    """CVAT's rule, written out: the last four numbers are the inclusive box, the rest the box's
    pixels row-major."""
    *bitmap, xtl, ytl, xbr, ybr = encoded
    out = np.zeros((height, width), bool)
    bw = xbr - xtl + 1
    assert len(bitmap) == bw * (ybr - ytl + 1)
    for i, v in enumerate(bitmap):
        out[ytl + i // bw, xtl + i % bw] = bool(v)
    return out


def _fill_polygon(points, height, width):
    """Even-odd fill at pixel centres of a polygon with axis-parallel edges."""
    xs, ys = points[0::2], points[1::2]
    inside = np.zeros((height, width), bool)
    for i in range(len(xs)):
        x0, y0, x1, y1 = xs[i], ys[i], xs[(i + 1) % len(xs)], ys[(i + 1) % len(xs)]
        assert x0 == x1 or y0 == y1, "edges run along pixel edges"
        if x0 == x1 and y0 != y1:
            inside[min(y0, y1) : max(y0, y1), :x0] ^= True
    return inside


def test_cvat_function_mask_hand_example():
    lab = np.zeros((4, 5), np.uint8)
    lab[1:3, 3:5] = 2  # a 2x2 block touching the right border
    lab[1, 4] = 0
    lab[3, 0] = 1  # one pixel in the bottom-left corner
    items = E.cvat_function_items(lab, CLASSES)
    assert items == [
        {"label": "aeroplane", "type": "mask", "mask": [1, 0, 3, 0, 3], "points": [0, 3, 1, 3, 1, 4, 0, 4],
         "confidence": None},
        {"label": "bicycle", "type": "mask", "mask": [1, 0, 1, 1, 3, 1, 4, 2],
         "points": [3, 1, 4, 1, 4, 2, 5, 2, 5, 3, 3, 3], "confidence": None},
    ]  # fmt: skip
    for it in items:
        assert np.array_equal(_decode_function_mask(it["mask"], 5, 4), lab == CLASSES.index(it["label"]) + 1)


def test_cvat_regions_per_region_and_per_class():
    lab = _label_map()
    h, w = lab.shape
    regions = E.cvat_function_items(lab, CLASSES, confidence=np.full(lab.shape, 0.25))
    per_class = E.cvat_function_items(lab, CLASSES, per="class")
    json.dumps(regions)
    assert [it["label"] for it in per_class] == ["aeroplane", "bicycle", "boat"]
    assert all("points" not in it for it in per_class)
    assert {it["label"] for it in regions} == {"aeroplane", "bicycle", "boat"}
    assert all(it["confidence"] == 0.25 for it in regions)
    n_bicycle = E.connected_regions(lab == 2)[1]
    assert sum(it["label"] == "bicycle" for it in regions) == n_bicycle > 1
    expected = lab.copy()
    expected[expected == 255] = 0
    for items in (regions, per_class):
        assert np.array_equal(E.cvat_items_to_label(items, CLASSES, height=h, width=w), expected)
        for it in items:
            assert np.array_equal(
                E.cvat_bitmap_with_box_decode(it["mask"], image_width=w, image_height=h),
                _decode_function_mask(it["mask"], w, h),
            )
    # the boat block touches the right/bottom border: its inclusive box ends at the last pixel
    boat = [it for it in regions if it["label"] == "boat"]
    assert len(boat) == 1 and boat[0]["mask"][-4:] == [18, 14, w - 1, h - 1]
    bicycle_regions, _ = E.connected_regions(lab == 2)
    n_big = int((np.bincount(bicycle_regions.ravel())[1:] >= 2).sum())
    kept = E.cvat_function_items(lab, CLASSES, min_area=2)
    assert sum(it["label"] == "bicycle" for it in kept) == n_big < n_bicycle
    assert all(sum(it["mask"][:-4]) >= 2 for it in kept)
    assert E.cvat_function_items(np.zeros((2, 2), np.uint8), CLASSES) == []


def test_connected_regions_hand_cases():
    diag = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    labels, n = E.connected_regions(diag, 8)
    assert n == 1 and labels.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    labels, n = E.connected_regions(diag, 4)
    assert n == 3 and labels.tolist() == [[1, 0, 0], [0, 2, 0], [0, 0, 3]]
    u = np.array([[1, 0, 1], [1, 0, 1], [1, 1, 1]])  # merges only at the bottom row
    assert E.connected_regions(u, 4)[1] == 1
    assert E.connected_regions(np.zeros((3, 3)), 8)[1] == 0
    assert E.connected_regions(np.zeros((0, 3)), 8)[1] == 0


@pytest.mark.parametrize("connectivity", [4, 8])
def test_connected_regions_match_scipy(connectivity):
    ndimage = pytest.importorskip("scipy.ndimage")
    structure = np.ones((3, 3)) if connectivity == 8 else None
    for _, m in MASKS:
        ours, n = E.connected_regions(m, connectivity)
        ref, n_ref = ndimage.label(m, structure=structure)
        assert n == n_ref
        # same partition; numbering in order of first pixel, as scipy also numbers
        assert np.array_equal(ours, ref)


def test_outer_contour_hand_cases():
    assert E.outer_contour(np.array([[1]])) == [0, 0, 1, 0, 1, 1, 0, 1]
    # an L: clockwise from the top-left corner, corners only
    ell = np.array([[1, 0], [1, 1]])
    assert E.outer_contour(ell) == [0, 0, 1, 0, 1, 1, 2, 1, 2, 2, 0, 2]
    # two diagonal pixels: one 8-connected region, traced through the shared corner
    diag = np.array([[1, 0], [0, 1]])
    assert E.outer_contour(diag, 8) == [0, 0, 1, 0, 1, 1, 2, 1, 2, 2, 1, 2, 1, 1, 0, 1]
    assert E.outer_contour(diag, 4) == [0, 0, 1, 0, 1, 1, 0, 1]  # only the first 4-region
    ring = np.ones((3, 3), bool)
    ring[1, 1] = False  # the hole is filled by the outline
    assert E.outer_contour(ring) == [0, 0, 3, 0, 3, 3, 0, 3]
    with pytest.raises(ValueError):
        E.outer_contour(np.zeros((2, 2)))


@pytest.mark.parametrize("connectivity", [4, 8])
def test_outer_contour_encloses_each_region_with_holes_filled(connectivity):
    ndimage = pytest.importorskip("scipy.ndimage")
    for _, m in MASKS:
        labels, n = E.connected_regions(m, connectivity)
        for k in range(1, n + 1):
            region = labels == k
            pts = E.outer_contour(region, connectivity)
            filled = _fill_polygon(pts, *m.shape)
            # holes are background regions not reaching the outside, with the dual connectivity
            holes_structure = None if connectivity == 8 else np.ones((3, 3))
            assert np.array_equal(filled, ndimage.binary_fill_holes(region, structure=holes_structure))


def test_outer_contour_without_scipy_on_hole_free_shapes():
    for _, m in MASKS:
        labels, n = E.connected_regions(m, 8)
        for k in range(1, n + 1):
            region = labels == k
            filled = _fill_polygon(E.outer_contour(region), *m.shape)
            assert (filled >= region).all()  # never leaves a pixel out
            assert not (filled & (labels != k) & (labels != 0)).any()  # never takes another region's


@pytest.mark.parametrize(
    "bitmap, expected",
    [
        ([[0, 1], [1, 1]], [1, 3, 0, 0, 1, 1]),  # tight box [0, 0, 2, 2): 0 1 1 1
        ([[1, 0], [0, 0]], [0, 1, 0, 0, 0, 0]),  # starts with foreground: an empty 0-run first
        ([[0, 0, 0], [0, 0, 1]], [0, 1, 2, 1, 2, 1]),  # 1-pixel region at the bottom-right corner
        ([[0, 0], [0, 0]], [1, 0, 0, 0, 0]),  # empty: a 1x1 box at the origin
        ([[1, 0, 1]], [0, 1, 1, 1, 0, 0, 2, 0]),
    ],
)
def test_cvat_stored_rle_hand_vectors(bitmap, expected):
    m = np.asarray(bitmap, bool)
    assert E.cvat_encode_mask(m) == expected
    assert np.array_equal(E.cvat_decode_mask(expected, image_width=m.shape[1], image_height=m.shape[0]), m)


def test_cvat_stored_rle_with_box():
    m = np.zeros((4, 5), bool)
    m[1, 2] = True
    assert E.cvat_encode_mask(m, [0, 0, 5, 4]) == [7, 1, 12, 0, 0, 4, 3]
    assert E.cvat_encode_mask(m, [1.5, 0.2, 3.1, 2]) == [4, 1, 1, 1, 0, 3, 1]  # box x 1..3, y 0..1
    with pytest.raises(ValueError):
        E.cvat_encode_mask(m, [0, 0, 6, 4])
    with pytest.raises(ValueError):
        E.cvat_decode_mask([1, 2, 0, 0, 0, 0], image_width=5, image_height=4)


@pytest.mark.parametrize("name, mask", MASKS, ids=[n for n, _ in MASKS])
def test_cvat_round_trips(name, mask):
    h, w = mask.shape
    enc = E.cvat_encode_mask(mask)
    assert all(isinstance(v, int) for v in enc)
    if mask.any():
        assert np.array_equal(E.cvat_decode_mask(enc, image_width=w, image_height=h), mask)
        fm = E.cvat_bitmap_with_box(mask)
        assert np.array_equal(E.cvat_bitmap_with_box_decode(fm, image_width=w, image_height=h), mask)
        assert np.array_equal(_decode_function_mask(fm, w, h), mask)
    else:
        assert enc == [1, 0, 0, 0, 0]
        with pytest.raises(ValueError):
            E.cvat_bitmap_with_box(mask)
    full = E.cvat_encode_mask(mask, [0, 0, w, h])
    assert np.array_equal(E.cvat_decode_mask(full, image_width=w, image_height=h), mask)


def test_cvat_mask_shapes():
    lab = _label_map()
    h, w = lab.shape
    for per in ("class", "region"):
        shapes = E.cvat_mask_shapes(lab, CLASSES, per=per)
        out = np.zeros_like(lab)
        for s in shapes:
            assert s["type"] == "mask"
            out[E.cvat_decode_mask(s["points"], image_width=w, image_height=h)] = (
                CLASSES.index(s["label"]) + 1
            )
        assert np.array_equal(out, np.where(lab == 255, 0, lab))
    per_class = E.cvat_mask_shapes(lab, CLASSES)
    assert per_class[0]["points"] == E.cvat_encode_mask(lab == 1)


def test_cvat_matches_cvat_sdk():
    masks = pytest.importorskip("cvat_sdk.masks")
    for _, m in MASKS:
        assert E.cvat_encode_mask(m) == masks.encode_mask(m)
        h, w = m.shape
        assert E.cvat_encode_mask(m, [0, 0, w, h]) == masks.encode_mask(m, [0, 0, w, h])
        if m.any():
            enc = E.cvat_encode_mask(m)
            assert np.array_equal(masks.decode_mask(enc, image_width=w, image_height=h), m)
