"""The Celery application of the workers: the two tasks under their :mod:`hsc.core.queue` names, the
model loaded once per worker process, and a heartbeat in Redis that tells the API who serves what.

Process model (docs/product.md D9): the default ``solo`` pool runs tasks in the worker's main process,
which loads the models before it takes any task (one process per GPU; CUDA is never forked).
Under ``prefork`` (CPU) each child loads its own copy after the fork (``worker_process_init``, in a
background thread so the child answers Celery's start-up check in time) and the parent never touches
the model. ``threads`` share the main process's one engine.

Heartbeat: the process that holds the engine sets ``worker_key(name)`` to JSON ``{hostname, pid,
device, models (cards), started_at, images_processed, ts, queue, pool}`` every ``heartbeat_s`` with a
TTL of three beats, and deletes it on a clean shutdown (``name`` is the worker's hostname, with
``:<pid>`` for a prefork child). The key appears only once the models are loaded, so it also means
"ready".

Retries: only for transient errors (Redis unreachable); a bad image is an answer, not a failure.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

import redis
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import (
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from hsc.core.queue import TASK_PSEUDO_LABEL, TASK_RUN_CHUNK, celery_config, worker_key
from hsc.core.settings import Settings

from . import tasks
from .engine import Engine, get_engine

__all__ = ["Heartbeat", "make_celery"]

log = logging.getLogger(__name__)


class Heartbeat:
    """A daemon thread that keeps ``worker_key(name)`` alive while this process serves its models."""

    def __init__(self, client: redis.Redis, name: str, engine: Engine, settings: Settings, pool: str) -> None:
        self.client = client
        self.key = worker_key(name)
        self.name = name
        self.engine = engine
        self.interval = float(settings.heartbeat_s)
        self.queue = settings.queue
        self.pool = pool
        self.started_at = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"hsc-heartbeat-{name}", daemon=True)

    def payload(self) -> dict[str, Any]:
        cards = self.engine.cards()
        return {
            "hostname": self.name,
            "pid": os.getpid(),
            "device": cards[0]["device"] if cards else None,
            "models": cards,
            "started_at": self.started_at,
            "images_processed": self.engine.images_processed,
            "ts": time.time(),
            "queue": self.queue,
            "pool": self.pool,
        }

    def beat(self) -> None:
        self.client.set(self.key, json.dumps(self.payload()), px=max(1, int(3000 * self.interval)))

    def _run(self) -> None:
        while True:
            try:
                self.beat()
            except redis.RedisError as e:  # Redis away for a moment: the key expires, the API sees it
                log.warning("heartbeat %s: %s", self.key, e)
            if self._stop.wait(self.interval):
                return

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self.client.delete(self.key)
        except redis.RedisError as e:
            log.warning("heartbeat %s: could not delete the key: %s", self.key, e)


# What the signal handlers of this process need (one worker app per process).
_state: dict[str, Any] = {"settings": None, "hostname": None, "pool": None, "heartbeat": None}


def _pool_name(pool_cls: Any) -> str:
    text = (getattr(pool_cls, "__module__", "") or str(pool_cls)).lower()
    for name in ("prefork", "solo", "threads", "eventlet", "gevent"):
        if name in text:
            return name
    return text


def _start_heartbeat(name: str) -> None:
    settings: Settings = _state["settings"]
    engine = get_engine(settings)
    hb = Heartbeat(tasks.redis_client(str(settings.redis_url)), name, engine, settings, str(_state["pool"]))
    _state["heartbeat"] = hb.start()
    log.info("worker %s serves %s", name, ", ".join(c["id"] for c in engine.cards()))


def _stop_heartbeat() -> None:
    hb: Heartbeat | None = _state["heartbeat"]
    _state["heartbeat"] = None
    if hb is not None:
        hb.stop()


@worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    if _state["settings"] is None:
        return
    _state["hostname"] = getattr(sender, "hostname", None) or "hsc"
    _state["pool"] = _pool_name(getattr(sender, "pool_cls", ""))
    if _state["pool"] != "prefork":  # tasks run in this process: load before consuming
        get_engine(_state["settings"])


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    if _state["settings"] is not None and _state["pool"] != "prefork":
        _start_heartbeat(str(_state["hostname"]))


@worker_process_init.connect
def _on_child_init(**_: Any) -> None:
    # the solo pool sends this signal in the main process too: only a prefork child loads here
    if _state["settings"] is None or _state["pool"] != "prefork":
        return
    _state["heartbeat"] = None  # the parent's thread did not survive the fork
    name = f"{_state['hostname']}:{os.getpid()}"

    def load() -> None:
        try:
            _start_heartbeat(name)
        except Exception:
            log.exception("worker child %s could not load its models", name)

    threading.Thread(target=load, name="hsc-load", daemon=True).start()


@worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    _stop_heartbeat()


@worker_process_shutdown.connect
def _on_child_shutdown(**_: Any) -> None:
    _stop_heartbeat()


def make_celery(settings: Settings) -> Celery:
    """The worker app of ``settings`` (broker ``settings.redis_url``), with both tasks registered."""
    if not settings.redis_url:
        raise ValueError("a Celery worker needs a broker: set HSC_REDIS_URL (e.g. redis://localhost:6379/0)")
    app = Celery("hsc", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        celery_config(
            queue=settings.queue,
            visibility_timeout_s=settings.visibility_timeout_s,
            soft_time_limit_s=settings.task_soft_time_limit_s,
            time_limit_s=settings.task_time_limit_s,
        )
    )
    _state["settings"] = settings
    retry: dict[str, Any] = dict(
        autoretry_for=tasks.TRANSIENT_ERRORS, retry_backoff=True, retry_backoff_max=60, max_retries=10
    )

    @app.task(name=TASK_PSEUDO_LABEL, **retry)
    def pseudo_label(request: dict[str, Any]) -> dict[str, Any]:
        return tasks.answer_pseudo_label(
            tasks.redis_client(str(settings.redis_url)),
            get_engine(settings),
            request,
            timeout_errors=(SoftTimeLimitExceeded,),
        )

    @app.task(name=TASK_RUN_CHUNK, **retry)
    def run_chunk(job_id: str, start: int, stop: int) -> dict[str, Any]:
        return tasks.run_job_chunk(
            tasks.redis_client(str(settings.redis_url)),
            get_engine(settings),
            settings.results_dir,
            job_id,
            start,
            stop,
            passthrough=(SoftTimeLimitExceeded,),
        )

    return app
