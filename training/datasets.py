"""The step-1 training dataset, and the dataset openers with the PASCAL VOC classes as the default.

The layouts (VOC folder, JSONL manifest), their validation and :class:`DatasetIndex` live in
:mod:`hsc.core.datasets` (no torch: the service and the workers open datasets too); everything
there is re-exported here, so ``from hsc.training.datasets import open_dataset`` keeps working.
Here :func:`open_voc` and :func:`open_dataset` name the 20 VOC classes when a VOC-layout folder has
no ``classes.txt`` (a manifest still needs its ``classes.txt`` or ``classes=``).

:class:`HSCTrainDataset` is the ``torch.utils.data.Dataset`` of step-1 training: the official
samples (docs/algorithm.md 4.2, 4.3) through :class:`~hsc.training.transforms.TrainTransform`,
seeded per ``(seed, epoch, index)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from hsc.core import datasets as _core
from hsc.core.datasets import (
    DatasetError,
    DatasetIndex,
    Item,
    PathLike,
    load_rgb,
    load_saliency,
    open_manifest,
    read_classes_file,
    read_id_list,
    read_label_png,
    resolve_dataset,
)
from hsc.model.classes import VOC_CLASSES

from .transforms import AugmentConfig, TrainTransform, sample_rng

__all__ = [
    "DatasetError",
    "DatasetIndex",
    "HSCTrainDataset",
    "Item",
    "epoch_order",
    "load_rgb",
    "load_saliency",
    "open_dataset",
    "open_manifest",
    "open_voc",
    "read_classes_file",
    "read_id_list",
    "read_label_png",
    "resolve_dataset",
]


def open_voc(
    root: PathLike,
    split: str | PathLike | None = None,
    *,
    default_classes: Sequence[str] | None = VOC_CLASSES,
    **kwargs: Any,
) -> DatasetIndex:
    """:func:`hsc.core.datasets.open_voc` with the 20 VOC classes as ``default_classes``."""
    return _core.open_voc(root, split, default_classes=default_classes, **kwargs)


def open_dataset(path: PathLike, split: str | None = None, **kwargs: Any) -> DatasetIndex:
    """:func:`hsc.core.datasets.open_dataset`; a VOC-layout folder defaults to the 20 VOC classes."""
    if "default_classes" not in kwargs and resolve_dataset(path, split)[0] == "voc":
        kwargs["default_classes"] = VOC_CLASSES
    return _core.open_dataset(path, split, **kwargs)


# --------------------------------------------------------------------------------------------------
# training


def epoch_order(n: int, seed: int, epoch: int) -> NDArray[np.int64]:
    """A reproducible shuffle of ``range(n)`` for one epoch (seeded by ``(seed, epoch)`` only)."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n).astype(np.int64)


class HSCTrainDataset(torch.utils.data.Dataset):
    """Step-1 training samples (docs/algorithm.md 4.2, 4.3).

    ``dataset[i]`` (or ``dataset[(epoch, i)]``) returns ``(id, img, sal, labels)``: ``img`` float32
    ``(3, crop, crop)`` normalised, ``sal`` float32 ``(1, crop, crop)`` in [0, 1] (zeros for an
    item without saliency), ``labels`` float32 ``(K,)``. The randomness of sample ``i`` comes from
    ``sample_rng(seed, epoch, i)`` only, so samples do not depend on workers, order or history.
    Plain integer indices use :attr:`epoch` (set it with :meth:`set_epoch` before building the
    loader's iterator; with persistent workers pass ``(epoch, i)`` pairs from the sampler instead).

    Args:
        index: an opened dataset.
        config: augmentation sizes and strengths (default: the official ones).
        crop, resize_long: shortcuts that override ``config.crop`` and ``config.long_side``.
        seed: base seed (>= 0).
        require_saliency: every item must have a saliency map (EPS training): checked here, all
            missing ones reported in one :class:`DatasetError`.
    """

    def __init__(
        self,
        index: DatasetIndex,
        *,
        config: AugmentConfig | None = None,
        crop: int | None = None,
        resize_long: tuple[int, int] | None = None,
        seed: int = 0,
        require_saliency: bool = False,
    ) -> None:
        config = config or AugmentConfig()
        if crop is not None:
            config = replace(config, crop=crop)
        if resize_long is not None:
            config = replace(config, long_side=(int(resize_long[0]), int(resize_long[1])))
        if require_saliency:
            missing = [f"{it.id}: no saliency map" for it in index.items if it.saliency is None]
            if missing:
                raise DatasetError(missing, f"{index.root} (saliency maps are required)")
        self.index = index
        self.transform = TrainTransform(config)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        i = int(i)
        item = self.index.items[i]
        rng = sample_rng(self.seed, int(epoch), i)
        image = load_rgb(item.image)
        sal_img = load_saliency(item.saliency) if item.saliency is not None else None
        img, sal = self.transform(image, sal_img, rng)
        crop = self.transform.config.crop
        sal_t = torch.from_numpy(sal) if sal is not None else torch.zeros(1, crop, crop)
        return item.id, torch.from_numpy(img), sal_t, torch.from_numpy(item.labels.copy())
