"""The HSC network: key list, golden forward, frozen regime, parameter groups, gradient flow."""

from __future__ import annotations

import functools

import pytest
import torch

from hsc.model.hsc_net import HSCNet, build_hsc_net, pcm_seed
from hsc.model.resnet38d import feature_size

from goldenlib import assert_summary, build_inputs, case, golden, golden_path, seeded_weights


@functools.lru_cache(maxsize=1)
def _seeded_net() -> HSCNet:
    net = build_hsc_net()
    net.load_state_dict(seeded_weights(), strict=True)
    return net.eval()


def seeded_net() -> HSCNet:
    return _seeded_net()


# ----------------------------------------------------------------------------- structure


def test_state_dict_keys_and_shapes_equal_the_documented_list():
    keys = golden()["seeded_weights"]["keys (state-dict order, KEYS)"]
    sd = build_hsc_net().state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == [(k, list(s)) for k, s in keys]
    assert len(sd) == 242


def test_seeded_weights_match_the_file():
    c = case("seeded_weights")
    sd = seeded_weights()
    keys = [k for k, _ in c["keys (state-dict order, KEYS)"]]
    import hashlib

    h = hashlib.sha256()
    total = 0.0
    for k in keys:
        t = sd[k]
        h.update(t.contiguous().numpy().tobytes())
        if t.is_floating_point():
            total += float(t.double().sum())
    assert h.hexdigest() == c["sha256 (bytes of every tensor, C order, little-endian, in KEYS order)"]
    assert abs(total - c["sum_of_all_float_tensors"]) <= 1e-6 * abs(c["sum_of_all_float_tensors"])
    for name, summary in c["examples"].items():
        assert_summary(sd[name], summary, "scale", what=name)


@pytest.mark.parametrize("width", [1.0, 0.125])
@pytest.mark.parametrize("k", [20, 5])
def test_width_and_classes_keep_names(width, k):
    ref = build_hsc_net().state_dict()
    sd = build_hsc_net(num_classes=k, width=width).state_dict()
    assert list(sd) == list(ref)
    assert sd["fc8.weight"].shape[0] == k + 1


@pytest.mark.parametrize("size", [(32, 32), (37, 50), (17, 9)])
def test_output_stride_8_and_shapes(size):
    net = build_hsc_net(num_classes=3, width=0.125).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = net(x)
    h, w = feature_size(size[0]), feature_size(size[1])
    assert out.cam.shape == (2, 4, h, w)
    assert out.cam_rv.shape == (2, 4, h, w)
    assert out.f_pixel.shape == (2, 128, h, w) and out.f_roi.shape == (2, 256, h, w)
    assert out.pred.shape == (2, 4)
    assert torch.equal(net.forward_cam(x), out.cam)


def test_feature_size_rule():
    for length, expected in [(448, 56), (128, 16), (32, 4), (37, 5), (50, 7), (375, 47), (500, 63)]:
        assert feature_size(length) == expected


# ----------------------------------------------------------------------------- golden forward


def _forward_cases():
    c = golden().get("network_forward", {})
    return [k for k, v in c.items() if isinstance(v, dict) and "recipe" in v]


@pytest.mark.slow
@pytest.mark.parametrize("name", _forward_cases() or ["<none>"])
def test_network_forward_golden(name):
    c = case("network_forward")
    if name == "<none>":
        pytest.fail(f"{golden_path()}: network_forward holds no input case")
    sub = c[name]
    x = build_inputs(sub)["x"]
    net = seeded_net()
    with torch.no_grad():
        d, seed, feats = net.forward_pcm_inputs(x)
        out = net(x)
        cam_only = net.forward_cam(x)
    expected = {
        "pred (spatial mean of cam)": out.pred,
        "cam (fc8 logits)": out.cam,
        "pred_rv": out.pred_rv,
        "cam_rv (PCM output)": out.cam_rv,
        "pcm_input_z (max-norm + one-hot of relu(cam))": seed,
        "pcm_input_f (cat[resized img, f8_3, f8_4])": feats,
        "f_map_1 (relu(proj_fc), 128)": out.f_pixel,
        "f_map_2 (extra_F, 256)": out.f_roi,
        "backbone conv4": d["conv4"],
        "backbone conv5": d["conv5"],
        "backbone conv6": d["conv6"],
    }
    checked = 0
    for key, value in sub.items():
        if key in expected:
            assert_summary(expected[key], value, "abs", what=f"{name}/{key}")
            checked += 1
        elif key in ("pred[0]", "pred_rv[0]"):
            got = (out.pred if key == "pred[0]" else out.pred_rv)[0].tolist()
            assert len(got) == len(value)
            assert max(abs(a - b) for a, b in zip(got, value)) <= 1e-4, key
            checked += 1
        elif key == "forward_cam_equals_cam":
            assert torch.equal(cam_only, out.cam) == value
        elif key not in ("recipe", "inputs"):
            pytest.fail(f"network_forward/{name}: unknown entry {key!r}")
    assert checked >= len(expected)


