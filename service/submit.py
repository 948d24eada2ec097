"""Turning accepted work into a job: the record, the items, the chunks sent to the workers, the view.

Shared by ``POST /jobs`` (datasets and uploads) and ``POST /pseudo-label`` with
``Prefer: respond-async`` (a one-image job).
"""

from __future__ import annotations

import posixpath
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from hsc.core.jobs import TERMINAL, JobItem, new_job_id

from .errors import Problem
from .options import Options, redact_webhook, webhook_host_allowed
from .runner import Runner, chunk_ranges

__all__ = ["job_links", "job_view", "safe_item_id", "start_job"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_item_id(name: str, default: str = "image") -> str:
    """A filename-safe item id (``[A-Za-z0-9._-]``, no leading dot) from a file name."""
    stem = posixpath.splitext(name.replace("\\", "/").rsplit("/", 1)[-1])[0]
    text = _UNSAFE.sub("_", stem).strip("._-")[:100]
    return text or default


def job_links(job_id: str) -> dict[str, str]:
    base = f"/jobs/{job_id}"
    return {
        "self": base,
        "events": f"{base}/events",
        "items": f"{base}/items",
        "archive": f"{base}/archive",
        "cancel": base,
        "resume": f"{base}/resume",
        "retry_failed": f"{base}/retry-failed",
    }


def job_view(job: Mapping[str, Any]) -> dict[str, Any]:
    """The status object of D4: the record as the store gives it, plus ``links`` and ``finished``; a
    webhook's secret is left out."""
    out = dict(job)
    out["links"] = job_links(str(job["id"]))
    out["finished"] = job.get("status") in TERMINAL
    if "webhook" in out:
        out["webhook"] = redact_webhook(out["webhook"])
    return out


def start_job(
    runner: Runner,
    *,
    job_id: str | None = None,
    card: Mapping[str, Any],
    options: Options,
    items: Sequence[JobItem],
    dataset: Mapping[str, Any],
    kind: str,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """Create the job record with its items and send its chunks; returns the job view."""
    settings = runner.settings
    if not items:
        raise Problem("invalid_dataset", "the dataset holds no images")
    if len(items) > settings.max_job_items:
        raise Problem(
            "too_large",
            f"{len(items)} images is over the limit of {settings.max_job_items} per job "
            "(HSC_MAX_JOB_ITEMS); split the dataset",
        )
    if options.webhook is not None and not webhook_host_allowed(options.webhook.url, settings.webhook_hosts):
        raise Problem(
            "forbidden",
            f"webhook.url {options.webhook.url!r}: its host is not one the operator allows "
            f"(HSC_WEBHOOK_HOSTS: {', '.join(settings.webhook_hosts)})",
            extra={"field": "webhook.url"},
        )
    runner.check_queue("chunk")
    jid = job_id or new_job_id()
    record = {
        "id": jid,
        "kind": kind,
        "status": "queued",
        "created_at": time.time(),
        "model": str(card["id"]),
        "model_card": {k: card.get(k) for k in ("id", "sha256", "classes", "bg_threshold", "mode")},
        "options": options.as_dict(str(card["id"])),
        "dataset": dict(dataset),
        "chunk_size": settings.job_chunk,
        "idempotency_key": idempotency_key,
    }
    if options.webhook is not None:
        record["webhook"] = options.webhook.as_record()
    runner.store.create_job(record, items)
    try:
        runner.enqueue_chunks(jid, chunk_ranges(range(len(items)), settings.job_chunk))
    except BaseException:
        # no half-sent job: chunks already sent find no record and end at once
        runner.store.delete_job(jid)
        raise
    runner.job_queued(jid)
    job = runner.store.get_job(jid)
    return job_view(job if job is not None else record)
