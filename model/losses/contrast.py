"""The three semantic-contrast losses of HSC: ROI (RSC), class (CSC) and pixel (PSC) level.

Each function follows the released code (docs/algorithm.md sections 3.6-3.8) by default, with the
paper's forms behind keywords. Class layout: a CAM has ``C = K + 1`` channels, the ``K`` foreground
classes first and the background **last** (channel / label ``K``).

The functions are pure: they never modify their inputs. The momentum banks they read are returned
updated (new, detached tensors) in the output tuple; the caller writes them back (see
:class:`hsc.model.prototypes.MomentumBanks`). Gradients reach only the embeddings; pseudo-labels,
CAM weights, top-k selections, batch prototypes and banks are constants (algorithm.md 3.12).

Every loss is returned already multiplied by ``gamma`` (0.1: the official code folds the paper's
gamma of eq. (1) into each of the three losses); the individual terms are returned unscaled.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CSCOutput",
    "PSCOutput",
    "RSCOutput",
    "csc_loss",
    "psc_loss",
    "psc_prototypes",
    "psc_topk",
    "rsc_loss",
    "rsc_representations",
    "sim_min",
]

RSCNormAxis = Literal["width", "channel"]


def _check_bank(bank: Tensor, rows: int, dim: int, what: str) -> None:
    if bank.dim() != 2 or bank.shape[0] != rows or bank.shape[1] != dim:
        raise ValueError(f"{what}: expected shape ({rows}, {dim}), got {tuple(bank.shape)}")


def _check_maps(emb: Tensor, labels: Tensor, what: str) -> None:
    if emb.dim() != 4:
        raise ValueError(f"{what}: embeddings must be (N, D, H, W), got {tuple(emb.shape)}")
    if labels.shape != (emb.shape[0], *emb.shape[2:]):
        raise ValueError(
            f"{what}: labels must be (N, H, W) = {(emb.shape[0], *emb.shape[2:])}, got {tuple(labels.shape)}"
        )


def _momentum(new: Tensor, old: Tensor, momentum: float) -> Tensor:
    """``momentum * new + (1 - momentum) * old`` (``momentum`` = weight of the new value)."""
    return momentum * new + (1.0 - momentum) * old


# ------------------------------------------------------------------------------------------------
# RSC


class RSCOutput(NamedTuple):
    """Result of :func:`rsc_loss`. Terms are unscaled; ``bank*`` are the updated ``(2, D)`` banks."""

    loss: Tensor
    intra_v1: Tensor  # Sim(r_b of view 1, r_o of view 1)
    intra_v2: Tensor  # Sim(r_b of view 2, r_o of view 2)
    cross_v1: Tensor  # Sim(r_b of view 1, r_o of view 2)
    cross_v2: Tensor  # Sim(r_b of view 2, r_o of view 1)
    pull_fg_v1: Tensor  # mean |B1[1] - r_o of view 1|
    pull_fg_v2: Tensor  # mean |B2[1] - r_o of view 2|
    pull_bg_v1: Tensor  # mean |B1[0] - r_b of view 1|
    pull_bg_v2: Tensor  # mean |B2[0] - r_b of view 2|
    bank1: Tensor
    bank2: Tensor


def rsc_representations(
    emb: Tensor, labels: Tensor, bg_label: int, *, norm_axis: RSCNormAxis = "width"
) -> tuple[Tensor, Tensor]:
    """Background and ROI representations of every image, eq. (3) of the paper (as the code does it).

    ``e = emb`` L2-normalised along ``norm_axis`` (official: the **width** axis, a quirk; "channel" is
    the evident intent), then masked mean ``sum(e * m) / (sum(m) + 1e-5)`` over the pixels and an L2
    normalisation (eps 1e-5). An empty mask gives the zero vector.

    Args:
        emb: ``(N, D, H, W)`` embeddings (``F_proj1``).
        labels: ``(N, H, W)`` integer labels; ``bg_label`` marks background, anything else is ROI.
        bg_label: the background label (``K``).
        norm_axis: "width" (official) or "channel".

    Returns:
        ``(r_bg, r_fg)``, each ``(N, D)``.
    """
    _check_maps(emb, labels, "rsc_representations")
    if norm_axis == "width":
        e = F.normalize(emb, dim=-1)
    elif norm_axis == "channel":
        e = F.normalize(emb, dim=1)
    else:
        raise ValueError(f"norm_axis must be 'width' or 'channel', got {norm_axis!r}")
    bg = (labels == bg_label).unsqueeze(1).to(e.dtype)  # (N, 1, H, W)
    fg = (labels != bg_label).unsqueeze(1).to(e.dtype)
    r_bg = (e * bg).sum(dim=(2, 3)) / (bg.sum(dim=(2, 3)) + 1e-5)  # (N, D)
    r_fg = (e * fg).sum(dim=(2, 3)) / (fg.sum(dim=(2, 3)) + 1e-5)
    return F.normalize(r_bg, dim=1, eps=1e-5), F.normalize(r_fg, dim=1, eps=1e-5)


def sim_min(a: Tensor, b: Tensor) -> Tensor:
    """Eq. (4) of the paper: ``mean_{i,j} -ln(1 - clamp(cos(a_i, b_j), 5e-4, 0.9995))``.

    Args:
        a: ``(N, D)``; b: ``(M, D)``. All ``N x M`` pairs are averaged. The clamp (official) keeps the
        log finite and gives negative similarities a constant value without gradient.
    """
    cos = F.normalize(a, dim=1) @ F.normalize(b, dim=1).t()  # (N, M)
    return -torch.log(1.0 - cos.clamp(5e-4, 0.9995)).mean()


def rsc_loss(
    emb1: Tensor,
    emb2: Tensor,
    labels1: Tensor,
    labels2: Tensor,
    bank1: Tensor,
    bank2: Tensor,
    *,
    bg_label: int,
    gamma: float = 0.1,
    momentum: float = 0.5,
    cross_supervision: bool = True,
    pull_terms: bool = True,
    norm_axis: RSCNormAxis = "width",
) -> RSCOutput:
    """ROI-level semantic contrast, eqs. (3)-(5) of the paper as implemented by the code (3.6).

    Official loss (``Sim`` = :func:`sim_min`, ``r_b``/``r_o`` from :func:`rsc_representations`)::

        gamma * [ 1/2 (Sim(b1, o1) + Sim(b2, o2))          intra-view
                + 1/2 (Sim(b1, o2) + Sim(b2, o1))          cross-view      (cross_supervision)
                + 1/2 (mean|B1[1] - o1| + mean|B2[1] - o2|)  pull ROI      (pull_terms)
                + 1/2 (mean|B1[0] - b1| + mean|B2[0] - b2|) ] pull bg      (pull_terms)

    The paper's eq. (5) is ``F(r_o, r_b) + F(r_o, r~_b)`` with explicitly no pulling:
    ``pull_terms=False``. Without pull terms the banks are neither used nor updated.

    Bank update (no grad, after the loss): ``B[0] <- m * mean_n b + (1 - m) * B[0]``,
    ``B[1] <- m * mean_n o + (1 - m) * B[1]`` with ``m = momentum`` (official 0.5; not re-normalised).

    Args:
        emb1, emb2: ``(N, D, H, W)`` embeddings of the two views (same grid).
        labels1, labels2: ``(N, H, W)`` integer pseudo-labels; ``bg_label`` = background.
        bank1, bank2: ``(2, D)`` banks of the views (row 0 background, row 1 ROI); not modified.
        bg_label: background label (``K``).
        gamma: weight of the loss (official 0.1).
        momentum: weight of the new value in the bank update.
        cross_supervision: keep the cross-view terms.
        pull_terms: keep the two L1 pull terms (official); False is the paper's eq. (5).
        norm_axis: "width" (official quirk) or "channel", see :func:`rsc_representations`.

    Works for ``N = 1`` (the official code crashes there).
    """
    d = emb1.shape[1]
    _check_maps(emb2, labels2, "rsc_loss view 2")
    if emb1.shape != emb2.shape:
        raise ValueError(f"rsc_loss: views differ in shape {tuple(emb1.shape)} vs {tuple(emb2.shape)}")
    _check_bank(bank1, 2, d, "rsc_loss bank1")
    _check_bank(bank2, 2, d, "rsc_loss bank2")
    b1, o1 = rsc_representations(emb1, labels1, bg_label, norm_axis=norm_axis)
    b2, o2 = rsc_representations(emb2, labels2, bg_label, norm_axis=norm_axis)
    old1, old2 = bank1.detach(), bank2.detach()

    intra_v1, intra_v2 = sim_min(b1, o1), sim_min(b2, o2)
    cross_v1, cross_v2 = sim_min(b1, o2), sim_min(b2, o1)
    pull_fg_v1 = (old1[1] - o1).abs().mean()
    pull_fg_v2 = (old2[1] - o2).abs().mean()
    pull_bg_v1 = (old1[0] - b1).abs().mean()
    pull_bg_v2 = (old2[0] - b2).abs().mean()

    total = 0.5 * (intra_v1 + intra_v2)
    if cross_supervision:
        total = total + 0.5 * (cross_v1 + cross_v2)
    if pull_terms:
        total = total + 0.5 * (pull_fg_v1 + pull_fg_v2) + 0.5 * (pull_bg_v1 + pull_bg_v2)
        with torch.no_grad():
            new1 = _momentum(torch.stack([b1.mean(0), o1.mean(0)]), old1, momentum)
            new2 = _momentum(torch.stack([b2.mean(0), o2.mean(0)]), old2, momentum)
    else:
        new1, new2 = old1, old2
    return RSCOutput(
        gamma * total,
        intra_v1,
        intra_v2,
        cross_v1,
        cross_v2,
        pull_fg_v1,
        pull_fg_v2,
        pull_bg_v1,
        pull_bg_v2,
        new1,
        new2,
    )


# ------------------------------------------------------------------------------------------------
# CSC


class CSCOutput(NamedTuple):
    """Result of :func:`csc_loss`.

    ``classes`` are the foreground classes of the batch in ascending order; the per-class InfoNCE terms
    (unscaled, shape ``(len(classes),)``) follow that order. ``bank*`` are the updated ``(K+1, D)`` banks.
    """

    loss: Tensor
    classes: Tensor  # (C,) int64
    own_v1: Tensor  # l(r1, P1, c)   "view1_vs_bank1"
    mutual_v1: Tensor  # l(r1, P2, c)   "view1_vs_bank2"
    own_v2: Tensor  # l(r2, P2, c)   "view2_vs_bank2"
    mutual_v2: Tensor  # l(r2, P1, c)   "view2_vs_bank1"
    bank1: Tensor
    bank2: Tensor

    def per_class(self) -> dict[int, dict[str, Tensor]]:
        """Terms keyed by class (a host sync: for tests and logging)."""
        return {
            int(c): {
                "view1_vs_bank1": self.own_v1[i],
                "view1_vs_bank2": self.mutual_v1[i],
                "view2_vs_bank2": self.own_v2[i],
                "view2_vs_bank1": self.mutual_v2[i],
            }
            for i, c in enumerate(self.classes.tolist())
        }


def _csc_view(
    emb: Tensor, cam: Tensor, label_mask: Tensor, classes: Tensor, topk: int, update_topk: int
) -> tuple[Tensor, Tensor]:
    """Class representations (with grad) and bank-update vectors (no grad) of one view."""
    n, d, h, w = emb.shape
    k_fg = cam.shape[1] - 1
    with torch.no_grad():
        s = torch.softmax(cam * label_mask, dim=1)[:, :k_fg]  # (N, K, H, W)
        s = s.permute(1, 0, 2, 3).reshape(k_fg, n * h * w)  # (K, N*H*W), (n, y, x) order, contiguous
        k = min(topk, n * h * w)
        val, idx = torch.topk(s, k, dim=1)  # the golden numbers come from exactly this call
        val, idx = val[classes], idx[classes]  # (C, k)
    feats = emb.permute(0, 2, 3, 1).reshape(n * h * w, d)  # (N*H*W, D)
    picked = feats[idx]  # (C, k, D)
    wsum = val.sum(dim=1, keepdim=True)  # (C, 1)
    rep = F.normalize((val.unsqueeze(-1) * picked).sum(dim=1) / wsum, dim=1)  # (C, D)
    with torch.no_grad():
        ku = min(update_topk, k)
        top = (val[:, :ku, None] * picked.detach()[:, :ku]).sum(dim=1) / wsum
        upd = F.normalize(top, dim=1)  # (C, D)
    return rep, upd


def csc_loss(
    emb1: Tensor,
    cam1: Tensor,
    emb2: Tensor,
    cam2: Tensor,
    labels: Tensor,
    bank1: Tensor,
    bank2: Tensor,
    *,
    gamma: float = 0.1,
    tau: float = 0.1,
    momentum: float = 0.5,
    topk: int = 128,
    update_topk: int = 16,
    cross_supervision: bool = True,
) -> CSCOutput:
    """Class-level semantic contrast, eqs. (6)-(9) of the paper as implemented by the code (3.7).

    Per view, ``s = softmax(cam * label21)[:, :K]`` is flattened to ``(K, N*H*W)`` and its batch-wide
    top-``topk`` positions per class give ``r_c = l2n(sum w * e / sum w)`` (the paper's eq. (6) takes
    per-image top-16 means instead). For every class ``c`` of the batch, **in ascending order**::

        l(r, P, c) = -log softmax_k(cos(r, P_k) / tau)[c]        (eq. 8, all K+1 rows of P)
        own_c = l(r1, P1, c) + l(r2, P2, c);  mutual_c = l(r1, P2, c) + l(r2, P1, c)

    and right after class ``c`` its rows are updated (no grad):
    ``P_v[c] <- m * l2n(sum_{top update_topk} w * e) + (1 - m) * P_v[c]`` - so later classes see the
    already updated rows as negatives (reproduced exactly, with all classes computed at once).

    ``loss = gamma * (sum_c own_c / |C| + sum_c mutual_c / |C|) / 4`` (official; eq. (9) averaged over
    the two views). With ``cross_supervision=False`` the mutual terms are dropped:
    ``gamma * sum_c own_c / |C| / 2``.
    A batch without foreground class gives a zero loss and unchanged banks.

    Args:
        emb1, emb2: ``(N, D, H, W)`` class embeddings (``F_proj1``) of the two views.
        cam1, cam2: ``(N, K+1, H, W)`` normalised CAMs (background last); used without gradient.
        labels: ``(N, K)`` multi-hot image labels (background implied present).
        bank1, bank2: ``(K+1, D)`` class banks of the views; not modified.
        gamma: loss weight (official 0.1). tau: temperature (0.1).
        momentum: weight of the new value in the bank update (official 0.5; paper 0.9).
        topk: positions per class for the representation (128; clipped to ``N*H*W``).
        update_topk: leading positions of those used for the bank update (16).
        cross_supervision: keep the mutual (other view's bank) terms.
    """
    n, d, h, w = emb1.shape
    c_all = cam1.shape[1]
    k_fg = c_all - 1
    for what, t in (("emb2", emb2), ("cam1", cam1), ("cam2", cam2)):
        if t.dim() != 4 or t.shape[0] != n or t.shape[2:] != emb1.shape[2:]:
            raise ValueError(
                f"csc_loss: {what} shape {tuple(t.shape)} does not match emb1 {tuple(emb1.shape)}"
            )
    if emb2.shape[1] != d or cam2.shape[1] != c_all:
        raise ValueError("csc_loss: the two views differ in channels")
    if labels.shape != (n, k_fg):
        raise ValueError(f"csc_loss: labels must be (N, K) = {(n, k_fg)}, got {tuple(labels.shape)}")
    _check_bank(bank1, c_all, d, "csc_loss bank1")
    _check_bank(bank2, c_all, d, "csc_loss bank2")
    old1, old2 = bank1.detach(), bank2.detach()

    classes = torch.nonzero(labels.detach().gt(0).any(dim=0)).flatten()  # ascending
    nc = int(classes.numel())
    if nc == 0:
        empty = emb1.new_zeros((0,))
        return CSCOutput(emb1.new_zeros(()), classes, empty, empty, empty, empty, old1, old2)

    label_mask = torch.cat([labels, labels.new_ones(n, 1)], dim=1).to(cam1.dtype)[:, :, None, None]
    r1, q1 = _csc_view(emb1, cam1.detach(), label_mask, classes, topk, update_topk)
    r2, q2 = _csc_view(emb2, cam2.detach(), label_mask, classes, topk, update_topk)

    with torch.no_grad():
        rows1 = _momentum(q1, old1[classes], momentum)  # (C, D) the updated rows
        rows2 = _momentum(q2, old2[classes], momentum)
        # Bank state seen by the i-th class: rows of the classes before it already updated.
        earlier = torch.ones(nc, nc, dtype=torch.bool, device=classes.device).tril(-1)[
            ..., None
        ]  # [i, j]: j < i
        states = []
        for old, rows in ((old1, rows1), (old2, rows2)):
            st = old.unsqueeze(0).repeat(nc, 1, 1)  # (C, K+1, D)
            st[:, classes] = torch.where(earlier, rows.unsqueeze(0), old[classes].unsqueeze(0))
            states.append(st)
        new1, new2 = old1.clone(), old2.clone()
        new1[classes] = rows1
        new2[classes] = rows2

    def info_nce(r: Tensor, st: Tensor) -> Tensor:
        logits = F.cosine_similarity(r.unsqueeze(1), st, dim=-1) / tau  # (C, K+1)
        return F.cross_entropy(logits, classes, reduction="none")  # (C,)

    own_v1, mutual_v1 = info_nce(r1, states[0]), info_nce(r1, states[1])
    own_v2, mutual_v2 = info_nce(r2, states[1]), info_nce(r2, states[0])
    own = (own_v1 + own_v2).sum() / nc
    if cross_supervision:
        loss = gamma * (own + (mutual_v1 + mutual_v2).sum() / nc) / 4
    else:
        loss = gamma * own / 2
    return CSCOutput(loss, classes, own_v1, mutual_v1, own_v2, mutual_v2, new1, new2)


# ------------------------------------------------------------------------------------------------
# PSC


class PSCOutput(NamedTuple):
    """Result of :func:`psc_loss`: unscaled mean InfoNCE terms, the batch prototypes and new banks."""

    loss: Tensor
    cross_view_v1: Tensor  # NCE(z1, t1, Q2)
    cross_view_v2: Tensor  # NCE(z2, t2, Q1)
    cross_cam_v1: Tensor  # NCE(z1, t2, Q1)
    cross_cam_v2: Tensor  # NCE(z2, t1, Q2)
    intra_v1: Tensor  # NCE(z1, t1, Q1)
    intra_v2: Tensor  # NCE(z2, t2, Q2)
    memory_v1: Tensor  # NCE(z1, t1, M1)
    memory_v2: Tensor  # NCE(z2, t2, M2)
    topk: int
    proto1: Tensor  # (K+1, D) batch prototypes Q1 (unit rows)
    proto2: Tensor
    bank1: Tensor  # (K+1, D) updated momentum banks
    bank2: Tensor


def psc_topk(height: int, width: int, topk: int | None = None) -> int:
    """Positions per channel for the PSC prototypes: ``topk`` or, if None, ``H*W // 16`` (official)."""
    k = height * width // 16 if topk is None else topk
    if k < 1:
        raise ValueError(f"PSC top-k must be >= 1 (grid {height}x{width}, topk={topk})")
    return k


def psc_prototypes(cam: Tensor, pix: Tensor, k: int) -> Tensor:
    """Batch prototypes of eq. (10), as the code computes them (no grad).

    For every channel (all ``K+1``, background included, labels ignored) the top-``k`` positions of the
    CAM over the whole batch (``torch.topk`` on the contiguous ``(C, N*H*W)`` tensor) weight the
    detached embeddings: ``Q_c = l2n(sum w * u / sum w)``.

    Args:
        cam: ``(N, C, H, W)`` normalised CAM. pix: ``(N, D, H, W)`` pixel embeddings. k: positions.

    Returns:
        ``(C, D)`` unit prototypes.
    """
    n, c, h, w = cam.shape
    with torch.no_grad():
        weights = cam.detach().permute(1, 0, 2, 3).reshape(c, n * h * w)  # (C, N*H*W), contiguous
        feats = pix.detach().permute(0, 2, 3, 1).reshape(n * h * w, pix.shape[1])  # (N*H*W, D)
        val, idx = torch.topk(weights, min(k, n * h * w), dim=1)  # (C, k)
        q = (val.unsqueeze(-1) * feats[idx]).sum(dim=1) / val.sum(dim=1, keepdim=True)  # (C, D)
        return F.normalize(q, dim=1)


def psc_loss(
    cam1: Tensor,
    pix1: Tensor,
    cam2: Tensor,
    pix2: Tensor,
    labels1: Tensor,
    labels2: Tensor,
    bank1: Tensor,
    bank2: Tensor,
    *,
    gamma: float = 0.1,
    tau: float = 0.1,
    momentum: float = 0.5,
    topk: int | None = None,
    cross_supervision: bool = True,
    use_memory: bool = True,
) -> PSCOutput:
    """Pixel-level semantic contrast, eqs. (10)-(13) of the paper as implemented by the code (3.8).

    ``Q_v`` = :func:`psc_prototypes` of view v, ``z_v`` the L2-normalised pixel embeddings (with grad),
    ``t_v`` the pseudo-labels, and ``NCE(z, t, Q) = mean_p -log softmax_k(z_p . Q_k / tau)[t_p]``
    (eq. 12; dot products, bank rows are not re-normalised)::

        loss = gamma * [ 1/2 (NCE(z1,t1,Q2) + NCE(z2,t2,Q1))   cross-view  (cross_supervision)
                       + 1/2 (NCE(z1,t2,Q1) + NCE(z2,t1,Q2))   cross-CAM   (cross_supervision)
                       + 1/2 (NCE(z1,t1,Q1) + NCE(z2,t2,Q2))   intra-view
                       + 1/2 (NCE(z1,t1,M1) + NCE(z2,t2,M2)) ] momentum    (use_memory, "MPL")

    Bank update (no grad, all ``K+1`` rows, whatever the labels): ``M_v <- m * Q_v + (1 - m) * M_v``;
    skipped when ``use_memory`` is False (the banks are then unused).

    Args:
        cam1, cam2: ``(N, K+1, H, W)`` normalised CAMs (prototype weights, no grad).
        pix1, pix2: ``(N, D, H, W)`` pixel embeddings (``F_proj2``).
        labels1, labels2: ``(N, H, W)`` integer pseudo-labels in ``[0, K]``.
        bank1, bank2: ``(K+1, D)`` momentum banks; not modified.
        gamma: loss weight (0.1). tau: temperature (0.1). momentum: weight of the new value (0.5).
        topk: prototype positions per channel; None = ``H*W // 16`` (official, not times N), the
            paper's ``k_p`` is 32.
        cross_supervision: keep the cross-view and cross-CAM terms.
        use_memory: keep the momentum-bank term (the paper's MPL) and update the banks.
    """
    n, c, h, w = cam1.shape
    d = pix1.shape[1]
    for what, t in (("cam2", cam2), ("pix1", pix1), ("pix2", pix2)):
        if t.dim() != 4 or t.shape[0] != n or t.shape[2:] != cam1.shape[2:]:
            raise ValueError(
                f"psc_loss: {what} shape {tuple(t.shape)} does not match cam1 {tuple(cam1.shape)}"
            )
    if cam2.shape[1] != c or pix2.shape[1] != d:
        raise ValueError("psc_loss: the two views differ in channels")
    _check_maps(pix1, labels1, "psc_loss view 1")
    _check_maps(pix2, labels2, "psc_loss view 2")
    _check_bank(bank1, c, d, "psc_loss bank1")
    _check_bank(bank2, c, d, "psc_loss bank2")
    k = psc_topk(h, w, topk)
    old1, old2 = bank1.detach(), bank2.detach()
    q1, q2 = psc_prototypes(cam1, pix1, k), psc_prototypes(cam2, pix2, k)

    z1 = F.normalize(pix1.permute(0, 2, 3, 1).reshape(-1, d), dim=1)  # (P, D), P = N*H*W
    z2 = F.normalize(pix2.permute(0, 2, 3, 1).reshape(-1, d), dim=1)
    t1, t2 = labels1.reshape(-1, 1).long(), labels2.reshape(-1, 1).long()  # (P, 1)

    def log_probs(z: Tensor, *protos: Tensor) -> Tensor:
        logits = z @ torch.cat(protos).t() / tau  # (P, len(protos) * C)
        return F.log_softmax(logits.view(z.shape[0], len(protos), c), dim=-1)  # (P, len, C)

    def nce(logp: Tensor, t: Tensor) -> Tensor:
        return -logp.gather(1, t).mean()

    lp1 = log_probs(z1, q1, q2, old1)  # own prototypes, other view's prototypes, own bank
    lp2 = log_probs(z2, q2, q1, old2)
    intra_v1, intra_v2 = nce(lp1[:, 0], t1), nce(lp2[:, 0], t2)
    cross_view_v1, cross_view_v2 = nce(lp1[:, 1], t1), nce(lp2[:, 1], t2)
    cross_cam_v1, cross_cam_v2 = nce(lp1[:, 0], t2), nce(lp2[:, 0], t1)
    memory_v1, memory_v2 = nce(lp1[:, 2], t1), nce(lp2[:, 2], t2)

    total = 0.5 * (intra_v1 + intra_v2)
    if cross_supervision:
        total = total + 0.5 * (cross_view_v1 + cross_view_v2) + 0.5 * (cross_cam_v1 + cross_cam_v2)
    if use_memory:
        total = total + 0.5 * (memory_v1 + memory_v2)
        with torch.no_grad():
            new1, new2 = _momentum(q1, old1, momentum), _momentum(q2, old2, momentum)
    else:
        new1, new2 = old1, old2
    return PSCOutput(
        gamma * total,
        cross_view_v1,
        cross_view_v2,
        cross_cam_v1,
        cross_cam_v2,
        intra_v1,
        intra_v2,
        memory_v1,
        memory_v2,
        k,
        q1,
        q2,
        new1,
        new2,
    )
