"""Step-2 training samples: an image and its pseudo-label, augmented as the official segmentation code
(docs/algorithm.md 7.3).

Per sample, with one explicit ``random.Random`` (:func:`~hsc.training.transforms.sample_rng`), in
this order:

1. ``RandomHSV``: OpenCV RGB->HSV (H in [0, 180)), ``dh, ds, dv = randint(-hsv, hsv)`` each (both ends
   included), ``H <- (H + dh) mod 180``, ``S, V`` clipped to [0, 255], back to RGB;
2. horizontal flip of image and label when ``rng.random() < 0.5``;
3. ``r = lo + rng.random() * (hi - lo)`` (official [0.5, 1.5]) and ``cv2.resize(fx=fy=r)``: INTER_CUBIC
   for the image, INTER_NEAREST for the label;
4. normalise ``(v/255 - mean)/std`` (float32);
5. random crop to ``crop x crop`` with the step-1 offset rule (x drawn before y,
   :func:`~hsc.training.transforms.crop_window`): the image padded with 0, the label with the ignore
   index 255.

The labels are PNGs of label indices in the VOC label space (0 = background, ``1..K`` the classes,
255 ignored), one ``<id>.png`` per image in a folder (``hsc infer``'s ``PRED/masks``), or the dataset's
own ground truth (``labels="gt"``: fully supervised, an upper bound for the pseudo-labels).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from hsc.core.datasets import DatasetError, DatasetIndex, PathLike, load_rgb, read_label_png
from hsc.model.config import IMAGENET_MEAN, IMAGENET_STD

from .transforms import crop_window, sample_rng

IGNORE_INDEX = 255
GROUND_TRUTH = "gt"


@dataclass(frozen=True)
class SegAugmentConfig:
    """Sizes and strengths of the step-2 augmentation (defaults: the official ones)."""

    crop: int = 448
    scale: tuple[float, float] = (0.5, 1.5)
    hsv: int = 10
    flip: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not (0 < lo <= hi):
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {self.scale}")
        if self.crop < 16 or self.hsv < 0:
            raise ValueError("crop must be >= 16 and hsv >= 0")


def random_hsv(image: NDArray[np.uint8], amount: int, rng: random.Random) -> NDArray[np.uint8]:
    """Shift hue (mod 180), saturation and value (clipped) by ``randint(-amount, amount)`` each."""
    dh, ds, dv = (rng.randint(-amount, amount) for _ in range(3))
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + dh) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] + ds, 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] + dv, 0, 255)
    return np.asarray(cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB), dtype=np.uint8)


class SegTrainTransform:
    """The official step-2 augmentation of one ``(image, label)`` pair (module docstring)."""

    def __init__(self, config: SegAugmentConfig | None = None) -> None:
        self.config = config or SegAugmentConfig()
        self._mean = np.asarray(self.config.mean, dtype=np.float32)
        self._std = np.asarray(self.config.std, dtype=np.float32)

    def __call__(
        self, image: NDArray[np.uint8], label: NDArray[np.uint8], rng: random.Random
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """``image`` HxWx3 uint8 RGB, ``label`` HxW uint8 -> (3 x crop x crop float32, crop x crop int64)."""
        cfg = self.config
        if cfg.hsv:
            image = random_hsv(image, cfg.hsv, rng)
        if cfg.flip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        lo, hi = cfg.scale
        r = lo + rng.random() * (hi - lo)
        image = np.asarray(
            cv2.resize(np.ascontiguousarray(image), None, fx=r, fy=r, interpolation=cv2.INTER_CUBIC)
        )
        label = np.asarray(
            cv2.resize(np.ascontiguousarray(label), None, fx=r, fy=r, interpolation=cv2.INTER_NEAREST)
        )
        x = (image.astype(np.float32) / 255.0 - self._mean) / self._std
        h, w = label.shape
        sx, dx, nx = crop_window(w, cfg.crop, rng)
        sy, dy, ny = crop_window(h, cfg.crop, rng)
        img_box = np.zeros((cfg.crop, cfg.crop, 3), dtype=np.float32)
        lab_box = np.full((cfg.crop, cfg.crop), IGNORE_INDEX, dtype=np.int64)
        img_box[dy : dy + ny, dx : dx + nx] = x[sy : sy + ny, sx : sx + nx]
        lab_box[dy : dy + ny, dx : dx + nx] = label[sy : sy + ny, sx : sx + nx]
        return np.ascontiguousarray(img_box.transpose(2, 0, 1)), lab_box


def label_paths(index: DatasetIndex, labels: PathLike) -> list[Path]:
    """The label PNG of every item: ``labels/<id>.png``, or the item's ground truth for ``"gt"``.

    Every missing file, unreadable header and image/label size difference is reported at once in a
    :class:`DatasetError` (only the PNG headers are read here).
    """
    problems: list[str] = []
    out: list[Path] = []
    use_gt = str(labels) == GROUND_TRUTH
    folder = Path(labels)
    if not use_gt and not folder.is_dir():
        raise DatasetError([f"{folder}: no such folder of label PNGs"], "step-2 labels")
    for item in index.items:
        if use_gt:
            if item.mask is None:
                problems.append(f"{item.id}: no ground-truth mask (labels='gt')")
                out.append(Path())
                continue
            path = Path(item.mask)
        else:
            path = folder / f"{item.id}.png"
        out.append(path)
        if not path.is_file():
            problems.append(f"{path}: missing (the label of {item.id})")
            continue
        try:
            with Image.open(path) as lab, Image.open(item.image) as img:
                if lab.size != img.size:
                    problems.append(
                        f"{path}: {lab.size[0]}x{lab.size[1]}, its image {img.size[0]}x{img.size[1]}"
                    )
        except (OSError, ValueError) as e:
            problems.append(f"{path}: unreadable ({type(e).__name__}: {e})")
    if problems:
        raise DatasetError(problems, f"step-2 labels ({'ground truth' if use_gt else folder})")
    return out


def load_image_cv2(path: PathLike) -> NDArray[np.uint8]:
    """An image as the official step-2 loader reads it (``cv2.imread`` + BGR->RGB), HxWx3 uint8; EXIF
    orientation ignored, so that sizes agree with label PNGs made from Pillow-loaded images. Formats
    OpenCV cannot decode go through Pillow."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None:
        return np.asarray(load_rgb(path), dtype=np.uint8)  # raises a clear error for a corrupt file
    return np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)


