"""Step-1 training augmentation, exactly the official order (docs/algorithm.md 4.3), and the
evaluation-time transform (normalise only, 1.1).

Per sample, with one explicit ``random.Random`` (never the global RNG), in this order:

1. random long side ``L = rng.randint(lo, hi)`` (both ends included; official 448..768): the image
   is Pillow-BICUBIC resized to ``(round(w·L/h), L)`` if ``w < h`` else ``(L, round(h·L/w))``
   (Python ``round``, half to even); the saliency map gets the *same* target size, also BICUBIC;
2. horizontal flip of both when ``rng.random() > 0.5``;
3. colour jitter of the image only, torchvision ``ColorJitter(0.3, 0.3, 0.3, 0.1)`` semantics on
   the PIL backend: a random permutation of the four operations, then the factors
   ``b, c, s ~ U[0.7, 1.3]`` and the hue shift ``~ U[-0.1, 0.1]`` (:class:`ColorJitter`);
4. normalise ``(v/255 − mean)/std`` in float64, stored as float32; saliency ``s/255``;
5. joint random crop to ``crop × crop`` (x offset drawn before y; :func:`crop_window`), zero
   padding for both (0 is the mean colour after normalisation, and "not salient");
6. HWC → CHW; the saliency channels are averaged to one.

A sample's generator comes from :func:`sample_rng` ``(seed, epoch, index)``, so a run is
reproducible on CPU and a resumed run sees exactly the same samples. (The official code drew the
jitter from torch's RNG and never seeded anything; only the draw *order* is kept.)

Everything here is numpy + Pillow; :class:`~hsc.training.datasets.HSCTrainDataset` makes tensors.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageEnhance

from hsc.model.config import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "AugmentConfig",
    "ColorJitter",
    "EvalTransform",
    "JitterParams",
    "TrainTransform",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "crop_window",
    "hflip",
    "long_side_size",
    "normalize",
    "random_crop",
    "resize_long",
    "sample_rng",
]


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator of one sample: a ``random.Random`` seeded from ``(seed, epoch, index)``.

    The three integers must be >= 0. Distinct triples give independent streams (numpy's
    ``SeedSequence`` mixes them), the same triple always gives the same stream.
    """
    if min(seed, epoch, index) < 0:
        raise ValueError(f"seed, epoch and index must be >= 0, got {(seed, epoch, index)}")
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(4, dtype=np.uint64)
    return random.Random(int.from_bytes(state.tobytes(), "little"))


# --------------------------------------------------------------------------------------------------
# geometry


def long_side_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """``(new_width, new_height)`` with the long side ``long_side`` (official ``RandomResizeLong``).

    ``w < h``: ``(round(w·L/h), L)``; otherwise (squares included) ``(L, round(h·L/w))``; Python
    ``round`` (half to even), at least 1. Example: 500×375, L = 600 → 600×450.
    """
    if width < height:
        return max(1, int(round(width * long_side / height))), long_side
    return long_side, max(1, int(round(height * long_side / width)))


def resize_long(image: Image.Image, long_side: int) -> Image.Image:
    """Pillow-BICUBIC resize of ``image`` to :func:`long_side_size`."""
    return image.resize(long_side_size(*image.size, long_side), Image.Resampling.BICUBIC)


def hflip(image: Image.Image) -> Image.Image:
    """Left-right mirror."""
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def crop_window(length: int, crop: int, rng: random.Random) -> tuple[int, int, int]:
    """One axis of the official random crop: ``(src, dst, n)``, copy ``[src, src+n)`` to ``[dst, dst+n)``.

    ``length > crop``: ``src ~ U{0..length−crop}``, ``dst = 0``, ``n = crop``; otherwise the whole
    axis is kept: ``dst ~ U{0..crop−length}``, ``src = 0``, ``n = length`` (one draw either way).
    """
    if length > crop:
        return rng.randrange(length - crop + 1), 0, crop
    return 0, rng.randrange(crop - length + 1), length


