"""The official poly-SGD: schedule, groups, the momentum quirk, exact resume of the schedule."""

from __future__ import annotations

import copy

import torch

from hsc.training.optim import PolySGD, build_official_optimizer, poly_lr

from goldenlib import assert_rel, case, parse_number


def _params(n=4):
    return [[torch.nn.Parameter(torch.ones(2))] for _ in range(n)]


def test_poly_schedule_golden():
    c = case("poly_optimizer")
    text = c["recipe"]
    lr = parse_number(r"[Bb]ase lr ([0-9.eE+-]+)", text)
    wd = parse_number(r"weight decay ([0-9.eE+-]+)", text)
    max_step = int(parse_number(r"max_step (\d+)", text))
    opt = PolySGD(_params(), lr=lr, weight_decay=wd, max_step=max_step)
    for k, expected in c["lr_per_group_used_by_step_k"].items():
        opt.global_step = int(k)
        for got, exp in zip(opt.current_lrs(), expected):
            assert_rel(got, exp, rel=1e-9, floor=0.0, what=f"step {k}")
    g = opt.param_groups
    assert [x["weight_decay"] for x in g] == c["weight_decay_per_group"]
    assert all(x["momentum"] == c["sgd_momentum_actually_used"] for x in g)
    assert all(x["nesterov"] == c["nesterov"] and x["dampening"] == c["dampening"] for x in g)


def test_step_uses_then_advances_the_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = PolySGD([[p], [], [], []], lr=0.1, weight_decay=0.0, max_step=10, momentum=0.0)
    for k in range(3):
        p.grad = torch.ones(1)
        before = p.item()
        opt.step()
        assert abs((before - p.item()) - poly_lr(k, 0.1, 10)) < 1e-7
    assert opt.global_step == 3


def test_resume_restores_global_step_and_momentum():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = PolySGD([[p], [], [], []], lr=0.1, weight_decay=1e-3, max_step=100, momentum=0.9)
    for _ in range(5):
        p.grad = torch.randn(3)
        opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = PolySGD([[q], [], [], []], lr=0.1, weight_decay=1e-3, max_step=100, momentum=0.9)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if read back from disk
    assert opt2.global_step == 5
    g = torch.randn(3)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p, q)


def test_corrected_momentum_and_lr_frozen_after_max_step():
    from hsc.model.hsc_net import build_hsc_net

    net = build_hsc_net(num_classes=2, width=0.125).train()
    opt = build_official_optimizer(net, momentum=0.9)
    assert all(g["momentum"] == 0.9 for g in opt.param_groups)
    assert poly_lr(10**6, 0.01, 13215) == poly_lr(13214, 0.01, 13215) > 0
