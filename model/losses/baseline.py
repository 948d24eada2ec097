"""The SEAM / EPS baseline losses that HSC trains with (docs/algorithm.md sections 3.1-3.4).

Class layout everywhere: a CAM has ``C = K + 1`` channels, the ``K`` foreground classes first and the
background **last**. ``labels`` are multi-hot ``(N, K)`` floats; ``label21`` is ``(N, K + 1, 1, 1)`` with
a 1 in the background channel. ``K`` is always derived from the shapes.

Every function is pure: no state, no ``.item()``, no device moves. Losses are 0-dim tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "EPSSaliencyTerms",
    "ERECRTerms",
    "adaptive_min_pooling_k",
    "adaptive_min_pooling_loss",
    "ecr_topk_k",
    "eps_saliency_loss",
    "eps_saliency_terms",
    "er_ecr_terms",
    "max_norm",
    "max_onehot",
    "multilabel_soft_margin_loss",
]


# --------------------------------------------------------------------------------------------------
# classification (3.1) and adaptive min-pooling (3.2)


def multilabel_soft_margin_loss(pred: Tensor, labels: Tensor) -> Tensor:
    """Classification loss: multilabel soft margin on the foreground logits (algorithm.md 3.1).

    ``mean_n (1/K) sum_c -[y_c log sigmoid(p_c) + (1 - y_c) log sigmoid(-p_c)]``; the background logit
    (the last one) gets no classification loss.

    Args:
        pred: ``(N, K + 1)`` class scores (spatial mean of the CAM logits), background last.
        labels: ``(N, K)`` multi-hot image labels.

    Returns:
        0-dim loss.
    """
    k = labels.shape[1]
    if pred.dim() != 2 or pred.shape[1] != k + 1:
        raise ValueError(f"pred must be (N, K+1) = (N, {k + 1}) for labels {tuple(labels.shape)}")
    return F.multilabel_soft_margin_loss(pred[:, :k], labels)


def adaptive_min_pooling_k(h: int, w: int) -> int:
    """SEAM's AMP pixel count per image: ``k = floor(h * w / 4)``."""
    return (h * w) // 4


def adaptive_min_pooling_loss(x: Tensor) -> Tensor:
    """SEAM's adaptive min-pooling loss (AMP, algorithm.md 3.2).

    ``M = max_c x`` per pixel; the ``k = floor(h*w/4)`` smallest values of ``M`` in every image;
    ``sum(relu(values)) / (k * N)``. HSC calls it on ``(cam_rv * label21)[:, :K]``.

    Args:
        x: ``(N, K, h, w)`` class maps (absent classes already zeroed by the caller).

    Returns:
        0-dim loss.
    """
    n, _, h, w = x.shape
    k = adaptive_min_pooling_k(h, w)
    if k < 1:
        raise ValueError(f"adaptive min-pooling needs h*w >= 4, got {h}x{w}")
    peak = x.max(dim=1).values.reshape(n, h * w)  # (N, h*w)
    smallest = torch.topk(peak, k, dim=-1, largest=False).values  # (N, k)
    return F.relu(smallest).sum() / (k * n)


# --------------------------------------------------------------------------------------------------
# EPS saliency loss (3.3)


class EPSSaliencyTerms(NamedTuple):
    """Result of :func:`eps_saliency_terms`."""

    loss: Tensor  # 0-dim, mean squared error of sal_pred to the resized saliency
    fg_map: Tensor  # (N, 1, h, w) sum of the probabilities of the foreground set
    bg_map: Tensor  # (N, 1, h, w) 1 - sum of the probabilities of the background set
    sal_pred: Tensor  # (N, 1, h, w) alpha * fg_map + (1 - alpha) * bg_map
    iou: Tensor  # (N, K) IoU of the rounded class maps with the rounded saliency (no grad)


