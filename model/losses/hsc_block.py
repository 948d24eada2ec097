"""The HSC loss block: pre-processing, training CRF, then RSC + CSC + PSC (docs/algorithm.md 3.5-3.9).

One call per training step (the official ``get_hsc_loss``)::

    out = hsc_loss(cam_rv1, cam_rv2, pix1, emb1, pix2, emb2, img2, labels, banks, cfg)
    loss = ... + out.total          # = out.loss_rsc + out.loss_csc + out.loss_psc, gamma included

Pre-processing (3.5), with ``K`` foreground classes and the background channel last (``K``):

1. The HSC grid is the view-2 image size ``// 8`` (16x16 for the official 128x128 view). View-1 maps
   (CAM, both embeddings) are resized to it with bilinear / ``align_corners=True`` (gradients flow
   through the resize); view-2 maps are expected at the grid already (resized the same way if not).
2. CAMs, without gradient: ``c = relu(cam)``; per (image, channel) ``mx = max c``, ``mn = min c``; entries
   with ``c < mn + 1e-5`` are set to 0; ``c~ = (c - mn - 1e-5) / (mx - mn + 1e-5)`` with **no final ReLU**
   (so zeroed entries become slightly negative and an all-zero channel becomes -1); then the background
   channel is set to the constant ``bg_score`` (0.10).
3. Pseudo-labels ``P_v = argmax softmax(c~_v * label21)`` (first maximum wins).
4. CRF image: the normalised view-2 image resized (CPU, bilinear / ``align_corners=True``) to the grid,
   de-normalised ``x * (255 std) + 255 mean`` (float32 constants) and **truncated** to uint8. Both views
   are refined on this one image: :func:`hsc.model.crf.crf_refine_labels` (label unary ``gt_prob`` 0.7,
   Gaussian 3/3, bilateral 50/5/10, 10 iterations), one call per image and view.
5. RSC on the ROI embeddings with the (CRF) labels, CSC on the ROI embeddings with the normalised CAMs,
   PSC on the pixel embeddings with the normalised CAMs and the (CRF) labels
   (:mod:`hsc.model.losses.contrast`). The banks are then written back into the
   :class:`~hsc.model.prototypes.MomentumBanks` in place.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import IMAGENET_MEAN, IMAGENET_STD
from ..crf import TRAINING_CRF, CRFParams, crf_refine_labels
from ..prototypes import MomentumBanks
from .contrast import CSCOutput, PSCOutput, RSCOutput, csc_loss, psc_loss, rsc_loss

__all__ = [
    "HSCLoss",
    "HSCLossConfig",
    "HSCLossOutput",
    "crf_images",
    "hsc_grid",
    "hsc_loss",
    "hsc_pseudo_labels",
    "normalize_cam",
    "refine_labels_crf",
]


@dataclass(frozen=True)
class HSCLossConfig:
    """Settings of the HSC loss block. Defaults are the released code's; every row of the paper's
    Table 4 is one configuration (:meth:`table4`).

    Components (Table 4 columns):
        use_rsc: ROI-level semantic contrast (RSC).
        use_csc: class-level semantic contrast (CSC).
        use_psc: pixel-level semantic contrast (PSC).
        cross_supervision: "CS". Off: RSC drops its cross-view terms; CSC drops the mutual terms (the
            other view's bank) and averages the own terms (``/2`` instead of ``/4``); PSC drops the
            cross-view and cross-CAM terms.
        momentum_psc: "MPL", the PSC momentum-bank term. Off: the PSC banks are neither used nor updated.
        crf_psc: "CRF dagger", PSC uses the CRF-refined pseudo-labels (else the raw argmax labels).
        crf_all: "CRF", every label consumer (RSC and PSC) uses the CRF-refined labels; implies crf_psc.
            The CRF runs only when some enabled loss uses its labels.

    Hyper-parameters:
        gamma: weight of each of the three losses (0.1; the official code folds the paper's gamma
            into each loss rather than weighting their sum - the same value).
        bg_score: constant score of the background channel of the normalised CAM (official 0.10).
        tau: InfoNCE temperature of CSC and PSC (0.1).
        bank_momentum: weight of the **new** value in every bank update (official 0.5; the paper's
            lambda = 0.9 is the option).
        csc_topk / csc_update_topk: batch-wide positions per class for the CSC representation (128)
            and for its bank update (16, the paper's k_c in count).
        psc_topk: positions per channel for the PSC prototypes; None = grid ``H*W // 16`` (official,
            16 on 16x16); the paper's k_p = 32 is the option.
        rsc_norm_axis: axis of the L2 normalisation of the RSC embeddings before pooling: "width"
            (official quirk) or "channel" (the evident intent).
        rsc_pull_terms: keep the two L1 pull terms of RSC towards its momentum bg/ROI prototypes
            (official). False = the paper's eq. (5), pushing only (the RSC banks are then not updated).
        grid_stride: the HSC grid is the view-2 image size ``// grid_stride`` (8, the network's stride).
        crf_gt_prob / crf_params: label unary confidence (0.7) and pairwise settings of the training CRF.
        image_mean / image_std: the input normalisation, undone to build the CRF image.
    """

    use_rsc: bool = True
    use_csc: bool = True
    use_psc: bool = True
    cross_supervision: bool = True
    momentum_psc: bool = True
    crf_psc: bool = True
    crf_all: bool = True
    gamma: float = 0.1
    bg_score: float = 0.10
    tau: float = 0.1
    bank_momentum: float = 0.5
    csc_topk: int = 128
    csc_update_topk: int = 16
    psc_topk: int | None = None
    rsc_norm_axis: Literal["width", "channel"] = "width"
    rsc_pull_terms: bool = True
    grid_stride: int = 8
    crf_gt_prob: float = 0.7
    crf_params: CRFParams = field(default=TRAINING_CRF)
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.rsc_norm_axis not in ("width", "channel"):
            raise ValueError(f"rsc_norm_axis must be 'width' or 'channel', got {self.rsc_norm_axis!r}")
        if not 0.0 <= self.bank_momentum <= 1.0:
            raise ValueError(f"bank_momentum must be in [0, 1], got {self.bank_momentum}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.csc_topk < 1 or not 1 <= self.csc_update_topk <= self.csc_topk:
            raise ValueError(
                f"need 1 <= csc_update_topk <= csc_topk, got {self.csc_update_topk}, {self.csc_topk}"
            )
        if self.psc_topk is not None and self.psc_topk < 1:
            raise ValueError(f"psc_topk must be None or >= 1, got {self.psc_topk}")
        if self.grid_stride < 1:
            raise ValueError(f"grid_stride must be >= 1, got {self.grid_stride}")
        if not 0.0 < self.crf_gt_prob < 1.0:
            raise ValueError(f"crf_gt_prob must be in (0, 1), got {self.crf_gt_prob}")

    @property
    def psc_uses_crf(self) -> bool:
        return self.crf_psc or self.crf_all

    @property
    def rsc_uses_crf(self) -> bool:
        return self.crf_all

    @classmethod
    def table4(cls, row: int, **overrides: Any) -> HSCLossConfig:
        """The configuration of row ``row`` (1..8, top to bottom) of the paper's Table 4.

        1 baseline (no HSC) · 2 PSC+CS · 3 PSC+CSC+CS · 4 PSC+CSC+RSC+CS · 5 PSC+CSC+RSC (no CS) ·
        6 row 4 + MPL · 7 row 6 + CRF dagger · 8 row 6 + CRF everywhere (= the released code's defaults).
        """
        off = dict(momentum_psc=False, crf_psc=False, crf_all=False)
        rows: dict[int, dict[str, Any]] = {
            1: dict(use_rsc=False, use_csc=False, use_psc=False, cross_supervision=False, **off),
            2: dict(use_rsc=False, use_csc=False, **off),
            3: dict(use_rsc=False, **off),
            4: dict(**off),
            5: dict(cross_supervision=False, **off),
            6: dict(crf_psc=False, crf_all=False),
            7: dict(crf_all=False),
            8: dict(),
        }
        if row not in rows:
            raise ValueError(f"Table 4 has rows 1..8, got {row}")
        return replace(cls(**rows[row]), **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HSCLossConfig:
        known = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in known}
        if isinstance(kw.get("crf_params"), dict):
            kw["crf_params"] = CRFParams(**kw["crf_params"])
        for k in ("image_mean", "image_std"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)


class HSCLossOutput(NamedTuple):
    """Result of :func:`hsc_loss`. Losses are gamma-scaled 0-dim tensors (zero when disabled)."""

    loss_rsc: Tensor
    loss_csc: Tensor
    loss_psc: Tensor
    total: Tensor
    norm_cam1: Tensor  # (N, K+1, h, w) normalised CAMs on the grid (no grad)
    norm_cam2: Tensor
    pseudo_labels1: Tensor  # (N, h, w) int64 argmax labels before the CRF (K = background)
    pseudo_labels2: Tensor
    crf_labels1: Tensor | None  # (N, h, w) int64 after the CRF; None if the CRF did not run
    crf_labels2: Tensor | None
    crf_image: np.ndarray | None  # (N, h, w, 3) uint8 CRF image (both views); None if unused
    rsc: RSCOutput | None
    csc: CSCOutput | None
    psc: PSCOutput | None


# ------------------------------------------------------------------------------------------------
# pre-processing


def hsc_grid(img2: Tensor, stride: int = 8) -> tuple[int, int]:
    """The HSC grid: the view-2 image size ``// stride`` (16x16 for 128x128)."""
    h, w = int(img2.shape[-2]) // stride, int(img2.shape[-1]) // stride
    if h < 1 or w < 1:
        raise ValueError(f"view-2 image {tuple(img2.shape[-2:])} is smaller than the stride {stride}")
    return h, w


def _to_grid(x: Tensor, grid: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == grid:
        return x
    return F.interpolate(x, size=grid, mode="bilinear", align_corners=True)


@torch.no_grad()
def normalize_cam(cam: Tensor, bg_score: float = 0.10) -> Tensor:
    """Min-max normalisation of the HSC block, without final ReLU, background channel = ``bg_score``.

    Args:
        cam: ``(N, K+1, H, W)`` CAM (background last).

    Returns:
        ``(N, K+1, H, W)`` tensor, no gradient (see the module docstring, step 2).
    """
    c = F.relu(cam.detach())
    mx = c.amax(dim=(2, 3), keepdim=True)
    mn = c.amin(dim=(2, 3), keepdim=True)
    c = torch.where(c < mn + 1e-5, torch.zeros_like(c), c)
    out = (c - mn - 1e-5) / (mx - mn + 1e-5)
    out[:, -1] = bg_score
    return out


@torch.no_grad()
def hsc_pseudo_labels(norm_cam: Tensor, labels: Tensor) -> Tensor:
    """``argmax_k softmax(norm_cam * label21)`` -> ``(N, H, W)`` int64 (``K`` = background)."""
    n = labels.shape[0]
    label21 = torch.cat([labels, labels.new_ones(n, 1)], dim=1).to(norm_cam.dtype)[:, :, None, None]
    return torch.softmax(norm_cam * label21, dim=1).argmax(dim=1)


@torch.no_grad()
def crf_images(
    img2: Tensor,
    grid: tuple[int, int],
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> np.ndarray:
    """The CRF image: normalised view-2 image resized to ``grid`` on the CPU, de-normalised, truncated.

    Args:
        img2: ``(N, 3, H, W)`` normalised view-2 image.

    Returns:
        ``(N, h, w, 3)`` C-contiguous uint8 (values clipped to [0, 255] first: a no-op for real images).
    """
    x = img2.detach().to("cpu", torch.float32)
    x = F.interpolate(x, size=grid, mode="bilinear", align_corners=True)
    std255 = torch.tensor([s * 255 for s in std], dtype=torch.float32).view(1, 3, 1, 1)
    mean255 = torch.tensor([m * 255 for m in mean], dtype=torch.float32).view(1, 3, 1, 1)
    x = x * std255 + mean255
    arr = x.permute(0, 2, 3, 1).numpy()  # (N, h, w, 3)
    return np.ascontiguousarray(np.clip(arr, 0.0, 255.0).astype(np.uint8))


def refine_labels_crf(
    images: np.ndarray,
    labels: Tensor,
    n_labels: int,
    *,
    gt_prob: float = 0.7,
    params: CRFParams = TRAINING_CRF,
) -> Tensor:
    """Training CRF of every image of a batch: ``(N, h, w, 3)`` uint8 + ``(N, h, w)`` labels -> labels.

    The result is int64 on the device of ``labels``.
    """
    lab = labels.detach().cpu().numpy()
    out = np.stack(
        [
            crf_refine_labels(
                np.ascontiguousarray(images[i]), lab[i], n_labels, gt_prob=gt_prob, params=params
            )
            for i in range(lab.shape[0])
        ]
    )
    return torch.from_numpy(out).to(labels.device)


# ------------------------------------------------------------------------------------------------
# the block


def hsc_loss(
    cam1: Tensor,
    cam2: Tensor,
    pix1: Tensor,
    emb1: Tensor,
    pix2: Tensor,
    emb2: Tensor,
    img2: Tensor,
    labels: Tensor,
    banks: MomentumBanks,
    cfg: HSCLossConfig | None = None,
) -> HSCLossOutput:
    """The HSC loss block of one training step; updates ``banks`` in place (no grad).

    Args:
        cam1, cam2: ``(N, K+1, h_v, w_v)`` CAMs of the two views (the PCM output ``cam_rv``), background last.
        pix1, pix2: ``(N, Dp, h_v, w_v)`` pixel embeddings (``F_proj2``, 128-d).
        emb1, emb2: ``(N, Dr, h_v, w_v)`` ROI/class embeddings (``F_proj1``, 256-d).
        img2: ``(N, 3, H2, W2)`` normalised view-2 image; the grid is ``(H2 // 8, W2 // 8)``.
        labels: ``(N, K)`` multi-hot image labels.
        banks: the six momentum banks (``num_classes = K``), updated in place after the losses.
        cfg: :class:`HSCLossConfig` (default: the released code).

    Returns:
        :class:`HSCLossOutput`; gradients reach ``pix*`` and ``emb*`` only.
    """
    cfg = cfg or HSCLossConfig()
    n, c = cam1.shape[:2]
    k_fg = c - 1
    if labels.shape != (n, k_fg):
        raise ValueError(
            f"labels must be (N, K) = {(n, k_fg)} for a CAM of {c} channels, got {tuple(labels.shape)}"
        )
    if cam2.shape[:2] != (n, c):
        raise ValueError(f"cam2 {tuple(cam2.shape)} does not match cam1 {tuple(cam1.shape)}")
    if banks.num_classes != k_fg:
        raise ValueError(f"banks hold {banks.num_classes} classes, the CAM has {k_fg}")
    if img2.dim() != 4 or img2.shape[:2] != (n, 3):
        raise ValueError(f"img2 must be (N, 3, H, W) with N = {n}, got {tuple(img2.shape)}")
    grid = hsc_grid(img2, cfg.grid_stride)

    cam1, cam2 = _to_grid(cam1, grid), _to_grid(cam2, grid)
    pix1, pix2 = _to_grid(pix1, grid), _to_grid(pix2, grid)
    emb1, emb2 = _to_grid(emb1, grid), _to_grid(emb2, grid)
    norm1, norm2 = normalize_cam(cam1, cfg.bg_score), normalize_cam(cam2, cfg.bg_score)
    plab1, plab2 = hsc_pseudo_labels(norm1, labels), hsc_pseudo_labels(norm2, labels)

    need_crf = (cfg.use_rsc and cfg.rsc_uses_crf) or (cfg.use_psc and cfg.psc_uses_crf)
    crf_img: np.ndarray | None = None
    crf1: Tensor | None = None
    crf2: Tensor | None = None
    if need_crf:
        crf_img = crf_images(img2, grid, cfg.image_mean, cfg.image_std)
        crf1 = refine_labels_crf(crf_img, plab1, c, gt_prob=cfg.crf_gt_prob, params=cfg.crf_params)
        crf2 = refine_labels_crf(crf_img, plab2, c, gt_prob=cfg.crf_gt_prob, params=cfg.crf_params)

    zero = emb1.new_zeros(())
    rsc = csc = psc = None
    if cfg.use_rsc:
        l1, l2 = (crf1, crf2) if cfg.rsc_uses_crf else (plab1, plab2)
        assert l1 is not None and l2 is not None
        rsc = rsc_loss(
            emb1,
            emb2,
            l1,
            l2,
            banks.roi_v1,
            banks.roi_v2,
            bg_label=k_fg,
            gamma=cfg.gamma,
            momentum=cfg.bank_momentum,
            cross_supervision=cfg.cross_supervision,
            pull_terms=cfg.rsc_pull_terms,
            norm_axis=cfg.rsc_norm_axis,
        )
        if cfg.rsc_pull_terms:
            banks.assign_(roi_v1=rsc.bank1, roi_v2=rsc.bank2)
    if cfg.use_csc:
        csc = csc_loss(
            emb1,
            norm1,
            emb2,
            norm2,
            labels,
            banks.class_v1,
            banks.class_v2,
            gamma=cfg.gamma,
            tau=cfg.tau,
            momentum=cfg.bank_momentum,
            topk=cfg.csc_topk,
            update_topk=cfg.csc_update_topk,
            cross_supervision=cfg.cross_supervision,
        )
        banks.assign_(class_v1=csc.bank1, class_v2=csc.bank2)
    if cfg.use_psc:
        l1, l2 = (crf1, crf2) if cfg.psc_uses_crf else (plab1, plab2)
        assert l1 is not None and l2 is not None
        psc = psc_loss(
            norm1,
            pix1,
            norm2,
            pix2,
            l1,
            l2,
            banks.pixel_v1,
            banks.pixel_v2,
            gamma=cfg.gamma,
            tau=cfg.tau,
            momentum=cfg.bank_momentum,
            topk=cfg.psc_topk,
            cross_supervision=cfg.cross_supervision,
            use_memory=cfg.momentum_psc,
        )
        if cfg.momentum_psc:
            banks.assign_(pixel_v1=psc.bank1, pixel_v2=psc.bank2)

    loss_rsc = rsc.loss if rsc is not None else zero
    loss_csc = csc.loss if csc is not None else zero
    loss_psc = psc.loss if psc is not None else zero
    return HSCLossOutput(
        loss_rsc,
        loss_csc,
        loss_psc,
        loss_rsc + loss_csc + loss_psc,
        norm1,
        norm2,
        plab1,
        plab2,
        crf1,
        crf2,
        crf_img,
        rsc,
        csc,
        psc,
    )


class HSCLoss(nn.Module):
    """The HSC loss block as a module owning its :class:`MomentumBanks` (saved in ``state_dict``).

    Args:
        num_classes: ``K`` foreground classes.
        cfg: :class:`HSCLossConfig`.
        roi_dim / pixel_dim: embedding sizes (256 / 128).
        generator: optional generator for the initial ``randn`` banks.
        sync_banks: after every call, broadcast the banks from rank 0 when torch.distributed is
            initialised, so all DDP ranks keep identical banks (a no-op otherwise).
    """

    def __init__(
        self,
        num_classes: int,
        cfg: HSCLossConfig | None = None,
        *,
        roi_dim: int = 256,
        pixel_dim: int = 128,
        generator: torch.Generator | None = None,
        sync_banks: bool = True,
    ) -> None:
        super().__init__()
        self.cfg = cfg or HSCLossConfig()
        self.sync_banks = sync_banks
        self.banks = MomentumBanks(num_classes, roi_dim=roi_dim, pixel_dim=pixel_dim, generator=generator)

    def forward(
        self,
        cam1: Tensor,
        cam2: Tensor,
        pix1: Tensor,
        emb1: Tensor,
        pix2: Tensor,
        emb2: Tensor,
        img2: Tensor,
        labels: Tensor,
    ) -> HSCLossOutput:
        out = hsc_loss(cam1, cam2, pix1, emb1, pix2, emb2, img2, labels, self.banks, self.cfg)
        if self.sync_banks:
            self.banks.broadcast_(0)
        return out