class SegTrainDataset(torch.utils.data.Dataset):
    """``dataset[(epoch, i)]`` -> ``(id, image (3, crop, crop) float32, label (crop, crop) int64)``.

    The randomness of a sample comes from ``sample_rng(seed, epoch, i)`` only (reproducible,
    resumable, independent of the loader's workers). A label value that is neither a class index
    (``0..num_labels-1``) nor 255 raises a ``ValueError`` naming the file.
    """

    def __init__(
        self,
        index: DatasetIndex,
        labels: PathLike,
        *,
        config: SegAugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.index = index
        self.labels = label_paths(index, labels)
        self.transform = SegTrainTransform(config)
        self.seed = seed
        self.num_labels = index.num_classes + 1

    def __len__(self) -> int:
        return len(self.index)

    def load_label(self, i: int) -> NDArray[np.uint8]:
        path = self.labels[i]
        lab = np.asarray(read_label_png(path))
        bad = (lab >= self.num_labels) & (lab != IGNORE_INDEX)
        if bad.any():
            values = sorted({int(v) for v in np.unique(lab[bad])})[:10]
            raise ValueError(
                f"{path}: label values {values} are neither classes "
                f"0..{self.num_labels - 1} nor {IGNORE_INDEX}"
            )
        return lab.astype(np.uint8)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[str, torch.Tensor, torch.Tensor]:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        i = int(i)
        item = self.index.items[i]
        image = load_image_cv2(item.image)
        label = self.load_label(i)
        img, lab = self.transform(image, label, sample_rng(self.seed, int(epoch), i))
        return item.id, torch.from_numpy(img), torch.from_numpy(lab)
