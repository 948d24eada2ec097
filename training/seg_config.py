"""Step-2 (DeepLab) training settings: one frozen dataclass, the ``hsc train-seg`` flags built from it.

Torch-free, so that ``hsc --help`` stays fast. Defaults are the official segmentation code's
(docs/algorithm.md 7.3-7.6): batch 10, crop 448, scale U[0.5, 1.5], HSV +-10, lr 0.001 with the
x1/x2/x10/x20 groups, momentum 0.9, weight decay 5e-4, poly power 0.9 over 20,000 steps (the official
``1 - itr/20001``), seed 1. Precedence: defaults < ``--config FILE`` < flags.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

from .config import SettingsDict, add_config_arguments, settings_from_args


@dataclass(frozen=True)
class SegTrainConfig(SettingsDict):
    """Everything a step-2 run depends on (see ``hsc train-seg --help`` for each field)."""

    WHAT = "step-2 training settings"

    data: str = ""
    labels: str = ""
    out: str = ""
    split: str = "train"
    # network
    stem: Literal["deep", "torchvision"] = "deep"
    layers: tuple[int, int, int, int] = (3, 4, 23, 3)
    aspp_channels: int = 256
    init: str | None = None
    # data
    crop: int = 448
    scale: tuple[float, float] = (0.5, 1.5)
    hsv: int = 10
    # optimisation
    iters: int = 20000
    batch: int = 10
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9
    max_step: int | None = None
    seed: int = 1
    resume: bool = False
    device: str = "auto"
    workers: int = 2
    amp: bool = True
    log_every: int = 10
    save_every: int = 1000
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch < 1:
            raise ValueError("iters and batch must be >= 1")
        if self.batch < 2:
            # the ASPP's image-pooling BatchNorm sees a 1x1 map: training needs 2 samples per step
            raise ValueError("batch must be >= 2 (BatchNorm of the ASPP's image-pooling branch)")
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise ValueError(f"layers must be 4 positive block counts, got {self.layers}")
        if self.stem not in ("deep", "torchvision"):
            raise ValueError(f"stem must be deep or torchvision, got {self.stem!r}")

    def poly_max_step(self) -> int:
        """The poly schedule's length: given, or the official ``iters + 1``."""
        return self.max_step if self.max_step is not None else self.iters + 1


HELP: dict[str, str] = {
    "data": "dataset: a VOC-layout root or a manifest (its images and classes)",
    "labels": "folder of <id>.png label maps (hsc infer's PRED/masks; 0 = background, 255 ignored), "
    "or 'gt' for the dataset's own masks",
    "out": "run folder: final.safetensors, periodic checkpoints, config.json, metrics.jsonl",
    "split": "list to train on (VOC: ImageSets/Segmentation/<split>.txt; the paper: train_aug)",
    "stem": "ResNet-101 stem: deep (official, PyTorch-Encoding's resnet101s) or torchvision (7x7)",
    "layers": "blocks per ResNet stage (101: 3 4 23 3; 50: 3 4 6 3)",
    "aspp_channels": "channels of every ASPP branch (official 256)",
    "init": "ImageNet ResNet-101 weights (.pth); warned about when absent",
    "crop": "training crop side",
    "scale": "range of the random scale, two numbers",
    "hsv": "largest hue/saturation/value shift",
    "iters": "optimiser steps (official 20000)",
    "batch": "images per step",
    "lr": "base learning rate (groups x1/x2/x10/x20)",
    "momentum": "SGD momentum",
    "weight_decay": "weight decay of the weight groups",
    "power": "poly schedule power",
    "max_step": "length of the poly schedule (default: iters + 1, as the official code)",
    "seed": "seed of initialisation, data order and augmentation (CPU runs are deterministic)",
    "resume": "continue RUN from its last checkpoint, exactly",
    "device": "auto, cpu, cuda or cuda:N",
    "workers": "data-loading worker processes",
    "amp": "mixed precision (bf16 autocast) on CUDA; ignored on CPU",
    "log_every": "steps between metrics lines",
    "save_every": "steps between periodic checkpoints",
    "keep_checkpoints": "periodic checkpoints kept",
}


def add_seg_train_arguments(p: argparse.ArgumentParser) -> None:
    """The ``hsc train-seg`` flags: one per :class:`SegTrainConfig` field."""
    add_config_arguments(
        p,
        SegTrainConfig,
        HELP,
        store_true=("resume",),
        choices={"stem": ["deep", "torchvision"]},
        types={"max_step": int},
        metavars={"scale": ("LOW", "HIGH"), "layers": ("L1", "L2", "L3", "L4")},
    )


def seg_config_from_args(args: argparse.Namespace) -> SegTrainConfig:
    """Defaults < ``--config`` file < flags given; ``--labels`` is required too."""
    cfg: SegTrainConfig = settings_from_args(args, SegTrainConfig)
    if not cfg.labels:
        raise ValueError("--labels is required (a folder of label PNGs, or 'gt')")
    return cfg
