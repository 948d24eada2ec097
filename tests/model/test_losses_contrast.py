"""RSC / CSC / PSC and the HSC loss block: golden cases, hand-worked references, switches, gradients."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from hsc.model.losses import (
    HSCLoss,
    HSCLossConfig,
    csc_loss,
    hsc_loss,
    normalize_cam,
    psc_loss,
    psc_prototypes,
    rsc_loss,
    rsc_representations,
    sim_min,
)
from hsc.model.prototypes import OFFICIAL_BANK_NAMES, MomentumBanks

from goldenlib import assert_label_map, assert_rel, assert_summary, build_inputs, case, parse_number


def _key(c: dict, prefix: str) -> str:
    keys = [k for k in c if k.startswith(prefix)]
    assert len(keys) == 1, f"expected one key starting with {prefix!r}, got {keys}"
    return keys[0]


def _name(key: str) -> str:
    """'view1_vs_bank1 (own)' -> 'view1_vs_bank1'."""
    return key.split(" (")[0]


# ============================================================================= golden cases

RSC_TERMS = {
    "simmin(bg_v1, fg_v1)": "intra_v1",
    "simmin(bg_v2, fg_v2)": "intra_v2",
    "simmin(bg_v1, fg_v2)": "cross_v1",
    "simmin(bg_v2, fg_v1)": "cross_v2",
    "L1(bank_v1[1], fg_v1)": "pull_fg_v1",
    "L1(bank_v2[1], fg_v2)": "pull_fg_v2",
    "L1(bank_v1[0], bg_v1)": "pull_bg_v1",
    "L1(bank_v2[0], bg_v2)": "pull_bg_v2",
}


def test_golden_rsc():
    c = case("rsc")
    ns = build_inputs(c)
    bg = int(parse_number(r"bg \(label (\d+)\)", c["tests"]))
    b1, b2 = ns["bank_fb_view1"].clone(), ns["bank_fb_view2"].clone()
    out = rsc_loss(ns["f1"], ns["f2"], ns["pl1"], ns["pl2"], b1, b2, bg_label=bg)
    assert_rel(out.loss, c[_key(c, "loss_rsc")], what="loss_rsc")
    assert set(c["terms"]) <= set(RSC_TERMS), f"unmapped RSC terms {set(c['terms']) - set(RSC_TERMS)}"
    for k, v in c["terms"].items():
        assert_rel(getattr(out, RSC_TERMS[k]), v, what=k)
    assert_summary(out.bank1, c["bank_fb_view1_after"], "scale", "bank view 1")
    assert_summary(out.bank2, c["bank_fb_view2_after"], "scale", "bank view 2")
    # the inputs are not modified
    assert torch.equal(b1, ns["bank_fb_view1"]) and torch.equal(b2, ns["bank_fb_view2"])


def test_golden_csc():
    c = case("csc")
    ns = build_inputs(c)
    labels = ns["label21"].flatten(1)[:, :-1]
    out = csc_loss(ns["f1"], ns["cam1"], ns["f2"], ns["cam2"], labels, ns["bank1"], ns["bank2"])
    assert_rel(out.loss, c[_key(c, "loss_csc")], what="loss_csc")
    assert out.classes.tolist() == c["classes_processed_in_order"]
    got = out.per_class()
    assert sorted(got) == sorted(int(k) for k in c["per_class_infonce"])
    for cls, terms in c["per_class_infonce"].items():
        for k, v in terms.items():
            assert_rel(got[int(cls)][_name(k)], v, what=f"class {cls} {k}")
    assert_summary(out.bank1, c["bank1_after"], "scale", "bank1")
    assert_summary(out.bank2, c["bank2_after"], "scale", "bank2")
    for row, expected in c.get("bank1_after_rows", {}).items():
        assert_summary(out.bank1[int(row)], expected, "scale", f"bank1 row {row}")


def test_golden_psc():
    c = case("psc")
    ns = build_inputs(c)
    out = psc_loss(ns["cam1"], ns["f1"], ns["cam2"], ns["f2"], ns["pl1"], ns["pl2"], ns["bank1"], ns["bank2"])
    assert_rel(out.loss, c[_key(c, "loss_psc")], what="loss_psc")
    assert out.topk == c["topk_k"]
    for k, v in c[_key(c, "terms")].items():
        assert_rel(getattr(out, _name(k)), v, what=k)
    assert_summary(out.bank1, c["bank1_p_after"], "scale", "bank1_p")
    assert_summary(out.bank2, c["bank2_p_after"], "scale", "bank2_p")


def test_golden_hsc_end_to_end():
    c = case("hsc_end_to_end")
    ns = build_inputs(c)
    labels = ns["label"]
    banks = MomentumBanks(labels.shape[1], roi_dim=ns["fp1_2"].shape[1], pixel_dim=ns["fp1_1"].shape[1])
    banks.load_official({name: ns[name] for name in OFFICIAL_BANK_NAMES})
    out = hsc_loss(
        ns["cam_rv1"],
        ns["cam_rv2"],
        ns["fp1_1"],
        ns["fp1_2"],
        ns["fp2_1"],
        ns["fp2_2"],
        ns["img2"],
        labels,
        banks,
    )
    assert_rel(out.loss_rsc, c["loss_rsc"], what="loss_rsc")
    assert_rel(out.loss_csc, c["loss_csc"], what="loss_csc")
    assert_rel(out.loss_psc, c["loss_psc"], what="loss_psc")
    assert_rel(out.total, c[_key(c, "loss_hsc_total")], what="total")

    maps = c[_key(c, "pseudo_labels_and_crf")]
    assert out.crf_image is not None and out.crf_labels1 is not None and out.crf_labels2 is not None
    assert out.crf_image.dtype.name == "uint8" and out.crf_image.flags["C_CONTIGUOUS"]
    for key, exp in maps.items():
        m = re.fullmatch(r"view(\d+)_img(\d+)", key)
        assert m, key
        view, i = int(m.group(1)), int(m.group(2))
        img = out.crf_image[i]
        ei = exp["crf_image_uint8"]
        assert int(img.astype("int64").sum()) == ei["sum"], key
        assert hashlib.sha256(img.tobytes()).hexdigest() == ei["sha256"], key
        for pk, pv in ei.items():
            pm = re.fullmatch(r"pixel\[(\d+),(\d+)\]", pk)
            if pm:
                assert img[int(pm.group(1)), int(pm.group(2))].tolist() == pv, f"{key} {pk}"
        before = out.pseudo_labels1 if view == 1 else out.pseudo_labels2
        after = out.crf_labels1 if view == 1 else out.crf_labels2
        assert_label_map(before[i], exp["pseudo_label_before_crf"], what=f"{key} before CRF")
        assert_label_map(after[i], exp["pseudo_label_after_crf"], what=f"{key} after CRF")

    state = banks.official_state()
    assert set(c["banks_after"]) == set(state)
    for name, exp in c["banks_after"].items():
        assert_summary(state[name], exp, "scale", name)


# ============================================================================= RSC by hand


def _rsc_inputs(n=2, d=8, h=5, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    e1, e2 = torch.randn(n, d, h, w, generator=g), torch.randn(n, d, h, w, generator=g)
    l1 = torch.randint(0, 4, (n, h, w), generator=g)
    l2 = torch.randint(0, 4, (n, h, w), generator=g)
    b1, b2 = torch.randn(2, d, generator=g), torch.randn(2, d, generator=g)
    return e1, e2, l1, l2, b1, b2


def test_sim_min_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    cos = [[1 / math.sqrt(2), -1.0], [1 / math.sqrt(2), 0.0]]
    want = sum(-math.log(1 - min(max(x, 5e-4), 0.9995)) for row in cos for x in row) / 4
    assert sim_min(a, b).item() == pytest.approx(want, rel=1e-6)


def test_rsc_representations_by_hand_both_axes():
    e1, _, l1, _, _, _ = _rsc_inputs(n=1, d=3, h=2, w=3)
    l1 = torch.tensor([[[3, 0, 3], [1, 3, 3]]])
    for axis, dim in (("width", -1), ("channel", 1)):
        e = e1 / e1.norm(dim=dim, keepdim=True)
        bgm = l1 == 3
        rb = e[0][:, bgm[0]].sum(1) / (bgm.sum() + 1e-5)
        rf = e[0][:, ~bgm[0]].sum(1) / ((~bgm).sum() + 1e-5)
        got_b, got_f = rsc_representations(e1, l1, 3, norm_axis=axis)
        torch.testing.assert_close(got_b[0], rb / rb.norm())
        torch.testing.assert_close(got_f[0], rf / rf.norm())
    with pytest.raises(ValueError):
        rsc_representations(e1, l1, 3, norm_axis="height")  # type: ignore[arg-type]


def test_rsc_total_and_update_by_hand():
    e1, e2, l1, l2, b1, b2 = _rsc_inputs(n=3)
    out = rsc_loss(e1, e2, l1, l2, b1, b2, bg_label=3)
    rb1, ro1 = rsc_representations(e1, l1, 3)
    rb2, ro2 = rsc_representations(e2, l2, 3)
    want = 0.1 * (
        0.5 * (sim_min(rb1, ro1) + sim_min(rb2, ro2))
        + 0.5 * (sim_min(rb1, ro2) + sim_min(rb2, ro1))
        + 0.5 * ((b1[1] - ro1).abs().mean() + (b2[1] - ro2).abs().mean())
        + 0.5 * ((b1[0] - rb1).abs().mean() + (b2[0] - rb2).abs().mean())
    )
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(out.bank1, 0.5 * torch.stack([rb1.mean(0), ro1.mean(0)]) + 0.5 * b1)
    torch.testing.assert_close(out.bank2, 0.5 * torch.stack([rb2.mean(0), ro2.mean(0)]) + 0.5 * b2)
    out9 = rsc_loss(e1, e2, l1, l2, b1, b2, bg_label=3, momentum=0.9)
    torch.testing.assert_close(out9.bank1[1], 0.9 * ro1.mean(0) + 0.1 * b1[1])


def test_rsc_switches():
    e1, e2, l1, l2, b1, b2 = _rsc_inputs()
    full = rsc_loss(e1, e2, l1, l2, b1, b2, bg_label=3)
    no_cs = rsc_loss(e1, e2, l1, l2, b1, b2, bg_label=3, cross_supervision=False)
    pulls = 0.5 * (full.pull_fg_v1 + full.pull_fg_v2) + 0.5 * (full.pull_bg_v1 + full.pull_bg_v2)
    torch.testing.assert_close(no_cs.loss, 0.1 * (0.5 * (full.intra_v1 + full.intra_v2) + pulls))
    paper = rsc_loss(e1, e2, l1, l2, b1, b2, bg_label=3, pull_terms=False)
    want = 0.1 * (0.5 * (full.intra_v1 + full.intra_v2) + 0.5 * (full.cross_v1 + full.cross_v2))
    torch.testing.assert_close(paper.loss, want)
    assert torch.equal(paper.bank1, b1) and torch.equal(paper.bank2, b2)  # unused banks are not updated
    chan = rsc_loss(e1, e2, l1, l2, b1, b2, bg_label=3, norm_axis="channel")
    assert not torch.allclose(chan.loss, full.loss)
    torch.testing.assert_close(rsc_loss(e1, e2, l1, l2, b1, b2, bg_label=3, gamma=1.0).loss, full.loss * 10)


def test_rsc_batch_of_one():
    e1, e2, l1, l2, b1, b2 = _rsc_inputs(n=1)
    out = rsc_loss(e1, e2, l1, l2, b1, b2, bg_label=3)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert out.bank1.shape == (2, e1.shape[1])
    # N = 1: one pair per Sim
    rb1, ro1 = rsc_representations(e1, l1, 3)
    torch.testing.assert_close(
        out.intra_v1, -torch.log(1 - F.cosine_similarity(rb1, ro1).clamp(5e-4, 0.9995))[0]
    )


@pytest.mark.parametrize("fill", [3, 0], ids=["all_background", "all_foreground"])
def test_rsc_empty_mask_is_finite(fill):
    e1, e2, l1, l2, b1, b2 = _rsc_inputs()
    l1 = torch.full_like(l1, fill)
    e1 = e1.clone().requires_grad_(True)
    out = rsc_loss(e1, e2, l1, l2, b1, b2, bg_label=3)
    rb1, ro1 = rsc_representations(e1, l1, 3)
    empty = ro1 if fill == 3 else rb1
    assert torch.equal(empty, torch.zeros_like(empty))
    # cosine 0 -> clamped to 5e-4, a constant
    clamped = -torch.log(1 - torch.tensor(5e-4))  # float32, as the loss computes it
    assert out.intra_v1.item() == pytest.approx(clamped.item(), rel=1e-6)
    out.loss.backward()
    assert torch.isfinite(e1.grad).all()


# ============================================================================= CSC by hand


def _csc_reference(e1, c1, e2, c2, labels, p1, p2, tau=0.1, m=0.5, k=128, ku=16, gamma=0.1, cross=True):
    """Straight loop over the classes in ascending order, with exp/sum/log and in-place bank updates."""
    p1, p2 = p1.clone(), p2.clone()
    n, d, h, w = e1.shape
    kf = c1.shape[1] - 1
    l21 = torch.cat([labels, torch.ones(n, 1, dtype=labels.dtype)], 1)[:, :, None, None]
    per_view = []
    for e, cam in ((e1, c1), (e2, c2)):
        s = torch.softmax(cam * l21, 1)[:, :kf].permute(1, 0, 2, 3).reshape(kf, -1)
        val, idx = torch.topk(s, min(k, s.shape[1]), dim=1)
        per_view.append((e.permute(0, 2, 3, 1).reshape(-1, d), val, idx))

    def nce(r, bank, cls):
        sims = torch.stack([F.cosine_similarity(r, bank[j], dim=0) for j in range(bank.shape[0])]) / tau
        return -torch.log(torch.exp(sims[cls]) / torch.exp(sims).sum())

    own, mutual = [], []
    classes = [cls for cls in range(kf) if labels[:, cls].sum() > 0]
    for cls in classes:
        reps, upds = [], []
        for feats, val, idx in per_view:
            v, i = val[cls], idx[cls]
            reps.append(F.normalize((v[:, None] * feats[i]).sum(0) / v.sum(), dim=0))
            upds.append(F.normalize((v[:ku, None] * feats[i[:ku]]).sum(0), dim=0))
        own.append(nce(reps[0], p1, cls) + nce(reps[1], p2, cls))
        mutual.append(nce(reps[0], p2, cls) + nce(reps[1], p1, cls))
        with torch.no_grad():
            p1[cls] = m * upds[0].detach() + (1 - m) * p1[cls]
            p2[cls] = m * upds[1].detach() + (1 - m) * p2[cls]
    own_t, mut_t = torch.stack(own).sum() / len(classes), torch.stack(mutual).sum() / len(classes)
    loss = gamma * (own_t + mut_t) / 4 if cross else gamma * own_t / 2
    return loss, classes, p1, p2


def _csc_inputs(n=3, k=5, d=6, h=5, w=7, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    e1 = torch.randn(n, d, h, w, generator=g, dtype=dtype)
    e2 = torch.randn(n, d, h, w, generator=g, dtype=dtype)
    c1 = torch.rand(n, k + 1, h, w, generator=g, dtype=dtype)
    c2 = torch.rand(n, k + 1, h, w, generator=g, dtype=dtype)
    p1 = torch.randn(k + 1, d, generator=g, dtype=dtype)
    p2 = torch.randn(k + 1, d, generator=g, dtype=dtype)
    labels = torch.zeros(n, k, dtype=dtype)
    labels[0, [1, 3]] = 1
    labels[1, 0] = 1
    labels[2, 3] = 1
    return e1, c1, e2, c2, labels, p1, p2


@pytest.mark.parametrize("cross", [True, False])
def test_csc_matches_sequential_reference(cross):
    e1, c1, e2, c2, labels, p1, p2 = _csc_inputs()
    # 105 positions in the batch: topk 500 exercises the clipping to N*H*W
    for k in (20, 500):
        out = csc_loss(e1, c1, e2, c2, labels, p1, p2, topk=k, update_topk=4, cross_supervision=cross)
        loss, classes, q1, q2 = _csc_reference(e1, c1, e2, c2, labels, p1, p2, k=k, ku=4, cross=cross)
        assert out.classes.tolist() == classes == [0, 1, 3]
        torch.testing.assert_close(out.loss, loss)
        torch.testing.assert_close(out.bank1, q1)
        torch.testing.assert_close(out.bank2, q2)
    # absent classes and the background row are untouched
    for row in (2, 4, 5):
        assert torch.equal(out.bank1[row], p1[row]) and torch.equal(out.bank2[row], p2[row])


def test_csc_order_matters():
    """Later classes see the rows of earlier classes already updated (not the batch-start banks)."""
    e1, c1, e2, c2, labels, p1, p2 = _csc_inputs()
    out = csc_loss(e1, c1, e2, c2, labels, p1, p2, topk=20, update_topk=4)
    # class 0 alone sees the original banks: same terms as in the full call
    only0 = labels.clone()
    only0[:, 1:] = 0
    one = csc_loss(e1, c1, e2, c2, only0, p1, p2, topk=20, update_topk=4)
    torch.testing.assert_close(one.own_v1[0], out.own_v1[0])
    # class 3 alone (original banks) differs from class 3 after 0 and 1 were updated
    only3 = torch.zeros_like(labels)
    only3[:, 3] = labels[:, 3]
    three = csc_loss(e1, c1, e2, c2, only3, p1, p2, topk=20, update_topk=4)
    assert not torch.allclose(three.own_v1[0], out.own_v1[2])


def test_csc_without_foreground_class_is_guarded():
    e1, c1, e2, c2, labels, p1, p2 = _csc_inputs(dtype=torch.float32)
    e1 = e1.clone().requires_grad_(True)
    out = csc_loss(e1, c1, e2, c2, torch.zeros_like(labels), p1, p2)
    assert out.loss.item() == 0.0 and not torch.isnan(out.loss)
    assert out.classes.numel() == 0 and out.own_v1.numel() == 0
    assert torch.equal(out.bank1, p1) and torch.equal(out.bank2, p2)
    (out.loss + e1.sum() * 0).backward()
    assert torch.isfinite(e1.grad).all()


def test_csc_rejects_bad_shapes():
    e1, c1, e2, c2, labels, p1, p2 = _csc_inputs(dtype=torch.float32)
    with pytest.raises(ValueError):
        csc_loss(e1, c1, e2, c2, labels[:, :-1], p1, p2)
    with pytest.raises(ValueError):
        csc_loss(e1, c1, e2, c2, labels, p1[:-1], p2)


# ============================================================================= PSC by hand


def _psc_reference(c1, u1, c2, u2, t1, t2, m1, m2, k, tau=0.1, gamma=0.1):
    def protos(cam, u):
        n, c, h, w = cam.shape
        feats = u.permute(0, 2, 3, 1).reshape(-1, u.shape[1])
        out = []
        for ch in range(c):
            val, idx = torch.topk(cam[:, ch].reshape(-1), k)
            out.append(F.normalize((val[:, None] * feats[idx]).sum(0) / val.sum(), dim=0))
        return torch.stack(out)

    def nce(u, t, q):
        z = F.normalize(u.permute(0, 2, 3, 1).reshape(-1, u.shape[1]), dim=1)
        e = torch.exp(z @ q.t() / tau)
        return (-torch.log(e.gather(1, t.reshape(-1, 1)) / e.sum(1, keepdim=True))).mean()

    q1, q2 = protos(c1, u1), protos(c2, u2)
    terms = {
        "cross_view_v1": nce(u1, t1, q2),
        "cross_view_v2": nce(u2, t2, q1),
        "cross_cam_v1": nce(u1, t2, q1),
        "cross_cam_v2": nce(u2, t1, q2),
        "intra_v1": nce(u1, t1, q1),
        "intra_v2": nce(u2, t2, q2),
        "memory_v1": nce(u1, t1, m1),
        "memory_v2": nce(u2, t2, m2),
    }
    return terms, q1, q2


def _psc_inputs(n=3, c=5, d=6, h=6, w=9, seed=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    c1 = torch.rand(n, c, h, w, generator=g, dtype=dtype)
    c2 = torch.rand(n, c, h, w, generator=g, dtype=dtype)
    u1 = torch.relu(torch.randn(n, d, h, w, generator=g, dtype=dtype))
    u2 = torch.relu(torch.randn(n, d, h, w, generator=g, dtype=dtype))
    t1 = torch.randint(0, c, (n, h, w), generator=g)
    t2 = torch.randint(0, c, (n, h, w), generator=g)
    m1 = torch.randn(c, d, generator=g, dtype=dtype)
    m2 = torch.randn(c, d, generator=g, dtype=dtype)
    return c1, u1, c2, u2, t1, t2, m1, m2


def test_psc_matches_reference_and_switches():
    args = _psc_inputs()
    c1, u1, c2, u2, t1, t2, m1, m2 = args
    k = 6 * 9 // 16
    terms, q1, q2 = _psc_reference(*args, k=k)
    full = psc_loss(*args)
    assert full.topk == k
    for name, v in terms.items():
        torch.testing.assert_close(getattr(full, name), v)
    torch.testing.assert_close(full.proto1, q1)
    torch.testing.assert_close(full.loss, 0.05 * sum(terms.values()))
    torch.testing.assert_close(full.bank1, 0.5 * q1 + 0.5 * m1)
    torch.testing.assert_close(full.bank2, 0.5 * q2 + 0.5 * m2)

    no_cs = psc_loss(*args, cross_supervision=False)
    want = 0.1 * (
        0.5 * (terms["intra_v1"] + terms["intra_v2"]) + 0.5 * (terms["memory_v1"] + terms["memory_v2"])
    )
    torch.testing.assert_close(no_cs.loss, want)

    no_mpl = psc_loss(*args, use_memory=False)
    rest = sum(v for n, v in terms.items() if not n.startswith("memory"))
    torch.testing.assert_close(no_mpl.loss, 0.05 * rest)
    assert torch.equal(no_mpl.bank1, m1) and torch.equal(no_mpl.bank2, m2)

    kp = psc_loss(*args, topk=4)
    assert kp.topk == 4
    terms4, _, _ = _psc_reference(*args, k=4)
    torch.testing.assert_close(kp.intra_v1, terms4["intra_v1"])
    torch.testing.assert_close(psc_loss(*args, momentum=0.9).bank1, 0.9 * q1 + 0.1 * m1)


def test_psc_prototypes_use_batch_wide_topk():
    # one strong position in image 1 decides the prototype of channel 0 for the whole batch
    cam = torch.zeros(2, 2, 2, 2)
    cam[1, 0, 1, 1] = 1.0
    cam[0, 1] = 0.5
    pix = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 2, 2)
    q = psc_prototypes(cam, pix, k=1)
    torch.testing.assert_close(q[0], F.normalize(pix[1, :, 1, 1], dim=0))


def test_gradcheck_float64():
    """Analytic gradients of RSC and (one-class) CSC w.r.t. the embeddings. (PSC is left out: its
    detached prototypes depend on the same embeddings, which a finite difference would see.)"""
    e1, e2, l1, l2, b1, b2 = _rsc_inputs(n=2, d=4, h=3, w=3)
    e1 = e1.double().requires_grad_(True)

    def f_rsc(e):
        return rsc_loss(e, e2.double(), l1, l2, b1.double(), b2.double(), bg_label=3).loss

    assert torch.autograd.gradcheck(f_rsc, (e1,), eps=1e-6, atol=1e-6)

    x1, c1, x2, c2, labels, p1, p2 = _csc_inputs(n=3, k=5, d=4, h=3, w=3)
    labels = torch.zeros_like(labels)
    labels[:, 1] = 1
    x1.requires_grad_(True)

    def f_csc(x):
        return csc_loss(x, c1, x2, c2, labels, p1, p2, topk=5, update_topk=2).loss

    assert torch.autograd.gradcheck(f_csc, (x1,), eps=1e-6, atol=1e-6)


# ============================================================================= gradients


def test_gradients_reach_embeddings_only():
    e1, c1, e2, c2, labels, p1, p2 = _csc_inputs(dtype=torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (e1, c1, e2, c2, p1, p2)]
    e1g, c1g, e2g, c2g, p1g, p2g = leaves
    out = csc_loss(e1g, c1g, e2g, c2g, labels, p1g, p2g)
    assert not out.bank1.requires_grad and not out.bank2.requires_grad
    out.loss.backward()
    assert e1g.grad is not None and e1g.grad.abs().sum() > 0 and e2g.grad.abs().sum() > 0
    assert c1g.grad is None and c2g.grad is None and p1g.grad is None and p2g.grad is None

    c1, u1, c2, u2, t1, t2, m1, m2 = _psc_inputs(dtype=torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (c1, u1, c2, u2, m1, m2)]
    c1g, u1g, c2g, u2g, m1g, m2g = leaves
    out = psc_loss(c1g, u1g, c2g, u2g, t1, t2, m1g, m2g)
    assert not out.proto1.requires_grad and not out.bank1.requires_grad
    out.loss.backward()
    assert u1g.grad.abs().sum() > 0 and u2g.grad.abs().sum() > 0
    assert c1g.grad is None and c2g.grad is None and m1g.grad is None and m2g.grad is None

    e1, e2, l1, l2, b1, b2 = _rsc_inputs()
    leaves = [t.clone().requires_grad_(True) for t in (e1, e2, b1, b2)]
    e1g, e2g, b1g, b2g = leaves
    out = rsc_loss(e1g, e2g, l1, l2, b1g, b2g, bg_label=3)
    assert not out.bank1.requires_grad
    out.loss.backward()
    assert e1g.grad.abs().sum() > 0 and e2g.grad.abs().sum() > 0
    assert b1g.grad is None and b2g.grad is None


# ============================================================================= the HSC block


def _block_inputs(n=3, k=4, img_hw=(100, 140), v1_hw=(37, 45), seed=3):
    """Odd, non-square sizes: grid = (12, 17); view-1 maps are resized to it."""
    g = torch.Generator().manual_seed(seed)
    gh, gw = img_hw[0] // 8, img_hw[1] // 8
    cam1 = 0.1 * torch.rand(n, k + 1, *v1_hw, generator=g)
    cam2 = 0.1 * torch.rand(n, k + 1, gh, gw, generator=g)
    cam1[0, 1, : v1_hw[0] // 2] += 1.0
    cam2[0, 1, : gh // 2] += 1.0
    cam1[1:, 3, :, v1_hw[1] // 3 :] += 1.0
    cam2[1:, 3, :, gw // 3 :] += 1.0
    pix1 = torch.relu(torch.randn(n, 8, *v1_hw, generator=g))
    emb1 = torch.randn(n, 16, *v1_hw, generator=g)
    pix2 = torch.relu(torch.randn(n, 8, gh, gw, generator=g))
    emb2 = torch.randn(n, 16, gh, gw, generator=g)
    # two colours: the colour edge (image row 32 -> grid row 4) is above the CAM edge (grid row 6)
    img2 = torch.tensor([-1.0, 0.5, 1.0]).view(1, 3, 1, 1).repeat(n, 1, *img_hw)
    img2[:, :, :32] = torch.tensor([1.5, -1.0, -0.5]).view(1, 3, 1, 1)
    img2[:, 1, :, :40] += 1.0
    img2 = img2 + 0.01 * torch.rand(img2.shape, generator=g)
    labels = torch.zeros(n, k)
    labels[0, 1] = 1
    labels[1:, 3] = 1
    labels[2, 0] = 1
    return cam1, cam2, pix1, emb1, pix2, emb2, img2, labels


def _banks(k=4, seed=4):
    return MomentumBanks(k, roi_dim=16, pixel_dim=8, generator=torch.Generator().manual_seed(seed))


def test_block_odd_sizes_and_batch_of_three():
    args = _block_inputs()
    banks = _banks()
    before = {k: v.clone() for k, v in banks.banks().items()}
    out = hsc_loss(*args, banks)
    n, gh, gw = 3, 12, 17
    assert out.norm_cam1.shape == (n, 5, gh, gw) and out.pseudo_labels2.shape == (n, gh, gw)
    assert out.crf_labels1 is not None and out.crf_labels1.shape == (n, gh, gw)
    assert out.crf_image is not None and out.crf_image.shape == (n, gh, gw, 3)
    for t in (out.loss_rsc, out.loss_csc, out.loss_psc, out.total):
        assert t.shape == () and torch.isfinite(t) and t.item() > 0
    torch.testing.assert_close(out.total, out.loss_rsc + out.loss_csc + out.loss_psc)
    assert out.psc is not None and out.psc.topk == gh * gw // 16
    for name, old in before.items():
        assert not torch.equal(getattr(banks, name), old), name
    # class-bank rows of absent classes / the background row are untouched
    assert torch.equal(banks.class_v1[2], before["class_v1"][2]) and torch.equal(
        banks.class_v1[4], before["class_v1"][4]
    )


def test_normalize_cam_by_hand():
    cam = torch.tensor([[[[0.0, 1.0], [3.0, -2.0]], [[0.5, 0.5], [0.5, 0.5]], [[9.0, 9.0], [9.0, 9.0]]]])
    out = normalize_cam(cam, 0.1)
    e = 1e-5
    want0 = torch.tensor([[-e / (3 + e), (1 - e) / (3 + e)], [(3 - e) / (3 + e), -e / (3 + e)]])
    torch.testing.assert_close(out[0, 0], want0)
    # a constant channel: every entry equals the min -> zeroed -> -(mn + e) / e
    torch.testing.assert_close(out[0, 1], torch.full((2, 2), -(0.5 + e) / e))
    assert torch.all(out[0, 2] == torch.tensor(0.1))


def test_block_table4_switches():
    args = _block_inputs()
    ref_banks = _banks()
    ref = hsc_loss(*args, ref_banks)

    # row 1: baseline, nothing computed, banks untouched, no CRF
    banks = _banks()
    before = {k: v.clone() for k, v in banks.banks().items()}
    r1 = hsc_loss(*args, banks, HSCLossConfig.table4(1))
    assert r1.total.item() == 0 and r1.crf_labels1 is None and r1.crf_image is None
    assert all(torch.equal(getattr(banks, k), v) for k, v in before.items())

    # row 2: PSC + CS only, raw labels, no momentum term
    banks = _banks()
    r2 = hsc_loss(*args, banks, HSCLossConfig.table4(2))
    assert r2.loss_rsc.item() == 0 and r2.loss_csc.item() == 0 and r2.crf_labels1 is None
    c1, c2 = r2.norm_cam1, r2.norm_cam2
    pix1 = F.interpolate(args[2], size=(12, 17), mode="bilinear", align_corners=True)
    want = psc_loss(
        c1,
        pix1,
        c2,
        args[4],
        r2.pseudo_labels1,
        r2.pseudo_labels2,
        before["pixel_v1"],
        before["pixel_v2"],
        use_memory=False,
    )
    torch.testing.assert_close(r2.loss_psc, want.loss)
    assert torch.equal(banks.pixel_v1, before["pixel_v1"])

    # cross supervision off (row 5 vs row 4): each loss equals its terms recomputed by hand
    r4 = hsc_loss(*args, _banks(), HSCLossConfig.table4(4))
    r5 = hsc_loss(*args, _banks(), HSCLossConfig.table4(5))
    assert r4.rsc is not None and r5.rsc is not None and r5.csc is not None and r5.psc is not None
    torch.testing.assert_close(r5.rsc.intra_v1, r4.rsc.intra_v1)
    pulls = 0.5 * (r4.rsc.pull_fg_v1 + r4.rsc.pull_fg_v2 + r4.rsc.pull_bg_v1 + r4.rsc.pull_bg_v2)
    torch.testing.assert_close(r5.loss_rsc, 0.1 * (0.5 * (r4.rsc.intra_v1 + r4.rsc.intra_v2) + pulls))
    nc = r5.csc.classes.numel()
    torch.testing.assert_close(r5.loss_csc, 0.1 * (r5.csc.own_v1 + r5.csc.own_v2).sum() / nc / 2)
    torch.testing.assert_close(r5.loss_psc, 0.1 * 0.5 * (r5.psc.intra_v1 + r5.psc.intra_v2))
    assert r5.loss_psc < r4.loss_psc

    # MPL (row 6 vs 4) adds exactly the momentum term
    r6 = hsc_loss(*args, _banks(), HSCLossConfig.table4(6))
    assert r6.psc is not None
    torch.testing.assert_close(r6.loss_psc - r4.loss_psc, 0.05 * (r6.psc.memory_v1 + r6.psc.memory_v2))

    # CRF dagger (row 7): PSC on CRF labels, RSC on raw labels; row 8 = the defaults: both on CRF
    r7 = hsc_loss(*args, _banks(), HSCLossConfig.table4(7))
    assert r7.crf_labels1 is not None and r7.crf_labels2 is not None
    # the CRF moved image 0's class-1 edge from the CAM edge (grid row 6) to the colour edge (row 4)
    assert (r7.pseudo_labels1[0, :6] == 1).all() and (r7.pseudo_labels1[0, 6:] == 4).all()
    assert (r7.crf_labels1[0, :4] == 1).all() and (r7.crf_labels1[0, 4:] == 4).all()
    torch.testing.assert_close(r7.loss_rsc, r6.loss_rsc)
    torch.testing.assert_close(r7.loss_csc, r6.loss_csc)
    assert HSCLossConfig.table4(8) == HSCLossConfig()
    torch.testing.assert_close(ref.loss_psc, r7.loss_psc)
    emb1 = F.interpolate(args[3], size=(12, 17), mode="bilinear", align_corners=True)
    b = _banks()
    want_rsc = rsc_loss(emb1, args[5], r7.crf_labels1, r7.crf_labels2, b.roi_v1, b.roi_v2, bg_label=4)
    torch.testing.assert_close(ref.loss_rsc, want_rsc.loss)


def test_block_options_paper_values():
    args = _block_inputs()
    base = hsc_loss(*args, _banks())
    cfg = replace(
        HSCLossConfig(), bank_momentum=0.9, psc_topk=5, rsc_pull_terms=False, rsc_norm_axis="channel"
    )
    banks = _banks()
    roi_before = banks.roi_v1.clone()
    out = hsc_loss(*args, banks, cfg)
    assert out.psc is not None and out.psc.topk == 5
    assert torch.equal(banks.roi_v1, roi_before)  # RSC banks unused without pull terms
    assert not torch.allclose(out.loss_rsc, base.loss_rsc)
    torch.testing.assert_close(
        hsc_loss(*args, _banks(), replace(HSCLossConfig(), gamma=1.0)).total, base.total * 10
    )


def test_block_gradient_flow():
    args = [t.clone() for t in _block_inputs()]
    for t in args[:7]:
        t.requires_grad_(True)
    banks = _banks()
    out = hsc_loss(*args, banks)
    out.total.backward()
    cam1, cam2, pix1, emb1, pix2, emb2, img2, _ = args
    for t in (pix1, emb1, pix2, emb2):
        assert t.grad is not None and t.grad.abs().sum() > 0
    for t in (cam1, cam2, img2):
        assert t.grad is None
    assert not any(b.requires_grad for b in banks.buffers())
    for t in (out.norm_cam1, out.pseudo_labels1, out.crf_labels1):
        assert t is not None and not t.requires_grad


def test_block_rejects_bad_inputs():
    args = list(_block_inputs())
    with pytest.raises(ValueError):
        hsc_loss(*args, _banks(k=5))
    bad = list(args)
    bad[7] = args[7][:, :-1]
    with pytest.raises(ValueError):
        hsc_loss(*bad, _banks())
    with pytest.raises(ValueError):
        HSCLossConfig(rsc_norm_axis="height")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        HSCLossConfig.table4(9)


def test_config_round_trip():
    cfg = HSCLossConfig.table4(5, psc_topk=32, bank_momentum=0.9)
    assert HSCLossConfig.from_dict(cfg.to_dict()) == cfg
    assert not cfg.cross_supervision and cfg.psc_topk == 32


def test_hsc_loss_module_keeps_banks_in_state_dict():
    mod = HSCLoss(4, roi_dim=16, pixel_dim=8, generator=torch.Generator().manual_seed(0))
    assert {k for k in mod.state_dict()} == {f"banks.{n}" for n in mod.banks.banks()}
    out = mod(*_block_inputs())
    assert torch.isfinite(out.total)
    copy = HSCLoss(4, roi_dim=16, pixel_dim=8)
    copy.load_state_dict(mod.state_dict())
    for name, t in mod.banks.banks().items():
        assert torch.equal(getattr(copy.banks, name), t)
