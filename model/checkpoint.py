"""Reading and writing HSC weights.

Three kinds of file (docs/algorithm.md 1.6, 1.7, 2.6):

* **official HSC state dict** (``HSC_eps_v2.pth``): the 242 keys of the network, ``torch.save``-d.
  :func:`load_official` (or :func:`load_any`) reads it strictly; ``module.``/``_orig_mod.`` prefixes and
  missing ``num_batches_tracked`` are accepted; ``num_classes`` and ``width`` are read off the tensors.
* **ImageNet ResNet-38 initialisation**: the MXNet ``.params`` file (read by :mod:`.mxnet_params`) or a
  PyTorch conversion with our key names. :func:`load_imagenet_weights` loads the backbone only and
  returns an :class:`ImageNetLoadReport`.
* **our format**: one ``.safetensors`` file holding the network weights (the official key names), the
  momentum banks under ``banks.`` and one JSON metadata string (class names, network config,
  normalisation, background threshold, training config, step, versions). :func:`save_checkpoint` /
  :func:`load_checkpoint`; :func:`convert_official` turns an official file into one.

Every problem with a file raises one :class:`CheckpointError` whose message names the file and lists
everything that is wrong (all missing keys, unexpected keys and shape differences). Files are never
unpickled beyond ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import pickle
import platform
import re
import struct
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from .classes import VOC_CLASSES
from .config import HSCNetConfig, ModelInfo, Normalization
from .hsc_net import HSCNet
from .mxnet_params import MXNetParamsError, is_mxnet_params, read_mxnet_params

FORMAT = "hsc-checkpoint"
FORMAT_VERSION = 1
META_KEY = "hsc"  # the one safetensors metadata entry; its value is a JSON object
BANKS_PREFIX = "banks."
OFFICIAL_FORMAT = "official-hsc-state-dict"
DEFAULT_BG_THRESHOLD = 0.22

# Top-level modules of the ResNet-38d trunk in state-dict order; every other key is a head.
BACKBONE_MODULES = (
    "conv1a",
    "b2", "b2_1", "b2_2",
    "b3", "b3_1", "b3_2",
    "b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5",
    "b5", "b5_1", "b5_2",
    "b6", "b7", "bn7",
)  # fmt: skip
NUM_BATCHES = "num_batches_tracked"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile

PathLike = str | os.PathLike[str]
FileKind = Literal["safetensors", "mxnet", "torch"]
T = TypeVar("T")


class CheckpointError(ValueError):
    """A weight file cannot be used; the message names the file and everything that is wrong."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The weight file does not exist (also a ``FileNotFoundError``)."""


# ------------------------------------------------------------------------------------------------
# raw files


def _existing_file(path: PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"{p}: no such file")
    if not p.is_file():
        raise CheckpointError(f"{p}: not a regular file")
    return p


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sniff_file(path: PathLike) -> FileKind:
    """Which reader a file needs, from its first bytes (not its name).

    ``safetensors`` (8-byte header length, then ``{``), ``mxnet`` (NDArray-list magic) or ``torch``
    (a ``torch.save`` zip or legacy pickle -- or anything else, which ``torch.load`` then rejects).
    """
    p = _existing_file(path)
    size = p.stat().st_size
    if size == 0:
        raise CheckpointError(f"{p}: empty file")
    with open(p, "rb") as f:
        head = f.read(9)
    if is_mxnet_params(head):
        return "mxnet"
    if len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack_from("<Q", head)[0] <= size - 8:
        return "safetensors"
    return "torch"


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    return (line[:limit] + "...") if len(line) > limit else line


def _torch_load(p: Path) -> Any:
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler names the first global it would not import; any other complaint
        # (an unknown opcode, a truncated stream) means the bytes are not a checkpoint at all.
        msg = str(e)
        m = re.search(r"Unsupported (?:global: GLOBAL|class) ([\w.]+)", msg)
        if m:
            raise CheckpointError(
                f"{p}: refused to unpickle: the file holds a {m.group(1)} object, not only tensors and "
                "plain containers (checkpoints are read with torch.load(weights_only=True) only)"
            ) from None
        m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", msg)
        detail = m.group(1).strip() if m else _first_line(e)
        raise CheckpointError(
            f"{p}: not a PyTorch or safetensors checkpoint (unreadable pickle: {detail})"
        ) from None
    except Exception as e:  # corrupt zip, random bytes, truncated pickle, ...
        detail = _first_line(e).split(". ")[0]
        raise CheckpointError(
            f"{p}: not a readable PyTorch or safetensors checkpoint, corrupt or truncated "
            f"({type(e).__name__}: {detail})"
        ) from None


