"""Multi-scale CAM inference of the released HSC code, and the pseudo-labels made from it.

``multiscale_cam`` computes exactly what the official ``inference.py`` computes for one image
(algorithm.md 5.2): Pillow bicubic resizes, ImageNet normalisation in float64, ``forward_cam``,
softmax, bilinear (align_corners=False) back to the image size, foreground x label, flip back, sum
over the passes, per-class max-normalisation. It skips only work that changes no number: the image
and its flip run as one batch of two, only the labelled channels are resized, and everything runs
under ``torch.inference_mode``.

``cams_to_label`` is the thresholded PNG (5.3); ``crf_from_cams`` / ``crf_to_label`` are the
inference CRF of 5.4 and its conversion to a label map (6.5).

Two class-index spaces: ``classes`` are *network channel* indices (0..K-1, background = channel K
of the network); label maps and CRF keys are in *VOC label space* (0 = background, c+1 = class c).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .config import IMAGENET_MEAN, IMAGENET_STD
from .crf import check_rgb_image, crf_inference

OFFICIAL_SCALES = (0.5, 1.0, 1.5, 2.0)
LABEL_PRESENT = 1e-5  # a multi-hot entry above this marks a present class (official rule)
NORM_EPS = 1e-5  # A_c = S_c / (max S_c + NORM_EPS)


class CAMModel(Protocol):
    """Anything with ``forward_cam(x (N, 3, h, w)) -> (N, K+1, h', w')`` logits, background last."""

    def forward_cam(self, x: Tensor) -> Tensor: ...


class CAMPass(NamedTuple):
    """One forward pass of the multi-scale inference, resized to the image (H, W).

    scale:      resize factor of this pass
    flipped:    True for the horizontally flipped input (maps are flipped back)
    input_size: (3, H_s, W_s), the network input of this pass
    fg:         (K_present, H, W) float32, softmax probability x label of the present classes
    bg:         (H, W) float32, softmax probability of the background channel (not used by the CAM)
    """

    scale: float
    flipped: bool
    input_size: tuple[int, int, int]
    fg: Tensor
    bg: Tensor


class MultiScaleCAM(NamedTuple):
    """Result of :func:`multiscale_cam`.

    cams:    (K_present, H, W) float32 max-normalised CAMs, values in [0, 1), on the network's device
    classes: network channel index of each row of ``cams``, ascending
    passes:  the per-pass maps (official order: s0, s0 flipped, s1, ...) if requested, else ()

    The tensors are made under ``torch.inference_mode()``: ``clone()`` them before changing them in
    place outside it.
    """

    cams: Tensor
    classes: tuple[int, ...]
    passes: tuple[CAMPass, ...] = ()


# --------------------------------------------------------------------------------------------------
# input checks and pre-processing


check_image = check_rgb_image


def parse_labels(labels: Any, num_classes: int | None) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Present classes (ascending channel indices) and their label values.

    ``labels`` is either a multi-hot vector of length K (float or bool array/tensor/list; an entry
    above 1e-5 marks a present class, as in the official code) or a sequence of class indices
    (integers). ``num_classes`` (K) bounds the indices; ``None`` skips the range check.
    """
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D (multi-hot vector or class indices), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("labels are empty: at least one present class is needed")
    if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.floating):
        if num_classes is not None and arr.shape[0] != num_classes:
            raise ValueError(
                f"multi-hot labels have length {arr.shape[0]}, the network has {num_classes} classes"
            )
        values = arr.astype(np.float32)
        if not np.all(np.isfinite(values)):
            raise ValueError("multi-hot labels contain NaN or inf")
        idx = np.flatnonzero(values > LABEL_PRESENT)
        if idx.size == 0:
            raise ValueError("multi-hot labels mark no present class")
        return tuple(int(i) for i in idx), tuple(float(values[i]) for i in idx)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"labels must be a multi-hot (float/bool) vector or integer class indices, got {arr.dtype}"
        )
    classes = sorted(int(i) for i in arr)
    if len(set(classes)) != len(classes):
        raise ValueError(
            f"duplicate class indices {classes} (integer labels are class indices; "
            "pass a float or bool vector for a multi-hot label)"
        )
    bad = [c for c in classes if c < 0 or (num_classes is not None and c >= num_classes)]
    if bad:
        raise ValueError(f"class indices {bad} out of range [0, {num_classes})")
    return tuple(classes), (1.0,) * len(classes)


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """``(round(H*s), round(W*s))`` with Python's half-to-even ``round`` (37*0.5 -> 18)."""
    h, w = round(height * scale), round(width * scale)
    if h < 1 or w < 1:
        raise ValueError(f"scale {scale} shrinks a {height}x{width} image to {h}x{w}")
    return h, w


