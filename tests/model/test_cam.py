"""Multi-scale CAM inference, thresholded labels and the inference CRF (model/cam.py).

The golden case ``inference_one_image`` is read entirely from the golden file (recipe, scales, classes,
thresholds, CRF settings), so another file of the same form (HSC_GOLDEN) is checked the same way.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from hsc.model.cam import (
    MultiScaleCAM,
    cams_to_label,
    crf_from_cams,
    crf_to_label,
    crf_unary_scores,
    multiscale_cam,
    multiscale_cams,
    normalize_image,
    parse_labels,
    resize_image,
    scaled_size,
)
from hsc.model.config import IMAGENET_MEAN, IMAGENET_STD
from hsc.model.hsc_net import HSCNet, build_hsc_net

from goldenlib import assert_label_map, assert_summary, build_inputs, case, golden_path, seeded_weights

# ----------------------------------------------------------------------------- helpers


def naive_official_cam(net: nn.Module, img: np.ndarray, label: np.ndarray, scales) -> np.ndarray:
    """algorithm.md 5.2 written out literally: one input at a time, numpy flips, all K channels."""
    h, w = img.shape[:2]
    pil = Image.fromarray(img)
    inputs = []
    for s in scales:
        a = np.asarray(pil.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC))
        x = np.empty(a.shape, np.float32)
        for ch in range(3):
            x[..., ch] = (a[..., ch] / 255.0 - IMAGENET_MEAN[ch]) / IMAGENET_STD[ch]
        x = x.transpose(2, 0, 1)
        inputs += [x.copy(), np.flip(x, -1).copy()]
    maps = []
    for i, x in enumerate(inputs):
        with torch.no_grad():
            p = F.softmax(net.forward_cam(torch.from_numpy(x)[None]), dim=1)
            p = F.interpolate(p, (h, w), mode="bilinear", align_corners=False)[0]
        fg = p[:-1].numpy() * label.reshape(-1, 1, 1).astype(np.float32)
        maps.append(np.flip(fg, -1) if i % 2 else fg)
    total = maps[0].copy()
    for m in maps[1:]:
        total = total + m
    return total / (total.max(axis=(1, 2), keepdims=True) + 1e-5)


@functools.lru_cache(maxsize=1)
def tiny_net() -> HSCNet:
    """A small random HSC network with K = 5 (not the golden weights)."""
    torch.manual_seed(0)
    return build_hsc_net(num_classes=5, width=0.125).eval()


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    base = g.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3))
    img = np.repeat(np.repeat(base, 4, 0), 4, 1)[:h, :w] + g.integers(-15, 16, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


class RampStub(nn.Module):
    """``forward_cam`` at stride 1: logit_c = a_c * x[:, 0] + b_c * column (not flip-equivariant)."""

    def __init__(self, a: list[float], b: list[float]) -> None:
        super().__init__()
        self.register_buffer("a", torch.tensor(a).view(1, -1, 1, 1))
        self.register_buffer("b", torch.tensor(b).view(1, -1, 1, 1))

    def forward_cam(self, x: torch.Tensor) -> torch.Tensor:
        col = torch.arange(x.shape[3], dtype=x.dtype).view(1, 1, 1, -1)
        return self.a * x[:, :1] + self.b * col


def _softmax_np(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


# ----------------------------------------------------------------------------- golden case


def _entry(d: dict[str, Any], prefix: str) -> Any:
    keys = [k for k in d if k.startswith(prefix)]
    assert len(keys) == 1, f"golden file: expected one key starting with {prefix!r}, found {keys}"
    return d[keys[0]]


def _parse_pass_key(key: str) -> tuple[float, bool]:
    m = re.fullmatch(r"scale=([0-9.]+)(, flipped back)?", key.strip())
    assert m, f"golden file: unknown per-pass key {key!r}"
    return float(m.group(1)), m.group(2) is not None


def _golden_scales(c: dict[str, Any]) -> tuple[float, ...]:
    scales: list[float] = []
    for key in _entry(c, "per_pass_maps"):
        s, _ = _parse_pass_key(key)
        if s not in scales:
            scales.append(s)
    return tuple(scales)


@functools.lru_cache(maxsize=1)
def _golden_run(path_key: str) -> tuple[np.ndarray, MultiScaleCAM]:
    c = case("inference_one_image")
    ns = build_inputs(c)
    img = ns["img"].numpy()
    sd = seeded_weights()
    net = build_hsc_net(num_classes=int(sd["fc8.weight"].shape[0]) - 1)
    net.load_state_dict(sd, strict=True)
    net.eval()
    res = multiscale_cam(net, img, ns["label"], scales=_golden_scales(c), return_passes=True)
    return img, res


def golden_run() -> tuple[dict[str, Any], np.ndarray, MultiScaleCAM]:
    c = case("inference_one_image")
    img, res = _golden_run(str(golden_path()))
    return c, img, res


@pytest.mark.slow
def test_golden_scaled_inputs_and_classes():
    c, img, res = golden_run()
    got = [list(p.input_size) for p in res.passes]
    assert got == _entry(c, "scaled_inputs_CHW")
    label = build_inputs(c)["label"]
    assert res.classes == tuple(int(i) for i in torch.nonzero(label > 1e-5).flatten())
    assert res.cams.shape == (len(res.classes), *img.shape[:2])


@pytest.mark.slow
def test_golden_per_pass_maps():
    c, img, res = golden_run()
    per_pass = _entry(c, "per_pass_maps")
    assert len(per_pass) == len(res.passes)
    for key, maps in per_pass.items():
        scale, flipped = _parse_pass_key(key)
        (p,) = [p for p in res.passes if p.scale == scale and p.flipped == flipped]
        for name, summary in maps.items():
            m = re.match(r"fg_class_(\d+)\b", name)
            if m:
                t = p.fg[res.classes.index(int(m.group(1)))]
            elif name.startswith("bg"):
                t = p.bg
            else:
                pytest.fail(f"golden file: unknown per-pass entry {name!r}")
            assert_summary(t, summary, "abs", what=f"{key}/{name}")


@pytest.mark.slow
def test_golden_cam_npy():
    c, img, res = golden_run()
    cam_npy = _entry(c, "cam_npy")
    assert sorted(int(k) for k in cam_npy) == list(res.classes)
    for k, summary in cam_npy.items():
        assert_summary(res.cams[res.classes.index(int(k))], summary, "abs", what=f"cam_npy[{k}]")


def _runs(c: dict[str, Any]) -> list[str]:
    return [k for k in c if k.startswith("run_")]


@pytest.mark.slow
def test_golden_label_png_and_crf():
    c, img, res = golden_run()
    runs = _runs(c)
    assert runs, "golden file: inference_one_image has no run_* entry"
    cams = res.cams.numpy()
    n_crf = 0
    for run in runs:
        spec = c[run]
        for key, value in spec.items():
            if key == "thr":
                continue
            if key.startswith("label_png"):
                label = cams_to_label(cams, res.classes, spec["thr"])
                assert label.dtype == np.uint8
                assert_label_map(label, value, what=f"{run}/{key}")
                continue
            m = re.match(r"crf_t(\d+)_alpha([0-9.]+)", key)
            if not m:
                pytest.fail(f"golden file: unknown entry {run}/{key}")
            t = int(m.group(1))
            alpha = float(m.group(2)) if "." in m.group(2) else int(m.group(2))
            q, keys = crf_from_cams(img, cams, res.classes, alpha=alpha, iters=t)
            assert list(keys) == value["keys"], f"{run}/{key}"
            assert sorted(int(k) for k in value["Q"]) == list(keys)
            for k, summary in value["Q"].items():
                assert_summary(
                    torch.from_numpy(q[keys.index(int(k))]), summary, "abs", what=f"{run}/{key} Q[{k}]"
                )
            assert_label_map(crf_to_label(q, keys), value["argmax_over_keys"], what=f"{run}/{key} argmax")
            n_crf += 1
    assert n_crf >= 1


# ----------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("size", [(9, 13), (8, 8)])
def test_flip_merge_known_answer(size):
    """Stride-1 stub at scale 1: both passes and their sum follow in closed form."""
    a, b = [1.5, -0.7, 0.3, 0.0], [0.2, -0.1, 0.05, 0.0]  # K = 3 + background
    net = RampStub(a, b).eval()
    img = random_image(*size, seed=3)
    h, w = size
    x0 = ((img[..., 0] / 255.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]).astype(np.float32).astype(np.float64)
    col = np.arange(w, dtype=np.float64)
    za = np.stack([ai * x0 + bi * col for ai, bi in zip(a, b)])
    zb = np.stack([ai * x0 + bi * (w - 1 - col) for ai, bi in zip(a, b)])  # flipped input, flipped back
    pa, pb = _softmax_np(za), _softmax_np(zb)
    res = multiscale_cam(net, img, [0, 2], scales=(1.0,), return_passes=True)
    assert res.classes == (0, 2)
    assert [(p.scale, p.flipped, p.input_size) for p in res.passes] == [
        (1.0, False, (3, h, w)),
        (1.0, True, (3, h, w)),
    ]
    np.testing.assert_allclose(res.passes[0].fg.numpy(), pa[[0, 2]], atol=1e-6)
    np.testing.assert_allclose(res.passes[1].fg.numpy(), pb[[0, 2]], atol=1e-6)
    np.testing.assert_allclose(res.passes[0].bg.numpy(), pa[3], atol=1e-6)
    np.testing.assert_allclose(res.passes[1].bg.numpy(), pb[3], atol=1e-6)
    s = (pa + pb)[[0, 2]]
    expected = s / (s.max(axis=(1, 2), keepdims=True) + 1e-5)
    np.testing.assert_allclose(res.cams.numpy(), expected, atol=1e-6)
    # without flip: one pass
    res1 = multiscale_cam(net, img, [1], scales=(1.0,), flip=False)
    np.testing.assert_allclose(res1.cams.numpy()[0], pa[1] / (pa[1].max() + 1e-5), atol=1e-6)


def test_constant_logits_sum_over_all_passes():
    """Spatially constant logits: every pass contributes p_c, the sum is (#passes) * p_c."""

    class Const(nn.Module):
        def forward_cam(self, x):
            z = torch.tensor([0.5, 2.0, -1.0]).view(1, 3, 1, 1)
            return z.expand(x.shape[0], 3, (x.shape[2] + 7) // 8, (x.shape[3] + 7) // 8)

    p = torch.softmax(torch.tensor([0.5, 2.0, -1.0]), 0)
    res = multiscale_cam(Const().eval(), random_image(11, 7), [1], return_passes=True)
    assert len(res.passes) == 8
    for ps in res.passes:
        assert torch.allclose(ps.fg, p[1].expand(1, 11, 7)) and torch.allclose(ps.bg, p[2].expand(11, 7))
    assert torch.allclose(res.cams, torch.full((1, 11, 7), float(8 * p[1] / (8 * p[1] + 1e-5))))


@pytest.mark.parametrize(
    "size,labels",
    [((23, 31), [1, 3]), ((17, 9), [0, 1, 2, 3, 4]), ((20, 26), [4])],
)
def test_matches_the_naive_official_recipe(size, labels):
    """Odd sizes, non-integer resize ratios, K = 5: batched/selected path == literal recipe."""
    net = tiny_net()
    img = random_image(*size, seed=sum(size))
    vec = np.zeros(5, np.float32)
    vec[labels] = 1.0
    ref = naive_official_cam(net, img, vec, (0.5, 1.0, 1.5, 2.0))
    for lab in (labels, vec, torch.from_numpy(vec), vec.astype(bool)):
        res = multiscale_cam(net, img, lab)
        assert res.classes == tuple(labels)
        assert res.cams.shape == (len(labels), *size) and res.cams.dtype == torch.float32
        np.testing.assert_allclose(res.cams.numpy(), ref[labels], atol=1e-5)
    assert np.all(np.delete(ref, labels, axis=0) == 0)  # absent classes are zero in the recipe


def test_soft_label_values_scale_the_passes_like_the_official_product():
    net = RampStub([1.0, -1.0, 0.0], [0.1, 0.0, 0.0]).eval()
    img = random_image(6, 10)
    hard = multiscale_cam(net, img, np.array([1.0, 1.0], np.float32), scales=(1.0, 0.5), return_passes=True)
    soft = multiscale_cam(net, img, np.array([0.5, 1.0], np.float32), scales=(1.0, 0.5), return_passes=True)
    for ph, pz in zip(hard.passes, soft.passes):
        assert torch.allclose(pz.fg[0], 0.5 * ph.fg[0]) and torch.equal(pz.fg[1], ph.fg[1])
    assert torch.allclose(soft.cams, hard.cams, atol=1e-6)


def test_absent_classes_never_in_the_masks_and_sizes_are_original():
    net = tiny_net()
    img = random_image(19, 27, seed=5)
    res = multiscale_cam(net, img, [1, 3])
    allowed = {0, 2, 4}
    for thr in (0.0, 0.22, 0.6, 1.0):
        lab = cams_to_label(res.cams, res.classes, thr)
        assert lab.shape == (19, 27) and lab.dtype == np.uint8
        assert set(np.unique(lab).tolist()) <= allowed
    assert set(np.unique(cams_to_label(res.cams, res.classes, 0.0)).tolist()) <= {2, 4}
    assert np.all(cams_to_label(res.cams, res.classes, 1.0) == 0)
    q, keys = crf_from_cams(img, res.cams, res.classes, alpha=4, iters=3)
    assert keys == (0, 2, 4) and q.shape == (3, 19, 27) and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)
    assert set(np.unique(crf_to_label(q, keys)).tolist()) <= allowed


# ----------------------------------------------------------------------------- labels


def test_cams_to_label_ties_and_float32_threshold():
    thr = 0.1  # float32(0.1) > 0.1: the official float32 score array makes this a tie
    cams = np.array(
        [[[np.float32(thr), 0.5, 0.3, 0.0]], [[0.05, 0.5, 0.4, 0.0]]], dtype=np.float32
    )  # classes 3 and 7, 1x4 image
    lab = cams_to_label(cams, [3, 7], thr)
    assert lab.tolist() == [[0, 4, 8, 0]]  # bg wins the tie, class 3 wins the class tie


def test_cams_to_label_equals_the_official_argmax():
    g = np.random.default_rng(1)
    cams = g.random((3, 30, 40), dtype=np.float32)
    cams[1, :5] = cams[0, :5]  # ties between classes
    cams[2, 10:12] = np.float32(0.22)  # ties with the background
    classes = [2, 11, 19]
    for thr in (0.22, 0.6):
        t = np.zeros((21, 30, 40), np.float32)
        for i, cl in enumerate(classes):
            t[cl + 1] = cams[i]
        t[0] = thr
        assert np.array_equal(
            cams_to_label(torch.from_numpy(cams), classes, thr), t.argmax(0).astype(np.uint8)
        )


def test_crf_scores_keys_and_zero_iterations():
    g = np.random.default_rng(2)
    img = random_image(12, 15, seed=2)
    cams = g.random((2, 12, 15), dtype=np.float32)
    scores = crf_unary_scores(cams, 7)
    assert scores.dtype == np.float32 and scores.shape == (3, 12, 15)
    np.testing.assert_allclose(scores[0], (1 - cams.max(0)) ** 7, rtol=1e-5, atol=1e-7)
    assert np.array_equal(scores[1:], cams)
    q, keys = crf_from_cams(img, cams, [4, 14], alpha=7, iters=0)
    assert keys == (0, 5, 15)
    u = np.clip(scores, 1e-5, 1)  # zero mean-field iterations: Q = normalised clip(scores)
    np.testing.assert_allclose(q, u / u.sum(0, keepdims=True), rtol=1e-4, atol=1e-6)


def test_crf_to_label():
    q = np.array([[[0.2, 0.4, 0.3]], [[0.4, 0.4, 0.3]], [[0.4, 0.2, 0.4]]], np.float32)
    assert crf_to_label(q, (0, 1, 15)).tolist() == [[1, 0, 15]]  # first maximum wins ties
    assert crf_to_label(q.reshape(3, 3), (0, 1, 15), 1, 3).tolist() == [[1, 0, 15]]
    with pytest.raises(ValueError, match="height and width"):
        crf_to_label(q.reshape(3, 3), (0, 1, 15))
    with pytest.raises(ValueError):
        crf_to_label(q, (0, 1))


# ----------------------------------------------------------------------------- pre-processing


@pytest.mark.parametrize(
    "hw,s,expected",
    [
        ((37, 50), 0.5, (18, 25)),
        ((375, 500), 0.5, (188, 250)),
        ((333, 333), 0.5, (166, 166)),
        ((37, 50), 1.5, (56, 75)),
    ],
)
def test_scaled_size_rounds_half_to_even(hw, s, expected):
    assert scaled_size(*hw, s) == expected


def test_resize_and_normalize():
    img = random_image(21, 13)
    assert resize_image(img, 1.0) is img
    out = resize_image(img, 1.5)
    assert out.shape == (32, 20, 3) and out.dtype == np.uint8  # 31.5 -> 32, 19.5 -> 20
    expected = np.asarray(Image.fromarray(img).resize((20, 32), Image.Resampling.BICUBIC))
    assert np.array_equal(out, expected)
    x = normalize_image(img)
    ref = (
        ((img / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD))
        .astype(np.float32)
        .transpose(2, 0, 1)
    )
    assert x.dtype == torch.float32 and np.array_equal(x.numpy(), ref)
    with pytest.raises(ValueError, match="shrinks"):
        scaled_size(3, 3, 0.1)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "img,err",
    [
        (np.zeros((8, 8, 3), np.float32), ValueError),
        (np.zeros((8, 8), np.uint8), ValueError),
        (np.zeros((8, 8, 4), np.uint8), ValueError),
        (np.zeros((3, 8, 8), np.uint8), ValueError),
        (np.zeros((0, 8, 3), np.uint8), ValueError),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), TypeError),
    ],
)
def test_rejects_bad_images(img, err):
    with pytest.raises(err):
        multiscale_cam(RampStub([0.0, 0.0], [0.0, 0.0]).eval(), img, [0])