def random_crop(
    arrays: Sequence[NDArray[np.float32]], crop: int, rng: random.Random
) -> list[NDArray[np.float32]]:
    """Joint random crop of HWC arrays of the same height/width into zero-filled ``crop × crop``
    float32 containers; the x (width) offset is drawn before the y offset."""
    h, w = arrays[0].shape[:2]
    for a in arrays[1:]:
        if a.shape[:2] != (h, w):
            raise ValueError(f"arrays to crop jointly differ in size: {a.shape[:2]} vs {(h, w)}")
    sx, dx, nx = crop_window(w, crop, rng)
    sy, dy, ny = crop_window(h, crop, rng)
    out = []
    for a in arrays:
        box = np.zeros((crop, crop, *a.shape[2:]), dtype=np.float32)
        box[dy : dy + ny, dx : dx + nx] = a[sy : sy + ny, sx : sx + nx]
        out.append(box)
    return out


# --------------------------------------------------------------------------------------------------
# colour jitter (torchvision's ColorJitter on PIL images, without torchvision)


def adjust_brightness(image: Image.Image, factor: float) -> Image.Image:
    """Blend with black (``PIL.ImageEnhance.Brightness``, as torchvision's PIL backend)."""
    return ImageEnhance.Brightness(image).enhance(factor)


def adjust_contrast(image: Image.Image, factor: float) -> Image.Image:
    """Blend with the uniform grey of the greyscale image's mean (``PIL.ImageEnhance.Contrast``)."""
    return ImageEnhance.Contrast(image).enhance(factor)


def adjust_saturation(image: Image.Image, factor: float) -> Image.Image:
    """Blend with the greyscale image (``PIL.ImageEnhance.Color``)."""
    return ImageEnhance.Color(image).enhance(factor)


