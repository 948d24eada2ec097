"""Pictures of results: CAM heatmap overlays (numpy). Label PNGs: :mod:`hsc.core.encoders`."""

from __future__ import annotations

import numpy as np


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