@pytest.mark.parametrize(
    "labels,match",
    [
        ([], "empty"),
        (np.zeros(5, np.float32), "no present class"),
        ([5], "out of range"),
        ([-1], "out of range"),
        ([1, 1], "duplicate"),
        (np.array([0, 1, 0, 0, 1]), "duplicate"),
        (np.ones(4, np.float32), "length 4"),
        (np.array([[1, 2]]), "1-D"),
        (["a"], "multi-hot"),
    ],
)
def test_rejects_bad_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        multiscale_cam(tiny_net(), random_image(8, 8), labels)


def test_label_range_checked_against_the_output_when_the_net_has_no_num_classes():
    with pytest.raises(ValueError, match="out of range"):
        multiscale_cam(RampStub([0.0, 0.0, 0.0], [0.0, 0.0, 0.0]).eval(), random_image(8, 8), [2])


class _NoModule:
    """Not an nn.Module: only ``forward_cam`` (runs on the CPU)."""

    def forward_cam(self, x):
        return torch.zeros(x.shape[0], 3, x.shape[2], x.shape[3])


def test_plain_objects_with_forward_cam_and_training_mode_check():
    res = multiscale_cam(_NoModule(), random_image(5, 6), [0, 1], scales=(1.0, 0.5))
    assert res.cams.shape == (2, 5, 6)
    assert torch.allclose(res.cams, torch.full((2, 5, 6), 4 / 3 / (4 / 3 + 1e-5)))
    with pytest.raises(ValueError, match="eval"):
        multiscale_cam(RampStub([0.0, 0.0], [0.0, 0.0]), random_image(5, 6), [0])


