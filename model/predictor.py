"""The one door between images and the model: :class:`Predictor` turns an RGB image and its image-level
labels into a pseudo-label mask, per-class CAMs and heatmaps (docs/algorithm.md 5).

The worker, the ``hsc infer`` command and the benchmarks all go through it. It owns everything that
is not a tensor: class names, the device, numpy <-> torch conversion, and sizes (every output is at
the original image size). The numbers come from :mod:`.cam`.

Two modes share one code path (:func:`.cam.multiscale_cam`):

* ``"exact"`` (default): float32 -- the golden-tested computation, CAMs within 1e-4 of the official
  inference (measured at width 1.0 on 500x375 images: 4.0e-6 with direct convolutions, 3.7e-6 with
  Winograd). On the CPU it runs channels_last, one pass at a time (faster than a batch of two there,
  and half the memory), and the 3x3 convolutions with 256 or more channels by float32 Winograd
  F(4x4, 3x3) (:mod:`.winograd`); on CUDA it batches each scale with its flip and switches TF32 off.
* ``"fast"``: the network runs under ``torch.autocast`` (bfloat16 on CPU; bfloat16 on CUDA where
  supported, else float16) with channels_last tensors; softmax, resizing, merging and normalisation
  stay float32. On a CPU with AVX-512 bfloat16 but no AMX, the 3x3 convolutions with 256 or more
  channels run by Winograd F(2x2, 3x3) (:mod:`.winograd`). Measured with the golden file's seeded
  width-1.0 weights on generated 500x375 images (``benchmarks/bench_inference.py --weights seeded``):
  99.82 % of threshold-mask pixels (0.22) and 100.00 % of CRF-mask pixels equal to the exact mode,
  CAM difference max 0.021, mean 0.0024 (direct bfloat16 convolutions, AMX CPU); with Winograd
  99.71-99.82 %, CRF 99.98-100 %, max 0.032, mean 0.0026-0.0028.

On 2 CPU threads (500x375, 4 scales x flip, CRF), against the official script in the same run: on an
AMD EPYC (AVX-512 bfloat16, no AMX) the exact mode takes 0.71-0.72x its time with Winograd (0.93-1.00x
with direct convolutions) and the fast mode 0.32-0.35x with Winograd (0.46x without); with direct
convolutions, on a CPU with AMX (Sapphire Rapids class) the exact mode took 0.97x and the fast mode
0.21x, on a Xeon with AVX-512 bfloat16 and no AMX the exact mode 0.82-0.91x (0.74x with
``compile=True``).

Datasets (:meth:`Predictor.predict_many`): up to ``batch_images`` images of one size share each
scale's forward (:func:`.cam.multiscale_cams`; default 4 on CUDA, where one VOC image leaves most of
the GPU idle, and 1 on the CPU, where a batch is slower: width 0.125, 500x375, 2 threads: 0.94 s per
image alone, 1.21 s in pairs, 1.33 s in fours, ``benchmarks/bench_batch.py``). A CUDA out-of-memory
error halves the batch and retries.

Usage::

    p = Predictor.from_checkpoint("hsc_eps_v2.safetensors", device="auto", mode="exact")
    pred = p.predict(image, ["dog", "person"], crf=True, outputs={"mask", "cams", "heatmaps"})
    pred.mask        # (H, W) uint8, VOC label space: 0 background, c+1 for class c
    pred.cams        # (K_present, H, W) float32, rows follow pred.classes / pred.class_names

Image-level labels predicted by the classifier (``labels="auto"``)::

    p.classify(image)                       # (K,) float32 class probabilities
    pred = p.predict(image, "auto", label_threshold=0.5)
    pred.labels_source, pred.class_scores   # "predicted", {name: probability for all K classes}

The probabilities are what the network was trained to output (multilabel soft margin on the spatial
mean of the ``fc8`` logits, foreground channels): ``sigmoid(mean_hw fc8(x)[:K])`` of **one extra pass
at scale 1.0, unflipped** (the image at its own size, the checkpoint's normalisation, the predictor's
mode). The multi-scale CAM passes cannot be reused: the labels must be known before they run. The
extra pass costs one unit out of the 15 of the official 4-scale x flip inference (~7 % of the
network time). Classes with a probability >= ``label_threshold`` are used; when none is, the top-1.
The exact path with given labels is unchanged.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import multiprocessing
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import nn

from .cam import (
    OFFICIAL_SCALES,
    _forward_cam,
    _upload,
    cams_to_label,
    check_image,
    crf_from_cams,
    crf_to_label,
    multiscale_cams,
    normalize_image,
)
from .classes import BACKGROUND, VOC_CLASSES
from .config import ModelInfo
from .crf import INFERENCE_CRF
from .visualize import heatmap_overlay
from .winograd import MIN_CHANNELS, MIN_CHANNELS_FP32, pays_on_this_cpu, use_winograd

__all__ = [
    "AUTO_LABELS",
    "CRF_ALPHA",
    "CRF_ITERS",
    "DEFAULT_LABEL_THRESHOLD",
    "DEFAULT_OUTPUTS",
    "OUTPUTS",
    "Mode",
    "Prediction",
    "Predictor",
    "fast_dtype",
    "is_auto_labels",
    "resolve_device",
    "select_classes",
]

Mode = Literal["exact", "fast"]
MODES: tuple[str, ...] = ("exact", "fast")
OUTPUTS = frozenset({"mask", "cams", "heatmaps"})
DEFAULT_OUTPUTS = frozenset({"mask", "cams"})
CRF_ITERS = 8  # README: --crf_t 8
CRF_ALPHA = 7  # README: --crf_alpha 7

#: ``labels=AUTO_LABELS`` (any case): the classes come from the image-level classifier.
AUTO_LABELS = "auto"
DEFAULT_LABEL_THRESHOLD = 0.5
CLASSIFIER = "sigmoid(spatial mean of the fc8 logits), one pass at scale 1.0, unflipped"

Labels = Sequence[str | int] | str


def is_auto_labels(labels: object) -> bool:
    """``True`` for the string ``"auto"`` (any case, surrounding spaces ignored)."""
    return isinstance(labels, str) and labels.strip().casefold() == AUTO_LABELS


def check_label_threshold(value: float) -> float:
    """``value`` as a float in [0, 1]; ``ValueError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"label_threshold must be a number in [0, 1], got {value!r}")
    t = float(value)
    if not (math.isfinite(t) and 0.0 <= t <= 1.0):
        raise ValueError(f"label_threshold must be a number in [0, 1], got {value!r}")
    return t


