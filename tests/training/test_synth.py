"""Synthetic dataset generator (training/synth.py): VOC layout and its consistency, determinism,
imperfect saliency, the built-in CAM failure modes, overwrite rules and the CLI functions."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hsc.core.encoders import voc_palette
from hsc.training.synth import (
    CLASS_DESIGNS,
    FAILURE_MODES,
    SynthConfig,
    add_synth_arguments,
    class_names,
    parse_size,
    render_sample,
    run_synth,
    synthesize,
)

SIZE = (96, 72)
K = 5
N_TRAIN, N_VAL = 24, 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "set"
    summary = synthesize(out, train=N_TRAIN, val=N_VAL, seed=3, size=SIZE, num_classes=K)
    assert summary["train"] == N_TRAIN and summary["val"] == N_VAL
    assert summary["classes"] == list(class_names(K))
    return out


def _ids(out: Path, split: str) -> list[str]:
    return (out / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().splitlines()


def _records(out: Path, name: str = "manifest.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def _mask(out: Path, sid: str) -> np.ndarray:
    return np.array(Image.open(out / "SegmentationClass" / f"{sid}.png"))


def _saliency(out: Path, sid: str) -> np.ndarray:
    return np.array(Image.open(out / "saliency" / f"{sid}.png"))


def _all_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# layout and consistency


def test_layout_lists_and_files(dataset):
    train, val = _ids(dataset, "train"), _ids(dataset, "val")
    assert len(train) == N_TRAIN and len(val) == N_VAL
    assert len(set(train) | set(val)) == N_TRAIN + N_VAL
    for sid in train + val:
        assert (dataset / "JPEGImages" / f"{sid}.jpg").is_file()
        assert (dataset / "SegmentationClass" / f"{sid}.png").is_file()
        assert (dataset / "saliency" / f"{sid}.png").is_file()
    for name in ("cls_labels.npy", "classes.txt", "manifest.jsonl", "README.md", "synth_config.json"):
        assert (dataset / name).is_file(), name
    assert not [p for p in dataset.rglob("*.tmp")], "temporary files left behind"
    assert (dataset / "classes.txt").read_text().splitlines() == ["background", *class_names(K)]


def test_images_masks_and_saliency_read_back_with_pil(dataset):
    pal = voc_palette().reshape(-1).tolist()
    for sid in _ids(dataset, "train")[:6] + _ids(dataset, "val")[:2]:
        with Image.open(dataset / "JPEGImages" / f"{sid}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == SIZE
            im.load()
        with Image.open(dataset / "SegmentationClass" / f"{sid}.png") as m:
            assert m.format == "PNG" and m.mode == "P" and m.size == SIZE
            assert m.getpalette()[: len(pal)] == pal
        with Image.open(dataset / "saliency" / f"{sid}.png") as s:
            assert s.mode == "L" and s.size == SIZE


def test_cls_labels_equal_mask_classes_and_manifest_labels(dataset):
    names = class_names(K)
    labels = np.load(dataset / "cls_labels.npy", allow_pickle=True).item()
    ids = _ids(dataset, "train") + _ids(dataset, "val")
    assert list(labels) == ids
    records = {r["id"]: r for r in _records(dataset)}
    assert list(records) == ids
    for sid in ids:
        y = labels[sid]
        assert y.dtype == np.float32 and y.shape == (K,)
        assert set(np.unique(y)) <= {0.0, 1.0} and y.sum() >= 1
        m = _mask(dataset, sid)
        present = sorted(int(v) - 1 for v in np.unique(m) if 0 < v < 255)
        assert np.flatnonzero(y).tolist() == present, sid
        rec = records[sid]
        assert rec["labels"] == [names[c] for c in present]
        for key in ("image", "mask", "saliency"):
            assert not Path(rec[key]).is_absolute() and (dataset / rec[key]).is_file()
        assert rec["image"] == f"JPEGImages/{sid}.jpg"
        assert rec["split"] == sid.split("_")[0]


def test_per_split_manifests_hold_the_same_lines(dataset):
    assert _records(dataset, "manifest_train.jsonl") + _records(dataset, "manifest_val.jsonl") == _records(
        dataset
    )
    assert [r["id"] for r in _records(dataset, "manifest_val.jsonl")] == _ids(dataset, "val")


def test_mask_values_are_background_classes_or_ignore(dataset):
    seen = set()
    for sid in _ids(dataset, "train") + _ids(dataset, "val"):
        values = set(np.unique(_mask(dataset, sid)).tolist())
        assert values <= set(range(K + 1)) | {255}
        assert 255 not in values  # no void band by default: exact truth
        seen |= values
    assert seen == set(range(K + 1)), "every class appears somewhere"


def test_void_band_marks_boundaries_and_keeps_labels_consistent(tmp_path):
    out = tmp_path / "band"
    synthesize(out, train=4, val=0, seed=5, size=SIZE, num_classes=K, void_band=4)
    labels = np.load(out / "cls_labels.npy", allow_pickle=True).item()
    exact = SynthConfig(train=4, val=0, seed=5, size=SIZE, num_classes=K)
    for i, sid in enumerate(_ids(out, "train")):
        m = _mask(out, sid)
        assert 255 in m
        present = sorted(int(v) - 1 for v in np.unique(m) if 0 < v < 255)
        assert np.flatnonzero(labels[sid]).tolist() == present
        # the same image without the band: equal off the band, and the band is on its boundaries
        truth = render_sample(exact, "train", i).label
        void = m == 255
        assert np.array_equal(m[~void], truth[~void])
        edge = np.zeros_like(void)
        for dy, dx in ((0, 1), (1, 0)):
            step = truth != np.roll(truth, (dy, dx), (0, 1))
            step[:dy, :] = False
            step[:, :dx] = False
            edge |= step | np.roll(step, (-dy, -dx), (0, 1))
        near = np.zeros_like(edge)
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                near |= np.roll(edge, (dy, dx), (0, 1))
        assert near[void].all()
        assert void[edge].all()


def test_manifest_masks_match_the_in_memory_sample(dataset):
    config = SynthConfig(train=N_TRAIN, val=N_VAL, seed=3, size=SIZE, num_classes=K)
    s = render_sample(config, "val", 1)
    assert np.array_equal(s.label, _mask(dataset, "val_000001"))
    assert np.array_equal(s.saliency, _saliency(dataset, "val_000001"))
    img = np.asarray(Image.open(dataset / "JPEGImages" / "val_000001.jpg"), dtype=np.int16)
    assert np.abs(img - s.image.astype(np.int16)).mean() < 6.0  # JPEG of a noisy image


# --------------------------------------------------------------------------------------------------
# saliency and failure modes


def test_saliency_correlates_with_but_differs_from_the_truth(dataset):
    ious, gaps = [], []
    for sid in _ids(dataset, "train") + _ids(dataset, "val"):
        m, s = _mask(dataset, sid), _saliency(dataset, sid).astype(np.float32)
        fg = (m > 0) & (m < 255)
        pred = s > 127
        ious.append((fg & pred).sum() / max(1, (fg | pred).sum()))
        gaps.append(s[fg].mean() - s[~fg].mean())
        assert ((s > 20) & (s < 235)).any(), "soft, blurred edges"
        assert ious[-1] < 0.99
    assert 0.4 <= float(np.mean(ious)) <= 0.95, np.mean(ious)
    assert float(np.mean(gaps)) > 100.0


def test_each_failure_mode_occurs(dataset):
    records = _records(dataset)
    designs = {d.name: d for d in CLASS_DESIGNS}
    counts = {m: sum(m in r["failure_modes"] for r in records) for m in FAILURE_MODES}
    assert all(c > 0 for c in counts.values()), counts
    assert sum(len(r["labels"]) >= 2 for r in records) >= len(records) // 4, "multi-label images common"

    # occlusion: overlapping objects lose part of their full area
    occluded = [o for r in records for o in r["objects"] if o["occluded"]]
    assert occluded and all(o["area"] < o["full_area"] for o in occluded)
    assert all(r["occluded"] == any(o["occluded"] for o in r["objects"]) for r in records)

    # small discriminative parts: a head that is a small fraction of a part-class object
    heads = [o for r in records for o in r["objects"] if o["kind"] == "part" and o["head_area"] > 0]
    assert heads and all(o["head_area"] < 0.25 * o["full_area"] for o in heads)
    assert np.median([o["head_area"] / o["area"] for o in heads]) < 0.25

    # context: a context class usually sits on its own context
    for r in records:
        if r["context_class"] is not None:
            assert r["context"] == designs[r["context_class"]].context
            assert r["context_class"] in r["labels"]
    with_ctx_class = [r for r in records if any(designs[name].kind == "context" for name in r["labels"])]
    on_context = [r for r in with_ctx_class if r["context_class"] is not None]
    assert len(on_context) >= 0.5 * len(with_ctx_class) > 0

    # clutter: distractors are background, and the saliency map sometimes fires on them
    assert all(r["clutter"] >= 0 for r in records)
    fp = [r for r in records if r["saliency_false_positive"]]
    assert fp
    for r in fp:
        m, s = _mask(dataset, r["id"]), _saliency(dataset, r["id"])
        assert (s[m == 0] > 100).any()


def test_twenty_classes_render(tmp_path):
    config = SynthConfig(train=12, val=0, seed=1, size=(64, 48), num_classes=20)
    for i in range(12):
        s = render_sample(config, "train", i)
        assert s.image.shape == (48, 64, 3) and s.label.shape == (48, 64)
        assert s.label.max() <= 20 and s.meta["labels"]
    assert len({d.name for d in CLASS_DESIGNS}) == 20
    assert {d.context for d in CLASS_DESIGNS if d.kind == "context"} >= {"water", "grass", "sky"}


# --------------------------------------------------------------------------------------------------
# determinism and overwriting


def test_same_arguments_give_identical_bytes_and_other_seeds_differ(tmp_path):
    kw = dict(train=3, val=2, size=(64, 48), num_classes=K)
    synthesize(tmp_path / "a", seed=11, **kw)
    synthesize(tmp_path / "b", seed=11, **kw)
    synthesize(tmp_path / "c", seed=12, **kw)
    a, b, c = _all_files(tmp_path / "a"), _all_files(tmp_path / "b"), _all_files(tmp_path / "c")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert a["JPEGImages/train_000000.jpg"] != c["JPEGImages/train_000000.jpg"]
    # a val image does not depend on how many train images there are
    synthesize(tmp_path / "d", seed=11, train=1, val=2, size=(64, 48), num_classes=K)
    d = _all_files(tmp_path / "d")
    assert d["JPEGImages/val_000001.jpg"] == a["JPEGImages/val_000001.jpg"]
    assert d["SegmentationClass/val_000001.png"] == a["SegmentationClass/val_000001.png"]


def test_refuses_a_non_empty_folder_unless_forced(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    with pytest.raises(FileExistsError, match="--force"):
        synthesize(out, train=2, val=1, size=(64, 48))
    synthesize(out, train=4, val=1, size=(64, 48), force=True)
    assert (out / "keep.txt").read_text() == "user file"
    assert (out / "JPEGImages" / "train_000003.jpg").is_file()
    # a smaller set over an earlier one: the earlier images no list names are removed
    synthesize(out, train=2, val=1, size=(64, 48), force=True)
    assert not (out / "JPEGImages" / "train_000003.jpg").exists()
    assert sorted(p.name for p in (out / "saliency").iterdir()) == [
        "train_000000.png",
        "train_000001.png",
        "val_000000.png",
    ]
    assert (out / "keep.txt").is_file()


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_classes=0),
        dict(num_classes=21),
        dict(size=(20, 20)),
        dict(train=0, val=0),
        dict(void_band=-1),
        dict(max_objects=0),
    ],
)
def test_bad_settings_are_refused(tmp_path, kw):
    args = dict(train=1, val=1, size=(64, 48)) | kw
    with pytest.raises(ValueError):
        synthesize(tmp_path / "x", **args)


def test_readme_says_what_it_is(dataset):
    text = (dataset / "README.md").read_text()
    assert "tests and benchmarks" in text
    assert f"hsc data synth OUT --train {N_TRAIN} --val {N_VAL} --seed 3 --size 96x72 --classes {K}" in text
    for name in class_names(K):
        assert name in text
    for mode in ("small discriminative parts", "context", "occlusion", "clutter"):
        assert mode in text
    recipe = json.loads((dataset / "synth_config.json").read_text())
    assert recipe["config"]["seed"] == 3 and len(recipe["classes"]) == K


# --------------------------------------------------------------------------------------------------
# command line


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_synth_arguments(p)
    return p.parse_args(argv)


def test_run_synth_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [str(out), "--train", "2", "--val", "1", "--size", "64x48", "--classes", "3", "--seed", "4"]
    assert run_synth(_parse([*argv, "--quiet"])) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["classes"] == list(class_names(3)) and summary["size"] == [64, 48]
    assert _ids(out, "train") == ["train_000000", "train_000001"]
    assert (out / "classes.txt").read_text().splitlines() == ["background", *class_names(3)]

    assert run_synth(_parse(argv)) == 2
    assert "--force" in capsys.readouterr().err
    assert run_synth(_parse([*argv, "--force", "--void-band", "2"])) == 0
    assert run_synth(_parse([str(tmp_path / "bad"), "--classes", "30"])) == 2
    assert "num_classes" in capsys.readouterr().err


def test_parse_size():
    assert parse_size("160x120") == (160, 120)
    assert parse_size("64X48") == (64, 48)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("160")
    with pytest.raises(SystemExit):
        _parse(["out", "--size", "big"])


def test_generator_does_not_import_torch():
    code = "import sys, hsc.training.synth; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
