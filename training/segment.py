"""``hsc segment``: the step-2 (DeepLab) test-time pipeline over a dataset (docs/algorithm.md 7.5).

    hsc segment --checkpoint SEG --data DIR --out PRED [--split val] [--scales 0.5,0.75,...]
                [--no-flip] [--no-crf] [--device D]

Per image (:func:`segment_image`), as the official ``segmentation/experiment/test.py`` does:

1. the RGB uint8 image is normalised, ``x = (v / 255 - mean) / std`` in float32;
2. for every rate of ``scales`` (default 0.5 ... 1.75, step 0.25) the *normalised float image* is
   resized with ``cv2.resize(fx=fy=rate, INTER_CUBIC)`` and, with ``flip``, followed by its
   width-flipped copy (12 forwards by default; one scale's pair goes through the network as one
   batch of 2, which eval mode makes equivalent to two forwards);
3. each logit map (already at its input size) is resized to the original ``(h, w)`` (bilinear,
   ``align_corners=True``), flipped ones are flipped back, the **mean of the logit maps** is taken
   and a softmax over the ``K + 1`` labels applied;
4. with ``crf`` the dense CRF :data:`~hsc.model.crf.DEEPLAB_TEST_CRF` runs on the softmax and on
   ``img_denorm`` = ``(x * std + mean) * 255`` clipped to [0, 255] and truncated to uint8; the label
   map is the argmax of its marginals (without ``crf``: the argmax of the softmax).

Over a dataset (:func:`segment_dataset`) it writes, per image ``<id>`` of the list:

* ``PRED/masks/<id>.png``  the label map, VOC palette PNG in the VOC label space (0 = background,
  ``c + 1`` = the dataset's class ``c``), the space ``hsc eval --masks`` scores and ``hsc infer``
  writes;
* ``PRED/summary.json``    settings, checkpoint SHA-256, counts, failures and timings of the run.

As in ``hsc infer`` an image whose mask exists is skipped (re-running finishes only what is
missing), every file goes through a temporary name and a rename, and an image that cannot be read is
recorded in the summary's ``failures`` without stopping the run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image
from torch import nn

from hsc.core.encoders import label_to_png
from hsc.model.checkpoint import sniff_file
from hsc.model.config import Normalization
from hsc.model.crf import DEEPLAB_TEST_CRF, CRFParams, check_rgb_image, crf_inference
from hsc.model.predictor import resolve_device
from hsc.model.seg_checkpoint import load_segmenter

from .cam_files import atomic_write_bytes
from .datasets import open_dataset
from .seg_data import load_image_cv2

__all__ = [
    "DEFAULT_SCALES",
    "Segmentation",
    "check_scales",
    "denormalize_image",
    "multiscale_probs",
    "normalize_image",
    "segment_dataset",
    "segment_image",
]

#: ``TEST_MULTISCALE`` of the official step-2 configuration.
DEFAULT_SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

#: What reading one image may raise; such an image is recorded as a failure and skipped.
_IMAGE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


# --------------------------------------------------------------------------------------------------
# one image


@dataclass(frozen=True)
class Segmentation:
    """The test-time result for one image.

    Attributes:
      labels: ``(H, W)`` uint8 label map in the network's label space (0 = background); the argmax
        of the CRF marginals when the CRF ran, else of ``probs``.
      probs: ``(K + 1, H, W)`` float32 softmax of the mean logit map (before any CRF).
      seconds: wall time of the parts, ``network`` (resizes, forwards, mean, softmax) and ``crf``.
    """

    labels: NDArray[np.uint8]
    probs: NDArray[np.float32]
    seconds: dict[str, float] = field(default_factory=dict)


def check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    """``scales`` as a tuple of floats, or ``ValueError`` when empty, non-finite or not positive."""
    out = tuple(float(s) for s in scales)
    if not out:
        raise ValueError("scales must hold at least one rate")
    bad = [s for s in out if not math.isfinite(s) or s <= 0]
    if bad:
        raise ValueError(f"scales must be finite and > 0, got {list(out)}")
    return out


def _check_size(h: int, w: int, scales: Sequence[float]) -> None:
    smallest = min(scales)
    if round(min(h, w) * smallest) < 1:
        raise ValueError(f"image of {w}x{h} pixels is too small for the scale {smallest}")


def normalize_image(image: NDArray[np.uint8], normalization: Normalization) -> NDArray[np.float32]:
    """``(v / 255 - mean) / std`` of an ``(H, W, 3)`` uint8 RGB image, float32 ``(H, W, 3)``."""
    mean = np.asarray(normalization.mean, dtype=np.float32)
    std = np.asarray(normalization.std, dtype=np.float32)
    return ((image.astype(np.float32) / np.float32(255.0) - mean) / std).astype(np.float32)


def denormalize_image(norm_img: NDArray[np.float32], normalization: Normalization) -> NDArray[np.uint8]:
    """The official ``img_denorm``: ``(x * std + mean) * 255`` clipped to [0, 255], truncated to uint8.

    Truncation (not rounding) means some pixels come back one below the original values."""
    mean = np.asarray(normalization.mean, dtype=np.float32)
    std = np.asarray(normalization.std, dtype=np.float32)
    img = (norm_img * std + mean) * np.float32(255.0)
    return np.clip(img, 0, 255).astype(np.uint8)


def _net_device(net: nn.Module) -> torch.device:
    p = next(iter(net.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def multiscale_probs(
    net: nn.Module,
    norm_img: NDArray[np.float32],
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    flip: bool = True,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Steps 2-3 of the module docstring: softmax of the mean logits, ``(K + 1, H, W)`` float32.

    Arguments:
      net: maps a normalised ``Bx3xhxw`` batch to logits ``Bx(K+1)xhxw`` (in eval mode).
      norm_img: ``(H, W, 3)`` float32 normalised image.
      scales: resize rates of the normalised image.
      flip: also run every scale's width-flipped copy.
      device: where the forwards run (default: the network's device). The result stays there.
    """
    dev = _net_device(net) if device is None else device
    h, w = norm_img.shape[:2]
    total: torch.Tensor | None = None
    count = 0
    for rate in scales:
        x = cv2.resize(norm_img, None, fx=rate, fy=rate, interpolation=cv2.INTER_CUBIC)  # (h_r, w_r, 3)
        batch = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None].to(dev)  # (1, 3, h_r, w_r)
        if flip:
            batch = torch.cat([batch, batch.flip(-1)])  # (2, 3, h_r, w_r)
        logits = net(batch)  # (1 or 2, K+1, h_r, w_r)
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=True)  # (., K+1, H, W)
        maps = [logits[0]] + ([logits[1].flip(-1)] if flip else [])
        for m in maps:
            total = m.clone() if total is None else total + m
            count += 1
    assert total is not None  # scales is not empty
    return torch.softmax(total / count, dim=0).float()  # (K+1, H, W)


