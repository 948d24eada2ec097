"""Winograd F(2x2, 3x3) and F(4x4, 3x3): equal to a direct convolution (float64 to 1e-12), every
dilation and size, the module swap inside a network, and the Predictor's choice of it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hsc.model.config import ModelInfo
from hsc.model.hsc_net import HSCNetConfig, build_hsc_net
from hsc.model.predictor import Predictor
from hsc.model.winograd import (
    TILES,
    WinogradConv2d,
    eligible,
    pays_on_this_cpu,
    tile_of,
    use_winograd,
    winograd_conv3x3,
    winograd_weights,
)


def _case(n, c, c_out, h, w, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    weight = torch.randn(c_out, c, 3, 3, generator=g, dtype=dtype)
    return x, weight


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("dilation", [1, 2, 3, 4])
@pytest.mark.parametrize(("h", "w"), [(1, 1), (2, 3), (7, 5), (16, 16), (17, 23)])
def test_equals_direct_convolution_in_float64(tile, dilation, h, w):
    x, weight = _case(2, 5, 6, h, w, seed=h * 31 + w)
    ref = F.conv2d(x, weight, padding=dilation, dilation=dilation)
    got = winograd_conv3x3(x, winograd_weights(weight, tile=tile), dilation)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("dilation", [1, 2, 4])
def test_chunked_rows_of_blocks_equal_one_chunk(tile, dilation):
    """Chunks of one row of blocks, of a few rows (an uneven last chunk), and of all of them."""
    x, weight = _case(2, 5, 6, 37, 29, seed=dilation)
    u = winograd_weights(weight, tile=tile)
    ref = F.conv2d(x, weight, padding=dilation, dilation=dilation)
    t = tile + 2
    row = t * t * 2 * dilation * math.ceil(29 / (tile * dilation)) * dilation * 6 * 8  # bytes of one row
    for block_bytes in (1, 3 * row, 1 << 30):
        got = winograd_conv3x3(x, u, dilation, block_bytes=block_bytes)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("tile", TILES)
def test_bias_and_channels_last_input_and_output(tile):
    x, weight = _case(1, 4, 3, 9, 11)
    bias = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x, weight, bias, padding=2, dilation=2)
    got = winograd_conv3x3(x, winograd_weights(weight, tile=tile), 2, bias)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_bfloat16_stays_within_a_few_roundings_of_the_direct_result():
    x, weight = _case(1, 64, 64, 20, 24, dtype=torch.float32)
    ref = F.conv2d(x.double(), weight.double(), padding=1)
    direct = F.conv2d(x.bfloat16(), weight.bfloat16(), padding=1).double()
    got = winograd_conv3x3(x.bfloat16(), winograd_weights(weight, torch.bfloat16), 1).double()
    scale = ref.abs().max()
    err, err_direct = ((got - ref).abs().max() / scale).item(), ((direct - ref).abs().max() / scale).item()
    assert err < 0.03 and err < 4 * err_direct, (err, err_direct)


@pytest.mark.parametrize("tile", TILES)
def test_float32_error_stays_near_the_direct_one(tile):
    """The exact mode's float32 Winograd: F(2x2) rounds no worse than the direct convolution, F(4x4)
    (coefficients up to 8 and 1/24) a few times more, both far below the golden 1e-4."""
    x, weight = _case(1, 128, 64, 30, 34, dtype=torch.float32)
    ref = F.conv2d(x.double(), weight.double(), padding=1)
    direct = F.conv2d(x, weight, padding=1).double()
    got = winograd_conv3x3(x, winograd_weights(weight, tile=tile), 1).double()
    scale = ref.abs().mean()
    err, err_direct = ((got - ref).abs().mean() / scale).item(), ((direct - ref).abs().mean() / scale).item()
    assert err < 2e-5 and err < (2 if tile == 2 else 8) * err_direct, (err, err_direct)


def test_weights_layout_and_errors():
    weight = torch.randn(7, 5, 3, 3)
    assert winograd_weights(weight).shape == (16, 5, 7)
    assert winograd_weights(weight, tile=4).shape == (36, 5, 7)
    assert tile_of(winograd_weights(weight, tile=4)) == 4
    with pytest.raises(ValueError, match="tile"):
        winograd_weights(weight, tile=3)
    with pytest.raises(ValueError, match="not Winograd filters"):
        winograd_conv3x3(torch.randn(1, 5, 8, 8), torch.randn(25, 5, 7), 1)
    assert winograd_weights(weight, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="3, 3"):
        winograd_weights(torch.randn(7, 5, 1, 1))
    with pytest.raises(ValueError, match="channels"):
        winograd_conv3x3(torch.randn(1, 4, 8, 8), winograd_weights(weight), 1)


def test_which_convolutions_are_eligible():
    ok = nn.Conv2d(256, 256, 3, padding=2, dilation=2, bias=False)
    assert eligible(ok)
    assert not eligible(nn.Conv2d(128, 256, 3, padding=1))  # too few channels for the default
    assert eligible(nn.Conv2d(128, 256, 3, padding=1), min_channels=128)
    assert not eligible(nn.Conv2d(256, 256, 3, stride=2, padding=1))
    assert not eligible(nn.Conv2d(256, 256, 1))
    assert not eligible(nn.Conv2d(256, 256, 3, padding=1, dilation=2))  # not same-size
    assert not eligible(nn.Conv2d(256, 256, 3, padding=1, groups=2))
    assert not eligible(nn.Conv2d(256, 256, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="3x3"):
        WinogradConv2d(nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.float32)


def test_module_dtype_rules():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    m = WinogradConv2d(conv, torch.bfloat16)
    x = torch.randn(1, 8, 6, 6)
    assert m(x).dtype == torch.float32  # outside autocast: the input's dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x).dtype == torch.bfloat16  # as autocast's own convolution
    assert m.state_dict() == {}  # nothing to save: inference only
    exact = WinogradConv2d(conv.double(), torch.float64)
    torch.testing.assert_close(exact(x.double()), conv(x.double()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("tile", TILES)
def test_swap_inside_the_network_keeps_its_output(tile):
    torch.manual_seed(0)
    net = build_hsc_net(num_classes=3, width=0.125).eval().double()
    x = torch.randn(1, 3, 40, 56, dtype=torch.float64)
    with torch.no_grad():
        ref = net.forward_cam(x)
        names = use_winograd(net, torch.float64, min_channels=1, tile=tile)
        got = net.forward_cam(x)
    # the 3x3 stride-1 convs: b2_1..b7 (not conv1a: 3 input channels, fine too; not the stride-2 ones)
    assert "b7.conv_branch2b1" in names and "b5_1.conv_branch2a" in names and "conv1a" in names
    assert not any(n in names for n in ("b2.conv_branch2a", "b3.conv_branch2a", "b4.conv_branch2a"))
    assert all(isinstance(net.get_submodule(n), WinogradConv2d) for n in names)
    assert all(net.get_submodule(n).tile == tile for n in names)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


def test_predictor_uses_it_in_the_fast_cpu_mode_only():
    info = ModelInfo(net=HSCNetConfig(width=0.5), class_names=("a", "b"))

    def net():
        torch.manual_seed(0)
        return build_hsc_net(num_classes=2, width=0.5)

    default = Predictor(net(), info, device="cpu", mode="fast")
    assert default.winograd == pays_on_this_cpu() and bool(default.winograd_layers) == default.winograd
    fast = Predictor(net(), info, device="cpu", mode="fast", winograd=True)
    assert fast.winograd and "b4_1.conv_branch2a" in fast.winograd_layers  # 256 channels at width 0.5
    assert "b3_1.conv_branch2a" not in fast.winograd_layers  # 128
    assert "extra_F.0" not in fast.winograd_layers  # eligible, but a training head: not in forward_cam
    assert type(fast.net.get_submodule("extra_F.0")) is nn.Conv2d
    assert not Predictor(net(), info, device="cpu", mode="fast", compile=True).winograd  # never by default
    direct = Predictor(net(), info, device="cpu", mode="fast", winograd=False)
    assert not direct.winograd and direct.winograd_layers == ()
    assert all(fast.net.get_submodule(n).tile == 2 for n in fast.winograd_layers)  # bfloat16: F(2x2)
    exact = Predictor(net(), info, device="cpu", winograd=False)
    assert not exact.winograd and exact.winograd_layers == ()
    exact_w = Predictor(net(), info, device="cpu")  # the exact mode's default: float32, >= 256 channels
    assert exact_w.winograd and "b7.conv_branch2b1" in exact_w.winograd_layers  # 512 -> 1024
    assert "b6.conv_branch2b1" in exact_w.winograd_layers  # 256 -> 512
    assert "b3_1.conv_branch2a" not in exact_w.winograd_layers  # 128
    assert all(exact_w.net.get_submodule(n).u.dtype == torch.float32 for n in exact_w.winograd_layers)
    assert all(exact_w.net.get_submodule(n).tile == 4 for n in exact_w.winograd_layers)  # F(4x4)
    assert not Predictor(net(), info, device="cpu", compile=True).winograd
    img = np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8)
    a, b = fast.predict(img, ["a"]), direct.predict(img, ["a"])
    assert a.settings["winograd"] and not b.settings["winograd"]
    diff = np.abs(a.cams - b.cams)
    assert 0 < diff.max() < 0.05, diff.max()  # different roundings, the same network
    e, ew = exact.predict(img, ["a"]), exact_w.predict(img, ["a"])
    assert ew.settings["winograd"] and not e.settings["winograd"]
    np.testing.assert_allclose(ew.cams, e.cams, rtol=0, atol=1e-5)  # float32 roundings only


@pytest.mark.parametrize(
    ("bf16", "amx", "expected"),
    [(True, False, True), (True, True, False), (False, False, False), (None, None, False)],
)
def test_pays_only_with_avx512_bf16_and_without_amx(monkeypatch, bf16, amx, expected):
    for name, value in (("_is_avx512_bf16_supported", bf16), ("_is_amx_tile_supported", amx)):
        if value is None:
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda v=value: v)
    assert pays_on_this_cpu() is expected
