"""``labels=auto`` over HTTP (embedded mode, a real uvicorn server): the classifier's labels in the
answer, the same mask as asking for those classes, the threshold, bad values, and the async path."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from svclib import Model, Service, image_bytes, running_service

from hsc.core.encoders import mask_from_base64_png
from hsc.service.options import Options, parse_options

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def svc(model: Model, dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service("embedded", model, dataset, tmp_path_factory.mktemp("svc-auto"), "hsc-auto") as s:
        yield s


def post_form(svc: Service, data: bytes, **fields: Any) -> httpx.Response:
    form = {k: str(v) for k, v in fields.items()}
    return svc.client.post("/pseudo-label", files={"image": ("x.jpg", data, "image/jpeg")}, data=form)


def post_json(svc: Service, data: bytes, **fields: Any) -> httpx.Response:
    return svc.client.post("/pseudo-label", json={"image_base64": base64.b64encode(data).decode(), **fields})


def expected_used(scores: dict[str, float], names: list[str], threshold: float) -> list[int]:
    used = [i + 1 for i, n in enumerate(names) if scores[n] >= threshold]
    return used or [int(np.argmax([scores[n] for n in names])) + 1]


def test_auto_labels_round_trip(svc: Service) -> None:
    data = image_bytes(svc.dataset, 1)
    r = post_form(svc, data, labels="AUTO", crf="false", outputs="cvat")
    assert r.status_code == 200, r.text
    res = r.json()
    names = list(svc.model.classes[1:])
    block = res["labels"]
    assert block["requested"] == "auto" and block["source"] == "predicted" and block["threshold"] == 0.5
    scores = block["classifier_scores"]
    assert list(scores) == names and all(0.0 <= p <= 1.0 for p in scores.values())
    assert block["used"] == expected_used(scores, names, 0.5)
    assert [c["index"] for c in res["classes"]] == block["used"]
    assert res["settings"]["labels"] == "auto" and res["timings_ms"]["classify"] > 0
    # the same mask as giving those classes
    given = post_form(svc, data, labels=",".join(str(v) for v in block["used"]), crf="false")
    assert given.status_code == 200, given.text
    assert given.json()["labels"]["source"] == "given"
    assert np.array_equal(
        mask_from_base64_png(res["mask"]["data"]), mask_from_base64_png(given.json()["mask"]["data"])
    )
    # JSON body, a threshold of 0: every class
    r = post_json(svc, data, labels="auto", label_threshold=0, crf=False)
    assert r.status_code == 200, r.text
    assert r.json()["labels"]["used"] == list(range(1, len(names) + 1))
    assert r.json()["labels"]["threshold"] == 0.0
    # a list holding only "auto" is auto too; a PNG answer works as for given labels
    r = svc.client.post(
        "/pseudo-label",
        json={"image_base64": base64.b64encode(data).decode(), "labels": ["Auto"], "crf": False},
        headers={"Accept": "image/png"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


@pytest.mark.parametrize(
    "fields, code",
    [
        ({"labels": "auto", "label_threshold": "2"}, "invalid_option"),
        ({"labels": "auto", "label_threshold": "x"}, "invalid_option"),
        ({"labels": "auto,shape_1"}, "invalid_option"),
    ],
)
def test_bad_auto_requests(svc: Service, fields: dict[str, str], code: str) -> None:
    r = post_form(svc, image_bytes(svc.dataset, 0), **fields)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith(PROBLEM) and r.json()["code"] == code


def test_async_auto_is_a_job_with_predicted_labels(svc: Service) -> None:
    data = image_bytes(svc.dataset, 3)
    r = post_form(svc, data, labels="auto", label_threshold="0.3", crf="false")
    sync = r.json()
    r = svc.client.post(
        "/pseudo-label",
        files={"image": ("photo.jpg", data, "image/jpeg")},
        data={"labels": "auto", "label_threshold": "0.3", "crf": "false"},
        headers={"Prefer": "respond-async"},
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["options"]["labels"] == "auto" and job["options"]["label_threshold"] == 0.3
    assert job["dataset"]["labels_requested"] == "auto"
    done = svc.wait_job(job["id"])
    assert done["status"] == "succeeded", done
    item = svc.client.get(f"/jobs/{job['id']}/items/photo").json()
    labels = item["result"]["labels"]
    assert labels["source"] == "predicted" and labels["requested"] == "auto"
    assert labels["used"] == sync["labels"]["used"] and labels["threshold"] == 0.3


def test_job_options_take_auto() -> None:
    o = parse_options({"labels": "Auto", "label_threshold": 0.25}, strict=True)
    assert o.auto_labels and o.as_dict("m")["labels"] == "auto" and o.as_dict("m")["label_threshold"] == 0.25
    assert parse_options({"labels": "auto"}, strict=True).as_dict("m")["label_threshold"] == 0.5
    plain = parse_options({}, strict=True)
    assert plain == Options() and "labels" not in plain.as_dict("m")
    assert parse_options({"labels": ""}).labels is None