def test_parse_labels_forms():
    assert parse_labels([3, 1], 5) == ((1, 3), (1.0, 1.0))
    assert parse_labels(np.array([0, 1, 0, 0, 1], np.float32), 5) == ((1, 4), (1.0, 1.0))
    assert parse_labels(torch.tensor([True, False, True]), 3) == ((0, 2), (1.0, 1.0))
    assert parse_labels([0.0, 1e-6, 0.5], 3) == ((2,), (0.5,))


# ----------------------------------------------------------------------------- several images at once


@pytest.mark.parametrize("max_batch", [None, 1, 4])
def test_batched_images_equal_one_at_a_time(max_batch):
    net = tiny_net()
    imgs = [random_image(23, 31, seed) for seed in range(3)]
    labels = [[3], [0, 2, 4], [1]]  # a different label set for each image
    batched = multiscale_cams(
        net, imgs, labels, scales=(0.5, 1.0, 1.5), max_batch=max_batch, return_passes=True
    )
    assert len(batched) == 3
    for img, lab, got in zip(imgs, labels, batched):
        alone = multiscale_cam(net, img, lab, scales=(0.5, 1.0, 1.5), return_passes=True)
        assert got.classes == alone.classes == tuple(sorted(lab))
        torch.testing.assert_close(got.cams, alone.cams, rtol=0, atol=1e-5)
        assert [(p.scale, p.flipped, p.input_size) for p in got.passes] == [
            (p.scale, p.flipped, p.input_size) for p in alone.passes
        ]
        for a, b in zip(got.passes, alone.passes):
            torch.testing.assert_close(a.fg, b.fg, rtol=0, atol=1e-5)
            torch.testing.assert_close(a.bg, b.bg, rtol=0, atol=1e-5)


