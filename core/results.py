"""The answer of ``POST /pseudo-label`` (docs/product.md D3) built from one prediction, numpy only.

:func:`build_result` is shared by the single-image task and the job items (which keep the same dict
with file paths instead of the base64 blobs), so every consumer sees one schema:

``request_id``, ``model {id, sha256, classes}``, ``image {width, height, format,
exif_orientation_applied}``, ``labels {requested, used, source[, threshold, classifier_scores]}``,
``settings``, ``mask {encoding, palette, ignore_index, data}``, ``classes [{index, name, pixels,
fraction, mean_confidence, bbox}]``, ``quality``, ``timings_ms``, ``warnings``, and only when asked in
``outputs``: ``heatmaps``, ``cams``, ``coco_rle``, ``labelstudio``, ``cvat``.

*Confidence* of a foreground pixel is its class's CAM value there (max-normalised, in [0, 1));
``mean_confidence`` of a class averages it over the class's mask pixels, ``quality`` over all the
foreground pixels (0 without foreground). ``quality`` is also the Label Studio prediction score.

Labels predicted by the classifier (``labels="auto"``) give ``labels = {"requested": "auto", "used":
[...], "source": "predicted", "threshold": t, "classifier_scores": {name: probability}}`` (every
class of the model, rounded to 4 digits).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from .encoders import (
    IGNORE_INDEX,
    coco_rle_per_class,
    cvat_function_items,
    label_to_png,
    labelstudio_prediction,
    labelstudio_results,
)

__all__ = [
    "DEFAULT_LABELSTUDIO",
    "OUTPUTS",
    "build_result",
    "class_stats",
    "confidence_map",
    "model_version",
    "parse_outputs",
    "png_base64",
    "rgb_png",
]

#: What a request may ask for; ``mask`` is always answered.
OUTPUTS = ("mask", "heatmaps", "cams", "coco_rle", "labelstudio", "cvat")
#: Names in Label Studio's "Semantic Segmentation with Masks" template (``<BrushLabels name="tag"
#: toName="image">``), used unless the caller gives the project's own.
DEFAULT_LABELSTUDIO = {"from_name": "tag", "to_name": "image"}
_DIGITS = 4  # rounding of fractions and confidences


def parse_outputs(value: str | Iterable[str] | None) -> set[str]:
    """The outputs asked for: a comma-separated string, an iterable of names, or ``None``.

    Names are matched ignoring case and spaces; ``mask`` is always included. An unknown name raises
    ``ValueError`` naming the valid ones.
    """
    if value is None:
        names: list[str] = []
    elif isinstance(value, str):
        names = value.split(",")
    else:
        names = []
        for v in value:
            if not isinstance(v, str):
                raise ValueError(f"an output is a name, got {type(v).__name__}; valid: {', '.join(OUTPUTS)}")
            names += v.split(",")
    wanted = {n.strip().lower() for n in names if n.strip()}
    unknown = sorted(wanted - set(OUTPUTS))
    if unknown:
        raise ValueError(f"unknown output(s) {unknown}; valid outputs: {', '.join(OUTPUTS)}")
    return wanted | {"mask"}


def png_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def rgb_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 RGB image (a heatmap)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def model_version(card: Mapping[str, Any]) -> str:
    """``"<id>@<first 12 hex digits of the checkpoint sha256>"``: the Label Studio ``model_version``."""
    return f"{card['id']}@{str(card.get('sha256') or '')[:12]}"


def confidence_map(mask: np.ndarray, cams: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """(H, W) float32: at each foreground pixel the CAM of its class (row ``i`` of ``cams`` is channel
    ``classes[i]``, mask value ``classes[i] + 1``), 0 on background and on pixels of other classes."""
    conf = np.zeros(mask.shape, dtype=np.float32)
    for i, c in enumerate(classes):
        sel = mask == c + 1
        conf[sel] = cams[i][sel]
    return conf


def _bbox(sel: np.ndarray) -> list[int] | None:
    rows = np.flatnonzero(sel.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(sel.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])]


def class_stats(
    mask: np.ndarray, cams: np.ndarray | None, classes: Sequence[int], class_names: Sequence[str]
) -> tuple[list[dict[str, Any]], float | None]:
    """Per used class ``{index (VOC label), name, pixels, fraction, mean_confidence, bbox}`` (bbox
    ``[x0, y0, x1, y1]`` inclusive, ``None`` without pixels; ``mean_confidence`` ``None`` without pixels
    or CAMs) and the image ``quality`` (``None`` without CAMs)."""
    total = int(mask.size)
    rows: list[dict[str, Any]] = []
    fg_pixels = 0
    fg_sum = 0.0
    for i, (c, name) in enumerate(zip(classes, class_names)):
        sel = mask == c + 1
        pixels = int(np.count_nonzero(sel))
        mean: float | None = None
        if cams is not None and pixels:
            s = float(cams[i][sel].sum(dtype=np.float64))
            fg_sum += s
            mean = round(s / pixels, _DIGITS)
        fg_pixels += pixels
        rows.append(
            {
                "index": int(c) + 1,
                "name": name,
                "pixels": pixels,
                "fraction": round(pixels / total, _DIGITS) if total else 0.0,
                "mean_confidence": mean,
                "bbox": _bbox(sel),
            }
        )
    if cams is None:
        return rows, None
    return rows, round(fg_sum / fg_pixels, _DIGITS) if fg_pixels else 0.0


def _labels_block(
    requested: Sequence[Any] | str,
    classes: Sequence[int],
    source: str,
    scores: Mapping[str, float] | None,
    threshold: float | None,
) -> dict[str, Any]:
    block: dict[str, Any] = {
        "requested": requested if isinstance(requested, str) else list(requested),
        "used": [int(c) + 1 for c in classes],
        "source": source,
    }
    if threshold is not None:
        block["threshold"] = float(threshold)
    if scores is not None:
        block["classifier_scores"] = {str(k): round(float(v), _DIGITS) for k, v in scores.items()}
    return block


def build_result(
    *,
    request_id: str,
    model: Mapping[str, Any],
    image_info: Mapping[str, Any],
    labels_requested: Sequence[Any] | str,
    classes: Sequence[int],
    class_names: Sequence[str],
    mask: np.ndarray,
    cams: np.ndarray | None,
    heatmaps: Mapping[str, np.ndarray],
    settings: Mapping[str, Any],
    timings_ms: Mapping[str, float],
    outputs: Iterable[str],
    warnings: Sequence[str] = (),
    labelstudio: Mapping[str, Any] | None = None,
    mask_png: bytes | None = None,
    labels_source: str = "given",
    classifier_scores: Mapping[str, float] | None = None,
    label_threshold: float | None = None,
) -> dict[str, Any]:
    """The D3 response dict of one image (JSON-able).

    Args:
        request_id: echoed.
        model: the model card (``id``, ``sha256``, ``classes`` = ``["background", *K names]``).
        image_info: ``{width, height, format, exif_orientation_applied}`` (from the decoder).
        labels_requested: the labels as the client gave them (a list, or the string ``"auto"``).
        classes, class_names: channel index and name of each used class (ascending channels).
        mask: (H, W) uint8 in VOC label space (0 background, ``c + 1`` channel ``c``).
        cams: (len(classes), H, W) float32 CAMs in [0, 1), or ``None`` (then no confidences).
        heatmaps: class name -> (H, W, 3) uint8 RGB overlay (used when ``"heatmaps"`` is asked).
        settings, timings_ms: what decided the numbers, and how long each stage took.
        outputs: the names of :data:`OUTPUTS` asked for (see :func:`parse_outputs`).
        warnings: extra warnings to report (a class without pixels adds its own).
        labelstudio: ``{from_name, to_name, label_map}`` of the Label Studio project
            (default :data:`DEFAULT_LABELSTUDIO`).
        mask_png: the mask already encoded by :func:`hsc.core.encoders.label_to_png` (saves encoding
            it twice when the caller also writes it to a file).
        labels_source: ``"given"`` or ``"predicted"`` (the classifier chose the classes).
        classifier_scores: class name -> classifier probability (added to ``labels`` when given).
        label_threshold: the classifier threshold used (added to ``labels`` when given).
    """
    outs = parse_outputs(list(outputs))
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"mask must be an (H, W) uint8 label map, got {mask.shape} {mask.dtype}")
    if len(classes) != len(class_names):
        raise ValueError(f"{len(classes)} classes but {len(class_names)} names")
    if cams is not None and (cams.ndim != 3 or cams.shape[0] != len(classes) or cams.shape[1:] != mask.shape):
        raise ValueError(f"cams {cams.shape} do not match {len(classes)} classes of a {mask.shape} mask")
    all_names = list(model["classes"])[1:]  # VOC label v -> all_names[v - 1]
    rows, quality = class_stats(mask, cams, classes, class_names)
    notes = list(warnings) + [
        f"class {r['name']!r} has no pixels in the mask" for r in rows if not r["pixels"]
    ]
    result: dict[str, Any] = {
        "request_id": request_id,
        "model": {"id": model["id"], "sha256": model.get("sha256"), "classes": list(model["classes"])},
        "image": {
            "width": int(image_info["width"]),
            "height": int(image_info["height"]),
            "format": image_info.get("format"),
            "exif_orientation_applied": int(image_info.get("exif_orientation_applied", 1)),
        },
        "labels": _labels_block(labels_requested, classes, labels_source, classifier_scores, label_threshold),
        "settings": dict(settings),
        "mask": {
            "encoding": "png-palette",
            "palette": "voc",
            "ignore_index": IGNORE_INDEX,
            "data": png_base64(mask_png if mask_png is not None else label_to_png(mask)),
        },
        "classes": rows,
        "quality": quality,
        "timings_ms": dict(timings_ms),
        "warnings": notes,
    }
    if "heatmaps" in outs:
        result["heatmaps"] = {
            name: {"png": png_base64(rgb_png(heatmaps[name])), "normalisation": "per-class max"}
            for name in class_names
            if name in heatmaps
        }
    if "cams" in outs and cams is not None:
        result["cams"] = {
            name: {
                "shape": [int(mask.shape[0]), int(mask.shape[1])],
                "dtype": "float32",
                "data": base64.b64encode(np.ascontiguousarray(cams[i], dtype="<f4").tobytes()).decode(
                    "ascii"
                ),
            }
            for i, name in enumerate(class_names)
        }
    if "coco_rle" in outs:
        result["coco_rle"] = coco_rle_per_class(mask, all_names)
    conf = confidence_map(mask, cams, classes) if cams is not None else None
    if "labelstudio" in outs:
        ls = {**DEFAULT_LABELSTUDIO, **(labelstudio or {})}
        regions = labelstudio_results(
            mask,
            all_names,
            from_name=str(ls["from_name"]),
            to_name=str(ls["to_name"]),
            label_map=ls.get("label_map"),
            confidence=conf,
        )
        result["labelstudio"] = labelstudio_prediction(
            regions, score=quality, model_version=model_version(model)
        )
    if "cvat" in outs:
        result["cvat"] = cvat_function_items(mask, all_names, confidence=conf)
    return result
