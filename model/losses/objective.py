"""The complete step-1 training objective: baseline losses + the HSC block (algorithm.md 3.0).

One call per training step, on a batch of the augmented, normalised view 1::

    objective = TrainingObjective(num_classes=K, cfg=ObjectiveConfig())   # owns the momentum banks
    terms = objective(net, img, saliency, labels)                         # dict of 0-dim tensors
    terms["loss"].backward()

What it computes (the released code; ``K`` foreground classes, background channel last):

* view 2 = bilinear (align_corners=True) resize of ``img`` (and of the saliency) to 128x128;
* both views through the network (``pred, cam, pred_rv, cam_rv, f_pixel, f_roi``);
* ``loss_cls`` = ½·(MLSM₁ + MLSM₂) + ½·(AMP((cam_rv₁⊙ŷ)[:K]) + AMP((cam_rv₂⊙ŷ)[:K]));
* ``loss_sal`` (EPS baseline only) = ½·(EPS(cam₁,S) + EPS(cam₂,S₂)) + ½·(EPS(cam_rv₁,S) + EPS(cam_rv₂,S₂));
* ``loss_er``, ``loss_ecr``: SEAM's equivariance terms;
* ``loss_rsc``, ``loss_csc``, ``loss_psc``: the HSC block on ``cam_rv`` (gamma included);
* ``loss`` = the sum of all of them. The paper's eq. (1) weights only the HSC terms with gamma,
  which is what the official code does too (gamma sits inside each HSC loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .baseline import adaptive_min_pooling_loss, eps_saliency_loss, er_ecr_terms, multilabel_soft_margin_loss
from .hsc_block import HSCLoss, HSCLossConfig

LOSS_NAMES = ("loss", "loss_cls", "loss_sal", "loss_er", "loss_ecr", "loss_rsc", "loss_csc", "loss_psc")


@dataclass(frozen=True)
class ObjectiveConfig:
    """What the training step optimises.

    baseline: ``"eps"`` (the released ``resnet38_eps_seam_hsc``: EPS saliency loss + SEAM's PCM, AMP, ER,
        ECR) or ``"seam"`` (the same without the saliency loss: no saliency maps needed; the paper's
        SEAM baseline, not released by the authors, so unverified against their numbers).
    hsc: the HSC block's settings, or ``None`` for the baseline alone.
    view2_size: side of the down-scaled second view (128).
    eps_tau, eps_alpha: EPS saliency loss (0.5, 0.5; EPS's own script used tau 0.4).
    ecr_topk_fraction: fraction of the largest ECR errors kept (0.2).
    fixed_max_onehot: use the corrected ECR target instead of SEAM's background-first quirk.
    """

    baseline: Literal["eps", "seam"] = "eps"
    hsc: HSCLossConfig | None = field(default_factory=HSCLossConfig)
    view2_size: int = 128
    eps_tau: float = 0.5
    eps_alpha: float = 0.5
    ecr_topk_fraction: float = 0.2
    fixed_max_onehot: bool = False

    def __post_init__(self) -> None:
        if self.baseline not in ("eps", "seam"):
            raise ValueError(f"baseline must be 'eps' or 'seam', got {self.baseline!r}")
        if self.view2_size < 8:
            raise ValueError("view2_size must be at least 8")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hsc"] = None if self.hsc is None else self.hsc.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ObjectiveConfig:
        d = dict(d)
        hsc = d.pop("hsc", {})
        known = set(cls.__dataclass_fields__)
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        return replace(cfg, hsc=None if hsc is None else HSCLossConfig.from_dict(hsc))


class TrainingObjective(nn.Module):
    """The step-1 objective; owns the HSC momentum banks (buffers, saved with ``state_dict``)."""

    def __init__(
        self,
        num_classes: int,
        cfg: ObjectiveConfig | None = None,
        *,
        roi_dim: int = 256,
        pixel_dim: int = 128,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg or ObjectiveConfig()
        self.num_classes = num_classes
        # The banks exist even for the baseline (they are cheap), so checkpoints have one layout.
        self.hsc = HSCLoss(
            num_classes,
            self.cfg.hsc or HSCLossConfig(),
            roi_dim=roi_dim,
            pixel_dim=pixel_dim,
            generator=generator,
        )

    def second_view(self, img: Tensor, saliency: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """View 2: bilinear (align_corners=True) resize of the image and the saliency to
        ``view2_size`` (pixel-aligned with view 1, algorithm.md 4.5)."""
        size = (self.cfg.view2_size, self.cfg.view2_size)
        img2 = F.interpolate(img, size, mode="bilinear", align_corners=True)
        sal2 = None
        if saliency is not None:
            sal2 = F.interpolate(saliency, size, mode="bilinear", align_corners=True)
        return img2, sal2

    def forward(
        self, net: nn.Module, img: Tensor, saliency: Tensor | None, labels: Tensor
    ) -> dict[str, Tensor]:
        """Loss terms of one step: second view, both forwards, then :meth:`losses`.

        Args:
            net: an :class:`~hsc.model.hsc_net.HSCNet` (or anything with the same training forward).
            img: (N, 3, H, W) normalised, augmented view 1.
            saliency: (N, 1, H, W) in [0, 1] (EPS baseline; ignored and may be None for SEAM).
            labels: (N, K) float multi-hot.

        Returns:
            dict with the keys of :data:`LOSS_NAMES`, each a 0-dim tensor; ``loss`` carries the graph.
        """
        img2, sal2 = self.second_view(img, saliency)
        return self.losses(net(img), net(img2), img2, saliency, sal2, labels)

    def losses(
        self,
        out1: Sequence[Tensor],
        out2: Sequence[Tensor],
        img2: Tensor,
        saliency: Tensor | None,
        sal2: Tensor | None,
        labels: Tensor,
    ) -> dict[str, Tensor]:
        """Loss terms from the two views' network outputs (``HSCOutput`` 6-tuples) and view 2's image
        and saliency (:meth:`second_view`); for training loops that run the views themselves (DDP)."""
        cfg = self.cfg
        n, k = labels.shape
        if k != self.num_classes:
            raise ValueError(f"labels have {k} classes, the objective was built for {self.num_classes}")
        pred1, cam1, _, cam_rv1, pix1, emb1 = out1
        pred2, cam2, _, cam_rv2, pix2, emb2 = out2
        label21 = torch.cat([labels, labels.new_ones(n, 1)], dim=1)[:, :, None, None]

        loss_cls = 0.5 * (
            multilabel_soft_margin_loss(pred1, labels) + multilabel_soft_margin_loss(pred2, labels)
        )
        loss_cls = loss_cls + 0.5 * (
            adaptive_min_pooling_loss((cam_rv1 * label21)[:, :k])
            + adaptive_min_pooling_loss((cam_rv2 * label21)[:, :k])
        )
        zero = cam1.new_zeros(())
        loss_sal = zero
        if cfg.baseline == "eps":
            if saliency is None or sal2 is None:
                raise ValueError("the EPS baseline needs saliency maps (use baseline='seam' without them)")
            kw = {"tau": cfg.eps_tau, "alpha": cfg.eps_alpha}
            loss_sal = 0.5 * (
                eps_saliency_loss(cam1, saliency, labels, **kw) + eps_saliency_loss(cam2, sal2, labels, **kw)
            ) + 0.5 * (
                eps_saliency_loss(cam_rv1, saliency, labels, **kw)
                + eps_saliency_loss(cam_rv2, sal2, labels, **kw)
            )
        eq = er_ecr_terms(
            cam1,
            cam2,
            cam_rv1,
            cam_rv2,
            label21,
            topk_fraction=cfg.ecr_topk_fraction,
            fixed_max_onehot=cfg.fixed_max_onehot,
        )
        loss_rsc = loss_csc = loss_psc = zero
        if cfg.hsc is not None:
            h = self.hsc(cam_rv1, cam_rv2, pix1, emb1, pix2, emb2, img2, labels)
            loss_rsc, loss_csc, loss_psc = h.loss_rsc, h.loss_csc, h.loss_psc
        loss = loss_cls + loss_sal + eq.loss_er + eq.loss_ecr + loss_rsc + loss_csc + loss_psc
        return {
            "loss": loss,
            "loss_cls": loss_cls,
            "loss_sal": loss_sal,
            "loss_er": eq.loss_er,
            "loss_ecr": eq.loss_ecr,
            "loss_rsc": loss_rsc,
            "loss_csc": loss_csc,
            "loss_psc": loss_psc,
        }