def _as_tensor_dict(obj: Any, p: Path) -> dict[str, Tensor]:
    """The state dict inside what ``torch.load`` returned (``{"state_dict": ...}`` wrappers unwrapped)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p}: holds a {type(obj).__name__}, not a state dict (a mapping of tensors)")
    if not all(isinstance(v, Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "net", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                return _as_tensor_dict(obj[key], p)
    bad = [
        f"{k!r} ({type(v).__name__})"
        for k, v in obj.items()
        if not isinstance(k, str) or not isinstance(v, Tensor)
    ]
    if bad:
        raise CheckpointError(f"{p}: not a state dict; entries that are not named tensors: {', '.join(bad)}")
    return dict(obj)


def _read_safetensors(p: Path, device: str = "cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safetensors.safe_open(str(p), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(
            f"{p}: not a readable safetensors file ({type(e).__name__}: {_first_line(e)})"
        ) from None
    return tensors, dict(meta)


def _safetensors_metadata(p: Path) -> dict[str, str]:
    try:
        with safetensors.safe_open(str(p), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(
            f"{p}: not a readable safetensors file ({type(e).__name__}: {_first_line(e)})"
        ) from None


def read_state_dict(path: PathLike) -> dict[str, Tensor]:
    """The tensors of a PyTorch (``torch.save``, read with ``weights_only=True``) or safetensors file,
    on the CPU, with their keys as stored. MXNet ``.params`` files: :func:`read_imagenet_weights`."""
    p = _existing_file(path)
    kind = sniff_file(p)
    if kind == "mxnet":
        raise CheckpointError(
            f"{p}: is an MXNet NDArray-list file (the ImageNet initialisation), not a state dict; "
            "load it with load_imagenet_weights()"
        )
    if kind == "safetensors":
        return _read_safetensors(p)[0]
    return _as_tensor_dict(_torch_load(p), p)


# ------------------------------------------------------------------------------------------------
# key remapping


def _strip_wrapper_prefix(sd: Mapping[str, T]) -> dict[str, T]:
    out = dict(sd)
    changed = True
    while changed and out:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
    return out


def official_filter_fn(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remap an official HSC state dict onto our keys: drop a ``module.`` (DataParallel) or
    ``_orig_mod.`` (torch.compile) prefix carried by every key, and add the ``num_batches_tracked``
    (int64 zero, what the official frozen-BN regime leaves there) of every BatchNorm that lacks it.
    Key names are otherwise identical (docs/algorithm.md 2.6)."""
    sd = _strip_wrapper_prefix(state_dict)
    for key in list(sd):
        if key.endswith(".running_mean"):
            nbt = key[: -len("running_mean")] + NUM_BATCHES
            sd.setdefault(nbt, torch.zeros((), dtype=torch.long))
    return sd


_MX_NAME = re.compile(
    r"res(?P<rs>\d)(?P<ru>a|b\d+)_branch(?P<rb>1|2a|2b1|2b2)_weight"
    r"|bn(?P<bs>\d)(?P<bu>a|b\d+)_branch(?P<bb>1|2a|2b1|2b2)_(?P<bp>gamma|beta|moving_mean|moving_var)"
    r"|bn7_(?P<b7>gamma|beta|moving_mean|moving_var)"
    r"|(?P<conv1a>conv1a)_weight"
)
_MX_BN_PARAM = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var"}
IMAGENET_CLASSIFIER = frozenset(
    {"linear1000_weight", "linear1000_bias", "linear1000.weight", "linear1000.bias"}
)


def _mx_unit(stage: str, unit: str) -> str:
    return f"b{stage}" if unit == "a" else f"b{stage}_{unit[1:]}"


