"""Class names of the built-in datasets (no torch; the model, training and worker packages use them).

Two label spaces are in use (docs/algorithm.md):

* **channel space** (CAMs, HSC network outputs, ``cam_npy`` dicts): channel ``c`` in ``0..K-1`` is the
  foreground class ``VOC_CLASSES[c]``; the HSC network puts background last (channel ``K``);
* **VOC label space** (label PNGs, CRF dicts, the evaluation): ``0`` = background, ``c + 1`` = class ``c``,
  ``255`` = void/ignore. :data:`VOC_LABEL_NAMES` is indexed by this space.
"""

from __future__ import annotations

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
"""The 20 PASCAL VOC foreground classes in channel-space order (no background)."""

BACKGROUND = "background"

VOC_LABEL_NAMES: tuple[str, ...] = (BACKGROUND, *VOC_CLASSES)
"""The 21 names of the VOC label space: index 0 = background, index ``c + 1`` = ``VOC_CLASSES[c]``."""

IGNORE_INDEX = 255
"""The void/ignore value of VOC label maps."""
