"""Step-2 training (``hsc train-seg``): the official augmentation, label checks, the loop, exact resume."""

from __future__ import annotations

import json
import random
import shutil

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hsc.core.cli import main
from hsc.core.datasets import DatasetError
from hsc.model.seg_checkpoint import load_segmenter
from hsc.training.datasets import open_dataset
from hsc.training.seg_config import SegTrainConfig
from hsc.training.seg_data import (
    SegAugmentConfig,
    SegTrainDataset,
    SegTrainTransform,
    label_paths,
    random_hsv,
)
from hsc.training.synth import synthesize
from hsc.training.train_seg import segmentation_loss, train_seg

pytestmark = pytest.mark.filterwarnings("ignore:no --init")

TINY = (1, 1, 1, 1)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    synthesize(root / "data", train=8, val=2, seed=5, size=(56, 48), num_classes=3)
    # a folder of "pseudo-labels": the ground truth with a band of ignored pixels
    labels = root / "labels"
    labels.mkdir()
    for item in open_dataset(root / "data", split="train").items:
        lab = np.array(Image.open(item.mask))
        lab[:4] = 255
        Image.fromarray(lab.astype(np.uint8)).save(labels / f"{item.id}.png")
    return root


def _cfg(mini, out, **kw):
    base = dict(
        data=str(mini / "data"),
        labels=str(mini / "labels"),
        out=str(out),
        layers=TINY,
        aspp_channels=16,
        crop=32,
        iters=2,
        batch=2,
        workers=0,
        log_every=1,
        save_every=100,
    )
    base.update(kw)
    return SegTrainConfig(**base)


# --------------------------------------------------------------------------------------------------
# augmentation


def test_random_hsv_shifts_hue_mod_180_and_clips_saturation_and_value():
    img = np.array([[[250, 10, 10], [5, 5, 5], [30, 200, 90]]], dtype=np.uint8)
    twin = random.Random(7)
    draws = [twin.randint(-10, 10) for _ in range(3)]  # dh, ds, dv in this order
    out = random_hsv(img, 10, random.Random(7))
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(int)
    want = hsv.copy()
    want[..., 0] = (hsv[..., 0] + draws[0]) % 180
    want[..., 1] = np.clip(hsv[..., 1] + draws[1], 0, 255)
    want[..., 2] = np.clip(hsv[..., 2] + draws[2], 0, 255)
    np.testing.assert_array_equal(out, cv2.cvtColor(want.astype(np.uint8), cv2.COLOR_HSV2RGB))


def test_transform_pads_the_label_with_255_and_the_image_with_0_and_keeps_label_values():
    t = SegTrainTransform(SegAugmentConfig(crop=96, scale=(1.0, 1.0), hsv=0))
    img = np.full((20, 30, 3), 255, dtype=np.uint8)
    lab = np.random.default_rng(0).integers(0, 4, (20, 30)).astype(np.uint8)
    x, y = t(img, lab, random.Random(3))
    assert x.shape == (3, 96, 96) and x.dtype == np.float32 and y.shape == (96, 96) and y.dtype == np.int64
    inside = y != 255
    assert inside.sum() == 20 * 30  # scale 1: the whole image inside the padded crop
    assert set(np.unique(y[inside])) <= {0, 1, 2, 3}
    assert np.all(x[:, ~inside] == 0)  # padding is 0 after normalisation
    # white pixels normalised: (1 - mean) / std
    np.testing.assert_allclose(x[0][inside], (1 - 0.485) / 0.229, rtol=1e-6)


