"""The API over HTTP against a real uvicorn server, in embedded mode and in broker mode (real Redis and
a real Celery worker): single images (JSON, PNG, async), jobs (upload and server-side datasets,
progress, archives, cancel, resume, idempotency), every bad input of docs/product.md D5, metrics,
an API restart and a killed worker.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import struct
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from svclib import N_TRAIN, SIZE, Service, image_bytes, labels_of, upload_zip, wait_for

PROBLEM = "application/problem+json"


def post_image(
    svc: Service,
    data: bytes,
    *,
    headers: dict[str, str] | None = None,
    filename: str = "x.jpg",
    **fields: Any,
) -> httpx.Response:
    form = {k: [str(x) for x in v] if isinstance(v, list) else str(v) for k, v in fields.items()}
    return svc.client.post(
        "/pseudo-label", files={"image": (filename, data, "image/jpeg")}, data=form, headers=headers or {}
    )


def post_upload(
    svc: Service,
    archive: bytes,
    *,
    headers: dict[str, str] | None = None,
    options: dict[str, Any] | None = None,
    **fields: str,
) -> httpx.Response:
    data = {"options": json.dumps(options)} if options is not None else {}
    data.update(fields)
    return svc.client.post(
        "/jobs", files={"archive": ("data.zip", archive, "application/zip")}, data=data, headers=headers or {}
    )


def png_array(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.mode == "P"
    return np.asarray(img)


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM), r.headers
    body = r.json()
    assert body["code"] == code and body["status"] == status, body
    assert body["detail"] and body["request_id"] == r.headers["x-request-id"]
    assert "Traceback" not in r.text
    return body  # type: ignore[no-any-return]


def fg_index(svc: Service, name: str) -> int:
    return svc.model.classes.index(name)


# --------------------------------------------------------------------------------------------------
# probes and models


def test_health_ready_and_models(svc: Service) -> None:
    assert svc.client.get("/healthz").json() == {"status": "ok", "mode": svc.mode}
    ready = svc.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True, ready.text
    assert all(v == "ok" for v in ready.json()["checks"].values())
    models = svc.client.get("/models").json()
    card = next(m for m in models["models"] if m["id"] == svc.model.id)
    assert card["sha256"] == svc.model.sha256 and tuple(card["classes"]) == svc.model.classes
    assert card["bg_threshold"] == pytest.approx(0.3) and card["workers"]
    assert svc.client.get(f"/models/{svc.model.id}").json()["sha256"] == svc.model.sha256
    assert_problem(svc.client.get("/models/nope"), 404, "not_found")
    assert svc.client.get("/docs").status_code == 200
    assert "/pseudo-label" in svc.client.get("/openapi.json").json()["paths"]


# --------------------------------------------------------------------------------------------------
# one image


def test_single_image_json_and_png(svc: Service) -> None:
    data = image_bytes(svc.dataset, 1)
    labels = labels_of(svc.dataset, 1)
    r = post_image(svc, data, labels=",".join(x.upper() for x in labels))  # names in any case
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["request_id"] == r.headers["x-request-id"]
    assert body["model"]["id"] == svc.model.id and body["model"]["sha256"] == svc.model.sha256
    assert body["image"]["width"] == SIZE[0] and body["image"]["height"] == SIZE[1]
    used = sorted(fg_index(svc, x) for x in labels)
    assert body["labels"]["used"] == used and body["settings"]["crf"]
    mask = png_array(base64.b64decode(body["mask"]["data"]))
    assert mask.shape == (SIZE[1], SIZE[0])
    assert set(np.unique(mask).tolist()) <= {0, *used}  # classes not given never appear
    assert {c["index"] for c in body["classes"]} <= set(used)
    assert body["timings_ms"]["total"] > 0

    r2 = post_image(svc, data, labels=labels, headers={"Accept": "image/png"})
    assert r2.status_code == 200 and r2.headers["content-type"] == "image/png", r2.text
    assert r2.headers["x-hsc-model"] == f"{svc.model.id}@{svc.model.sha256[:12]}"
    assert np.array_equal(png_array(r2.content), mask)  # the same mask, alone


def test_label_forms_options_and_outputs(svc: Service) -> None:
    data = image_bytes(svc.dataset, 1)
    labels = labels_of(svc.dataset, 1)
    used = sorted(fg_index(svc, x) for x in labels)
    forms = [
        {"labels": [str(i) for i in used]},  # repeated fields, indices
        {"labels": json.dumps([labels[0], *used[1:]] if len(used) > 1 else [labels[0]])},  # JSON list
        {"labels": ",".join(labels) + ",background"},  # background is implicit
    ]
    for form in forms:
        r = post_image(svc, data, crf="false", **form)
        assert r.status_code == 200, (form, r.text)
        assert r.json()["labels"]["used"] == used and r.json()["settings"]["crf"] is False
    r = post_image(
        svc, data, labels=labels, bg_threshold="0.05", outputs="heatmaps,cams,coco_rle,labelstudio,cvat"
    )
    body = r.json()
    assert r.status_code == 200 and body["settings"]["bg_threshold"] == pytest.approx(0.05), r.text
    for key in ("heatmaps", "cams", "coco_rle", "labelstudio", "cvat"):
        assert key in body, key
    cam = body["cams"][labels[0]]
    arr = np.frombuffer(base64.b64decode(cam["data"]), "<f4").reshape(cam["shape"])
    assert arr.shape == (SIZE[1], SIZE[0]) and 0 <= arr.min() and arr.max() < 1.0001
    # JSON body with base64
    r = svc.client.post(
        "/pseudo-label",
        json={"image_base64": base64.b64encode(data).decode(), "labels": labels, "crf": False},
    )
    assert r.status_code == 200 and r.json()["labels"]["used"] == used, r.text


def test_async_single_image_is_a_job(svc: Service) -> None:
    data = image_bytes(svc.dataset, 2)
    labels = labels_of(svc.dataset, 2)
    r = post_image(svc, data, filename="my photo.jpg", labels=labels, headers={"Prefer": "respond-async"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/jobs/{job['id']}" and job["kind"] == "single"
    done = svc.wait_job(job["id"])
    assert done["status"] == "succeeded" and done["progress"]["done"] == 1, done
    items = svc.client.get(f"/jobs/{job['id']}/items").json()["items"]
    assert [i["state"] for i in items] == ["done"] and items[0]["id"] == "my_photo"
    item = svc.client.get(f"/jobs/{job['id']}/items/my_photo").json()
    assert item["state"] == "done" and item["result"]["model"]["id"] == svc.model.id
    png = svc.client.get(f"/jobs/{job['id']}/items/my_photo/mask.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    sync = post_image(svc, data, labels=labels, headers={"Accept": "image/png"})
    assert np.array_equal(png_array(png.content), png_array(sync.content))
    assert svc.client.get(f"/jobs/{job['id']}/items/my_photo/cams.npz").status_code == 200


# --------------------------------------------------------------------------------------------------
# jobs


def test_upload_job_progress_items_and_archives(svc: Service) -> None:
    r = post_upload(svc, upload_zip(svc.dataset), options={"outputs": ["heatmaps"], "crf": False})
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/jobs/{r.json()['id']}" and r.headers["retry-after"]
    jid = r.json()["id"]
    seen: list[int] = []

    def finished() -> bool:
        job = svc.job(jid)
        seen.append(job["progress"]["done"])
        return job["status"] == "succeeded"

    wait_for(finished, 90, f"job {jid}", interval=0.05)
    job = svc.job(jid)
    assert job["progress"] == {"total": N_TRAIN, "done": N_TRAIN, "failed": 0, "skipped": 0, "percent": 100.0}
    assert seen == sorted(seen) and seen[0] < N_TRAIN  # progress reported on the way
    assert job["rate_images_per_s"] > 0 and job["eta_s"] == 0 and job["finished_at"] >= job["started_at"]
    items = svc.client.get(f"/jobs/{jid}/items", params={"limit": 15}).json()
    assert len(items["items"]) == 15 and items["next_cursor"] == 15
    rest = svc.client.get(f"/jobs/{jid}/items", params={"cursor": 15}).json()
    ids = [i["id"] for i in items["items"] + rest["items"]]
    assert len(ids) == len(set(ids)) == N_TRAIN and rest["next_cursor"] is None
    item = svc.client.get(f"/jobs/{jid}/items/train_000003").json()
    heat = item["links"]["heatmaps"]
    assert set(heat) == set(labels_of(svc.dataset, 3))
    assert svc.client.get(next(iter(heat.values()))).headers["content-type"] == "image/png"
    assert_problem(svc.client.get(f"/jobs/{jid}/items/train_000003/heatmaps/nope.png"), 404, "not_found")

    voc = svc.client.get(f"/jobs/{jid}/archive", params={"format": "voc"})
    assert voc.status_code == 200 and voc.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(voc.content)).namelist()
    assert sum(n.startswith("SegmentationClass/") and n.endswith(".png") for n in names) == N_TRAIN
    assert "labelmap.txt" in names
    coco = svc.client.get(f"/jobs/{jid}/archive", params={"format": "coco"})
    with zipfile.ZipFile(io.BytesIO(coco.content)) as z:
        ann = json.loads(z.read("annotations.json"))
    assert len(ann["images"]) == N_TRAIN
    assert [c["name"] for c in ann["categories"]] == list(svc.model.classes[1:])
    assert_problem(svc.client.get(f"/jobs/{jid}/archive", params={"format": "tiff"}), 422, "invalid_option")


def test_server_side_datasets_and_allowed_roots(svc: Service) -> None:
    r = svc.client.post(
        "/jobs",
        json={
            "dataset": {"kind": "manifest", "path": str(svc.dataset / "manifest_val.jsonl")},
            "options": {"crf": False},
        },
    )
    assert r.status_code == 202, r.text
    voc = svc.client.post(
        "/jobs", json={"dataset": {"kind": "voc", "path": str(svc.dataset), "split": "val"}}
    )
    assert voc.status_code == 202, voc.text
    for jid in (r.json()["id"], voc.json()["id"]):
        job = svc.wait_job(jid)
        assert job["status"] == "succeeded" and job["progress"]["done"] == 2, job
    outside = svc.client.post("/jobs", json={"dataset": {"kind": "voc", "path": "/etc"}})
    assert_problem(outside, 403, "forbidden")
    sneaky = svc.client.post(
        "/jobs", json={"dataset": {"kind": "voc", "path": str(svc.dataset / ".." / "..")}}
    )
    assert_problem(sneaky, 403, "forbidden")
    assert_problem(
        svc.client.post("/jobs", json={"dataset": {"path": "relative/x.jsonl"}}), 422, "invalid_option"
    )
    missing = svc.client.post("/jobs", json={"dataset": {"path": str(svc.dataset / "nope.jsonl")}})
    assert_problem(missing, 422, "invalid_dataset")
    extra = svc.client.post(
        "/jobs", json={"dataset": {"path": str(svc.dataset)}, "options": {"labels": ["x"]}}
    )
    assert_problem(extra, 422, "invalid_option")


def test_idempotency_key(svc: Service) -> None:
    body = {"dataset": {"kind": "voc", "path": str(svc.dataset), "split": "val"}, "options": {"crf": False}}
    key = {"Idempotency-Key": f"svc-test-{svc.model.id}-{svc.mode}"}
    first = svc.client.post("/jobs", json=body, headers=key)
    assert first.status_code == 202, first.text
    again = svc.client.post("/jobs", json=body, headers=key)
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert again.headers.get("idempotent-replayed") == "true"
    other = svc.client.post("/jobs", json={**body, "options": {"crf": True}}, headers=key)
    assert assert_problem(other, 422, "idempotency_mismatch")["job_id"] == first.json()["id"]
    fresh = svc.client.post("/jobs", json=body, headers={"Idempotency-Key": key["Idempotency-Key"] + "-2"})
    assert fresh.status_code == 202 and fresh.json()["id"] != first.json()["id"]
    for r in (first, fresh):
        svc.wait_job(r.json()["id"])
    # purging the job frees its key
    assert svc.client.delete(f"/jobs/{first.json()['id']}", params={"purge": "true"}).status_code == 204
    reused = svc.client.post("/jobs", json={**body, "options": {"crf": True}}, headers=key)
    assert reused.status_code == 202 and reused.json()["id"] not in (first.json()["id"], fresh.json()["id"])
    svc.wait_job(reused.json()["id"])


def test_cancel_resume_retry_and_purge(svc: Service) -> None:
    r = post_upload(svc, upload_zip(svc.dataset), crf="false", outputs="cams")  # options as fields
    assert r.json()["options"]["crf"] is False and r.json()["options"]["outputs"] == ["cams", "mask"]
    assert r.status_code == 202, r.text
    jid = r.json()["id"]
    assert_problem(svc.client.get(f"/jobs/{jid}/archive"), 409, "conflict")  # not finished
    assert_problem(svc.client.post(f"/jobs/{jid}/resume"), 409, "conflict")  # still running
    cancel = svc.client.delete(f"/jobs/{jid}")
    assert cancel.status_code == 202 and cancel.json()["status"] in ("cancelling", "cancelled"), cancel.text
    job = svc.wait_job(jid, 60)
    assert job["status"] == "cancelled" and job["progress"]["done"] < N_TRAIN, job
    assert_problem(svc.client.delete(f"/jobs/{jid}"), 409, "conflict")  # already stopped
    partial = svc.client.get(f"/jobs/{jid}/archive", params={"partial": "true", "format": "raw"})
    assert partial.status_code == 200

    resumed = svc.client.post(f"/jobs/{jid}/resume")
    assert resumed.status_code == 202 and resumed.json()["status"] in ("queued", "running"), resumed.text
    job = svc.wait_job(jid, 90)
    assert job["status"] == "succeeded" and job["progress"]["done"] == N_TRAIN, job
    retry = svc.client.post(f"/jobs/{jid}/retry-failed")  # nothing failed: nothing to do
    assert retry.status_code == 200 and retry.json()["status"] == "succeeded"

    assert svc.client.delete(f"/jobs/{jid}", params={"purge": "true"}).status_code == 204
    assert_problem(svc.client.get(f"/jobs/{jid}"), 404, "not_found")
    assert not (svc.results_dir / "jobs" / jid).exists()


def test_failed_items_and_retry(svc: Service) -> None:
    """A corrupt image fails its item only; retry-failed runs it again."""
    bad = image_bytes(svc.dataset, 0)[:300]  # a valid header, the pixels cut off
    archive = upload_zip(svc.dataset, 3, extra={"JPEGImages/broken.jpg": bad})
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        manifest = (
            z.read("manifest.jsonl").decode()
            + json.dumps({"image": "JPEGImages/broken.jpg", "labels": ["owl"]})
            + "\n"
        )
        files = {n: z.read(n) for n in z.namelist() if n != "manifest.jsonl"}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr("manifest.jsonl", manifest)
    r = post_upload(svc, buf.getvalue(), options={"crf": False})
    assert r.status_code == 202, r.text
    job = svc.wait_job(r.json()["id"])
    assert job["status"] == "partially_succeeded", job
    assert job["progress"]["done"] == 3 and job["progress"]["failed"] == 1
    assert job["errors_sample"] == [
        {"item": "broken", "code": "corrupt_image", "detail": job["errors_sample"][0]["detail"]}
    ]
    failed = svc.client.get(f"/jobs/{job['id']}/items", params={"status": "failed"}).json()["items"]
    assert [(i["id"], i["code"]) for i in failed] == [("broken", "corrupt_image")]
    retry = svc.client.post(f"/jobs/{job['id']}/retry-failed")
    assert retry.status_code == 202, retry.text
    job = svc.wait_job(job["id"])
    assert job["status"] == "partially_succeeded" and job["progress"]["failed"] == 1


def test_list_jobs(svc: Service) -> None:
    mine = {j for j in _all_job_ids(svc)}
    assert len(mine) >= 3
    page = svc.client.get("/jobs", params={"limit": 2}).json()
    assert len(page["jobs"]) == 2 and page["next_cursor"]
    nxt = svc.client.get("/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert not {j["id"] for j in page["jobs"]} & {j["id"] for j in nxt["jobs"]}
    assert page["jobs"][0]["created_at"] >= nxt["jobs"][0]["created_at"]  # newest first
    ok = svc.client.get("/jobs", params={"status": "succeeded", "limit": 1000}).json()["jobs"]
    assert ok and all(j["status"] == "succeeded" for j in ok)
    assert_problem(svc.client.get("/jobs", params={"status": "bogus"}), 422, "invalid_option")


def _all_job_ids(svc: Service) -> list[str]:
    out: list[str] = []
    cursor = None
    while True:
        page = svc.client.get("/jobs", params={"limit": 500, **({"cursor": cursor} if cursor else {})}).json()
        out += [j["id"] for j in page["jobs"] if j.get("model") == svc.model.id]
        cursor = page["next_cursor"]
        if not cursor:
            return out


# --------------------------------------------------------------------------------------------------
# bad input (docs/product.md D5)


def _png(width: int, height: int) -> bytes:
    """A valid grey PNG of any size, built by hand (compresses to a few KB even at 1 MP)."""
    raw = zlib.compress(b"".join(b"\0" + bytes(width) for _ in range(height)), 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "GIF")
    return buf.getvalue()


BAD_IMAGES = [
    ("no labels", lambda d: {}, 422, "no_labels"),
    ("background only", lambda d: {"labels": "background,0"}, 422, "no_labels"),
    ("unknown class", lambda d: {"labels": "beetle,dog"}, 422, "unknown_class"),
    ("index out of range", lambda d: {"labels": "6"}, 422, "unknown_class"),
    (
        "not an image",
        lambda d: {"image": b"hello, I am text" * 10, "labels": "beetle"},
        415,
        "unsupported_media",
    ),
    ("gif", lambda d: {"image": _gif(), "labels": "beetle"}, 415, "unsupported_media"),
    (
        "broken header",
        lambda d: {"image": b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "labels": "beetle"},
        422,
        "corrupt_image",
    ),
    ("truncated pixels", lambda d: {"image": d[:300], "labels": "beetle"}, 422, "corrupt_image"),
    (
        "too many bytes",
        lambda d: {"image": d + b"\0" * (2 * 1024 * 1024), "labels": "beetle"},
        413,
        "too_large",
    ),
    ("too many pixels", lambda d: {"image": _png(1100, 1000), "labels": "beetle"}, 413, "too_large"),
    ("bad threshold", lambda d: {"labels": "beetle", "bg_threshold": "2"}, 422, "invalid_option"),
    ("bad crf", lambda d: {"labels": "beetle", "crf": "maybe"}, 422, "invalid_option"),
    ("bad output", lambda d: {"labels": "beetle", "outputs": "mask,jpeg"}, 422, "invalid_option"),
    ("unknown model", lambda d: {"labels": "beetle", "model": "nope"}, 404, "not_found"),
]


@pytest.mark.parametrize("case", BAD_IMAGES, ids=[c[0] for c in BAD_IMAGES])
def test_bad_image_requests(svc: Service, case: tuple[str, Any, int, str]) -> None:
    _, make, status, code = case
    fields = make(image_bytes(svc.dataset, 0))
    data = fields.pop("image", image_bytes(svc.dataset, 0))
    body = assert_problem(post_image(svc, data, **fields), status, code)
    if code == "unknown_class":
        assert body["valid_classes"] == list(svc.model.classes[1:])


def test_bad_requests(svc: Service) -> None:
    img = image_bytes(svc.dataset, 0)
    assert_problem(
        svc.client.post("/pseudo-label", data={"labels": "beetle"}, files={"x": ("a", b"1")}),
        400,
        "bad_request",
    )
    assert_problem(
        svc.client.post("/pseudo-label", content=b"{nope", headers={"content-type": "application/json"}),
        400,
        "bad_request",
    )
    assert_problem(
        svc.client.post("/pseudo-label", content=img, headers={"content-type": "image/jpeg"}),
        415,
        "unsupported_media",
    )
    big = svc.client.post(
        "/pseudo-label",
        content=b"\0" * (3 * 1024 * 1024 + 10),
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert_problem(big, 413, "too_large")  # refused from Content-Length, before reading
    assert_problem(svc.client.get("/jobs/job_nope"), 404, "not_found")
    assert_problem(svc.client.get("/jobs/..%2Fetc"), 404, "not_found")
    assert_problem(
        svc.client.post("/jobs", content=b"[1]", headers={"content-type": "application/json"}),
        400,
        "bad_request",
    )
    assert_problem(svc.client.get("/no/such/route"), 404, "not_found")


def test_bad_uploads(svc: Service) -> None:
    assert_problem(post_upload(svc, b"not a zip at all"), 422, "invalid_archive")
    escape = io.BytesIO()
    with zipfile.ZipFile(escape, "w") as z:
        z.writestr("../evil.txt", "x")
        z.writestr("manifest.jsonl", "")
    assert_problem(post_upload(svc, escape.getvalue()), 422, "invalid_archive")
    outside = upload_zip(svc.dataset, 2)
    with zipfile.ZipFile(io.BytesIO(outside)) as z:
        files = {n: z.read(n) for n in z.namelist()}
    good = files["manifest.jsonl"]
    # files outside the upload are refused, existing or not (the answer tells nothing about the server)
    for line in ({"image": "/etc/hostname"}, {"image": "/no/such/file.jpg"}, {"image": "../../x.jpg"},
                 {"image": "JPEGImages/train_000000.jpg", "mask": "/etc/hostname"}):  # fmt: skip
        files["manifest.jsonl"] = good + (json.dumps({**line, "labels": ["owl"]}) + "\n").encode()
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for n, d in files.items():
                z.writestr(n, d)
        assert (
            "outside the uploaded archive"
            in assert_problem(post_upload(svc, buf.getvalue()), 403, "forbidden")["detail"]
        )
    files["manifest.jsonl"] = (
        json.dumps({"image": "JPEGImages/train_000000.jpg", "labels": ["dog"]}) + "\n"
    ).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
    assert "dog" in assert_problem(post_upload(svc, buf.getvalue()), 422, "invalid_dataset")["detail"]
    assert_problem(
        post_upload(svc, upload_zip(svc.dataset, 2), options={"crf": "maybe"}), 422, "invalid_option"
    )
    uploads = [p.name for p in (svc.results_dir / "uploads").iterdir()]
    assert all(
        svc.client.get(f"/jobs/{name}").status_code == 200 for name in uploads
    )  # refusals leave nothing


# --------------------------------------------------------------------------------------------------
# metrics, restart, crash


def test_metrics(svc: Service) -> None:
    assert post_image(svc, image_bytes(svc.dataset, 0), labels="beetle").status_code == 200
    assert post_image(svc, image_bytes(svc.dataset, 0), labels="dog").status_code == 422
    text = svc.client.get("/metrics").text
    for name in (
        "hsc_http_requests_total{",
        "hsc_http_request_seconds_bucket{",
        "hsc_queue_depth{",
        "hsc_jobs{",
        "hsc_stage_seconds_bucket{",
        "hsc_images_total{",
        "hsc_failures_total{",
    ):
        assert name in text, name
    assert f'hsc_workers_ready{{model="{svc.model.id}"}} 1.0' in text

    def processed() -> float:  # the workers' own count, from their heartbeats (a beat behind)
        lines = svc.client.get("/metrics").text.splitlines()
        return sum(float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith("hsc_worker_images_processed{"))

    wait_for(lambda: processed() >= 1, 10, "the workers' image count")
    assert 'hsc_failures_total{code="unknown_class"}' in text
    assert 'route="/pseudo-label"' in text and 'code="200"' in text


def test_api_restart_keeps_jobs(svc: Service) -> None:
    r = post_upload(svc, upload_zip(svc.dataset), options={"crf": False})
    jid = r.json()["id"]
    wait_for(lambda: svc.job(jid)["progress"]["done"] >= 1, 60, "a first image done", interval=0.02)
    assert svc.job(jid)["progress"]["done"] < N_TRAIN  # the restart comes mid-job
    svc.restart_api()
    if svc.mode == "embedded":
        # The in-process pool went down with the API: the job waits for the new one to resume it.
        # (A broker's worker goes on while the API restarts and may finish the job meanwhile.)
        assert svc.job(jid)["progress"]["done"] < N_TRAIN
    job = svc.wait_job(jid, 90)
    assert job["status"] == "succeeded", job
    assert job["progress"] == {"total": N_TRAIN, "done": N_TRAIN, "failed": 0, "skipped": 0, "percent": 100.0}
    states = svc.client.get(f"/jobs/{jid}/items").json()["items"]
    assert len({s["id"] for s in states}) == N_TRAIN and {s["state"] for s in states} == {"done"}
    assert len(list((svc.results_dir / "jobs" / jid / "items").glob("*.json"))) == N_TRAIN


def _pool_children(pid: int) -> list[int]:
    """Pids of the spawned pool processes under ``pid`` (read from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"spawn_main" in cmd:
            out.append(int(entry.name))
    return out


def test_worker_killed_mid_job_finishes_every_image_once(svc: Service) -> None:
    r = post_upload(svc, upload_zip(svc.dataset), options={"crf": False})
    jid = r.json()["id"]
    wait_for(
        lambda: 2 <= svc.job(jid)["progress"]["done"] < N_TRAIN - 4, 60, "the job half-way", interval=0.02
    )
    if svc.mode == "broker":
        assert svc.worker is not None
        svc.worker.kill()  # SIGKILL: no clean shutdown, the chunk stays unacknowledged
        before = svc.job(jid)["progress"]["done"]
        time.sleep(0.5)
        assert svc.job(jid)["progress"]["done"] == before and svc.job(jid)["status"] == "running"
        svc.start_worker()
    else:
        assert svc.api is not None
        pids = _pool_children(svc.api.pid)
        assert pids, "no pool process found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    job = svc.wait_job(jid, 120)
    assert job["status"] == "succeeded", job
    assert job["progress"] == {"total": N_TRAIN, "done": N_TRAIN, "failed": 0, "skipped": 0, "percent": 100.0}
    states = svc.client.get(f"/jobs/{jid}/items").json()["items"]
    assert len({s["id"] for s in states}) == N_TRAIN and {s["state"] for s in states} == {"done"}
    assert svc.client.get("/readyz").status_code == 200
