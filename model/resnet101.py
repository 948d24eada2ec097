"""Dilated ResNet-101 backbone of the step-2 segmentation network (docs/algorithm.md 7.1, 7.2).

Bottleneck blocks ``[3, 4, 23, 3]`` with stride and dilation on the 3x3 convolution ("v1.5"), dilated
to output stride 8: ``layer3`` keeps stride 1 with dilation 1 in its first block and 2 in the others,
``layer4`` dilation 2 then 4. Every convolution is bias-free; BatchNorm momentum 0.1.

Two stems, chosen by ``stem``:

* ``"deep"`` (the official one, PyTorch-Encoding's ``resnet101s``): ``conv1`` = Conv3x3(3->64, s2) - BN -
  ReLU - Conv3x3(64->64) - BN - ReLU - Conv3x3(64->128), then ``bn1`` (128), ReLU, MaxPool 3x3 s2;
* ``"torchvision"``: Conv7x7(3->64, s2) - ``bn1`` (64) - ReLU - MaxPool, so that torchvision's
  ``resnet101-*.pth`` loads by key name (its ``fc.*`` is dropped).

ImageNet weights are copied by key name with :func:`load_pretrained_state_dict`, which reports what was
loaded, missing and unexpected and refuses shape mismatches with a message that lists them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

Stem = Literal["deep", "torchvision"]

BLOCKS_RESNET101 = (3, 4, 23, 3)
BN_MOMENTUM = 0.1
# State-dict prefixes of an ImageNet file that the backbone drops on purpose (the classifier).
IGNORED_PREFIXES = ("fc.",)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 residual block with expansion 4."""

    expansion = 4

    def __init__(
        self,
        *,
        in_channels: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        bn_momentum: float = BN_MOMENTUM,
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes, momentum=bn_momentum)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet101(nn.Module):
    """Dilated ResNet-101 (output stride 8 by default).

    Arguments:
      stem: ``"deep"`` (three 3x3 convolutions, 128 channels; the official network) or ``"torchvision"``
        (one 7x7 convolution, 64 channels; loads torchvision's ImageNet file).
      dilated: ``True`` for output stride 8 (``layer3``/``layer4`` dilated instead of strided);
        ``False`` gives the plain output stride 32 network.
      bn_momentum: momentum of every BatchNorm (PyTorch convention).
      layers: blocks per stage; ``(3, 4, 23, 3)`` is ResNet-101.

    ``forward`` takes ``Bx3xHxW`` and returns the ``layer4`` map ``Bx2048xH'xW'`` with
    ``H' = ceil(H / output_stride)`` for sizes the stem does not round differently (e.g. 64 -> 8, 65 -> 9).
    """

    def __init__(
        self,
        *,
        stem: Stem = "deep",
        dilated: bool = True,
        bn_momentum: float = BN_MOMENTUM,
        layers: tuple[int, int, int, int] = BLOCKS_RESNET101,
    ) -> None:
        super().__init__()
        if stem not in ("deep", "torchvision"):
            raise ValueError(f"stem must be 'deep' or 'torchvision', got {stem!r}")
        self.stem = stem
        self.bn_momentum = bn_momentum
        self.conv1: nn.Module
        if stem == "deep":
            stem_channels = 128
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(64, momentum=bn_momentum),
                nn.ReLU(inplace=True),
                nn.Conv2d(64, 64, 3, padding=1, bias=False),
                nn.BatchNorm2d(64, momentum=bn_momentum),
                nn.ReLU(inplace=True),
                nn.Conv2d(64, stem_channels, 3, padding=1, bias=False),
            )
        else:
            stem_channels = 64
            self.conv1 = nn.Conv2d(3, stem_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        self._in_channels = stem_channels
        # (planes, stride, dilation of the first block, dilation of the other blocks)
        if dilated:
            stages = [(64, 1, 1, 1), (128, 2, 1, 1), (256, 1, 1, 2), (512, 1, 2, 4)]
        else:
            stages = [(64, 1, 1, 1), (128, 2, 1, 1), (256, 2, 1, 1), (512, 2, 1, 1)]
        self.layer1 = self._make_layer(layers[0], *stages[0])
        self.layer2 = self._make_layer(layers[1], *stages[1])
        self.layer3 = self._make_layer(layers[2], *stages[2])
        self.layer4 = self._make_layer(layers[3], *stages[3])
        self.out_channels = self._in_channels
        self.output_stride = 8 if dilated else 32
        self.reset_parameters()

    def _make_layer(
        self, blocks: int, planes: int, stride: int, first_dilation: int, dilation: int
    ) -> nn.Sequential:
        out_channels = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self._in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(self._in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels, momentum=self.bn_momentum),
            )
        modules = [
            Bottleneck(
                in_channels=self._in_channels,
                planes=planes,
                stride=stride,
                dilation=first_dilation,
                downsample=downsample,
                bn_momentum=self.bn_momentum,
            )
        ]
        self._in_channels = out_channels
        for _ in range(1, blocks):
            modules.append(
                Bottleneck(
                    in_channels=out_channels, planes=planes, dilation=dilation, bn_momentum=self.bn_momentum
                )
            )
        return nn.Sequential(*modules)

    def reset_parameters(self) -> None:
        """He initialisation (fan-out) for the convolutions, BatchNorm weight 1 / bias 0."""
        kaiming_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64|128, H/4, W/4)
        x = self.layer1(x)  # (B, 256, H/4, W/4)
        x = self.layer2(x)  # (B, 512, H/8, W/8)
        x = self.layer3(x)  # (B, 1024, H/8, W/8) when dilated
        return self.layer4(x)  # (B, 2048, H/8, W/8) when dilated


