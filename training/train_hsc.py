"""Step 1: train the HSC classifier on image-level labels and write an hsc checkpoint.

    hsc train --data DATASET --out RUN [--baseline eps|seam] [--no-hsc] [--width 0.125] ...

Reads top to bottom: ``get_dataset`` -> ``build_run`` -> ``train_one_step`` (in ``train``) ->
checkpoints. What it writes in RUN:

* ``config.json`` - the settings of the run (written when it starts);
* ``metrics.jsonl`` - one line per logged step: every loss term, the learning rate, images/s;
* ``step_<n>.safetensors`` - periodic checkpoints (the last ``keep_checkpoints`` are kept), and
  ``state.pt`` beside them: optimiser, data position and RNG states for an exact ``--resume``;
* ``final.safetensors`` - the trained network with its momentum banks and metadata.

A CPU run is deterministic for a seed, and ``--resume`` continues exactly: the losses of the next
steps equal those of an uninterrupted run. Ctrl-C writes a checkpoint before leaving.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from hsc.model.checkpoint import load_checkpoint, load_imagenet_weights, save_checkpoint
from hsc.model.config import ModelInfo, Normalization
from hsc.model.hsc_net import HSCNet, build_hsc_net
from hsc.model.losses import HSCLossConfig
from hsc.model.losses.objective import LOSS_NAMES, ObjectiveConfig, TrainingObjective

from .config import TrainConfig
from .datasets import HSCTrainDataset, open_dataset
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

log = logging.getLogger("hsc.train")


class TwoViews(nn.Module):
    """Both views through one module call, so DistributedDataParallel sees one forward per step."""

    def __init__(self, net: HSCNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, img: Tensor, img2: Tensor) -> tuple[Any, Any]:
        return self.net(img), self.net(img2)


@dataclass(frozen=True)
class Dist:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_setup(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1), NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), pick_device(device_name)
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local), device


def _barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return dev


class EpochSampler(Sampler[tuple[int, int]]):
    """Shuffled, ``drop_last`` batches as ``(epoch, index)`` pairs, reproducible from ``(seed, epoch)``
    and resumable from any position (the official loader reshuffles on every exhaustion)."""

    def __init__(self, n: int, batch: int, seed: int, *, rank: int = 0, world: int = 1) -> None:
        if n < batch * world:
            raise ValueError(f"{n} training images cannot fill one batch of {batch} x {world} process(es)")
        self.n, self.batch, self.seed, self.rank, self.world = n, batch, seed, rank, world
        self.epoch, self.position = 0, 0  # position = batches already taken in this epoch

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.batch * self.world)

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        while True:
            order = self._order(self.epoch)
            span = self.batch * self.world
            while self.position < self.batches_per_epoch:
                start = self.position * span + self.rank * self.batch
                self.position += 1
                for i in order[start : start + self.batch]:
                    yield (self.epoch, i)
            self.epoch, self.position = self.epoch + 1, 0

    def __len__(self) -> int:  # pragma: no cover - infinite stream; DataLoader only needs it for info
        return 2**62


@dataclass
class Run:
    cfg: TrainConfig
    out: Path
    device: torch.device
    net: HSCNet
    objective: TrainingObjective
    opt: PolySGD
    dataset: Dataset[Any]
    sampler: EpochSampler
    class_names: tuple[str, ...]
    dist: Dist
    model: nn.Module  # TwoViews(net), wrapped in DistributedDataParallel under torchrun
    step: int = 0


def objective_config(cfg: TrainConfig) -> ObjectiveConfig:
    """The loss settings a :class:`TrainConfig` asks for."""
    hsc = None
    if not cfg.no_hsc:
        hsc = HSCLossConfig(
            use_rsc=cfg.rsc,
            use_csc=cfg.csc,
            use_psc=cfg.psc,
            cross_supervision=cfg.cross_supervision,
            momentum_psc=cfg.momentum_prototypes,
            crf_psc=cfg.crf_psc or cfg.crf_all,
            crf_all=cfg.crf_all,
            gamma=cfg.gamma,
            bank_momentum=cfg.bank_momentum,
            psc_topk=cfg.psc_topk,
            rsc_norm_axis=cfg.rsc_norm_axis,
            rsc_pull_terms=cfg.rsc_pull_terms,
        )
    return ObjectiveConfig(
        baseline=cfg.baseline,
        hsc=hsc,
        view2_size=cfg.view2_size,
        eps_tau=cfg.eps_tau,
        fixed_max_onehot=cfg.fixed_max_onehot,
    )


def get_dataset(cfg: TrainConfig) -> tuple[HSCTrainDataset, tuple[str, ...]]:
    index = open_dataset(cfg.data, split=cfg.split)
    need_saliency = cfg.baseline == "eps"
    ds = HSCTrainDataset(
        index, crop=cfg.crop, resize_long=cfg.resize_long, seed=cfg.seed, require_saliency=need_saliency
    )
    return ds, tuple(index.class_names)


def build_run(cfg: TrainConfig) -> Run:
    out = Path(cfg.out)
    d, device = dist_setup(cfg.device)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.batch % d.world:
        raise ValueError(f"--batch {cfg.batch} is not divisible by the {d.world} processes")
    dataset, class_names = get_dataset(cfg)
    torch.manual_seed(cfg.seed)
    net = build_hsc_net(num_classes=len(class_names), width=cfg.width, freeze_bn=cfg.freeze_bn)
    if cfg.init:
        report = load_imagenet_weights(net, cfg.init)
        log.info("ImageNet initialisation from %s: %s", cfg.init, report)
    else:
        warnings.warn(
            "no --init: the backbone starts from random weights (the paper starts from the ImageNet "
            "ResNet-38 file ilsvrc-cls_rna-a1_cls1000_ep-0001.params); from scratch, --no-freeze-bn "
            "lets BatchNorm normalise",
            stacklevel=2,
        )
    if d.world > 1:
        torch.manual_seed(cfg.seed * 1000 + d.rank)  # same initial weights, own dropout masks per rank
    gen = torch.Generator().manual_seed(cfg.seed)
    objective = TrainingObjective(len(class_names), objective_config(cfg), generator=gen)
    net.train()
    net.to(device)
    objective.to(device)
    opt = PolySGD(
        net.parameter_groups(),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        max_step=cfg.poly_max_step(len(dataset)),
        momentum=cfg.momentum,
    )
    per_rank = cfg.batch // d.world
    sampler = EpochSampler(len(dataset), per_rank, cfg.seed, rank=d.rank, world=d.world)
    model: nn.Module = TwoViews(net)
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # every rank starts from the same weights (rank 0's) and keeps the banks equal (HSCLoss
        # broadcasts them after each update); parts switched off leave parameters unused
        model = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
        objective.hsc.banks.broadcast_(0)
    return Run(cfg, out, device, net, objective, opt, dataset, sampler, class_names, d, model)


def _loader(run: Run) -> DataLoader[Any]:
    cfg = run.cfg
    return DataLoader(
        run.dataset,
        batch_size=run.sampler.batch,
        sampler=run.sampler,
        num_workers=cfg.workers,
        pin_memory=run.device.type == "cuda",
        drop_last=True,
        # an explicit generator: creating the loader must not draw from the global RNG (dropout's),
        # or a resumed run would see other dropout masks than an uninterrupted one
        generator=torch.Generator().manual_seed(cfg.seed),
    )


# --------------------------------------------------------------------------------------------------
# checkpoints


def _model_info(run: Run) -> ModelInfo:
    return ModelInfo(
        net=run.net.cfg,
        class_names=run.class_names,
        normalization=Normalization(),
        bg_threshold=0.22,
        network_type="hsc_eps_seam" if run.cfg.baseline == "eps" else "hsc_seam",
    )


def save_run_checkpoint(run: Run, path: Path, *, with_state: bool) -> None:
    """Rank 0 writes the checkpoint (and ``state.pt``); every rank writes its own RNG state, so a
    resumed run draws the same dropout masks as an uninterrupted one."""
    if with_state:
        save_rng_state(run.out, run.dist.rank)
    if run.dist.main:
        save_checkpoint(
            path,
            run.net,
            info=_model_info(run),
            banks=run.objective.hsc.banks,
            train_config=run.cfg.to_dict(),
            step=run.step,
        )
        if with_state:
            save_state(run.out, step=run.step, checkpoint=path, optimizer=run.opt)
            prune_checkpoints(run.out, run.cfg.keep_checkpoints)
    _barrier(run.dist)


def resume_run(run: Run) -> None:
    state = read_state(run.out)
    ck = load_checkpoint(run.out / state["checkpoint"])
    if tuple(ck.info.class_names) != run.class_names or ck.info.net != run.net.cfg:
        raise ValueError("--resume: the checkpoint's classes or network differ from this run's settings")
    run.net.load_state_dict(ck.net.state_dict(), strict=True)
    run.objective.hsc.banks.load_state_dict(ck.banks, strict=True)
    run.opt.load_state_dict(state["optimizer"])
    restore_rng_state(run.out, run.dist.rank)
    run.step = int(state["step"])
    # every step consumes exactly one batch, so the data position follows from the step (the
    # sampler itself runs ahead of the training loop when loader workers prefetch)
    run.sampler.epoch, run.sampler.position = divmod(run.step, run.sampler.batches_per_epoch)
    run.net.train()


# --------------------------------------------------------------------------------------------------
# the loop


def train_one_step(run: Run, batch: tuple[Any, Tensor, Tensor, Tensor]) -> dict[str, float]:
    _, img, sal, labels = batch
    dev = run.device
    img, sal, labels = (t.to(dev, non_blocking=True) for t in (img, sal, labels))
    use_amp = run.cfg.amp and dev.type == "cuda"
    obj = run.objective
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
        saliency: Tensor | None = sal if run.cfg.baseline == "eps" else None
        img2, sal2 = obj.second_view(img, saliency)
        out1, out2 = run.model(img, img2)
        terms = obj.losses(out1, out2, img2, saliency, sal2, labels)
    run.opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    lr = run.opt.current_lrs()[0]
    run.opt.step()
    run.step += 1
    values = {k: float(terms[k].detach()) for k in LOSS_NAMES}
    if not math.isfinite(values["loss"]):
        raise FloatingPointError(
            f"step {run.step}: the loss is {values['loss']}; lower --lr or check the data"
        )
    values["lr"] = lr
    return values


def train(cfg: TrainConfig, *, progress: bool = True, stop_after: int | None = None) -> Path:
    """Run (or resume) a training run; returns the path of ``final.safetensors``.

    ``stop_after`` ends the run after that many steps in this call, writing a checkpoint as Ctrl-C
    does (for tests of ``--resume``).
    """
    run = build_run(cfg)
    if cfg.resume:
        resume_run(run)
    elif run.dist.main:
        (run.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    stopped = run_steps(
        _loader(run),
        step_fn=lambda batch: train_one_step(run, batch),
        current_step=lambda: run.step,
        save=lambda path: save_run_checkpoint(run, path, with_state=True),
        out=run.out,
        iters=cfg.iters,
        images_per_step=cfg.batch,
        log_every=cfg.log_every,
        save_every=cfg.save_every,
        main_process=run.dist.main,
        progress=progress,
        desc="hsc train",
        postfix=lambda values: {k.replace("loss_", ""): f"{values[k]:.3f}" for k in LOSS_NAMES},
        stop_after=stop_after,
    )
    if stopped is not None:
        return stopped
    final = run.out / FINAL
    save_run_checkpoint(run, run.out / f"step_{run.step}.safetensors", with_state=True)
    save_run_checkpoint(run, final, with_state=False)
    if run.dist.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return final
