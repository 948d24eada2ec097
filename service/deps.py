"""Dependencies of the routes (the settings, the runner, the job store, the metrics) as typed aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from hsc.core.jobs import JobStore
from hsc.core.settings import Settings

from .errors import Problem
from .metrics import Metrics
from .runner import Runner

__all__ = ["MetricsDep", "RunnerDep", "SettingsDep", "StoreDep"]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_runner(request: Request) -> Runner:
    runner = getattr(request.app.state, "runner", None)
    if runner is None:
        raise Problem(
            "model_loading",
            "the service is starting; retry in a moment",
            status=503,
            headers={"Retry-After": "2"},
        )
    return runner


def get_store(request: Request) -> JobStore:
    return get_runner(request).store


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
RunnerDep = Annotated[Runner, Depends(get_runner)]
StoreDep = Annotated[JobStore, Depends(get_store)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
