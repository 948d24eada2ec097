"""Where the API sends work: Celery workers over Redis (broker mode) or a local process pool (embedded).

Both runners answer the same calls: :meth:`Runner.models`, :meth:`Runner.pseudo_label`,
:meth:`Runner.enqueue_chunks`, :meth:`Runner.ready`, :meth:`Runner.queue_depth`,
:meth:`Runner.close`, and own the job store (:class:`hsc.core.jobs.JobStore`).

The API never imports torch nor ``hsc.worker``: the broker runner sends tasks by name; the embedded
runner hands dotted names (``"hsc.worker.embedded:pseudo_label"``) to :func:`pool_init` and
:func:`pool_call`, two tiny top-level functions that resolve them inside the spawned pool processes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import importlib
import itertools
import json
import logging
import multiprocessing
import os
import queue
import signal
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hsc.core.jobs import TERMINAL, FileJobStore, JobStore, RedisJobStore
from hsc.core.queue import (
    KEY_PREFIX,
    TASK_PSEUDO_LABEL,
    TASK_RUN_CHUNK,
    blob_key,
    celery_config,
    reply_key,
    worker_pattern,
)
from hsc.core.settings import Settings

from .errors import Problem

__all__ = [
    "BrokerRunner",
    "EmbeddedRunner",
    "Runner",
    "chunk_ranges",
    "make_runner",
    "pool_call",
    "pool_init",
]

log = logging.getLogger("hsc.service")

EMBEDDED_INIT = "hsc.worker.embedded:init"
EMBEDDED_CARDS = "hsc.worker.embedded:cards"
EMBEDDED_PSEUDO_LABEL = "hsc.worker.embedded:pseudo_label"
EMBEDDED_RUN_CHUNK = "hsc.worker.embedded:run_chunk"

#: Celery message priorities on Redis (0 is served first): single images before job chunks.
PRIORITY_IMAGE = 0
PRIORITY_CHUNK = 9
#: kombu's Redis transport keeps one list per priority step: ``queue``, ``queue\x06\x163``, ...
_PRIORITY_STEPS = (0, 3, 6, 9)
_PRIORITY_SEP = "\x06\x16"
#: How long the worker heartbeats read from Redis are reused.
WORKERS_CACHE_S = 1.0
QueueKind = Literal["image", "chunk"]
#: Retry-After (seconds) sent with 503 answers.
RETRY_AFTER_S = 5
#: Seconds past a BLPOP's own timeout before the API stops waiting for its answer.
BLPOP_GRACE_S = 10.0
#: Times a chunk is given to a fresh pool after the pool broke under it (a crashed process).
POOL_RETRIES = 2


# --------------------------------------------------------------------------------------------------
# the trampoline run inside the embedded pool processes


_init_error: str | None = None


def _resolve(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    if not callable(fn):
        raise TypeError(f"{target} is not callable")
    return fn


def pool_init(target: str, settings: dict[str, Any]) -> None:
    """Initializer of a pool process: call ``target(settings)``; a failure is kept and re-raised by
    every later call (the pool itself stays usable, so the error reaches ``/readyz``)."""
    global _init_error
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the API, which stops the pool
    try:
        _resolve(target)(settings)
    except BaseException as e:  # noqa: BLE001 - reported through every call
        _init_error = f"loading the models failed: {type(e).__name__}: {e}"


def pool_call(target: str, *args: Any) -> Any:
    """Run ``target(*args)`` in a pool process (``"package.module:function"``)."""
    if _init_error is not None:
        raise RuntimeError(_init_error)
    return _resolve(target)(*args)


# --------------------------------------------------------------------------------------------------
# helpers shared by both runners


def chunk_ranges(indices: Iterable[int], chunk: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` ranges covering ``indices``, each at most ``chunk`` long."""
    out: list[tuple[int, int]] = []
    start = stop = -1
    for i in sorted(set(indices)):
        if i == stop and stop - start < chunk:
            stop += 1
            continue
        if stop > start:
            out.append((start, stop))
        start, stop = i, i + 1
    if stop > start:
        out.append((start, stop))
    return out


