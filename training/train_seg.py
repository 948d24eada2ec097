"""Step 2: train the DeepLab segmentation network on pseudo-labels (docs/algorithm.md 7).

    hsc train-seg --data DATASET --labels PRED/masks --out RUN [--init resnet101s.pth] ...

The official recipe by default: the deep-stem dilated ResNet-101 + ASPP of :mod:`hsc.model.deeplab`,
the augmentation of :mod:`hsc.training.seg_data`, SGD (momentum 0.9) over the four convolution groups
(x1/x2/x10/x20; BatchNorm affine parameters are in no group and stay as initialised, their running
statistics are updated), ``lr = 0.001 (1 - step/(iters+1))^0.9``, cross-entropy with 255 ignored on
the full-resolution logits. What it writes in RUN, as ``hsc train`` does:

* ``config.json``, ``metrics.jsonl`` (loss, lr, images/s per logged step);
* ``step_<n>.safetensors`` (the last ``keep_checkpoints``) with ``state.pt`` and ``rng.rank<r>.pt``
  beside them, for an exact ``--resume``; Ctrl-C writes one before leaving;
* ``final.safetensors``: the network in our segmenter format (:mod:`hsc.model.seg_checkpoint`),
  for ``hsc segment``.

A CPU run is deterministic for a seed and ``--resume`` continues it exactly. Under ``torchrun`` each
process trains on its share of every batch (DistributedDataParallel; BatchNorm statistics per process,
as the official single-GPU code has no SyncBN).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from hsc.model.deeplab import LR_MULTS, WEIGHT_DECAY_GROUPS, DeepLabV2, load_imagenet_weights
from hsc.model.seg_checkpoint import load_segmenter, save_segmenter

from .datasets import open_dataset
from .loop import (
    FINAL,
    prune_checkpoints,
    read_state,
    restore_rng_state,
    run_steps,
    save_rng_state,
    save_state,
)
from .optim import PolySGD
from .seg_config import SegTrainConfig
from .seg_data import IGNORE_INDEX, SegAugmentConfig, SegTrainDataset
from .train_hsc import Dist, EpochSampler, _barrier, dist_setup

log = logging.getLogger("hsc.train_seg")


@dataclass
class SegRun:
    cfg: SegTrainConfig
    out: Path
    device: torch.device
    net: DeepLabV2
    opt: PolySGD
    dataset: SegTrainDataset
    sampler: EpochSampler
    label_names: tuple[str, ...]
    dist: Dist
    model: nn.Module  # net, wrapped in DistributedDataParallel under torchrun
    step: int = 0


def freeze_batchnorm_affine(net: nn.Module) -> None:
    """BatchNorm weights and biases are in no optimiser group (official): do not compute their
    gradients either. Running statistics still update in training mode."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)


