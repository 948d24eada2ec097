"""mIoU evaluation of seeds, pseudo-labels and segmentations (docs/algorithm.md 6.2-6.5, 7.5).

Numpy only (no torch). Everything is in the VOC label space: ``0`` = background, ``c + 1`` = foreground
class ``c``, ``255`` = ignore (configurable).

Counting (6.3): valid pixels are those whose ground truth is not the ignore label; per class ``i`` the
counts ``TP_i``, ``P_i`` (predicted ``i``) and ``T_i`` (ground truth ``i``) are accumulated over all
images in int64; ``IoU_i = TP_i / (T_i + P_i - TP_i + 1e-10)`` and the mIoU is the mean over **all**
classes, background included (a class absent from both counts 0). Predictions outside ``0..n-1`` are
misses (they count in ``T`` of the true class, in no ``P``). IoU, precision, recall and mIoU are percent.

Prediction formats:

* label maps (PNG or arrays): used as they are (:func:`read_label_png`);
* CAM dicts ``{c: HxW}`` in **channel space** (the ``cam_npy`` files, 6.2): background score ``t`` at
  channel 0, class ``c`` at channel ``c + 1``, argmax with the first maximum winning, so background wins
  ties (:func:`cam_dict_to_label`);
* CRF dicts ``{label: HxW}`` already in **VOC space** (6.5): plain argmax (:func:`crf_dict_to_label`).

The threshold sweep (6.4) evaluates ``t = i/100, i = 0..59`` in one pass over the images
(:class:`ThresholdSweep`, :func:`threshold_sweep`) and returns the curve, the best ``t`` (the first
maximum) and its mIoU.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from hsc.core.datasets import read_label_png  # moved to core; re-exported here
from hsc.model.classes import IGNORE_INDEX, VOC_LABEL_NAMES

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(i / 100 for i in range(60))
"""The official sweep: t = 0.00 ... 0.59, step 0.01 (each value is exactly ``i / 100``)."""

EPS = 1e-10

CamDict = Mapping[int, ArrayLike]


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """VOC names for 21 classes, ``class_<i>`` otherwise."""
    if num_classes == len(VOC_LABEL_NAMES):
        return VOC_LABEL_NAMES
    return tuple(f"class_{i}" for i in range(num_classes))


# --------------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class EvalResult:
    """Scores of one evaluation; arrays are indexed by VOC label (``0..n-1``).

    Attributes:
      class_names: ``n`` names.
      confusion: ``(n, n)`` int64, rows = ground truth, columns = prediction (valid pixels whose
        prediction is in ``0..n-1``).
      missed: ``(n,)`` int64, valid pixels of each true class whose prediction was outside ``0..n-1``.
      iou, precision, recall: ``(n,)`` float64, percent.
      miou: mean IoU over all ``n`` classes, percent.
    """

    class_names: tuple[str, ...]
    confusion: NDArray[np.int64]
    missed: NDArray[np.int64]
    iou: NDArray[np.float64]
    precision: NDArray[np.float64]
    recall: NDArray[np.float64]
    miou: float

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def as_dict(self) -> dict[str, float]:
        """``{class name: IoU %, ..., "mIoU": mIoU %}`` (the official log's key/value pairs)."""
        out = {name: float(v) for name, v in zip(self.class_names, self.iou)}
        out["mIoU"] = self.miou
        return out


def scores_from_counts(
    confusion: NDArray[np.int64], missed: NDArray[np.int64], class_names: Sequence[str]
) -> EvalResult:
    """IoU / precision / recall / mIoU (percent) from accumulated counts (docs/algorithm.md 6.3)."""
    confusion = np.asarray(confusion, dtype=np.int64)
    missed = np.asarray(missed, dtype=np.int64)
    n = confusion.shape[0]
    if confusion.shape != (n, n) or missed.shape != (n,) or len(class_names) != n:
        raise ValueError("confusion must be (n, n), missed (n,), class_names n long")
    tp = np.diag(confusion).astype(np.float64)
    t = (confusion.sum(axis=1) + missed).astype(np.float64)  # pixels of each true class
    p = confusion.sum(axis=0).astype(np.float64)  # pixels predicted as each class
    iou = tp / (t + p - tp + EPS)
    return EvalResult(
        class_names=tuple(class_names),
        confusion=confusion,
        missed=missed,
        iou=iou * 100,
        precision=tp / (p + EPS) * 100,
        recall=tp / (t + EPS) * 100,
        miou=float(np.mean(iou)) * 100,
    )


@dataclass(frozen=True)
class SweepResult:
    """A background-threshold sweep: one :class:`EvalResult` per threshold, in the given order."""

    thresholds: tuple[float, ...]
    results: tuple[EvalResult, ...]

    @property
    def curve(self) -> tuple[float, ...]:
        """mIoU (percent) per threshold."""
        return tuple(r.miou for r in self.results)

    @property
    def best_index(self) -> int:
        """Index of the best mIoU (the first one on ties, as ``argmax`` of the official list)."""
        return int(np.argmax(np.asarray(self.curve)))

    @property
    def best_threshold(self) -> float:
        return self.thresholds[self.best_index]

    @property
    def best_miou(self) -> float:
        return self.curve[self.best_index]

    @property
    def best(self) -> EvalResult:
        return self.results[self.best_index]


# --------------------------------------------------------------------------------------------------
# accumulators


def _check_gt(gt: NDArray, ignore_index: int | None, num_classes: int) -> tuple[NDArray[np.bool_], NDArray]:
    if not (np.issubdtype(gt.dtype, np.integer) or gt.dtype == np.bool_):
        raise TypeError(f"ground truth must be an integer label map, got dtype {gt.dtype}")
    valid = np.ones(gt.shape, dtype=bool) if ignore_index is None else gt != ignore_index
    g = gt[valid].astype(np.int64)
    if g.size and (g.min() < 0 or g.max() >= num_classes):
        bad = sorted(set(np.unique(g[(g < 0) | (g >= num_classes)]).tolist()))
        raise ValueError(
            f"ground truth holds labels {bad} outside 0..{num_classes - 1} (ignore label {ignore_index})"
        )
    return valid, g


class ConfusionMatrix:
    """Accumulates a confusion matrix over images; ``result()`` gives IoU/precision/recall/mIoU.

    Arguments:
      num_classes: ``n`` (21 for VOC; background included).
      ignore_index: ground-truth value of ignored pixels (``None``: no pixel is ignored).
      class_names: ``n`` names (default: VOC names for 21 classes, ``class_<i>`` otherwise).
    """

    def __init__(
        self,
        num_classes: int = 21,
        *,
        ignore_index: int | None = IGNORE_INDEX,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = tuple(class_names) if class_names is not None else default_class_names(num_classes)
        self.reset()

    def reset(self) -> None:
        # Column n collects predictions outside 0..n-1 (misses).
        self._hist = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)

    def update(self, gt: ArrayLike, pred: ArrayLike) -> None:
        """Add one image: ``gt`` and ``pred`` are ``HxW`` integer label maps (VOC label space)."""
        gt_a = np.asarray(gt)
        pred_a = np.asarray(pred)
        if gt_a.shape != pred_a.shape:
            raise ValueError(f"prediction shape {pred_a.shape} != ground-truth shape {gt_a.shape}")
        if not (np.issubdtype(pred_a.dtype, np.integer) or pred_a.dtype == np.bool_):
            raise TypeError(f"prediction must be an integer label map, got dtype {pred_a.dtype}")
        n = self.num_classes
        valid, g = _check_gt(gt_a, self.ignore_index, n)
        p = pred_a[valid].astype(np.int64)
        p[(p < 0) | (p >= n)] = n
        self._hist += np.bincount(g * (n + 1) + p, minlength=n * (n + 1)).reshape(n, n + 1)

    def result(self) -> EvalResult:
        n = self.num_classes
        return scores_from_counts(self._hist[:, :n].copy(), self._hist[:, n].copy(), self.class_names)


def _foreground(
    cams: CamDict, num_fg: int, shape: tuple[int, ...] | None
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Max over the ``num_fg`` channel-space maps (absent ones are 0) and its label ``c + 1``.

    The first maximum wins, as in ``argmax`` over the official ``zeros(n, H, W)`` array.
    """
    arrays = {int(k): np.asarray(v) for k, v in cams.items()}
    for k, a in arrays.items():
        if not 0 <= k < num_fg:
            raise ValueError(f"CAM dict key {k} outside the channel space 0..{num_fg - 1}")
        if shape is None:
            shape = a.shape
        if a.shape != shape:
            raise ValueError(f"CAM of class {k} has shape {a.shape}, expected {shape}")
    if shape is None:
        raise ValueError("an empty CAM dict needs an explicit shape")
    dtype = np.result_type(np.float32, *arrays.values())
    stack = np.zeros((num_fg, *shape), dtype=dtype)
    for k, a in arrays.items():
        stack[k] = a
    label = stack.argmax(axis=0)  # first maximum
    fg_max = np.take_along_axis(stack, label[None], axis=0)[0].astype(np.float64)
    return fg_max, label.astype(np.int64) + 1


def _label_dtype(num_classes: int) -> type[np.integer]:
    return np.uint8 if num_classes <= 256 else np.int64


def cam_dict_to_label(
    cams: CamDict, threshold: float, *, num_classes: int = 21, shape: tuple[int, int] | None = None
) -> NDArray[np.integer]:
    """VOC label map from a channel-space CAM dict and a background score (docs/algorithm.md 5.3, 6.2).

    ``argmax`` over ``[t, cam_0, ..., cam_{K-1}]`` (``K = num_classes - 1``, absent classes are 0) with
    the first maximum winning: a pixel is class ``c + 1`` only if its score is *strictly* above ``t``.
    The comparison is done in float64, like the official float64 array. Returns ``HxW`` uint8.
    """
    fg_max, fg_label = _foreground(cams, num_classes - 1, shape)
    label = np.where(fg_max > float(threshold), fg_label, 0)
    return label.astype(_label_dtype(num_classes))


def crf_dict_to_label(
    probs: Mapping[int, ArrayLike], *, num_classes: int = 21, shape: tuple[int, int] | None = None
) -> NDArray[np.integer]:
    """VOC label map from a CRF dict whose keys are already VOC labels (docs/algorithm.md 6.5).

    ``argmax`` over ``zeros(num_classes, H, W)`` filled at the dict's keys (first maximum wins; absent
    labels are 0). Returns ``HxW`` uint8.
    """
    arrays = {int(k): np.asarray(v) for k, v in probs.items()}
    for k, a in arrays.items():
        if not 0 <= k < num_classes:
            raise ValueError(f"CRF dict key {k} outside the label space 0..{num_classes - 1}")
        shape = a.shape if shape is None else shape
        if a.shape != shape:
            raise ValueError(f"CRF map of label {k} has shape {a.shape}, expected {shape}")
    if shape is None:
        raise ValueError("an empty CRF dict needs an explicit shape")
    stack = np.zeros((num_classes, *shape), dtype=np.result_type(np.float32, *arrays.values()))
    for k, a in arrays.items():
        stack[k] = a
    return stack.argmax(axis=0).astype(_label_dtype(num_classes))


class ThresholdSweep:
    """Evaluates channel-space CAM dicts at many background thresholds in one pass.

    Per image the foreground maximum and its class are computed once; every valid pixel is then binned
    by how many thresholds lie strictly below its score (``searchsorted``), so all thresholds share a
    single ``bincount``. Exactly equivalent to thresholding and counting at each ``t`` separately.

    Arguments:
      thresholds: background scores, any order (default ``i/100`` for ``i`` in ``range(60)``).
      num_classes, ignore_index, class_names: as for :class:`ConfusionMatrix`.
    """

    def __init__(
        self,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        *,
        num_classes: int = 21,
        ignore_index: int | None = IGNORE_INDEX,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if len(thresholds) == 0:
            raise ValueError("at least one threshold is needed")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + classes), got {num_classes}")
        self.thresholds = tuple(float(t) for t in thresholds)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = ConfusionMatrix(num_classes, class_names=class_names).class_names
        self._order = np.argsort(np.asarray(self.thresholds, dtype=np.float64), kind="stable")
        self._sorted = np.asarray(self.thresholds, dtype=np.float64)[self._order]
        self.reset()

    def reset(self) -> None:
        m, n = len(self.thresholds), self.num_classes
        # counts[k, g, c]: valid pixels of true label g and foreground label c whose score is above
        # exactly k of the (sorted) thresholds.
        self._counts = np.zeros((m + 1, n, n), dtype=np.int64)

    def update(self, gt: ArrayLike, cams: CamDict) -> None:
        """Add one image: ``gt`` an ``HxW`` VOC label map, ``cams`` its channel-space CAM dict."""
        gt_a = np.asarray(gt)
        m, n = len(self.thresholds), self.num_classes
        valid, g = _check_gt(gt_a, self.ignore_index, n)
        fg_max, fg_label = _foreground(cams, n - 1, gt_a.shape)
        k = np.searchsorted(self._sorted, fg_max[valid], side="left")  # thresholds t < score
        idx = (k * n + g) * n + fg_label[valid]
        self._counts += np.bincount(idx, minlength=(m + 1) * n * n).reshape(m + 1, n, n)

    def result(self) -> SweepResult:
        n = self.num_classes
        suffix = np.cumsum(self._counts[::-1], axis=0)[::-1]  # suffix[k] = sum of counts[k:]
        per_gt = self._counts.sum(axis=(0, 2))
        missed = np.zeros(n, dtype=np.int64)
        sorted_results = []
        for j in range(len(self.thresholds)):
            conf = suffix[j + 1].copy()  # pixels whose score is above sorted threshold j: foreground
            conf[:, 0] += per_gt - conf.sum(axis=1)  # the others: background
            sorted_results.append(scores_from_counts(conf, missed, self.class_names))
        rank = np.empty(len(self.thresholds), dtype=np.int64)
        rank[self._order] = np.arange(len(self.thresholds))  # position of each threshold once sorted
        results = tuple(sorted_results[int(r)] for r in rank)
        return SweepResult(thresholds=self.thresholds, results=results)


# --------------------------------------------------------------------------------------------------
# convenience functions


def evaluate_labels(
    gts: Iterable[ArrayLike],
    preds: Iterable[ArrayLike],
    *,
    num_classes: int = 21,
    ignore_index: int | None = IGNORE_INDEX,
    class_names: Sequence[str] | None = None,
) -> EvalResult:
    """Evaluate label maps (png mode), paired in order."""
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, class_names=class_names)
    for gt, pred in zip(gts, preds, strict=True):
        cm.update(gt, pred)
    return cm.result()


def evaluate_cams(
    gts: Iterable[ArrayLike],
    cams: Iterable[CamDict],
    threshold: float,
    *,
    num_classes: int = 21,
    ignore_index: int | None = IGNORE_INDEX,
    class_names: Sequence[str] | None = None,
) -> EvalResult:
    """Evaluate channel-space CAM dicts at one background threshold (npy mode)."""
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, class_names=class_names)
    for gt, cam in zip(gts, cams, strict=True):
        cm.update(gt, cam_dict_to_label(cam, threshold, num_classes=num_classes, shape=np.shape(gt)))
    return cm.result()


def threshold_sweep(
    gts: Iterable[ArrayLike],
    cams: Iterable[CamDict],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    num_classes: int = 21,
    ignore_index: int | None = IGNORE_INDEX,
    class_names: Sequence[str] | None = None,
) -> SweepResult:
    """The ``--curve`` evaluation: mIoU at every background threshold, best threshold and its mIoU."""
    sweep = ThresholdSweep(
        thresholds, num_classes=num_classes, ignore_index=ignore_index, class_names=class_names
    )
    for gt, cam in zip(gts, cams, strict=True):
        sweep.update(gt, cam)
    return sweep.result()


# --------------------------------------------------------------------------------------------------
# files


def load_cam_npy(path: str | os.PathLike[str]) -> dict[int, NDArray]:
    """A ``cam_npy``/CRF ``.npy`` file: a pickled ``{int: HxW float}`` dict (trusted files only)."""
    obj = np.load(path, allow_pickle=True)
    d = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object else obj
    if not isinstance(d, Mapping):
        raise ValueError(f"{os.fspath(path)!r} does not hold a dict of score maps")
    return {int(k): np.asarray(v) for k, v in d.items()}


def evaluate_dir(
    ids: Iterable[str],
    gt_dir: str | os.PathLike[str],
    pred_dir: str | os.PathLike[str],
    *,
    kind: Literal["png", "npy", "crf"] = "png",
    threshold: float | None = None,
    num_classes: int = 21,
    ignore_index: int | None = IGNORE_INDEX,
    class_names: Sequence[str] | None = None,
) -> EvalResult:
    """Evaluate ``<pred_dir>/<id>.png|.npy`` against ``<gt_dir>/<id>.png`` (the official ``eval.py``).

    ``kind``: ``"png"`` label maps; ``"npy"`` channel-space CAM dicts at background score ``threshold``;
    ``"crf"`` VOC-space CRF dicts (argmax).
    """
    if kind == "npy" and threshold is None:
        raise ValueError("kind='npy' needs a background threshold")
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, class_names=class_names)
    for name in ids:
        gt = read_label_png(Path(gt_dir) / f"{name}.png")
        if kind == "png":
            pred = read_label_png(Path(pred_dir) / f"{name}.png")
        elif kind == "npy":
            assert threshold is not None
            d = load_cam_npy(Path(pred_dir) / f"{name}.npy")
            pred = cam_dict_to_label(d, threshold, num_classes=num_classes, shape=gt.shape)
        elif kind == "crf":
            d = load_cam_npy(Path(pred_dir) / f"{name}.npy")
            pred = crf_dict_to_label(d, num_classes=num_classes, shape=gt.shape)
        else:
            raise ValueError(f"kind must be 'png', 'npy' or 'crf', got {kind!r}")
        cm.update(gt, pred)
    return cm.result()


def sweep_dir(
    ids: Iterable[str],
    gt_dir: str | os.PathLike[str],
    cam_dir: str | os.PathLike[str],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    num_classes: int = 21,
    ignore_index: int | None = IGNORE_INDEX,
    class_names: Sequence[str] | None = None,
) -> SweepResult:
    """Threshold sweep over ``<cam_dir>/<id>.npy`` channel-space CAM dicts."""
    ids = list(ids)
    return threshold_sweep(
        (read_label_png(Path(gt_dir) / f"{name}.png") for name in ids),
        (load_cam_npy(Path(cam_dir) / f"{name}.npy") for name in ids),
        thresholds,
        num_classes=num_classes,
        ignore_index=ignore_index,
        class_names=class_names,
    )
