"""hsc as a Label Studio ML backend (``/integrations/label-studio/*``, docs/product.md D7) against a real
uvicorn server in embedded mode, with a tiny HTTP server standing in for Label Studio's media (it wants
``Authorization: Token <key>``) and another one for a foreign host. Masks of ``predict`` are decoded
from the brush RLE and compared with what ``POST /pseudo-label`` answers for the same image and labels.
"""

from __future__ import annotations

import base64
import io
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from svclib import Model, Proc, free_port, image_bytes, labels_of, service_env, start_server

from hsc.core.encoders import brush_rle_to_mask, mask_from_base64_png
from hsc.service.routes.labelstudio import (
    ConfigError,
    build_label_map,
    parse_label_config,
    task_labels,
)

KEY = "ls-backend-key"
TOKEN = "ls-token-0123456789"
PREFIX = "/integrations/label-studio"

#: The "Semantic Segmentation with Masks" template with the synthetic classes, labelled the way a team
#: would: an exact name, predicted_values, another case, an alias; plus image-level <Choices>.
CONFIG = """<View>
  <Header value="Tag the image, then check the masks"/>
  <Image name="img" value="$photo" zoom="true"/>
  <Choices name="tags" toName="img" choice="multiple" showInline="true">
    <Choice value="Beetle"/>
    <Choice value="Boat" predicted_values="raft"/>
    <Choice value="Zebra"/>
    <Choice value="Owl"/>
    <Choice value="Grazer"/>
  </Choices>
  <BrushLabels name="seg" toName="img">
    <Label value="beetle" background="rgba(255, 0, 0, 0.7)"/>
    <Label value="Watercraft" predicted_values="raft, canoe" background="rgba(0, 0, 255, 0.7)"/>
    <Label value="ZEBRA" background="rgba(0, 255, 0, 0.7)"/>
    <Label value="owl" alias="Owl (bird)" background="rgba(255, 255, 0, 0.7)"/>
    <Label value="grazer" background="rgba(0, 255, 255, 0.7)"/>
  </BrushLabels>
</View>"""
#: What each project label of CONFIG stands for.
PROJECT_TO_MODEL = {
    "beetle": "beetle",
    "Watercraft": "raft",
    "ZEBRA": "zebra",
    "Owl (bird)": "owl",
    "grazer": "grazer",
}
MODEL_TO_CHOICE = {"beetle": "Beetle", "raft": "Boat", "zebra": "Zebra", "owl": "Owl", "grazer": "Grazer"}


# --------------------------------------------------------------------------------------------------
# a stand-in for Label Studio's media


