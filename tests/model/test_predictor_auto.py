"""Image-level labels predicted by the classifier (model/predictor.py): ``Predictor.classify`` and
``predict(image, "auto", label_threshold=...)``.

Width-0.125 random networks; a constructed ``fc8`` makes the classifier's answer known in advance.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hsc.model.cam import normalize_image
from hsc.model.config import ModelInfo
from hsc.model.hsc_net import HSCNet, build_hsc_net
from hsc.model.predictor import (
    AUTO_LABELS,
    DEFAULT_LABEL_THRESHOLD,
    Predictor,
    is_auto_labels,
    select_classes,
)
from hsc.training.demo import generated_image

W = 0.125
NAMES = ("road", "car", "tree", "sky")


def small_net(k: int = len(NAMES), seed: int = 0) -> HSCNet:
    torch.manual_seed(seed)
    return build_hsc_net(num_classes=k, width=W).eval()


def predictor(net: HSCNet | None = None, **kw) -> Predictor:
    net = net if net is not None else small_net()
    return Predictor(net, ModelInfo(net=net.cfg, class_names=NAMES), device="cpu", **kw)


def image(h: int = 37, w: int = 53, seed: int = 0) -> np.ndarray:
    return generated_image(w, h, seed)


def rigged_net(top: int, others: float = -100.0, top_weight: float = 100.0) -> HSCNet:
    """``fc8`` weight ``top_weight`` for channel ``top``, ``others`` elsewhere: conv6 is a ReLU output
    (>= 0, not all 0), so the sign of each mean logit is that of its weight, and ``top`` has the
    largest logit whenever ``top_weight > others``."""
    net = small_net()
    with torch.no_grad():
        net.fc8.weight.fill_(others)
        net.fc8.weight[top].fill_(top_weight)
    return net


# ----------------------------------------------------------------------------- the classifier


def test_classify_shape_range_and_the_training_quantity():
    net = small_net()
    p = predictor(net, channels_last=False)
    img = image()
    probs = p.classify(img)
    assert probs.shape == (len(NAMES),) and probs.dtype == np.float32
    assert np.all((probs >= 0) & (probs <= 1)) and np.all(np.isfinite(probs))
    # what the network was trained on: sigmoid of the spatial mean of the fc8 logits (HSCOutput.pred)
    x = normalize_image(img).unsqueeze(0)
    with torch.no_grad():
        pred = p.net(x).pred  # (1, K+1), background last
    ref = torch.sigmoid(pred[0, : len(NAMES)]).numpy()
    np.testing.assert_allclose(probs, ref, rtol=0, atol=1e-6)
    assert p.classifier_scores(img) == {n: float(v) for n, v in zip(NAMES, probs)}
    # channels_last (the default) moves the numbers only in the last bits
    np.testing.assert_allclose(predictor(small_net()).classify(img), probs, atol=1e-5)


def test_classify_refuses_bad_images():
    p = predictor()
    with pytest.raises(ValueError, match="uint8"):
        p.classify(image().astype(np.float32))


def test_fast_mode_classifies_close_to_exact():
    img = image(seed=3)
    exact = predictor(small_net()).classify(img)
    fast = predictor(small_net(), mode="fast").classify(img)
    assert fast.dtype == np.float32
    np.testing.assert_allclose(fast, exact, atol=0.05)


# ----------------------------------------------------------------------------- choosing the classes


def test_select_classes():
    assert select_classes([0.1, 0.7, 0.5, 0.2]) == (1, 2)  # >= threshold, ascending
    assert select_classes([0.1, 0.7, 0.5, 0.2], 0.6) == (1,)
    assert select_classes([0.1, 0.3, 0.2]) == (1,)  # none passes: the top-1
    assert select_classes([0.3, 0.3]) == (0,)  # first maximum on ties
    assert select_classes([0.1, 0.2], 0.0) == (0, 1)
    assert select_classes(np.array([0.9, 0.99], dtype=np.float32), 1.0) == (1,)
    assert DEFAULT_LABEL_THRESHOLD == 0.5
    for bad in (-0.1, 1.5, float("nan"), "0.5", True, None):
        with pytest.raises(ValueError, match="label_threshold"):
            select_classes([0.5], bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        select_classes([])


def test_auto_is_the_string_in_any_case():
    assert AUTO_LABELS == "auto"
    assert all(is_auto_labels(v) for v in ("auto", "AUTO", " Auto "))
    assert not any(is_auto_labels(v) for v in (["auto"], "car", "autos", 0, None))


@pytest.mark.parametrize("top", [0, 2, 3])
def test_auto_picks_the_top_class_of_a_constructed_classifier(top):
    img = image(seed=top)
    # one class far above 0.5, the others far below: exactly that class
    p = predictor(rigged_net(top))
    probs = p.classify(img)
    assert probs[top] > 0.99 and np.delete(probs, top).max() < 0.01
    pred = p.predict(img, "auto")
    assert pred.classes == (top,) and pred.class_names == (NAMES[top],)
    assert pred.labels_source == "predicted"
    # every class below 0.5, ``top`` the least negative: the top-1 fallback picks it
    q = predictor(rigged_net(top, others=-100.0, top_weight=-0.01))
    probs = q.classify(img)
    assert probs.max() < 0.5 and int(np.argmax(probs)) == top
    assert q.predict(img, "AUTO").classes == (top,)
    # threshold 0: every class
    assert q.predict(img, "auto", label_threshold=0.0).classes == tuple(range(len(NAMES)))


def test_auto_equals_the_given_labels_it_chose():
    net = small_net(seed=1)
    p = predictor(net)
    img = image(seed=5)
    probs = p.classify(img)
    thr = float(np.sort(probs)[-2])  # the two best classes pass (>=)
    auto = p.predict(img, "auto", label_threshold=thr, crf=True, outputs={"mask", "cams", "heatmaps"})
    chosen = tuple(sorted(int(c) for c in np.argsort(probs)[-2:]))
    assert auto.classes == chosen
    given = p.predict(img, list(chosen), crf=True, outputs={"mask", "cams", "heatmaps"})
    assert np.array_equal(auto.cams, given.cams) and np.array_equal(auto.mask, given.mask)
    assert set(auto.heatmaps) == set(given.heatmaps)
    assert auto.class_scores == {n: float(v) for n, v in zip(NAMES, probs)}
    s = auto.settings
    assert s["labels"] == "auto" and s["label_threshold"] == thr and "scale 1.0" in s["classifier"]
    json.dumps(s)
    assert set(auto.timings) == {"network", "crf", "postprocess", "classify", "total"}
    assert all(math.isfinite(v) and v >= 0 for v in auto.timings.values())
    assert auto.timings["total"] >= auto.timings["classify"] + auto.timings["network"]
    # the given path is as before: no classifier, no new settings or timings
    assert given.labels_source == "given" and given.class_scores is None
    assert "labels" not in given.settings and "classify" not in given.timings


def test_bad_label_thresholds():
    p = predictor()
    for bad in (-0.01, 1.01, float("nan"), "high"):
        with pytest.raises(ValueError, match="label_threshold"):
            p.predict(image(), "auto", label_threshold=bad)  # type: ignore[arg-type]
    # given labels ignore it
    assert p.predict(image(), ["car"], label_threshold=7).classes == (1,)  # type: ignore[arg-type]


def test_predict_many_takes_auto_items():
    p = predictor(rigged_net(1))
    imgs = [image(seed=i) for i in range(3)]
    preds = list(p.predict_many([(imgs[0], "auto"), (imgs[1], ["tree"]), (imgs[2], "auto")]))
    assert [x.classes for x in preds] == [(1,), (2,), (1,)]
    assert [x.labels_source for x in preds] == ["predicted", "given", "predicted"]
