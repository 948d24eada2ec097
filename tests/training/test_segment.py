"""Step-2 test time (docs/algorithm.md 7.5) and ``hsc segment`` on a tiny random DeepLab network.

The network's classifier bias is set so that its four labels share one image (a random network
otherwise predicts one label everywhere), which makes label maps, CRF changes and flips visible.
"""

from __future__ import annotations

import copy
import json
import shutil

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hsc.core.cli import main
from hsc.model.checkpoint import file_sha256
from hsc.model.config import Normalization
from hsc.model.crf import DEEPLAB_TEST_CRF, crf_inference
from hsc.model.deeplab import DeepLabV2
from hsc.model.seg_checkpoint import save_segmenter
from hsc.training.datasets import load_rgb, open_dataset
from hsc.training.report import evaluate_predictions
from hsc.training.seg_data import load_image_cv2
from hsc.training.segment import DEFAULT_SCALES, segment_dataset, segment_image
from hsc.training.synth import synthesize

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _norm(img: np.ndarray) -> np.ndarray:
    return ((img.astype(np.float32) / 255 - MEAN) / STD).astype(np.float32)


def _chw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 3-class synthetic dataset, a tiny network balanced on its first val image, its checkpoint."""
    root = tmp_path_factory.mktemp("segment")
    data = root / "data"
    synthesize(data, train=1, val=3, seed=5, size=(56, 48), num_classes=3)
    index = open_dataset(data, split="val")
    torch.manual_seed(0)
    net = DeepLabV2(num_classes=4, layers=(1, 1, 1, 1), aspp_channels=16).eval()
    image = np.asarray(load_rgb(index.items[0].image))
    with torch.no_grad():
        feats = net.dropout1(net.aspp(net.backbone(_chw(_norm(image)))))  # (1, 16, h/8, w/8)
        net.cls_conv.bias.copy_(-(net.cls_conv.weight[:, :, 0, 0] @ feats.mean(dim=(0, 2, 3))))
    names = ("background", *index.classes)
    ckpt = root / "seg.safetensors"
    save_segmenter(ckpt, net, label_names=names)
    return data, index, net, image, ckpt


def test_single_scale_without_flip_and_crf_is_the_argmax_of_the_network(setup):
    _, _, net, image, _ = setup
    s = segment_image(net, image, scales=(1.0,), flip=False, crf=False, device="cpu")
    with torch.no_grad():
        logits = net(_chw(_norm(image)))[0]  # (4, H, W)
    assert s.labels.dtype == np.uint8 and s.labels.shape == image.shape[:2]
    assert s.probs.dtype == np.float32 and s.probs.shape == (4, *image.shape[:2])
    np.testing.assert_allclose(s.probs, torch.softmax(logits, 0).numpy(), atol=1e-5)
    np.testing.assert_array_equal(s.labels, logits.argmax(0).numpy())
    assert len(np.unique(s.labels)) >= 3  # the balanced network uses several labels


def test_multiscale_flip_matches_a_straightforward_reference(setup):
    _, _, net, image, _ = setup
    image = np.ascontiguousarray(image[:45, :53])  # odd sizes: the rounding of cv2's scaled sizes
    s = segment_image(net, image, crf=False)
    h, w = image.shape[:2]
    norm = _norm(image)
    maps = []
    with torch.no_grad():
        for rate in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75):
            x = _chw(cv2.resize(norm, None, fx=rate, fy=rate, interpolation=cv2.INTER_CUBIC))
            for flipped in (False, True):
                out = net(torch.flip(x, dims=[3]) if flipped else x)
                out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=True)
                maps.append(torch.flip(out, dims=[3]) if flipped else out)
        ref = torch.softmax(torch.cat(maps).mean(0), dim=0).numpy()
    np.testing.assert_allclose(s.probs, ref, atol=1e-5)
    close = np.sort(ref, axis=0)[-1] - np.sort(ref, axis=0)[-2] > 1e-4  # no near-ties
    np.testing.assert_array_equal(s.labels[close], ref.argmax(0)[close])
    # the scales and the flip really enter: both differ from a plain forward / from no flip
    single = segment_image(net, image, scales=(1.0,), flip=False, crf=False).probs
    no_flip = segment_image(net, image, flip=False, crf=False).probs
    assert np.abs(single - ref).max() > 1e-3 and np.abs(no_flip - ref).max() > 1e-3


def test_crf_is_the_argmax_of_the_deeplab_crf_on_the_denormalised_image(setup):
    _, _, net, image, _ = setup
    scales = (0.75, 1.0)
    with_crf = segment_image(net, image, scales=scales, crf=True)
    plain = segment_image(net, image, scales=scales, crf=False)
    np.testing.assert_array_equal(with_crf.probs, plain.probs)  # the probabilities are the CRF's input
    denorm = np.clip((_norm(image) * STD + MEAN) * 255, 0, 255).astype(np.uint8)
    assert np.abs(denorm.astype(int) - image).max() <= 1  # truncation, not rounding
    q = crf_inference(denorm, plain.probs, params=DEEPLAB_TEST_CRF)
    np.testing.assert_array_equal(with_crf.labels, q.argmax(0))
    assert with_crf.seconds["crf"] > 0
    changed = float((with_crf.labels != plain.labels).mean())
    assert 0.01 < changed < 0.9  # the CRF moves labels, but does not replace the map


def test_confident_maps_survive_the_crf(setup):
    _, _, net, image, _ = setup
    sure = copy.deepcopy(net)
    with torch.no_grad():
        sure.cls_conv.weight.zero_()
        sure.cls_conv.bias.copy_(torch.tensor([0.0, 0.0, 6.0, 0.0]))
    s = segment_image(sure, image, scales=(1.0,), flip=False)
    assert (s.labels == 2).all()


def test_bad_arguments_are_refused(setup):
    _, _, net, image, _ = setup
    with pytest.raises(ValueError, match="scales"):
        segment_image(net, image, scales=(), crf=False)
    with pytest.raises(ValueError, match="scales"):
        segment_image(net, image, scales=(1.0, -0.5), crf=False)
    with pytest.raises(ValueError, match="too small"):
        segment_image(net, image[:1, :1], scales=(0.25,), crf=False)
    with pytest.raises(ValueError, match="uint8"):
        segment_image(net, image.astype(np.float32), crf=False)
    train_mode = copy.deepcopy(net).train()
    with pytest.raises(ValueError, match="eval"):
        segment_image(train_mode, image, crf=False)


def test_dataset_run_writes_masks_resumes_and_evaluates(setup, tmp_path):
    data, index, net, _, ckpt = setup
    kw = dict(split="val", scales=(1.0,), progress=False)
    s = segment_dataset(ckpt, data, tmp_path, **kw)
    assert (s["total"], s["done"], s["skipped_existing"], s["failed"]) == (3, 3, 0, 0)
    assert s["checkpoint_sha256"] == file_sha256(ckpt)
    assert s["settings"]["scales"] == [1.0] and s["settings"]["flip"] and s["settings"]["crf"]
    assert s["settings"]["forwards_per_image"] == 2
    assert json.loads((tmp_path / "summary.json").read_text())["done"] == 3
    for it in index:
        with Image.open(tmp_path / "masks" / f"{it.id}.png") as im:
            assert im.mode == "P" and im.size == (56, 48)
            mask = np.array(im)
        direct = segment_image(net, load_image_cv2(it.image), scales=(1.0,)).labels  # decoded as the run does
        np.testing.assert_array_equal(mask, direct)
    assert not list(tmp_path.rglob("*.tmp"))

    again = segment_dataset(ckpt, data, tmp_path, **kw)
    assert (again["done"], again["skipped_existing"]) == (0, 3)
    victim = tmp_path / "masks" / f"{index.items[1].id}.png"
    victim.unlink()
    third = segment_dataset(ckpt, data, tmp_path, **kw)
    assert (third["done"], third["skipped_existing"]) == (1, 2) and victim.is_file()

    report = evaluate_predictions(data, split="val", masks=tmp_path / "masks")
    assert report["n_images"] == 3 and 0 <= report["miou"] <= 100


def test_masks_are_in_the_label_space_hsc_eval_scores(setup, tmp_path):
    """A network that answers one label everywhere: 0 is background, c + 1 the dataset's class c."""
    data, index, net, _, _ = setup
    gt = np.concatenate([np.array(Image.open(it.mask)).ravel() for it in index])
    present = [int(v) for v in np.unique(gt) if 0 < v < 255]
    for label in (0, present[0]):
        const = copy.deepcopy(net)
        with torch.no_grad():
            const.cls_conv.weight.zero_()
            const.cls_conv.bias.copy_(6.0 * torch.eye(4)[label])
        ckpt = tmp_path / f"const{label}.safetensors"
        save_segmenter(ckpt, const, label_names=("background", *index.classes))
        out = tmp_path / f"pred{label}"
        segment_dataset(ckpt, data, out, split="val", scales=(1.0,), flip=False, crf=False, progress=False)
        report = evaluate_predictions(data, split="val", masks=out / "masks")
        name = ("background", *index.classes)[label]
        assert report["recall"][name] == pytest.approx(100.0)
        assert all(v == 0 for n, v in report["recall"].items() if n != name)


