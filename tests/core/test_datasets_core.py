"""The torch-free dataset openers (core/datasets.py): class defaults, layout detection, label PNGs.

The layouts themselves are tested through the training re-exports in tests/training/test_datasets.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hsc.core import datasets as core
from hsc.core.datasets import (
    DatasetError,
    open_dataset,
    open_manifest,
    open_voc,
    read_label_png,
    resolve_dataset,
)


def _jpeg(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _voc(root: Path) -> Path:
    """Two images whose masks hold labels {1, 3} and {2} (VOC label space), no classes.txt."""
    for i, values in enumerate(([1, 3], [2])):
        _jpeg(root / "JPEGImages" / f"im{i}.jpg", i)
        m = np.zeros((6, 8), np.uint8)
        for j, v in enumerate(values):
            m[:, j] = v
        m[0, 0] = 255
        (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        Image.fromarray(m, "L").save(root / "SegmentationClass" / f"im{i}.png")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("im0\nim1\n")
    return root


def _manifest(folder: Path, name: str = "manifest.jsonl") -> Path:
    _jpeg(folder / "a.jpg")
    _jpeg(folder / "b.jpg", 1)
    lines = [
        {"image": "a.jpg", "labels": ["Cat", "background"], "split": "train"},
        {"image": "b.jpg", "labels": ["dog", "cat"], "split": "val"},
    ]
    path = folder / name
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_voc_classes_come_from_the_argument_the_file_or_the_default(tmp_path):
    root = _voc(tmp_path)
    with pytest.raises(DatasetError, match="classes file not found"):
        open_voc(root, "train")
    ds = open_voc(root, "train", default_classes=["a", "b", "c"])
    assert ds.classes == ("a", "b", "c") and [it.classes for it in ds] == [(0, 2), (1,)]
    (root / "classes.txt").write_text("background\nx\ny\nz\n")
    assert open_voc(root, "train", default_classes=["a", "b", "c"]).classes == ("x", "y", "z")
    assert open_voc(root, "train", classes=["p", "q", "r", "s"]).classes == ("p", "q", "r", "s")
    with pytest.raises(DatasetError, match="outside 1..2"):  # masks hold label 3
        open_voc(root, "train", classes=["p", "q"])


def test_manifest_classes_and_default(tmp_path):
    path = _manifest(tmp_path)
    with pytest.raises(DatasetError, match="classes file not found"):
        open_manifest(path)
    ds = open_manifest(path, default_classes=("background", "cat", "dog"))
    assert ds.classes == ("cat", "dog") and [it.classes for it in ds] == [(0,), (0, 1)]
    assert ds.items[0].image == tmp_path / "a.jpg" and ds.ids == ["a", "b"]
    (tmp_path / "classes.txt").write_text("dog\ncat\n")
    ds = open_manifest(path, default_classes=("cat", "dog"))
    assert ds.classes == ("dog", "cat") and [it.classes for it in ds] == [(1,), (0, 1)]
    with pytest.raises(DatasetError, match="unknown class"):
        open_manifest(path, classes=["dog"])
    with pytest.raises(DatasetError, match="invalid class list"):
        open_manifest(path, default_classes=["cat", "Cat"], classes=["cat", "Cat"])


def test_resolve_dataset_and_open_dataset(tmp_path):
    voc = _voc(tmp_path / "voc")
    assert resolve_dataset(voc, "train") == ("voc", voc, "train")
    nested = tmp_path / "nested"
    _voc(nested / "VOCdevkit" / "VOC2012")
    assert resolve_dataset(nested)[0] == "voc"
    m = tmp_path / "m"
    path = _manifest(m)
    assert resolve_dataset(m, "val") == ("manifest", path, "val")
    assert resolve_dataset(path) == ("manifest", path, None)
    per_split = _manifest(m, "val.jsonl")
    assert resolve_dataset(m, "val") == ("manifest", per_split, None)  # the file is the split
    assert open_dataset(m, "val", default_classes=["cat", "dog"]).ids == ["a", "b"]
    assert open_dataset(path, "val", default_classes=["cat", "dog"]).ids == ["b"]
    assert open_dataset(voc, "train", default_classes=["a", "b", "c"]).kind == "voc"
    with pytest.raises(DatasetError, match="neither a VOC layout"):
        resolve_dataset(tmp_path)
    with pytest.raises(DatasetError, match="no such file"):
        resolve_dataset(tmp_path / "missing")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(DatasetError, match=".jsonl"):
        resolve_dataset(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="VOC-layout"):
        open_dataset(path, default_classes=["cat", "dog"], saliency_root=tmp_path)


def test_read_label_png_keeps_palette_indices_and_grey_values(tmp_path):
    labels = np.array([[0, 1, 20], [255, 3, 0]], np.uint8)
    p = Image.fromarray(labels, "P")
    p.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    p.save(tmp_path / "p.png")
    Image.fromarray(labels, "L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_label_png(tmp_path / "p.png"), labels)
    np.testing.assert_array_equal(read_label_png(tmp_path / "l.png"), labels)


def test_training_re_exports_the_core_objects():
    from hsc.training import datasets as training
    from hsc.training import evaluate

    for name in ("DatasetError", "DatasetIndex", "Item", "open_manifest", "read_classes_file", "load_rgb"):
        assert getattr(training, name) is getattr(core, name)
    assert evaluate.read_label_png is core.read_label_png is training.read_label_png


def test_training_openers_default_to_the_voc_classes(tmp_path):
    from hsc.model.classes import VOC_CLASSES
    from hsc.training.datasets import open_dataset as training_open_dataset
    from hsc.training.datasets import open_voc as training_open_voc

    root = _voc(tmp_path / "voc")
    assert training_open_voc(root, "train").classes == VOC_CLASSES
    assert training_open_dataset(root, "train").classes == VOC_CLASSES
    path = _manifest(tmp_path / "m")
    with pytest.raises(DatasetError, match="classes file not found"):
        training_open_dataset(path)  # manifests still name their classes


def test_importing_core_datasets_leaves_torch_out():
    code = "import sys, hsc.core.datasets, hsc.core.jobs, hsc.core.archives; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
