"""``hsc demo``: a smoke run of the whole CAM pipeline on a generated image with a random network.

It proves the installation works end to end (network, multi-scale + flip CAM, threshold mask, dense
CRF, output files) in a few seconds on a CPU. The weights are random, so the mask is meaningless.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from hsc.core.encoders import label_to_png
from hsc.model.cam import cams_to_label, crf_from_cams, crf_to_label, multiscale_cam
from hsc.model.hsc_net import build_hsc_net
from hsc.model.visualize import heatmap_overlay

DEMO_CLASSES = ("disc", "box")


def generated_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A (height, width, 3) uint8 RGB test image: a red disc and a blue box on a noisy green field."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), dtype=np.float32)
    img[:] = (70, 120, 60)
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx, r = height * 0.45, width * 0.3, min(height, width) * 0.25
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (200, 40, 40)
    img[int(height * 0.3) : int(height * 0.8), int(width * 0.6) : int(width * 0.9)] = (40, 60, 190)
    img += rng.normal(0.0, 12.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _parse_size(size: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like 200x150, got {size!r}") from None
    if not (16 <= w <= 4096 and 16 <= h <= 4096):
        raise ValueError(f"size {size} out of range (16..4096 per side)")
    return w, h


def run_demo(
    out_dir: Path, *, width: float = 0.125, size: str = "200x150", seed: int = 0, crf: bool = True
) -> dict[str, Any]:
    """Write ``image.png``, ``mask.png`` (+ ``mask_crf.png``), ``heatmap_<class>.png``, ``cams.npy`` and
    ``summary.json`` into ``out_dir``; return the summary."""
    w, h = _parse_size(size)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = build_hsc_net(num_classes=len(DEMO_CLASSES), width=width).eval()
    image = generated_image(w, h, seed)
    t0 = time.perf_counter()
    res = multiscale_cam(net, image, list(range(len(DEMO_CLASSES))))
    t_cam = time.perf_counter() - t0
    cams = res.cams.cpu().numpy()
    label = cams_to_label(cams, res.classes, bg_threshold=0.22)
    Image.fromarray(image).save(out_dir / "image.png")
    (out_dir / "mask.png").write_bytes(label_to_png(label))
    np.save(out_dir / "cams.npy", cams)
    files = ["image.png", "mask.png", "cams.npy"]
    for cam, c in zip(cams, res.classes):
        name = f"heatmap_{DEMO_CLASSES[c]}.png"
        Image.fromarray(heatmap_overlay(image, cam)).save(out_dir / name)
        files.append(name)
    t_crf = 0.0
    if crf:
        t0 = time.perf_counter()
        q, keys = crf_from_cams(image, cams, res.classes, alpha=7, iters=8)
        label_crf = crf_to_label(q, keys)
        t_crf = time.perf_counter() - t0
        (out_dir / "mask_crf.png").write_bytes(label_to_png(label_crf))
        files.append("mask_crf.png")
    summary = {
        "smoke_run": "RANDOM WEIGHTS: this checks the installation; the mask is meaningless",
        "out_dir": str(out_dir),
        "image_size": [h, w],
        "network": {"backbone": "resnet38d", "width": width, "classes": list(DEMO_CLASSES)},
        "settings": {"scales": [0.5, 1.0, 1.5, 2.0], "flip": True, "bg_threshold": 0.22, "crf": crf},
        "mask_histogram": {int(v): int(n) for v, n in zip(*np.unique(label, return_counts=True))},
        "timings_s": {"cam": round(t_cam, 3), "crf": round(t_crf, 3)},
        "files": files,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
