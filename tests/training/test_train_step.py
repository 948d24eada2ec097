"""Complete training steps: the golden two-step case, Table-4 configurations, a small CPU step."""

from __future__ import annotations

import math

import pytest
import torch

from hsc.model.hsc_net import build_hsc_net
from hsc.model.losses import HSCLossConfig
from hsc.model.losses.objective import LOSS_NAMES, ObjectiveConfig, TrainingObjective
from hsc.training.optim import PolySGD

from goldenlib import assert_rel, assert_summary, build_inputs, case, parse_number, seeded_weights


@pytest.mark.slow
def test_two_official_training_steps_golden():
    c = case("train_step_end_to_end")
    ns = build_inputs(c)
    setup = c["setup"]
    lr = parse_number(r"base lr ([0-9.eE+-]+)", setup)
    wd = parse_number(r"weight decay ([0-9.eE+-]+)", setup)
    max_step = int(parse_number(r"max_step (\d+)", setup))
    tau = parse_number(r"tau ([0-9.]+)", setup)
    alpha = parse_number(r"alpha ([0-9.]+)", setup)
    bg = parse_number(r"bg_thres ([0-9.]+)", setup)

    sd = seeded_weights()  # the case's weights: the file's seeded_weights recipe
    k = sd["fc8.weight"].shape[0] - 1
    net = build_hsc_net(num_classes=k)
    net.load_state_dict(sd, strict=True)
    # the optimiser is built from the groups BEFORE train() (frozen weights listed, never stepped)
    opt = PolySGD(net.parameter_groups(include_frozen=True), lr=lr, weight_decay=wd, max_step=max_step)
    net.train()
    net.eval()  # freezes conv1a/b2*/BN (train() override) and turns dropout off
    cfg = ObjectiveConfig(eps_tau=tau, eps_alpha=alpha, hsc=HSCLossConfig(bg_score=bg))
    objective = TrainingObjective(k, cfg)
    objective.hsc.banks.load_official({n: ns[n] for n in objective.hsc.banks.official_state()})

    steps = next(v for key, v in c.items() if key.startswith("losses_per_step"))
    lrs = c["lr_per_group_used_by_step"]
    changes = {
        i: c[key]
        for key in c
        for i in range(len(steps))
        if key.startswith(f"param_change_after_step_{i + 1} ")
    }
    params = dict(net.named_parameters())
    watched = {n for ch in changes.values() for n in ch}
    initial = {n: params[n].detach().clone() for n in watched}
    for i, expected in enumerate(steps):
        letter = chr(ord("a") + i)
        img, sal, lab = ns[f"img_{letter}"], ns[f"sal_{letter}"], ns[f"label_{letter}"]
        used = opt.current_lrs()
        for got, exp in zip(used, lrs[i]):
            assert_rel(got, exp, rel=1e-9, floor=0.0, what=f"lr step {i + 1}")
        terms = objective(net, img, sal, lab)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        for name, value in expected.items():
            assert_rel(terms[name].item(), value, rel=1e-4, floor=1e-7, what=f"step {i + 1} {name}")
        for name, summary in changes.get(i, {}).items():
            delta = params[name].detach().double() - initial[name].double()
            assert_summary(delta, summary, "param", what=f"step {i + 1} change of {name}")
    banks = objective.hsc.banks.official_state()
    banks_after = [v for key, v in c.items() if key.startswith("banks_after_step")]
    assert len(banks_after) == 1, "expected one banks_after_step_<n> entry"
    for name, summary in banks_after[0].items():
        assert_summary(banks[name], summary, "param", what=f"bank {name}")


def _batch(n=2, size=128, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, 3, size, size, generator=g)
    sal = (torch.rand(n, 1, size, size, generator=g) > 0.5).float()
    labels = torch.zeros(n, k)
    labels[0, 0] = 1
    labels[-1, k - 1] = 1
    return img, sal, labels


@pytest.mark.parametrize("row", range(1, 9))
def test_every_table4_row_runs_a_training_step(row):
    torch.manual_seed(0)
    k = 3
    net = build_hsc_net(num_classes=k, width=0.125).train()
    hsc = None if row == 1 else HSCLossConfig.table4(row)
    objective = TrainingObjective(k, ObjectiveConfig(hsc=hsc))
    opt = PolySGD(net.parameter_groups(), lr=0.01, weight_decay=5e-4, max_step=10)
    img, sal, labels = _batch(size=64, k=k)
    terms = objective(net, img, sal, labels)
    assert set(terms) == set(LOSS_NAMES)
    assert all(math.isfinite(v.item()) for v in terms.values())
    if row == 1:
        assert terms["loss_rsc"] == terms["loss_csc"] == terms["loss_psc"] == 0
    else:
        assert terms["loss_psc"] > 0
    before = net.fc8.weight.detach().clone()
    opt.zero_grad()
    terms["loss"].backward()
    opt.step()
    assert not torch.equal(before, net.fc8.weight)


def test_all_hsc_parts_step_on_a_2x3x128x128_batch_at_width_0125():
    """The issue's unit test: width 0.125, batch 2x3x128x128, every HSC part on, CPU."""
    torch.manual_seed(1)
    k = 20
    net = build_hsc_net(num_classes=k, width=0.125).train()
    objective = TrainingObjective(k)  # defaults: EPS baseline + full HSC (Table 4, last row)
    assert objective.cfg.hsc == HSCLossConfig.table4(8)
    opt = PolySGD(net.parameter_groups(), lr=0.01, weight_decay=5e-4, max_step=100)
    img, sal, labels = _batch(size=128, k=k)
    banks_before = {n: t.clone() for n, t in objective.hsc.banks.banks().items()}
    terms = objective(net, img, sal, labels)
    for name in LOSS_NAMES:
        assert terms[name].dim() == 0 and math.isfinite(terms[name].item()), name
    assert terms["loss_rsc"] > 0 and terms["loss_csc"] > 0 and terms["loss_psc"] > 0
    opt.zero_grad()
    terms["loss"].backward()
    grads = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {
        "fc8.weight",
        "proj_fc.weight",
        "extra_F.0.weight",
        "f9.weight",
        "b7.conv_branch2b2.weight",
    } <= grads
    assert not any(n.startswith(("conv1a", "b2.", "b2_")) or "bn" in n for n in grads)
    opt.step()
    changed = [n for n, t in objective.hsc.banks.banks().items() if not torch.equal(t, banks_before[n])]
    assert sorted(changed) == sorted(banks_before)  # every bank moved (all parts on)


def test_seam_baseline_needs_no_saliency_and_eps_does():
    k = 2
    net = build_hsc_net(num_classes=k, width=0.125).train()
    img, _, labels = _batch(size=64, k=k)
    terms = TrainingObjective(k, ObjectiveConfig(baseline="seam"))(net, img, None, labels)
    assert terms["loss_sal"] == 0
    with pytest.raises(ValueError, match="saliency"):
        TrainingObjective(k)(net, img, None, labels)


def test_objective_config_round_trips():
    cfg = ObjectiveConfig(baseline="seam", hsc=HSCLossConfig.table4(5), eps_tau=0.4)
    assert ObjectiveConfig.from_dict(cfg.to_dict()) == cfg
    assert ObjectiveConfig.from_dict(ObjectiveConfig(hsc=None).to_dict()).hsc is None
