"""Job webhooks: the API POSTs ``started``, ``progress`` and ``completed`` events to the URL a job's
``options.webhook`` names.

The job state lives in the store and changes in other processes (workers), so the
:class:`WebhookDispatcher` (started with the app) follows each job with a webhook by polling the
store. It finds them when this process queues them (:meth:`Runner.job_queued`), at start-up (every
job still running, or finished within :data:`CATCH_UP_S` without its ``completed`` sent) and by a
scan of the active jobs every :data:`DISCOVER_S`, so deliveries go on across an API restart.

``started`` and ``completed`` are claimed in the store before they are sent
(:meth:`JobStore.claim_once`, keyed by the run's ``started_at`` / ``finished_at``), so each is sent
once per run even with several API processes; a resumed job is a new run. ``progress`` goes out when
the counts changed, at most once per ``webhook_progress_interval_s`` per API process. A delivery is
tried ``webhook_attempts`` times with exponential backoff on connection errors and 5xx answers, never
again after a 4xx; its failure is logged and never touches the job. A process killed in the middle
of a delivery loses that delivery (at most once).

Body: ``{"event", "job": <GET /jobs/{id}>, "sent_at"}``. Headers: ``X-HSC-Event``,
``X-HSC-Delivery`` (the same on every try), and with a secret ``X-HSC-Signature: sha256=<hex
HMAC-SHA256 of the body>``, plus ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature``
(``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``, the Standard Webhooks layout).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from hsc.core.jobs import TERMINAL, JobStore
from hsc.core.settings import Settings

from .options import webhook_host_allowed
from .submit import job_view

__all__ = ["WebhookDispatcher", "sign", "signature_headers"]

log = logging.getLogger("hsc.service.webhooks")

#: How often a followed job is read from the store.
POLL_S = 0.5
#: How often the active jobs are scanned for webhooks this process does not follow yet.
DISCOVER_S = 10.0
#: At start-up, finished jobs older than this are not looked at (their ``completed`` was sent or lost).
CATCH_UP_S = 24 * 3600.0
#: First backoff between tries; doubled after each.
BACKOFF_S = 0.5
#: Statuses of a job still going.
ACTIVE = ("queued", "running", "cancelling")
USER_AGENT = "hsc-webhooks/1"


def sign(secret: str, body: bytes) -> str:
    """The ``X-HSC-Signature`` value: ``sha256=<hex HMAC-SHA256 of body>``."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def signature_headers(secret: str | None, delivery: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The signing headers of one delivery (none without a secret)."""
    if not secret:
        return {}
    key = secret.encode("utf-8")
    signed = f"{delivery}.{timestamp}.".encode() + body
    v1 = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")
    return {"X-HSC-Signature": sign(secret, body), "webhook-signature": f"v1,{v1}"}


@dataclass
class _Follow:
    """What this process sent for one job (progress throttling)."""

    progress_at: float = 0.0
    progress_seen: tuple[int, int, int] | None = None


def _counts(job: Mapping[str, Any]) -> tuple[int, int, int]:
    p = job.get("progress") or {}
    return int(p.get("done", 0)), int(p.get("failed", 0)), int(p.get("skipped", 0))