def eps_saliency_terms(
    cam: Tensor, saliency: Tensor, labels: Tensor, *, tau: float = 0.5, alpha: float = 0.5
) -> EPSSaliencyTerms:
    """EPS's saliency loss with its intermediate maps (algorithm.md 3.3; HSC uses tau 0.5, alpha 0.5).

    1. ``S' = nearest-resize(saliency, (h, w))``; ``p = softmax(cam, dim=1)``.
    2. Per foreground class, on ``p.detach()``: ``iou_c = sum round(p_c) round(S') / sum (round(p_c) + 1e-4)``
       (``round`` is half-to-even; the 1e-4 is added per pixel). ``valid_c = iou_c > tau``.
    3. Foreground set: present classes with ``valid_c``; background set: the background channel plus the
       present classes without ``valid_c``. Absent classes are in neither set.
    4. ``sal_pred = alpha * sum_fg p + (1 - alpha) * (1 - sum_bg p)``; loss ``= mean (sal_pred - S')^2``.

    A label entry counts as present when it is non-zero.

    Args:
        cam: ``(N, K + 1, h, w)`` CAM logits (or the PCM output), background last.
        saliency: ``(N, 1, Hs, Ws)`` saliency map in ``[0, 1]``.
        labels: ``(N, K)`` multi-hot image labels.
        tau: IoU threshold above which a present class is trusted as foreground.
        alpha: weight of the foreground map in the saliency prediction.

    Returns:
        :class:`EPSSaliencyTerms` ``(loss, fg_map, bg_map, sal_pred, iou)``.
    """
    n, c, h, w = cam.shape
    k = labels.shape[1]
    if c != k + 1:
        raise ValueError(f"cam has {c} channels, labels {tuple(labels.shape)} need K+1 = {k + 1}")
    sal = F.interpolate(saliency, size=(h, w), mode="nearest")  # (N, 1, h, w)
    prob = torch.softmax(cam, dim=1)  # (N, K+1, h, w)

    with torch.no_grad():
        fg_round = torch.round(prob[:, :k].detach())  # (N, K, h, w), half to even
        inter = (fg_round * torch.round(sal)).reshape(n, k, h * w).sum(-1)  # (N, K)
        denom = (fg_round + 1e-4).reshape(n, k, h * w).sum(-1)  # (N, K)
        iou = inter / denom
        valid = iou > tau
        present = labels != 0
        fg_set = torch.cat([present & valid, present.new_zeros(n, 1)], dim=1)  # (N, K+1)
        bg_set = torch.cat([present & ~valid, present.new_ones(n, 1)], dim=1)  # (N, K+1)

    fg_map = torch.where(fg_set[:, :, None, None], prob, 0.0).sum(dim=1, keepdim=True)  # (N, 1, h, w)
    bg_map = 1 - torch.where(bg_set[:, :, None, None], prob, 0.0).sum(dim=1, keepdim=True)
    sal_pred = fg_map * alpha + bg_map * (1 - alpha)
    loss = F.mse_loss(sal_pred, sal)
    return EPSSaliencyTerms(loss, fg_map, bg_map, sal_pred, iou)


def eps_saliency_loss(
    cam: Tensor, saliency: Tensor, labels: Tensor, *, tau: float = 0.5, alpha: float = 0.5
) -> Tensor:
    """EPS's saliency loss (algorithm.md 3.3); the 0-dim loss of :func:`eps_saliency_terms`.

    Args:
        cam: ``(N, K + 1, h, w)`` CAM logits, background last.
        saliency: ``(N, 1, Hs, Ws)`` saliency map in ``[0, 1]``.
        labels: ``(N, K)`` multi-hot image labels.
        tau: IoU threshold; alpha: foreground weight.
    """
    return eps_saliency_terms(cam, saliency, labels, tau=tau, alpha=alpha).loss


# --------------------------------------------------------------------------------------------------
# SEAM equivariance losses (3.4)


def max_norm(p: Tensor, *, eps: float = 1e-5) -> Tensor:
    """SEAM's max-norm of class maps (algorithm.md 3.4), per (n, c) over the spatial positions.

    ``P = relu(P)``; ``mx = max P``, ``mn = min P``; result ``relu(P - mn - eps) / (mx - mn + eps)``.
    Gradients flow through ``mx`` and ``mn`` (to one arg-max / arg-min position each).

    Args:
        p: ``(N, C, *spatial)``, usually ``(N, C, H, W)``.

    Returns:
        Tensor of the same shape with values in ``[0, 1)``.
    """
    p = F.relu(p)
    flat = p.reshape(p.shape[0], p.shape[1], -1)  # (N, C, H*W)
    view = (p.shape[0], p.shape[1]) + (1,) * (p.dim() - 2)
    mx = flat.max(dim=-1).values.reshape(view)
    mn = flat.min(dim=-1).values.reshape(view)
    return F.relu(p - mn - eps) / (mx - mn + eps)


def max_onehot(x: Tensor, *, fixed: bool = False) -> Tensor:
    """SEAM's ``max_onehot`` target (algorithm.md 3.4 step 5), background-first quirk by default.

    Per pixel, channels that do not equal the maximum of the competing channels are set to 0 (ties keep
    every tied channel). SEAM wrote it for a background-first layout: **channel 0 is left untouched and
    only channels 1..C-1 compete** — with HSC's background-last layout that means foreground class 0
    never competes and the background competes with classes 1..K-1. This is what the official code does
    and is the default. ``fixed=True`` lets all channels 0..C-1 (all foreground classes and the
    background) compete.

    Args:
        x: ``(N, C, H, W)`` maps; pass a detached tensor (the result is used as a target).

    Returns:
        New tensor of the same shape (the input is not modified).
    """
    start = 0 if fixed else 1
    compete = x[:, start:]  # (N, C - start, H, W)
    top = compete.max(dim=1, keepdim=True).values
    kept = torch.where(compete == top, compete, torch.zeros_like(compete))
    return torch.cat([x[:, :start], kept], dim=1)


