"""Probes and catalogue: ``/healthz`` (process alive), ``/readyz`` (broker, workers with a model, storage),
``/models``, ``/metrics`` (Prometheus)."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import MetricsDep, RunnerDep, SettingsDep
from ..errors import Problem
from ..options import default_model_id
from ..runner import RETRY_AFTER_S

router = APIRouter(tags=["service"])


@router.get("/healthz", summary="Liveness")
async def healthz(request: Request) -> dict[str, Any]:
    """The process answers. Touches neither Redis nor the pool nor the GPU; needs no API key."""
    runner = getattr(request.app.state, "runner", None)
    return {"status": "ok", "mode": getattr(runner, "mode", "starting")}


@router.get("/readyz", summary="Readiness with reasons", responses={503: {"description": "not ready"}})
async def readyz(runner: RunnerDep) -> JSONResponse:
    """Broker reachable, at least one worker with a model loaded, storage writable."""
    checks = await runner.ready()
    ready = all(v == "ok" for v in checks.values())
    headers = {} if ready else {"Retry-After": str(RETRY_AFTER_S)}
    return JSONResponse(
        {"ready": ready, "mode": runner.mode, "checks": checks},
        status_code=200 if ready else 503,
        headers=headers,
    )


@router.get("/models", summary="Loaded models")
async def models(runner: RunnerDep, settings: SettingsDep) -> dict[str, Any]:
    """Loaded checkpoints: classes, threshold, sha256, and the workers that have each loaded."""
    cards = await anyio.to_thread.run_sync(runner.models)
    ids = [c["id"] for c in cards]
    wanted = default_model_id(settings)
    default = wanted if wanted in ids else ids[0]
    return {"models": cards, "default": default}


@router.get("/models/{model_id}", summary="One loaded model")
async def model(model_id: str, runner: RunnerDep) -> dict[str, Any]:
    cards = await anyio.to_thread.run_sync(runner.models)
    for c in cards:
        if c["id"] == model_id:
            return c
    raise Problem(
        "not_found", f"model {model_id!r} is not loaded; loaded: {', '.join(c['id'] for c in cards)}"
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