def mxnet_name_to_key(name: str) -> str | None:
    """Our state-dict key for an MXNet ResNet-38 name (``arg:``/``aux:`` prefix ignored), or None.

    ``conv1a_weight`` -> ``conv1a.weight``; ``res4b5_branch2b1_weight`` -> ``b4_5.conv_branch2b1.weight``;
    ``bn6a_branch2a_gamma`` -> ``b6.bn_branch2a.weight``; ``bn7_moving_var`` -> ``bn7.running_var``
    (docs/algorithm.md 1.6). The ImageNet classifier ``linear1000_*`` maps to nothing (None).
    """
    bare = name.split(":", 1)[1] if name.startswith(("arg:", "aux:")) else name
    m = _MX_NAME.fullmatch(bare)
    if m is None:
        return None
    g = m.groupdict()
    if g["conv1a"]:
        return "conv1a.weight"
    if g["rs"]:
        return f"{_mx_unit(g['rs'], g['ru'])}.conv_branch{g['rb']}.weight"
    if g["bs"]:
        return f"{_mx_unit(g['bs'], g['bu'])}.bn_branch{g['bb']}.{_MX_BN_PARAM[g['bp']]}"
    return f"bn7.{_MX_BN_PARAM[g['b7']]}"


def backbone_keys(net: nn.Module) -> list[str]:
    """State-dict keys of the ResNet-38d trunk (``num_batches_tracked`` included), in order."""
    return [k for k in net.state_dict() if k.split(".", 1)[0] in BACKBONE_MODULES]


def imagenet_filter_fn(
    weights: Mapping[str, T], backbone: Collection[str]
) -> tuple[dict[str, T], list[str], list[str]]:
    """Remap ImageNet ResNet-38 weights onto the backbone keys ``backbone``.

    ``weights`` has MXNet names (``arg:res2a_branch1_weight``, ...) or our names (a PyTorch conversion,
    possibly ``module.``-prefixed). Returns ``(kept, dropped, unexpected)``: ``kept`` maps backbone keys to
    values, ``dropped`` lists the ImageNet classifier (removed on purpose), ``unexpected`` every other name
    (one that cannot be mapped, or a non-backbone key such as a head of a full checkpoint).
    """
    keys = set(backbone)
    kept: dict[str, T] = {}
    source: dict[str, str] = {}
    dropped: list[str] = []
    unexpected: list[str] = []
    for name, value in _strip_wrapper_prefix(weights).items():
        bare = name.split(":", 1)[1] if name.startswith(("arg:", "aux:")) else name
        if bare in IMAGENET_CLASSIFIER:
            dropped.append(name)
            continue
        key = bare if bare in keys else mxnet_name_to_key(bare)
        if key is None or key not in keys:
            unexpected.append(name)
            continue
        if key in kept:
            raise CheckpointError(f"both {source[key]!r} and {name!r} map to the backbone key {key!r}")
        kept[key], source[key] = value, name
    return kept, dropped, unexpected


# ------------------------------------------------------------------------------------------------
# strict comparison and building the network


def _shape(t: Any) -> list[int]:
    return [int(s) for s in t.shape]


def _describe_differences(
    expected: Mapping[str, Any], found: Mapping[str, Any]
) -> tuple[list[str], list[str], list[str]]:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k}: expected {_shape(expected[k])}, found {_shape(found[k])}"
        for k in expected
        if k in found and _shape(expected[k]) != _shape(found[k])
    ]
    return missing, unexpected, mismatched


def _difference_report(
    source: str, what: str, missing: list[str], unexpected: list[str], mismatched: list[str]
) -> str:
    sections = (
        ("missing key", "missing keys", missing),
        ("unexpected key", "unexpected keys", unexpected),
        ("shape mismatch", "shape mismatches", mismatched),
    )
    counts = ", ".join(
        f"{len(items)} {one if len(items) == 1 else many}" for one, many, items in sections if items
    )
    lines = [f"{source}: does not match {what}: {counts}"]
    for _, many, items in sections:
        if items:
            lines.append(f"  {many} ({len(items)}):")
            lines.extend(f"    {item}" for item in items)
    return "\n".join(lines)


