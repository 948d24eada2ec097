"""Dense CRF: the golden case (training and inference settings), a synthetic image, input checks."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from hsc.model.crf import (
    DEEPLAB_TEST_CRF,
    INFERENCE_CRF,
    TRAINING_CRF,
    CRFParams,
    crf_inference,
    crf_refine_labels,
)

from goldenlib import assert_label_map, assert_summary, build_inputs, case


def _call(c: dict, name: str) -> tuple[str, dict[str, float]]:
    """The key ``name(...)`` of the case and its ``key=value`` parameters."""
    keys = [k for k in c if k.startswith(name + "(")]
    assert len(keys) == 1, f"expected one {name}(...) entry, got {keys}"
    params = {m.group(1): float(m.group(2)) for m in re.finditer(r"(\w+)=([0-9.eE+-]+)", keys[0])}
    return keys[0], params


def test_golden_training_crf():
    c = case("crf")
    ns = build_inputs(c)
    key, p = _call(c, "crf_inference_label")
    img, labels = ns["img"].numpy(), ns["labels"].numpy()
    out = crf_refine_labels(img, labels, int(p["n_labels"]), gt_prob=p["gt_prob"], iters=int(p["t"]))
    exp = c[key]
    assert out.dtype == np.int64 and out.shape == labels.shape
    assert_label_map(out, exp["result"], what="training CRF")
    assert int((out != labels).sum()) == exp["changed_pixels"]


def test_golden_inference_crf():
    c = case("crf")
    ns = build_inputs(c)
    key, p = _call(c, "crf_inference")
    img, probs = ns["img2"].numpy(), ns["probs"].numpy()
    assert probs.shape[0] == int(p["labels"])
    q = crf_inference(img, probs, int(p["t"]))
    exp = c[key]
    assert q.dtype == np.float32 and q.shape == probs.shape
    qt = torch.from_numpy(q)
    assert_summary(qt, exp["Q"], "abs", "Q")
    sums = qt.double().sum(dim=(1, 2)).tolist()
    for got, want in zip(sums, exp["Q_per_label_sum"], strict=True):
        assert abs(got - want) <= 1e-5 * abs(want) + 1e-4
    torch.testing.assert_close(
        qt[:, 0, 0].double(), torch.tensor(exp["Q[:,0,0]"], dtype=torch.float64), atol=1e-4, rtol=0
    )
    assert_label_map(q.argmax(axis=0), exp["argmax"], what="argmax of Q")


def test_presets_follow_the_documented_settings():
    assert TRAINING_CRF == CRFParams(3, 3, 50, 5, 10, 10)
    assert (INFERENCE_CRF.gaussian_sxy, INFERENCE_CRF.gaussian_compat) == (3, 3)
    assert (INFERENCE_CRF.bilateral_sxy, INFERENCE_CRF.bilateral_srgb, INFERENCE_CRF.bilateral_compat) == (
        80,
        13,
        10,
    )
    assert DEEPLAB_TEST_CRF == CRFParams(1, 3, 67, 3, 4, 10)
    with pytest.raises(ValueError):
        CRFParams(3, 3, 50, 5, 10, -1)


def _two_colour(h=20, w=24, edge=11, seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.int64)
    img[:, :edge] = (30, 160, 40)
    img[:, edge:] = (200, 40, 180)
    img = (img + rng.integers(0, 12, img.shape)).astype(np.uint8)
    clean = np.zeros((h, w), np.int64)
    clean[:, edge:] = 2
    return img, clean, rng


def test_training_crf_moves_noisy_labels_to_the_colour_edge():
    img, clean, rng = _two_colour()
    noisy = clean.copy()
    noisy[:, 9:14] = 2  # edge drawn 2 pixels too far left ...
    flip = rng.random(clean.shape) < 0.15  # ... plus 15 % salt noise over 3 labels
    noisy[flip] = rng.integers(0, 3, int(flip.sum()))
    out = crf_refine_labels(img, noisy, 3)
    assert (out != clean).sum() < (noisy != clean).sum() // 4
    np.testing.assert_array_equal(out, clean)


def test_inference_crf_q_is_a_distribution_and_sharpens_to_the_edge():
    img, clean, _ = _two_colour()
    probs = np.full((2, *clean.shape), 0.5, np.float32)
    probs[0, :, :4] = 0.9
    probs[1, :, :4] = 0.1
    probs[0, :, -4:] = 0.1
    probs[1, :, -4:] = 0.9
    for params in (INFERENCE_CRF, DEEPLAB_TEST_CRF):
        q = crf_inference(img, probs, params=params)
        np.testing.assert_allclose(q.sum(axis=0), 1.0, atol=1e-5)
        np.testing.assert_array_equal(q.argmax(axis=0), (clean > 0).astype(np.int64))
    # 0 iterations: the normalised unary, exp(-U) / sum
    q0 = crf_inference(img, probs, 0)
    np.testing.assert_allclose(q0, probs / probs.sum(axis=0, keepdims=True), atol=1e-5)


def test_input_validation():
    img, clean, _ = _two_colour()
    with pytest.raises(ValueError, match="uint8"):
        crf_refine_labels(img.astype(np.float32), clean, 3)
    with pytest.raises(TypeError, match="numpy"):
        crf_refine_labels(torch.from_numpy(img), clean, 3)  # type: ignore[arg-type]
    frozen = img.copy()
    frozen.flags.writeable = False  # as np.asarray(PIL image) gives
    assert np.array_equal(crf_refine_labels(frozen, clean, 3), crf_refine_labels(img, clean, 3))
    flipped = crf_refine_labels(img[:, ::-1], clean[:, ::-1], 3)  # a non-contiguous view is fine
    assert np.array_equal(flipped, crf_refine_labels(np.ascontiguousarray(img[:, ::-1]), clean[:, ::-1], 3))
    with pytest.raises(ValueError, match="HWC"):
        crf_refine_labels(np.ascontiguousarray(img.transpose(2, 0, 1)), clean, 3)
    with pytest.raises(ValueError, match="labels shape"):
        crf_refine_labels(img, clean[:-1], 3)
    with pytest.raises(ValueError, match="lie in"):
        crf_refine_labels(img, clean, 2)
    with pytest.raises(TypeError, match="integers"):
        crf_refine_labels(img, clean.astype(np.float32), 3)
    with pytest.raises(ValueError, match="gt_prob"):
        crf_refine_labels(img, clean, 3, gt_prob=1.0)
    with pytest.raises(ValueError, match=r"\(L, H, W\)"):
        crf_inference(img, np.ones((2, 5, 5), np.float32), 1)
    with pytest.raises(TypeError, match="floating"):
        crf_inference(img, np.ones((2, *clean.shape), np.int64), 1)