# ----------------------------------------------------------------------------- frozen regime


def test_train_freezes_first_stage_and_every_batchnorm():
    c = case("parameter_groups")
    net = build_hsc_net()
    net.train()
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert len(frozen) == c["frozen_after_train(): count"]
    assert sum(p.numel() for p in net.parameters() if not p.requires_grad) == c["frozen_after_train(): numel"]
    non_bn = sorted(n for n in frozen if "bn" not in n and "extra_F.1" not in n)
    assert non_bn == sorted(c["frozen_non_bn_parameters"])
    assert sum(p.numel() for p in net.parameters()) == c["n_parameters_total"]
    assert sum(t.numel() for t in net.state_dict().values()) == c["n_state_dict_numbers"]
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert net.b6.dropout_2b1.training  # dropout still follows train()


def test_parameter_groups_golden():
    c = case("parameter_groups")
    net = build_hsc_net()
    names = {id(p): n for n, p in net.named_parameters()}
    backbone_prefixes = ("conv1a", "b2", "b3", "b4", "b5", "b6", "b7", "bn7")

    def describe(groups):
        out = []
        for g in groups:
            heads = [names[id(p)] for p in g if not names[id(p)].startswith(backbone_prefixes)]
            out.append({"count": len(g), "numel": sum(p.numel() for p in g), "names_not_in_backbone": heads})
        return out

    before = describe(net.parameter_groups(include_frozen=True))
    for got, exp in zip(before, c["groups_as_built_before_train()"]):
        assert got["count"] == exp["count"] and got["numel"] == exp["numel"]
        assert got["names_not_in_backbone"] == exp["names_not_in_backbone"]
    net.train()
    after = describe(net.parameter_groups())
    for got, exp in zip(after, c["groups_if_built_after_train()"]):
        assert got["count"] == exp["count"] and got["numel"] == exp["numel"]
    assert all(p.requires_grad for g in net.parameter_groups() for p in g)


# ----------------------------------------------------------------------------- gradient flow


def _grads(net, loss):
    net.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_gradients_reach_exactly_the_documented_parameters():
    torch.manual_seed(0)
    net = build_hsc_net(num_classes=4, width=0.125, dropout=False).train()
    out = net(torch.randn(2, 3, 40, 40))
    pcm = {"f8_3.weight", "f8_4.weight", "f9.weight"}
    # cam_rv trains only the PCM head (its inputs are detached)
    assert _grads(net, out.cam_rv.square().sum()) == pcm
    # cam trains fc8 and the (unfrozen) backbone, never the PCM head or the projectors
    g = _grads(net, out.cam.square().sum())
    assert "fc8.weight" in g and "b3.conv_branch2a.weight" in g and "b7.conv_branch2b2.weight" in g
    assert not g & pcm and not any(n.startswith(("proj_fc", "extra_F", "conv1a", "b2.", "b2_")) for n in g)
    # the projectors train themselves and the backbone
    g = _grads(net, out.f_pixel.sum() + out.f_roi.square().sum())
    assert {"proj_fc.weight", "extra_F.0.weight", "extra_F.3.bias"} <= g and "fc8.weight" not in g
    assert not any("bn" in n or n.startswith("extra_F.1") for n in g)


def test_pcm_seed_rule():
    cam = torch.tensor([[[[2.0, -1.0]], [[1.0, 3.0]], [[0.5, 0.5]]]])  # K=2 + background
    z = pcm_seed(cam)
    # class 0: [2,0]/2 -> [1, 0]; class 1: [1,3]/3 -> [1/3, 1]; winner per pixel: class 0, class 1
    assert torch.allclose(z[0, 0, 0], torch.tensor([(2 - 1e-5) / (2 + 1e-5), 0.0]), atol=1e-6)
    assert z[0, 1, 0, 0] == 0 and torch.isclose(z[0, 1, 0, 1], torch.tensor((3 - 1e-5) / (3 + 1e-5)))
    assert torch.allclose(z[0, 2, 0], 1 - z[0, :2, 0].amax(0))


def test_freeze_bn_off_normalises_with_batch_statistics():
    net = build_hsc_net(num_classes=2, width=0.125, freeze_bn=False).train()
    before = net.bn7.running_mean.clone()
    net(torch.randn(2, 3, 32, 32) * 3 + 1)
    assert net.bn7.training and not torch.equal(before, net.bn7.running_mean)
    assert not net.bn7.weight.requires_grad  # affine parameters stay fixed
    net.eval()
    assert not net.bn7.training
