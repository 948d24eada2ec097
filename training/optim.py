"""The official optimiser: SGD over four lr-multiplied groups with a poly schedule.

The official ``PolyOptimizer`` passes the weight decay positionally into SGD's *momentum* slot, so
the momentum actually in effect is 5e-4 (algorithm.md 3.10, paper-vs-code #19). That quirk is the
default (``momentum=None``); pass ``momentum=0.9`` for the corrected form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

LR_MULTIPLIERS = (1.0, 2.0, 10.0, 20.0)
DECAYED_GROUPS = (True, False, True, False)


def poly_lr(step: int, base_lr: float, max_step: int, power: float = 0.9) -> float:
    """lr used by optimiser step ``step`` (0-based): ``base·(1 − step/max_step)^power``, and the value
    of the last step before ``max_step`` from then on (the official schedule freezes, it never
    reaches 0)."""
    if max_step <= 0:
        raise ValueError("max_step must be positive")
    step = min(step, max_step - 1)
    return base_lr * (1.0 - step / max_step) ** power


class PolySGD(torch.optim.SGD):
    """SGD whose group learning rates follow :func:`poly_lr` times each group's multiplier.

    Call :meth:`step` once per optimiser step; ``global_step`` is saved in ``state_dict()`` so a
    resumed run continues the schedule exactly.
    """

    def __init__(
        self,
        groups: Sequence[Sequence[nn.Parameter]],
        *,
        lr: float,
        weight_decay: float,
        max_step: int,
        power: float = 0.9,
        momentum: float | None = None,
        multipliers: Sequence[float] = LR_MULTIPLIERS,
        decayed: Sequence[bool] = DECAYED_GROUPS,
    ) -> None:
        if len(groups) != len(multipliers):
            raise ValueError(f"expected {len(multipliers)} parameter groups, got {len(groups)}")
        param_groups: list[dict[str, Any]] = [
            {"params": list(g), "lr": lr * m, "weight_decay": weight_decay if d else 0.0, "lr_mult": m}
            for g, m, d in zip(groups, multipliers, decayed)
        ]
        # The official quirk: SGD(params, lr, weight_decay) puts weight_decay into `momentum`.
        super().__init__(param_groups, lr=lr, momentum=weight_decay if momentum is None else momentum)
        self.base_lr = lr
        self.max_step = max_step
        self.power = power
        self.global_step = 0

    def current_lrs(self) -> list[float]:
        base = poly_lr(self.global_step, self.base_lr, self.max_step, self.power)
        return [base * g["lr_mult"] for g in self.param_groups]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for g, lr in zip(self.param_groups, self.current_lrs()):
            g["lr"] = lr
        loss = super().step(closure)
        self.global_step += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["global_step"] = self.global_step
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.global_step = int(state_dict.pop("global_step", 0))
        super().load_state_dict(state_dict)


def build_official_optimizer(
    net: nn.Module,
    *,
    lr: float = 0.01,
    weight_decay: float = 5e-4,
    max_step: int = 13215,
    momentum: float | None = None,
    include_frozen: bool = False,
) -> PolySGD:
    """PolySGD over ``net.parameter_groups()`` with the official defaults (lr 0.01, wd 5e-4,
    max_step = (10582 // 12)·15 = 13215)."""
    groups = net.parameter_groups(include_frozen=include_frozen)  # type: ignore[operator]
    return PolySGD(groups, lr=lr, weight_decay=weight_decay, max_step=max_step, momentum=momentum)
