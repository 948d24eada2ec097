"""Dataset layouts (VOC, manifest), their validation, and the training dataset (training/datasets.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hsc.model.classes import VOC_CLASSES
from hsc.training.datasets import (
    DatasetError,
    HSCTrainDataset,
    epoch_order,
    open_dataset,
    open_manifest,
    open_voc,
    read_classes_file,
    read_id_list,
)
from hsc.training.transforms import AugmentConfig

SMALL = AugmentConfig(crop=32, long_side=(32, 48))


def _jpeg(path: Path, w: int = 20, h: int = 15, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=90)


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), "L").save(path)


def _mask(values: list[int], w: int = 20, h: int = 15) -> np.ndarray:
    """A label map with a vertical stripe per value, 0 elsewhere, a 255 border row."""
    m = np.zeros((h, w), np.uint8)
    for i, v in enumerate(values):
        m[:, 2 + 3 * i : 4 + 3 * i] = v
    m[0] = 255
    return m


# masks of the generated VOC set: VOC label space (c + 1)
VOC_MASKS = {
    "2007_000001": [1, 15],  # aeroplane, person
    "2007_000002": [8],  # cat
    "2007_000003": [12, 13, 20],  # dog, horse, tvmonitor
}


def _voc(root: Path, *, masks_dir: str = "SegmentationClassAug", saliency: bool = False) -> Path:
    for i, (id_, values) in enumerate(VOC_MASKS.items()):
        _jpeg(root / "JPEGImages" / f"{id_}.jpg", seed=i)
        _png(root / masks_dir / f"{id_}.png", _mask(values))
        if saliency:
            _png(root / "saliency" / f"{id_}.png", np.full((15, 20), 100 + i))
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("2007_000001\n2007_000002\n\n  2007_000003  \n")
    pairs = "".join(f"/JPEGImages/{i}.jpg /{masks_dir}/{i}.png\n" for i in VOC_MASKS)
    (lists / "train_aug.txt").write_text("\n" + pairs + "   \n")
    return root


def _hot(k: int, *idx: int) -> np.ndarray:
    y = np.zeros(k, np.float32)
    y[list(idx)] = 1
    return y


# -------------------------------------------------------------------------------------------------
# VOC layout


def test_voc_labels_derived_from_masks_without_cls_labels(tmp_path):
    ds = open_voc(_voc(tmp_path), "train")
    assert ds.kind == "voc" and ds.classes == VOC_CLASSES and ds.num_classes == 20
    assert ds.ids == list(VOC_MASKS)
    np.testing.assert_array_equal(ds[0].labels, _hot(20, 0, 14))  # 0 and 255 ignored
    np.testing.assert_array_equal(ds[2].labels, _hot(20, 11, 12, 19))
    assert ds[0].labels.dtype == np.float32 and ds[1].classes == (7,)
    assert ds[0].image == tmp_path / "JPEGImages" / "2007_000001.jpg"
    assert ds[0].mask == tmp_path / "SegmentationClassAug" / "2007_000001.png"
    assert ds[0].saliency is None and not ds.has_saliency and ds.has_masks
    assert ds.label_matrix().shape == (3, 20)


def test_voc_labels_from_cls_labels_npy(tmp_path):
    root = _voc(tmp_path)
    table = {"2007_000001": _hot(20, 3), "2007_000002": _hot(20, 4, 5), "2007_000003": _hot(20, 19)}
    np.save(root / "cls_labels.npy", table)
    ds = open_voc(root, "train")
    for item in ds:
        np.testing.assert_array_equal(item.labels, table[item.id])  # the file wins over the masks
    # an id missing from the file falls back to its mask; an explicit path is used as given
    del table["2007_000002"]
    np.save(tmp_path / "other.npy", table)
    ds = open_voc(root, "train", cls_labels=tmp_path / "other.npy")
    np.testing.assert_array_equal(ds[1].labels, _hot(20, 7))
    np.testing.assert_array_equal(ds[0].labels, _hot(20, 3))


def test_voc_path_pair_lists_default_split_and_nested_root(tmp_path):
    root = _voc(tmp_path / "VOCdevkit" / "VOC2012", masks_dir="SegmentationClass")
    ds = open_voc(tmp_path)  # finds VOCdevkit/VOC2012, default split train_aug (path pairs)
    assert ds.split == "train_aug" and ds.ids == list(VOC_MASKS) and ds.root == root
    assert ds[0].mask == root / "SegmentationClass" / "2007_000001.png"
    lst = root / "ImageSets" / "Segmentation" / "train_aug.txt"
    assert read_id_list(lst) == [(i, n) for n, i in enumerate(VOC_MASKS, 2)]
    ds2 = open_voc(root, lst)  # a list file given directly
    assert ds2.ids == ds.ids


def test_voc_with_classes_txt_and_saliency(tmp_path):
    root = tmp_path
    (root / "classes.txt").write_text("background\nsquare\ncircle\n\ntriangle\n")
    masks = {"a": [1], "b": [2, 3], "c": [3]}
    for i, (id_, values) in enumerate(masks.items()):
        _jpeg(root / "JPEGImages" / f"{id_}.jpg", seed=i)
        _png(root / "SegmentationClass" / f"{id_}.png", _mask(values))
        _png(root / "saliency" / f"{id_}.png", np.full((15, 20), 200))
    (root / "val.txt").write_text("a\nb\nc\n")
    ds = open_dataset(root, "val")
    assert ds.classes == ("square", "circle", "triangle")
    np.testing.assert_array_equal(ds.label_matrix(), [[1, 0, 0], [0, 1, 1], [0, 0, 1]])
    assert ds.has_saliency and ds[1].saliency == root / "saliency" / "b.png"


def test_voc_problems_are_reported_together_with_list_lines(tmp_path):
    root = _voc(tmp_path)
    (root / "JPEGImages" / "2007_000002.jpg").unlink()
    _png(root / "SegmentationClassAug" / "2007_000003.png", _mask([21, 3]))  # 21 > K
    lst = root / "ImageSets" / "Segmentation" / "bad.txt"
    lst.write_text("2007_000001\n2007_000002\n2007_000003\n2007_000001\n2007_000099\n")
    _jpeg(root / "JPEGImages" / "2007_000099.jpg")
    with pytest.raises(DatasetError) as e:
        open_voc(root, "bad", require_saliency=True)
    msg = str(e.value)
    assert f"{lst}:2: image not found" in msg
    assert f"{lst}:3: mask" in msg and "[21]" in msg
    assert f"{lst}:4: duplicate id '2007_000001' (first on line 1)" in msg
    assert f"{lst}:5: no image-level labels for '2007_000099'" in msg
    assert "saliency maps required" in msg
    assert len(e.value.problems) == 5 and isinstance(e.value, ValueError)


def test_voc_missing_split_and_bad_cls_labels(tmp_path):
    root = _voc(tmp_path)
    with pytest.raises(DatasetError, match="no list file for split 'test'"):
        open_voc(root, "test")
    np.save(root / "cls_labels.npy", {"2007_000001": np.ones(5, np.float32)})
    with pytest.raises(DatasetError, match="has 5 values, expected 20"):
        open_voc(root, "train")


# -------------------------------------------------------------------------------------------------
# manifest


def _manifest_set(root: Path) -> Path:
    (root / "classes.txt").write_text("background\ncat\ndog\nbird\n")
    for i in range(3):
        _jpeg(root / "img" / f"{i}.jpg", seed=i)
        _png(root / "sal" / f"{i}.png", np.full((15, 20), 255))
    _png(root / "masks" / "0.png", _mask([1, 2]))
    lines = [
        {"image": "img/0.jpg", "labels": ["cat", "Dog"], "mask": "masks/0.png", "saliency": "sal/0.png"},
        {"image": str(root / "img" / "1.jpg"), "labels": ["bird"], "split": "val", "extra": 1},
        {"image": "img/2.jpg", "labels": ["dog", "background"], "id": "two", "saliency": "sal/2.png"},
    ]
    path = root / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    return path


def test_manifest_happy_path(tmp_path):
    path = _manifest_set(tmp_path)
    ds = open_manifest(path)
    assert ds.kind == "manifest" and ds.classes == ("cat", "dog", "bird")
    assert ds.ids == ["0", "1", "two"]
    np.testing.assert_array_equal(ds.label_matrix(), [[1, 1, 0], [0, 0, 1], [0, 1, 0]])
    assert ds[0].image == tmp_path / "img" / "0.jpg" and ds[0].mask == tmp_path / "masks" / "0.png"
    assert ds[1].mask is None and ds[1].saliency is None and ds[2].saliency == tmp_path / "sal" / "2.png"
    # auto-detection: the file, or the folder holding manifest.jsonl; split filter
    assert open_dataset(path).ids == ds.ids
    assert open_dataset(tmp_path, "val").ids == ["1"]
    (tmp_path / "manifest_val.jsonl").write_text(path.read_text().splitlines()[0] + "\n")
    assert open_dataset(tmp_path, "val").ids == ["0"]  # a per-split file wins, unfiltered
    # classes given as a list instead of the file beside the manifest
    assert open_manifest(path, classes=["cat", "dog", "bird", "fish"]).num_classes == 4


def test_manifest_every_error_kind_in_one_message(tmp_path):
    path = _manifest_set(tmp_path)
    bad = [
        '{"image": "img/0.jpg", "labels": ["cat"]}',  # 1 ok
        '{"image": "img/0.jpg", "labels": ["dog"]}',  # 2 duplicate id "0"
        '{"image": "img/1.jpg", "labels": ["cat", "unicorn"]}',  # 3 unknown class
        '{"image": "img/missing.jpg", "labels": ["cat"]}',  # 4 missing image
        '{"image": "img/2.jpg", "labels": []}',  # 5 empty label list
        '{"image": "img/2.jpg", "labels": ["cat"',  # 6 malformed JSON
        '["img/2.jpg"]',  # 7 not an object
        '{"labels": ["cat"]}',  # 8 no image
        '{"image": "img/2.jpg", "id": "x", "labels": ["cat"], "mask": "masks/none.png"}',  # 9 missing mask
        '{"image": "img/2.jpg", "id": "y", "labels": "cat"}',  # 10 labels not a list
    ]
    path.write_text("\n".join(bad) + "\n")
    with pytest.raises(DatasetError) as e:
        open_manifest(path)
    msg = str(e.value)
    expected = {
        2: "duplicate id '0'",
        3: "unknown class name(s) ['unicorn']",
        4: "image not found",
        5: "empty label list",
        6: "malformed JSON",
        7: "expected a JSON object",
        8: "missing or invalid 'image'",
        9: "mask not found",
        10: "invalid 'labels'",
    }
    for line, text in expected.items():
        assert f"{path}:{line}: " in msg and text in msg, (line, text)
    assert len(e.value.problems) == len(expected)
    assert msg.startswith(f"9 problems in {path}:")


def test_manifest_requirements_verification_and_cap(tmp_path):
    path = _manifest_set(tmp_path)
    with pytest.raises(DatasetError) as e:
        open_manifest(path, require_masks=True, require_saliency=True)
    assert {p.split(": ", 1)[0] for p in e.value.problems} == {f"{path}:2", f"{path}:3"}
    # an unreadable image passes the existence check and fails Pillow's verify
    (tmp_path / "img" / "1.jpg").write_bytes(b"not an image at all")
    open_manifest(path)
    with pytest.raises(DatasetError, match=r":2: image unreadable as an image"):
        open_manifest(path, verify_images=True)
    # many problems: the message lists 50 and counts the rest
    path.write_text(
        "".join(json.dumps({"image": f"no/{i}.jpg", "labels": ["cat"]}) + "\n" for i in range(60))
    )
    with pytest.raises(DatasetError) as e:
        open_manifest(path)
    assert len(e.value.problems) == 60
    assert "... and 10 more" in str(e.value) and f"{path}:50:" in str(e.value)
    assert f"{path}:51:" not in str(e.value)


def test_classes_files_and_detection_errors(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("cat\ndog\n")  # background is optional
    assert read_classes_file(f) == ("cat", "dog")
    f.write_text("background\ncat\nCat\nbackground\n")
    with pytest.raises(DatasetError) as e:
        read_classes_file(f)
    assert f"{f}:3: duplicate class" in str(e.value) and f"{f}:4: 'background'" in str(e.value)
    with pytest.raises(DatasetError, match="neither a VOC layout"):
        open_dataset(tmp_path)
    with pytest.raises(DatasetError, match="no such file"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "m.jsonl").write_text('{"image": "a.jpg", "labels": ["cat"]}\n')
    with pytest.raises(DatasetError, match="classes file not found"):
        open_dataset(tmp_path / "m.jsonl")


# -------------------------------------------------------------------------------------------------
# training dataset


def test_train_dataset_samples(tmp_path):
    ds = HSCTrainDataset(open_voc(_voc(tmp_path, saliency=True), "train"), config=SMALL, seed=3)
    assert len(ds) == 3
    id_, img, sal, y = ds[1]
    assert id_ == "2007_000002"
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert sal.shape == (1, 32, 32) and sal.dtype == torch.float32
    assert 0 <= sal.min() and sal.max() <= 1 and sal.max() > 0
    assert torch.equal(y, torch.from_numpy(_hot(20, 7)))
    # deterministic per (seed, epoch, index); epoch and index change the sample
    assert torch.equal(ds[1][1], img) and torch.equal(ds[(0, 1)][1], img)
    ds.set_epoch(1)
    assert not torch.equal(ds[1][1], img) and torch.equal(ds[(0, 1)][1], img)
    other = HSCTrainDataset(ds.index, config=SMALL, seed=3)
    assert torch.equal(other[1][1], img) and torch.equal(other[1][2], sal)
    # a DataLoader worker process gives the same samples
    batch = next(iter(torch.utils.data.DataLoader(other, batch_size=3, num_workers=1)))
    assert batch[1].shape == (3, 3, 32, 32) and torch.equal(batch[1][1], img)


def test_train_dataset_without_saliency(tmp_path):
    index = open_voc(_voc(tmp_path), "train")
    ds = HSCTrainDataset(index, crop=32, resize_long=(32, 48))
    assert ds.transform.config == SMALL and index.class_names == VOC_CLASSES
    assert torch.equal(ds[0][2], torch.zeros(1, 32, 32))
    with pytest.raises(DatasetError, match="3 problems"):
        HSCTrainDataset(index, config=SMALL, require_saliency=True)


def test_epoch_order():
    a = epoch_order(10, 0, 0)
    assert sorted(a.tolist()) == list(range(10))
    assert np.array_equal(a, epoch_order(10, 0, 0)) and not np.array_equal(a, epoch_order(10, 0, 1))


def test_unlabelled_images_are_accepted_when_labels_are_not_required(tmp_path):
    """Step 2 (DeepLab) needs no image-level labels, e.g. on VOC's test split (no masks, no tags)."""
    root = _voc(tmp_path / "voc")
    _jpeg(root / "JPEGImages" / "2008_000009.jpg", seed=9)
    (root / "ImageSets" / "Segmentation" / "test.txt").write_text("2008_000009\n2007_000002\n")
    with pytest.raises(DatasetError, match="no image-level labels for '2008_000009'"):
        open_voc(root, "test")
    ds = open_dataset(root, "test", require_labels=False)
    assert ds.ids == ["2008_000009", "2007_000002"]
    assert not ds[0].labels.any() and ds[0].mask is None and ds[1].classes == (7,)
    # a manifest line may omit "labels" or leave it empty; invalid or unknown ones are still errors
    m = tmp_path / "m"
    (m / "classes.txt").parent.mkdir()
    (m / "classes.txt").write_text("cat\ndog\n")
    _jpeg(m / "a.jpg")
    lines = [{"image": "a.jpg"}, {"image": "a.jpg", "id": "b", "labels": []}, {"image": "a.jpg", "id": "c"}]
    (m / "manifest.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.raises(DatasetError) as e:
        open_manifest(m / "manifest.jsonl")
    assert "missing or invalid 'labels'" in str(e.value) and "empty label list" in str(e.value)
    ds = open_manifest(m / "manifest.jsonl", require_labels=False)
    assert ds.ids == ["a", "b", "c"] and not ds.label_matrix().any()
    (m / "manifest.jsonl").write_text(json.dumps({"image": "a.jpg", "labels": ["cow"]}) + "\n")
    with pytest.raises(DatasetError, match="unknown class name"):
        open_manifest(m / "manifest.jsonl", require_labels=False)