def segment_image(
    net: nn.Module,
    image: NDArray[np.uint8],
    *,
    normalization: Normalization | None = None,
    scales: Sequence[float] = DEFAULT_SCALES,
    flip: bool = True,
    crf: bool = True,
    crf_params: CRFParams = DEEPLAB_TEST_CRF,
    device: str | torch.device | None = None,
) -> Segmentation:
    """The step-2 test-time procedure (docs/algorithm.md 7.5) for one image.

    Arguments:
      net: a step-2 network in eval mode (e.g. :attr:`LoadedSegmenter.net
        <hsc.model.seg_checkpoint.LoadedSegmenter.net>`), at most 255 output channels.
      image: ``(H, W, 3)`` uint8 RGB.
      normalization: the network's input normalisation (default: ImageNet's).
      scales: resize rates of the normalised image (default :data:`DEFAULT_SCALES`).
      flip: also run the width-flipped copy of every scale.
      crf: refine with the dense CRF ``crf_params`` (default :data:`DEEPLAB_TEST_CRF`).
      device: where the forwards run; must be the network's device (default: the network's).

    Returns:
      a :class:`Segmentation` (labels ``(H, W)`` uint8, probabilities ``(K + 1, H, W)`` float32).

    Raises:
      ValueError: a network in training mode or on another device, bad scales, an image too small
        for the smallest scale; ``TypeError``/``ValueError`` for an image that is not HxWx3 uint8.
    """
    if net.training:
        raise ValueError("the network is in training mode (dropout on): call net.eval() first")
    scales = check_scales(scales)
    image = check_rgb_image(image)
    h, w = image.shape[:2]
    _check_size(h, w, scales)
    own = _net_device(net)
    dev = own if device is None else torch.device(device)
    if dev != own and not (dev.type == own.type == "cuda" and dev.index is None):
        raise ValueError(f"device {dev} asked for, but the network is on {own}: move it first")
    norm = normalization or Normalization()
    t0 = time.perf_counter()
    norm_img = normalize_image(image, norm)
    with torch.inference_mode():
        probs_t = multiscale_probs(net, norm_img, scales=scales, flip=flip, device=own)
        if probs_t.shape[0] > 255:
            raise ValueError(f"{probs_t.shape[0]} labels do not fit a uint8 label map (at most 255)")
        probs = probs_t.cpu().numpy().astype(np.float32, copy=False)  # (K+1, H, W)
    t1 = time.perf_counter()
    if crf:
        q = crf_inference(denormalize_image(norm_img, norm), probs, params=crf_params)  # (K+1, H, W)
        labels = np.argmax(q, axis=0).astype(np.uint8)
    else:
        labels = np.argmax(probs, axis=0).astype(np.uint8)
    t2 = time.perf_counter()
    return Segmentation(
        labels=labels, probs=probs, seconds={"network": t1 - t0, "crf": t2 - t1 if crf else 0.0}
    )


