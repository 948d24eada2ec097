"""``GET /jobs/{id}/events``: a job as server-sent events, read by polling the job store.

Workers in other processes update the store, so the stream reads the job every :data:`POLL_S`
(one ``get_job``, plus the failed items when their count grew) and sends:

- ``status`` first: the same object as ``GET /jobs/{id}``;
- ``progress`` (``{status, progress, rate_images_per_s, eta_s}``) when the counts or the status
  changed, at most every :data:`PROGRESS_MIN_S`;
- ``item_failed`` (``{index, id, code, detail}``) for each item that failed since the stream began;
- a final ``completed`` (succeeded or partially succeeded), ``failed`` or ``cancelled`` with the job
  object, after which the stream ends.

Every event has an ``id``: ``<items processed>.<items failed>``. A client that reconnects with
``Last-Event-ID`` gets the ``status`` snapshot, then ``item_failed`` for every failed item when more
failed than its id says (so none is missed; an item may come twice). A comment line keeps the
connection open every :data:`KEEPALIVE_S`; the stream stops when the client goes away.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from starlette.requests import Request

from hsc.core.jobs import TERMINAL, JobStore

from .submit import job_view

__all__ = ["FINAL_EVENTS", "job_events", "sse"]

POLL_S = 0.5
PROGRESS_MIN_S = 0.5
KEEPALIVE_S = 15.0
#: The most failed items one stream reports one by one (the rest: GET /jobs/{id}/items?status=failed).
MAX_ITEM_EVENTS = 10_000
#: The final event of each terminal status.
FINAL_EVENTS = {
    "succeeded": "completed",
    "partially_succeeded": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
}


def sse(event: str, data: Any, event_id: str | None = None) -> bytes:
    """One event in the text/event-stream format (the data is one JSON line)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _event_id(job: dict[str, Any]) -> str:
    p = job["progress"]
    return f"{int(p['done']) + int(p['failed']) + int(p['skipped'])}.{int(p['failed'])}"


def _seen_failures(last_event_id: str | None) -> int | None:
    """How many failed items a reconnecting client had heard of (None: a new stream)."""
    if not last_event_id:
        return None
    try:
        return int(last_event_id.strip().rsplit(".", 1)[1])
    except (IndexError, ValueError):
        return 0


def _progress(job: dict[str, Any]) -> dict[str, Any]:
    return {k: job.get(k) for k in ("id", "status", "progress", "rate_images_per_s", "eta_s")}


def _failed_items(store: JobStore, job_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < MAX_ITEM_EVENTS:
        page = store.item_states(job_id, status="failed", start=len(out), limit=1000)
        out += page
        if len(page) < 1000:
            break
    return out


async def job_events(
    store: JobStore,
    job: dict[str, Any],
    request: Request,
    last_event_id: str | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[bytes]:
    """The event stream of ``job`` (as ``store.get_job`` gave it, for the first event)."""
    job_id = str(job["id"])
    yield b"retry: 2000\n\n" + sse("status", job_view(job), _event_id(job))
    seen: set[int] = set()
    heard = _seen_failures(last_event_id)
    failed = int(job["progress"]["failed"])
    if failed and (heard is None or heard >= failed):  # already known: only newer ones are sent
        seen = {int(it["index"]) for it in await anyio.to_thread.run_sync(_failed_items, store, job_id)}
    last_counts = (job["status"], job["progress"])
    progress_at = wrote_at = clock()
    first = True
    while True:
        if not first:
            await anyio.sleep(POLL_S)
            if await request.is_disconnected():
                return
            fresh = await anyio.to_thread.run_sync(store.get_job, job_id)
            if fresh is None:  # purged (only a finished job can be) or lost
                yield sse("failed", {"id": job_id, "detail": "the job is gone"}, _event_id(job))
                return
            job = fresh
        first = False
        chunks: list[bytes] = []
        if int(job["progress"]["failed"]) > len(seen) and len(seen) < MAX_ITEM_EVENTS:
            for it in await anyio.to_thread.run_sync(_failed_items, store, job_id):
                if int(it["index"]) not in seen:
                    seen.add(int(it["index"]))
                    item = {k: it.get(k) for k in ("index", "id", "code", "detail")}
                    chunks.append(sse("item_failed", item, _event_id(job)))
        counts = (job["status"], job["progress"])
        now = clock()
        terminal = job["status"] in TERMINAL
        if counts != last_counts and (terminal or now - progress_at >= PROGRESS_MIN_S):
            chunks.append(sse("progress", _progress(job), _event_id(job)))
            last_counts, progress_at = counts, now
        if terminal:
            chunks.append(sse(FINAL_EVENTS.get(job["status"], "completed"), job_view(job), _event_id(job)))
            yield b"".join(chunks)
            return
        if not chunks and now - wrote_at >= KEEPALIVE_S:
            chunks.append(b": keep-alive\n\n")
        if chunks:
            wrote_at = now
            yield b"".join(chunks)