def _meta_net(cfg: HSCNetConfig) -> HSCNet:
    """An :class:`HSCNet` on the meta device: shapes without memory or initialisation cost."""
    with torch.device("meta"):
        return HSCNet(cfg)


def check_state_dict(state_dict: Mapping[str, Any], cfg: HSCNetConfig, *, source: str = "state dict") -> None:
    """Raise one :class:`CheckpointError` listing every missing key, unexpected key and shape
    difference between ``state_dict`` and an :class:`HSCNet` of config ``cfg`` (no weights are built:
    works on meta tensors, so a width-1.0 check costs nothing)."""
    expected = _meta_net(cfg).state_dict()
    missing, unexpected, mismatched = _describe_differences(expected, state_dict)
    if missing or unexpected or mismatched:
        what = f"an HSC network (num_classes={cfg.num_classes}, width={cfg.width})"
        if state_dict and not set(state_dict) & set(expected):
            what += " -- none of its keys is an HSC network key, is it an HSC checkpoint at all?"
        raise CheckpointError(_difference_report(source, what, missing, unexpected, mismatched))


def _width_from_channels(state_dict: Mapping[str, Any]) -> float:
    """``conv1a`` rows / 64, unless another candidate (``bn7`` size / 4096, rounded) reproduces more of
    the dict's channel counts -- exact for any width, and for an inconsistent dict the width that
    makes the shortest list of shape differences."""
    candidates = [_shape(state_dict["conv1a.weight"])[0] / 64]
    if "bn7.weight" in state_dict:
        c4096 = _shape(state_dict["bn7.weight"])[0]
        candidates += [round(c4096 / 4096, d) for d in range(1, 7)] + [c4096 / 4096]
    reference = _meta_channels(state_dict)

    def fits(w: float) -> int:
        return sum(max(1, int(round(base * w))) == n for base, n in reference) if w > 0 else -1

    return float(max(candidates, key=fits))  # max() keeps the first of equal scores