def resize_image(image: np.ndarray, scale: float) -> np.ndarray:
    """Pillow bicubic resize of an HWC uint8 image by ``scale``; the image itself when the size is kept."""
    h, w = scaled_size(image.shape[0], image.shape[1], scale)
    if (h, w) == image.shape[:2]:
        return image
    out = Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(out)


def normalize_image(
    image: np.ndarray | Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    device: torch.device | str | None = None,
) -> Tensor:
    """HWC uint8 -> (3, H, W) float32 ``(v/255 - mean)/std``, computed in float64 as the official code."""
    if isinstance(image, np.ndarray) and not image.flags.writeable:
        image = image.copy()  # torch warns on read-only arrays (Pillow's); a uint8 copy is cheap
    t = torch.as_tensor(image, device=device).permute(2, 0, 1).to(torch.float64)  # (3, H, W)
    m = torch.tensor(mean, dtype=torch.float64, device=t.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64, device=t.device).view(3, 1, 1)
    return ((t / 255.0 - m) / s).to(torch.float32)


def _upload(image: np.ndarray, device: torch.device) -> np.ndarray | Tensor:
    """The image as it goes to :func:`normalize_image`: unchanged for the CPU; for CUDA a uint8 tensor
    copied from pinned memory without blocking (the copy overlaps the previous pass's kernels)."""
    if device.type != "cuda":
        return image
    src = torch.from_numpy(np.ascontiguousarray(image) if image.flags.writeable else image.copy())
    return src.pin_memory().to(device, non_blocking=True)


def _forward_cam(net: CAMModel, x: Tensor, autocast_dtype: torch.dtype | None) -> Tensor:
    """``net.forward_cam(x)``; under ``torch.autocast(autocast_dtype)`` if given, logits back in float32."""
    if autocast_dtype is None:
        return net.forward_cam(x)
    with torch.autocast(device_type=x.device.type, dtype=autocast_dtype):
        logits = net.forward_cam(x)
    return logits.float()


def _device_of(net: object) -> torch.device:
    if not isinstance(net, nn.Module):
        return torch.device("cpu")
    for p in net.parameters():
        return p.device
    for b in net.buffers():
        return b.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# multi-scale CAM


def multiscale_cam(
    net: CAMModel,
    image: np.ndarray,
    labels: Any,
    *,
    scales: Sequence[float] = OFFICIAL_SCALES,
    flip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    return_passes: bool = False,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    batch_flips: bool = True,
) -> MultiScaleCAM:
    """The official multi-scale, flip-merged CAM of one image (algorithm.md 5.2).

    Args:
        net: a module with ``forward_cam(x: (N, 3, h, w)) -> (N, K+1, h', w')`` logits, background
            last; put it in ``eval()`` mode first (BatchNorm running statistics, no dropout).
        image: (H, W, 3) uint8 RGB.
        labels: multi-hot vector of length K, or a sequence of class indices (see :func:`parse_labels`).
        scales: resize factors; pass ``s`` runs on ``round(H*s) x round(W*s)`` (half to even); the
            maps always come back at (H, W).
        flip: also run the horizontally flipped image (as the official code does).
        mean, std: input normalisation (RGB, on [0, 1] values).
        return_passes: also return every pass's maps at (H, W) (for checks and visualisation).
        autocast_dtype: run only ``forward_cam`` under ``torch.autocast`` with this dtype
            (``torch.bfloat16`` on CPU; ``torch.float16``/``torch.bfloat16`` on CUDA); the logits are
            cast back to float32 before the softmax, so softmax, resizing, sum and normalisation stay
            float32. ``None`` (default): plain float32, the official numbers.
        channels_last: feed the network channels_last inputs (convert the network itself with
            ``net.to(memory_format=torch.channels_last)`` once, beforehand). Numbers may differ from
            the default in the last bits (another convolution algorithm).
        batch_flips: run a scale's image and its flip as one batch of two (default; faster on a
            GPU) or one at a time, as the official code does (faster on a CPU, and half the
            activation memory).

    Returns:
        :class:`MultiScaleCAM`: ``cams`` (K_present, H, W) float32 on the network's device, each class
        divided by its maximum + 1e-5; ``classes`` their channel indices (ascending).
    """
    (res,) = multiscale_cams(
        net,
        [image],
        [labels],
        scales=scales,
        flip=flip,
        mean=mean,
        std=std,
        return_passes=return_passes,
        autocast_dtype=autocast_dtype,
        channels_last=channels_last,
        max_batch=None if batch_flips else 1,
    )
    return res


