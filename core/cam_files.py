"""The per-image files of a pseudo-label run, and how to read them back (numpy + PIL, no pickles).

``hsc infer`` writes them under its output folder and the service's workers under each job's folder
(``results_dir/jobs/<job id>``); the training tools and the job archives read them.

``cams/<id>.npz`` — the CAMs of the image's labelled classes, a NumPy ``.npz`` archive holding:

* ``cams``: float32 ``(K_present, H, W)``, max-normalised CAMs in [0, 1) at the original image size,
  one row per labelled class (the official ``cam_npy`` values);
* ``classes``: int16 ``(K_present,)``, the channel index of each row (0-based foreground class, so
  the VOC label of row ``i`` is ``classes[i] + 1``);
* ``class_names``: str ``(K_present,)``, their names;
* ``format_version``: int, 1.

Read it with ``np.load(path, allow_pickle=False)`` (or :func:`load_cams`); unlike the official
pickled-dict ``.npy`` files, it runs no code when loaded. ``hsc eval --cams`` sweeps the background
threshold over these files.

``masks/<id>.png`` — the pseudo-label as a VOC palette PNG (``np.array(Image.open(f))`` gives the
labels: 0 background, ``c + 1`` class ``c``).

Every file is written to a temporary name in the same folder and renamed, so an interrupted run never
leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["CAM_FORMAT_VERSION", "atomic_write_bytes", "cam_dict", "load_cams", "save_cams"]

CAM_FORMAT_VERSION = 1
# mkstemp makes 0600 files; results are read by other processes (the API, possibly another user)
_FILE_MODE = 0o644


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_cams(path: Path, cams: np.ndarray, classes: Sequence[int], class_names: Sequence[str]) -> None:
    """Write one image's CAMs in the format above (atomically)."""
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3 or cams.shape[0] != len(classes) or len(classes) != len(class_names):
        raise ValueError(f"cams {cams.shape} do not match {len(classes)} classes / {len(class_names)} names")
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique temporary name: two writers of the same item (a re-delivered chunk) never share one
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(
                f,
                cams=cams,
                classes=np.asarray(classes, dtype=np.int16),
                class_names=np.asarray(list(class_names), dtype=str),
                format_version=np.asarray(CAM_FORMAT_VERSION),
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_cams(path: Path) -> tuple[np.ndarray, tuple[int, ...], tuple[str, ...]]:
    """``(cams (K_present, H, W) float32, classes, class_names)`` of a ``cams/<id>.npz`` file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            version = int(z["format_version"]) if "format_version" in z else 0
            if version > CAM_FORMAT_VERSION:
                raise ValueError(f"{path}: CAM file format {version} is newer than this hsc reads")
            cams = np.asarray(z["cams"], dtype=np.float32)
            classes = tuple(int(c) for c in z["classes"])
            names = tuple(str(n) for n in z["class_names"]) if "class_names" in z else ()
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a readable hsc CAM file ({e})") from None
    if cams.ndim != 3 or cams.shape[0] != len(classes):
        raise ValueError(f"{path}: cams {cams.shape} do not match {len(classes)} classes")
    return cams, classes, names


def cam_dict(path: Path) -> dict[int, np.ndarray]:
    """The CAMs of a file as the channel-space dict the evaluation takes (``{c: (H, W)}``)."""
    cams, classes, _ = load_cams(path)
    return {c: cams[i] for i, c in enumerate(classes)}
