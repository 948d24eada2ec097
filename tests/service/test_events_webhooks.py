"""Job events (``GET /jobs/{id}/events``, server-sent events) and job webhooks, against a real uvicorn
server in embedded mode and in broker mode (Redis + a real Celery worker). Webhooks are received by a
small HTTP server in this process that records every request and can answer 500 first."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from svclib import Model, Service, image_bytes, running_service, upload_zip, wait_for

from hsc.service.options import webhook_host_allowed

PROBLEM = "application/problem+json"
SECRET = "s3cr3t-for-tests"
PROGRESS_S = 1.0


# --------------------------------------------------------------------------------------------------
# helpers


class Receiver:
    """An HTTP server in a thread that records the webhook POSTs; answers ``fail_first`` 500s first."""

    def __init__(self, fail_first: int = 0) -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail_left = fail_first
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with outer.lock:
                    status = 500 if outer.fail_left > 0 else 200
                    outer.fail_left -= 1
                    outer.requests.append(
                        {
                            "at": time.monotonic(),
                            "path": self.path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": body,
                            "status": status,
                        }
                    )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def ok(self, path: str) -> list[dict[str, Any]]:
        """The deliveries to ``path`` answered 200, with their parsed bodies, in arrival order."""
        with self.lock:
            got = [dict(r) for r in self.requests if r["path"] == path and r["status"] == 200]
        for r in got:
            r["json"] = json.loads(r["body"])
        return got

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=1)
    yield r
    r.close()


@pytest.fixture(scope="module", params=["embedded", "broker"])
def svc(
    request: pytest.FixtureRequest, model: Model, dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    mode = request.param
    tmp = tmp_path_factory.mktemp(f"events-{mode}")
    extra = {
        "HSC_WEBHOOK_PROGRESS_INTERVAL_S": str(PROGRESS_S),
        "HSC_WEBHOOK_ATTEMPTS": "4",
        "HSC_WEBHOOK_HOSTS": "127.0.0.0/8,localhost,*.hooks.example",  # the receivers: 127.0.0.1
    }
    with running_service(mode, model, dataset, tmp, **extra) as s:
        yield s


def archive_of(dataset: Path, n: int, copies: int = 1, broken: bool = False) -> bytes:
    """An upload of ``n`` images, each listed ``copies`` times (under its own id), plus a cut-off JPEG."""
    base = upload_zip(dataset, n)
    with zipfile.ZipFile(io.BytesIO(base)) as z:
        files = {name: z.read(name) for name in z.namelist() if name != "manifest.jsonl"}
        lines = [json.loads(x) for x in z.read("manifest.jsonl").decode().splitlines()]
    manifest = [{**rec, "id": f"{rec['id']}-{c}"} for c in range(copies) for rec in lines]
    if broken:
        files["JPEGImages/broken.jpg"] = image_bytes(dataset, 0)[:300]
        bad = {"id": "broken", "image": "JPEGImages/broken.jpg", "labels": ["owl"]}
        manifest.insert(len(manifest) // 2, bad)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("manifest.jsonl", "".join(json.dumps(m) + "\n" for m in manifest))
    return buf.getvalue()


def post_job(svc: Service, archive: bytes, options: dict[str, Any]) -> httpx.Response:
    return svc.client.post(
        "/jobs",
        files={"archive": ("data.zip", archive, "application/zip")},
        data={"options": json.dumps(options)},
    )


def read_events(
    svc: Service, job_id: str, headers: dict[str, str] | None = None, timeout: float = 120
) -> list[dict[str, Any]]:
    """Every event of the stream, until the server ends it: ``{"id", "event", "data"}``."""
    out: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    with httpx.Client(base_url=svc.url, timeout=timeout) as client:
        with client.stream("GET", f"/jobs/{job_id}/events", headers=headers or {}) as r:
            assert r.status_code == 200, r.read()
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if not line:
                    if "event" in current:
                        out.append(current)
                    current = {}
                elif line.startswith(":"):
                    continue
                else:
                    name, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if name == "data":
                        current["data"] = json.loads(value)
                    elif name in ("event", "id"):
                        current[name] = value
    return out


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM), r.headers
    body = r.json()
    assert body["code"] == code, body
    return body  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------------
# server-sent events


def test_event_stream_of_a_job(svc: Service) -> None:
    r = post_job(svc, archive_of(svc.dataset, 10, copies=2, broken=True), {"crf": False})
    assert r.status_code == 202, r.text
    jid = r.json()["id"]
    assert r.json()["links"]["events"] == f"/jobs/{jid}/events"
    events = read_events(svc, jid)
    names = [e["event"] for e in events]
    assert names[0] == "status" and names[-1] == "completed", names
    assert set(names) <= {"status", "progress", "item_failed", "completed"}, names
    assert events[0]["data"]["id"] == jid and "links" in events[0]["data"]
    assert all(e.get("id") for e in events)  # every event has an id
    final = events[-1]["data"]
    assert final["status"] == "partially_succeeded" and final["progress"]["done"] == 20
    assert final == {**svc.job(jid), "rate_images_per_s": final["rate_images_per_s"], "eta_s": final["eta_s"]}
    failed = [e["data"] for e in events if e["event"] == "item_failed"]
    if events[0]["data"]["progress"]["failed"] == 0:  # failed after the stream began: reported
        assert [(f["id"], f["code"]) for f in failed] == [("broken", "corrupt_image")]
    # the counts only grow
    counts = [
        (p["done"], p["failed"], p["skipped"])
        for e in events
        if e["event"] in ("status", "progress", "completed")
        for p in [e["data"]["progress"]]
    ]
    for a, b in zip(counts, counts[1:]):
        assert all(y >= x for x, y in zip(a, b)), counts

    # a finished job: its status and the final event at once
    again = read_events(svc, jid, timeout=10)
    assert [e["event"] for e in again] == ["status", "completed"]
    # reconnecting with an id from before the failure replays it
    resumed = read_events(svc, jid, headers={"Last-Event-ID": "0.0"}, timeout=10)
    assert [e["event"] for e in resumed] == ["status", "item_failed", "completed"]
    assert resumed[1]["data"]["id"] == "broken" and resumed[1]["data"]["code"] == "corrupt_image"


def test_event_stream_unknown_job(svc: Service) -> None:
    assert_problem(svc.client.get("/jobs/job_nope/events"), 404, "not_found")
    assert_problem(svc.client.get("/jobs/..%2F..%2Fetc/events"), 404, "not_found")


# --------------------------------------------------------------------------------------------------
# webhooks


def check_deliveries(got: list[dict[str, Any]], jid: str) -> list[str]:
    """Every delivery signed, named in its header, about ``jid``; returns the event names."""
    for d in got:
        h = d["headers"]
        expected = "sha256=" + hmac.new(SECRET.encode(), d["body"], hashlib.sha256).hexdigest()
        assert hmac.compare_digest(h["x-hsc-signature"], expected), h
        assert h["x-hsc-event"] == d["json"]["event"] and h["x-hsc-delivery"]
        assert h["content-type"] == "application/json"
        assert d["json"]["job"]["id"] == jid and d["json"]["sent_at"] > 0
        assert SECRET not in d["body"].decode()
        assert d["json"]["job"]["webhook"]["has_secret"] is True
    return [d["json"]["event"] for d in got]


def test_webhooks_signed_retried_throttled_and_once(svc: Service, receiver: Receiver) -> None:
    hook = {"url": receiver.url + "/hook", "events": ["started", "progress", "completed"], "secret": SECRET}
    r = post_job(svc, archive_of(svc.dataset, 20, copies=3), {"crf": False, "webhook": hook})
    assert r.status_code == 202, r.text
    jid = r.json()["id"]
    shown = svc.job(jid)
    assert shown["webhook"] == {"url": hook["url"], "events": hook["events"], "has_secret": True}
    assert SECRET not in svc.client.get(f"/jobs/{jid}").text
    assert SECRET not in svc.client.get("/jobs").text

    # a client that goes away: the stream stops, nothing else is disturbed
    with httpx.Client(base_url=svc.url, timeout=30) as client:
        with client.stream("GET", f"/jobs/{jid}/events") as stream:
            assert next(stream.iter_lines()).startswith(("retry:", "id:", "event:"))
    job = svc.wait_job(jid, timeout=180)
    assert job["status"] == "succeeded", job
    wait_for(lambda: any(d["json"]["event"] == "completed" for d in receiver.ok("/hook")), 30, "completed")
    time.sleep(2.0)  # nothing more may come
    got = receiver.ok("/hook")
    names = check_deliveries(got, jid)
    assert names[0] == "started" and names[-1] == "completed" and names.count("completed") == 1, names
    assert names.count("started") == 1 and set(names[1:-1]) <= {"progress"}, names
    # the first try of "started" got a 500 and was tried again, with the same delivery id
    first = receiver.requests[0]
    assert first["status"] == 500 and json.loads(first["body"])["event"] == "started"
    assert first["headers"]["x-hsc-delivery"] == got[0]["headers"]["x-hsc-delivery"]
    # progress: counts that grow, at most one per interval
    progress = [d for d in got if d["json"]["event"] == "progress"]
    done = [d["json"]["job"]["progress"]["done"] for d in progress]
    assert done == sorted(done) and len(set(done)) == len(done), done
    gaps = [b["at"] - a["at"] for a, b in zip(progress, progress[1:])]
    assert all(g >= PROGRESS_S * 0.8 for g in gaps), gaps
    final = got[-1]["json"]["job"]
    assert final["status"] == "succeeded" and final["progress"]["done"] == 60
    assert svc.api is not None and "Traceback" not in svc.api.tail(20000)


def test_webhook_survives_an_api_restart(svc: Service, receiver: Receiver) -> None:
    """Broker mode: the worker goes on while the API is down; the new API delivers ``completed``."""
    if svc.mode != "broker":
        pytest.skip("an embedded restart costs a model load; the dispatcher is the same code")
    hook = {"url": receiver.url + "/restart", "events": ["completed"], "secret": SECRET}
    r = post_job(svc, archive_of(svc.dataset, 20, copies=2), {"crf": False, "webhook": hook})
    assert r.status_code == 202, r.text
    jid = r.json()["id"]
    svc.restart_api()
    svc.wait_ready()
    assert svc.wait_job(jid, timeout=180)["status"] == "succeeded"
    wait_for(lambda: receiver.ok("/restart"), 30, "the completed webhook")
    svc.restart_api()  # a second start finds it sent already
    svc.wait_ready()
    time.sleep(2.0)
    assert check_deliveries(receiver.ok("/restart"), jid) == ["completed"]


def test_webhook_client_errors_are_not_retried(svc: Service) -> None:
    rec = Receiver(fail_first=0)
    try:
        # a 404 from the receiver: one try, and the job is untouched
        hook = {"url": rec.url.replace("127.0.0.1", "localhost") + "/x", "events": ["completed"]}
        r = post_job(svc, archive_of(svc.dataset, 2), {"crf": False, "webhook": hook})
        assert r.status_code == 202, r.text
        assert svc.job(r.json()["id"])["webhook"]["has_secret"] is False
        assert svc.wait_job(r.json()["id"])["status"] == "succeeded"
        wait_for(lambda: rec.requests, 30, "a delivery")
        assert "x-hsc-signature" not in rec.requests[0]["headers"]  # no secret, no signature
    finally:
        rec.close()


BAD_WEBHOOKS = [
    ({"url": "ftp://example.com/x"}, "webhook.url"),
    ({"url": "example.com/hook"}, "webhook.url"),
    ({"url": "http://"}, "webhook.url"),
    ({"url": "https://example.com/h", "events": ["finished"]}, "webhook.events"),
    ({"url": "https://example.com/h", "events": []}, "webhook.events"),
    ({"url": "https://example.com/h", "secret": 12}, "webhook.secret"),
    ({"url": "https://example.com/h", "retries": 3}, "webhook"),
    ("https://example.com/h", "webhook"),
]


def test_bad_webhook_options(svc: Service) -> None:
    upload = archive_of(svc.dataset, 1)
    dataset = {"kind": "manifest", "path": str(svc.dataset / "manifest_val.jsonl")}
    for webhook, field in BAD_WEBHOOKS:
        multipart = post_job(svc, upload, {"webhook": webhook})
        assert assert_problem(multipart, 422, "invalid_option")["field"] == field, webhook
        r = svc.client.post("/jobs", json={"dataset": dataset, "options": {"webhook": webhook}})
        assert assert_problem(r, 422, "invalid_option")["field"] == field, webhook


def test_webhook_hosts_the_operator_does_not_allow_are_refused(svc: Service) -> None:
    upload = archive_of(svc.dataset, 1)
    before = len(svc.client.get("/jobs", params={"limit": 1000}).json()["jobs"])
    for url in ("https://example.com/h", "http://192.168.1.5/h", "https://hooks.example/h"):
        body = assert_problem(post_job(svc, upload, {"webhook": {"url": url}}), 403, "forbidden")
        assert body["field"] == "webhook.url" and "HSC_WEBHOOK_HOSTS" in body["detail"], body
    assert len(svc.client.get("/jobs", params={"limit": 1000}).json()["jobs"]) == before  # no job made


@pytest.mark.parametrize(
    ("url", "allowed", "ok"),
    [
        ("https://a.example.org/x", [], True),  # no list: any host
        ("https://a.example.org/x", ["A.Example.org"], True),
        ("https://a.example.org./x", ["a.example.org"], True),
        ("https://b.example.org/x", ["a.example.org"], False),
        ("https://a.example.org/x", ["*.example.org"], True),
        ("https://x.a.example.org/x", ["*.example.org"], True),
        ("https://example.org/x", ["*.example.org"], False),  # the apex is not a subdomain
        ("https://badexample.org/x", ["*.example.org"], False),
        ("http://10.1.2.3:8080/x", ["10.0.0.0/8"], True),
        ("http://11.1.2.3/x", ["10.0.0.0/8"], False),
        ("http://[::1]:9000/x", ["::1"], True),
        ("http://127.0.0.1/x", ["localhost"], False),  # names are never resolved
        ("http://localhost/x", ["127.0.0.1"], False),
        ("http://10.0.0.1/x", ["*.10.0.0.1"], False),
    ],
)
def test_webhook_host_allowed(url: str, allowed: list[str], ok: bool) -> None:
    assert webhook_host_allowed(url, allowed) is ok


def test_a_stored_webhook_to_a_host_no_longer_allowed_is_not_sent(tmp_path: Path) -> None:
    """A job accepted before the operator set HSC_WEBHOOK_HOSTS: its deliveries are dropped, unsent."""
    import asyncio

    from hsc.core.jobs import FileJobStore
    from hsc.core.settings import Settings
    from hsc.service.webhooks import WebhookDispatcher

    rec = Receiver()
    job = {"id": "job_x", "status": "succeeded", "progress": {"total": 1, "done": 1, "failed": 0}}

    async def deliveries(allowed: list[str]) -> bool:
        settings = Settings(results_dir=tmp_path, webhook_hosts=allowed, webhook_attempts=1)
        d = WebhookDispatcher(FileJobStore(tmp_path / "state"), settings)
        await d.start()
        try:
            return await d.deliver({"url": rec.url + "/late"}, "completed", job)
        finally:
            await d.close()

    try:
        assert asyncio.run(deliveries(["10.0.0.0/8"])) is False
        assert rec.requests == []
        assert asyncio.run(deliveries(["127.0.0.1"])) is True
        assert len(rec.requests) == 1
    finally:
        rec.close()
