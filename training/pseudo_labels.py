"""``hsc infer``: pseudo-labels for a whole dataset, resumable, one bad image never stops the run.

    hsc infer --checkpoint CKPT --data DIR --out PRED [--split val] [--crf] [--bg-threshold T]
              [--device D] [--fast] [--no-heatmaps]

Writes, per image ``<id>`` of the list (see :mod:`hsc.training.cam_files` for the formats):

* ``PRED/masks/<id>.png``  the pseudo-label, VOC palette PNG (the CRF's when ``--crf``);
* ``PRED/cams/<id>.npz``   the CAMs of the labelled classes (``hsc eval --cams`` sweeps them);
* ``PRED/heatmaps/<id>/<class>.jpg``  a CAM overlay per labelled class (unless ``--no-heatmaps``);
* ``PRED/summary.json``    settings, counts, failures and timings of the run.

An image whose files all exist is skipped, so re-running finishes only what is missing. Every file
goes through a temporary name and a rename: an interrupted run leaves no half-written file.
"""

from __future__ import annotations

import io
import json
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hsc.core.encoders import label_to_png
from hsc.model.predictor import Predictor

from .cam_files import atomic_write_bytes, save_cams
from .datasets import DatasetIndex, Item, load_rgb, open_dataset


def _outputs_exist(out: Path, item: Item, heatmaps: bool, class_names: tuple[str, ...]) -> bool:
    if not (out / "masks" / f"{item.id}.png").is_file() or not (out / "cams" / f"{item.id}.npz").is_file():
        return False
    if heatmaps:
        present = [class_names[int(c)] for c in np.flatnonzero(item.labels)]
        return all((out / "heatmaps" / item.id / f"{n}.jpg").is_file() for n in present)
    return True


def _class_map(index: DatasetIndex, predictor: Predictor) -> list[int]:
    """Dataset class position -> model channel, by name (case-insensitive)."""
    model = {n.casefold(): i for i, n in enumerate(predictor.class_names)}
    unknown = [n for n in index.classes if n.casefold() not in model]
    if unknown:
        raise ValueError(
            f"the dataset's classes {unknown} are not classes of the model "
            f"({', '.join(predictor.class_names)})"
        )
    return [model[n.casefold()] for n in index.classes]


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def run_infer(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    split: str | None = None,
    crf: bool = False,
    bg_threshold: float | None = None,
    device: str = "auto",
    fast: bool = False,
    heatmaps: bool = True,
    crf_workers: int = 1,
    batch_images: int | None = None,
    winograd: bool | None = None,
    compile: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Pseudo-label every image of a dataset split; returns (and writes) the run summary.

    ``batch_images``: images of one size per network batch (default: 4 on CUDA, 1 on the CPU).
    ``winograd``, ``compile``: the :class:`~hsc.model.predictor.Predictor` arguments."""
    out = Path(out)
    t_start = time.perf_counter()
    predictor = Predictor.from_checkpoint(
        checkpoint,
        device=device,
        mode="fast" if fast else "exact",
        batch_images=batch_images,
        winograd=winograd,
        compile=compile,
    )
    index = open_dataset(data, split=split)
    channel = _class_map(index, predictor)
    names = tuple(predictor.class_names)
    todo = [it for it in index if not _outputs_exist(out, it, heatmaps, tuple(index.classes))]
    failures: list[dict[str, str]] = []
    ids: deque[Item] = deque()

    def stream() -> Iterator[tuple[np.ndarray, list[int]]]:
        for it in todo:
            try:
                image = np.asarray(load_rgb(it.image))
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                failures.append({"id": it.id, "image": str(it.image), "error": f"{type(e).__name__}: {e}"})
                continue
            ids.append(it)
            yield image, [channel[int(c)] for c in np.flatnonzero(it.labels)]

    outputs = {"mask", "cams"} | ({"heatmaps"} if heatmaps else set())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="img", desc="hsc infer", dynamic_ncols=True)
    timings = {"network": 0.0, "crf": 0.0, "write": 0.0}
    done = 0
    settings: dict[str, Any] = {}
    try:
        results = predictor.predict_many(
            stream(),
            crf=crf,
            crf_workers=crf_workers if crf else 0,
            bg_threshold=bg_threshold,
            outputs=outputs,
        )
        for pred in results:
            it = ids.popleft()
            t0 = time.perf_counter()
            assert pred.mask is not None and pred.cams is not None
            atomic_write_bytes(out / "masks" / f"{it.id}.png", label_to_png(pred.mask))
            save_cams(out / "cams" / f"{it.id}.npz", pred.cams, pred.classes, pred.class_names)
            for cname, rgb in pred.heatmaps.items():
                atomic_write_bytes(out / "heatmaps" / it.id / f"{cname}.jpg", _jpeg(rgb))
            timings["write"] += time.perf_counter() - t0
            timings["network"] += pred.timings.get("network", 0.0)
            timings["crf"] += pred.timings.get("crf", 0.0)
            settings = pred.settings
            done += 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    summary = {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": predictor.checkpoint_sha256,
        "data": str(data),
        "split": index.split,
        "classes": list(names),
        "total": len(index),
        "done": done,
        "skipped_existing": len(index) - len(todo),
        "failed": len(failures),
        "failures": failures,
        "settings": settings,
        "seconds": {k: round(v, 3) for k, v in timings.items()}
        | {"total": round(time.perf_counter() - t_start, 3)},
        "files": {
            "masks": "masks/<id>.png",
            "cams": "cams/<id>.npz",
            "heatmaps": "heatmaps/<id>/<class>.jpg",
        },
    }
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    return summary