def _meta_channels(state_dict: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(nominal, actual) channel counts that the dict reveals, for choosing the width."""
    probes = (
        ("conv1a.weight", 64),
        ("b2.conv_branch2a.weight", 128),
        ("b3.conv_branch2a.weight", 256),
        ("b4.conv_branch2a.weight", 512),
        ("b5.conv_branch2b1.weight", 1024),
        ("b6.conv_branch2b2.weight", 2048),
        ("bn7.weight", 4096),
    )
    return [(base, _shape(state_dict[k])[0]) for k, base in probes if k in state_dict]


def infer_net_config(state_dict: Mapping[str, Any], *, num_classes: int | None = None) -> HSCNetConfig:
    """The :class:`HSCNetConfig` an official-form state dict was made with.

    ``num_classes`` = rows of ``fc8.weight`` - 1; ``width`` from the channel counts (``conv1a.weight``
    rows / 64, refined with ``bn7``); ``pixel_dim``/``roi_dim`` from ``proj_fc``/``extra_F.0``. Keys that
    are absent leave the defaults (``num_classes`` if given), so :func:`check_state_dict` then lists
    what is wrong.
    """
    kw: dict[str, Any] = {}
    if "fc8.weight" in state_dict:
        kw["num_classes"] = _shape(state_dict["fc8.weight"])[0] - 1
    elif num_classes is not None:
        kw["num_classes"] = num_classes
    if "conv1a.weight" in state_dict:
        kw["width"] = _width_from_channels(state_dict)
    if "proj_fc.weight" in state_dict:
        kw["pixel_dim"] = _shape(state_dict["proj_fc.weight"])[0]
    if "extra_F.0.weight" in state_dict:
        kw["roi_dim"] = _shape(state_dict["extra_F.0.weight"])[0]
    try:
        return HSCNetConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"the tensors imply an invalid network config {kw}: {e}") from None


def net_from_state_dict(
    state_dict: Mapping[str, Tensor],
    cfg: HSCNetConfig,
    *,
    source: str = "state dict",
    map_location: str | torch.device = "cpu",
) -> HSCNet:
    """An :class:`HSCNet` of config ``cfg`` holding exactly ``state_dict`` (strict), in eval mode.

    The network is built on the meta device and materialised on ``map_location`` without random
    initialisation, so loading costs one copy of the weights.
    """
    check_state_dict(state_dict, cfg, source=source)
    net = _meta_net(cfg).to_empty(device=map_location)
    net.load_state_dict(state_dict, strict=True)
    return net.eval()


# ------------------------------------------------------------------------------------------------
# ImageNet initialisation


@dataclass(frozen=True)
class ImageNetLoadReport:
    """What :func:`load_imagenet_weights` did. ``missing`` lists backbone tensors the file lacks (they
    keep their fresh initialisation; ``num_batches_tracked`` never counts); ``unexpected`` the names it
    could not map; ``dropped`` the ImageNet classifier, removed on purpose."""

    source: str
    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    dropped: tuple[str, ...]

    @property
    def complete(self) -> bool:
        """Every backbone tensor came from the file."""
        return not self.missing

    def __str__(self) -> str:
        lines = [
            f"{self.source}: loaded {len(self.loaded)} backbone tensors, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.dropped)} dropped (ImageNet classifier)"
        ]
        if self.missing:
            lines.append(f"  missing: {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected: {', '.join(self.unexpected)}")
        return "\n".join(lines)


def read_imagenet_weights(path: PathLike) -> dict[str, Tensor]:
    """The raw tensors of an ImageNet initialisation file: an MXNet ``.params`` file (names as stored,
    ``arg:``/``aux:`` prefixes included), or a PyTorch / safetensors state dict."""
    p = _existing_file(path)
    if sniff_file(p) != "mxnet":
        return read_state_dict(p)
    try:
        arrays = read_mxnet_params(p)
    except MXNetParamsError as e:
        raise CheckpointError(str(e)) from None
    return {name: torch.from_numpy(a) for name, a in arrays.items()}


def load_imagenet_weights(net: nn.Module, weights: PathLike | Mapping[str, Tensor]) -> ImageNetLoadReport:
    """Initialise the ResNet-38d backbone of ``net`` from ImageNet weights (docs/algorithm.md 1.6).

    ``weights`` is a file (MXNet ``.params``, ``.pth`` or ``.safetensors``) or an already-read mapping.
    Only backbone keys are written; the heads keep their initialisation. A shape difference in a
    backbone key raises :class:`CheckpointError` (listing all of them) before anything is written.
    """
    if isinstance(weights, Mapping):
        source, raw = "ImageNet weights", dict(weights)
    else:
        source, raw = str(weights), read_imagenet_weights(weights)
    net = _unwrap(net)
    own = net.state_dict()
    bb = backbone_keys(net)
    kept, dropped, unexpected = imagenet_filter_fn(raw, bb)
    mismatched = [
        f"{k}: expected {_shape(own[k])}, found {_shape(v)}"
        for k, v in kept.items()
        if _shape(own[k]) != _shape(v)
    ]
    if mismatched:
        raise CheckpointError(
            _difference_report(source, "the network's ResNet-38d backbone", [], [], mismatched)
            + (
                f"\n  (the backbone has width {net.width}: is the file for another width?)"
                if hasattr(net, "width")
                else ""
            )
        )
    with torch.no_grad():
        for k, v in kept.items():
            own[k].copy_(v)
    missing = tuple(k for k in bb if k not in kept and not k.endswith(NUM_BATCHES))
    loaded = tuple(k for k in bb if k in kept)
    return ImageNetLoadReport(source, loaded, missing, tuple(unexpected), tuple(dropped))


# ------------------------------------------------------------------------------------------------
# our format


@dataclass
class LoadedCheckpoint:
    """A network with everything known about it.

    ``net`` is in eval mode on the requested device; ``banks`` maps momentum-bank buffer names to
    tensors (empty when the file has none); ``meta`` is the file's metadata as written (for an official
    file, a description built on load); ``sha256`` hashes the file's bytes.
    """

    net: HSCNet
    info: ModelInfo
    path: Path
    sha256: str
    meta: dict[str, Any]
    banks: dict[str, Tensor] = field(default_factory=dict)
    train_config: dict[str, Any] | None = None
    source_format: str = FORMAT

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    @property
    def step(self) -> int | None:
        step = self.meta.get("step")
        return int(step) if step is not None else None


def _unwrap(net: nn.Module) -> nn.Module:
    """The model inside DataParallel/DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    for attr in ("module", "_orig_mod"):
        while isinstance(getattr(net, attr, None), nn.Module):
            net = getattr(net, attr)
    return net


