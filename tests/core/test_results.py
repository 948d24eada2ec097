"""The D3 result dict (core/results.py): every key, the numbers worked out by hand on a small mask, and
every optional output decoded back to the same mask with its own decoder."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from hsc.core.encoders import cvat_items_to_label, labelstudio_results_to_label, mask_from_base64_png
from hsc.core.results import (
    OUTPUTS,
    build_result,
    class_stats,
    confidence_map,
    model_version,
    parse_outputs,
)

CARD = {
    "id": "demo",
    "sha256": "ab" * 32,
    "classes": ["background", "road", "car", "tree"],
    "bg_threshold": 0.3,
    "network_type": "hsc_eps_seam",
    "backbone": "resnet38d",
    "mode": "exact",
    "device": "cpu",
    "path": "/x/demo.safetensors",
}
H, W = 6, 8


def example() -> tuple[np.ndarray, np.ndarray]:
    """Mask with ``car`` (channel 1, label 2) in a 2x3 box and ``tree`` (channel 2, label 3) as one
    pixel plus a 1x2 bar; CAM rows follow classes (1, 2)."""
    mask = np.zeros((H, W), np.uint8)
    mask[1:3, 2:5] = 2  # 6 pixels, bbox [2, 1, 4, 2]
    mask[5, 0] = 3
    mask[4, 6:8] = 3  # tree: 3 pixels, bbox [0, 4, 7, 5]
    cams = np.zeros((2, H, W), np.float32)
    cams[0] = 0.1
    cams[0][1:3, 2:5] = 0.5
    cams[0][1, 2] = 0.8  # car: (5 * 0.5 + 0.8) / 6 = 0.55
    cams[1] = 0.2
    cams[1][mask == 3] = [0.9, 0.6, 0.3]  # tree: 0.6 (order: row 4 then row 5)
    return mask, cams


def result(outputs=("mask",), cams_given=True, **kw):
    mask, cams = example()
    heat = {n: np.full((H, W, 3), v, np.uint8) for n, v in (("car", 10), ("tree", 200))}
    args = dict(
        request_id="req_1",
        model=CARD,
        image_info={"width": W, "height": H, "format": "PNG", "exif_orientation_applied": 6},
        labels_requested=["Car", 3],
        classes=(1, 2),
        class_names=("car", "tree"),
        mask=mask,
        cams=cams if cams_given else None,
        heatmaps=heat,
        settings={"bg_threshold": 0.3, "crf": False},
        timings_ms={"network": 12.5, "total": 20.0},
        outputs=set(outputs),
    )
    args.update(kw)
    return build_result(**args), mask, cams


def test_parse_outputs():
    assert parse_outputs(None) == {"mask"}
    assert parse_outputs("") == {"mask"}
    assert parse_outputs("cams, Heatmaps") == {"mask", "cams", "heatmaps"}
    assert parse_outputs(["coco_rle", "cvat,labelstudio"]) == {"mask", "coco_rle", "cvat", "labelstudio"}
    assert parse_outputs(OUTPUTS) == set(OUTPUTS)
    with pytest.raises(ValueError, match="unknown output.*'confidence'.*valid outputs: mask, heatmaps"):
        parse_outputs("mask,confidence")
    with pytest.raises(ValueError, match="valid"):
        parse_outputs([3])  # type: ignore[list-item]


def test_core_keys_and_numbers():
    r, mask, _ = result()
    json.dumps(r)  # JSON-able
    assert r["request_id"] == "req_1"
    assert r["model"] == {"id": "demo", "sha256": "ab" * 32, "classes": CARD["classes"]}
    assert r["image"] == {"width": W, "height": H, "format": "PNG", "exif_orientation_applied": 6}
    assert r["labels"] == {"requested": ["Car", 3], "used": [2, 3], "source": "given"}
    assert r["settings"] == {"bg_threshold": 0.3, "crf": False}
    assert r["timings_ms"] == {"network": 12.5, "total": 20.0}
    assert r["warnings"] == []
    m = r["mask"]
    assert (m["encoding"], m["palette"], m["ignore_index"]) == ("png-palette", "voc", 255)
    assert np.array_equal(mask_from_base64_png(m["data"]), mask)
    assert Image.open(io.BytesIO(base64.b64decode(m["data"]))).mode == "P"
    car, tree = r["classes"]
    assert car == {"index": 2, "name": "car", "pixels": 6, "fraction": round(6 / 48, 4),
                   "mean_confidence": 0.55, "bbox": [2, 1, 4, 2]}  # fmt: skip
    assert tree == {"index": 3, "name": "tree", "pixels": 3, "fraction": round(3 / 48, 4),
                    "mean_confidence": 0.6, "bbox": [0, 4, 7, 5]}  # fmt: skip
    assert r["quality"] == round((0.55 * 6 + 0.6 * 3) / 9, 4)
    for key in ("heatmaps", "cams", "coco_rle", "labelstudio", "cvat"):
        assert key not in r


def test_a_class_without_pixels_is_reported_and_warned():
    mask, cams = example()
    mask[mask == 3] = 0
    r, _, _ = result(mask=mask, warnings=["from the caller"])
    tree = r["classes"][1]
    assert (tree["pixels"], tree["fraction"], tree["mean_confidence"], tree["bbox"]) == (0, 0.0, None, None)
    assert r["warnings"] == ["from the caller", "class 'tree' has no pixels in the mask"]
    assert r["quality"] == 0.55


def test_no_foreground_has_quality_zero_and_no_cams_no_confidence():
    empty = np.zeros((H, W), np.uint8)
    r, _, _ = result(mask=empty)
    assert r["quality"] == 0.0 and [c["pixels"] for c in r["classes"]] == [0, 0]
    r, _, _ = result(cams_given=False, outputs=set(OUTPUTS))
    assert r["quality"] is None and [c["mean_confidence"] for c in r["classes"]] == [None, None]
    assert "cams" not in r and "score" not in r["labelstudio"]
    assert [it["confidence"] for it in r["cvat"]] == [None, None, None]


def test_heatmaps_and_cams_decode():
    r, mask, cams = result(outputs={"heatmaps", "cams"})
    assert set(r["heatmaps"]) == {"car", "tree"}
    hm = r["heatmaps"]["tree"]
    assert hm["normalisation"] == "per-class max"
    png = np.array(Image.open(io.BytesIO(base64.b64decode(hm["png"]))))
    assert png.shape == (H, W, 3) and (png == 200).all()
    for i, name in enumerate(("car", "tree")):
        c = r["cams"][name]
        assert c["shape"] == [H, W] and c["dtype"] == "float32"
        back = np.frombuffer(base64.b64decode(c["data"]), dtype="<f4").reshape(c["shape"])
        assert np.array_equal(back, cams[i])


def test_coco_rle_round_trips_with_pycocotools():
    r, mask, _ = result(outputs={"coco_rle"})
    assert set(r["coco_rle"]) == {"car", "tree"}
    for name, label in (("car", 2), ("tree", 3)):
        rle = dict(r["coco_rle"][name])
        assert rle["size"] == [H, W]
        rle["counts"] = rle["counts"].encode("ascii")
        assert np.array_equal(coco_mask.decode(rle).astype(bool), mask == label)


def test_labelstudio_prediction():
    r, mask, _ = result(outputs={"labelstudio"})
    ls = r["labelstudio"]
    assert ls["score"] == r["quality"] and ls["model_version"] == "demo@" + "ab" * 6
    assert model_version(CARD) == "demo@abababababab"
    assert {(x["from_name"], x["to_name"]) for x in ls["result"]} == {("tag", "image")}
    assert [x["score"] for x in ls["result"]] == [0.55, 0.6]
    names = CARD["classes"][1:]
    assert np.array_equal(labelstudio_results_to_label(ls["result"], names), mask)
    r, _, _ = result(outputs={"labelstudio"}, labelstudio={"from_name": "seg", "to_name": "img",
                                                          "label_map": {"car": "Car"}})  # fmt: skip
    regions = r["labelstudio"]["result"]
    assert regions[0]["from_name"] == "seg" and regions[0]["value"]["brushlabels"] == ["Car"]


def test_cvat_items():
    r, mask, cams = result(outputs={"cvat"})
    items = r["cvat"]
    assert [it["label"] for it in items] == ["car", "tree", "tree"]  # tree has two regions
    assert items[0]["confidence"] == 0.55
    assert np.array_equal(cvat_items_to_label(items, CARD["classes"][1:], height=H, width=W), mask)


def test_confidence_map_and_stats_helpers():
    mask, cams = example()
    conf = confidence_map(mask, cams, (1, 2))
    assert conf[0, 0] == 0 and conf[1, 2] == pytest.approx(0.8) and conf[5, 0] == pytest.approx(0.3)
    rows, quality = class_stats(mask, None, (1, 2), ("car", "tree"))
    assert quality is None and rows[0]["pixels"] == 6


def test_inputs_are_checked():
    mask, cams = example()
    with pytest.raises(ValueError, match="uint8"):
        result(mask=mask.astype(np.int32))
    with pytest.raises(ValueError, match="do not match"):
        result(cams=cams[:1])
    with pytest.raises(ValueError, match="names"):
        result(class_names=("car",))
    with pytest.raises(ValueError, match="unknown output"):
        result(outputs={"bogus"})
