"""Step-2 DeepLab-v2 / ResNet-101 (model/deeplab.py, model/resnet101.py): golden ``deeplab_keys``,
shapes, output stride, parameter groups and ImageNet-weight loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hsc.model.deeplab import LR_MULTS, WEIGHT_DECAY_GROUPS, DeepLabV2, load_imagenet_weights
from hsc.model.resnet101 import PretrainedWeightsError, ResNet101, load_pretrained_state_dict

from goldenlib import case


@pytest.fixture(scope="module")
def deeplab() -> DeepLabV2:
    torch.manual_seed(0)
    return DeepLabV2(num_classes=21)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # running statistics are buffers


# --------------------------------------------------------------------------------------------------
# golden structure (docs/golden.md 4.15)


def test_golden_deeplab_keys(deeplab):
    c = case("deeplab_keys")
    sd = deeplab.state_dict()
    assert len(sd) == c["n_keys"]
    assert _n_params(deeplab) == c["n_params"]
    for key, shape in c["keys_not_layer"].items():
        assert key in sd, f"missing key {key}"
        assert list(sd[key].shape) == list(shape), key
    outside = [k for k in sd if not k.startswith("backbone.layer")]
    assert outside == list(c["keys_not_layer"])  # nothing else outside layer*, same order
    assert {k.split(".")[0] for k in sd} == {"backbone", "aspp", "cls_conv"}


# --------------------------------------------------------------------------------------------------
# forward, output stride, structure details


@pytest.mark.parametrize("num_classes", [21, 5])
def test_forward_shape(deeplab, num_classes):
    model = deeplab if num_classes == 21 else DeepLabV2(num_classes=num_classes)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 65, 65))
    assert out.shape == (1, num_classes, 65, 65)
    assert torch.isfinite(out).all()
    assert model.cls_conv.weight.shape == (num_classes, 256, 1, 1)


def test_smaller_backbone_keeps_names_and_output():
    small = DeepLabV2(num_classes=3, layers=(1, 1, 2, 1)).eval()
    full_names = {k for k in DeepLabV2(num_classes=3).state_dict() if not k.startswith("backbone.layer")}
    assert full_names <= set(small.state_dict())  # same head and stem names
    assert not any(k.startswith("backbone.layer3.2.") for k in small.state_dict())
    assert small.layers == (1, 1, 2, 1)
    with torch.no_grad():
        assert small(torch.randn(1, 3, 33, 33)).shape == (1, 3, 33, 33)


def test_train_mode_batch_of_two(deeplab):
    deeplab.train()
    try:
        out = deeplab(torch.randn(2, 3, 33, 41))
    finally:
        deeplab.eval()
    assert out.shape == (2, 21, 33, 41)
    out.mean().backward()
    assert deeplab.cls_conv.weight.grad is not None
    deeplab.zero_grad(set_to_none=True)


def test_backbone_output_stride_8(deeplab):
    backbone = deeplab.backbone.eval()
    with torch.no_grad():
        f = backbone(torch.randn(1, 3, 64, 96))
    assert f.shape == (1, 2048, 8, 12)
    assert backbone.output_stride == 8


def test_dilation_and_stride_on_the_3x3(deeplab):
    b = deeplab.backbone
    assert b.layer2[0].conv2.stride == (2, 2) and b.layer2[0].conv1.stride == (1, 1)
    assert [blk.conv2.dilation[0] for blk in b.layer3] == [1] + [2] * 22
    assert [blk.conv2.dilation[0] for blk in b.layer4] == [2, 4, 4]
    assert all(blk.conv2.padding == blk.conv2.dilation for blk in [*b.layer3, *b.layer4])
    assert all(m.bias is None for m in b.modules() if isinstance(m, nn.Conv2d))
    bns = [m for m in b.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {m.momentum for m in bns} == {0.1}
    aspp_bns = [m for m in deeplab.aspp.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {m.momentum for m in aspp_bns} == {0.0003}
    assert [getattr(deeplab.aspp, f"branch{i}")[0].dilation[0] for i in range(1, 5)] == [6, 12, 18, 24]


def test_parameter_groups(deeplab):
    groups = deeplab.get_parameter_groups()
    assert [len(g) for g in groups] == [106, 0, 7, 1]
    assert groups[3][0] is deeplab.cls_conv.bias
    assert any(p is deeplab.cls_conv.weight for p in groups[2])
    grouped = {id(p) for g in groups for p in g}
    bn_params = [p for m in deeplab.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    assert bn_params and not any(id(p) in grouped for p in bn_params)
    assert len(grouped) == sum(len(g) for g in groups)
    assert LR_MULTS == (1.0, 2.0, 10.0, 20.0) and WEIGHT_DECAY_GROUPS == (True, False, True, False)


# --------------------------------------------------------------------------------------------------
# ImageNet weights


def _torchvision_named(backbone: ResNet101) -> dict[str, torch.Tensor]:
    """A synthetic torchvision-style file: the backbone's keys with fresh values, plus ``fc.*``."""
    g = torch.Generator().manual_seed(1)
    sd = {}
    for k, v in backbone.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue  # old torchvision files do not have them
        sd[k] = torch.rand(v.shape, generator=g, dtype=v.dtype)
    sd["fc.weight"] = torch.zeros(1000, 2048)
    sd["fc.bias"] = torch.zeros(1000)
    return sd


