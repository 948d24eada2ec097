"""Step-1 training settings: one frozen dataclass, the ``hsc train`` flags built from its fields.

Torch-free, so that ``hsc --help`` stays fast.

Precedence: the dataclass defaults (the official code's numbers), then ``--config FILE`` (JSON), then
the flags given on the command line. ``RUN/config.json`` records the result when a run starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

OFFICIAL_EPOCHS = 15  # the poly schedule of the official code spans (len(train) // batch) * 15 steps


class SettingsDict:
    """``to_dict``/``from_dict`` (JSON-able: tuples as lists) for the frozen settings dataclasses."""

    WHAT = "settings"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        """The settings of ``d`` (lists back to tuples), unknown keys refused in one message."""
        defaults = {f.name: f.default for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(defaults))
        if unknown:
            raise ValueError(f"unknown {cls.WHAT}: {', '.join(unknown)}")
        as_tuple = {k for k, v in defaults.items() if isinstance(v, tuple)}
        d = {k: tuple(v) if k in as_tuple and isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


@dataclass(frozen=True)
class TrainConfig(SettingsDict):
    """Everything a step-1 run depends on (see ``hsc train --help`` for each field)."""

    WHAT = "training settings"

    data: str = ""
    out: str = ""
    split: str = "train"
    baseline: Literal["eps", "seam"] = "eps"
    no_hsc: bool = False
    # Table 4 of the paper: each part of HSC can be switched off
    psc: bool = True
    csc: bool = True
    rsc: bool = True
    cross_supervision: bool = True
    momentum_prototypes: bool = True
    crf_psc: bool = True
    crf_all: bool = True
    # paper variants (defaults follow the official code)
    bank_momentum: float = 0.5
    rsc_norm_axis: Literal["width", "channel"] = "width"
    rsc_pull_terms: bool = True
    psc_topk: int | None = None
    fixed_max_onehot: bool = False
    eps_tau: float = 0.5
    gamma: float = 0.1
    # network and optimisation
    width: float = 1.0
    freeze_bn: bool = True
    iters: int = 20000
    batch: int = 12
    crop: int = 448
    resize_long: tuple[int, int] = (448, 768)
    view2_size: int = 128
    lr: float = 0.01
    weight_decay: float = 5e-4
    momentum: float | None = None
    max_step: int | None = None
    poly_over_run: bool = False
    seed: int = 0
    init: str | None = None
    resume: bool = False
    device: str = "auto"
    workers: int = 2
    amp: bool = True
    log_every: int = 10
    save_every: int = 1000
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch < 1 or self.crop < 16:
            raise ValueError("iters and batch must be >= 1 and crop >= 16")
        lo, hi = self.resize_long
        if not (0 < lo <= hi):
            raise ValueError(f"resize_long must be (low, high) with 0 < low <= high, got {self.resize_long}")
        if self.baseline not in ("eps", "seam"):
            raise ValueError(f"baseline must be eps or seam, got {self.baseline!r}")

    def poly_max_step(self, n_train: int) -> int:
        """The poly schedule's length: given, or the steps run (``poly_over_run``), or the official
        ``(n_train // batch) * 15``."""
        if self.max_step is not None:
            return self.max_step
        if self.poly_over_run:
            return self.iters
        return max(1, (n_train // self.batch) * OFFICIAL_EPOCHS)


HELP: dict[str, str] = {
    "data": "dataset: a VOC-layout root or a manifest (.jsonl, or a folder holding manifest.jsonl)",
    "out": "run folder: final.safetensors, periodic checkpoints, config.json, metrics.jsonl",
    "split": "list to train on (VOC: ImageSets/Segmentation/<split>.txt)",
    "baseline": "eps (saliency-guided, the released network) or seam (no saliency maps needed)",
    "no_hsc": "train the baseline alone (Table 4, first row)",
    "psc": "pixel-level semantic contrast (PSC)",
    "csc": "class-level semantic contrast (CSC)",
    "rsc": "ROI-level semantic contrast (RSC)",
    "cross_supervision": "cross supervision between the two views (CS)",
    "momentum_prototypes": "momentum prototypes in PSC (MPL)",
    "crf_psc": "CRF refinement of the PSC pseudo-labels (CRF dagger)",
    "crf_all": "CRF refinement for every HSC part (CRF)",
    "bank_momentum": "weight of the new value in every momentum-bank update (official 0.5; paper 0.9)",
    "rsc_norm_axis": "RSC embedding normalisation axis: width (official quirk) or channel",
    "rsc_pull_terms": "RSC's L1 pull to the momentum ROI/background prototypes (off = paper eq. 5)",
    "psc_topk": "PSC prototype positions (default h*w/16 as the official code; the paper's k_p is 32)",
    "fixed_max_onehot": "corrected ECR target instead of SEAM's background-first quirk",
    "eps_tau": "EPS saliency-loss IoU threshold",
    "gamma": "weight of each HSC loss (paper eq. 1)",
    "width": "ResNet-38d width multiplier (1.0 = the released network; 0.125 for CPU runs)",
    "freeze_bn": "the official frozen-BatchNorm regime; --no-freeze-bn normalises with batch statistics, "
    "for training from scratch without --init",
    "iters": "optimiser steps (the official run: 20000)",
    "batch": "images per step",
    "crop": "training crop side",
    "resize_long": "range of the random long side, two integers",
    "view2_size": "side of the down-scaled second view",
    "lr": "base learning rate (groups x1/x2/x10/x20)",
    "weight_decay": "weight decay of the weight groups",
    "momentum": "SGD momentum (default: the official quirk, momentum = weight decay; 0.9 corrects it)",
    "max_step": "length of the poly schedule (default: the official (images // batch) * 15)",
    "poly_over_run": "poly schedule over the steps actually run (corrected form)",
    "seed": "seed of initialisation, data order and augmentation (CPU runs are deterministic)",
    "init": "ImageNet ResNet-38 weights (.params MXNet file or .pth); warned about when absent",
    "resume": "continue RUN from its last checkpoint, exactly",
    "device": "auto, cpu, cuda or cuda:N",
    "workers": "data-loading worker processes",
    "amp": "mixed precision (bf16 autocast) on CUDA; ignored on CPU",
    "log_every": "steps between metrics lines",
    "save_every": "steps between periodic checkpoints",
    "keep_checkpoints": "periodic checkpoints kept",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(
    p: argparse.ArgumentParser,
    cls: type,
    helps: dict[str, str],
    *,
    store_true: tuple[str, ...] = (),
    choices: dict[str, list[str]] | None = None,
    types: dict[str, type] | None = None,
    metavars: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """A flag for every field of the config dataclass ``cls``, defaulting to SUPPRESS so that only the
    flags given override a ``--config`` file.

    Booleans get ``--x/--no-x`` (``store_true`` names plain switches), tuples take as many values as
    their default has, other types follow the default's (``types`` for fields whose default is None).
    """
    p.add_argument("--config", metavar="FILE", help="JSON file of settings (flags given override it)")
    choices, types, metavars = choices or {}, types or {}, metavars or {}
    for f in fields(cls):
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": helps.get(f.name, "")}
        default = f.default
        if f.name in store_true:
            kw["action"] = "store_true"
        elif isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
            kw["help"] += f" (default: {'on' if default else 'off'})"
        elif isinstance(default, tuple):
            kw.update(nargs=len(default), type=type(default[0]))
            if f.name in metavars:
                kw["metavar"] = metavars[f.name]
        elif f.name in types:
            kw["type"] = types[f.name]
        elif isinstance(default, (int, float)):
            kw["type"] = type(default)
        if f.name in choices:
            kw["choices"] = choices[f.name]
        if isinstance(default, tuple):
            kw["help"] += f" (default: {' '.join(str(v) for v in default)})"
        elif not isinstance(default, bool) and default not in ("", None):
            kw["help"] += f" (default: {default})"
        p.add_argument(_flag(f.name), dest=f.name, **kw)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The ``hsc train`` flags: one per :class:`TrainConfig` field."""
    add_config_arguments(
        p,
        TrainConfig,
        HELP,
        store_true=("no_hsc", "resume"),
        choices={"baseline": ["eps", "seam"], "rsc_norm_axis": ["width", "channel"]},
        types={"momentum": float, "psc_topk": int, "max_step": int},
        metavars={"resize_long": ("LOW", "HIGH")},
    )


def settings_from_args(args: argparse.Namespace, cls: Any) -> Any:
    """Defaults < ``--config`` file < flags given, as a ``cls`` (which has ``from_dict``)."""
    d: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        try:
            d.update(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read the config file {path}: {e}") from None
    names = {f.name for f in fields(cls)}
    d.update({k: v for k, v in vars(args).items() if k in names})
    if not d.get("data") or not d.get("out"):
        raise ValueError("--data and --out are required (on the command line or in --config)")
    return cls.from_dict(d)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < ``--config`` file < flags given."""
    cfg: TrainConfig = settings_from_args(args, TrainConfig)
    return cfg
