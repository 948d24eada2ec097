"""What the API and the workers agree on over Redis: task names, key names, the Celery configuration.

The API never imports the worker's code: it sends tasks by name (``send_task``) and reads the
keys below. Job records have keys of their own (:mod:`hsc.core.jobs`); Celery's result backend is
not used at all (``AsyncResult`` says PENDING for unknown ids, so it cannot be a job record).

Single image, broker mode: the API stores the upload at :func:`blob_key` (with a TTL), sends
:data:`TASK_PSEUDO_LABEL` with the request dict, and waits on :func:`reply_key` (``BLPOP``); the
worker deletes the blob, answers with ``RPUSH`` (result dict, or ``{"error": {...}}``) and sets a
TTL on the reply. Workers announce themselves and their models at :func:`worker_key` (JSON, TTL
a few heartbeats).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "KEY_PREFIX",
    "TASK_PSEUDO_LABEL",
    "TASK_RUN_CHUNK",
    "blob_key",
    "celery_config",
    "reply_key",
    "worker_key",
    "worker_pattern",
]

KEY_PREFIX = "hsc"
TASK_PSEUDO_LABEL = "hsc.pseudo_label"
TASK_RUN_CHUNK = "hsc.run_chunk"
REPLY_TTL_S = 300


def blob_key(request_id: str) -> str:
    return f"{KEY_PREFIX}:blob:{request_id}"


def reply_key(request_id: str) -> str:
    return f"{KEY_PREFIX}:reply:{request_id}"


def worker_key(hostname: str) -> str:
    return f"{KEY_PREFIX}:worker:{hostname}"


def worker_pattern() -> str:
    return f"{KEY_PREFIX}:worker:*"


def celery_config(
    *,
    queue: str,
    visibility_timeout_s: float,
    soft_time_limit_s: float,
    time_limit_s: float,
) -> dict[str, Any]:
    """Celery settings that make the job promises true (docs/product.md D9).

    Late acknowledgement + reject on worker loss: a task whose worker dies is delivered again
    (after ``visibility_timeout_s`` when the whole worker was killed). Prefetch 1: a worker does not
    hoard chunks. JSON only: no pickles cross the broker. No result backend.
    """
    return {
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": queue,
        "task_create_missing_queues": True,
        "task_soft_time_limit": soft_time_limit_s,
        "task_time_limit": time_limit_s,
        "broker_transport_options": {"visibility_timeout": visibility_timeout_s},
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
    }
