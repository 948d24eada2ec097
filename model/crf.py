"""Dense CRF (pydensecrf) with the three settings of the official code (docs/algorithm.md 3.5, 5.4, 5.5).

* :data:`TRAINING_CRF` - HSC training pseudo-labels: label unary (``gt_prob`` 0.7), Gaussian sxy 3 /
  compat 3, bilateral sxy 50 / srgb 5 / compat 10, 10 iterations (:func:`crf_refine_labels`).
* :data:`INFERENCE_CRF` - step-1 CAM inference: unary ``-ln clip(p, 1e-5, 1)``, Gaussian 3 / 3,
  bilateral 80 / 13 / 10, ``crf_t`` iterations (README: 8) (:func:`crf_inference`).
* :data:`DEEPLAB_TEST_CRF` - step-2 DeepLab test time: same unary on the softmax, Gaussian 1 / 3,
  bilateral 67 / 3 / 4, 10 iterations (:func:`crf_inference` with ``params=DEEPLAB_TEST_CRF``).

All use pydensecrf's defaults otherwise (diagonal kernels, symmetric normalisation, Potts model).
Images are HWC ``uint8`` RGB (made C-contiguous for pydensecrf), of the same height/width as
the labels/probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax

__all__ = [
    "CRFParams",
    "DEEPLAB_TEST_CRF",
    "INFERENCE_CRF",
    "TRAINING_CRF",
    "crf_inference",
    "crf_refine_labels",
]


@dataclass(frozen=True)
class CRFParams:
    """Pairwise terms and iteration count of a dense CRF.

    Args:
        gaussian_sxy: spatial std of the smoothness (Gaussian) kernel, in pixels.
        gaussian_compat: Potts weight of the Gaussian kernel.
        bilateral_sxy: spatial std of the appearance (bilateral) kernel, in pixels.
        bilateral_srgb: colour std of the bilateral kernel, in uint8 RGB units.
        bilateral_compat: Potts weight of the bilateral kernel.
        iterations: mean-field iterations.
    """

    gaussian_sxy: float
    gaussian_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float
    iterations: int

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


#: HSC training CRF on the 16x16 pseudo-labels (``crf_inference_label``).
TRAINING_CRF = CRFParams(3, 3, 50, 5, 10, iterations=10)
#: step-1 inference CRF on the CAMs (``crf_inference``); README ``crf_t`` = 8 iterations.
INFERENCE_CRF = CRFParams(3, 3, 80, 13, 10, iterations=8)
#: step-2 DeepLab test CRF (``dense_crf_from_deeplabv2``).
DEEPLAB_TEST_CRF = CRFParams(1, 3, 67, 3, 4, iterations=10)


def check_rgb_image(img: Any) -> np.ndarray:
    """Return ``img`` as a writeable C-contiguous ``(H, W, 3)`` uint8 RGB array (a copy only if it was
    not), or raise ``TypeError`` (not a numpy array) / ``ValueError`` (wrong dtype or shape)."""
    if not isinstance(img, np.ndarray):
        raise TypeError(f"image must be a numpy array (H, W, 3) uint8 RGB, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3) RGB, got dtype {img.dtype}")
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be HWC RGB with 3 channels, got shape {tuple(img.shape)}")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"image is empty: shape {tuple(img.shape)}")
    # pydensecrf needs a writeable C-contiguous buffer (PIL's np.asarray views are read-only)
    return np.require(img, requirements=["C_CONTIGUOUS", "WRITEABLE"])


def _run(img: np.ndarray, unary: np.ndarray, n_labels: int, params: CRFParams, iters: int) -> np.ndarray:
    h, w = img.shape[:2]
    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    d.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    d.addPairwiseBilateral(
        sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=img, compat=params.bilateral_compat
    )
    q = d.inference(iters)
    return np.asarray(q, dtype=np.float32).reshape(n_labels, h, w)


def crf_refine_labels(
    img: np.ndarray,
    labels: np.ndarray,
    n_labels: int,
    *,
    gt_prob: float = 0.7,
    params: CRFParams = TRAINING_CRF,
    iters: int | None = None,
) -> np.ndarray:
    """Refine a label map with a dense CRF whose unary comes from the labels (training CRF, 3.5).

    Unary: ``-ln gt_prob`` for the given label, ``-ln((1 - gt_prob) / (n_labels - 1))`` for the others
    (pydensecrf ``unary_from_labels`` with ``zero_unsure=False``: label 0 is an ordinary label).

    Args:
        img: ``(H, W, 3)`` uint8 RGB image.
        labels: ``(H, W)`` integer label map with values in ``[0, n_labels)``.
        n_labels: number of labels of the CRF (HSC: ``K + 1`` channels, background last).
        gt_prob: confidence of the given labels, in (0, 1).
        params: pairwise settings (default :data:`TRAINING_CRF`).
        iters: iterations; ``None`` uses ``params.iterations``.

    Returns:
        ``(H, W)`` int64 argmax of the CRF marginals (first maximum wins).
    """
    img = check_rgb_image(img)
    labels = np.asarray(labels)
    if labels.shape != img.shape[:2]:
        raise ValueError(f"labels shape {labels.shape} != image size {img.shape[:2]}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    if n_labels < 2:
        raise ValueError(f"n_labels must be >= 2, got {n_labels}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(f"labels must lie in [0, {n_labels}), got [{labels.min()}, {labels.max()}]")
    if not 0.0 < gt_prob < 1.0:
        raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob}")
    unary = unary_from_labels(labels.astype(np.int64), n_labels, gt_prob=gt_prob, zero_unsure=False)
    q = _run(img, unary, n_labels, params, params.iterations if iters is None else iters)
    return np.argmax(q, axis=0).astype(np.int64)


def crf_inference(
    img: np.ndarray,
    probs: np.ndarray,
    iters: int | None = None,
    *,
    params: CRFParams = INFERENCE_CRF,
) -> np.ndarray:
    """Dense CRF on a score map; returns the marginals Q (step-1 inference CRF, 5.4; step 2, 7.5).

    Unary ``-ln(clip(p, 1e-5, 1))`` (pydensecrf ``unary_from_softmax``); the scores need not sum to 1
    (step 1 passes ``[(1 - max)^alpha, CAMs]``).

    Args:
        img: ``(H, W, 3)`` uint8 RGB image.
        probs: ``(L, H, W)`` float scores, ``L >= 2``.
        iters: mean-field iterations (the official ``crf_t``); ``None`` uses ``params.iterations``.
        params: :data:`INFERENCE_CRF` (default) or :data:`DEEPLAB_TEST_CRF`.

    Returns:
        ``(L, H, W)`` float32 Q, a distribution over the ``L`` labels at every pixel.
    """
    img = check_rgb_image(img)
    probs = np.asarray(probs)
    if probs.ndim != 3 or probs.shape[1:] != img.shape[:2]:
        raise ValueError(f"probs must be (L, H, W) with (H, W) = {img.shape[:2]}, got {probs.shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise TypeError(f"probs must be floating point, got dtype {probs.dtype}")
    n_labels = probs.shape[0]
    if n_labels < 2:
        raise ValueError(f"probs needs at least 2 labels, got {n_labels}")
    unary = unary_from_softmax(probs)
    return _run(img, unary, n_labels, params, params.iterations if iters is None else iters)
