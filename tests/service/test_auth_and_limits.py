"""API keys on, and the answers that need no worker: not ready, no worker, timeout, queue full (a broker-mode
API on a queue nobody reads, with a fake heartbeat), and an embedded pool whose model cannot load."""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from svclib import (
    REDIS_URL,
    Model,
    Proc,
    base_env,
    cleanup_redis,
    image_bytes,
    service_env,
    start_server,
    wait_for,
)

from hsc.core.queue import blob_key, worker_key

KEYS = ("key-one", "key-two")
PROBLEM = "application/problem+json"


class Locked:
    def __init__(self, proc: Proc, url: str, queue: str) -> None:
        self.proc, self.url, self.queue = proc, url, queue
        self.client = httpx.Client(base_url=url, timeout=30)
        self.auth = {"X-API-Key": KEYS[0]}


@pytest.fixture(scope="module")
def locked(model: Model, dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Locked]:
    """Broker mode, keys on, nobody reading the queue, 1 s sync timeout, at most 2 queued messages."""
    tmp = tmp_path_factory.mktemp("locked")
    queue = f"hsc-svctest-{secrets.token_hex(4)}"
    env = service_env(
        "broker",
        model,
        dataset,
        tmp / "results",
        queue,
        HSC_API_KEYS=",".join(KEYS),
        HSC_SYNC_TIMEOUT_S="1",
        HSC_QUEUE_MAX="2",
    )
    proc, url = start_server(env, tmp, ready=False)
    s = Locked(proc, url, queue)
    try:
        yield s
    except BaseException:
        print(proc.tail())
        raise
    finally:
        s.client.close()
        proc.stop()
        cleanup_redis(queue, model.id, [f"fake-{queue}"])
        shutil.rmtree(tmp, ignore_errors=True)


def _problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["code"] == code, body
    return body  # type: ignore[no-any-return]


