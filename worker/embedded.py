"""The worker code for the embedded mode (no broker): top-level, picklable functions that ``hsc serve``
runs in its bounded process pool (spawn), by dotted name, so the API process never imports torch.

``init`` is the pool's initializer (settings as a plain dict, models loaded once per pool process);
``pseudo_label`` answers like the Celery task (a result dict, or ``{"error": {status, code,
detail}}``; it never raises for a problem of the image or the request); ``run_chunk`` runs a chunk of
a job whose records are on disk (:class:`~hsc.core.jobs.FileJobStore` under ``results_dir/state``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hsc.core.jobs import FileJobStore
from hsc.core.settings import Settings

from .engine import Engine, ItemError, get_engine

__all__ = ["cards", "init", "pseudo_label", "run_chunk", "state_dir"]

log = logging.getLogger(__name__)

_settings: Settings | None = None


def state_dir(settings: Settings) -> Path:
    """Where the embedded mode keeps its job records."""
    return Path(settings.results_dir) / "state"


def init(settings_dict: dict[str, Any]) -> None:
    """Pool initializer: the settings (``Settings.model_dump()`` of the API's), and the models."""
    global _settings
    _settings = Settings(**settings_dict)
    get_engine(_settings)  # sets the threads: the pool's processes share the CPUs


def _engine() -> tuple[Settings, Engine]:
    if _settings is None:
        raise RuntimeError("hsc.worker.embedded.init(settings) was not called in this process")
    return _settings, get_engine(_settings)


def cards() -> list[dict[str, Any]]:
    """The model cards of this process's engine."""
    return _engine()[1].cards()


def pseudo_label(request: dict[str, Any], image_bytes: bytes) -> dict[str, Any]:
    """The result dict of one image, or ``{"error": {"status", "code", "detail"}}``."""
    _, engine = _engine()
    try:
        return engine.pseudo_label(request, image_bytes)
    except ItemError as e:
        return {"error": e.as_dict()}
    except Exception as e:
        log.exception("request %s: unexpected error", request.get("request_id"))
        return {"error": {"status": 500, "code": "internal", "detail": f"{type(e).__name__} in the worker"}}


def run_chunk(job_id: str, start: int, stop: int) -> dict[str, Any]:
    """Items ``start..stop-1`` of a job (see :meth:`Engine.run_chunk`)."""
    settings, engine = _engine()
    store = FileJobStore(state_dir(settings))
    return engine.run_chunk(store, Path(settings.results_dir), job_id, int(start), int(stop))