# --------------------------------------------------------------------------------------------------
# a dataset


def _check_label_names(model: Sequence[str], expected: Sequence[str], checkpoint: str | Path) -> None:
    """The checkpoint's labels must be the dataset's (background first), in the same order."""
    if [n.casefold() for n in model] != [n.casefold() for n in expected]:
        raise ValueError(
            f"{checkpoint}: the checkpoint's labels ({', '.join(model)}) are not the dataset's "
            f"({', '.join(expected)}); the masks would be in another label space"
        )


def segment_dataset(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    split: str | None = None,
    scales: Sequence[float] = DEFAULT_SCALES,
    flip: bool = True,
    crf: bool = True,
    device: str = "auto",
    label_names: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Segment every image of a dataset split with a step-2 checkpoint; returns (and writes) the summary.

    Arguments:
      checkpoint: our ``.safetensors`` segmenter (:func:`~hsc.model.seg_checkpoint.save_segmenter`)
        or the official step-2 ``.pth`` state dict.
      data: a VOC-layout folder or a manifest (:func:`~hsc.training.datasets.open_dataset`).
      out: output folder (``masks/<id>.png``, ``summary.json``).
      split: the list to run on (VOC: ``ImageSets/Segmentation/<split>.txt``).
      scales, flip, crf: the test-time settings of :func:`segment_image`.
      device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
      label_names: the labels of an official ``.pth`` (background first); such a file stores none, so
        the default is the dataset's (``background`` + its classes).
      progress: show a progress bar.

    Raises:
      ValueError: the checkpoint's labels are not the dataset's (background + classes, in order), a bad
        checkpoint (:class:`~hsc.model.checkpoint.CheckpointError`) or dataset
        (:class:`~hsc.core.datasets.DatasetError`), bad scales or device.
    """
    out = Path(out)
    t_start = time.perf_counter()
    scales = check_scales(scales)
    index = open_dataset(data, split=split, require_labels=False)  # step 2 needs no image-level labels
    expected = ("background", *index.classes)
    dev = resolve_device(device)
    if label_names is None and sniff_file(checkpoint) == "torch":
        label_names = expected  # an official state dict names no classes
    seg = load_segmenter(checkpoint, label_names=label_names, map_location=dev)
    _check_label_names(seg.label_names, expected, checkpoint)
    todo = [it for it in index if not (out / "masks" / f"{it.id}.png").is_file()]
    failures: list[dict[str, str]] = []
    timings = {"load": 0.0, "network": 0.0, "crf": 0.0, "write": 0.0}
    done = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="img", desc="hsc segment", dynamic_ncols=True)
    try:
        for it in todo:
            t0 = time.perf_counter()
            try:
                image = load_image_cv2(it.image)  # as the official test.py: cv2.imread + BGR->RGB
                _check_size(image.shape[0], image.shape[1], scales)
            except _IMAGE_ERRORS as e:
                failures.append({"id": it.id, "image": str(it.image), "error": f"{type(e).__name__}: {e}"})
                if bar is not None:
                    bar.update(1)
                continue
            timings["load"] += time.perf_counter() - t0
            result = segment_image(
                seg.net, image, normalization=seg.normalization, scales=scales, flip=flip, crf=crf
            )
            t1 = time.perf_counter()
            atomic_write_bytes(out / "masks" / f"{it.id}.png", label_to_png(result.labels))
            timings["write"] += time.perf_counter() - t1
            timings["network"] += result.seconds["network"]
            timings["crf"] += result.seconds["crf"]
            done += 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    norm = seg.normalization
    summary: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": seg.sha256,
        "checkpoint_format": seg.source_format,
        "checkpoint_step": seg.step,
        "data": str(data),
        "split": index.split,
        "label_names": list(seg.label_names),
        "total": len(index),
        "done": done,
        "skipped_existing": len(index) - len(todo),
        "failed": len(failures),
        "failures": failures,
        "settings": {
            "scales": list(scales),
            "flip": flip,
            "forwards_per_image": len(scales) * (2 if flip else 1),
            "crf": crf,
            "crf_params": asdict(DEEPLAB_TEST_CRF) if crf else None,
            "device": str(dev),
            "normalization": {"mean": list(norm.mean), "std": list(norm.std)},
        },
        "seconds": {k: round(v, 3) for k, v in timings.items()}
        | {"total": round(time.perf_counter() - t_start, 3)},
        "files": {"masks": "masks/<id>.png"},
    }
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    return summary
