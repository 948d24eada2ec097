"""``hsc eval``: reports for masks and CAMs on a generated dataset, the plot, clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from hsc.training.cam_files import load_cams, save_cams
from hsc.training.datasets import open_dataset
from hsc.training.evaluate import read_label_png
from hsc.training.report import evaluate_predictions
from hsc.training.synth import synthesize


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval") / "data"
    synthesize(root, train=4, val=5, seed=11, size=(56, 48), num_classes=3)
    return root


def _cams_from_truth(data, out, noise=0.0, seed=0):
    """CAMs that are 0.5 on each class's true pixels (+ noise elsewhere): t < 0.5 recovers the truth."""
    rng = np.random.default_rng(seed)
    for it in open_dataset(data, split="val"):
        gt = read_label_png(it.mask)
        classes = [int(c) for c in np.flatnonzero(it.labels)]
        cams = np.stack([(gt == c + 1) * 0.5 + rng.uniform(0, noise, gt.shape) for c in classes]).astype(
            np.float32
        )
        save_cams(out / f"{it.id}.npz", cams, classes, [f"c{c}" for c in classes])


def test_perfect_masks_score_100(data, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for it in open_dataset(data, split="val"):
        shutil.copy(it.mask, masks / f"{it.id}.png")
    r = evaluate_predictions(data, split="val", masks=masks)
    assert r["mode"] == "masks" and r["n_images"] == 5
    assert r["miou"] == pytest.approx(100.0)
    assert set(r["iou"]) == {"background", *open_dataset(data).classes}


def test_cam_sweep_finds_a_threshold_below_the_class_score(data, tmp_path):
    _cams_from_truth(data, tmp_path / "cams", noise=0.3)
    r = evaluate_predictions(data, split="val", cams=tmp_path / "cams")
    assert r["mode"] == "cams" and len(r["curve"]) == 60
    assert 0.3 <= r["best_threshold"] < 0.5 and r["miou"] == pytest.approx(100.0)
    at = {round(p["threshold"], 2): p["miou"] for p in r["curve"]}
    assert at[0.0] < 100.0  # every pixel with any noise is foreground at t = 0


def test_cli_writes_json_and_plot(data, tmp_path):
    _cams_from_truth(data, tmp_path / "cams", noise=0.2)
    out = subprocess.run(
        [
            "hsc",
            "eval",
            "--data",
            str(data),
            "--split",
            "val",
            "--cams",
            str(tmp_path / "cams"),
            "--json",
            str(tmp_path / "r.json"),
            "--plot",
            str(tmp_path / "curve.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert {"miou", "best_threshold", "iou", "precision", "recall", "confusion"} <= set(r)
    assert Image.open(tmp_path / "curve.png").size[0] > 100


def test_missing_predictions_are_listed(data, tmp_path):
    (tmp_path / "masks").mkdir()
    with pytest.raises(ValueError, match="5 of 5 images have no prediction"):
        evaluate_predictions(data, split="val", masks=tmp_path / "masks")


def test_cam_files_round_trip_without_pickles(tmp_path):
    cams = np.random.default_rng(0).random((2, 7, 9), dtype=np.float32)
    save_cams(tmp_path / "a.npz", cams, [3, 11], ["cat", "dog"])
    back, classes, names = load_cams(tmp_path / "a.npz")
    assert np.array_equal(back, cams) and classes == (3, 11) and names == ("cat", "dog")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable hsc CAM file"):
        load_cams(tmp_path / "bad.npz")
    assert not list(tmp_path.glob(".*tmp*"))
