"""The whole chain as a user runs it from the shell: synthetic data -> step 1 (hsc train) -> pseudo-labels
of the train split (hsc infer) -> step 2 (hsc train-seg) -> val masks (hsc segment) -> hsc eval."""

from __future__ import annotations

import json
import subprocess

import numpy as np
from PIL import Image

from hsc.training.datasets import open_dataset


def _hsc(*args: str) -> str:
    r = subprocess.run(["hsc", *args], capture_output=True, text=True)
    assert r.returncode == 0, f"hsc {' '.join(args)}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_synth_train_infer_train_seg_segment_eval(tmp_path):
    data, run, pred, seg_run, seg = (tmp_path / n for n in ("data", "run", "pred", "segrun", "seg"))
    _hsc("data", "synth", str(data), "--train", "6", "--val", "3", "--seed", "2", "--size", "64x56")
    _hsc(
        "train", "--data", str(data), "--out", str(run), "--width", "0.125", "--iters", "2", "--batch", "2",
        "--crop", "48", "--resize-long", "56", "64", "--workers", "0", "--no-freeze-bn",
    )  # fmt: skip
    _hsc(
        "infer", "--checkpoint", str(run / "final.safetensors"), "--data", str(data), "--split", "train",
        "--out", str(pred), "--crf", "--quiet", "--no-heatmaps", "--winograd", "off",
    )  # fmt: skip
    _hsc(
        "train-seg", "--data", str(data), "--labels", str(pred / "masks"), "--out", str(seg_run),
        "--layers", "1", "1", "1", "1", "--aspp-channels", "16", "--crop", "48", "--iters", "2",
        "--batch", "2", "--workers", "0",
    )  # fmt: skip
    out = _hsc(
        "segment", "--checkpoint", str(seg_run / "final.safetensors"), "--data", str(data), "--split", "val",
        "--out", str(seg), "--scales", "0.75,1.0", "--quiet",
    )  # fmt: skip
    assert out.strip()
    summary = json.loads((seg / "summary.json").read_text())
    assert summary["done"] == 3 and summary["failed"] == 0
    val = open_dataset(data, split="val")
    for it in val.items:
        mask = np.array(Image.open(seg / "masks" / f"{it.id}.png"))
        assert mask.shape == (56, 64) and int(mask.max()) <= val.num_classes
    _hsc(
        "eval", "--data", str(data), "--split", "val", "--masks", str(seg / "masks"),
        "--json", str(tmp_path / "report.json"),
    )  # fmt: skip
    report = json.loads((tmp_path / "report.json").read_text())
    assert 0 <= report["miou"] <= 100
    assert json.loads((seg_run / "config.json").read_text())["labels"] == str(pred / "masks")
