"""ResNet-38d ("Wider or Deeper", Wu et al. 2019), the backbone of SEAM, EPS and HSC.

Pre-activation wide residual blocks, output stride 8 (b5 and later are dilated), the module names
of the official code (they are the state-dict keys, so released weights load strictly), and a
``width`` multiplier that scales every channel count while keeping the topology and the names.
See ../shared/docs/algorithm.md section 1.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

# Modules whose parameters never train (the first conv and the three stride-2 stage blocks).
FROZEN_MODULES = ("conv1a", "b2", "b2_1", "b2_2")


def scaled(channels: int, width: float) -> int:
    """Channel count ``channels`` scaled by ``width`` (at least 1)."""
    return max(1, int(round(channels * width)))


class ResBlock(nn.Module):
    """Pre-activation wide block: ``x + conv(relu(bn(conv(relu(bn(x))))))`` (1x1 projection if needed)."""

    def __init__(
        self,
        in_ch: int,
        mid_ch: int,
        out_ch: int,
        *,
        stride: int = 1,
        first_dilation: int | None = None,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        self.same_shape = in_ch == out_ch and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(
            in_ch, mid_ch, 3, stride, padding=first_dilation, dilation=first_dilation, bias=False
        )
        self.bn_branch2b1 = nn.BatchNorm2d(mid_ch)
        self.conv_branch2b1 = nn.Conv2d(mid_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``(output, relu(bn_branch2a(x)))``; the second is the block's pre-activation."""
        a = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(a)
        r = self.conv_branch2a(a)
        r = self.conv_branch2b1(F.relu(self.bn_branch2b1(r)))
        return shortcut + r, a

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_preact(x)[0]


class ResBlockBottleneck(nn.Module):
    """Pre-activation bottleneck (1x1 -> dilated 3x3 -> 1x1) with whole-channel dropout, b6/b7."""

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, dilation: int = 1, dropout: float = 0.0):
        super().__init__()
        q, h = max(1, out_ch // 4), max(1, out_ch // 2)
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, q, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(q)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(q, h, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(h)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(h, out_ch, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(a)
        r = self.conv_branch2a(a)
        r = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(r))))
        r = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(r))))
        return shortcut + r, a

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_preact(x)[0]


class ResNet38d(nn.Module):
    """ResNet-38d trunk, output stride 8.

    ``forward_as_dict(x)`` returns ``conv4`` (512w channels, the pre-activation of b5), ``conv5``
    (1024w, pre-activation of b6) and ``conv6`` (4096w, ``relu(bn7(b7))``), all at stride 8, where
    ``w`` is the width multiplier. Feature size per side is ``ceil(ceil(ceil(L/2)/2)/2)``.
    """

    def __init__(self, *, width: float = 1.0, dropout: bool = True, freeze_bn: bool = True) -> None:
        super().__init__()
        self.freeze_bn = freeze_bn
        c = [scaled(v, width) for v in (64, 128, 256, 512, 1024, 2048, 4096)]
        c64, c128, c256, c512, c1024, c2048, c4096 = c
        self.width = width
        self.conv1a = nn.Conv2d(3, c64, 3, padding=1, bias=False)
        self.b2 = ResBlock(c64, c128, c128, stride=2)
        self.b2_1 = ResBlock(c128, c128, c128)
        self.b2_2 = ResBlock(c128, c128, c128)
        self.b3 = ResBlock(c128, c256, c256, stride=2)
        self.b3_1 = ResBlock(c256, c256, c256)
        self.b3_2 = ResBlock(c256, c256, c256)
        self.b4 = ResBlock(c256, c512, c512, stride=2)
        self.b4_1 = ResBlock(c512, c512, c512)
        self.b4_2 = ResBlock(c512, c512, c512)
        self.b4_3 = ResBlock(c512, c512, c512)
        self.b4_4 = ResBlock(c512, c512, c512)
        self.b4_5 = ResBlock(c512, c512, c512)
        self.b5 = ResBlock(c512, c512, c1024, first_dilation=1, dilation=2)
        self.b5_1 = ResBlock(c1024, c512, c1024, dilation=2)
        self.b5_2 = ResBlock(c1024, c512, c1024, dilation=2)
        self.b6 = ResBlockBottleneck(c1024, c2048, dilation=4, dropout=0.3 if dropout else 0.0)
        self.b7 = ResBlockBottleneck(c2048, c4096, dilation=4, dropout=0.5 if dropout else 0.0)
        self.bn7 = nn.BatchNorm2d(c4096)
        self.feature_channels = {"conv4": c512, "conv5": c1024, "conv6": c4096}

    def forward_as_dict(self, x: Tensor) -> dict[str, Tensor]:
        x = self.conv1a(x)
        for name in (
            "b2",
            "b2_1",
            "b2_2",
            "b3",
            "b3_1",
            "b3_2",
            "b4",
            "b4_1",
            "b4_2",
            "b4_3",
            "b4_4",
            "b4_5",
        ):
            x = getattr(self, name)(x)
        x, conv4 = self.b5.forward_with_preact(x)
        x = self.b5_2(self.b5_1(x))
        x, conv5 = self.b6.forward_with_preact(x)
        x = self.b7(x)
        conv6 = F.relu(self.bn7(x))
        return {"conv4": conv4, "conv5": conv5, "conv6": conv6}

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_as_dict(x)["conv6"]

    def frozen_parameters(self) -> list[nn.Parameter]:
        return [p for name in FROZEN_MODULES for p in getattr(self, name).parameters()]

    def train(self, mode: bool = True) -> ResNet38d:
        """The official regime: conv1a/b2* never train; every BatchNorm always runs in eval mode
        with frozen affine parameters (running statistics are never updated); dropout follows
        ``mode``. With ``freeze_bn=False`` BatchNorm follows ``mode`` too (affine still frozen)."""
        super().train(mode)
        for p in self.frozen_parameters():
            p.requires_grad_(False)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if self.freeze_bn:
                    m.eval()
                if m.weight is not None:
                    m.weight.requires_grad_(False)
                if m.bias is not None:
                    m.bias.requires_grad_(False)
        return self


def feature_size(length: int) -> int:
    """Spatial size of the stride-8 feature map for an input side of ``length`` pixels."""
    for _ in range(3):
        length = (length + 1) // 2
    return length