class WebhookDispatcher:
    """Follows the jobs that have a webhook and delivers their events (module docstring)."""

    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._discover: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._closed = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._client = httpx.AsyncClient(
            timeout=self.settings.webhook_timeout_s,
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
        )
        self._discover = asyncio.create_task(self._discover_loop(), name="hsc-webhooks")

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._discover, *self._tasks.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    # ---- which jobs

    def watch(self, job_id: str) -> None:
        """Follow ``job_id`` (from any thread); a job without a webhook is dropped at its first read."""
        loop = self._loop
        if loop is None or self._closed:
            return
        try:
            if asyncio.get_running_loop() is loop:
                self._follow(job_id)
                return
        except RuntimeError:
            pass
        loop.call_soon_threadsafe(self._follow, job_id)

    def _follow(self, job_id: str) -> None:
        if self._closed or job_id in self._tasks:
            return
        task = asyncio.create_task(self._run(job_id), name=f"hsc-webhook-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job_id, None))

    def _scan(self, statuses: tuple[str | None, ...], since: float | None) -> list[str]:
        found = []
        for status in statuses:
            cursor: str | None = None
            while True:
                jobs, cursor = self.store.list_jobs(status=status, limit=200, cursor=cursor)
                for job in jobs:
                    if not job.get("webhook"):
                        continue
                    finished = job.get("finished_at")
                    if job.get("status") in TERMINAL and (
                        since is None or not isinstance(finished, (int, float)) or finished < since
                    ):
                        continue
                    found.append(str(job["id"]))
                if not cursor:
                    break
        return found

    async def _discover_loop(self) -> None:
        first = True
        while not self._closed:
            try:
                if first:  # after a restart: the running jobs and the recently finished ones
                    since = time.time() - CATCH_UP_S
                    ids = await anyio.to_thread.run_sync(self._scan, (None,), since)
                else:
                    ids = await anyio.to_thread.run_sync(self._scan, ACTIVE, None)
                for jid in ids:
                    self._follow(jid)
                first = False
            except Exception as e:  # noqa: BLE001 - the store may be away for a while
                log.warning("webhooks: scanning the jobs failed: %s", e)
            await asyncio.sleep(DISCOVER_S)

    # ---- one job

    async def _run(self, job_id: str) -> None:
        state = _Follow()
        while not self._closed:
            try:
                job = await anyio.to_thread.run_sync(self.store.get_job, job_id)
            except Exception as e:  # noqa: BLE001
                log.warning("webhooks: reading job %s failed: %s", job_id, e)
                await asyncio.sleep(POLL_S * 4)
                continue
            if job is None or not isinstance(job.get("webhook"), Mapping):
                return
            try:
                if await self._step(job, state):
                    return
            except KeyError:  # deleted meanwhile
                return
            await asyncio.sleep(POLL_S)

    async def _claim(self, job_id: str, name: str) -> bool:
        return await anyio.to_thread.run_sync(self.store.claim_once, job_id, f"webhook:{name}")

    async def _step(self, job: dict[str, Any], state: _Follow) -> bool:
        """Send what the job's state calls for; True once there is nothing more to send."""
        hook = job["webhook"]
        events = set(hook.get("events") or ())
        status = job.get("status")
        jid = str(job["id"])
        started = job.get("started_at")
        if "started" in events and started is not None and await self._claim(jid, f"started:{started}"):
            await self.deliver(hook, "started", job)
        if status in TERMINAL:
            finished = job.get("finished_at")
            if "completed" in events and await self._claim(jid, f"completed:{finished}"):
                await self.deliver(hook, "completed", job)
            return True
        counts = _counts(job)
        if (
            "progress" in events
            and status == "running"
            and counts != state.progress_seen
            and sum(counts) > 0
            and time.monotonic() - state.progress_at >= self.settings.webhook_progress_interval_s
        ):
            state.progress_seen, state.progress_at = counts, time.monotonic()
            await self.deliver(hook, "progress", job)
        return False

    # ---- one delivery

    async def deliver(self, hook: Mapping[str, Any], event: str, job: Mapping[str, Any]) -> bool:
        """POST one event, with the retries; True when the receiver answered 2xx."""
        assert self._client is not None
        delivery = "whd_" + uuid.uuid4().hex
        now = time.time()
        body = json.dumps(
            {"event": event, "job": job_view(job), "sent_at": round(now, 3)}, separators=(",", ":")
        ).encode("utf-8")
        headers = {
            "Content-Type": "application/json",
            "X-HSC-Event": event,
            "X-HSC-Delivery": delivery,
            "webhook-id": delivery,
            "webhook-timestamp": str(int(now)),
            **signature_headers(hook.get("secret"), delivery, int(now), body),
        }
        url = str(hook["url"])
        if not webhook_host_allowed(url, self.settings.webhook_hosts):  # the setting changed since
            log.warning(
                "webhook %s of job %s to %s dropped: host not in HSC_WEBHOOK_HOSTS", event, job["id"], url
            )
            return False
        attempts = self.settings.webhook_attempts
        for attempt in range(1, attempts + 1):
            try:
                r = await self._client.post(url, content=body, headers=headers)
            except httpx.HTTPError as e:
                why = f"{type(e).__name__}: {e}"
            else:
                if r.status_code < 300:
                    return True
                why = f"HTTP {r.status_code}"
                if r.status_code < 500:
                    log.warning("webhook %s of job %s to %s refused: %s", event, job["id"], url, why)
                    return False
            if attempt < attempts:
                await asyncio.sleep(BACKOFF_S * 2 ** (attempt - 1))
        log.warning("webhook %s of job %s to %s failed %d times: %s", event, job["id"], url, attempts, why)
        return False
