"""The engine with labels predicted by the classifier (worker/engine.py, ``"labels": "auto"``): one
image, its result's ``labels`` block, bad thresholds, and job chunks (one by one and pipelined)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from workerlib import CLASSES, create_job, encode, rgb, write_images

from hsc.core.encoders import mask_from_base64_png
from hsc.core.jobs import FileJobStore, job_dir
from hsc.core.settings import Settings
from hsc.model.predictor import select_classes
from hsc.worker.engine import Engine, ItemError


def request(**kw):
    req = {
        "request_id": "req_auto",
        "model": None,
        "labels": "auto",
        "labels_requested": "auto",
        "crf": False,
        "bg_threshold": None,
        "outputs": ["mask"],
    }
    req.update(kw)
    return req


def expected_channels(engine: Engine, img: np.ndarray, threshold: float = 0.5) -> tuple[int, ...]:
    return select_classes(engine.predictors[engine.default_model].classify(img), threshold)


@pytest.mark.parametrize("labels", ["auto", "AUTO", " Auto "])
def test_auto_labels_result(engine, labels):
    img = rgb(seed=1)
    res = engine.pseudo_label(request(labels=labels, outputs=["mask", "cvat"]), encode(img))
    json.dumps(res)
    probs = engine.predictors[engine.default_model].classify(img)
    chosen = select_classes(probs, 0.5)
    block = res["labels"]
    assert block["requested"] == "auto" and block["source"] == "predicted" and block["threshold"] == 0.5
    assert block["used"] == [c + 1 for c in chosen]
    assert block["classifier_scores"] == {n: round(float(p), 4) for n, p in zip(CLASSES, probs)}
    assert [c["name"] for c in res["classes"]] == [CLASSES[c] for c in chosen]
    assert res["settings"]["labels"] == "auto" and res["settings"]["label_threshold"] == 0.5
    assert res["timings_ms"]["classify"] > 0
    assert {it["label"] for it in res["cvat"]} <= {CLASSES[c] for c in chosen}
    # the same mask as asking for those classes
    given = engine.pseudo_label(
        request(labels=list(chosen), labels_requested=None, outputs=["mask"]), encode(img)
    )
    assert given["labels"]["source"] == "given" and "classifier_scores" not in given["labels"]
    assert (
        mask_from_base64_png(res["mask"]["data"]).tolist()
        == mask_from_base64_png(given["mask"]["data"]).tolist()
    )


def test_label_threshold(engine):
    img = rgb(seed=2)
    everything = engine.pseudo_label(request(label_threshold=0.0), encode(img))
    assert everything["labels"]["used"] == [1, 2, 3] and everything["labels"]["threshold"] == 0.0
    top1 = engine.pseudo_label(request(label_threshold=1.0), encode(img))
    assert len(top1["labels"]["used"]) == 1  # nothing reaches 1.0 here: the top-1
    probs = engine.predictors[engine.default_model].classify(img)
    assert top1["labels"]["used"] == [int(np.argmax(probs)) + 1]
    # a given-labels request ignores label_threshold
    given = engine.pseudo_label(request(labels=[0], label_threshold=7), encode(img))
    assert given["labels"]["used"] == [1]


@pytest.mark.parametrize("bad", [-0.5, 1.5, "high", True, float("nan")])
def test_bad_label_threshold_is_an_invalid_option(engine, bad):
    with pytest.raises(ItemError) as e:
        engine.pseudo_label(request(label_threshold=bad), encode(rgb()))
    assert (e.value.code, e.value.status) == ("invalid_option", 422)
    assert "label_threshold" in e.value.detail


def test_a_string_that_is_not_auto_is_still_refused(engine):
    with pytest.raises(ItemError) as e:
        engine.pseudo_label(request(labels="road"), encode(rgb()))
    assert e.value.code == "invalid_option"


@pytest.mark.parametrize("crf_workers", [0, 1])
def test_job_with_auto_labels(engine_settings, engine, ckpt, tmp_path, crf_workers):
    """``options.labels = "auto"``: the items' own labels (here none, or wrong) are replaced by the
    classifier's; the pipelined CRF path gives the same masks."""
    eng = (
        engine if crf_workers == 0 else Engine(Settings(**{**engine_settings.model_dump(), "crf_workers": 1}))
    )
    store = FileJobStore(tmp_path / "state")
    images = write_images(tmp_path / "images", 3)
    job_id, items = create_job(
        store,
        images,
        ckpt.id,
        labels=[(), (1,), ()],
        options={"crf": True, "outputs": ["mask"], "labels": "auto", "label_threshold": 0.4},
    )
    results = tmp_path / "results"
    out = eng.run_chunk(store, results, job_id, 0, 3)
    assert (out["done"], out["failed"], out["status"]) == (3, 0, "succeeded")
    jd = job_dir(results, job_id)
    for it in items:
        img = np.asarray(Image.open(it.image).convert("RGB"))
        chosen = expected_channels(eng, img, 0.4)
        res = json.loads((jd / "items" / f"{it.id}.json").read_text())
        assert res["labels"]["requested"] == "auto" and res["labels"]["source"] == "predicted"
        assert res["labels"]["used"] == [c + 1 for c in chosen] and res["labels"]["threshold"] == 0.4
        assert set(res["labels"]["classifier_scores"]) == set(CLASSES)
        single = engine.pseudo_label(request(crf=True, label_threshold=0.4), Path(it.image).read_bytes())
        assert np.array_equal(
            np.array(Image.open(jd / "masks" / f"{it.id}.png")), mask_from_base64_png(single["mask"]["data"])
        )