def test_a_corrupt_image_is_reported_and_the_others_are_written(setup, tmp_path):
    data, _, _, _, ckpt = setup
    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    index = open_dataset(broken, split="val")
    index.items[0].image.write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "pred"
    s = segment_dataset(ckpt, broken, out, split="val", scales=(1.0,), flip=False, crf=False, progress=False)
    assert (s["done"], s["failed"]) == (2, 1)
    failure = json.loads((out / "summary.json").read_text())["failures"][0]
    assert failure["id"] == index.items[0].id and "Error" in failure["error"]
    assert not (out / "masks" / f"{index.items[0].id}.png").exists()
    assert all((out / "masks" / f"{it.id}.png").is_file() for it in index.items[1:])


def test_label_names_must_be_the_datasets(setup, tmp_path):
    data, _, net, _, _ = setup
    other = tmp_path / "other.safetensors"
    save_segmenter(other, net, label_names=("background", "cat", "dog", "bird"))
    with pytest.raises(ValueError, match="not the dataset's"):
        segment_dataset(other, data, tmp_path / "pred", split="val", progress=False)
    assert not (tmp_path / "pred").exists()


def test_cli_segment_then_eval_and_the_official_pth(setup, tmp_path, capsys):
    data, index, net, _, ckpt = setup
    common = ["--data", str(data), "--split", "val", "--scales", "0.75,1", "--no-flip", "--quiet"]
    assert main(["segment", "--checkpoint", str(ckpt), "--out", str(tmp_path / "a"), *common]) == 0
    assert "3 done" in capsys.readouterr().out
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert s["settings"]["scales"] == [0.75, 1.0] and not s["settings"]["flip"] and s["settings"]["crf"]

    pth = tmp_path / "official.pth"  # a bare state dict of 4 classes: the names come from the dataset
    torch.save(net.state_dict(), pth)
    assert main(["segment", "--checkpoint", str(pth), "--out", str(tmp_path / "b"), *common]) == 0
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["checkpoint_format"] == (
        "official-deeplab-state-dict"
    )
    for it in index:
        a, b = (np.array(Image.open(tmp_path / d / "masks" / f"{it.id}.png")) for d in ("a", "b"))
        np.testing.assert_array_equal(a, b)

    report = tmp_path / "report.json"
    argv = ["eval", "--data", str(data), "--split", "val", "--masks", str(tmp_path / "a" / "masks")]
    assert main([*argv, "--json", str(report)]) == 0
    assert 0 <= json.loads(report.read_text())["miou"] <= 100


