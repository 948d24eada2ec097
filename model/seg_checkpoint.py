"""Reading and writing step-2 segmentation (DeepLab) weights.

Two kinds of file:

* **our format**: one ``.safetensors`` file with the network's state dict (the official key names,
  ``backbone.``/``aspp.``/``cls_conv.``) and one JSON metadata string: the label names (index 0 is
  ``background``, as in the VOC label space the network predicts), the network's shape
  (:meth:`DeepLabV2.config`), the normalisation, the training config and step. Written by
  :func:`save_segmenter` (atomically), read by :func:`load_segmenter`.
* **the official step-2 state dict** (``deeplabv2_resnet101_VOCDataset_itr20000_all.pth``, 674 keys for
  21 classes): :func:`load_segmenter` reads it too, strictly (the official ``test.py`` loads with
  ``strict=False``, which silently keeps random weights for a wrong file). Its shape is read off the
  tensors (classes from ``cls_conv.weight``, stem from ``backbone.conv1``, blocks per stage from the
  ``layerN.M`` keys); label names default to VOC's for 21 classes.

Every problem raises one :class:`~hsc.model.checkpoint.CheckpointError` naming the file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import (
    CheckpointError,
    _as_tensor_dict,
    _existing_file,
    _jsonable,
    _read_safetensors,
    _safetensors_metadata,
    _strip_wrapper_prefix,
    _torch_load,
    _unwrap,
    file_sha256,
    parse_meta,
    sniff_file,
    software_versions,
    write_safetensors_atomic,
)
from .classes import VOC_CLASSES
from .config import Normalization
from .deeplab import DeepLabV2

FORMAT = "hsc-segmenter"
FORMAT_VERSION = 1
META_KEY = "hsc"

PathLike = str | os.PathLike[str]


@dataclass
class LoadedSegmenter:
    """A step-2 network ready for inference, with what its file says about it."""

    net: DeepLabV2
    label_names: tuple[str, ...]  # index 0 = background
    normalization: Normalization
    path: Path
    sha256: str
    source_format: str  # FORMAT or "official-deeplab-state-dict"
    step: int | None = None
    train_config: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _check_label_names(names: Sequence[str], num_classes: int, source: str) -> tuple[str, ...]:
    names = tuple(str(n) for n in names)
    if len(names) != num_classes:
        raise CheckpointError(
            f"{source}: {len(names)} label names for a network with {num_classes} output channels "
            "(background first, then the classes)"
        )
    if len(set(names)) != len(names):
        raise CheckpointError(f"{source}: duplicate label names in {list(names)}")
    return names


def save_segmenter(
    path: PathLike,
    net: nn.Module,
    *,
    label_names: Sequence[str],
    normalization: Normalization | None = None,
    train_config: Mapping[str, Any] | Any | None = None,
    step: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Write a :class:`DeepLabV2` (wrappers unwrapped) and its metadata to ``path`` through a temporary
    file and ``os.replace``; returns the file's SHA-256."""
    inner = _unwrap(net)
    if not isinstance(inner, DeepLabV2):
        raise TypeError(f"expected a DeepLabV2, got {type(inner).__name__}")
    names = _check_label_names(label_names, inner.num_classes, "label_names")
    norm = normalization or Normalization()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in inner.state_dict().items()}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "label_names": list(names),
        "net_config": inner.config(),
        "network_type": "deeplabv2",
        "normalization": {"mean": list(norm.mean), "std": list(norm.std)},
        "input": "RGB, x = (v / 255 - mean) / std; output: logits over label_names (0 = background)",
        "step": None if step is None else int(step),
        "train_config": None if train_config is None else _jsonable(train_config, "train_config"),
        "num_parameters": sum(p.numel() for p in inner.parameters()),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "software": software_versions(),
        "extra": _jsonable(dict(extra or {}), "extra"),
    }
    return write_safetensors_atomic(Path(path), tensors, meta)


_LAYER_KEY = re.compile(r"^backbone\.layer([1-4])\.(\d+)\.")


def infer_deeplab_config(state_dict: Mapping[str, Tensor], source: str = "state dict") -> dict[str, Any]:
    """The :meth:`DeepLabV2.config` of a state dict, read off its keys and shapes."""
    if "cls_conv.weight" not in state_dict:
        raise CheckpointError(f"{source}: no cls_conv.weight: not a DeepLab (step-2) state dict")
    w = state_dict["cls_conv.weight"]
    blocks = [0, 0, 0, 0]
    for k in state_dict:
        m = _LAYER_KEY.match(k)
        if m:
            i = int(m.group(1)) - 1
            blocks[i] = max(blocks[i], int(m.group(2)) + 1)
    if min(blocks) == 0:
        raise CheckpointError(
            f"{source}: backbone.layer1..layer4 keys are missing (blocks per stage {blocks})"
        )
    stem = "deep" if "backbone.conv1.0.weight" in state_dict else "torchvision"
    rates = []
    i = 1
    while f"aspp.branch{i}.0.weight" in state_dict:
        rates.append(i)
        i += 1
    official_rates = [6, 12, 18, 24]
    if len(rates) != len(official_rates):
        raise CheckpointError(
            f"{source}: {len(rates)} ASPP branches; only the official 4 (rates 6/12/18/24) can be read "
            "from a bare state dict (dilation rates are not stored in it)"
        )
    return {
        "num_classes": int(w.shape[0]),
        "stem": stem,
        "layers": blocks,
        "aspp_channels": int(w.shape[1]),
        "rates": official_rates,
        "image_pooling": "aspp.branch5_conv.weight" in state_dict,
    }