class _ImageSum:
    """One image of :func:`multiscale_cams`: its classes, label weights, running sum and passes."""

    def __init__(self, labels: Any, num_classes: int | None, with_bg: bool, device: torch.device) -> None:
        self.classes, weights = parse_labels(labels, num_classes)
        self.n_fg = len(self.classes)
        # channels to resize: the present classes (and the background, only to report it per pass)
        self.channels = list(self.classes) + ([-1] if with_bg else [])
        self.weighted = any(w != 1.0 for w in weights)
        self.w_t = torch.tensor(weights, dtype=torch.float32, device=device).view(-1, 1, 1)
        self.total: Tensor | None = None
        self.passes: list[CAMPass] = []


def multiscale_cams(
    net: CAMModel,
    images: Sequence[np.ndarray],
    labels: Sequence[Any],
    *,
    scales: Sequence[float] = OFFICIAL_SCALES,
    flip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    return_passes: bool = False,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    max_batch: int | None = None,
) -> list[MultiScaleCAM]:
    """:func:`multiscale_cam` of several images of one size, their passes batched.

    Each scale runs the images (and their flips) of the list through the network together, in
    forwards of at most ``max_batch`` inputs (``None``: all ``len(images) * (1 + flip)`` at once;
    ``1``: one input at a time, the official way). Everything after the network is per image and in
    the official order, so each result is what :func:`multiscale_cam` gives for that image alone (up
    to the convolution algorithm a batch size selects: last bits of float32). What a GPU gains: a
    VOC image at scale 0.5 is a 250x188 input, far too small to fill an H100 alone.

    Args:
        images: (H, W, 3) uint8 RGB images, all of the same (H, W) (``ValueError`` otherwise).
        labels: one entry per image, as the ``labels`` of :func:`multiscale_cam`.
        max_batch: network inputs per forward, >= 1 or ``None``.
        The others: as :func:`multiscale_cam`.

    Returns:
        one :class:`MultiScaleCAM` per image, in order.
    """
    if isinstance(net, nn.Module) and net.training:
        raise ValueError("the network is in training mode (dropout active): call net.eval() first")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} label sets")
    if not images:
        return []
    if max_batch is not None and (isinstance(max_batch, bool) or int(max_batch) < 1):
        raise ValueError(f"max_batch must be >= 1 or None, got {max_batch!r}")
    checked = [check_image(im) for im in images]
    height, width = checked[0].shape[:2]
    for im in checked[1:]:
        if im.shape[:2] != (height, width):
            raise ValueError(
                f"images of one batch must share their size: {im.shape[:2]} vs {(height, width)}"
            )
    if not scales:
        raise ValueError("scales is empty")
    num_classes = getattr(net, "num_classes", None)
    device = _device_of(net)
    views = 2 if flip else 1

    nc = num_classes if isinstance(num_classes, int) else None
    states = [_ImageSum(lab, nc, return_passes, device) for lab in labels]
    with torch.inference_mode():
        for scale in scales:
            xs: list[Tensor] = []
            for im in checked:
                x = normalize_image(_upload(resize_image(im, scale), device), mean, std, device)  # (3, h, w)
                xs.extend([x, x.flip(-1)] if flip else [x])
            batch = torch.stack(xs)  # (n * views, 3, h, w)
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            step = batch.shape[0] if max_batch is None else int(max_batch)
            if step >= batch.shape[0]:
                logits = _forward_cam(net, batch, autocast_dtype)  # (n * views, K+1, h', w') float32
            else:
                logits = torch.cat([_forward_cam(net, b, autocast_dtype) for b in batch.split(step)])
            if logits.dim() != 4 or logits.shape[0] != batch.shape[0]:
                raise ValueError(f"forward_cam returned shape {tuple(logits.shape)}, expected (N, K+1, h, w)")
            k = logits.shape[1] - 1
            prob = torch.softmax(logits, dim=1)  # over all K+1 channels
            size = (3, int(batch.shape[2]), int(batch.shape[3]))
            for j, st in enumerate(states):
                if st.classes[-1] >= k:
                    raise ValueError(
                        f"class index {st.classes[-1]} out of range: the network has {k} classes"
                    )
                idx = torch.tensor([c if c >= 0 else k for c in st.channels], device=prob.device)
                maps = F.interpolate(
                    prob[j * views : (j + 1) * views].index_select(1, idx),
                    (height, width),
                    mode="bilinear",
                    align_corners=False,
                )  # (views, len(channels), H, W)
                for i in range(views):
                    m = maps[i].flip(-1) if i == 1 else maps[i]  # un-flip the flipped pass
                    fg = m[: st.n_fg] * st.w_t if st.weighted else m[: st.n_fg]
                    if st.total is None:
                        st.total = fg.clone()
                    else:
                        st.total += fg  # official order: s0, s0 flipped, s1, ... (float32)
                    if return_passes:
                        st.passes.append(CAMPass(float(scale), i == 1, size, fg, m[st.n_fg]))
        out = []
        for st in states:
            assert st.total is not None
            cams = st.total / (st.total.amax(dim=(1, 2), keepdim=True) + NORM_EPS)
            out.append(MultiScaleCAM(cams, st.classes, tuple(st.passes)))
    return out