def test_transform_follows_the_official_draw_order():
    cfg = SegAugmentConfig(crop=16, scale=(0.5, 1.5), hsv=10)
    img = np.random.default_rng(1).integers(0, 256, (30, 40, 3)).astype(np.uint8)
    lab = np.random.default_rng(2).integers(0, 3, (30, 40)).astype(np.uint8)
    x, y = SegTrainTransform(cfg)(img, lab, random.Random(11))
    # the same steps by hand, drawing from an identical generator
    rng = random.Random(11)
    im = random_hsv(img, 10, rng)
    lb = lab
    if rng.random() < 0.5:
        im, lb = im[:, ::-1], lb[:, ::-1]
    r = 0.5 + rng.random()
    im = cv2.resize(np.ascontiguousarray(im), None, fx=r, fy=r, interpolation=cv2.INTER_CUBIC)
    lb = cv2.resize(np.ascontiguousarray(lb), None, fx=r, fy=r, interpolation=cv2.INTER_NEAREST)
    h, w = lb.shape
    assert h > 16 and w > 16  # both axes cropped (not padded) at this scale range
    sx = rng.randrange(w - 16 + 1)
    sy = rng.randrange(h - 16 + 1)
    want = (
        im[sy : sy + 16, sx : sx + 16].astype(np.float32) / 255 - np.float32([0.485, 0.456, 0.406])
    ) / np.float32([0.229, 0.224, 0.225])
    np.testing.assert_allclose(x, want.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(y, lb[sy : sy + 16, sx : sx + 16])


def test_samples_depend_only_on_seed_epoch_and_index(mini):
    index = open_dataset(mini / "data", split="train")
    ds = SegTrainDataset(index, mini / "labels", config=SegAugmentConfig(crop=32), seed=4)
    a, b, c = ds[(0, 3)], ds[(0, 3)], ds[(1, 3)]
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert not torch.equal(a[1], c[1])


# --------------------------------------------------------------------------------------------------
# labels


def test_missing_and_mis_sized_labels_are_all_reported_at_once(mini, tmp_path):
    index = open_dataset(mini / "data", split="train")
    bad = tmp_path / "labels"
    shutil.copytree(mini / "labels", bad)
    ids = index.ids
    (bad / f"{ids[0]}.png").unlink()
    (bad / f"{ids[1]}.png").unlink()
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(bad / f"{ids[2]}.png")
    with pytest.raises(DatasetError) as e:
        label_paths(index, bad)
    msg = str(e.value)
    assert f"{ids[0]}.png: missing" in msg and f"{ids[1]}.png: missing" in msg
    assert f"{ids[2]}.png: 5x5, its image 56x48" in msg
    with pytest.raises(DatasetError, match="no such folder"):
        label_paths(index, tmp_path / "nowhere")


def test_ground_truth_labels_and_out_of_range_values(mini, tmp_path):
    index = open_dataset(mini / "data", split="train")
    assert label_paths(index, "gt") == [it.mask for it in index.items]
    bad = tmp_path / "labels"
    shutil.copytree(mini / "labels", bad)
    Image.fromarray(np.full((48, 56), 9, np.uint8)).save(bad / f"{index.ids[0]}.png")
    ds = SegTrainDataset(index, bad, config=SegAugmentConfig(crop=32))
    with pytest.raises(ValueError, match=r"label values \[9\] are neither classes 0\.\.3 nor 255"):
        ds[(0, 0)]


def test_segmentation_loss_ignores_255_and_is_zero_without_labelled_pixels():
    logits = torch.randn(2, 4, 5, 6)
    labels = torch.randint(0, 4, (2, 5, 6))
    labels[0, :2] = 255
    want = F.cross_entropy(logits, labels, ignore_index=255)
    torch.testing.assert_close(segmentation_loss(logits, labels), want)
    assert float(segmentation_loss(logits, torch.full((2, 5, 6), 255))) == 0.0


# --------------------------------------------------------------------------------------------------
# the loop


def _metrics(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_writes_a_loadable_segmenter_with_the_official_schedule(mini, tmp_path):
    cfg = _cfg(mini, tmp_path / "run", iters=3)
    torch.manual_seed(cfg.seed)
    from hsc.model.deeplab import DeepLabV2

    init = DeepLabV2(num_classes=4, layers=TINY, aspp_channels=16).state_dict()
    final = train_seg(cfg, progress=False)
    assert final.name == "final.safetensors"
    ck = load_segmenter(final)
    assert ck.label_names == ("background", *open_dataset(mini / "data").class_names)
    assert ck.step == 3 and ck.train_config["layers"] == list(TINY)
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for i, r in enumerate(rows):  # lr = 0.001 (1 - i / (iters + 1))^0.9
        assert r["lr"] == pytest.approx(0.001 * (1 - i / 4) ** 0.9, rel=1e-12)
        assert np.isfinite(r["loss"]) and r["images_per_s"] > 0
    sd = ck.net.state_dict()
    # BatchNorm affine parameters are in no group: unchanged; their statistics and the convs moved
    assert torch.equal(sd["backbone.bn1.weight"], init["backbone.bn1.weight"])
    assert torch.equal(sd["aspp.branch1.1.bias"], init["aspp.branch1.1.bias"])
    assert not torch.equal(sd["backbone.bn1.running_mean"], init["backbone.bn1.running_mean"])
    assert not torch.equal(sd["cls_conv.weight"], init["cls_conv.weight"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["iters"] == 3


def test_resume_continues_exactly(mini, tmp_path):
    whole = train_seg(_cfg(mini, tmp_path / "a", iters=4), progress=False)
    part = train_seg(_cfg(mini, tmp_path / "b", iters=4), progress=False, stop_after=2)
    assert part.name == "step_2.safetensors"
    resumed = train_seg(_cfg(mini, tmp_path / "b", iters=4, resume=True), progress=False)
    la = [r["loss"] for r in _metrics(tmp_path / "a")]
    lb = [r["loss"] for r in _metrics(tmp_path / "b")]
    assert la == lb
    a, b = load_segmenter(whole).net.state_dict(), load_segmenter(resumed).net.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_without_a_run_is_a_clear_error(mini, tmp_path):
    with pytest.raises(ValueError, match="nothing to resume"):
        train_seg(_cfg(mini, tmp_path / "empty", resume=True), progress=False)


def test_cli_trains_from_flags_and_a_config_file(mini, tmp_path, capsys):
    conf = tmp_path / "seg.json"
    conf.write_text(
        json.dumps(
            {"layers": list(TINY), "aspp_channels": 16, "crop": 32, "iters": 5, "batch": 2, "workers": 0}
        )
    )
    out = tmp_path / "cli"
    rc = main(
        [
            "train-seg",
            "--config",
            str(conf),
            "--data",
            str(mini / "data"),
            "--labels",
            "gt",
            "--out",
            str(out),
            "--iters",
            "1",
            "--scale",
            "0.75",
            "1.25",
        ]
    )
    assert rc == 0 and "final.safetensors" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    assert saved["iters"] == 1 and saved["scale"] == [0.75, 1.25] and saved["labels"] == "gt"
    assert load_segmenter(out / "final.safetensors").step == 1
    assert main(["info", str(out / "final.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "step-2 segmenter (DeepLab)" and info["step"] == 1
    assert info["net"]["layers"] == list(TINY) and info["labels"][0] == "background"


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(mini, tmp_path):
    """DistributedDataParallel over 2 CPU processes (gloo), launched as a user would with torchrun."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "hsc.core.cli", "train-seg", "--data", str(mini / "data"), "--labels", str(mini / "labels"),
        "--out", str(out), "--layers", "1", "1", "1", "1", "--aspp-channels", "16", "--crop", "32",
        "--iters", "2", "--batch", "4", "--workers", "0", "--log-every", "1", "--device", "cpu",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_segmenter(out / "final.safetensors").step == 2
    assert [x["step"] for x in _metrics(out)] == [1, 2]  # rank 0 alone writes the metrics
    assert (out / "rng.rank0.pt").is_file() and (out / "rng.rank1.pt").is_file()
    with pytest.raises(ValueError, match="batch must be >= 2"):
        _cfg(mini, tmp_path / "x", batch=1)


def test_imagenet_init_is_loaded_checked_and_reported(mini, tmp_path):
    from hsc.model.resnet101 import ResNet101

    torch.manual_seed(3)
    backbone = ResNet101(layers=TINY)
    with torch.no_grad():
        backbone.bn1.weight.uniform_(0.5, 1.5)  # "ImageNet" BatchNorm scales, not the default ones
    good = tmp_path / "resnet101s.pth"
    torch.save({**backbone.state_dict(), "fc.weight": torch.zeros(1000, 2048)}, good)
    train_seg(_cfg(mini, tmp_path / "a", iters=1, init=str(good)), progress=False)
    # the BatchNorm affine parameters are never optimised: they are the file's after training
    sd = load_segmenter(tmp_path / "a" / "final.safetensors").net.state_dict()
    assert torch.equal(sd["backbone.bn1.weight"], backbone.state_dict()["bn1.weight"])
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in backbone.state_dict().items() if not k.startswith("layer4.")}, partial)
    with pytest.warns(UserWarning, match="covers the backbone partly"):
        train_seg(_cfg(mini, tmp_path / "b", iters=1, init=str(partial)), progress=False)
    junk = tmp_path / "junk.pth"
    torch.save({"something.else": torch.zeros(3)}, junk)
    with pytest.raises(ValueError, match="none of its tensors is a ResNet-101 backbone key"):
        train_seg(_cfg(mini, tmp_path / "c", iters=1, init=str(junk)), progress=False)