def _load_strict(net: DeepLabV2, sd: Mapping[str, Tensor], source: str) -> None:
    own = net.state_dict()
    sd = dict(sd)
    for k, v in own.items():  # files from older PyTorch may lack num_batches_tracked
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = v
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k}: file {list(sd[k].shape)} vs network {list(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} missing keys: {', '.join(missing[:20])}"
                + (" ..." if len(missing) > 20 else "")
            )
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected keys: {', '.join(unexpected[:20])}"
                + (" ..." if len(unexpected) > 20 else "")
            )
        if shapes:
            parts.append("shape differences: " + "; ".join(shapes[:20]))
        raise CheckpointError(f"{source}: does not match the DeepLab network: " + " | ".join(parts))
    net.load_state_dict(sd, strict=True)


def is_segmenter_file(path: PathLike) -> bool:
    """Whether ``path`` holds a step-2 network: our segmenter format, or a state dict with the
    DeepLab head ``cls_conv.weight``. Unreadable files answer False (their loader explains why)."""
    p = Path(path)
    try:
        kind = sniff_file(p)
        if kind == "safetensors":
            meta = json.loads(_safetensors_metadata(p).get(META_KEY, "{}"))
            return isinstance(meta, dict) and meta.get("format") == FORMAT
        if kind == "torch":
            keys = _strip_wrapper_prefix(_as_tensor_dict(_torch_load(p), p))
            return "cls_conv.weight" in keys
    except (CheckpointError, OSError, ValueError):
        return False
    return False


def load_segmenter(
    path: PathLike,
    *,
    label_names: Sequence[str] | None = None,
    placeholder_names: bool = False,
    map_location: str | torch.device = "cpu",
) -> LoadedSegmenter:
    """Read our ``.safetensors`` segmenter or an official step-2 ``.pth``; the network comes back in
    eval mode. ``label_names`` (background first) names the classes of an official file with other
    than VOC's 21 outputs; without them such a file is refused, or with ``placeholder_names`` named
    ``background, class_1, class_2, ...`` (for inspecting it)."""
    p = _existing_file(path)
    kind = sniff_file(p)
    meta: dict[str, Any] = {}
    if kind == "safetensors":
        tensors, header = _read_safetensors(p)
        meta = parse_meta(
            header, str(p), fmt=FORMAT, max_version=FORMAT_VERSION, no_meta_hint="not an hsc segmenter"
        )
        try:
            cfg = dict(meta["net_config"])
            net = DeepLabV2.from_config(cfg)
            names = _check_label_names(meta["label_names"], net.num_classes, str(p))
            norm = meta["normalization"]
            normalization = Normalization(mean=tuple(norm["mean"]), std=tuple(norm["std"]))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{p}: incomplete or invalid metadata ({type(e).__name__}: {e})") from None
        source_format = FORMAT
    elif kind == "torch":
        tensors = _strip_wrapper_prefix(_as_tensor_dict(_torch_load(p), p))
        cfg = infer_deeplab_config(tensors, str(p))
        net = DeepLabV2.from_config(cfg)
        if label_names is None and placeholder_names and net.num_classes != len(VOC_CLASSES) + 1:
            label_names = ("background", *(f"class_{i}" for i in range(1, net.num_classes)))
        if label_names is None:
            if net.num_classes != len(VOC_CLASSES) + 1:
                raise CheckpointError(
                    f"{p}: {net.num_classes} output channels (not VOC's 21): pass label_names "
                    "(background first)"
                )
            label_names = ("background", *VOC_CLASSES)
        names = _check_label_names(label_names, net.num_classes, str(p))
        normalization = Normalization()
        source_format = "official-deeplab-state-dict"
    else:
        raise CheckpointError(f"{p}: an MXNet file, not a DeepLab checkpoint")
    _load_strict(net, tensors, str(p))
    net.to(map_location).eval()
    tc = meta.get("train_config")
    return LoadedSegmenter(
        net=net,
        label_names=names,
        normalization=normalization,
        path=p,
        sha256=file_sha256(p),
        source_format=source_format,
        step=meta.get("step"),
        train_config=dict(tc) if isinstance(tc, dict) else None,
        meta=meta,
    )
