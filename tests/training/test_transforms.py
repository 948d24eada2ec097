"""The step-1 augmentation (training/transforms.py, docs/algorithm.md 4.3)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from hsc.model.config import IMAGENET_MEAN, IMAGENET_STD
from hsc.training.transforms import (
    AugmentConfig,
    ColorJitter,
    EvalTransform,
    JitterParams,
    TrainTransform,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    crop_window,
    long_side_size,
    normalize,
    random_crop,
    sample_rng,
)

NO_JITTER = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)


class ScriptedRng(random.Random):
    """Answers randint/random/randrange from scripted values (and records the calls)."""

    def __init__(self, *, randint: list[int], random_: list[float], randrange: list[int]) -> None:
        super().__init__(0)
        self._randint, self._random, self._randrange = list(randint), list(random_), list(randrange)
        self.calls: list[tuple] = []

    def randint(self, a, b):
        v = self._randint.pop(0)
        assert a <= v <= b
        self.calls.append(("randint", a, b))
        return v

    def random(self):
        self.calls.append(("random",))
        return self._random.pop(0)

    def shuffle(self, x):
        self.calls.append(("shuffle",))  # the jitter's operation order: left as it is

    def randrange(self, start, stop=None, step=1):
        assert stop is None
        v = self._randrange.pop(0)
        assert 0 <= v < start
        self.calls.append(("randrange", start))
        return v


def _rgb(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _square_scene(w: int = 80, h: int = 60, box=(10, 20, 30, 40)) -> tuple[Image.Image, Image.Image]:
    """Grey image with a red square at x0,y0,x1,y1 and its saliency map (255 inside)."""
    x0, y0, x1, y1 = box
    img = np.full((h, w, 3), 128, np.uint8)
    img[y0:y1, x0:x1] = (255, 0, 0)
    sal = np.zeros((h, w), np.uint8)
    sal[y0:y1, x0:x1] = 255
    return Image.fromarray(img), Image.fromarray(sal, "L")


# -------------------------------------------------------------------------------------------------
# geometry


@pytest.mark.parametrize(
    "w,h,L,expected",
    [
        (500, 375, 600, (600, 450)),  # landscape: long side is the width
        (375, 500, 600, (450, 600)),  # portrait
        (300, 300, 448, (448, 448)),  # square: w >= h branch
        (8, 3, 4, (4, 2)),  # 3*4/8 = 1.5 -> 2 (half to even)
        (8, 5, 4, (4, 2)),  # 5*4/8 = 2.5 -> 2 (half to even)
        (500, 333, 448, (448, 298)),  # 333*448/500 = 298.37
    ],
)
def test_long_side_size_follows_the_official_rule(w, h, L, expected):
    assert long_side_size(w, h, L) == expected


def test_crop_window_rule_for_long_and_short_axes():
    for s in range(30):
        rng = random.Random(s)
        src, dst, n = crop_window(100, 64, rng)
        assert dst == 0 and n == 64 and 0 <= src <= 36
        src, dst, n = crop_window(50, 64, rng)
        assert src == 0 and n == 50 and 0 <= dst <= 14
        assert crop_window(64, 64, rng) == (0, 0, 64)
    # the draws cover their whole ranges
    rng = random.Random(1)
    assert {crop_window(66, 64, rng)[0] for _ in range(200)} == {0, 1, 2}
    assert {crop_window(62, 64, rng)[1] for _ in range(200)} == {0, 1, 2}


def test_random_crop_draws_x_before_y_and_pads_with_zero():
    h, w = 40, 100  # y is padded (40 <= 64), x is cropped (100 > 64)
    a = np.arange(h * w, dtype=np.float32).reshape(h, w, 1) + 1  # all > 0
    b = np.ones((h, w, 3), np.float32)
    rng = ScriptedRng(randint=[], random_=[], randrange=[7, 5])  # x src = 7, y dst = 5
    ca, cb = random_crop([a, b], 64, rng)
    assert rng.calls == [("randrange", 37), ("randrange", 25)]  # x (100-64+1) first, then y (64-40+1)
    assert ca.shape == (64, 64, 1) and cb.shape == (64, 64, 3) and ca.dtype == np.float32
    np.testing.assert_array_equal(ca[5:45], a[:, 7:71])
    assert not ca[:5].any() and not ca[45:].any()
    assert not cb[:5].any() and not cb[45:].any() and (cb[5:45] == 1).all()


def test_random_crop_refuses_arrays_of_different_sizes():
    with pytest.raises(ValueError, match="differ in size"):
        random_crop([np.zeros((4, 5, 3), np.float32), np.zeros((4, 6, 1), np.float32)], 8, random.Random(0))


# -------------------------------------------------------------------------------------------------
# colour jitter


def test_jitter_with_neutral_factors_is_the_identity():
    img = _rgb(12, 16)
    for order in [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)]:
        out = ColorJitter.apply(img, JitterParams(order, 1.0, 1.0, 1.0, 0.0))
        np.testing.assert_array_equal(np.asarray(out), np.asarray(img))
    out = ColorJitter(**NO_JITTER)(img, random.Random(0))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img))


def test_jitter_parameters_follow_torchvision_ranges():
    jit = ColorJitter(0.3, 0.3, 0.3, 0.1)
    rng = random.Random(3)
    orders = set()
    for _ in range(300):
        p = jit.get_params(rng)
        assert sorted(p.order) == [0, 1, 2, 3]
        orders.add(p.order)
        for f in (p.brightness, p.contrast, p.saturation):
            assert f is not None and 0.7 <= f <= 1.3
        assert p.hue is not None and -0.1 <= p.hue <= 0.1
    assert len(orders) > 12  # a random permutation, not a fixed order
    p = ColorJitter(0.3, 0.0, 0.3, 0.0).get_params(rng)
    assert p.contrast is None and p.hue is None


def test_brightness_contrast_saturation_match_pil_imageenhance():
    img = _rgb(10, 14, seed=1)
    a = np.asarray(img).astype(np.float64)
    for f in (0.7, 0.85, 1.3):
        out = np.asarray(adjust_brightness(img, f))
        np.testing.assert_array_equal(out, np.asarray(ImageEnhance.Brightness(img).enhance(f)))
        assert np.abs(out - np.clip(a * f, 0, 255)).max() <= 1.0  # blend with black
        out = np.asarray(adjust_contrast(img, f))
        np.testing.assert_array_equal(out, np.asarray(ImageEnhance.Contrast(img).enhance(f)))
        mean = int(np.asarray(img.convert("L")).mean() + 0.5)  # the mean of the greyscale image
        assert np.abs(out - np.clip(mean + f * (a - mean), 0, 255)).max() <= 1.0
        out = np.asarray(adjust_saturation(img, f))
        np.testing.assert_array_equal(out, np.asarray(ImageEnhance.Color(img).enhance(f)))


def test_hue_shift_turns_red_toward_orange_or_magenta_with_wraparound():
    red = Image.new("RGB", (4, 4), (255, 0, 0))  # H = 0
    plus = np.asarray(adjust_hue(red, 0.1))[0, 0]  # H = int(25.5) = 25 -> about 35 degrees
    minus = np.asarray(adjust_hue(red, -0.1))[0, 0]  # H = 256 - 25 = 231 (wraps) -> about 325 degrees
    assert plus[0] == 255 and plus[1] > 100 and plus[2] == 0
    assert minus[0] == 255 and minus[1] == 0 and minus[2] > 100
    # the hue channel moved by 25 (up to the 8-bit HSV round trip) and -0.1 wrapped to 231
    hue_plus = np.asarray(adjust_hue(red, 0.1).convert("HSV"))[..., 0].astype(int)
    hue_minus = np.asarray(adjust_hue(red, -0.1).convert("HSV"))[..., 0].astype(int)
    assert np.abs(hue_plus - 25).max() <= 1 and np.abs(hue_minus - 231).max() <= 1
    with pytest.raises(ValueError):
        adjust_hue(red, 0.7)


# -------------------------------------------------------------------------------------------------
# normalisation


def test_normalize_is_float64_then_float32():
    img = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    out = normalize(img)
    assert out.dtype == np.float32 and out.shape == (5, 6, 3)
    for k in range(3):
        ref = ((img[..., k] / 255.0 - IMAGENET_MEAN[k]) / IMAGENET_STD[k]).astype(np.float32)
        np.testing.assert_array_equal(out[..., k], ref)
    chw = EvalTransform()(Image.fromarray(img))
    assert chw.shape == (3, 5, 6) and chw.dtype == np.float32
    np.testing.assert_array_equal(chw, out.transpose(2, 0, 1))
    with pytest.raises(ValueError):
        normalize(np.zeros((4, 4), np.uint8))


# -------------------------------------------------------------------------------------------------
# the whole transform


def test_train_transform_shapes_dtypes_and_ranges():
    t = TrainTransform(AugmentConfig(crop=64, long_side=(64, 96)))
    img, sal = t(_rgb(30, 40), Image.fromarray(np.full((30, 40), 200, np.uint8), "L"), random.Random(0))
    assert img.shape == (3, 64, 64) and img.dtype == np.float32 and img.flags.c_contiguous
    assert sal is not None and sal.shape == (1, 64, 64) and sal.dtype == np.float32
    assert sal.min() >= 0.0 and sal.max() <= 1.0
    assert set(np.unique(sal).tolist()) <= {0.0, np.float32(200 / 255)}  # padding 0, map value
    img2, sal2 = t(_rgb(30, 40), None, random.Random(0))
    assert sal2 is None and img2.shape == (3, 64, 64)


def test_train_transform_uses_the_official_draw_order():
    t = TrainTransform(AugmentConfig(crop=64, long_side=(64, 96), **NO_JITTER))
    rng = ScriptedRng(randint=[80], random_=[0.9], randrange=[3, 2])
    t(_rgb(60, 80), None, rng)
    # size, flip, jitter order (no factor: all disabled), x offset over 80-64+1, y offset over 64-60+1
    assert rng.calls == [("randint", 64, 96), ("random",), ("shuffle",), ("randrange", 17), ("randrange", 5)]


@pytest.mark.parametrize("flip", [False, True])
def test_flip_and_crop_keep_saliency_aligned_with_the_image(flip):
    img, sal = _square_scene()  # 80x60, red square x 10..30, y 20..40
    t = TrainTransform(AugmentConfig(crop=64, long_side=(80, 80), **NO_JITTER))
    rng = ScriptedRng(randint=[80], random_=[0.9 if flip else 0.1], randrange=[5, 3])
    x, s = t(img, sal, rng)
    assert s is not None
    red = normalize(np.array([[[255, 0, 0]]], np.uint8))[0, 0]
    is_red = np.all(np.abs(x.transpose(1, 2, 0) - red) < 1e-6, axis=2)
    salient = s[0] > 0.5
    np.testing.assert_array_equal(is_red, salient)
    x0, x1 = (80 - 30, 80 - 10) if flip else (10, 30)
    expect = np.zeros((64, 64), bool)
    expect[20 + 3 : 40 + 3, x0 - 5 : x1 - 5] = True  # y padded by 3, x cropped from 5
    np.testing.assert_array_equal(salient, expect)
    # padding rows: image 0 (the mean colour), saliency 0
    assert not x[:, :3].any() and not s[:, :3].any() and not x[:, 63:].any()


def test_resize_uses_bicubic_for_image_and_saliency_and_aligns_sizes():
    img, sal = _square_scene(w=40, h=30, box=(10, 10, 20, 20))
    t = TrainTransform(AugmentConfig(crop=80, long_side=(80, 80), flip=False, **NO_JITTER))
    rng = ScriptedRng(randint=[80], random_=[], randrange=[0, 0])  # 80x60, y padded at 0
    x, s = t(img, sal, rng)
    assert s is not None
    ref = np.asarray(sal.resize((80, 60), Image.Resampling.BICUBIC)) / 255.0
    np.testing.assert_allclose(s[0, :60], ref, atol=1e-7)
    assert 0 < np.count_nonzero((s[0] > 0) & (s[0] < 1))  # bicubic, not nearest
    # a saliency map at another resolution is resized straight to the image's new size
    half = sal.resize((20, 15), Image.Resampling.NEAREST)
    _, s2 = t(img, half, ScriptedRng(randint=[80], random_=[], randrange=[0, 0]))
    assert s2 is not None
    ref2 = np.asarray(half.resize((80, 60), Image.Resampling.BICUBIC)) / 255.0
    np.testing.assert_allclose(s2[0, :60], ref2, atol=1e-7)


def test_rgb_saliency_is_averaged_to_one_channel():
    img = _rgb(20, 20)
    sal = Image.new("RGB", (20, 20), (30, 60, 90))
    t = TrainTransform(AugmentConfig(crop=20, long_side=(20, 20), flip=False, **NO_JITTER))
    _, s = t(img, sal, random.Random(0))
    assert s is not None
    np.testing.assert_allclose(s, 60 / 255, atol=1e-7)


def test_same_seed_same_sample_other_epoch_or_index_different():
    t = TrainTransform(AugmentConfig(crop=48, long_side=(48, 80)))
    img, sal = _square_scene()
    a = t(img, sal, sample_rng(7, 0, 3))
    b = t(img, sal, sample_rng(7, 0, 3))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    for other in (sample_rng(7, 1, 3), sample_rng(7, 0, 4), sample_rng(8, 0, 3)):
        c = t(img, sal, other)
        assert not np.array_equal(a[0], c[0])
    state = random.getstate()
    t(img, sal, sample_rng(1, 2, 3))
    assert random.getstate() == state  # the global RNG is never touched
    with pytest.raises(ValueError):
        sample_rng(-1, 0, 0)


def test_config_validation():
    with pytest.raises(ValueError):
        AugmentConfig(crop=0)
    with pytest.raises(ValueError):
        AugmentConfig(long_side=(500, 400))
    with pytest.raises(ValueError):
        ColorJitter(hue=0.6)
