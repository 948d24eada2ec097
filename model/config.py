"""Frozen configuration dataclasses of the networks.

Defaults follow the official HSC code (``Wu0409/HSC_WSSS``); see ../shared/docs/algorithm.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class HSCNetConfig:
    """Shape of an HSC network.

    Args:
        num_classes: K, the number of foreground classes. The CAM head has K+1 channels with the
            background LAST (channel K), as the official code (VOC: K = 20, 21 channels).
        width: channel multiplier of the ResNet-38d backbone (1.0 = the released network).
            Topology, strides, dilations and state-dict key names do not change with it.
        pixel_dim: size of the pixel-level embedding (``proj_fc``, the paper's F_proj2).
        roi_dim: size of the ROI/class-level embedding (``extra_F``, the paper's F_proj1).
        dropout: keep the Dropout2d of the b6/b7 bottlenecks (0.3/0.5) active in training mode.
        freeze_bn: the official regime: every BatchNorm always uses its running statistics (which
            never change). ``False`` lets BatchNorm normalise with batch statistics in training mode
            (affine parameters stay fixed) - for training from scratch, without the ImageNet weights
            whose statistics the frozen regime relies on.
    """

    num_classes: int = 20
    width: float = 1.0
    pixel_dim: int = 128
    roi_dim: int = 256
    dropout: bool = True
    freeze_bn: bool = True

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if not (0.0 < self.width <= 4.0):
            raise ValueError(f"width must be in (0, 4], got {self.width}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HSCNetConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class Normalization:
    """Input normalisation ``x = (v / 255 - mean) / std`` on RGB."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class ModelInfo:
    """What a checkpoint says about the model it holds (stored in its metadata)."""

    net: HSCNetConfig = field(default_factory=HSCNetConfig)
    class_names: tuple[str, ...] = ()
    normalization: Normalization = field(default_factory=Normalization)
    bg_threshold: float = 0.22
    network_type: str = "hsc_eps_seam"
    backbone: str = "resnet38d"
