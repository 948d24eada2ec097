"""The two Celery tasks as plain functions: the Redis hand-over around :class:`~.engine.Engine` (keys and
task names in :mod:`hsc.core.queue`). :mod:`.app` registers them; the work itself is in the engine.

* :func:`answer_pseudo_label`: read the uploaded image at ``blob_key(request_id)``, pseudo-label it,
  ``RPUSH`` the result (or ``{"error": {"status", "code", "detail"}}``) to ``reply_key(request_id)``
  with a TTL, and delete the blob, in one transaction. Every outcome is answered, so the API never
  waits for its timeout on an error.
* :func:`run_job_chunk`: :meth:`Engine.run_chunk` over the job records in Redis.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import redis

from hsc.core.jobs import RedisJobStore
from hsc.core.queue import KEY_PREFIX, REPLY_TTL_S, blob_key, reply_key

from .engine import Engine, ItemError

__all__ = ["answer_pseudo_label", "redis_client", "run_job_chunk"]

log = logging.getLogger(__name__)

#: Errors worth a retry of the whole task: the broker or the job store could not be reached.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)

_clients: dict[tuple[int, str], redis.Redis] = {}
_clients_lock = threading.Lock()


def redis_client(url: str) -> redis.Redis:
    """One client per process and URL (a forked child makes its own: connections are not shared)."""
    key = (os.getpid(), url)
    with _clients_lock:
        if key not in _clients:
            _clients[key] = redis.Redis.from_url(url, health_check_interval=30)
        return _clients[key]


def _error(status: int, code: str, detail: str) -> dict[str, Any]:
    return {"error": {"status": status, "code": code, "detail": detail}}


def answer_pseudo_label(
    client: redis.Redis,
    engine: Engine,
    request: dict[str, Any],
    *,
    timeout_errors: tuple[type[BaseException], ...] = (),
) -> dict[str, Any]:
    """Answer one ``hsc.pseudo_label`` request (module docstring); returns ``{request_id, ok, code}``.

    ``timeout_errors`` (a Celery soft time limit) are answered as ``504 timeout``. Redis errors
    propagate (the task retries; the blob is deleted only with the answer, so a retry finds it).
    """
    request_id = str(request.get("request_id", ""))
    data = client.get(blob_key(request_id))
    if data is None:
        reply = _error(504, "timeout", "the uploaded image expired before a worker took the request")
    else:
        try:
            if not isinstance(data, bytes):
                raise TypeError("the Redis client must not decode responses (images are bytes)")
            reply = engine.pseudo_label(request, data)
        except ItemError as e:
            reply = {"error": e.as_dict()}
        except timeout_errors:
            reply = _error(504, "timeout", "the worker's time limit for one image ran out")
        except TRANSIENT_ERRORS:
            raise
        except Exception as e:
            log.exception("request %s: unexpected error", request_id)
            reply = _error(500, "internal", f"{type(e).__name__} in the worker (request {request_id})")
    key = reply_key(request_id)
    with client.pipeline(transaction=True) as pipe:
        pipe.rpush(key, json.dumps(reply))
        pipe.expire(key, REPLY_TTL_S)
        pipe.delete(blob_key(request_id))
        pipe.execute()
    err = reply.get("error")
    return {"request_id": request_id, "ok": err is None, "code": err["code"] if err else None}


def run_job_chunk(
    client: redis.Redis,
    engine: Engine,
    results_dir: Path,
    job_id: str,
    start: int,
    stop: int,
    *,
    passthrough: tuple[type[BaseException], ...] = (),
) -> dict[str, Any]:
    """One ``hsc.run_chunk`` task: items ``start..stop-1`` of a job whose records are in Redis."""
    store = RedisJobStore(client, prefix=KEY_PREFIX)
    return engine.run_chunk(store, Path(results_dir), job_id, int(start), int(stop), passthrough=passthrough)
