"""Tests of model/losses/baseline.py: golden values (docs/golden.md 4.1-4.3), hand-worked cases,
loop-based references for other class counts and sizes, float64 gradchecks and gradient flow."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hsc.model.losses import (
    adaptive_min_pooling_k,
    adaptive_min_pooling_loss,
    ecr_topk_k,
    eps_saliency_loss,
    eps_saliency_terms,
    er_ecr_terms,
    max_norm,
    max_onehot,
    multilabel_soft_margin_loss,
)

from goldenlib import assert_rel, assert_summary, build_inputs, case, parse_number


def _value(c: dict, prefix: str):
    """The one entry of case ``c`` whose key starts with ``prefix`` (keys carry descriptions)."""
    keys = [k for k in c if k.startswith(prefix)]
    assert len(keys) == 1, f"expected one key starting with {prefix!r}, found {keys}"
    return c[keys[0]]


# --------------------------------------------------------------------------------------------------
# golden cases


def test_golden_cls_and_amp():
    c = case("cls_and_amp")
    ns = build_inputs(c)
    pred, x, label = ns["pred"], ns["x"], ns["label"]
    assert_rel(multilabel_soft_margin_loss(pred, label), _value(c, "multilabel_soft_margin"), what="mlsm")
    assert_rel(adaptive_min_pooling_loss(x), _value(c, "adaptive_min_pooling_loss"), what="amp")
    assert adaptive_min_pooling_k(x.shape[-2], x.shape[-1]) == _value(c, "amp_k")


def test_golden_eps_saliency():
    c = case("eps_saliency")
    ns = build_inputs(c)
    alpha = parse_number(r"alpha\s*=\s*([0-9.]+)", c["tests"])
    tau_keys = [k for k in c if k.startswith("tau=")]
    assert tau_keys, "eps_saliency case without tau=<value> entries"
    for key in tau_keys:
        tau = float(key.split("=", 1)[1])
        exp = c[key]
        r = eps_saliency_terms(ns["cam"], ns["sal"], ns["label"], tau=tau, alpha=alpha)
        assert r.loss.dim() == 0
        assert_rel(r.loss, exp["loss"], what=f"{key} loss")
        assert_summary(r.fg_map, _value(exp, "fg_map"), "scale", what=f"{key} fg_map")
        assert_summary(r.bg_map, _value(exp, "bg_map"), "scale", what=f"{key} bg_map")
        assert_summary(r.sal_pred, _value(exp, "sal_pred"), "scale", what=f"{key} sal_pred")
        loss = eps_saliency_loss(ns["cam"], ns["sal"], ns["label"], tau=tau, alpha=alpha)
        assert torch.equal(loss, r.loss)


def test_golden_er_ecr():
    c = case("er_ecr")
    ns = build_inputs(c)
    r = er_ecr_terms(ns["cam1"], ns["cam2"], ns["cam_rv1"], ns["cam_rv2"], ns["label21"])
    assert_rel(r.loss_er, _value(c, "loss_er"), what="loss_er")
    assert_rel(r.loss_ecr, _value(c, "loss_ecr"), what="loss_ecr")
    assert_rel(r.ecr_term_1, _value(c, "ecr_term_1"), what="ecr_term_1")
    assert_rel(r.ecr_term_2, _value(c, "ecr_term_2"), what="ecr_term_2")
    assert r.ecr_topk_k == _value(c, "ecr_topk_k")
    for t in (r.loss_er, r.loss_ecr, r.ecr_term_1, r.ecr_term_2):
        assert t.dim() == 0


# --------------------------------------------------------------------------------------------------
# classification and AMP by hand


def test_mlsm_by_hand_excludes_background():
    pred = torch.tensor([[2.0, -1.0, 50.0]])  # K = 2, background logit 50 must not count
    labels = torch.tensor([[1.0, 0.0]])

    def softplus(v: float) -> float:
        return math.log1p(math.exp(v))

    # -log sigmoid(2) = softplus(-2); -log sigmoid(1) = softplus(-1) for the absent class with logit -1
    expected = (softplus(-2.0) + softplus(-1.0)) / 2
    assert_rel(multilabel_soft_margin_loss(pred, labels), expected, what="mlsm")


def test_mlsm_rejects_missing_background_logit():
    with pytest.raises(ValueError):
        multilabel_soft_margin_loss(torch.zeros(2, 3), torch.zeros(2, 3))


def test_amp_by_hand():
    # N = 2, K = 2, 2x4 maps -> k = floor(8 / 4) = 2 smallest per-pixel maxima per image
    x = torch.tensor(
        [
            [[[0.5, -2.0, 3.0, 0.1], [4.0, 0.2, 1.0, 2.0]], [[0.7, -1.0, 0.0, 0.3], [0.0, 0.4, 0.0, 0.0]]],
            [[[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]],
        ]
    )
    # image 0 maxima: [0.7, -1.0, 3.0, 0.3, 4.0, 0.4, 1.0, 2.0] -> smallest two: -1.0, 0.3 -> relu sum 0.3
    # image 1 maxima: [1..8] -> smallest two: 1, 2 -> 3
    assert adaptive_min_pooling_k(2, 4) == 2
    assert_rel(adaptive_min_pooling_loss(x), (0.3 + 3.0) / (2 * 2), what="amp")


def test_amp_odd_size_uses_floor():
    # 3x3 -> k = 2; all maxima equal 1 -> loss = 2 * 1 / (2 * 1) = 1
    assert adaptive_min_pooling_k(3, 3) == 2
    assert_rel(adaptive_min_pooling_loss(torch.ones(1, 4, 3, 3)), 1.0)
    x = torch.arange(9.0).reshape(1, 1, 3, 3)  # smallest two: 0, 1
    assert_rel(adaptive_min_pooling_loss(x), 1.0 / 2)


# --------------------------------------------------------------------------------------------------
# EPS saliency loss


def _eps_reference(cam, saliency, labels, tau, alpha):
    """Loop-over-classes reference of algorithm.md 3.3, written independently of the module."""
    n, c, h, w = cam.shape
    k = labels.shape[1]
    src_y = [math.floor(i * saliency.shape[2] / h) for i in range(h)]
    src_x = [math.floor(j * saliency.shape[3] / w) for j in range(w)]
    sal = saliency[:, :, src_y][:, :, :, src_x]
    p = torch.softmax(cam, dim=1)
    fg = torch.zeros(n, 1, h, w, dtype=cam.dtype)
    bg_sum = p[:, k : k + 1].clone()
    for b in range(n):
        for cls in range(k):
            if labels[b, cls] == 0:
                continue
            rp = torch.round(p[b, cls].detach())
            iou = (rp * torch.round(sal[b, 0])).sum() / (rp + 1e-4).sum()
            if iou > tau:
                fg[b, 0] += p[b, cls]
            else:
                bg_sum[b, 0] += p[b, cls]
    pred = alpha * fg + (1 - alpha) * (1 - bg_sum)
    return ((pred - sal) ** 2).mean(), fg, 1 - bg_sum


@pytest.mark.parametrize("tau", [0.3, 0.5, 0.8])
def test_eps_matches_loop_reference_other_shapes(tau):
    g = torch.Generator().manual_seed(11)
    n, k, h, w = 3, 4, 5, 7
    cam = 3 * torch.randn(n, k + 1, h, w, generator=g, dtype=torch.float64)
    cam[0, 1, :3] += 6
    cam[1, 0, 1:4, 2:6] += 6
    cam[2, 3, :, :4] += 6
    saliency = torch.rand(n, 1, 13, 16, generator=g, dtype=torch.float64)
    saliency[0, :, :7] = (saliency[0, :, :7] > 0.2).double()
    labels = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.float64)
    loss_ref, fg_ref, bg_ref = _eps_reference(cam, saliency, labels, tau, 0.3)
    r = eps_saliency_terms(cam, saliency, labels, tau=tau, alpha=0.3)
    torch.testing.assert_close(r.loss, loss_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r.fg_map, fg_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r.bg_map, bg_ref, rtol=1e-12, atol=1e-14)
    assert r.iou.shape == (n, k)


def _perfect_case():
    """A 4x4 map, K = 2: class 0 covers exactly the salient 2x2 block, background elsewhere."""
    sal = torch.zeros(1, 1, 4, 4)
    sal[0, 0, 1:3, 1:3] = 1.0
    cam = torch.full((1, 3, 4, 4), -30.0)
    cam[0, 0] = torch.where(sal[0, 0] > 0, 30.0, -30.0)
    cam[0, 2] = torch.where(sal[0, 0] > 0, -30.0, 30.0)
    labels = torch.tensor([[1.0, 0.0]])
    return cam, sal, labels


def test_eps_perfect_prediction_gives_zero_loss():
    cam, sal, labels = _perfect_case()
    r = eps_saliency_terms(cam, sal, labels)
    # 4 salient pixels: iou = 4 / (4 + 16 * 1e-4)
    assert_rel(r.iou[0, 0], 4 / (4 + 16 * 1e-4), what="iou")
    assert float(r.iou[0, 1]) == 0.0
    assert float(r.loss) < 1e-12
    torch.testing.assert_close(r.sal_pred, sal, atol=1e-12, rtol=0)


def test_eps_denominator_adds_1e4_per_pixel():
    # per pixel: iou = 4 / 4.0016 = 0.9996; added once it would be 4 / 4.0001 = 0.999975.
    # With tau = 0.9998 the class must be rejected -> it joins the background set: fg = 0,
    # bg = 1 - (p_0 + p_bg) = 0, sal_pred = 0, loss = mean(S^2) = 4 / 16.
    cam, sal, labels = _perfect_case()
    r = eps_saliency_terms(cam, sal, labels, tau=0.9998)
    assert float(r.fg_map.abs().max()) == 0.0
    assert float(r.sal_pred.abs().max()) < 1e-6
    assert_rel(r.loss, 4 / 16, what="loss")


def test_eps_absent_class_is_in_neither_set():
    cam, sal, labels = _perfect_case()
    cam[0, 1, 0, 0] = 60.0  # absent class 1 dominates pixel (0, 0)
    r = eps_saliency_terms(cam, sal, labels)
    p = torch.softmax(cam, dim=1)
    torch.testing.assert_close(r.fg_map, p[:, :1])
    torch.testing.assert_close(r.bg_map, 1 - p[:, 2:3])
    assert float(r.bg_map[0, 0, 0, 0]) > 0.99  # the absent class's mass is not counted as background


def test_eps_rounds_half_to_even():
    # p_0 = exactly 0.5 on the salient pixels (tie with background): round(0.5) = 0 -> iou 0 -> rejected.
    # Round-half-up would give iou = 4 / 4.0016 > 0.5 and accept the class.
    sal = torch.zeros(1, 1, 4, 4)
    sal[0, 0, 1:3, 1:3] = 1.0
    cam = torch.full((1, 3, 4, 4), -1e4)
    cam[0, 0] = torch.where(sal[0, 0] > 0, 0.0, -1e4)
    cam[0, 2] = torch.where(sal[0, 0] > 0, 0.0, 1e4)
    r = eps_saliency_terms(cam, sal, torch.tensor([[1.0, 0.0]]))
    assert float(torch.softmax(cam, 1)[0, 0, 1, 1]) == 0.5
    assert float(r.iou[0, 0]) == 0.0
    assert float(r.fg_map.abs().max()) == 0.0


def test_eps_saliency_is_nearest_resized():
    # saliency 8x8 -> 4x4 keeps source rows/cols 0, 2, 4, 6; put values only at odd positions
    sal = torch.zeros(1, 1, 8, 8)
    sal[0, 0, 1::2, 1::2] = 1.0
    cam = torch.zeros(1, 3, 4, 4)  # uniform probabilities 1/3
    r = eps_saliency_terms(cam, sal, torch.tensor([[0.0, 0.0]]), alpha=0.5)
    # no present class: fg = 0, bg = 1 - 1/3; sal_pred = 1/3; target S' = 0 everywhere
    assert_rel(r.loss, (1 / 3) ** 2, what="loss")


# --------------------------------------------------------------------------------------------------
# max_norm, max_onehot and ER / ECR


def test_max_norm_by_hand():
    p = torch.tensor([[[[-1.0, 0.0], [1.0, 3.0]]]])
    e = 1e-5
    expected = torch.tensor([[[[0.0, 0.0], [(1 - e) / (3 + e), (3 - e) / (3 + e)]]]])
    torch.testing.assert_close(max_norm(p), expected)
    # per (n, c): the minimum is subtracted
    q = torch.tensor([[[[2.0, 4.0], [6.0, 10.0]]]])
    torch.testing.assert_close(max_norm(q), F.relu(q - 2 - e) / (8 + e))


def test_max_onehot_quirk_versus_fixed():
    x = torch.tensor([[[[0.9, 0.1]], [[0.5, 0.6]], [[0.2, 0.6]]]])  # (1, 3, 1, 2)
    quirk = max_onehot(x)
    fixed = max_onehot(x, fixed=True)
    # quirk: channel 0 untouched, channels 1..2 compete (ties keep both)
    torch.testing.assert_close(quirk, torch.tensor([[[[0.9, 0.1]], [[0.5, 0.6]], [[0.0, 0.6]]]]))
    # fixed: all channels compete
    torch.testing.assert_close(fixed, torch.tensor([[[[0.9, 0.0]], [[0.0, 0.6]], [[0.0, 0.6]]]]))
    assert torch.equal(x, torch.tensor([[[[0.9, 0.1]], [[0.5, 0.6]], [[0.2, 0.6]]]]))  # not modified


def _er_ecr_reference(cam1, cam2, cam_rv1, cam_rv2, label21, frac, fixed):
    """Independent loop-based reference of algorithm.md 3.4."""
    n, c, hs, ws = cam2.shape

    def mnorm(p):
        out = torch.empty_like(p)
        for b in range(p.shape[0]):
            for ch in range(p.shape[1]):
                v = torch.relu(p[b, ch])
                out[b, ch] = torch.relu(v - v.min() - 1e-5) / (v.max() - v.min() + 1e-5)
        return out

    def rs(p):
        return F.interpolate(p, size=(hs, ws), mode="bilinear", align_corners=True)

    a1 = rs(mnorm(cam1)) * label21
    a2 = mnorm(cam2) * label21
    er = (a1[:, : c - 1] - a2[:, : c - 1]).abs().mean()

    def target(a):
        t = a.detach().clone()
        t[:, c - 1] = 1 - t[:, : c - 1].max(dim=1).values
        first = 0 if fixed else 1
        for b in range(n):
            for i in range(hs):
                for j in range(ws):
                    m = max(float(t[b, ch, i, j]) for ch in range(first, c))
                    for ch in range(first, c):
                        if float(t[b, ch, i, j]) != m:
                            t[b, ch, i, j] = 0.0
        return t

    r1 = rs(mnorm(cam_rv1)) * label21
    r2 = mnorm(cam_rv2) * label21
    k = int(c * hs * ws * frac)
    e1 = (target(a2) - r1).abs().reshape(n, -1)
    e2 = (target(a1) - r2).abs().reshape(n, -1)
    t1 = torch.stack([e1[b].sort(descending=True).values[:k] for b in range(n)]).mean()
    t2 = torch.stack([e2[b].sort(descending=True).values[:k] for b in range(n)]).mean()
    return er, t1, t2, k


def _er_inputs(dtype=torch.float64, n=3, k=4, size1=(7, 9), size2=(4, 5), seed=5):
    g = torch.Generator().manual_seed(seed)
    c = k + 1
    cam1 = torch.randn(n, c, *size1, generator=g, dtype=dtype)
    cam2 = torch.randn(n, c, *size2, generator=g, dtype=dtype)
    cam_rv1 = torch.rand(n, c, *size1, generator=g, dtype=dtype)
    cam_rv2 = torch.rand(n, c, *size2, generator=g, dtype=dtype)
    labels = (torch.rand(n, k, generator=g) > 0.5).to(dtype)
    labels[:, 0] = 1.0  # class 0 present so the quirk matters
    label21 = torch.cat([labels, torch.ones(n, 1, dtype=dtype)], dim=1)[:, :, None, None]
    return cam1, cam2, cam_rv1, cam_rv2, label21


@pytest.mark.parametrize("fixed", [False, True])
def test_er_ecr_matches_loop_reference_other_shapes(fixed):
    inputs = _er_inputs()
    er, t1, t2, k = _er_ecr_reference(*inputs, 0.2, fixed)
    r = er_ecr_terms(*inputs, fixed_max_onehot=fixed)
    assert r.ecr_topk_k == k == ecr_topk_k(5, 4, 5) == int(5 * 4 * 5 * 0.2)
    torch.testing.assert_close(r.loss_er, er, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r.ecr_term_1, t1, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r.ecr_term_2, t2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r.loss_ecr, t1 + t2, rtol=1e-12, atol=1e-14)


def test_er_ecr_quirk_and_fixed_differ():
    inputs = _er_inputs()
    quirk = er_ecr_terms(*inputs)
    fixed = er_ecr_terms(*inputs, fixed_max_onehot=True)
    assert torch.equal(quirk.loss_er, fixed.loss_er)
    assert abs(float(quirk.loss_ecr) - float(fixed.loss_ecr)) > 1e-6


def test_er_is_zero_for_identical_views_and_topk_fraction_is_a_keyword():
    cam1, _, cam_rv1, _, label21 = _er_inputs(size2=(7, 9))
    r = er_ecr_terms(cam1, cam1, cam_rv1, cam_rv1, label21, topk_fraction=0.5)
    assert float(r.loss_er) == 0.0
    assert r.ecr_topk_k == int(5 * 7 * 9 * 0.5)
    assert torch.equal(r.ecr_term_1, r.ecr_term_2)


def test_ecr_gradient_does_not_reach_targets():
    cam1, cam2, cam_rv1, cam_rv2, label21 = (t.requires_grad_() for t in _er_inputs(torch.float32))
    r = er_ecr_terms(cam1, cam2, cam_rv1, cam_rv2, label21.detach())
    g1, g2, grv1, grv2 = torch.autograd.grad(r.loss_ecr, [cam1, cam2, cam_rv1, cam_rv2], allow_unused=True)
    assert g1 is None or float(g1.abs().max()) == 0.0
    assert g2 is None or float(g2.abs().max()) == 0.0
    assert grv1 is not None and float(grv1.abs().max()) > 0
    assert grv2 is not None and float(grv2.abs().max()) > 0
    # ER trains both CAM views and not the PCM maps
    e1, e2, erv1, erv2 = torch.autograd.grad(r.loss_er, [cam1, cam2, cam_rv1, cam_rv2], allow_unused=True)
    assert e1 is not None and float(e1.abs().max()) > 0
    assert e2 is not None and float(e2.abs().max()) > 0
    assert erv1 is None and erv2 is None


# --------------------------------------------------------------------------------------------------
# float64 gradchecks


def test_gradcheck_mlsm():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: multilabel_soft_margin_loss(p, labels), (pred,))


def test_gradcheck_amp_distinct_values():
    g = torch.Generator().manual_seed(2)
    # distinct values spaced 0.01 apart, centred on 0: no ties in max/top-k, no value near relu's kink
    vals = (torch.randperm(2 * 3 * 4 * 6, generator=g).to(torch.float64) - 71.5) * 0.01
    x = vals.reshape(2, 3, 4, 6).requires_grad_()
    assert torch.autograd.gradcheck(adaptive_min_pooling_loss, (x,))


def test_gradcheck_max_norm():
    g = torch.Generator().manual_seed(3)
    p = (0.1 + torch.rand(2, 3, 3, 4, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(max_norm, (p,))


def test_gradcheck_eps_saliency():
    g = torch.Generator().manual_seed(4)
    cam = (2 * torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64)).requires_grad_()
    sal = torch.rand(2, 1, 10, 12, generator=g, dtype=torch.float64)
    labels = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda c: eps_saliency_loss(c, sal, labels, tau=0.2), (cam,))


def test_gradcheck_er_and_ecr():
    # ER is checked w.r.t. both CAM views; ECR only w.r.t. the PCM maps, because its targets are
    # detached on purpose (a numerical derivative w.r.t. cam1/cam2 would see the targets move).
    cam1, cam2, cam_rv1, cam_rv2, label21 = _er_inputs(n=2, k=2, size1=(5, 4), size2=(3, 3), seed=9)

    def er(a, b):
        return er_ecr_terms(a, b, cam_rv1, cam_rv2, label21).loss_er

    def ecr(c, d):
        return er_ecr_terms(cam1, cam2, c, d, label21).loss_ecr

    assert torch.autograd.gradcheck(er, (cam1.requires_grad_(), cam2.requires_grad_()))
    assert torch.autograd.gradcheck(ecr, (cam_rv1.requires_grad_(), cam_rv2.requires_grad_()))