def ecr_topk_k(channels: int, h: int, w: int, fraction: float = 0.2) -> int:
    """SEAM's ECR count of hardest errors per image: ``int(C * h * w * fraction)`` (C = K + 1)."""
    return int(channels * h * w * fraction)


class ERECRTerms(NamedTuple):
    """Result of :func:`er_ecr_terms`."""

    loss_er: Tensor  # 0-dim equivariant regularisation
    loss_ecr: Tensor  # 0-dim, ecr_term_1 + ecr_term_2
    ecr_term_1: Tensor  # 0-dim, top-k mean of |T(A2) - R1|
    ecr_term_2: Tensor  # 0-dim, top-k mean of |T(A1) - R2|
    ecr_topk_k: int  # k of the top-k


def _with_background(a: Tensor) -> Tensor:
    """Replace the last (background) channel of ``(N, K+1, h, w)`` by ``1 - max_c a[:, c]`` over c < K."""
    fg = a[:, :-1]
    return torch.cat([fg, 1 - fg.max(dim=1, keepdim=True).values], dim=1)


def er_ecr_terms(
    cam1: Tensor,
    cam2: Tensor,
    cam_rv1: Tensor,
    cam_rv2: Tensor,
    label21: Tensor,
    *,
    topk_fraction: float = 0.2,
    fixed_max_onehot: bool = False,
) -> ERECRTerms:
    """SEAM's equivariant regularisation (ER) and equivariant cross regularisation (ECR), algorithm.md 3.4.

    With ``(hs, ws)`` the size of ``cam2`` and ``rs`` = bilinear resize to it (align_corners=True):

    1. ``A1 = rs(max_norm(cam1)) * label21``, ``A2 = max_norm(cam2) * label21``;
       ``loss_er = mean |A1[:, :K] - A2[:, :K]|`` (gradient to both views).
    2. On detached copies, the background channel becomes ``1 - max_{c<K} A``; targets
       ``T(A) = max_onehot(A, fixed=fixed_max_onehot)`` (SEAM's background-first quirk by default).
    3. ``R1 = rs(max_norm(cam_rv1)) * label21``, ``R2 = max_norm(cam_rv2) * label21``.
    4. ``E1 = |T(A2) - R1|``, ``E2 = |T(A1) - R2|``; ``k = int(C * hs * ws * topk_fraction)``;
       ``ecr_term_v = mean over N x k of the k largest entries of E_v per image``;
       ``loss_ecr = ecr_term_1 + ecr_term_2`` (summed, not averaged). Its gradient reaches only the PCM
       maps ``cam_rv1``/``cam_rv2``; the targets are detached.

    Args:
        cam1: ``(N, K + 1, h1, w1)`` CAM logits of view 1, background last.
        cam2: ``(N, K + 1, hs, ws)`` CAM logits of view 2.
        cam_rv1: ``(N, K + 1, h1, w1)`` PCM output of view 1.
        cam_rv2: ``(N, K + 1, hs, ws)`` PCM output of view 2.
        label21: ``(N, K + 1, 1, 1)`` labels with a 1 in the background channel.
        topk_fraction: fraction of the ``C * hs * ws`` errors per image that ECR averages.
        fixed_max_onehot: let every channel compete in the target (not the official behaviour).

    Returns:
        :class:`ERECRTerms` ``(loss_er, loss_ecr, ecr_term_1, ecr_term_2, ecr_topk_k)``.
    """
    n, c, hs, ws = cam2.shape
    label = label21.reshape(n, c, 1, 1)
    size = (hs, ws)

    a1 = F.interpolate(max_norm(cam1), size=size, mode="bilinear", align_corners=True) * label
    a2 = max_norm(cam2) * label  # (N, C, hs, ws)
    loss_er = torch.mean(torch.abs(a1[:, :-1] - a2[:, :-1]))

    with torch.no_grad():
        t1 = max_onehot(_with_background(a1.detach()), fixed=fixed_max_onehot)
        t2 = max_onehot(_with_background(a2.detach()), fixed=fixed_max_onehot)

    r1 = F.interpolate(max_norm(cam_rv1), size=size, mode="bilinear", align_corners=True) * label
    r2 = max_norm(cam_rv2) * label
    err1 = torch.abs(t2 - r1).reshape(n, c * hs * ws)  # (N, C*hs*ws)
    err2 = torch.abs(t1 - r2).reshape(n, c * hs * ws)

    k = ecr_topk_k(c, hs, ws, topk_fraction)
    if k < 1:
        raise ValueError(f"ECR top-k is empty for C={c}, {hs}x{ws}, fraction {topk_fraction}")
    term1 = torch.mean(torch.topk(err1, k, dim=-1).values)
    term2 = torch.mean(torch.topk(err2, k, dim=-1).values)
    return ERECRTerms(loss_er, term1 + term2, term1, term2, k)
