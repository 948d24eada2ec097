"""``hsc eval``: score pseudo-label masks or CAMs against a dataset's ground truth.

Masks: mIoU, per-class IoU, precision, recall and the confusion matrix (the official ``eval.py``
counting: ignore label 255, mean over all classes, background included).
CAMs: the background-threshold sweep behind the paper's "Seed" column (t = 0.00 ... 0.59), the best
threshold and its full report, and the curve as a PNG plot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .cam_files import cam_dict
from .datasets import open_dataset
from .evaluate import DEFAULT_THRESHOLDS, ConfusionMatrix, EvalResult, ThresholdSweep, read_label_png


def _result_json(r: EvalResult) -> dict[str, Any]:
    names = list(r.class_names)
    return {
        "miou": float(r.miou),
        "iou": dict(zip(names, map(float, r.iou))),
        "precision": dict(zip(names, map(float, r.precision))),
        "recall": dict(zip(names, map(float, r.recall))),
        "class_names": names,
        "confusion": np.asarray(r.confusion).tolist(),
    }


def evaluate_predictions(
    data: str | Path,
    *,
    split: str | None = None,
    masks: str | Path | None = None,
    cams: str | Path | None = None,
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
) -> dict[str, Any]:
    """The report of ``hsc eval`` as a dict (top-level ``miou``; for CAMs also ``best_threshold``)."""
    if (masks is None) == (cams is None):
        raise ValueError("give exactly one of masks or cams")
    index = open_dataset(data, split=split, require_masks=True)
    names = ("background", *index.classes)
    n = len(names)
    pred_dir = Path(masks if masks is not None else cams)  # type: ignore[arg-type]
    suffix = ".png" if masks is not None else ".npz"
    missing = [it.id for it in index if not (pred_dir / f"{it.id}{suffix}").is_file()]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ValueError(f"{len(missing)} of {len(index)} images have no prediction in {pred_dir}: {shown}")
    report: dict[str, Any] = {"data": str(data), "split": index.split, "n_images": len(index)}
    if masks is not None:
        cm = ConfusionMatrix(n, class_names=names)
        for it in index:
            cm.update(read_label_png(it.mask), read_label_png(pred_dir / f"{it.id}.png"))  # type: ignore[arg-type]
        report.update({"mode": "masks", "predictions": str(pred_dir)}, **_result_json(cm.result()))
        return report
    sweep = ThresholdSweep(thresholds, num_classes=n, class_names=names)
    for it in index:
        sweep.update(read_label_png(it.mask), cam_dict(pred_dir / f"{it.id}.npz"))  # type: ignore[arg-type]
    s = sweep.result()
    report.update({"mode": "cams", "predictions": str(pred_dir)}, **_result_json(s.best))
    report["best_threshold"] = float(s.best_threshold)
    report["curve"] = [
        {"threshold": float(t), "miou": float(r.miou)} for t, r in zip(s.thresholds, s.results)
    ]
    return report


def plot_curve(report: dict[str, Any], path: Path) -> None:
    """The mIoU-vs-background-threshold curve of a CAM report as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [p["threshold"] for p in report["curve"]]
    ms = [p["miou"] for p in report["curve"]]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(ts, ms, marker=".", color="tab:blue")
    best_t, best_m = report["best_threshold"], report["miou"]
    ax.axvline(best_t, color="tab:red", linestyle="--", linewidth=1)
    ax.annotate(
        f"best t={best_t:.2f}\nmIoU={best_m:.2f}%",
        (best_t, best_m),
        textcoords="offset points",
        xytext=(8, -28),
        fontsize=9,
    )
    ax.set_xlabel("background threshold")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(f"CAM seeds: {report['n_images']} images ({report.get('split') or 'all'})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def run_eval(
    data: str, split: str | None, masks: str | None, cams: str | None, json_out: str, plot: str | None
) -> dict[str, Any]:
    report = evaluate_predictions(data, split=split, masks=masks, cams=cams)
    Path(json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(json_out).write_text(json.dumps(report, indent=2))
    if plot:
        if report["mode"] != "cams":
            raise ValueError("--plot draws the threshold curve: it needs --cams")
        plot_curve(report, Path(plot))
    return report