# --------------------------------------------------------------------------------------------------
# ImageNet weights


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_pretrained_state_dict` did, key by key (backbone key names).

    ``missing`` leaves out ``num_batches_tracked`` buffers (old files do not have them); ``ignored``
    holds the file's classifier keys (``fc.*``), dropped on purpose; ``mismatched`` holds
    ``(key, shape in the file, shape in the model)``.
    """

    loaded: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = field(default=())

    @property
    def ok(self) -> bool:
        """True when every model tensor was loaded and nothing else was in the file."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        return (
            f"loaded {len(self.loaded)}, missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
            f"ignored {len(self.ignored)}, shape-mismatched {len(self.mismatched)}"
        )


class PretrainedWeightsError(ValueError):
    """An ImageNet file that does not fit the backbone; ``report`` tells what was found."""

    def __init__(self, message: str, report: LoadReport) -> None:
        super().__init__(message)
        self.report = report


def _file_stem(keys: set[str]) -> str | None:
    if "conv1.0.weight" in keys:
        return "deep"
    if "conv1.weight" in keys:
        return "torchvision"
    return None


def _strip_prefix(state_dict: Mapping[str, object], prefix: str) -> dict[str, object]:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def load_pretrained_state_dict(
    backbone: ResNet101, state_dict: Mapping[str, object], *, strict: bool = False
) -> LoadReport:
    """Copy the tensors of ``state_dict`` whose keys exist in ``backbone`` into it (by key name).

    This is the official filtered load (docs/algorithm.md 7.2): model keys absent from the file keep
    their current (random) values, file keys absent from the model are skipped. A ``module.`` prefix
    (DataParallel) is removed; ``fc.*`` is dropped.

    Raises:
      PretrainedWeightsError: when a shared key has another shape (nothing is loaded then), or, with
        ``strict=True``, when a model tensor is missing from the file or the file has unexpected keys.
    """
    sd = _strip_prefix(state_dict, "module.")
    own = backbone.state_dict()
    loaded: list[str] = []
    unexpected: list[str] = []
    ignored: list[str] = []
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    new_values: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.startswith(IGNORED_PREFIXES):
            ignored.append(key)
        elif key not in own or not isinstance(value, Tensor):
            unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            loaded.append(key)
            new_values[key] = value
    missing = [k for k in own if k not in new_values and not k.endswith("num_batches_tracked")]
    report = LoadReport(
        loaded=tuple(loaded),
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        ignored=tuple(ignored),
        mismatched=tuple(mismatched),
    )
    if mismatched:
        lines = [f"  {k}: file {list(a)} vs model {list(b)}" for k, a, b in mismatched]
        hint = ""
        file_stem = _file_stem(set(sd))
        if file_stem is not None and file_stem != backbone.stem:
            hint = (
                f"\nThe file has a {file_stem!r} stem but the backbone was built with stem={backbone.stem!r};"
                f" build it with stem={file_stem!r}."
            )
        raise PretrainedWeightsError(
            f"{len(mismatched)} tensor(s) of the pretrained weights do not match the backbone's shapes"
            f" (nothing was loaded):\n" + "\n".join(lines) + hint,
            report,
        )
    if strict and (missing or unexpected):
        raise PretrainedWeightsError(
            "pretrained weights do not cover the backbone exactly:"
            f"\n  missing ({len(missing)}): {missing}\n  unexpected ({len(unexpected)}): {unexpected}",
            report,
        )
    with torch.no_grad():
        for key, value in new_values.items():
            own[key].copy_(value)
    return report


def kaiming_init_(module: nn.Module) -> None:
    """He initialisation (fan-out, ReLU) of every Conv2d weight in ``module`` and weight 1 / bias 0 of
    every BatchNorm2d; conv biases keep PyTorch's default uniform initialisation."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
