"""mIoU evaluation (training/evaluate.py): golden case ``eval_miou`` and hand-made cases."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from hsc.model.classes import VOC_CLASSES, VOC_LABEL_NAMES
from hsc.training.evaluate import (
    DEFAULT_THRESHOLDS,
    ConfusionMatrix,
    ThresholdSweep,
    cam_dict_to_label,
    crf_dict_to_label,
    evaluate_cams,
    evaluate_dir,
    evaluate_labels,
    read_label_png,
    sweep_dir,
    threshold_sweep,
)

from goldenlib import assert_rel, build_inputs, case

# --------------------------------------------------------------------------------------------------
# golden case (docs/golden.md 4.14): everything is read from the file


def _key(c: dict, pattern: str) -> tuple[str, re.Match[str]]:
    hits = [(k, m) for k in c if (m := re.fullmatch(pattern, k))]
    assert len(hits) == 1, (
        f"golden eval_miou: expected one key matching {pattern!r}, got {[k for k, _ in hits]}"
    )
    return hits[0]


@pytest.fixture(scope="module")
def golden_eval():
    c = case("eval_miou")
    ns = build_inputs(c)
    names = list(ns["gt"])
    gts = [ns["gt"][n].numpy() for n in names]
    cams = [{int(k): v.numpy() for k, v in ns["cams"][n].items()} for n in names]
    preds = [ns["pred_png"][n].numpy() for n in names]
    return c, gts, cams, preds


def _class_names(expected: dict) -> list[str]:
    return [k for k in expected if k != "mIoU"]


def _assert_percent(result, expected: dict, what: str) -> None:
    got = result.as_dict()
    assert set(got) == set(expected), what
    for name, value in expected.items():
        assert_rel(got[name], value, rel=1e-9, floor=1e-12, what=f"{what} {name}")


def test_golden_npy_at_threshold(golden_eval):
    c, gts, cams, _ = golden_eval
    key, m = _key(c, r"npy_t=([0-9.]+)_percent")
    expected = c[key]
    names = _class_names(expected)
    result = evaluate_cams(gts, cams, float(m.group(1)), num_classes=len(names), class_names=names)
    _assert_percent(result, expected, key)


def test_golden_npy_curve(golden_eval):
    c, gts, cams, _ = golden_eval
    key, m = _key(c, r"npy_curve_mIoU_t=([0-9.]+)\.\.([0-9.]+)")
    curve = c[key]
    first = round(float(m.group(1)) * 100)
    thresholds = [(first + i) / 100 for i in range(len(curve))]  # t = i/100, exactly as the official loop
    assert thresholds[-1] == pytest.approx(float(m.group(2)))
    n = len(_class_names(c[_key(c, r"npy_t=([0-9.]+)_percent")[0]]))
    sweep = threshold_sweep(gts, cams, thresholds, num_classes=n)
    assert len(sweep.curve) == len(curve)
    for i, (got, want) in enumerate(zip(sweep.curve, curve)):
        assert_rel(got, want, rel=1e-9, floor=1e-12, what=f"curve t={thresholds[i]}")
    best = c["npy_curve_best"]
    assert_rel(sweep.best_threshold, best["t"], rel=1e-9, floor=1e-12, what="best t")
    assert_rel(sweep.best_miou, best["mIoU"], rel=1e-9, floor=1e-12, what="best mIoU")


def test_golden_png(golden_eval):
    c, gts, _, preds = golden_eval
    expected = c["png_percent"]
    names = _class_names(expected)
    result = evaluate_labels(gts, preds, num_classes=len(names), class_names=names)
    _assert_percent(result, expected, "png_percent")


def test_golden_sweep_equals_per_threshold_evaluation(golden_eval):
    _, gts, cams, _ = golden_eval
    thresholds = [0.5, 0.0, 0.22, 0.22, 0.9]  # unsorted, repeated
    sweep = threshold_sweep(gts, cams, thresholds)
    for t, r in zip(thresholds, sweep.results):
        direct = evaluate_cams(gts, cams, t)
        np.testing.assert_array_equal(r.confusion, direct.confusion)
        assert r.miou == direct.miou


# --------------------------------------------------------------------------------------------------
# hand-made cases


def test_voc_names():
    assert len(VOC_CLASSES) == 20 and "background" not in VOC_CLASSES
    assert ConfusionMatrix().class_names == VOC_LABEL_NAMES == ("background", *VOC_CLASSES)
    assert ConfusionMatrix(3).class_names == ("class_0", "class_1", "class_2")
    assert DEFAULT_THRESHOLDS == tuple(i / 100 for i in range(60))


def test_perfect_prediction_is_100_when_every_class_present():
    gt = np.array([[0, 1, 2], [2, 1, 255]], dtype=np.uint8)
    pred = np.array([[0, 1, 2], [2, 1, 7]], dtype=np.uint8)  # the ignored pixel may hold anything
    r = evaluate_labels([gt], [pred], num_classes=3)
    assert r.miou == pytest.approx(100.0, rel=1e-9)
    np.testing.assert_allclose(r.precision, 100.0)
    np.testing.assert_allclose(r.recall, 100.0)
    np.testing.assert_array_equal(r.confusion, [[1, 0, 0], [0, 2, 0], [0, 0, 2]])


def test_absent_class_counts_zero():
    gt = np.array([[0, 0, 1, 1]], dtype=np.uint8)
    r = evaluate_labels([gt], [gt], num_classes=3)  # class 2 absent from both
    np.testing.assert_allclose(r.iou, [100.0, 100.0, 0.0])
    assert r.miou == pytest.approx(200.0 / 3, rel=1e-9)  # the 1e-10 of the IoU denominator


def test_all_ignored_gives_zero():
    gt = np.full((4, 5), 255, dtype=np.uint8)
    r = evaluate_labels([gt], [np.zeros((4, 5), dtype=np.uint8)])
    assert r.confusion.sum() == 0 and r.miou == 0.0
    assert r.iou.shape == (21,)


def test_ignore_index_configurable():
    gt = np.array([[0, 1, 9]], dtype=np.int64)
    pred = np.array([[0, 1, 0]], dtype=np.int64)
    assert evaluate_labels([gt], [pred], num_classes=2, ignore_index=9).miou == pytest.approx(100.0)
    with pytest.raises(ValueError, match="outside"):
        evaluate_labels([gt], [pred], num_classes=2)  # 9 is neither a class nor ignored


def test_out_of_range_prediction_is_a_miss():
    gt = np.array([[0, 1, 1, 1]], dtype=np.int64)
    pred = np.array([[0, 1, 21, -1]], dtype=np.int64)
    r = evaluate_labels([gt], [pred], num_classes=2)
    # class 1: TP 1, T 3, P 1 -> 1/3; class 0: TP 1, T 1, P 1 -> 1
    np.testing.assert_allclose(r.iou, [100.0, 100.0 / 3])
    np.testing.assert_array_equal(r.missed, [0, 2])
    np.testing.assert_allclose(r.recall, [100.0, 100.0 / 3])
    np.testing.assert_allclose(r.precision, [100.0, 100.0])


def test_counts_accumulate_over_images_in_int64():
    cm = ConfusionMatrix(2)
    a = np.array([[0, 1]], dtype=np.uint8)
    cm.update(a, a)
    cm.update(a, np.array([[1, 1]], dtype=np.uint8))
    r = cm.result()
    assert r.confusion.dtype == np.int64
    np.testing.assert_array_equal(r.confusion, [[1, 1], [0, 2]])
    np.testing.assert_allclose(r.iou, [50.0, 200.0 / 3])


def test_cam_dict_background_wins_ties_and_absent_classes():
    cams = {
        0: np.array([[0.5, 0.5, 0.1]], dtype=np.float32),
        2: np.array([[0.5, 0.6, 0.2]], dtype=np.float32),
    }
    label = cam_dict_to_label(cams, 0.5)
    # pixel 0: 0.5 ties with t -> background; pixel 1: class 2 -> label 3; pixel 2: below t -> background
    np.testing.assert_array_equal(label, [[0, 3, 0]])
    assert label.dtype == np.uint8
    # equal foreground scores: the lower channel wins
    tie = {1: np.array([[0.7]], dtype=np.float32), 4: np.array([[0.7]], dtype=np.float32)}
    assert cam_dict_to_label(tie, 0.2)[0, 0] == 2
    # the threshold is compared in float64 (the float32 value of 0.3 is above 0.3, a float32 tie)
    v = np.float32(0.3)
    assert float(v) > 0.3
    assert cam_dict_to_label({5: np.array([[v]])}, 0.3)[0, 0] == 6
    with pytest.raises(ValueError, match="channel space"):
        cam_dict_to_label({20: np.zeros((1, 1), np.float32)}, 0.2)


def test_crf_dict_is_already_in_voc_space():
    probs = {0: np.array([[0.6, 0.1]]), 20: np.array([[0.4, 0.9]])}
    np.testing.assert_array_equal(crf_dict_to_label(probs), [[0, 20]])


def test_sweep_best_is_first_maximum():
    gt = np.array([[0, 1, 1]], dtype=np.uint8)
    cams = {0: np.array([[0.2, 0.5, 0.5]], dtype=np.float32)}
    sweep = threshold_sweep([gt], [cams], [0.3, 0.1, 0.4, 0.6], num_classes=2)
    np.testing.assert_allclose(sweep.curve, [100.0, 100 * (0 + 2 / 3) / 2, 100.0, 0.5 * 100 / 3])
    assert sweep.best_threshold == 0.3 and sweep.best_miou == pytest.approx(100.0)
    acc = ThresholdSweep([0.3], num_classes=2)
    acc.update(gt, cams)
    assert acc.result().best.miou == pytest.approx(100.0)


def test_directory_evaluation(tmp_path):
    gt = np.array([[0, 1], [255, 1]], dtype=np.uint8)
    (tmp_path / "gt").mkdir()
    (tmp_path / "png").mkdir()
    (tmp_path / "npy").mkdir()
    Image.fromarray(gt).save(tmp_path / "gt" / "x.png")
    pal = Image.frombytes("P", (2, 2), np.array([[0, 1], [0, 0]], dtype=np.uint8).tobytes())
    pal.putpalette([0, 0, 0, 128, 0, 0] + [0] * (254 * 3))
    pal.save(tmp_path / "png" / "x.png")
    np.testing.assert_array_equal(read_label_png(tmp_path / "png" / "x.png"), [[0, 1], [0, 0]])
    np.save(tmp_path / "npy" / "x.npy", {0: np.array([[0.1, 0.9], [0.5, 0.8]], dtype=np.float32)})
    png = evaluate_dir(["x"], tmp_path / "gt", tmp_path / "png", kind="png", num_classes=2)
    np.testing.assert_allclose(png.iou, [50.0, 50.0])
    npy = evaluate_dir(["x"], tmp_path / "gt", tmp_path / "npy", kind="npy", threshold=0.2, num_classes=2)
    assert npy.miou == pytest.approx(100.0)
    sweep = sweep_dir(["x"], tmp_path / "gt", tmp_path / "npy", [0.85, 0.2], num_classes=2)
    assert sweep.best_threshold == 0.2