def storage_check(results_dir: Path) -> str:
    """``"ok"``, or why ``results_dir`` cannot take files."""
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=results_dir, prefix=".readyz-", delete=True) as f:
            f.write(b"ok")
            f.flush()
    except OSError as e:
        return f"results dir {results_dir} not writable: {e.strerror or e}"
    return "ok"


def _aggregate_cards(entries: Iterable[tuple[str, Sequence[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """One card per model id (first seen wins), with ``workers`` = where it is loaded."""
    by_id: dict[str, dict[str, Any]] = {}
    for where, cards in entries:
        for card in cards:
            if not isinstance(card, dict) or not card.get("id") or not isinstance(card.get("classes"), list):
                continue  # not a card (a worker of another version)
            mid = str(card["id"])
            if mid not in by_id:
                by_id[mid] = {**card, "workers": []}
            by_id[mid]["workers"].append(where)
    return list(by_id.values())


class Runner(ABC):
    """The interface the routes use."""

    mode: str

    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        #: Called with a job id each time this process sends a job's chunks (the webhook dispatcher).
        self.job_listeners: list[Callable[[str], None]] = []

    def job_queued(self, job_id: str) -> None:
        """Tell the listeners that ``job_id`` was (re)queued here; a listener's error is only logged."""
        for listener in self.job_listeners:
            try:
                listener(job_id)
            except Exception:  # noqa: BLE001
                log.exception("job listener failed for %s", job_id)

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Called once the event loop runs (app lifespan)."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def models(self) -> list[dict[str, Any]]:
        """Model cards with ``workers``; raises :class:`Problem` (503) when none can answer."""

    @abstractmethod
    async def pseudo_label(self, request: dict[str, Any], image: bytes, timeout: float) -> dict[str, Any]:
        """The result dict of one image, or ``{"error": {"status", "code", "detail"}}``."""

    @abstractmethod
    def enqueue_chunks(self, job_id: str, ranges: Sequence[tuple[int, int]]) -> None: ...

    @abstractmethod
    def queue_depth(self, kind: QueueKind | None = None) -> int:
        """Messages waiting: single images (``"image"``), job chunks (``"chunk"``) or all."""

    @abstractmethod
    def images_processed(self) -> dict[str, float]:
        """Images each worker has answered since it started (worker name -> count)."""

    @abstractmethod
    async def ready(self) -> dict[str, str]:
        """Check name -> ``"ok"`` or the reason it is not (D6 ``/readyz``)."""

    def workers_ready(self) -> dict[str, int]:
        """Model id -> number of workers that have it loaded (for the metrics)."""
        try:
            cards = self.models()
        except Problem:
            return {}
        return {c["id"]: len(c.get("workers", [])) for c in cards}

    def check_queue(self, kind: QueueKind) -> None:
        """503 ``queue_full`` when ``settings.queue_max`` messages of this kind already wait (single
        images are counted apart from job chunks, so a big job never locks out interactive use)."""
        depth = self.queue_depth(kind)
        if depth >= self.settings.queue_max:
            what = "single images" if kind == "image" else "job chunks"
            raise Problem(
                "queue_full",
                f"{depth} {what} are waiting (HSC_QUEUE_MAX={self.settings.queue_max}); retry later",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )


# --------------------------------------------------------------------------------------------------
# broker mode


class BrokerRunner(Runner):
    """Celery workers over Redis: tasks sent by name, single images through the blob/reply keys,
    workers and their models from their heartbeats, job records in Redis."""

    mode = "broker"

    def __init__(self, settings: Settings) -> None:
        import redis
        from celery import Celery

        assert settings.redis_url
        self._redis = redis.Redis.from_url(settings.redis_url)
        super().__init__(settings, RedisJobStore(self._redis, prefix=KEY_PREFIX))
        self._celery = Celery("hsc-api", broker=settings.redis_url, set_as_current=False)
        self._celery.conf.update(
            celery_config(
                queue=settings.queue,
                visibility_timeout_s=settings.visibility_timeout_s,
                soft_time_limit_s=settings.task_soft_time_limit_s,
                time_limit_s=settings.task_time_limit_s,
            )
        )
        self._aredis: Any = None
        self._ablock: Any = None  # BLPOP only: no socket timeout (redis-py's default, 5 s, would cut it)
        self._workers_cache: tuple[float, list[dict[str, Any]]] = (0.0, [])
        self._lock = threading.Lock()

    async def start(self) -> None:
        import redis.asyncio as aredis

        assert self.settings.redis_url
        self._aredis = aredis.Redis.from_url(self.settings.redis_url)
        self._ablock = aredis.Redis.from_url(self.settings.redis_url, socket_timeout=None)

    async def close(self) -> None:
        for client in (self._aredis, self._ablock):
            if client is not None:
                await client.aclose()
        self._celery.close()
        self._redis.close()

    def workers(self) -> list[dict[str, Any]]:
        """Live heartbeats (``hsc worker`` processes) of this queue, cached for a second."""
        with self._lock:
            at, cached = self._workers_cache
            if time.monotonic() - at < WORKERS_CACHE_S:
                return cached
            keys = list(self._redis.scan_iter(match=worker_pattern(), count=500))
            out = []
            for raw in self._redis.mget(keys) if keys else []:
                if raw is None:
                    continue
                try:
                    beat = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(beat, dict) or beat.get("queue") != self.settings.queue:
                    continue  # a worker of another queue (or not one of ours)
                out.append(beat)
            out.sort(key=lambda b: str(b.get("hostname")))
            self._workers_cache = (time.monotonic(), out)
            return out

    def models(self) -> list[dict[str, Any]]:
        cards = _aggregate_cards((str(w.get("hostname")), w.get("models") or []) for w in self.workers())
        if not cards:
            raise Problem(
                "no_worker",
                f"no worker with a model loaded is reading queue {self.settings.queue!r}; "
                "start one with `hsc worker`",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        return cards

    def _send(self, name: str, args: list[Any], priority: int, expires: float | None = None) -> None:
        self._celery.send_task(name, args=args, queue=self.settings.queue, priority=priority, expires=expires)

    async def pseudo_label(self, request: dict[str, Any], image: bytes, timeout: float) -> dict[str, Any]:
        import anyio

        rid = request["request_id"]
        await self._aredis.set(blob_key(rid), image, ex=int(timeout) + 60)
        try:
            await anyio.to_thread.run_sync(
                lambda: self._send(TASK_PSEUDO_LABEL, [request], PRIORITY_IMAGE, expires=timeout)
            )
            # The wait is bounded by BLPOP's own timeout; move_on_after only guards against a silent
            # network partition (the blocking client has no socket timeout).
            got = None
            with anyio.move_on_after(timeout + BLPOP_GRACE_S):
                got = await self._ablock.blpop([reply_key(rid)], timeout=timeout)
        finally:
            await self._aredis.delete(blob_key(rid))
        if got is None:
            raise Problem(
                "timeout",
                f"no answer within {timeout:g} s (HSC_SYNC_TIMEOUT_S); the workers are busy "
                "or slow: retry, or send the image as a job (Prefer: respond-async)",
                extra={"request_id": rid},
            )
        await self._aredis.delete(reply_key(rid))
        return json.loads(got[1])

    def enqueue_chunks(self, job_id: str, ranges: Sequence[tuple[int, int]]) -> None:
        for start, stop in ranges:
            self._send(TASK_RUN_CHUNK, [job_id, start, stop], PRIORITY_CHUNK)

    def _list_names(self, kind: QueueKind | None) -> list[str]:
        q = self.settings.queue
        if kind == "image":
            return [q]  # priority 0 lives in the queue's own list
        chunks = [f"{q}{_PRIORITY_SEP}{p}" for p in _PRIORITY_STEPS[1:]]
        return chunks if kind == "chunk" else [q, *chunks]

    def queue_depth(self, kind: QueueKind | None = None) -> int:
        names = self._list_names(kind)
        with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.llen(name)
            return int(sum(pipe.execute()))

    def images_processed(self) -> dict[str, float]:
        return {str(w.get("hostname")): float(w.get("images_processed") or 0) for w in self.workers()}

    async def ready(self) -> dict[str, str]:
        import anyio

        checks: dict[str, str] = {}
        try:
            await self._aredis.ping()
            checks["redis"] = "ok"
        except Exception as e:  # noqa: BLE001 - a reason for /readyz
            checks["redis"] = f"unreachable: {type(e).__name__}: {e}"
            checks["workers"] = "unknown (no redis)"
            checks["storage"] = "unknown (no redis)"
            return checks
        try:
            workers = await anyio.to_thread.run_sync(self.workers)
        except Exception as e:  # noqa: BLE001
            workers = []
            checks["workers"] = f"unreadable: {e}"
        with_models = [w for w in workers if w.get("models")]
        if "workers" not in checks:
            checks["workers"] = (
                "ok" if with_models else f"0 with a model loaded on queue {self.settings.queue!r}"
            )
        checks["storage"] = await anyio.to_thread.run_sync(self._storage)
        return checks

    def _storage(self) -> str:
        try:
            self.store.ping()
        except Exception as e:  # noqa: BLE001
            return f"job store: {type(e).__name__}: {e}"
        return storage_check(self.settings.results_dir)


# --------------------------------------------------------------------------------------------------
# embedded mode


@dataclass(order=True)
class _Work:
    priority: int
    seq: int
    target: str = field(compare=False)
    args: tuple[Any, ...] = field(compare=False)
    future: cf.Future[Any] = field(compare=False, default_factory=cf.Future)
    job_id: str | None = field(compare=False, default=None)
    tries: int = field(compare=False, default=0)


_STOP = _Work(priority=-1, seq=-1, target="", args=())


class EmbeddedRunner(Runner):
    """The worker's task code in a bounded pool of spawned processes; job records on disk.

    ``settings.embedded_workers`` dispatcher threads each drive one pool process at a time, taking
    single images before job chunks. A pool whose process died is replaced and the chunk given again
    (items already done are skipped). At start-up, jobs a previous process left queued, running or
    cancelling are picked up again.
    """

    mode = "embedded"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, FileJobStore(settings.results_dir / "state"))
        self._settings_dict = settings.model_dump(mode="json")
        self._queue: queue.PriorityQueue[_Work] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._pool_lock = threading.Lock()
        self._pool: cf.ProcessPoolExecutor | None = None
        self._pool_gen = 0
        self._threads: list[threading.Thread] = []
        self._cards: list[dict[str, Any]] | None = None
        self._load_error: str | None = None
        self._outstanding: dict[str, int] = {}
        self._out_lock = threading.Lock()
        self._waiting = {PRIORITY_IMAGE: 0, PRIORITY_CHUNK: 0}
        self._images = 0
        self._closed = False

    # ---- pool

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(
            max_workers=self.settings.embedded_workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=pool_init,
            initargs=(EMBEDDED_INIT, self._settings_dict),
        )

    def _current_pool(self) -> tuple[cf.ProcessPoolExecutor, int]:
        with self._pool_lock:
            if self._pool is None:
                self._pool = self._new_pool()
            return self._pool, self._pool_gen

    def _replace_pool(self, gen: int) -> None:
        with self._pool_lock:
            if gen != self._pool_gen or self._closed:
                return
            log.warning("an embedded pool process died; starting a new pool")
            old, self._pool = self._pool, self._new_pool()
            self._pool_gen += 1
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)

    def pool_pids(self) -> list[int]:
        """Process ids of the pool's processes (tests kill one)."""
        pool = self._pool
        procs = getattr(pool, "_processes", None) or {}
        return sorted(int(pid) for pid in procs)

    # ---- dispatch

    def _submit(self, priority: int, target: str, *args: Any, job_id: str | None = None) -> cf.Future[Any]:
        work = _Work(priority, next(self._seq), target, args, job_id=job_id)
        with self._out_lock:
            self._waiting[priority] += 1
        self._queue.put(work)
        return work.future

    def _dispatch(self) -> None:
        while True:
            work = self._queue.get()
            if work is _STOP or self._closed:
                return
            with self._out_lock:
                self._waiting[work.priority] -= 1
            if not work.future.set_running_or_notify_cancel():
                continue
            self._run(work)

    def _run(self, work: _Work) -> None:
        while True:
            pool, gen = self._current_pool()
            try:
                result = pool.submit(pool_call, work.target, *work.args).result()
            except BrokenProcessPool as e:
                if self._closed:
                    work.future.set_exception(e)
                    return
                self._replace_pool(gen)
                work.tries += 1
                if work.tries <= POOL_RETRIES:
                    continue
                work.future.set_exception(
                    RuntimeError(f"the pool process running it died, {work.tries} times")
                )
                return
            except BaseException as e:  # noqa: BLE001 - handed to the waiting side
                work.future.set_exception(e)
                return
            work.future.set_result(result)
            return

    # ---- lifecycle

    async def start(self) -> None:
        for i in range(self.settings.embedded_workers):
            t = threading.Thread(target=self._dispatch, name=f"hsc-embedded-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        self._submit(PRIORITY_IMAGE, EMBEDDED_CARDS).add_done_callback(self._cards_loaded)
        import anyio

        await anyio.to_thread.run_sync(self._resume_unfinished)

    def _cards_loaded(self, fut: cf.Future[Any]) -> None:
        try:
            self._cards = list(fut.result())
        except BaseException as e:  # noqa: BLE001
            self._load_error = str(e) or type(e).__name__
            log.error("embedded pool: %s", self._load_error)

    def _resume_unfinished(self) -> None:
        """Give the chunks of jobs left unfinished by a previous process to this one."""
        for status in ("cancelling", "running", "queued"):
            cursor: str | None = None
            while True:
                jobs, cursor = self.store.list_jobs(status=status, limit=200, cursor=cursor)
                for job in jobs:
                    jid = job["id"]
                    if status == "cancelling":
                        self.store.update(jid, status="cancelled", finished_at=time.time())
                        continue
                    pending = self.store.pending_indices(jid)
                    if not pending:
                        self.store.finish_if_complete(jid)
                        continue
                    log.info("job %s: resuming %d unfinished items", jid, len(pending))
                    self.enqueue_chunks(jid, chunk_ranges(pending, self.settings.job_chunk))
                if not cursor:
                    break

    async def close(self) -> None:
        self._closed = True
        for _ in self._threads:
            self._queue.put(_STOP)
        while True:  # fail what still waits
            try:
                work = self._queue.get_nowait()
            except queue.Empty:
                break
            if work is not _STOP and not work.future.done():
                work.future.cancel()
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            procs = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for p in procs:  # a running chunk stops here; its items are picked up at the next start
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(timeout=5)

    # ---- the Runner calls

    def models(self) -> list[dict[str, Any]]:
        if self._cards is not None:
            return _aggregate_cards([(f"embedded:{os.getpid()}", self._cards)])
        if self._load_error is not None:
            raise Problem(
                "model_loading",
                f"the embedded pool could not load the models: {self._load_error}",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        raise Problem(
            "model_loading",
            "the models are still loading; retry in a few seconds",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    async def pseudo_label(self, request: dict[str, Any], image: bytes, timeout: float) -> dict[str, Any]:
        fut = self._submit(PRIORITY_IMAGE, EMBEDDED_PSEUDO_LABEL, request, image)
        try:
            result: dict[str, Any] = await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
            self._images += 1
            return result
        except asyncio.TimeoutError:
            raise Problem(
                "timeout",
                f"no answer within {timeout:g} s (HSC_SYNC_TIMEOUT_S); the pool is busy "
                "or slow: retry, or send the image as a job (Prefer: respond-async)",
                extra={"request_id": request["request_id"]},
            ) from None

    def enqueue_chunks(self, job_id: str, ranges: Sequence[tuple[int, int]]) -> None:
        with self._out_lock:
            self._outstanding[job_id] = self._outstanding.get(job_id, 0) + len(ranges)
        for start, stop in ranges:
            fut = self._submit(PRIORITY_CHUNK, EMBEDDED_RUN_CHUNK, job_id, start, stop, job_id=job_id)
            fut.add_done_callback(functools.partial(self._chunk_done, job_id, start, stop))

    def _chunk_done(self, job_id: str, start: int, stop: int, fut: cf.Future[Any]) -> None:
        try:
            exc = None if fut.cancelled() else fut.exception()
            if exc is None and not fut.cancelled():
                summary = fut.result()
                if isinstance(summary, dict):
                    self._images += int(summary.get("done", 0)) + int(summary.get("failed", 0))
            if exc is not None and not self._closed:
                log.error("job %s chunk [%d, %d) failed: %s", job_id, start, stop, exc)
                self._fail_range(job_id, start, stop, exc)
            with self._out_lock:
                left = self._outstanding.get(job_id, 1) - 1
                if left <= 0:
                    self._outstanding.pop(job_id, None)
                else:
                    self._outstanding[job_id] = left
            if left <= 0 and not self._closed:
                self._settle(job_id)
        except Exception:  # noqa: BLE001 - a callback must not raise
            log.exception("job %s: bookkeeping after chunk [%d, %d) failed", job_id, start, stop)

    def _fail_range(self, job_id: str, start: int, stop: int, exc: BaseException) -> None:
        pending = set(self.store.pending_indices(job_id))
        code = "worker_lost" if "died" in str(exc) else "worker_error"
        for i in range(start, stop):
            if i in pending:
                self.store.mark(job_id, i, "failed", code=code, detail=str(exc)[:300])

    def _settle(self, job_id: str) -> None:
        """Every chunk given for the job has returned: leave it in a final state."""
        if self.store.finish_if_complete(job_id) is not None:
            return
        job = self.store.get_job(job_id)
        if job is None or job["status"] in TERMINAL:
            return
        if job["status"] == "cancelling" or self.store.cancel_requested(job_id):
            self.store.update(job_id, status="cancelled", finished_at=time.time())

    def queue_depth(self, kind: QueueKind | None = None) -> int:
        with self._out_lock:
            if kind is None:
                return sum(self._waiting.values())
            return self._waiting[PRIORITY_IMAGE if kind == "image" else PRIORITY_CHUNK]

    def images_processed(self) -> dict[str, float]:
        return {f"embedded:{os.getpid()}": float(self._images)}

    async def ready(self) -> dict[str, str]:
        import anyio

        if self._cards is not None:
            pool = "ok" if self._cards else "no model loaded (HSC_CHECKPOINTS is empty)"
        elif self._load_error is not None:
            pool = self._load_error
        else:
            pool = "loading the models"
        storage = await anyio.to_thread.run_sync(self._storage)
        return {"pool": pool, "storage": storage}

    def _storage(self) -> str:
        try:
            self.store.ping()
        except Exception as e:  # noqa: BLE001
            return f"job store: {type(e).__name__}: {e}"
        return storage_check(self.settings.results_dir)


def make_runner(settings: Settings) -> Runner:
    """Broker mode when ``settings.redis_url`` is set, embedded otherwise."""
    return EmbeddedRunner(settings) if settings.embedded else BrokerRunner(settings)