def test_every_route_but_healthz_needs_a_key(locked: Locked) -> None:
    c = locked.client
    assert c.get("/healthz").status_code == 200
    for method, path in [
        ("GET", "/readyz"),
        ("GET", "/models"),
        ("GET", "/metrics"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/jobs"),
        ("GET", "/jobs/job_x"),
        ("POST", "/pseudo-label"),
        ("POST", "/jobs"),
        ("DELETE", "/jobs/job_x"),
        ("GET", "/nowhere"),
    ]:
        r = c.request(method, path)
        _problem(r, 401, "unauthenticated")
        assert r.headers["www-authenticate"].startswith("Bearer"), path
    _problem(c.get("/jobs", headers={"X-API-Key": "key-three"}), 401, "unauthenticated")
    _problem(c.get("/jobs", headers={"Authorization": "Bearer key-on"}), 401, "unauthenticated")
    _problem(c.get("/jobs", headers={"Authorization": "Basic a2V5LW9uZQ=="}), 401, "unauthenticated")
    assert c.get("/jobs", headers={"X-API-Key": KEYS[0]}).status_code == 200
    assert c.get("/jobs", headers={"Authorization": f"Bearer {KEYS[1]}"}).status_code == 200
    assert c.get("/docs", headers=locked.auth).status_code == 200


def test_not_ready_and_no_worker(locked: Locked, dataset: Path) -> None:
    r = locked.client.get("/readyz", headers=locked.auth)
    assert r.status_code == 503 and r.headers["retry-after"]
    body = r.json()
    assert body["ready"] is False and body["checks"]["redis"] == "ok" and body["checks"]["storage"] == "ok"
    assert body["checks"]["workers"].startswith("0 with a model")
    files = {"image": ("a.jpg", image_bytes(dataset), "image/jpeg")}
    r = locked.client.post("/pseudo-label", files=files, data={"labels": "beetle"}, headers=locked.auth)
    _problem(r, 503, "no_worker")
    assert int(r.headers["retry-after"]) > 0
    r = locked.client.post(
        "/jobs", json={"dataset": {"kind": "voc", "path": str(dataset), "split": "val"}}, headers=locked.auth
    )
    _problem(r, 503, "no_worker")
    _problem(locked.client.get("/models", headers=locked.auth), 503, "no_worker")


def test_timeout_then_queue_full(locked: Locked, model: Model, dataset: Path) -> None:
    """A 'worker' that announces itself but never answers: 504 after the sync timeout; the unanswered
    messages fill the queue up to HSC_QUEUE_MAX, then 503 queue_full."""
    r = redis.Redis.from_url(REDIS_URL)
    card = {"id": model.id, "sha256": model.sha256, "classes": list(model.classes), "bg_threshold": 0.3}
    beat = {"hostname": f"fake-{locked.queue}", "queue": locked.queue, "models": [card], "pid": 1}
    r.set(worker_key(f"fake-{locked.queue}"), json.dumps(beat), ex=60)
    other = {**beat, "hostname": "elsewhere", "queue": "another-queue"}  # another queue's worker: not ours
    r.set(worker_key(f"fake-{locked.queue}-other"), json.dumps(other), ex=60)
    try:
        wait_for(lambda: locked.client.get("/readyz", headers=locked.auth).status_code == 200, 10, "ready")
        models = locked.client.get("/models", headers=locked.auth).json()["models"]
        assert [m["id"] for m in models] == [model.id] and models[0]["workers"] == [beat["hostname"]]
        files = {"image": ("a.jpg", image_bytes(dataset), "image/jpeg")}
        for depth in (1, 2):
            t = locked.client.post(
                "/pseudo-label", files=files, data={"labels": "beetle"}, headers=locked.auth
            )
            body = _problem(t, 504, "timeout")
            assert r.get(blob_key(body["request_id"])) is None  # the upload does not linger
            metrics = locked.client.get("/metrics", headers=locked.auth).text
            assert f'hsc_queue_depth{{queue="{locked.queue}"}} {depth}.0' in metrics
        full = locked.client.post(
            "/pseudo-label", files=files, data={"labels": "beetle"}, headers=locked.auth
        )
        _problem(full, 503, "queue_full")
        assert full.headers["retry-after"]
    finally:
        r.delete(worker_key(f"fake-{locked.queue}"), worker_key(f"fake-{locked.queue}-other"))
        r.close()


def test_embedded_pool_that_cannot_load_its_model(tmp_path: Path, dataset: Path) -> None:
    """/readyz says why, and requests get 503 model_loading (not a hang, not a 500)."""
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    env = base_env(
        {"HSC_RESULTS_DIR": str(tmp_path / "results"), "HSC_CHECKPOINTS": str(bad), "HSC_DEVICE": "cpu"}
    )
    proc, url = start_server(env, tmp_path, ready=False)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:

            def failed() -> dict[str, Any] | None:
                body = c.get("/readyz").json()
                return body if body["checks"]["pool"] != "loading the models" else None

            body = wait_for(failed, 60, "the pool to give up", interval=0.2)
            assert body["ready"] is False and "broken.safetensors" in body["checks"]["pool"], body
            files = {"image": ("a.jpg", image_bytes(dataset), "image/jpeg")}
            r = c.post("/pseudo-label", files=files, data={"labels": "beetle"})
            assert "broken.safetensors" in _problem(r, 503, "model_loading")["detail"]
    finally:
        proc.stop()


def test_broker_mode_with_redis_down(tmp_path: Path) -> None:
    """/healthz still answers; /readyz and the routes say the broker is away (503), no 500."""
    env = base_env({"HSC_RESULTS_DIR": str(tmp_path / "results"), "HSC_REDIS_URL": "redis://127.0.0.1:1/0"})
    proc, url = start_server(env, tmp_path, ready=False)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/healthz").json() == {"status": "ok", "mode": "broker"}
            r = c.get("/readyz")
            assert r.status_code == 503 and r.json()["checks"]["redis"].startswith("unreachable"), r.text
            for resp in (c.get("/jobs"), c.get("/jobs/job_x"), c.get("/models")):
                assert _problem(resp, 503, "broker_unavailable")["detail"]
                assert resp.headers["retry-after"]
            assert c.get("/metrics").status_code == 200  # gauges it cannot read are left out
    finally:
        proc.stop()