def adjust_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by ``shift`` turns, ``shift ∈ [−0.5, 0.5]`` (torchvision's PIL ``adjust_hue``).

    The image goes to Pillow's 8-bit HSV, ``int(shift·255)`` (truncated toward zero) is added to
    H modulo 256 (uint8 wrap-around), and it goes back to RGB. ``shift == 0`` returns a copy
    untouched (torchvision would still make the lossy HSV round trip; ColorJitter never asks
    for it since a drawn shift is never exactly 0).
    """
    if not -0.5 <= shift <= 0.5:
        raise ValueError(f"hue shift must be in [-0.5, 0.5], got {shift}")
    if image.mode in ("L", "1", "I", "F"):
        return image.copy()
    if shift == 0:
        return image.copy()
    h, s, v = image.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    np_h += np.uint8(int(shift * 255) % 256)  # wraps around, as uint8 arithmetic does
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert(image.mode)


@dataclass(frozen=True)
class JitterParams:
    """One draw of :class:`ColorJitter`: the operation order (0 brightness, 1 contrast,
    2 saturation, 3 hue) and the factors; ``None`` = that operation is switched off."""

    order: tuple[int, ...]
    brightness: float | None
    contrast: float | None
    saturation: float | None
    hue: float | None


class ColorJitter:
    """torchvision's ``ColorJitter(brightness, contrast, saturation, hue)`` on PIL RGB images.

    Factors are drawn as torchvision does: ``U[max(0, 1−b), 1+b]`` for brightness, contrast and
    saturation, ``U[−h, h]`` for hue (``h <= 0.5``); a strength of 0 switches that operation off.
    Draw order from ``rng``: a permutation of the four operations, then brightness, contrast,
    saturation, hue (only the enabled ones).
    """

    def __init__(
        self, brightness: float = 0.3, contrast: float = 0.3, saturation: float = 0.3, hue: float = 0.1
    ) -> None:
        for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        self.brightness = brightness
        self.contrast = contrast
        self.saturation = saturation
        self.hue = hue

    def get_params(self, rng: random.Random) -> JitterParams:
        order = list(range(4))
        rng.shuffle(order)

        def factor(strength: float) -> float | None:
            return rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength) if strength > 0 else None

        b = factor(self.brightness)
        c = factor(self.contrast)
        s = factor(self.saturation)
        h = rng.uniform(-self.hue, self.hue) if self.hue > 0 else None
        return JitterParams(tuple(order), b, c, s, h)

    @staticmethod
    def apply(image: Image.Image, params: JitterParams) -> Image.Image:
        for op in params.order:
            if op == 0 and params.brightness is not None:
                image = adjust_brightness(image, params.brightness)
            elif op == 1 and params.contrast is not None:
                image = adjust_contrast(image, params.contrast)
            elif op == 2 and params.saturation is not None:
                image = adjust_saturation(image, params.saturation)
            elif op == 3 and params.hue is not None:
                image = adjust_hue(image, params.hue)
        return image

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        return self.apply(image, self.get_params(rng))


# --------------------------------------------------------------------------------------------------
# normalisation and the two transforms


def normalize(
    image: NDArray[np.uint8] | Image.Image,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> NDArray[np.float32]:
    """HWC uint8 RGB → HWC float32 ``(v/255 − mean)/std``, computed in float64 (algorithm.md 1.1)."""
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {a.shape} {a.dtype}")
    m = np.asarray(mean, dtype=np.float64)
    s = np.asarray(std, dtype=np.float64)
    return ((a / 255.0 - m) / s).astype(np.float32)


@dataclass(frozen=True)
class AugmentConfig:
    """Sizes and strengths of the training augmentation (defaults: the official ones, 4.3)."""

    crop: int = 448
    long_side: tuple[int, int] = (448, 768)
    flip: bool = True
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.1
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.crop < 1:
            raise ValueError(f"crop must be >= 1, got {self.crop}")
        lo, hi = self.long_side
        if not 1 <= lo <= hi:
            raise ValueError(f"long_side must be (lo, hi) with 1 <= lo <= hi, got {self.long_side}")


class TrainTransform:
    """The official step-1 augmentation of an (image, saliency) pair (module docstring).

    ``__call__(image, saliency, rng)`` takes a PIL RGB image, an optional PIL saliency map
    (grey ``L`` or RGB; 255 = salient; resized to the image's size if it differs) and the
    sample's generator, and returns ``(img float32 (3, crop, crop), sal float32 (1, crop, crop)
    in [0, 1] or None)``.
    """

    def __init__(self, config: AugmentConfig | None = None) -> None:
        self.config = config or AugmentConfig()
        c = self.config
        self.jitter = ColorJitter(c.brightness, c.contrast, c.saturation, c.hue)

    def __call__(
        self, image: Image.Image, saliency: Image.Image | None, rng: random.Random
    ) -> tuple[NDArray[np.float32], NDArray[np.float32] | None]:
        c = self.config
        image = image.convert("RGB") if image.mode != "RGB" else image
        if saliency is not None and saliency.mode not in ("L", "RGB"):
            saliency = saliency.convert("RGB")
        # 1. random long side (same target size for both)
        size = long_side_size(*image.size, rng.randint(*c.long_side))
        image = image.resize(size, Image.Resampling.BICUBIC)
        if saliency is not None:
            saliency = saliency.resize(size, Image.Resampling.BICUBIC)
        # 2. horizontal flip
        if c.flip and rng.random() > 0.5:
            image = hflip(image)
            saliency = hflip(saliency) if saliency is not None else None
        # 3. colour jitter (image only)
        image = self.jitter(image, rng)
        # 4. normalise
        img = normalize(image, c.mean, c.std)  # (H, W, 3)
        arrays = [img]
        if saliency is not None:
            sal = np.asarray(saliency, dtype=np.float64) / 255.0
            sal = sal.mean(axis=2) if sal.ndim == 3 else sal  # one channel, in float64
            arrays.append(sal.astype(np.float32)[:, :, None])  # (H, W, 1)
        # 5. joint crop, 6. HWC -> CHW
        cropped = random_crop(arrays, c.crop, rng)
        img_out = np.ascontiguousarray(cropped[0].transpose(2, 0, 1))  # (3, crop, crop)
        sal_out = np.ascontiguousarray(cropped[1].transpose(2, 0, 1)) if saliency is not None else None
        return img_out, sal_out


class EvalTransform:
    """Evaluation/inference input: normalise only, ``(3, H, W)`` float32 at the image's own size."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, image: Image.Image | NDArray[np.uint8]) -> NDArray[np.float32]:
        if isinstance(image, Image.Image) and image.mode != "RGB":
            image = image.convert("RGB")
        return np.ascontiguousarray(normalize(image, self.mean, self.std).transpose(2, 0, 1))