def select_classes(
    scores: np.ndarray | Sequence[float], threshold: float = DEFAULT_LABEL_THRESHOLD
) -> tuple[int, ...]:
    """Channel indices (ascending) whose probability is ``>= threshold``; the top-1 when none is
    (the first maximum on ties)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("no class scores")
    picked = np.flatnonzero(s >= check_label_threshold(threshold))
    if picked.size == 0:
        return (int(np.argmax(s)),)
    return tuple(int(c) for c in picked)


# --------------------------------------------------------------------------------------------------
# devices and dtypes


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; ``"cpu"``, ``"cuda"``, ``"cuda:i"`` as given.

    Asking for CUDA where there is none is a ``ValueError``. Nothing here creates a CUDA context.
    """
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:<i>'") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:<i>'")
    return dev


def fast_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype of the fast mode: bfloat16 on CPU; on CUDA bfloat16 where the GPU supports
    it, else float16."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def _cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@contextlib.contextmanager
def cudnn_conv_ieee_fp32() -> Iterator[None]:
    """Within the block, cuDNN float32 convolutions are plain IEEE float32 (no TF32); restored after.

    Uses ``torch.backends.cudnn.conv.fp32_precision`` where torch has it (mixing it with the legacy
    ``allow_tf32`` flag is an error in recent torch), else ``torch.backends.cudnn.allow_tf32``.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        old = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = old
    else:
        old_flag = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = old_flag


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class Prediction:
    """What :meth:`Predictor.predict` returns for one image of size (H, W).

    mask:        (H, W) uint8 in VOC label space (0 background, ``c + 1`` for channel ``c``); values
                 only from ``{0} | {c + 1 for c in classes}``. From the CRF when ``settings["crf"]``,
                 else the thresholded CAMs. ``None`` if not asked for.
    cams:        (K_present, H, W) float32 max-normalised CAMs in [0, 1), one row per entry of
                 ``classes``. ``None`` if not asked for.
    classes:     network channel index of each present class, ascending.
    class_names: the name of each entry of ``classes``.
    heatmaps:    class name -> (H, W, 3) uint8 RGB jet overlay of its CAM on the image (empty unless
                 asked for).
    settings:    everything that decided the numbers (JSON-able): mode, device, dtype, scales, flip,
                 bg_threshold, crf, crf_iters, crf_alpha, ...
    timings:     seconds: ``network`` (pre-processing + forwards + CAM merge, including the copy to
                 the host), ``crf``, ``postprocess`` (threshold mask, heatmaps), ``total``; with
                 ``labels="auto"`` also ``classify`` (the classifier pass).
    labels_source: ``"given"``, or ``"predicted"`` for ``labels="auto"``.
    class_scores: with ``labels="auto"``: class name -> classifier probability, for all K classes
                 (:meth:`Predictor.classify`); ``None`` for given labels.
    """

    mask: np.ndarray | None
    cams: np.ndarray | None
    classes: tuple[int, ...]
    class_names: tuple[str, ...]
    image_size: tuple[int, int]
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    labels_source: str = "given"
    class_scores: dict[str, float] | None = None

    @property
    def label_names(self) -> dict[int, str]:
        """Mask value -> name: ``{0: "background", c + 1: name of c, ...}`` for the present classes."""
        return {0: BACKGROUND, **{c + 1: n for c, n in zip(self.classes, self.class_names)}}


@dataclass
class _Job:
    """One image between the network stage and the end (internal)."""

    image: np.ndarray
    classes: tuple[int, ...]
    crf: bool
    bg_threshold: float
    crf_iters: int
    crf_alpha: float
    outputs: frozenset[str]
    t_start: float
    cams: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    class_scores: np.ndarray | None = None  # (K,) classifier probabilities, labels="auto" only
    label_threshold: float | None = None


def _crf_mask(
    image: np.ndarray, cams: np.ndarray, classes: tuple[int, ...], alpha: float, iters: int
) -> tuple[np.ndarray, float]:
    """Dense CRF (algorithm.md 5.4) and its argmax label map (6.5); also the seconds it took.

    A module-level function so that a process pool can run it.
    """
    t0 = time.perf_counter()
    q, keys = crf_from_cams(image, cams, classes, alpha=alpha, iters=iters)
    return crf_to_label(q, keys), time.perf_counter() - t0


def _cam_convs(net: nn.Module) -> set[str]:
    """Names of the convolutions ``net.forward_cam`` runs (found on a small input): the heads that
    only training uses are left alone."""
    names = {m: n for n, m in net.named_modules()}
    used: set[str] = set()

    def record(module: nn.Module, _inputs: Any) -> None:
        used.add(names[module])

    hooks = [m.register_forward_pre_hook(record) for m in net.modules() if isinstance(m, nn.Conv2d)]
    try:
        p = next(net.parameters())
        with torch.inference_mode():
            net.forward_cam(torch.zeros(1, 3, 32, 32, device=p.device, dtype=p.dtype))  # type: ignore[operator]
    finally:
        for h in hooks:
            h.remove()
    return used


class _CompiledCAM(nn.Module):
    """``net`` with a ``torch.compile``-d ``forward_cam`` (dynamic shapes, so the scales and image sizes
    share one compilation; frozen weights, so oneDNN gets pre-packed ones). Compiles on first use."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        fn = cast(Callable[[torch.Tensor], torch.Tensor], net.forward_cam)
        self._forward_cam = torch.compile(fn, dynamic=True, options={"freezing": True})
        self.eval()

    @property
    def num_classes(self) -> int:
        return int(self.net.num_classes)  # type: ignore[arg-type]

    def forward_cam(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_cam(x)


# --------------------------------------------------------------------------------------------------
# the predictor


class Predictor:
    """Multi-scale CAM pseudo-labels for RGB images with image-level labels.

    The network is loaded once, put in eval mode on ``device`` (and to channels_last in the fast
    mode), and never trained: the predictor owns the module it is given.

    Args:
        net: an :class:`~hsc.model.hsc_net.HSCNet` (anything with ``forward_cam`` and
            ``num_classes``).
        info: what the checkpoint says: class names, normalisation, default background threshold.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"`` or ``"cuda:<i>"``.
        mode: ``"exact"`` (float32, the official numbers) or ``"fast"`` (autocast + channels_last).
        scales: resize factors of the passes (default: the official 0.5, 1, 1.5, 2).
        flip: also run each scale's horizontal flip (official: yes).
        autocast_dtype: override the fast mode's dtype (default :func:`fast_dtype`); fast mode only.
        channels_last: channels_last network and inputs (default; on the CPU 8-16 % faster in float32
            and needed for fast bfloat16 convolutions; exact-mode CAMs move by ~1e-7).
        batch_flips: run each scale's image and its flip as one batch; default: on CUDA only (on
            the CPU one at a time is faster and needs half the memory).
        batch_images: in :meth:`predict_many`, up to this many images of one size share the
            network's forwards (:func:`.cam.multiscale_cams`: every scale's inputs of those images,
            flips included, in one batch). Default: 4 on CUDA, 1 on the CPU (where a batch is no
            faster and takes more memory). On a CUDA out-of-memory error the batch is split in two
            and retried, and the predictor keeps the smaller size for what follows.
        compile: ``torch.compile`` the network (inductor, dynamic shapes, frozen weights): about
            20 s once, then ~10 % faster per image on the CPU in float32; pays for datasets, not for
            single images. CAMs move by ~1e-7 in exact mode.
        winograd: run the wide 3x3 convolutions by Winograd (:mod:`.winograd`), CPU only: in the
            exact mode those with 256 or more channels by F(4x4, 3x3) in float32 (4x fewer
            multiply-adds; CAMs still within 4e-6 of the official ones, far inside the golden 1e-4),
            in the fast mode those with 256 or more by F(2x2, 3x3) in bfloat16 (2.25x fewer).
            Default: on in the exact mode (EPYC, width 1.0: 45-49 s instead of 61-64 s per image, for
            1.25 GB more memory: the transformed filters are 4x the weights they replace); in the
            fast mode where the CPU has AVX-512 bfloat16 but no AMX (oneDNN has no Winograd of its
            own there; the network ~25 % faster), not with AMX (its direct bfloat16 convolution is
            faster); never with ``compile=True`` (its layers run eagerly, breaking the compiled
            graph). ``False`` saves the memory. Replaces modules of ``net`` in place.
        checkpoint_sha256: recorded in ``settings`` (set by :meth:`from_checkpoint`).
    """

    def __init__(
        self,
        net: nn.Module,
        info: ModelInfo,
        *,
        device: str | torch.device = "auto",
        mode: Mode = "exact",
        scales: Sequence[float] = OFFICIAL_SCALES,
        flip: bool = True,
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = True,
        batch_flips: bool | None = None,
        batch_images: int | None = None,
        compile: bool = False,
        winograd: bool | None = None,
        checkpoint_sha256: str | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        if not hasattr(net, "forward_cam"):
            raise TypeError(f"{type(net).__name__} has no forward_cam(x) -> (N, K+1, h, w)")
        num_classes = getattr(net, "num_classes", None)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise TypeError(f"{type(net).__name__} has no positive integer num_classes")
        self.scales = tuple(float(s) for s in scales)
        if not self.scales or any(not (math.isfinite(s) and s > 0) for s in self.scales):
            raise ValueError(f"scales must be positive numbers, got {list(scales)}")
        self.flip = bool(flip)
        self.info = info
        self.num_classes = num_classes
        self.class_names = self._names_for(info, num_classes)
        self._by_name = self._name_index(self.class_names)
        self.device = resolve_device(device)
        self.mode: Mode = mode
        self.checkpoint_sha256 = checkpoint_sha256
        self.channels_last = bool(channels_last)
        self.batch_flips = self.device.type == "cuda" if batch_flips is None else bool(batch_flips)
        if batch_images is None:
            batch_images = 4 if self.device.type == "cuda" else 1
        if isinstance(batch_images, bool) or not isinstance(batch_images, int) or batch_images < 1:
            raise ValueError(f"batch_images must be an integer >= 1, got {batch_images!r}")
        self.batch_images = batch_images
        self._memory_cap: int | None = None  # set by an out-of-memory error (_run_networks)
        if mode == "fast":
            self.dtype = autocast_dtype or fast_dtype(self.device)
            if self.device.type == "cpu" and self.dtype == torch.bfloat16 and not _cpu_has_fast_bf16():
                warnings.warn(
                    "this CPU has no native bfloat16 support: the fast mode may be slower than exact",
                    RuntimeWarning,
                    stacklevel=2,
                )
        else:
            if autocast_dtype is not None:
                raise ValueError("autocast_dtype applies to mode='fast' only (the exact mode is float32)")
            self.dtype = torch.float32
        net = net.to(self.device)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        if winograd is None:
            winograd = (
                self.device.type == "cpu"
                and not compile  # each Winograd layer would break the compiled graph
                and (self.dtype == torch.float32 or (self.dtype == torch.bfloat16 and pays_on_this_cpu()))
            )
        if winograd and self.device.type != "cpu":
            raise ValueError("winograd applies to the CPU only (cuDNN chooses its own algorithms)")
        min_channels = MIN_CHANNELS if self.dtype == torch.bfloat16 else MIN_CHANNELS_FP32
        # float32 affords F(4x4, 3x3) (4x fewer multiply-adds, error still ~2e-6 of a layer's output);
        # bfloat16 keeps F(2x2, 3x3), whose small coefficients add the least rounding
        tile = 4 if self.dtype == torch.float32 else 2
        self.winograd_layers = (
            tuple(use_winograd(net, self.dtype, min_channels=min_channels, only=_cam_convs(net), tile=tile))
            if winograd
            else ()
        )
        self.winograd = bool(self.winograd_layers)
        self.net = net
        self.compiled = bool(compile)
        self._cam_net: nn.Module = _CompiledCAM(net) if compile else net

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device = "auto",
        mode: Mode = "exact",
        class_names: Collection[str] | None = None,
        **kwargs: Any,
    ) -> Predictor:
        """Load a checkpoint (ours, or an official HSC state dict; see
        :func:`~hsc.model.checkpoint.load_any`) straight onto ``device``.

        ``class_names`` names the classes of an official file that is not VOC (for ours it must equal
        the stored names). Other keyword arguments go to :class:`Predictor`.
        """
        from .checkpoint import load_any  # safetensors and the checkpoint code only when loading

        dev = resolve_device(device)
        ckpt = load_any(path, class_names, map_location=dev)
        return cls(ckpt.net, ckpt.info, device=dev, mode=mode, checkpoint_sha256=ckpt.sha256, **kwargs)

    # ---------------------------------------------------------------------------------------- labels

    @staticmethod
    def _names_for(info: ModelInfo, num_classes: int) -> tuple[str, ...]:
        names = tuple(info.class_names)
        if not names:
            names = (
                VOC_CLASSES
                if num_classes == len(VOC_CLASSES)
                else tuple(f"class_{i}" for i in range(num_classes))
            )
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class names for a network with {num_classes} classes")
        return names

    @staticmethod
    def _name_index(names: Sequence[str]) -> dict[str, int]:
        index: dict[str, int] = {}
        for i, n in enumerate(names):
            key = n.strip().casefold()
            if key in index:
                raise ValueError(f"class names {names[index[key]]!r} and {n!r} are equal ignoring case")
            index[key] = i
        return index

    def class_indices(self, labels: Labels) -> tuple[int, ...]:
        """Channel indices (ascending, duplicates merged) of the given class names or indices.

        Names are matched ignoring case and surrounding spaces; indices are network channel indices
        ``0..K-1`` (``0`` = the first class, e.g. ``aeroplane`` on VOC -- not VOC label values).
        A single string is one name. Unknown names raise a ``ValueError`` that lists the valid ones.
        """
        if isinstance(labels, str):
            labels = [labels]
        if isinstance(labels, np.ndarray):
            labels = labels.tolist()
        items = list(labels)
        if not items:
            raise ValueError("labels are empty: give at least one present class (name or index)")
        out: set[int] = set()
        unknown: list[str] = []
        for item in items:
            if isinstance(item, str):
                key = item.strip().casefold()
                if key in self._by_name:
                    out.add(self._by_name[key])
                else:
                    unknown.append(item)
            elif isinstance(item, (int, np.integer)) and not isinstance(item, (bool, np.bool_)):
                c = int(item)
                if not 0 <= c < self.num_classes:
                    raise ValueError(
                        f"class index {c} out of range [0, {self.num_classes}) "
                        f"(indices are network channels: 0 = {self.class_names[0]!r})"
                    )
                out.add(c)
            else:
                raise TypeError(f"a label is a class name or an integer index, got {type(item).__name__}")
        if unknown:
            hint = (
                " (the background is implicit: never name it)"
                if any(u.strip().casefold() == BACKGROUND for u in unknown)
                else ""
            )
            raise ValueError(
                f"unknown class name(s) {unknown}{hint}; valid names: {', '.join(self.class_names)}"
            )
        return tuple(sorted(out))

    # ---------------------------------------------------------------------------------------- predict

    def settings(self, *, crf: bool, bg_threshold: float, crf_iters: int, crf_alpha: float) -> dict[str, Any]:
        """The JSON-able settings recorded with every prediction."""
        s: dict[str, Any] = {
            "mode": self.mode,
            "device": str(self.device),
            "dtype": _dtype_name(self.dtype),
            "channels_last": self.channels_last,
            "batch_flips": self.batch_flips,
            "batch_images": self.batch_images,
            "compiled": self.compiled,
            "winograd": self.winograd,
            "scales": list(self.scales),
            "flip": self.flip,
            "bg_threshold": float(bg_threshold),
            "crf": bool(crf),
            "mask_from": "crf" if crf else "threshold",
            "normalization": {
                "mean": list(self.info.normalization.mean),
                "std": list(self.info.normalization.std),
            },
            "checkpoint_sha256": self.checkpoint_sha256,
        }
        if crf:
            p = INFERENCE_CRF
            s.update(
                crf_iters=int(crf_iters),
                crf_alpha=crf_alpha,
                crf_pairwise={
                    "gaussian_sxy": p.gaussian_sxy,
                    "gaussian_compat": p.gaussian_compat,
                    "bilateral_sxy": p.bilateral_sxy,
                    "bilateral_srgb": p.bilateral_srgb,
                    "bilateral_compat": p.bilateral_compat,
                },
            )
        return s

    def _prepare(
        self,
        image: np.ndarray,
        labels: Labels,
        *,
        crf: bool,
        bg_threshold: float | None,
        crf_iters: int,
        crf_alpha: float,
        outputs: Iterable[str] | str,
        label_threshold: float = DEFAULT_LABEL_THRESHOLD,
    ) -> _Job:
        t_start = time.perf_counter()
        image = check_image(image)
        if not image.flags.writeable:  # np.asarray(PIL image) is read-only; pydensecrf refuses those
            image = image.copy()
        auto = is_auto_labels(labels)
        if auto:
            label_thr = check_label_threshold(label_threshold)
            classes: tuple[int, ...] = ()
        else:
            classes = self.class_indices(labels)
        outs = frozenset([outputs] if isinstance(outputs, str) else outputs)
        bad = sorted(outs - OUTPUTS)
        if bad:
            raise ValueError(f"unknown outputs {bad}; choose from {sorted(OUTPUTS)}")
        thr = self.info.bg_threshold if bg_threshold is None else float(bg_threshold)
        if not math.isfinite(thr):
            raise ValueError(f"bg_threshold must be a finite number, got {bg_threshold}")
        if crf:
            if isinstance(crf_iters, bool) or not isinstance(crf_iters, (int, np.integer)) or crf_iters < 0:
                raise ValueError(f"crf_iters must be an integer >= 0, got {crf_iters!r}")
            if not (math.isfinite(crf_alpha) and crf_alpha > 0):
                raise ValueError(f"crf_alpha must be a positive number, got {crf_alpha!r}")
        job = _Job(image, classes, bool(crf), thr, int(crf_iters), crf_alpha, outs, t_start)
        if auto:
            t0 = time.perf_counter()
            scores = self._class_probs(image)
            job.classes = select_classes(scores, label_thr)
            job.class_scores, job.label_threshold = scores, label_thr
            job.timings["classify"] = time.perf_counter() - t0
        return job

    def _precision(self) -> contextlib.AbstractContextManager[Any]:
        """Exact mode on CUDA: no TF32 in the convolutions (it would break the 1e-4 agreement)."""
        if self.device.type == "cuda" and self.mode == "exact":
            return cudnn_conv_ieee_fp32()
        return contextlib.nullcontext()

    def _class_probs(self, image: np.ndarray) -> np.ndarray:
        """(K,) float32 classifier probabilities of a checked image (see :meth:`classify`)."""
        norm = self.info.normalization
        with self._precision(), torch.inference_mode():
            x = normalize_image(_upload(image, self.device), norm.mean, norm.std, self.device).unsqueeze(0)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = _forward_cam(
                self._cam_net,  # type: ignore[arg-type]
                x,
                self.dtype if self.mode == "fast" else None,
            )
            if logits.dim() != 4 or logits.shape[1] != self.num_classes + 1:
                raise ValueError(f"forward_cam returned shape {tuple(logits.shape)}, expected (1, K+1, h, w)")
            probs = torch.sigmoid(logits.float().mean(dim=(2, 3))[0, : self.num_classes])
        return probs.cpu().numpy().astype(np.float32)

    def classify(self, image: np.ndarray) -> np.ndarray:
        """The image-level classifier: (K,) float32 probability of each class (network channel order).

        ``sigmoid(mean_hw fc8(x)[:K])``, the quantity the network was trained on (multilabel soft
        margin on the spatial mean of the ``fc8`` logits), from one pass at scale 1.0 (the image at
        its own size), unflipped, in the predictor's mode. The background channel is left out.
        """
        return self._class_probs(check_image(image))

    def classifier_scores(self, image: np.ndarray) -> dict[str, float]:
        """:meth:`classify` as ``{class name: probability}`` for all K classes."""
        return dict(zip(self.class_names, (float(p) for p in self.classify(image))))

    def _run_network(self, job: _Job) -> None:
        self._run_networks([job], 1)

    def _run_networks(self, jobs: Sequence[_Job], batch: int | None = None) -> None:
        """The multi-scale CAMs of ``jobs`` (images of one size), ``batch`` (default
        ``self.batch_images``) at a time.

        Each job's ``timings["network"]`` is its share of its batch's time. An out-of-memory error
        halves the batch and retries; the smaller size is kept as a cap for every later call (and
        ``self.batch_images`` lowered to it). One image that does not fit raises the error.
        """
        size = self.batch_images if batch is None else batch
        i = 0
        while i < len(jobs):
            if self._memory_cap is not None:
                size = min(size, self._memory_cap)
            part = jobs[i : i + size]
            try:
                self._cams_of(part)
            except torch.OutOfMemoryError:
                if len(part) == 1:
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                size = (len(part) + 1) // 2
                warnings.warn(
                    f"out of memory with {len(part)} images per batch: going on with {size}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._memory_cap = size
                self.batch_images = min(self.batch_images, size)
                continue
            i += len(part)

    def _cams_of(self, jobs: Sequence[_Job]) -> None:
        t0 = time.perf_counter()
        norm = self.info.normalization
        with self._precision():
            results = multiscale_cams(
                self._cam_net,  # type: ignore[arg-type]
                [job.image for job in jobs],
                [list(job.classes) for job in jobs],
                scales=self.scales,
                flip=self.flip,
                mean=norm.mean,
                std=norm.std,
                autocast_dtype=self.dtype if self.mode == "fast" else None,
                channels_last=self.channels_last,
                max_batch=None if self.batch_flips or len(jobs) > 1 else 1,
            )
        cams = [r.cams.cpu().numpy() for r in results]  # (K_present, H, W) float32; synchronises CUDA
        share = (time.perf_counter() - t0) / len(jobs)
        for job, res, c in zip(jobs, results, cams):
            assert res.classes == job.classes
            job.cams = c
            job.timings["network"] = share

    def _finish(self, job: _Job, crf_mask: np.ndarray | None) -> Prediction:
        assert job.cams is not None
        t0 = time.perf_counter()
        mask: np.ndarray | None = None
        if "mask" in job.outputs:
            mask = crf_mask if job.crf else cams_to_label(job.cams, job.classes, job.bg_threshold)
        names = tuple(self.class_names[c] for c in job.classes)
        heatmaps: dict[str, np.ndarray] = {}
        if "heatmaps" in job.outputs:
            heatmaps = {n: heatmap_overlay(job.image, cam) for n, cam in zip(names, job.cams)}
        timings = {
            "network": job.timings["network"],
            "crf": job.timings.get("crf", 0.0),
            "postprocess": time.perf_counter() - t0,
        }
        if "classify" in job.timings:
            timings["classify"] = job.timings["classify"]
        timings["total"] = time.perf_counter() - job.t_start
        settings = self.settings(
            crf=job.crf, bg_threshold=job.bg_threshold, crf_iters=job.crf_iters, crf_alpha=job.crf_alpha
        )
        scores: dict[str, float] | None = None
        if job.class_scores is not None:
            scores = dict(zip(self.class_names, (float(p) for p in job.class_scores)))
            settings.update(labels=AUTO_LABELS, label_threshold=job.label_threshold, classifier=CLASSIFIER)
        return Prediction(
            mask=mask,
            cams=job.cams if "cams" in job.outputs else None,
            classes=job.classes,
            class_names=names,
            image_size=(int(job.image.shape[0]), int(job.image.shape[1])),
            heatmaps=heatmaps,
            settings=settings,
            timings=timings,
            labels_source="given" if job.class_scores is None else "predicted",
            class_scores=scores,
        )

    def warm_up(self, size: tuple[int, int] = (64, 48)) -> float:
        """One small prediction (a ``size`` = (W, H) grey image, the first class, every scale and flip,
        no CRF), so the first real image does not pay for thread pools, oneDNN's set-up and, with
        ``compile=True``, the compilation; returns its seconds."""
        t0 = time.perf_counter()
        w, h = size
        self.predict(np.full((h, w, 3), 128, dtype=np.uint8), [0], outputs={"cams"})
        return time.perf_counter() - t0

    def predict(
        self,
        image: np.ndarray,
        labels: Labels,
        *,
        crf: bool = False,
        bg_threshold: float | None = None,
        crf_iters: int = CRF_ITERS,
        crf_alpha: float = CRF_ALPHA,
        outputs: Iterable[str] | str = DEFAULT_OUTPUTS,
        label_threshold: float = DEFAULT_LABEL_THRESHOLD,
    ) -> Prediction:
        """Pseudo-label one image.

        Args:
            image: (H, W, 3) uint8 RGB.
            labels: the classes present in the image: names (any case) or channel indices, or a mix;
                or the string ``"auto"`` (any case): the classes whose :meth:`classify` probability is
                ``>= label_threshold``, the top-1 when none is.
            crf: refine the mask with the inference dense CRF (algorithm.md 5.4) and take its argmax.
            bg_threshold: background score of the thresholded mask (default: the checkpoint's, 0.22
                for the official one); unused by the CRF mask but recorded.
            crf_iters, crf_alpha: mean-field iterations and the background exponent (README: 8, 7).
            outputs: any of ``"mask"``, ``"cams"``, ``"heatmaps"``; the others are ``None``/empty.
            label_threshold: in [0, 1]; used with ``labels="auto"`` only.

        Returns:
            :class:`Prediction` at the original (H, W).
        """
        kw: dict[str, Any] = dict(
            crf_iters=crf_iters, crf_alpha=crf_alpha, outputs=outputs, label_threshold=label_threshold
        )
        job = self._prepare(image, labels, crf=crf, bg_threshold=bg_threshold, **kw)
        self._run_network(job)
        mask = None
        if job.crf and "mask" in job.outputs:
            assert job.cams is not None
            mask, job.timings["crf"] = _crf_mask(
                job.image, job.cams, job.classes, job.crf_alpha, job.crf_iters
            )
        return self._finish(job, mask)

    def predict_many(
        self,
        items: Iterable[tuple[np.ndarray, Labels]],
        *,
        crf: bool = False,
        crf_workers: int = 0,
        bg_threshold: float | None = None,
        crf_iters: int = CRF_ITERS,
        crf_alpha: float = CRF_ALPHA,
        outputs: Iterable[str] | str = DEFAULT_OUTPUTS,
        label_threshold: float = DEFAULT_LABEL_THRESHOLD,
        batch_images: int | None = None,
    ) -> Iterator[Prediction]:
        """Predict a stream of ``(image, labels)`` pairs, in order.

        The stream is read ``batch_images`` pairs at a time (default: the predictor's
        ``batch_images``, 4 on CUDA, 1 on the CPU); the images of such a window that share a size
        share the network's forwards (:meth:`_run_networks`). With ``crf=True`` and
        ``crf_workers > 0`` the CRF of each image runs in a process pool while the network works on
        the next images (pydensecrf holds the GIL, so threads would not overlap); at most
        ``crf_workers + batch_images`` images wait for their CRF, so a window's CRFs run while the
        network works on the next window. The results
        equal :meth:`predict`'s (batched forwards: to the last float32 bits); ``timings["crf"]`` is
        the CRF's time in its worker, ``timings["network"]`` the image's share of its batch.
        ``labels`` may be ``"auto"`` per item (see :meth:`predict`).
        """
        kw: dict[str, Any] = dict(
            crf=crf,
            bg_threshold=bg_threshold,
            crf_iters=crf_iters,
            crf_alpha=crf_alpha,
            label_threshold=label_threshold,
        )
        if crf_workers < 0:
            raise ValueError(f"crf_workers must be >= 0, got {crf_workers}")
        window = self.batch_images if batch_images is None else batch_images
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"batch_images must be an integer >= 1, got {window!r}")
        outs = frozenset([outputs] if isinstance(outputs, str) else outputs)
        kw["outputs"] = outs
        wants_crf = crf and "mask" in outs
        pooled = wants_crf and crf_workers > 0
        with contextlib.ExitStack() as stack:
            pool: ProcessPoolExecutor | None = None
            if pooled:  # spawn: no fork of a process holding torch threads / CUDA
                ctx = multiprocessing.get_context("spawn")
                pool = stack.enter_context(ProcessPoolExecutor(max_workers=crf_workers, mp_context=ctx))
            pending: deque[tuple[_Job, Future[tuple[np.ndarray, float]] | None]] = deque()
            # CRFs in flight: a window's wait while the network runs the next window
            lag = crf_workers + window - 1 if pooled else 0

            def done(job: _Job, fut: Future[tuple[np.ndarray, float]] | None) -> Prediction:
                mask = None
                if fut is not None:
                    mask, job.timings["crf"] = fut.result()
                elif wants_crf:
                    assert job.cams is not None
                    mask, job.timings["crf"] = _crf_mask(
                        job.image, job.cams, job.classes, job.crf_alpha, job.crf_iters
                    )
                return self._finish(job, mask)

            it = iter(items)
            while True:
                jobs = [self._prepare(image, labels, **kw) for image, labels in itertools.islice(it, window)]
                if not jobs:
                    break
                by_size: dict[tuple[int, ...], list[_Job]] = {}
                for job in jobs:
                    by_size.setdefault(job.image.shape[:2], []).append(job)
                for group in by_size.values():
                    self._run_networks(group, window)
                for job in jobs:
                    fut = None
                    if pool is not None:
                        assert job.cams is not None
                        fut = pool.submit(
                            _crf_mask, job.image, job.cams, job.classes, job.crf_alpha, job.crf_iters
                        )
                    pending.append((job, fut))
                    while len(pending) > lag:
                        yield done(*pending.popleft())
            while pending:
                yield done(*pending.popleft())

    def __repr__(self) -> str:
        return (
            f"Predictor(mode={self.mode!r}, device={str(self.device)!r}, dtype={_dtype_name(self.dtype)}, "
            f"classes={self.num_classes}, scales={list(self.scales)}, flip={self.flip})"
        )