def build_seg_run(cfg: SegTrainConfig) -> SegRun:
    out = Path(cfg.out)
    d, device = dist_setup(cfg.device)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.batch % d.world:
        raise ValueError(f"--batch {cfg.batch} is not divisible by the {d.world} processes")
    if cfg.batch // d.world < 2:
        raise ValueError("each process needs >= 2 images per step (BatchNorm of the ASPP's image pooling)")
    index = open_dataset(cfg.data, split=cfg.split, require_labels=False)  # the label PNGs are enough
    aug = SegAugmentConfig(crop=cfg.crop, scale=cfg.scale, hsv=cfg.hsv)
    dataset = SegTrainDataset(index, cfg.labels, config=aug, seed=cfg.seed)
    label_names = ("background", *index.class_names)
    torch.manual_seed(cfg.seed)
    net = DeepLabV2(
        num_classes=len(label_names), stem=cfg.stem, layers=cfg.layers, aspp_channels=cfg.aspp_channels
    )
    if cfg.init:
        report = load_imagenet_weights(net, cfg.init)
        if not report.loaded:
            raise ValueError(
                f"--init {cfg.init}: none of its tensors is a ResNet-101 backbone key ({report.summary()}); "
                "give an ImageNet ResNet-101 state dict (resnet101s-*.pth, or torchvision's with --stem "
                "torchvision)"
            )
        if not report.ok:
            warnings.warn(
                f"--init {cfg.init} covers the backbone partly ({report.summary()}); the rest keeps its "
                f"random initialisation. Missing: {', '.join(report.missing[:8])}"
                + (" ..." if len(report.missing) > 8 else ""),
                stacklevel=2,
            )
        log.info("ImageNet initialisation from %s: %s", cfg.init, report.summary())
    else:
        warnings.warn(
            "no --init: the ResNet-101 starts from random weights (the official run starts from the "
            "ImageNet file resnet101s-03a0f310.pth, or torchvision's resnet101-*.pth with "
            "--stem torchvision)",
            stacklevel=2,
        )
    freeze_batchnorm_affine(net)
    if d.world > 1:
        torch.manual_seed(cfg.seed * 1000 + d.rank)  # same initial weights, own dropout masks per rank
    net.train().to(device)
    opt = PolySGD(
        net.get_parameter_groups(),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        max_step=cfg.poly_max_step(),
        power=cfg.power,
        momentum=cfg.momentum,
        multipliers=LR_MULTS,
        decayed=WEIGHT_DECAY_GROUPS,
    )
    sampler = EpochSampler(len(dataset), cfg.batch // d.world, cfg.seed, rank=d.rank, world=d.world)
    model: nn.Module = net
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return SegRun(cfg, out, device, net, opt, dataset, sampler, label_names, d, model)


def _loader(run: SegRun) -> DataLoader[Any]:
    return DataLoader(
        run.dataset,
        batch_size=run.sampler.batch,
        sampler=run.sampler,
        num_workers=run.cfg.workers,
        pin_memory=run.device.type == "cuda",
        drop_last=True,
        generator=torch.Generator().manual_seed(run.cfg.seed),  # never draw from the global RNG
    )


# --------------------------------------------------------------------------------------------------
# checkpoints


def save_seg_checkpoint(run: SegRun, path: Path, *, with_state: bool) -> None:
    """Rank 0 writes the checkpoint (with ``state.pt`` and pruning); every rank its RNG state."""
    if with_state:
        save_rng_state(run.out, run.dist.rank)
    if run.dist.main:
        save_segmenter(
            path, run.net, label_names=run.label_names, train_config=run.cfg.to_dict(), step=run.step
        )
        if with_state:
            save_state(run.out, step=run.step, checkpoint=path, optimizer=run.opt)
            prune_checkpoints(run.out, run.cfg.keep_checkpoints)
    _barrier(run.dist)


def resume_seg_run(run: SegRun) -> None:
    state = read_state(run.out)
    ck = load_segmenter(run.out / state["checkpoint"])
    if ck.label_names != run.label_names or ck.net.config() != run.net.config():
        raise ValueError("--resume: the checkpoint's classes or network differ from this run's settings")
    run.net.load_state_dict(ck.net.state_dict(), strict=True)
    run.net.train()
    run.opt.load_state_dict(state["optimizer"])
    restore_rng_state(run.out, run.dist.rank)
    run.step = int(state["step"])
    run.sampler.epoch, run.sampler.position = divmod(run.step, run.sampler.batches_per_epoch)


# --------------------------------------------------------------------------------------------------
# the loop


def segmentation_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over the pixels whose label is not 255 (the official ``ignore_index=255`` mean),
    and 0 rather than NaN for a batch without any labelled pixel."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    valid = (labels != IGNORE_INDEX).sum()
    return total / valid.clamp(min=1)


def train_seg_step(run: SegRun, batch: tuple[Any, Tensor, Tensor]) -> dict[str, float]:
    _, img, lab = batch
    dev = run.device
    img, lab = img.to(dev, non_blocking=True), lab.to(dev, non_blocking=True)
    use_amp = run.cfg.amp and dev.type == "cuda"
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
        logits = run.model(img)
    loss = segmentation_loss(logits, lab)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    lr = run.opt.current_lrs()[0]
    run.opt.step()
    run.step += 1
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"step {run.step}: the loss is {value}; lower --lr or check the labels")
    return {"loss": value, "lr": lr}


def train_seg(cfg: SegTrainConfig, *, progress: bool = True, stop_after: int | None = None) -> Path:
    """Run (or resume) a step-2 run; returns the path of ``final.safetensors`` (or, with
    ``stop_after`` or Ctrl-C, of the checkpoint written when it stopped)."""
    run = build_seg_run(cfg)
    if cfg.resume:
        resume_seg_run(run)
    elif run.dist.main:
        (run.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    stopped = run_steps(
        _loader(run),
        step_fn=lambda batch: train_seg_step(run, batch),
        current_step=lambda: run.step,
        save=lambda path: save_seg_checkpoint(run, path, with_state=True),
        out=run.out,
        iters=cfg.iters,
        images_per_step=cfg.batch,
        log_every=cfg.log_every,
        save_every=cfg.save_every,
        main_process=run.dist.main,
        progress=progress,
        desc="hsc train-seg",
        postfix=lambda values: {"loss": f"{values['loss']:.3f}"},
        stop_after=stop_after,
    )
    if stopped is not None:
        return stopped
    save_seg_checkpoint(run, run.out / f"step_{run.step}.safetensors", with_state=True)
    save_seg_checkpoint(run, run.out / FINAL, with_state=False)
    if run.dist.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return run.out / FINAL
