"""The FastAPI application: :func:`create_app`, :func:`app_factory` (``uvicorn --factory``) and
:func:`run_server` (``hsc serve``).

Broker mode when ``HSC_REDIS_URL`` is set (Celery workers, job records in Redis), embedded mode
otherwise (the worker's task code in a local process pool, job records on disk). This module and
everything it imports stay free of torch (tests/test_layering.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from hsc.core.jobs import JOB_STATUSES, JobStore
from hsc.core.settings import Settings, get_settings

from .errors import install_error_handlers
from .metrics import Metrics
from .middleware import ServiceMiddleware
from .routes import health, jobs, labelstudio, pseudo_label, ui
from .runner import Runner, make_runner
from .webhooks import WebhookDispatcher

__all__ = ["app_factory", "create_app", "run_server"]

log = logging.getLogger("hsc.service")

#: ``hsc_jobs{status}`` counts at most this many jobs per status at each scrape.
JOBS_GAUGE_CAP = 5000

DESCRIPTION = """Pseudo-labels for weakly supervised semantic segmentation: HSC class activation maps,
masks and annotation-tool encodings (Label Studio brush RLE, COCO RLE, CVAT) from image-level labels.

Errors are `application/problem+json` with a stable `code`. With API keys configured every route but
`/healthz` (and the web page at `/ui`) needs `X-API-Key: <key>` or `Authorization: Bearer <key>`."""


def _count_jobs(store: JobStore) -> dict[tuple[str, ...], float]:
    counts: dict[tuple[str, ...], float] = {}
    for status in JOB_STATUSES:
        n, cursor = 0, None
        while n < JOBS_GAUGE_CAP:
            page, cursor = store.list_jobs(status=status, limit=500, cursor=cursor)
            n += len(page)
            if not cursor:
                break
        counts[(status,)] = n
    return counts


def _gauges(app: FastAPI) -> dict[str, Any]:
    runner: Runner | None = getattr(app.state, "runner", None)
    if runner is None:
        return {}
    out: dict[str, Any] = {}
    readers = {
        "hsc_queue_depth": (
            "tasks waiting for a worker",
            ("queue",),
            lambda: {(runner.settings.queue,): runner.queue_depth()},
        ),
        "hsc_workers_ready": (
            "workers with the model loaded",
            ("model",),
            lambda: {(k,): v for k, v in runner.workers_ready().items()},
        ),
        "hsc_worker_images_processed": (
            "images each worker answered since it started",
            ("worker",),
            lambda: {(k,): v for k, v in runner.images_processed().items()},
        ),
        "hsc_jobs": ("jobs by status", ("status",), lambda: _count_jobs(runner.store)),
    }
    for name, (doc, labels, read) in readers.items():
        try:
            out[name] = (doc, labels, read())
        except Exception as e:  # noqa: BLE001 - a scrape must not fail because Redis is away
            log.warning("metric %s not read: %s", name, e)
    return out


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API over ``settings`` (default: the environment). The runner starts with the app's lifespan."""
    settings = settings or get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.results_dir.mkdir(parents=True, exist_ok=True)
        runner = make_runner(settings)
        await runner.start()
        webhooks = WebhookDispatcher(runner.store, settings)
        await webhooks.start()
        runner.job_listeners.append(webhooks.watch)
        app.state.runner = runner
        log.info(
            "hsc API ready (%s mode, queue %r, results %s)", runner.mode, settings.queue, settings.results_dir
        )
        try:
            yield
        finally:
            app.state.runner = None
            await webhooks.close()
            await runner.close()

    app = FastAPI(title="hsc", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runner = None
    metrics.add_gauges(lambda: _gauges(app))
    install_error_handlers(app)
    app.add_middleware(ServiceMiddleware, settings=settings, metrics=metrics)
    app.include_router(pseudo_label.router)
    app.include_router(jobs.router)
    app.include_router(health.router)
    app.include_router(labelstudio.router)
    app.include_router(ui.router)
    return app


def app_factory() -> FastAPI:
    """``uvicorn --factory hsc.service.main:app_factory``: the settings from the ``HSC_*`` environment."""
    return create_app(Settings())


def run_server(settings: Settings) -> int:
    """Serve until interrupted (``hsc serve``); returns the exit status."""
    import uvicorn

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=10,
    )
    return 0