def test_torchvision_stem_loads_torchvision_names_strictly(tmp_path):
    model = DeepLabV2(num_classes=21, stem="torchvision")
    keys = set(model.backbone.state_dict())
    assert "conv1.weight" in keys and "bn1.weight" in keys and "layer1.0.downsample.0.weight" in keys
    assert model.backbone.conv1.weight.shape == (64, 3, 7, 7)
    sd = _torchvision_named(model.backbone)
    path = tmp_path / "resnet101-tv.pth"
    torch.save(sd, path)
    report = load_imagenet_weights(model, path, strict=True)
    assert report.ok
    assert set(report.ignored) == {"fc.weight", "fc.bias"}
    assert len(report.loaded) == len(sd) - 2
    for k in ("conv1.weight", "layer3.22.bn2.running_var", "layer4.0.downsample.0.weight"):
        torch.testing.assert_close(model.backbone.state_dict()[k], sd[k])


def test_deep_stem_file_report_and_shape_mismatch(tmp_path):
    backbone = ResNet101(stem="deep")
    sd = {k: v.clone() for k, v in backbone.state_dict().items() if k.startswith(("conv1.", "bn1."))}
    sd["layer1.0.conv1.weight"] = torch.ones(64, 128, 1, 1)
    sd["extra.weight"] = torch.zeros(3)
    before = backbone.state_dict()["layer1.0.conv1.weight"].clone()
    report = load_pretrained_state_dict(backbone, sd)
    assert "conv1.0.weight" in report.loaded and "bn1.running_var" in report.loaded
    assert report.unexpected == ("extra.weight",)
    assert "layer4.2.conv3.weight" in report.missing
    assert not any(k.endswith("num_batches_tracked") for k in report.missing)
    assert not report.ok
    assert not torch.equal(backbone.state_dict()["layer1.0.conv1.weight"], before)
    with pytest.raises(PretrainedWeightsError, match="missing"):
        load_pretrained_state_dict(backbone, sd, strict=True)

    # a wrong shape is an error that lists the key and both shapes, and loads nothing
    sd["layer1.0.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "resnet101s.pth"
    torch.save(sd, path)
    model = DeepLabV2(num_classes=21)
    conv = model.backbone.state_dict()["conv1.0.weight"].clone()
    with pytest.raises(PretrainedWeightsError) as err:
        load_imagenet_weights(model, path)
    msg = str(err.value)
    assert "layer1.0.conv2.weight" in msg and "[64, 64, 1, 1]" in msg and "[64, 64, 3, 3]" in msg
    assert err.value.report.mismatched == (("layer1.0.conv2.weight", (64, 64, 1, 1), (64, 64, 3, 3)),)
    torch.testing.assert_close(model.backbone.state_dict()["conv1.0.weight"], conv)


def test_torchvision_file_into_deep_stem_names_the_fix(tmp_path):
    deep = ResNet101(stem="deep")
    sd = _torchvision_named(ResNet101(stem="torchvision"))
    with pytest.raises(PretrainedWeightsError, match="stem='torchvision'") as err:
        load_pretrained_state_dict(deep, sd)
    assert "bn1.weight" in str(err.value)
