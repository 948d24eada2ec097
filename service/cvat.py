"""The CVAT gateway (docs/product.md D8): hsc as CVAT "serverless" detector functions, without Nuclio.

A second, small FastAPI app that answers the part of the Nuclio dashboard API that CVAT's
``lambda_manager`` uses, on the same runner as the API (:func:`hsc.service.runner.make_runner`:
Celery workers over Redis, or an embedded pool):

* ``GET /api/functions``: a map ``{"hsc-<model id>": function}`` of the loaded models, each function
  ``{"metadata": {"name", "namespace", "annotations": {"name", "type": "detector", "framework",
  "version", "spec", "hsc_model"}}, "spec": {"description"}, "status": {"state": "ready",
  "httpPort"}}``; ``spec`` is a JSON *string* ``[{"id": v, "name": class, "type": "mask"}, ...]``
  of the foreground classes, ``id`` = the class's value in hsc masks (1..K). ``version`` must be an
  integer for CVAT: always 1; the checkpoint is named in ``hsc_model`` (``<id>@<sha256[:12]>``) and
  in the description.
* ``GET /api/functions/{name}``: one of them (404 otherwise).
* ``POST /api/function_invocations`` (the function named by the ``x-nuclio-function-name`` header)
  and ``POST /`` (CVAT's ``direct`` invoke method; the function named by that header if sent, else
  the default model): body ``{"image": "<base64 frame>", "threshold": t}`` (``threshold`` optional,
  in [0, 1]). The answer is a JSON list of CVAT detector items, one per connected region of each
  class in the mask: ``{"label", "type": "mask", "mask": [0/1 bitmap of the region's box, row-major,
  then xtl, ytl, xbr, ybr inclusive], "points": [outer contour polygon], "confidence": region mean
  CAM}`` (:func:`hsc.core.encoders.cvat_function_items`).

CVAT sends only the frame and the threshold, never image-level labels, so every invocation runs
with ``labels="auto"``: the model's classifier chooses the classes, with CVAT's threshold as the
``label_threshold`` (default 0.5; the top-1 class when none reaches it). Each invocation is logged
with the predicted classes, and answered with ``X-HSC-Labels-Source: predicted``. The mask is the
one ``POST /pseudo-label`` with ``labels=auto`` gives (CRF on, the model's background threshold), at
the EXIF-oriented size.

CVAT sends no credentials: the gateway checks no API key, so keep it on an internal network
(``hsc cvat-gateway`` listens on ``settings.host``, 127.0.0.1 by default; port 8070, CVAT's
``CVAT_NUCLIO_PORT`` default). CVAT side: ``CVAT_SERVERLESS=1``, ``CVAT_NUCLIO_HOST=<gateway host>``,
``CVAT_NUCLIO_PORT=8070``, and a ``CVAT_NUCLIO_DEFAULT_TIMEOUT`` above the time of one frame.

In embedded mode the gateway's pool keeps its (unused) job records under
``<results_dir>/cvat-gateway`` so that it never resumes the API's jobs. Torch-free, like the API.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from hsc.core.images import ImageError, probe_image
from hsc.core.results import model_version
from hsc.core.settings import Settings

from .errors import Problem, install_error_handlers
from .middleware import new_request_id
from .options import AUTO_LABELS, DEFAULT_LABEL_THRESHOLD, default_model_id
from .runner import RETRY_AFTER_S, Runner, make_runner

__all__ = [
    "DEFAULT_CVAT_PORT",
    "FUNCTION_PREFIX",
    "create_cvat_app",
    "cvat_app_factory",
    "function_name",
    "nuclio_function",
    "run_cvat_gateway",
]

log = logging.getLogger("hsc.service.cvat")

#: CVAT's ``CVAT_NUCLIO_PORT`` default.
DEFAULT_CVAT_PORT = 8070
#: Function name = prefix + model id.
FUNCTION_PREFIX = "hsc-"
#: Header naming the function of an invocation (CVAT's dashboard invoke method).
FUNCTION_HEADER = "x-nuclio-function-name"
#: Sub-folder of ``results_dir`` holding the embedded gateway pool's job store.
EMBEDDED_STATE_DIR = "cvat-gateway"


def function_name(model_id: str) -> str:
    """``"hsc-<model id>"``."""
    return FUNCTION_PREFIX + str(model_id)


def nuclio_function(card: Mapping[str, Any], http_port: int) -> dict[str, Any]:
    """The Nuclio dashboard's description of the function serving the model ``card``, as CVAT's
    ``LambdaFunction`` reads it."""
    names = [str(c) for c in list(card["classes"])[1:]]
    spec = [{"id": i + 1, "name": n, "type": "mask"} for i, n in enumerate(names)]
    version = model_version(card)
    return {
        "metadata": {
            "name": function_name(str(card["id"])),
            "namespace": "nuclio",
            "annotations": {
                "name": f"HSC pseudo-labels ({card['id']})",
                "type": "detector",
                "framework": "pytorch",
                "version": "1",
                "spec": json.dumps(spec),
                "hsc_model": version,
            },
        },
        "spec": {
            "description": (
                f"HSC class-activation-map pseudo-labels, model {version}: one mask per region of the "
                "classes the image-level classifier finds (threshold = the classifier's)"
            ),
        },
        "status": {"state": "ready", "httpPort": int(http_port)},
    }


async def _read_json(request: Request, max_bytes: int) -> dict[str, Any]:
    """The JSON body, refused above ``max_bytes`` while it streams in."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise Problem("too_large", f"body of {declared} bytes, over the limit of {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise Problem("too_large", f"body over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks) or b"null")
    except ValueError:
        raise Problem("bad_request", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Problem("bad_request", 'the body must be a JSON object {"image": "<base64>", "threshold": t}')
    return body


def _threshold(body: Mapping[str, Any]) -> float:
    value = body.get("threshold")
    if value is None:
        return DEFAULT_LABEL_THRESHOLD
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise Problem("invalid_option", f"threshold must be a number in [0, 1], got {value!r}")
    try:
        t = float(value)
    except ValueError:
        t = float("nan")
    if not 0.0 <= t <= 1.0:
        raise Problem("invalid_option", f"threshold must be a number in [0, 1], got {value!r}")
    return t


def _image(body: Mapping[str, Any]) -> bytes:
    b64 = body.get("image")
    if not isinstance(b64, str) or not b64:
        raise Problem("bad_request", "JSON field 'image' (the frame, base64) is missing")
    try:
        return base64.b64decode(b64.split(",", 1)[-1] if b64.startswith("data:") else b64, validate=True)
    except (binascii.Error, ValueError):
        raise Problem("bad_request", "'image' is not valid base64") from None


def _card_by_function(cards: Sequence[Mapping[str, Any]], name: str) -> Mapping[str, Any]:
    for card in cards:
        if function_name(str(card["id"])) == name:
            return card
    raise Problem(
        "not_found",
        f"no function {name!r}; functions: {', '.join(function_name(str(c['id'])) for c in cards)}",
    )


def create_cvat_app(settings: Settings, *, http_port: int | None = None) -> FastAPI:
    """The gateway over ``settings``. ``http_port`` is the ``status.httpPort`` CVAT's direct invoke
    method posts to (default: the port this server listens on)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = settings
        if settings.embedded:  # a job store of its own: never resume (run twice) the API's jobs
            own = settings.model_copy(update={"results_dir": settings.results_dir / EMBEDDED_STATE_DIR})
        own.results_dir.mkdir(parents=True, exist_ok=True)
        runner = make_runner(own)
        await runner.start()
        app.state.runner = runner
        log.info("hsc CVAT gateway ready (%s mode, queue %r)", runner.mode, settings.queue)
        try:
            yield
        finally:
            app.state.runner = None
            await runner.close()

    app = FastAPI(
        title="hsc CVAT gateway",
        version="0.1.0",
        description="The subset of the Nuclio dashboard API that CVAT uses, serving hsc models as "
        "detector functions (labels predicted by the classifier).",
        lifespan=lifespan,
    )
    app.state.runner = None
    install_error_handlers(app)

    @app.middleware("http")
    async def request_id(request: Request, call_next: Any) -> Any:
        request.state.request_id = new_request_id()
        response = await call_next(request)
        response.headers["X-Request-ID"] = request.state.request_id
        return response

    def runner_of(request: Request) -> Runner:
        runner = getattr(request.app.state, "runner", None)
        if runner is None:
            raise Problem(
                "model_loading", "the gateway is starting; retry in a moment", headers={"Retry-After": "2"}
            )
        return runner

    def port_of(request: Request) -> int:
        if http_port is not None:
            return http_port
        server = request.scope.get("server")
        return int(server[1]) if server and server[1] else DEFAULT_CVAT_PORT

    async def cards_of(runner: Runner) -> list[dict[str, Any]]:
        cards = await anyio.to_thread.run_sync(runner.models)
        if not cards:
            raise Problem(
                "no_worker",
                "no model is loaded (HSC_CHECKPOINTS)",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        return cards

    @app.get("/healthz", tags=["service"], summary="Liveness")
    async def healthz(request: Request) -> dict[str, Any]:
        runner = getattr(request.app.state, "runner", None)
        return {"status": "ok", "mode": getattr(runner, "mode", "starting")}

    @app.get("/readyz", tags=["service"], summary="Readiness with reasons")
    async def readyz(request: Request) -> JSONResponse:
        runner = runner_of(request)
        checks = await runner.ready()
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"ready": ready, "mode": runner.mode, "checks": checks},
            status_code=200 if ready else 503,
            headers={} if ready else {"Retry-After": str(RETRY_AFTER_S)},
        )

    @app.get("/api/functions", tags=["nuclio"], summary="The functions (one per loaded model)")
    async def list_functions(request: Request) -> dict[str, Any]:
        port = port_of(request)
        cards = await cards_of(runner_of(request))
        return {function_name(str(c["id"])): nuclio_function(c, port) for c in cards}

    @app.get("/api/functions/{name}", tags=["nuclio"], summary="One function")
    async def get_function(name: str, request: Request) -> dict[str, Any]:
        cards = await cards_of(runner_of(request))
        return nuclio_function(_card_by_function(cards, name), port_of(request))

    async def invoke(request: Request, name: str | None) -> JSONResponse:
        runner = runner_of(request)
        max_b64 = (settings.max_upload_bytes + 2) * 4 // 3 + 64 * 1024
        body = await _read_json(request, max_b64)
        threshold = _threshold(body)
        data = _image(body)
        if not data:
            raise Problem("unsupported_media", "the image is empty")
        try:
            probe_image(data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
        except ImageError as e:
            raise Problem(e.code, e.detail, status=e.status) from None
        cards = await cards_of(runner)
        if name:
            card = _card_by_function(cards, name)
        else:  # direct mode: the default model
            wanted = default_model_id(settings)
            card = next((c for c in cards if c["id"] == wanted), cards[0])
        await anyio.to_thread.run_sync(runner.check_queue, "image")
        task = {
            "request_id": request.state.request_id,
            "model": str(card["id"]),
            "labels": AUTO_LABELS,
            "labels_requested": AUTO_LABELS,
            "label_threshold": threshold,
            "crf": True,
            "bg_threshold": None,
            "outputs": ["mask", "cvat"],
            "enqueued_at": time.time(),
        }
        result = await runner.pseudo_label(task, data, settings.sync_timeout_s)
        err = result.get("error")
        if isinstance(err, dict):
            raise Problem(
                str(err.get("code", "internal")),
                str(err.get("detail", "the worker failed")),
                status=int(err.get("status", 500)),
            )
        labels = result.get("labels") or {}
        used = [c.get("name") for c in result.get("classes", [])]
        items = result.get("cvat") or []
        log.info(
            "cvat invocation %s: model %s, labels predicted %s (threshold %.3g), %d items",
            request.state.request_id,
            card["id"],
            used,
            threshold,
            len(items),
        )
        headers = {
            "X-HSC-Model": model_version(card),
            "X-HSC-Labels-Source": str(labels.get("source", "predicted")),
            "X-HSC-Classes": ",".join(str(n) for n in used),
        }
        return JSONResponse(items, headers=headers)

    @app.post("/api/function_invocations", tags=["nuclio"], summary="Invoke a function (dashboard mode)")
    async def function_invocations(request: Request) -> JSONResponse:
        name = request.headers.get(FUNCTION_HEADER, "").strip()
        if not name:
            raise Problem("bad_request", f"header {FUNCTION_HEADER!r} (the function to invoke) is missing")
        return await invoke(request, name)

    @app.post("/", tags=["nuclio"], summary="Invoke the function (direct mode)")
    async def direct(request: Request) -> JSONResponse:
        return await invoke(request, request.headers.get(FUNCTION_HEADER, "").strip() or None)

    return app


def cvat_app_factory() -> FastAPI:
    """``uvicorn --factory hsc.service.cvat:cvat_app_factory``: settings from the ``HSC_*`` environment."""
    return create_cvat_app(Settings())


def run_cvat_gateway(settings: Settings, host: str | None = None, port: int = DEFAULT_CVAT_PORT) -> int:
    """Serve the gateway until interrupted (``hsc cvat-gateway``); returns the exit status."""
    import uvicorn

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_cvat_app(settings, http_port=port),
        host=host or settings.host,
        port=port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=10,
    )
    return 0