def _unwrap_net(net: nn.Module) -> HSCNet:
    inner = _unwrap(net)
    if not isinstance(inner, HSCNet):
        raise TypeError(f"expected an HSCNet, got {type(inner).__name__}")
    return inner


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _info_to_meta(info: ModelInfo) -> dict[str, Any]:
    k = info.net.num_classes
    return {
        "class_names": list(info.class_names),
        "num_classes": k,
        "cam_channels": k + 1,
        "background_channel": k,
        "net_config": info.net.to_dict(),
        "backbone": info.backbone,
        "network_type": info.network_type,
        "normalization": {"mean": list(info.normalization.mean), "std": list(info.normalization.std)},
        "input": "RGB, x = (v / 255 - mean) / std",
        "bg_threshold": info.bg_threshold,
    }


def _info_from_meta(meta: Mapping[str, Any], source: str) -> ModelInfo:
    try:
        norm = meta["normalization"]
        return ModelInfo(
            net=HSCNetConfig.from_dict(meta["net_config"]),
            class_names=tuple(str(c) for c in meta["class_names"]),
            normalization=Normalization(mean=tuple(norm["mean"]), std=tuple(norm["std"])),
            bg_threshold=float(meta["bg_threshold"]),
            network_type=str(meta["network_type"]),
            backbone=str(meta["backbone"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: incomplete or invalid metadata ({type(e).__name__}: {e})") from None


def _check_class_names(class_names: Collection[str], num_classes: int, source: str) -> None:
    if len(class_names) != num_classes:
        raise CheckpointError(
            f"{source}: {len(class_names)} class names for a network with {num_classes} foreground classes "
            f"(fc8 has {num_classes + 1} rows, background last)"
        )
    if len(set(class_names)) != len(class_names):
        raise CheckpointError(f"{source}: duplicate class names in {list(class_names)}")


def _jsonable(value: Any, what: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what} is not JSON-serialisable: {e}") from None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    path: PathLike,
    net: nn.Module,
    *,
    info: ModelInfo,
    banks: Mapping[str, Tensor] | nn.Module | None = None,
    train_config: Mapping[str, Any] | Any | None = None,
    step: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Write ``net`` (plus momentum ``banks`` and metadata) to one ``.safetensors`` file, atomically.

    Args:
        path: destination; written through a temporary file in the same folder and ``os.replace``.
        net: the :class:`HSCNet` (DDP/DataParallel/compiled wrappers are unwrapped).
        info: class names, normalisation, background threshold, ...; ``info.net`` must equal the
            network's config and ``info.class_names`` must name its ``num_classes`` classes.
        banks: momentum-bank buffers (a ``state_dict()`` or the module itself), stored as ``banks.<name>``.
        train_config: JSON-able dict (or dataclass) of the training run, stored verbatim.
        step: training step the weights belong to.
        extra: any other JSON-able information, stored under ``"extra"``.

    Returns:
        The SHA-256 of the written file.
    """
    net = _unwrap_net(net)
    dst = Path(path)
    if info.net != net.cfg:
        raise CheckpointError(f"info.net {info.net} differs from the network's config {net.cfg}")
    _check_class_names(info.class_names, net.cfg.num_classes, "info.class_names")
    if isinstance(banks, nn.Module):
        banks = banks.state_dict()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    bank_names: list[str] = []
    for name, t in (banks or {}).items():
        if not isinstance(t, Tensor):
            raise CheckpointError(f"bank {name!r} is a {type(t).__name__}, not a tensor")
        tensors[BANKS_PREFIX + name] = t.detach().to("cpu").clone().contiguous()
        bank_names.append(name)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **_info_to_meta(info),
        "step": None if step is None else int(step),
        "train_config": None if train_config is None else _jsonable(train_config, "train_config"),
        "banks": bank_names,
        "num_parameters": sum(p.numel() for p in net.parameters()),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "software": software_versions(),
        "extra": _jsonable(dict(extra or {}), "extra"),
    }
    return write_safetensors_atomic(dst, tensors, meta)


def software_versions() -> dict[str, str | None]:
    """The versions recorded in a checkpoint's metadata."""
    return {
        "hsc": _package_version("hsc"),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def write_safetensors_atomic(dst: Path, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> str:
    """Write ``tensors`` with ``meta`` as the one JSON metadata entry, through a temporary file in the
    same folder, ``fsync`` and ``os.replace``; returns the SHA-256 of the file."""
    header = {META_KEY: json.dumps(meta, allow_nan=False)}
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        safetensors.torch.save_file(dict(tensors), str(tmp), metadata=header)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = file_sha256(tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dst.parent)
    return digest


# what a file of another of our formats is for, named when it is given to the wrong loader
FORMAT_HINTS = {
    FORMAT: "a step-1 HSC checkpoint: use it with hsc infer",
    "hsc-segmenter": "a step-2 segmenter: use it with hsc segment",
}


def parse_meta(
    header: Mapping[str, str],
    source: str,
    *,
    fmt: str = FORMAT,
    max_version: int = FORMAT_VERSION,
    no_meta_hint: str = "for a bare official state dict use load_any() or convert_official()",
) -> dict[str, Any]:
    """The JSON metadata of one of our safetensors files, checked to be of format ``fmt`` with a
    ``format_version`` this code reads."""
    if META_KEY not in header:
        raise CheckpointError(
            f"{source}: a safetensors file without hsc metadata, not an {fmt} file ({no_meta_hint})"
        )
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{source}: the hsc metadata is not valid JSON ({e})") from None
    found = meta.get("format") if isinstance(meta, dict) else meta
    if not isinstance(meta, dict) or found != fmt:
        hint = FORMAT_HINTS.get(found) if isinstance(found, str) else None
        raise CheckpointError(
            f"{source}: metadata format is {found!r}, not {fmt!r}" + (f" ({hint})" if hint else "")
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{source}: invalid format_version {version!r}")
    if version > max_version:
        raise CheckpointError(
            f"{source}: format_version {version} was written by a newer hsc; "
            f"this one reads versions up to {max_version}"
        )
    return meta


def load_checkpoint(path: PathLike, *, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Read a file written by :func:`save_checkpoint`: the network is rebuilt from the stored config
    and loaded strictly; banks, training config and metadata come back as written."""
    p = _existing_file(path)
    if sniff_file(p) != "safetensors":
        raise CheckpointError(
            f"{p}: not an hsc checkpoint (not a safetensors file); official .pth files load with load_any()"
        )
    tensors, header = _read_safetensors(p)
    meta = parse_meta(header, str(p))
    info = _info_from_meta(meta, str(p))
    _check_class_names(info.class_names, info.net.num_classes, str(p))
    banks = {k[len(BANKS_PREFIX) :]: v for k, v in tensors.items() if k.startswith(BANKS_PREFIX)}
    order = meta.get("banks")  # safetensors sorts its keys; the metadata keeps the saved order
    if isinstance(order, list) and sorted(order) == sorted(banks):
        banks = {name: banks[name] for name in order}
    weights = {k: v for k, v in tensors.items() if not k.startswith(BANKS_PREFIX)}
    if "fc8.weight" in weights and _shape(weights["fc8.weight"])[0] != info.net.num_classes + 1:
        raise CheckpointError(
            f"{p}: the metadata names {info.net.num_classes} classes but fc8.weight has "
            f"{_shape(weights['fc8.weight'])[0]} rows (expected {info.net.num_classes + 1}, background last)"
        )
    net = net_from_state_dict(weights, info.net, source=str(p), map_location=map_location)
    train_config = meta.get("train_config")
    return LoadedCheckpoint(
        net=net,
        info=info,
        path=p,
        sha256=file_sha256(p),
        meta=meta,
        banks={k: v.to(map_location) for k, v in banks.items()},
        train_config=dict(train_config) if isinstance(train_config, dict) else None,
        source_format=FORMAT,
    )


# ------------------------------------------------------------------------------------------------
# official files


def _default_class_names(
    num_classes: int, class_names: Collection[str] | None, source: str
) -> tuple[str, ...]:
    if class_names is not None:
        names = tuple(class_names)
    elif num_classes == len(VOC_CLASSES):
        names = VOC_CLASSES
    else:
        raise CheckpointError(
            f"{source}: {num_classes} foreground classes (not the 20 of PASCAL VOC): pass class_names"
        )
    _check_class_names(names, num_classes, source)
    return names


def load_official(
    path: PathLike,
    *,
    class_names: Collection[str] | None = None,
    bg_threshold: float = DEFAULT_BG_THRESHOLD,
    map_location: str | torch.device = "cpu",
) -> LoadedCheckpoint:
    """Load an official-form HSC state dict (``HSC_eps_v2.pth``, ``.pth`` or ``.safetensors``) strictly.

    ``num_classes``/``width`` are read off the tensors; ``class_names`` default to VOC for 20 classes.
    """
    p = _existing_file(path)
    raw = read_state_dict(p)
    sd = official_filter_fn(raw)
    cfg = infer_net_config(sd, num_classes=None if class_names is None else len(class_names))
    names = _default_class_names(cfg.num_classes, class_names, str(p))
    net = net_from_state_dict(sd, cfg, source=str(p), map_location=map_location)
    info = ModelInfo(net=cfg, class_names=names, bg_threshold=bg_threshold)
    digest = file_sha256(p)
    meta = {
        "format": OFFICIAL_FORMAT,
        **_info_to_meta(info),
        "source": {"file": p.name, "sha256": digest, "keys": len(raw), "reader": sniff_file(p)},
    }
    return LoadedCheckpoint(
        net=net, info=info, path=p, sha256=digest, meta=meta, source_format=OFFICIAL_FORMAT
    )


def load_any(
    path: PathLike,
    class_names: Collection[str] | None = None,
    *,
    bg_threshold: float = DEFAULT_BG_THRESHOLD,
    map_location: str | torch.device = "cpu",
) -> LoadedCheckpoint:
    """Load our format or an official HSC state dict, whichever ``path`` is.

    For our format ``class_names``, if given, must equal the stored names (a guard against using a
    model with the wrong label set); ``bg_threshold`` applies to official files only (ours store it).
    """
    p = _existing_file(path)
    kind = sniff_file(p)
    if kind == "mxnet":
        raise CheckpointError(
            f"{p}: an MXNet .params file (ImageNet initialisation of the backbone), not an HSC checkpoint; "
            "use load_imagenet_weights() to initialise training from it"
        )
    if kind == "safetensors":
        if META_KEY in _safetensors_metadata(p):
            ckpt = load_checkpoint(p, map_location=map_location)
            if class_names is not None and tuple(class_names) != ckpt.info.class_names:
                raise CheckpointError(
                    f"{p}: stores class names {list(ckpt.info.class_names)}, "
                    f"not the requested {list(class_names)}"
                )
            return ckpt
    return load_official(p, class_names=class_names, bg_threshold=bg_threshold, map_location=map_location)


def convert_official(
    src: PathLike,
    dst: PathLike,
    *,
    class_names: Collection[str] | None = None,
    bg_threshold: float = DEFAULT_BG_THRESHOLD,
) -> str:
    """Turn an official HSC state dict into our ``.safetensors`` format (the ``hsc convert`` command).

    The weights are checked strictly first; the source file's name and SHA-256 are recorded under
    ``extra.converted_from``. Returns the SHA-256 of the written file.
    """
    ckpt = load_official(src, class_names=class_names, bg_threshold=bg_threshold)
    return save_checkpoint(
        dst,
        ckpt.net,
        info=ckpt.info,
        extra={"converted_from": {"format": OFFICIAL_FORMAT, **ckpt.meta["source"]}},
    )