# --------------------------------------------------------------------------------------------------
# pseudo-labels


def _as_numpy(a: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _check_cams(cams: np.ndarray, classes: Sequence[int]) -> None:
    if cams.ndim != 3:
        raise ValueError(f"cams must be (K_present, H, W), got shape {cams.shape}")
    if len(classes) != cams.shape[0] or cams.shape[0] == 0:
        raise ValueError(f"{cams.shape[0]} CAM maps but {len(classes)} classes (need at least one)")
    if any(int(c) < 0 for c in classes):
        raise ValueError(f"negative class index in {list(classes)}")


def cams_to_label(
    cams: np.ndarray | Tensor, classes: Sequence[int], bg_threshold: float = 0.22
) -> np.ndarray:
    """Thresholded pseudo-label (algorithm.md 5.3): (H, W) uint8 in VOC label space.

    Scores: background = ``bg_threshold`` (stored as float32, as the official float32 array), class
    ``c`` = its CAM; the first maximum wins, so the background wins exact ties and a lower class
    wins ties between classes. Values are 0 or ``c + 1`` for ``c`` in ``classes``.
    """
    a = _as_numpy(cams).astype(np.float32, copy=False)
    _check_cams(a, classes)
    if max(classes) + 1 > 255:
        raise ValueError("class indices must be < 255 for a uint8 label map")
    best = a.argmax(axis=0)  # first maximum among the classes
    peak = np.take_along_axis(a, best[None], axis=0)[0]
    lut = np.asarray([int(c) + 1 for c in classes], dtype=np.uint8)
    return np.where(peak > np.float32(bg_threshold), lut[best], np.uint8(0)).astype(np.uint8)


def crf_unary_scores(cams: np.ndarray | Tensor, alpha: float) -> np.ndarray:
    """``[(1 - max_k cam)^alpha, cams...]`` (K_present+1, H, W) float32, not renormalised (5.4 step 1)."""
    a = _as_numpy(cams).astype(np.float32, copy=False)
    bg = np.power(np.float32(1.0) - a.max(axis=0, keepdims=True), np.float32(alpha))
    return np.concatenate([bg.astype(np.float32), a], axis=0)


def crf_from_cams(
    image: np.ndarray, cams: np.ndarray | Tensor, classes: Sequence[int], *, alpha: float, iters: int
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Inference dense CRF on the CAMs (algorithm.md 5.4).

    Returns ``Q`` (K_present+1, H, W) float32 (CRF marginals; row 0 = background) and ``keys``, the
    VOC label of each row: ``(0, c+1 for c in classes)``.
    """
    image = check_image(image)
    a = _as_numpy(cams)
    _check_cams(a, classes)
    if a.shape[1:] != image.shape[:2]:
        raise ValueError(f"cams are {a.shape[1:]} but the image is {image.shape[:2]}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    scores = crf_unary_scores(a, alpha)
    q = np.asarray(crf_inference(image, scores, iters), dtype=np.float32)
    q = q.reshape(scores.shape)
    return q, (0,) + tuple(int(c) + 1 for c in classes)


def crf_to_label(
    q: np.ndarray | Tensor, keys: Sequence[int], height: int | None = None, width: int | None = None
) -> np.ndarray:
    """Argmax of the CRF marginals over ``keys`` -> (H, W) uint8 VOC labels (algorithm.md 6.5).

    ``q`` is (L, H, W), or (L, H*W) with ``height`` and ``width`` given. The first maximum wins
    (keys ascending: background, then lower classes). Classes not in ``keys`` never appear.
    """
    a = _as_numpy(q)
    if a.ndim == 2:
        if height is None or width is None:
            raise ValueError("q is (L, H*W): height and width are needed")
        a = a.reshape(a.shape[0], height, width)
    if a.ndim != 3 or a.shape[0] != len(keys) or len(keys) == 0:
        raise ValueError(f"q has shape {a.shape} for {len(keys)} keys")
    if (height is not None and a.shape[1] != height) or (width is not None and a.shape[2] != width):
        raise ValueError(f"q is {a.shape[1:]} but {height}x{width} was asked")
    lut = np.asarray(keys, dtype=np.int64)
    if lut.min() < 0 or lut.max() > 255:
        raise ValueError(f"keys {list(keys)} do not fit uint8 labels")
    return lut[a.argmax(axis=0)].astype(np.uint8)
