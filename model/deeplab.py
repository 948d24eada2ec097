"""Step-2 segmentation network: "DeepLab-v2" on a dilated ResNet-101 (docs/algorithm.md 7.1, 7.2, 7.4).

What the official code calls ``deeplabv2`` is a DeepLab-v3-style ASPP with DeepLab-v2's rates: four
dilated 3x3 branches (6, 12, 18, 24) and an image-pooling branch, each Conv - BN - ReLU, concatenated
and fused by Conv1x1 - BN - ReLU - Dropout(0.5); then one more Dropout(0.5), a 1x1 classifier
``cls_conv`` (with bias) and a bilinear (``align_corners=True``) upsampling to the input size.
State-dict prefixes ``backbone.``, ``aspp.``, ``cls_conv.`` (674 keys for 21 classes).

Only convolution parameters are optimised (:meth:`DeepLabV2.get_parameter_groups`); BatchNorm affine
parameters keep their initial values while their running statistics are updated in training mode.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .resnet101 import (
    BLOCKS_RESNET101,
    LoadReport,
    ResNet101,
    Stem,
    kaiming_init_,
    load_pretrained_state_dict,
)

ASPP_BN_MOMENTUM = 0.0003
ASPP_RATES = (6, 12, 18, 24)
# Learning-rate multipliers and weight-decay flags of the four parameter groups (7.4).
LR_MULTS = (1.0, 2.0, 10.0, 20.0)
WEIGHT_DECAY_GROUPS = (True, False, True, False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling with an image-pooling branch.

    Arguments:
      in_channels: channels of the backbone map (2048).
      out_channels: channels of every branch and of the output (256).
      rates: dilation (= padding) of the 3x3 branches ``branch1..branchN``.
      bn_momentum: momentum of every BatchNorm of the module.
      image_pooling: add the global branch (average pool -> Conv1x1 - BN - ReLU -> upsample).
      dropout: dropout probability after the fusion convolution.

    ``forward`` maps ``BxCinxhxw`` to ``BxCoutxhxw``.
    """

    def __init__(
        self,
        *,
        in_channels: int = 2048,
        out_channels: int = 256,
        rates: Sequence[int] = ASPP_RATES,
        bn_momentum: float = ASPP_BN_MOMENTUM,
        image_pooling: bool = True,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.rates = tuple(rates)
        self.image_pooling = image_pooling
        for i, rate in enumerate(self.rates, start=1):
            branch = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 3, padding=rate, dilation=rate, bias=False),
                nn.BatchNorm2d(out_channels, momentum=bn_momentum),
                nn.ReLU(inplace=True),
            )
            self.add_module(f"branch{i}", branch)
        n_branches = len(self.rates)
        if image_pooling:
            self.branch5_conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
            self.branch5_bn = nn.BatchNorm2d(out_channels, momentum=bn_momentum)
            self.branch5_relu = nn.ReLU(inplace=True)
            n_branches += 1
        self.conv_cat = nn.Sequential(
            nn.Conv2d(out_channels * n_branches, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels, momentum=bn_momentum),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        outs = [getattr(self, f"branch{i}")(x) for i in range(1, len(self.rates) + 1)]  # each (B, Co, h, w)
        if self.image_pooling:
            g = x.mean(dim=(2, 3), keepdim=True)  # (B, Cin, 1, 1)
            g = self.branch5_relu(self.branch5_bn(self.branch5_conv(g)))  # (B, Co, 1, 1)
            outs.append(F.interpolate(g, size=(h, w), mode="bilinear", align_corners=True))
        return self.conv_cat(torch.cat(outs, dim=1))  # (B, Co * n_branches, h, w) -> (B, Co, h, w)


class DeepLabV2(nn.Module):
    """Dilated ResNet-101 + ASPP + 1x1 classifier, logits at the input resolution.

    Arguments:
      num_classes: output channels in VOC label space (21 for VOC: background + 20; ``K + 1`` in general).
      stem: backbone stem, ``"deep"`` (official) or ``"torchvision"`` (see :mod:`hsc.model.resnet101`).
      aspp_channels: channels of the ASPP (256).
      rates: ASPP dilation rates.
      aspp_bn_momentum: BatchNorm momentum inside the ASPP (0.0003).
      backbone_bn_momentum: BatchNorm momentum of the backbone (0.1).
      dropout: probability of both dropouts (ASPP output and head).
      layers: backbone blocks per stage; ``(3, 4, 23, 3)`` is ResNet-101 (``(3, 4, 6, 3)`` has
        ResNet-50's depth; smaller ones for tests).
      image_pooling: the ASPP's global branch (official: on).

    ``forward`` maps a normalised ``Bx3xHxW`` batch to logits ``Bxnum_classesxHxW``. The image-pooling
    branch has BatchNorm on a 1x1 map, so training mode needs a batch of at least 2.
    """

    def __init__(
        self,
        *,
        num_classes: int = 21,
        stem: Stem = "deep",
        aspp_channels: int = 256,
        rates: Sequence[int] = ASPP_RATES,
        aspp_bn_momentum: float = ASPP_BN_MOMENTUM,
        backbone_bn_momentum: float = 0.1,
        dropout: float = 0.5,
        layers: tuple[int, int, int, int] = BLOCKS_RESNET101,
        image_pooling: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + classes), got {num_classes}")
        self.num_classes = num_classes
        self.stem = stem
        self.layers = tuple(layers)
        self.backbone = ResNet101(stem=stem, bn_momentum=backbone_bn_momentum, layers=layers)
        self.aspp = ASPP(
            in_channels=self.backbone.out_channels,
            out_channels=aspp_channels,
            rates=rates,
            bn_momentum=aspp_bn_momentum,
            image_pooling=image_pooling,
            dropout=dropout,
        )
        self.dropout1 = nn.Dropout(dropout)
        self.cls_conv = nn.Conv2d(aspp_channels, num_classes, 1, bias=True)
        self._init_head()

    def config(self) -> dict[str, Any]:
        """The constructor arguments that fix the network's shape (stored in checkpoints)."""
        return {
            "num_classes": self.num_classes,
            "stem": self.stem,
            "layers": list(self.layers),
            "aspp_channels": self.cls_conv.in_channels,
            "rates": list(self.aspp.rates),
            "image_pooling": self.aspp.image_pooling,
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> DeepLabV2:
        """A network of the shape :meth:`config` describes (unknown keys are refused)."""
        known = {"num_classes", "stem", "layers", "aspp_channels", "rates", "image_pooling"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown DeepLab settings: {', '.join(unknown)}")
        kw = dict(cfg)
        image_pooling = bool(kw.pop("image_pooling", True))
        if "layers" in kw:
            kw["layers"] = tuple(int(v) for v in kw["layers"])
        if "rates" in kw:
            kw["rates"] = tuple(int(v) for v in kw["rates"])
        return cls(image_pooling=image_pooling, **kw)

    def _init_head(self) -> None:
        # cls_conv.bias keeps PyTorch's default uniform initialisation (official).
        for module in (self.aspp, self.cls_conv):
            kaiming_init_(module)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        f = self.backbone(x)  # (B, 2048, h/8, w/8)
        f = self.dropout1(self.aspp(f))  # (B, 256, h/8, w/8)
        logits = self.cls_conv(f)  # (B, num_classes, h/8, w/8)
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=True)

    def get_parameter_groups(
        self,
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """The four optimiser groups of docs/algorithm.md 7.4 (convolution parameters only).

        0: backbone conv weights (lr x1, weight decay), 1: backbone conv biases (x2, none; empty),
        2: ASPP and ``cls_conv`` weights (x10, weight decay), 3: their biases (x20, none).
        BatchNorm parameters are in no group. :data:`LR_MULTS` and :data:`WEIGHT_DECAY_GROUPS` give
        the multipliers and weight-decay flags in the same order.
        """
        groups: tuple[list[Tensor], ...] = ([], [], [], [])
        for name, m in self.named_modules():
            if not isinstance(m, nn.Conv2d):
                continue
            offset = 0 if name.startswith("backbone.") else 2
            groups[offset].append(m.weight)
            if m.bias is not None:
                groups[offset + 1].append(m.bias)
        return groups[0], groups[1], groups[2], groups[3]


def build_deeplabv2(*, num_classes: int = 21, stem: Stem = "deep") -> DeepLabV2:
    """The official step-2 network (ASPP 256, rates 6/12/18/24, image pooling)."""
    return DeepLabV2(num_classes=num_classes, stem=stem)


def load_imagenet_weights(
    model: DeepLabV2 | ResNet101, path: str | os.PathLike[str], *, strict: bool = False
) -> LoadReport:
    """Initialise the backbone from an ImageNet ResNet-101 file (docs/algorithm.md 7.2).

    ``path`` is a plain state dict (``torch.load(..., weights_only=True)``): PyTorch-Encoding's deep-stem
    ``resnet101s-*.pth`` for ``stem="deep"``, torchvision's ``resnet101-*.pth`` for ``stem="torchvision"``.
    A dict holding the weights under ``"state_dict"`` is unwrapped. Keys are matched by name
    (:func:`hsc.model.resnet101.load_pretrained_state_dict`); the returned report lists the loaded,
    missing, unexpected and ignored (``fc.*``) keys.

    Raises:
      PretrainedWeightsError: shape mismatches (listed in the message), or incomplete coverage with
        ``strict=True``.
    """
    backbone = model.backbone if isinstance(model, DeepLabV2) else model
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise TypeError(f"{os.fspath(path)!r} does not hold a state dict (got {type(obj).__name__})")
    return load_pretrained_state_dict(backbone, obj, strict=strict)