def test_batched_images_without_flip_and_the_forwards_they_take():
    calls: list[int] = []

    class Counting(RampStub):
        def forward_cam(self, x):
            calls.append(x.shape[0])
            return super().forward_cam(x)

    net = Counting([1.0, -0.5, 0.3], [0.1, 0.0, -0.2]).eval()
    imgs = [random_image(8, 10, s) for s in range(3)]
    multiscale_cams(net, imgs, [[0]] * 3, scales=(1.0, 2.0), flip=True, max_batch=4)
    assert calls == [4, 2, 4, 2]  # 6 inputs per scale, in forwards of at most 4
    calls.clear()
    out = multiscale_cams(net, imgs, [[1]] * 3, scales=(1.0,), flip=False)
    assert calls == [3]
    for img, got in zip(imgs, out):
        torch.testing.assert_close(got.cams, multiscale_cam(net, img, [1], scales=(1.0,), flip=False).cams)


def test_batched_images_must_share_a_size_and_match_their_labels():
    net = tiny_net()
    with pytest.raises(ValueError, match="share their size"):
        multiscale_cams(net, [random_image(8, 8), random_image(8, 9)], [[0], [0]])
    with pytest.raises(ValueError, match="2 images but 1 label sets"):
        multiscale_cams(net, [random_image(8, 8)] * 2, [[0]])
    with pytest.raises(ValueError, match="max_batch"):
        multiscale_cams(net, [random_image(8, 8)], [[0]], max_batch=0)
    assert multiscale_cams(net, [], []) == []