class _Media(BaseHTTPRequestHandler):
    server: _MediaServer

    def do_GET(self) -> None:  # noqa: N802 - the http.server hook
        srv = self.server
        auth = self.headers.get("Authorization")
        srv.seen.append((self.path, auth))
        if srv.token is not None and auth != f"Token {srv.token}":
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path in srv.redirects:
            self.send_response(302)
            self.send_header("Location", srv.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = srv.files.get(self.path)
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


class _MediaServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, token: str | None) -> None:
        super().__init__(("127.0.0.1", 0), _Media)
        self.token = token
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.seen: list[tuple[str, str | None]] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@dataclass
class LS:
    """The hsc API (keys on, Label Studio media configured), its client with Basic auth, the media."""

    url: str
    model: Model
    dataset: Path
    studio: _MediaServer
    other: _MediaServer
    proc: Proc
    client: httpx.Client = field(init=False)
    fg: int | None = None

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, timeout=60, auth=("label-studio", KEY))

    def predict(self, tasks: list[dict[str, Any]], **extra: Any) -> list[dict[str, Any]]:
        body = {"tasks": tasks, "project": "7.1700000000", "label_config": CONFIG, "params": {}, **extra}
        r = self.client.post(f"{PREFIX}/predict", json=body)
        assert r.status_code == 200, (r.text, self.proc.tail())
        results = r.json()["results"]
        assert len(results) == len(tasks)
        return results  # type: ignore[no-any-return]

    def reference(self, data: bytes, labels: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
        """The mask and body of POST /pseudo-label for the same image and labels (API key, not Basic)."""
        r = httpx.post(
            self.url + "/pseudo-label",
            files={"image": ("x.jpg", data, "image/jpeg")},
            data={"labels": ",".join(labels)},
            headers={"X-API-Key": KEY},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        return mask_from_base64_png(body["mask"]["data"]), body

    @property
    def version(self) -> str:
        return f"{self.model.id}@{self.model.sha256[:12]}"


@pytest.fixture(scope="module")
def ls(model: Model, dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LS]:
    tmp = tmp_path_factory.mktemp("ls")
    studio, other = _MediaServer(TOKEN), _MediaServer(None)
    env = service_env(
        "embedded",
        model,
        dataset,
        tmp / "results",
        f"hsc-ls-{secrets.token_hex(3)}",
        HSC_API_KEYS=KEY,
        LABEL_STUDIO_URL=studio.url,
        LABEL_STUDIO_API_KEY=TOKEN,
    )
    proc, url = start_server(env, tmp)
    s = LS(url, model, dataset, studio, other, proc)
    try:
        yield s
    except BaseException:
        print(proc.tail())
        raise
    finally:
        s.client.close()
        proc.stop()
        for srv in (studio, other):
            srv.shutdown()
            srv.server_close()
        shutil.rmtree(tmp, ignore_errors=True)


def _task(tid: int, photo: str, **data: Any) -> dict[str, Any]:
    return {"id": tid, "data": {"photo": photo, **data}, "annotations": [], "predictions": []}


def _data_uri(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def assert_matches(ls: LS, pred: dict[str, Any], data: bytes, labels: list[str]) -> np.ndarray:
    """``pred`` (one task of predict) holds, class by class, the mask /pseudo-label gives for ``labels``."""
    mask, body = ls.reference(data, labels)
    present = {int(v) for v in np.unique(mask) if v not in (0, 255)}
    seen = set()
    for region in pred["result"]:
        assert region["from_name"] == "seg" and region["to_name"] == "img" and region["type"] == "brushlabels"
        h, w = region["original_height"], region["original_width"]
        assert (h, w) == mask.shape == (body["image"]["height"], body["image"]["width"])
        (label,) = region["value"]["brushlabels"]
        v = ls.model.classes.index(PROJECT_TO_MODEL[label])
        assert np.array_equal(brush_rle_to_mask(region["value"]["rle"], h, w), mask == v), label
        row = next(c for c in body["classes"] if c["index"] == v)
        assert region["score"] == pytest.approx(row["mean_confidence"], abs=1e-4)
        seen.add(v)
    assert seen == present, (seen, present)
    assert pred["score"] == pytest.approx(body["quality"]) and pred["model_version"] == ls.version
    return mask


def _fg_image(ls: LS) -> int:
    """A train image whose mask has foreground (the random test model leaves some empty)."""
    if ls.fg is None:
        for i in range(8):
            mask, _ = ls.reference(image_bytes(ls.dataset, i), labels_of(ls.dataset, i))
            if ((mask > 0) & (mask < 255)).any():
                ls.fg = i
                break
        else:
            pytest.fail("no train image with foreground in its mask")
    return ls.fg


# --------------------------------------------------------------------------------------------------
# the pure pieces


def test_parse_config_and_label_map() -> None:
    cfg = parse_label_config(CONFIG)
    assert (cfg.kind, cfg.from_name, cfg.to_name, cfg.image_value) == ("brushlabels", "seg", "img", "$photo")
    assert [t.output for t in cfg.labels] == list(PROJECT_TO_MODEL)
    classes = ["beetle", "raft", "zebra", "owl", "grazer", "cat"]
    assert build_label_map(cfg.labels, classes) == {v: k for k, v in PROJECT_TO_MODEL.items()}
    mask_cfg = parse_label_config(
        '<View><Image name="i" value="$image"/><Image name="j" value="$other"/>'
        '<RectangleLabels name="r" toName="i"><Label value="x"/></RectangleLabels>'
        '<BitmaskLabels name="bm" toName="x,j"><Label value="Cat" predicted_values="cat"/>'
        "</BitmaskLabels></View>"
    )
    assert (mask_cfg.kind, mask_cfg.from_name, mask_cfg.to_name) == ("bitmasklabels", "bm", "j")
    for bad in (
        "",
        "<View><Image",
        '<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i"/></View>',
        '<!DOCTYPE x [<!ENTITY a "aaaa">]><View>&a;</View>',
    ):
        with pytest.raises(ConfigError):
            parse_label_config(bad)


def test_label_sources_in_order() -> None:
    cfg = parse_label_config(CONFIG)
    choice = {"type": "choices", "from_name": "tags", "to_name": "img"}
    task: dict[str, Any] = {
        "id": 1,
        "data": {"photo": "x"},
        "annotations": [
            {"created_at": "2024-01-01T00:00:00Z", "result": [{**choice, "value": {"choices": ["Zebra"]}}]},
            {"updated_at": "2024-06-01T10:00:00.5Z", "result": [{**choice, "value": {"choices": ["Boat"]}}]},
            {
                "created_at": "2025-01-01T00:00:00Z",
                "was_cancelled": True,
                "result": [{**choice, "value": {"choices": ["Owl"]}}],
            },
            {  # newest, but its choices are on another image
                "created_at": "2025-02-01T00:00:00Z",
                "result": [{**choice, "to_name": "other", "value": {"choices": ["Grazer"]}}],
            },
        ],
        "drafts": [
            {"updated_at": "2024-03-01T00:00:00Z", "result": [{**choice, "value": {"choices": ["Owl"]}}]}
        ],
    }
    ctx = {"result": [{**choice, "value": {"choices": ["Grazer"]}}]}
    assert task_labels(task, cfg, "labels", ctx) == (["Boat"], "annotation")
    task["drafts"][0]["updated_at"] = "2024-07-01T00:00:00Z"
    assert task_labels(task, cfg, "labels", ctx) == (["Owl"], "draft")
    task["data"]["labels"] = "beetle, Zebra"
    assert task_labels(task, cfg, "labels", ctx) == (["beetle", "Zebra"], "task_data")
    assert task_labels({"data": {"tags": ["owl", 3]}}, cfg, "tags") == (["owl", 3], "task_data")
    assert task_labels({"data": {}}, cfg, "labels", ctx) == (["Grazer"], "context")
    assert task_labels({"data": {}}, cfg, "labels", None) == ([], "none")


# --------------------------------------------------------------------------------------------------
# health, auth, setup, webhook


def test_health_and_basic_auth(ls: LS) -> None:
    for path in (f"{PREFIX}/health", PREFIX, f"{PREFIX}/", "/health"):
        t0 = time.perf_counter()
        r = ls.client.get(path)
        assert r.status_code == 200 and r.json() == {"status": "UP", "model_class": "HSC"}, (path, r.text)
        assert time.perf_counter() - t0 < 1.0  # Label Studio's ML_TIMEOUT_HEALTH
    bare = httpx.Client(base_url=ls.url, timeout=30)
    try:
        r = bare.get(f"{PREFIX}/health")
        assert r.status_code == 401 and "Basic" in r.headers["www-authenticate"], r.text
        assert bare.get(f"{PREFIX}/health", auth=("label-studio", "wrong")).status_code == 401
        assert bare.get(f"{PREFIX}/health", auth=("x", "")).status_code == 401
        assert bare.get(f"{PREFIX}/health", headers={"Authorization": "Basic !!!"}).status_code == 401
        assert bare.get(f"{PREFIX}/health", auth=("any-user", KEY)).status_code == 200
        assert bare.get(f"{PREFIX}/health", headers={"X-API-Key": KEY}).status_code == 200
        assert bare.post(f"{PREFIX}/webhook", json={"action": "ANNOTATION_CREATED"}).status_code == 401
        # Basic is for the Label Studio routes only
        r = bare.get("/models", auth=("label-studio", KEY))
        assert r.status_code == 401 and "Basic" not in r.headers["www-authenticate"]
        assert bare.get("/healthz").status_code == 200
    finally:
        bare.close()
    r = ls.client.post(f"{PREFIX}/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
    assert r.status_code == 200 and r.json() == {}


def test_setup(ls: LS) -> None:
    body = {
        "project": "7.1700000000",
        "schema": CONFIG,
        "hostname": "",
        "access_token": "",
        "extra_params": "",
    }
    r = ls.client.post(f"{PREFIX}/setup", json=body)
    assert r.status_code == 200 and r.json() == {"model_version": ls.version}, r.text
    r = ls.client.post(
        f"{PREFIX}/setup", json={**body, "schema": "<View><Image name='i' value='$i'/></View>"}
    )
    assert r.status_code == 422 and r.json()["code"] == "invalid_option" and "BrushLabels" in r.text
    r = ls.client.post(f"{PREFIX}/setup", json={**body, "schema": "<View"})
    assert r.status_code == 422 and "XML" in r.json()["detail"]
    assert ls.client.post(f"{PREFIX}/setup", content=b"not json").status_code == 400


# --------------------------------------------------------------------------------------------------
# predict


def test_predict_labels_from_task_data_match_pseudo_label(ls: LS) -> None:
    i = _fg_image(ls)
    data, labels = image_bytes(ls.dataset, i), labels_of(ls.dataset, i)
    ls.studio.files[f"/data/upload/7/img{i}.jpg"] = data
    ls.studio.seen.clear()
    tasks = [
        _task(1, f"/data/upload/7/img{i}.jpg", labels=labels),  # relative: from LABEL_STUDIO_URL, list
        _task(2, _data_uri(data), labels=",".join(x.upper() for x in labels)),  # comma string, any case
    ]
    first, second = ls.predict(tasks, model_version=ls.version)
    mask = assert_matches(ls, first, data, labels)
    assert first["result"], "the image has foreground, so regions are expected"
    assert second == first
    assert (f"/data/upload/7/img{i}.jpg", f"Token {TOKEN}") in ls.studio.seen
    assert mask.shape == (48, 64)


def test_predict_labels_from_annotations_drafts_and_context(ls: LS) -> None:
    i = _fg_image(ls)
    data, labels = image_bytes(ls.dataset, i), labels_of(ls.dataset, i)
    choices = [MODEL_TO_CHOICE[x] for x in labels]
    result = [{"type": "choices", "from_name": "tags", "to_name": "img", "value": {"choices": choices}}]
    wrong = [{**result[0], "value": {"choices": ["Owl", "Grazer", "Zebra"]}}]
    annotated = _task(1, _data_uri(data))
    annotated["annotations"] = [
        {"id": 1, "created_at": "2024-01-01T00:00:00Z", "result": wrong},
        {"id": 2, "created_at": "2024-02-01T00:00:00Z", "result": result},
        {"id": 3, "created_at": "2024-03-01T00:00:00Z", "was_cancelled": True, "result": wrong},
    ]
    drafted = _task(2, _data_uri(data))
    drafted["drafts"] = [{"id": 9, "updated_at": "2024-02-01T00:00:00Z", "result": result}]
    pa, pd = ls.predict([annotated, drafted])
    assert_matches(ls, pa, data, labels)
    assert pd == pa and pa["result"]
    (pc,) = ls.predict([_task(3, _data_uri(data))], params={"context": {"result": result}})
    assert pc == pa


def test_predict_image_sources_and_exif(ls: LS, dataset: Path) -> None:
    i = _fg_image(ls)
    data, labels = image_bytes(ls.dataset, i), labels_of(ls.dataset, i)
    ls.other.files["/pics/a.jpg"] = data
    b64 = base64.urlsafe_b64encode(b"s3://bucket/a.jpg").decode()
    ls.studio.redirects[f"/tasks/5/presign/?fileuri={b64}"] = ls.other.url + "/pics/a.jpg"
    ls.studio.files["/data/local-files/?d=pics/a.jpg"] = data
    # the same pixels stored a quarter turn off, with EXIF orientation 6 to show them upright
    stored = Image.open(io.BytesIO(data)).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    rotated = buf.getvalue()
    local = str(dataset / "JPEGImages" / f"train_{i:06d}.jpg")
    ls.other.seen.clear()
    tasks = [
        _task(1, local, labels=labels),  # a local path under HSC_ALLOWED_ROOTS
        _task(2, ls.other.url + "/pics/a.jpg", labels=labels),  # a foreign host: no token
        _task(5, "s3://bucket/a.jpg", labels=labels),  # cloud storage through the presign redirect
        _task(6, "/data/local-files/?d=pics/a.jpg", labels=labels),
        _task(7, _data_uri(rotated), labels=labels),
    ]
    results = ls.predict(tasks)
    assert_matches(ls, results[0], data, labels)
    assert results[1] == results[0] and results[2] == results[0] and results[3] == results[0]
    assert ls.other.seen and all(auth is None for _, auth in ls.other.seen)  # the token stays home
    assert all(auth == f"Token {TOKEN}" for _, auth in ls.studio.seen)
    mask = assert_matches(ls, results[4], rotated, labels)
    assert mask.shape == (48, 64)  # displayed size, not the stored 48 wide x 64 high
    for region in results[4]["result"]:
        assert (region["original_width"], region["original_height"]) == (64, 48)


def test_predict_failures_are_empty_results(ls: LS, tmp_path: Path) -> None:
    i = _fg_image(ls)
    data, labels = image_bytes(ls.dataset, i), labels_of(ls.dataset, i)
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(data)
    ls.studio.files["/data/upload/7/broken.jpg"] = data[: len(data) // 3]
    tasks: list[Any] = [
        _task(1, _data_uri(data)),  # no labels anywhere
        _task(2, "/data/upload/7/missing.jpg", labels=labels),  # 404 from Label Studio
        _task(3, str(outside), labels=labels),  # outside HSC_ALLOWED_ROOTS, not on Label Studio either
        _task(4, "data:image/jpeg;base64,bm90IGFuIGltYWdl", labels=labels),  # not an image
        _task(5, "/data/upload/7/broken.jpg", labels=labels),  # truncated JPEG
        _task(6, _data_uri(data), labels=["unicorn"]),  # no class of the model
        _task(7, _data_uri(data), labels=["background"]),
        {"id": 8, "data": {"image": _data_uri(data)}},  # not where the config's $photo says
        "not a task",
        _task(10, _data_uri(data), labels=labels + ["unicorn"]),  # the unknown one is ignored
        _task(11, "ftp://example.com/a.jpg", labels=labels),
    ]
    results = ls.predict(tasks)
    for k, res in enumerate(results[:-2] + results[-1:]):
        assert res == {"result": [], "model_version": ls.version}, (k, res)
    assert_matches(ls, results[-2], data, labels)
    assert results[-2]["result"]
    r = ls.client.post(f"{PREFIX}/predict", json={"tasks": "nope"})
    assert r.status_code == 400
    # a config hsc cannot answer: every task empty, nothing fails
    bad = '<View><Image name="img" value="$photo"/><RectangleLabels name="r" toName="img"/></View>'
    (res,) = ls.predict([_task(1, _data_uri(data), labels=labels)], label_config=bad)
    assert res == {"result": [], "model_version": ls.version}


def test_predict_bitmask_config(ls: LS) -> None:
    i = _fg_image(ls)
    data, labels = image_bytes(ls.dataset, i), labels_of(ls.dataset, i)
    mask, _ = ls.reference(data, labels)
    config = (
        '<View><Image name="pic" value="$photo" smoothing="false"/>'
        '<BitmaskLabels name="bm" toName="pic">'
        + "".join(f'<Label value="{n.title()}"/>' for n in ls.model.classes[1:])
        + "</BitmaskLabels></View>"
    )
    (pred,) = ls.predict([_task(1, _data_uri(data), labels=labels)], label_config=config)
    assert pred["result"]
    seen = set()
    for region in pred["result"]:
        assert region["type"] == "bitmasklabels" and (region["from_name"], region["to_name"]) == ("bm", "pic")
        (label,) = region["value"]["bitmasklabels"]
        url = region["value"]["imageDataURL"]
        assert url.startswith("data:image/png;base64,")
        png = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert png.mode == "RGBA" and png.size == (64, 48)
        rgba = np.asarray(png)
        v = ls.model.classes.index(label.lower())
        assert np.array_equal(rgba[..., 3] > 0, mask == v) and not rgba[..., :3].any()
        seen.add(v)
    assert seen == {int(v) for v in np.unique(mask) if v not in (0, 255)}


def test_health_answers_while_predict_runs(ls: LS) -> None:
    i = _fg_image(ls)
    data, labels = image_bytes(ls.dataset, i), labels_of(ls.dataset, i)
    tasks = [_task(k, _data_uri(data), labels=labels) for k in range(6)]
    done = threading.Event()
    worker = threading.Thread(target=lambda: (ls.predict(tasks), done.set()), daemon=True)
    worker.start()
    times = []
    with httpx.Client(base_url=ls.url, timeout=30, auth=("ls", KEY)) as c:
        while not done.is_set() and len(times) < 20:
            t0 = time.perf_counter()
            assert c.get(f"{PREFIX}/health").status_code == 200
            times.append(time.perf_counter() - t0)
            time.sleep(0.05)
    worker.join(120)
    assert done.is_set() and times
    assert max(times) < 1.0, times  # Label Studio's ML_TIMEOUT_HEALTH, on two shared cores


# --------------------------------------------------------------------------------------------------
# keys off, and health without Redis


def test_health_without_keys_touches_no_redis(model: Model, dataset: Path, tmp_path: Path) -> None:
    """Broker mode on a Redis that is not there: health and webhook still answer, without auth."""
    env = service_env(
        "broker",
        model,
        dataset,
        tmp_path / "results",
        f"hsc-ls-{secrets.token_hex(3)}",
        HSC_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
    )
    proc, url = start_server(env, tmp_path, ready=False)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            t0 = time.perf_counter()
            r = c.get(f"{PREFIX}/health")
            assert r.status_code == 200 and r.json() == {"status": "UP", "model_class": "HSC"}
            assert time.perf_counter() - t0 < 1.0
            assert c.post(f"{PREFIX}/webhook", json={"action": "ANNOTATION_CREATED"}).json() == {}
            assert c.get("/readyz").status_code == 503  # Redis really is away
    finally:
        proc.stop()
