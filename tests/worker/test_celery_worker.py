"""A real Celery worker process (``python -m hsc.worker.main``, solo pool) against the real Redis
(db 15, a random queue, a model id of its own), driven the way the API drives it: tasks sent by name,
images and replies through the :mod:`hsc.core.queue` keys, job records in :class:`RedisJobStore`.
Everything the tests make in Redis is deleted afterwards."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
from celery import Celery
from PIL import Image
from workerlib import REDIS_URL, Ckpt, create_job, encode, rgb, wait_for, write_images

from hsc.core.encoders import mask_from_base64_png
from hsc.core.jobs import RedisJobStore, job_dir
from hsc.core.queue import (
    REPLY_TTL_S,
    TASK_PSEUDO_LABEL,
    TASK_RUN_CHUNK,
    blob_key,
    celery_config,
    reply_key,
    worker_key,
)

HEARTBEAT_S = 0.5


@dataclass
class Worker:
    proc: subprocess.Popen
    hostname: str
    queue: str
    results: Path
    log: Path
    app: Celery
    r: redis.Redis

    def send(self, task: str, *args) -> None:
        self.app.send_task(task, args=list(args), queue=self.queue)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


def _cleanup(r: redis.Redis, queue: str, hostname: str) -> None:
    names = [queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
    names += [f"{queue}\x06\x16{p}" for p in (3, 6, 9)]  # kombu's priority lists
    r.delete(*names, worker_key(hostname), *r.keys(worker_key(hostname) + ":*"))


@contextmanager
def running_worker(ckpt: Ckpt, tmp: Path, pool: str = "solo") -> Iterator[Worker]:
    """``python -m hsc.worker.main`` on a queue of its own, until the heartbeat says it is ready."""
    queue = f"hsc-wtest-{secrets.token_hex(4)}"
    hostname = f"wtest-{secrets.token_hex(4)}@localhost"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSC_")}
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        HSC_REDIS_URL=REDIS_URL,
        HSC_QUEUE=queue,
        HSC_CHECKPOINTS=str(ckpt.path),
        HSC_RESULTS_DIR=str(tmp / "results"),
        HSC_DEVICE="cpu",
        HSC_CRF_WORKERS="0",
        HSC_MAX_PIXELS="1000000",
        HSC_HEARTBEAT_S=str(HEARTBEAT_S),
        HSC_WORKER_POOL=pool,
        HSC_LOG_LEVEL="info",
    )
    log = tmp / f"worker-{pool}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hsc.worker.main", "--hostname", hostname],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    app = Celery("wtest", broker=REDIS_URL, set_as_current=False)
    app.conf.update(
        celery_config(queue=queue, visibility_timeout_s=60, soft_time_limit_s=60, time_limit_s=90)
    )
    r = redis.Redis.from_url(REDIS_URL)
    w = Worker(proc, hostname, queue, tmp / "results", log, app, r)
    pattern = worker_key(hostname) + (":*" if pool == "prefork" else "")
    try:
        wait_for(lambda: proc.poll() is not None or r.keys(pattern), 90, "the worker's heartbeat")
        assert proc.poll() is None, w.logs()
        yield w
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        _cleanup(r, queue, hostname)
        app.close()
        r.close()


@pytest.fixture(scope="module")
def worker(ckpt: Ckpt, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    with running_worker(ckpt, tmp_path_factory.mktemp("celery")) as w:
        yield w


def round_trip(w: Worker, request: dict, image: bytes, timeout: float = 60) -> dict:
    rid = request["request_id"]
    w.r.set(blob_key(rid), image, ex=120)
    try:
        w.send(TASK_PSEUDO_LABEL, request)
        got = w.r.blpop([reply_key(rid)], timeout=timeout)
        assert got is not None, f"no reply in {timeout} s\n{w.logs()}"
        assert not w.r.exists(blob_key(rid))  # the worker deleted the upload
        return json.loads(got[1])
    finally:
        w.r.delete(blob_key(rid), reply_key(rid))


def request(**kw) -> dict:
    req = {"request_id": f"req_{secrets.token_hex(6)}", "model": None, "labels": [0, 2],
           "labels_requested": ["road", "tree"], "crf": True, "bg_threshold": None,
           "outputs": ["mask", "cams"]}  # fmt: skip
    req.update(kw)
    return req


def test_heartbeat_announces_the_models(worker, ckpt):
    raw = worker.r.get(worker_key(worker.hostname))
    beat = json.loads(raw)
    assert beat["hostname"] == worker.hostname and beat["pid"] == worker.proc.pid
    assert beat["device"] == "cpu" and beat["queue"] == worker.queue and beat["pool"] == "solo"
    (card,) = beat["models"]
    assert (card["id"], card["sha256"], card["classes"]) == (
        ckpt.id,
        ckpt.sha256,
        ["background", "road", "car", "tree"],
    )
    ttl = worker.r.pttl(worker_key(worker.hostname))
    assert 0 < ttl <= 3000 * HEARTBEAT_S
    ts = beat["ts"]
    wait_for(
        lambda: json.loads(worker.r.get(worker_key(worker.hostname)))["ts"] > ts, 10, "a newer heartbeat"
    )


def test_single_image_round_trip(worker, ckpt):
    img = rgb()
    res = round_trip(worker, request(), encode(img, "JPEG", orientation=8))
    assert "error" not in res, res
    assert res["model"]["id"] == ckpt.id and res["model"]["sha256"] == ckpt.sha256
    assert res["image"] == {"width": 40, "height": 56, "format": "JPEG", "exif_orientation_applied": 8}
    assert mask_from_base64_png(res["mask"]["data"]).shape == (56, 40)
    assert set(res["cams"]) == {"road", "tree"} and res["settings"]["crf"] is True
    # and the reply key had its TTL (checked on a second reply left in place)
    rid = f"req_{secrets.token_hex(6)}"
    worker.r.set(blob_key(rid), encode(img), ex=120)
    try:
        worker.send(TASK_PSEUDO_LABEL, request(request_id=rid))
        wait_for(lambda: worker.r.exists(reply_key(rid)), 60, "the reply")
        assert 0 < worker.r.ttl(reply_key(rid)) <= REPLY_TTL_S
    finally:
        worker.r.delete(blob_key(rid), reply_key(rid))


def test_bad_requests_are_answered_with_their_error(worker):
    data = encode(rgb())
    cases = [
        (request(), data[: len(data) // 2], 422, "corrupt_image"),
        (request(), b"%PDF-1.4 not an image", 415, "unsupported_media"),
        (request(labels=[]), data, 422, "no_labels"),
        (request(model="other-model"), data, 404, "not_found"),
    ]
    for req, body, status, code in cases:
        res = round_trip(worker, req, body)
        assert res["error"]["status"] == status and res["error"]["code"] == code, res
    # an upload that expired before the worker took it
    req = request()
    worker.send(TASK_PSEUDO_LABEL, req)
    got = worker.r.blpop([reply_key(req["request_id"])], timeout=60)
    worker.r.delete(reply_key(req["request_id"]))
    assert json.loads(got[1])["error"]["code"] == "timeout"


def test_job_chunks_write_the_results_and_a_corrupt_image_fails_alone(worker, ckpt, tmp_path):
    store = RedisJobStore(worker.r)
    images = write_images(tmp_path / "images", 6, corrupt=[3])
    job_id, items = create_job(
        store, images, ckpt.id, options={"crf": False, "outputs": ["mask", "heatmaps"]}
    )
    try:
        worker.send(TASK_RUN_CHUNK, job_id, 0, 4)
        worker.send(TASK_RUN_CHUNK, job_id, 4, 6)
        worker.send(TASK_RUN_CHUNK, job_id, 0, 4)  # a duplicate delivery changes nothing
        job = wait_for(
            lambda: (j := store.get_job(job_id)) and j["status"] == "partially_succeeded" and j,
            90,
            "the job to finish",
        )
        assert job["progress"] == {"total": 6, "done": 5, "failed": 1, "skipped": 0, "percent": 100.0}
        assert (
            job["errors_sample"][0]["item"] == "item-3" and job["errors_sample"][0]["code"] == "corrupt_image"
        )
        assert job["started_at"] <= job["finished_at"]
        jd = job_dir(worker.results, job_id)
        for it in items:
            exists = (jd / "items" / f"{it.id}.json").is_file()
            assert exists is (it.index != 3)
            if exists:
                res = json.loads((jd / "items" / f"{it.id}.json").read_text())
                assert res["mask"]["path"] == f"masks/{it.id}.png" and res["item"]["index"] == it.index
                assert np.array(Image.open(jd / res["mask"]["path"])).shape == (40, 56)
                assert (jd / "cams" / f"{it.id}.npz").is_file()
                assert set(res["heatmaps"]) == {"road", "tree"}
        time.sleep(1.0)  # let the duplicate chunk run too
        assert store.get_job(job_id)["progress"]["done"] == 5
        beat = json.loads(worker.r.get(worker_key(worker.hostname)))
        assert beat["images_processed"] >= 5
    finally:
        store.delete_job(job_id)


def test_cancelled_job_chunk_does_nothing(worker, ckpt, tmp_path):
    store = RedisJobStore(worker.r)
    job_id, _ = create_job(store, write_images(tmp_path / "images", 2), ckpt.id, status="cancelling")
    try:
        store.request_cancel(job_id)
        worker.send(TASK_RUN_CHUNK, job_id, 0, 2)
        wait_for(lambda: store.get_job(job_id)["status"] == "cancelled", 60, "the cancel")
        assert store.get_job(job_id)["progress"]["done"] == 0
        assert not job_dir(worker.results, job_id).exists()
    finally:
        store.delete_job(job_id)


def test_warm_shutdown_removes_the_heartbeat(worker):
    """Last test of the module: SIGTERM stops the worker cleanly and its heartbeat key goes at once."""
    os.killpg(worker.proc.pid, signal.SIGTERM)
    assert worker.proc.wait(30) == 0, worker.logs()
    assert not worker.r.exists(worker_key(worker.hostname))


def test_prefork_children_load_the_model_after_the_fork(ckpt, tmp_path):
    """Under prefork the parent never loads the model; each child does, and announces itself."""
    with running_worker(ckpt, tmp_path, pool="prefork") as w:
        (key,) = w.r.keys(worker_key(w.hostname) + ":*")
        beat = json.loads(w.r.get(key))
        assert beat["pool"] == "prefork" and beat["pid"] != w.proc.pid
        assert beat["models"][0]["id"] == ckpt.id
        assert not w.r.exists(worker_key(w.hostname))  # the parent holds no model
        res = round_trip(w, request(), encode(rgb()))
        assert "error" not in res and res["model"]["id"] == ckpt.id
        os.killpg(w.proc.pid, signal.SIGTERM)
        assert w.proc.wait(30) == 0, w.logs()
        assert not w.r.keys(worker_key(w.hostname) + "*")
