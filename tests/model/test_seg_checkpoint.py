"""The step-2 segmenter files: our safetensors format and the official DeepLab state dict."""

from __future__ import annotations

import pytest
import torch

from hsc.model.checkpoint import CheckpointError, CheckpointNotFoundError, save_checkpoint
from hsc.model.classes import VOC_CLASSES
from hsc.model.config import HSCNetConfig, ModelInfo, Normalization
from hsc.model.deeplab import DeepLabV2
from hsc.model.hsc_net import build_hsc_net
from hsc.model.seg_checkpoint import infer_deeplab_config, load_segmenter, save_segmenter

NAMES = ("background", "cat", "dog")


def _tiny(num_classes=3, **kw):
    torch.manual_seed(0)
    return DeepLabV2(num_classes=num_classes, layers=(1, 2, 1, 1), aspp_channels=8, **kw)


def test_round_trip_keeps_weights_shape_names_and_metadata(tmp_path):
    net = _tiny()
    norm = Normalization(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    digest = save_segmenter(
        tmp_path / "s.safetensors",
        net,
        label_names=NAMES,
        normalization=norm,
        train_config={"iters": 7},
        step=7,
    )
    ck = load_segmenter(tmp_path / "s.safetensors")
    assert ck.sha256 == digest and ck.source_format == "hsc-segmenter"
    assert ck.label_names == NAMES and ck.normalization == norm and ck.step == 7
    assert ck.train_config == {"iters": 7} and not ck.net.training
    assert (
        ck.net.config()
        == net.config()
        == {
            "num_classes": 3,
            "stem": "deep",
            "layers": [1, 2, 1, 1],
            "aspp_channels": 8,
            "rates": [6, 12, 18, 24],
            "image_pooling": True,
        }
    )
    for k, v in net.state_dict().items():
        assert torch.equal(ck.net.state_dict()[k], v), k
    x = torch.randn(1, 3, 24, 24)
    net.eval()
    torch.testing.assert_close(ck.net(x), net(x))


def test_label_names_must_match_the_outputs(tmp_path):
    with pytest.raises(CheckpointError, match="2 label names for a network with 3 output channels"):
        save_segmenter(tmp_path / "s.safetensors", _tiny(), label_names=NAMES[:2])
    with pytest.raises(CheckpointError, match="duplicate label names"):
        save_segmenter(tmp_path / "s.safetensors", _tiny(), label_names=("background", "cat", "cat"))


def test_the_official_state_dict_loads_strictly_with_its_shape_read_off_the_tensors(tmp_path):
    net = _tiny(num_classes=21, stem="torchvision")
    sd = {"module." + k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "deeplab.pth")
    ck = load_segmenter(tmp_path / "deeplab.pth")
    assert ck.source_format == "official-deeplab-state-dict"
    assert ck.label_names == ("background", *VOC_CLASSES)
    assert ck.net.config() == net.config()
    assert infer_deeplab_config(net.state_dict())["layers"] == [1, 2, 1, 1]
    # the full official network: 674 keys
    assert infer_deeplab_config(DeepLabV2().state_dict()) == DeepLabV2().config()


def test_official_files_with_other_class_counts_need_label_names(tmp_path):
    torch.save(_tiny().state_dict(), tmp_path / "d.pth")
    with pytest.raises(CheckpointError, match="3 output channels .* pass label_names"):
        load_segmenter(tmp_path / "d.pth")
    assert load_segmenter(tmp_path / "d.pth", label_names=NAMES).label_names == NAMES


def test_wrong_files_give_one_clear_error(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        load_segmenter(tmp_path / "none.safetensors")
    sd = _tiny().state_dict()
    broken = dict(sd)
    del broken["aspp.conv_cat.0.weight"]
    broken["cls_conv.bias"] = torch.zeros(5)
    broken["extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as e:
        load_segmenter(tmp_path / "broken.pth", label_names=NAMES)
    msg = str(e.value)
    assert "1 missing keys: aspp.conv_cat.0.weight" in msg and "unexpected keys: extra.weight" in msg
    assert "cls_conv.bias: file [5] vs network [3]" in msg
    torch.save({"fc8.weight": torch.zeros(21, 4096, 1, 1)}, tmp_path / "hsc.pth")
    with pytest.raises(CheckpointError, match="no cls_conv.weight: not a DeepLab"):
        load_segmenter(tmp_path / "hsc.pth")
    # a step-1 checkpoint is named as such
    hsc_net = build_hsc_net(num_classes=2, width=0.125)
    info = ModelInfo(net=HSCNetConfig(num_classes=2, width=0.125), class_names=("cat", "dog"))
    save_checkpoint(tmp_path / "step1.safetensors", hsc_net, info=info)
    with pytest.raises(CheckpointError, match="step-1 HSC checkpoint: use it with hsc infer"):
        load_segmenter(tmp_path / "step1.safetensors")


def test_is_segmenter_file_tells_step_2_files_from_the_rest(tmp_path):
    from hsc.model.seg_checkpoint import is_segmenter_file

    save_segmenter(tmp_path / "s.safetensors", _tiny(), label_names=NAMES)
    torch.save(_tiny().state_dict(), tmp_path / "d.pth")
    hsc_net = build_hsc_net(num_classes=2, width=0.125)
    info = ModelInfo(net=HSCNetConfig(num_classes=2, width=0.125), class_names=("cat", "dog"))
    save_checkpoint(tmp_path / "step1.safetensors", hsc_net, info=info)
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    assert is_segmenter_file(tmp_path / "s.safetensors") and is_segmenter_file(tmp_path / "d.pth")
    assert not is_segmenter_file(tmp_path / "step1.safetensors")
    assert not is_segmenter_file(tmp_path / "junk.bin") and not is_segmenter_file(tmp_path / "none")
    named = load_segmenter(tmp_path / "d.pth", placeholder_names=True).label_names
    assert named == ("background", "class_1", "class_2")
