"""The CVAT gateway (service/cvat.py) as CVAT meets it: a real uvicorn gateway (``hsc cvat-gateway``)
in embedded mode beside the API. Functions as CVAT's ``lambda_manager`` reads them, invocations in the
dashboard and direct modes decoded with CVAT's rules and compared with ``POST /pseudo-label
labels=auto``, and the errors."""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from svclib import Model, Proc, Service, free_port, image_bytes, running_service, wait_for

from hsc.core.encoders import cvat_bitmap_with_box_decode, cvat_items_to_label, mask_from_base64_png

PROBLEM = "application/problem+json"
# `hsc cvat-gateway`, as a user starts it (the console script's function, settings from HSC_*)
GATEWAY_CODE = "import sys; from hsc.core.cli import main; sys.exit(main(sys.argv[1:]))"


@dataclass
class Gateway:
    proc: Proc
    port: int
    client: httpx.Client


@pytest.fixture(scope="module")
def svc(model: Model, dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service("embedded", model, dataset, tmp_path_factory.mktemp("svc-cvat"), "hsc-cvat") as s:
        yield s


@pytest.fixture(scope="module")
def gw(svc: Service) -> Iterator[Gateway]:
    """The gateway on the API's settings (same results dir: it must not take the API's jobs)."""
    port = free_port()
    proc = Proc(
        "cvat-gateway",
        [sys.executable, "-c", GATEWAY_CODE, "cvat-gateway", "--host", "127.0.0.1", "--port", str(port)],
        svc.env,
        svc.log_dir,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

    def ready() -> bool:
        if not proc.alive():
            raise AssertionError(f"the gateway exited:\n{proc.tail()}")
        try:
            return client.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 60, "the CVAT gateway to be ready", interval=0.2)
        yield Gateway(proc, port, client)
    except BaseException:
        print(proc.tail())
        raise
    finally:
        client.close()
        proc.stop()


def fn_name(svc: Service) -> str:
    return f"hsc-{svc.model.id}"


def frame(svc: Service, i: int) -> dict[str, Any]:
    return {"image": base64.b64encode(image_bytes(svc.dataset, i)).decode()}


def invoke(gw: Gateway, name: str, body: dict[str, Any]) -> httpx.Response:
    """What CVAT's ``LambdaGateway._invoke_via_dashboard`` sends."""
    headers = {
        "x-nuclio-project-name": "cvat",
        "x-nuclio-function-namespace": "nuclio",
        "x-nuclio-invoke-via": "domain-name",
        "x-nuclio-function-name": name,
        "x-nuclio-path": "/",
    }
    return gw.client.post("/api/function_invocations", json=body, headers=headers)


def lambda_function(data: dict[str, Any]) -> dict[str, Any]:
    """What CVAT's ``LambdaFunction.__init__`` reads from a dashboard function (and its checks)."""
    meta = data["metadata"]["annotations"]
    spec = json.loads(meta.get("spec") or "[]")
    labels = [item["name"] for item in spec]
    assert len(labels) == len(set(labels)), "CVAT refuses non-unique labels"
    return {
        "id": data["metadata"]["name"],
        "kind": meta.get("type"),
        "labels": labels,
        "types": {item.get("type") for item in spec},
        "state": data["status"]["state"],
        "description": data["spec"]["description"],
        "port": data["status"].get("httpPort"),
        "name": meta.get("name", data["metadata"]["name"]),
        "version": int(meta.get("version", "1")),
        "spec": spec,
    }


def check_items(items: list[dict[str, Any]], names: list[str], h: int, w: int) -> np.ndarray:
    """Every item as CVAT takes it (label from the spec, a mask = bitmap + inclusive box, a polygon of
    even length, a confidence); returns the label map they paint."""
    for it in items:
        assert it["label"] in names and it["type"] == "mask"
        region = cvat_bitmap_with_box_decode(it["mask"], image_width=w, image_height=h)
        x1, y1, x2, y2 = it["mask"][-4:]
        assert set(it["mask"][:-4]) <= {0, 1} and region.any()
        ys, xs = np.nonzero(region)
        assert (xs.min(), ys.min(), xs.max(), ys.max()) == (x1, y1, x2, y2)  # the tight box
        pts = it["points"]
        assert len(pts) >= 8 and len(pts) % 2 == 0
        assert all(0 <= x <= w for x in pts[0::2]) and all(0 <= y <= h for y in pts[1::2])
        assert isinstance(it["confidence"], float) and 0.0 <= it["confidence"] <= 1.0
    return cvat_items_to_label(items, names, height=h, width=w)


# ----------------------------------------------------------------------------- discovery


def test_functions_as_cvat_reads_them(svc: Service, gw: Gateway) -> None:
    r = gw.client.get("/api/functions", headers={"x-nuclio-project-name": "cvat"})
    assert r.status_code == 200, r.text
    functions = r.json()
    assert list(functions) == [fn_name(svc)]
    f = lambda_function(functions[fn_name(svc)])
    assert f["id"] == fn_name(svc) and f["kind"] == "detector" and f["state"] == "ready"
    assert f["labels"] == list(svc.model.classes[1:]) and f["types"] == {"mask"}
    assert [s["id"] for s in f["spec"]] == list(range(1, len(svc.model.classes)))
    assert f["port"] == gw.port and f["version"] == 1
    assert svc.model.id in f["name"] and svc.model.sha256[:12] in f["description"]
    annotations = functions[fn_name(svc)]["metadata"]["annotations"]
    assert annotations["hsc_model"] == f"{svc.model.id}@{svc.model.sha256[:12]}"
    one = gw.client.get(f"/api/functions/{fn_name(svc)}")
    assert one.status_code == 200 and one.json() == functions[fn_name(svc)]
    missing = gw.client.get("/api/functions/hsc-nope")
    assert missing.status_code == 404 and missing.headers["content-type"].startswith(PROBLEM)
    assert gw.client.get("/healthz").json()["status"] == "ok"


# ----------------------------------------------------------------------------- invocations


@pytest.mark.parametrize("threshold", [None, 0.0, 0.6])
def test_invocation_equals_the_auto_pseudo_label(svc: Service, gw: Gateway, threshold: float | None) -> None:
    i = 4
    body = frame(svc, i)
    if threshold is not None:
        body["threshold"] = threshold
    r = invoke(gw, fn_name(svc), body)
    assert r.status_code == 200, r.text
    assert r.headers["x-hsc-labels-source"] == "predicted"
    items = r.json()
    assert isinstance(items, list)
    ref = svc.client.post(
        "/pseudo-label",
        json={
            "image_base64": body["image"],
            "labels": "auto",
            **({"label_threshold": threshold} if threshold is not None else {}),
        },
    )
    assert ref.status_code == 200, ref.text
    res = ref.json()
    mask = mask_from_base64_png(res["mask"]["data"])
    names = list(svc.model.classes[1:])
    painted = check_items(items, names, *mask.shape)
    assert np.array_equal(painted, mask)
    assert {it["label"] for it in items} == {c["name"] for c in res["classes"] if c["pixels"]}
    assert r.headers["x-hsc-classes"] == ",".join(c["name"] for c in res["classes"])
    if threshold == 0.0:
        assert res["labels"]["used"] == list(range(1, len(names) + 1))


def test_direct_mode_answers_the_same(svc: Service, gw: Gateway) -> None:
    body = {**frame(svc, 5), "threshold": 0.5}
    direct = gw.client.post("/", json=body)
    assert direct.status_code == 200, direct.text
    dashboard = invoke(gw, fn_name(svc), body)
    assert direct.json() == dashboard.json()
    named = gw.client.post("/", json=body, headers={"x-nuclio-function-name": fn_name(svc)})
    assert named.json() == dashboard.json()


@pytest.mark.parametrize(
    "name, body, status, code",
    [
        ("", {}, 400, "bad_request"),  # no function header
        ("hsc-nope", {}, 404, "not_found"),
        (None, {"image": "not base64!"}, 400, "bad_request"),
        (None, {"image": None}, 400, "bad_request"),
        (None, {"threshold": 1.5}, 422, "invalid_option"),
        (None, {"threshold": "high"}, 422, "invalid_option"),
        (None, {"image": base64.b64encode(b"plain text, not an image").decode()}, 415, "unsupported_media"),
    ],
)
def test_bad_invocations(
    svc: Service, gw: Gateway, name: str | None, body: dict[str, Any], status: int, code: str
) -> None:
    """``body`` is laid over a valid frame."""
    r = invoke(gw, fn_name(svc) if name is None else name, {**frame(svc, 0), **body})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM) and r.json()["code"] == code
    assert r.json()["request_id"] == r.headers["x-request-id"]


def test_not_json_and_too_large(svc: Service, gw: Gateway) -> None:
    r = gw.client.post(
        "/api/function_invocations",
        content=b"{not json",
        headers={"x-nuclio-function-name": fn_name(svc), "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["code"] == "bad_request"
    big = {"image": "A" * (4 * 1024 * 1024)}  # over HSC_MAX_UPLOAD_BYTES (2 MiB) in base64
    r = invoke(gw, fn_name(svc), big)
    assert r.status_code == 413 and r.json()["code"] == "too_large"


def test_the_gateway_leaves_the_api_jobs_alone(svc: Service, gw: Gateway) -> None:
    """Embedded mode: the gateway's pool keeps its job store apart from the API's."""
    assert (svc.results_dir / "cvat-gateway").is_dir()
    assert (svc.results_dir / "state").is_dir()
