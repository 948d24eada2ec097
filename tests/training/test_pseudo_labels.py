"""``hsc infer`` over a generated dataset: outputs, label semantics, resume, a corrupt image, eval."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from hsc.model.checkpoint import save_checkpoint
from hsc.model.config import ModelInfo
from hsc.model.hsc_net import build_hsc_net
from hsc.training.cam_files import load_cams
from hsc.training.datasets import open_dataset
from hsc.training.pseudo_labels import run_infer
from hsc.training.synth import synthesize


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    data = root / "data"
    synthesize(data, train=2, val=4, seed=5, size=(64, 48), num_classes=3)
    classes = tuple(open_dataset(data).classes)
    torch.manual_seed(0)
    net = build_hsc_net(num_classes=len(classes), width=0.125)
    ckpt = root / "model.safetensors"
    save_checkpoint(ckpt, net, info=ModelInfo(net=net.cfg, class_names=classes))
    return data, ckpt


def test_writes_masks_cams_heatmaps_and_summary(setup, tmp_path):
    data, ckpt = setup
    s = run_infer(ckpt, data, tmp_path, split="val", crf=True, progress=False)
    assert (s["total"], s["done"], s["failed"]) == (4, 4, 0)
    assert s["settings"]["crf"] is True
    for it in open_dataset(data, split="val"):
        mask = np.array(Image.open(tmp_path / "masks" / f"{it.id}.png"))
        present = {int(c) + 1 for c in np.flatnonzero(it.labels)}
        assert mask.shape == (48, 64) and set(np.unique(mask)) <= {0} | present
        cams, classes, names = load_cams(tmp_path / "cams" / f"{it.id}.npz")
        assert {c + 1 for c in classes} == present and cams.shape[1:] == (48, 64)
        for n in names:
            assert (tmp_path / "heatmaps" / it.id / f"{n}.jpg").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["done"] == 4
    assert not list(tmp_path.rglob("*.tmp*"))


def test_rerun_skips_finished_images_and_redoes_missing_ones(setup, tmp_path):
    data, ckpt = setup
    run_infer(ckpt, data, tmp_path, split="val", progress=False, heatmaps=False)
    again = run_infer(ckpt, data, tmp_path, split="val", progress=False, heatmaps=False)
    assert (again["done"], again["skipped_existing"]) == (0, 4)
    victim = sorted((tmp_path / "masks").iterdir())[0]
    victim.unlink()
    third = run_infer(ckpt, data, tmp_path, split="val", progress=False, heatmaps=False)
    assert (third["done"], third["skipped_existing"]) == (1, 3) and victim.is_file()


@pytest.mark.parametrize("batch_images", [None, 3])
def test_a_corrupt_image_is_reported_and_skipped(setup, tmp_path, batch_images):
    data, ckpt = setup
    broken = tmp_path / "data"
    import shutil

    shutil.copytree(data, broken)
    first = open_dataset(broken, split="val").items[0]
    first.image.write_bytes(b"\xff\xd8 not really a jpeg")
    kw = dict(split="val", progress=False, heatmaps=False, batch_images=batch_images)
    s = run_infer(ckpt, broken, tmp_path / "pred", **kw)
    assert (s["done"], s["failed"]) == (3, 1)
    assert s["failures"][0]["id"] == first.id and "Error" in s["failures"][0]["error"]
    assert s["settings"]["batch_images"] == (batch_images or 1)
    if batch_images:  # the three good images went through one batch: same files as one at a time
        ref = run_infer(ckpt, broken, tmp_path / "ref", **{**kw, "batch_images": None})
        assert ref["done"] == 3
        for it in open_dataset(broken, split="val").items[1:]:
            a, b = (np.array(Image.open(tmp_path / d / "masks" / f"{it.id}.png")) for d in ("pred", "ref"))
            assert float((a == b).mean()) >= 0.999


def test_cli_infer_then_eval(setup, tmp_path):
    data, ckpt = setup
    pred = tmp_path / "pred"
    r = subprocess.run(
        [
            "hsc",
            "infer",
            "--checkpoint",
            str(ckpt),
            "--data",
            str(data),
            "--out",
            str(pred),
            "--split",
            "val",
            "--quiet",
            "--no-heatmaps",
            "--batch-images",
            "2",
            "--winograd",
            "off",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "4 done" in r.stdout
    r = subprocess.run(
        [
            "hsc",
            "eval",
            "--data",
            str(data),
            "--split",
            "val",
            "--cams",
            str(pred / "cams"),
            "--json",
            str(tmp_path / "report.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert 0 <= report["miou"] <= 100 and 0 <= report["best_threshold"] < 0.6