def test_cli_failures_exit_3_and_errors_exit_1(setup, tmp_path, capsys):
    data, _, net, _, _ = setup
    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    open_dataset(broken, split="val").items[2].image.write_bytes(b"broken")
    pth = tmp_path / "official.pth"
    torch.save(net.state_dict(), pth)
    fast = ["--split", "val", "--scales", "1", "--no-flip", "--no-crf", "--quiet"]
    argv = ["segment", "--checkpoint", str(pth), "--data", str(broken), "--out", str(tmp_path / "p"), *fast]
    assert main(argv) == 3
    assert "failed val_000002" in capsys.readouterr().err
    voc21 = tmp_path / "voc21.pth"  # 21 outputs for a 3-class dataset
    torch.save(DeepLabV2(num_classes=21, layers=(1, 1, 1, 1), aspp_channels=16).state_dict(), voc21)
    argv = ["segment", "--checkpoint", str(voc21), "--data", str(data), "--out", str(tmp_path / "q"), *fast]
    assert main(argv) == 1
    assert "21 output channels" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["segment", "--checkpoint", str(pth), "--data", str(data), "--out", "x", "--scales", "1,-2"])
    assert e.value.code == 2


def test_default_scales_are_the_official_ones():
    assert DEFAULT_SCALES == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    np.testing.assert_allclose(Normalization().mean, MEAN, rtol=1e-6)  # what the tests normalise with
    np.testing.assert_allclose(Normalization().std, STD, rtol=1e-6)


@pytest.mark.gpu
def test_cuda_matches_the_cpu(setup):
    _, _, net, image, _ = setup
    cpu = segment_image(net, image, crf=False)
    gpu_net = copy.deepcopy(net).to("cuda")
    gpu = segment_image(gpu_net, image, crf=False, device="cuda")
    np.testing.assert_allclose(gpu.probs, cpu.probs, atol=1e-4)
    assert float((gpu.labels == cpu.labels).mean()) > 0.99
    with pytest.raises(ValueError, match="move it first"):
        segment_image(net, image, crf=False, device="cuda")


def test_images_without_image_level_labels_are_segmented(setup, tmp_path):
    """Step 2 needs no tags: a manifest of bare image paths (as VOC's test split) is segmented."""
    data, index, _, _, ckpt = setup
    m = tmp_path / "unlabelled"
    m.mkdir()
    (m / "classes.txt").write_text("\n".join(index.classes) + "\n")
    lines = [json.dumps({"image": str(it.image), "id": f"u{i}"}) for i, it in enumerate(index.items)]
    (m / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    s = segment_dataset(ckpt, m, tmp_path / "out", scales=(1.0,), crf=False, progress=False)
    assert s["done"] == len(index.items) and s["failed"] == 0
    assert sorted(p.stem for p in (tmp_path / "out" / "masks").iterdir()) == [f"u{i}" for i in range(3)]
