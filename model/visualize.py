"""Pictures of results: the VOC colour palette for label PNGs and CAM heatmap overlays (numpy + PIL)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC palette, ``(n, 3)`` uint8: label ``i``'s colour from the bits of ``i``
    (0 black, 1 dark red, 2 dark green, ...; 255, the ignore label, is near-white)."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def label_to_palette_png(label: np.ndarray) -> Image.Image:
    """A ``(H, W)`` uint8 VOC label map as a P-mode PNG image with the VOC palette
    (``np.array(Image.open(f))`` gives the labels back)."""
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"expected an (H, W) uint8 label map, got {label.shape} {label.dtype}")
    img = Image.fromarray(label, mode="P")
    img.putpalette(voc_palette().reshape(-1).tolist())
    return img


def jet(x: np.ndarray) -> np.ndarray:
    """The 'jet' colour map: values in [0, 1] -> ``(..., 3)`` uint8 RGB (blue low, red high)."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * x - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * x - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * x - 1.0), 0.0, 1.0)
    return (np.stack([r, g, b], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def heatmap_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a ``(H, W)`` CAM in [0, 1] as a jet heatmap over an ``(H, W, 3)`` uint8 RGB image."""
    if image.shape[:2] != cam.shape:
        raise ValueError(f"image {image.shape[:2]} and CAM {cam.shape} differ in size")
    blend = (1.0 - alpha) * image.astype(np.float32) + alpha * jet(cam).astype(np.float32)
    return np.clip(blend + 0.5, 0, 255).astype(np.uint8)
