"""One ASGI middleware in front of every route: request id, API-key check, body size limit, metrics.

- Every response carries ``X-Request-ID`` (the id problem bodies and logs quote).
- With ``settings.api_keys`` set, every path but ``/healthz`` (and a GET of the web page and its static
  files, :data:`hsc.service.routes.ui.PUBLIC_PATHS`, which hold no data) needs ``X-API-Key: <key>`` or
  ``Authorization: Bearer <key>``; otherwise 401 ``unauthenticated`` with ``WWW-Authenticate: Bearer``.
  The Label Studio routes (:data:`BASIC_AUTH_PREFIX`, and ``/health``) also take HTTP Basic, the only
  auth Label Studio sends to an ML backend: any user name, the key as the password.
- A body larger than ``settings.max_upload_bytes`` (plus room for the form fields) is refused with
  413 ``too_large``: from ``Content-Length`` before reading, or while a chunked body streams in.
- ``hsc_http_requests_total{route,code}`` and ``hsc_http_request_seconds{route}`` by route template.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
import uuid
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hsc.core.settings import Settings

from .errors import Problem, problem_response
from .metrics import Metrics
from .routes.ui import PUBLIC_PATHS as UI_PATHS

__all__ = [
    "BASIC_AUTH_PATHS",
    "BASIC_AUTH_PREFIX",
    "FORM_SLACK_BYTES",
    "OPEN_PATHS",
    "is_open",
    "ServiceMiddleware",
    "new_request_id",
]

#: Paths that answer without an API key.
OPEN_PATHS = frozenset({"/healthz"})
#: Paths where ``Authorization: Basic <user:key>`` is accepted too (Label Studio's ML-backend calls).
BASIC_AUTH_PREFIX = "/integrations/label-studio"
BASIC_AUTH_PATHS = frozenset({"/health"})
#: Room for the multipart framing and the small fields beside the file.
FORM_SLACK_BYTES = 1024 * 1024


def is_open(method: str, path: str) -> bool:
    """Whether the request needs no API key: ``/healthz``, or a GET/HEAD of exactly one of the web
    page's paths (matched whole, never as a prefix)."""
    return path in OPEN_PATHS or (method in ("GET", "HEAD") and path in UI_PATHS)


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex[:24]


def _basic_allowed(path: str) -> bool:
    return path in BASIC_AUTH_PATHS or path == BASIC_AUTH_PREFIX or path.startswith(BASIC_AUTH_PREFIX + "/")


def _basic_password(value: str) -> str | None:
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    _, sep, password = decoded.partition(":")
    return password if sep and password else None


def _key_of(headers: Headers, *, basic: bool = False) -> str | None:
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if basic and scheme.lower() == "basic":
        return _basic_password(value)
    return None


class ServiceMiddleware:
    def __init__(self, app: ASGIApp, *, settings: Settings, metrics: Metrics) -> None:
        self.app = app
        self.keys = [k.encode() for k in settings.api_keys if k]
        self.max_body = settings.max_upload_bytes + FORM_SLACK_BYTES
        self.metrics = metrics

    def authorised(self, headers: Headers, path: str = "") -> bool:
        if not self.keys:
            return True
        key = _key_of(headers, basic=_basic_allowed(path))
        if key is None:
            return False
        given = key.encode()
        ok = False
        for k in self.keys:  # no early exit: the time does not tell which key came close
            ok |= hmac.compare_digest(given, k)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message)["X-Request-ID"] = rid
            await send(message)

        try:
            headers = Headers(scope=scope)
            path = scope["path"]
            if not is_open(scope["method"], path) and not self.authorised(headers, path):
                basic = _basic_allowed(path)
                await self._refuse(
                    scope,
                    receive,
                    send_with_id,
                    401,
                    "unauthenticated",
                    "an API key is required: send X-API-Key: <key> or Authorization: Bearer <key>"
                    + (" (or HTTP Basic with the key as the password)" if basic else ""),
                    {
                        "WWW-Authenticate": 'Bearer realm="hsc", Basic realm="hsc"'
                        if basic
                        else 'Bearer realm="hsc"'
                    },
                )
                return
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                await self._refuse(
                    scope,
                    receive,
                    send_with_id,
                    413,
                    "too_large",
                    f"request body of {int(length)} bytes is over the limit of {self.max_body} "
                    "(HSC_MAX_UPLOAD_BYTES plus form fields)",
                    {"Connection": "close"},
                )
                return
            await self.app(scope, self._limited(receive), send_with_id)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(route=name, code=str(status)).inc()
            self.metrics.latency.labels(route=name).observe(time.perf_counter() - started)
            code = scope["state"].get("problem_code")
            if code:
                self.metrics.failures.labels(code=code).inc()

    def _limited(self, receive: Receive) -> Receive:
        seen = 0
        limit = self.max_body

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise Problem(
                        "too_large",
                        f"request body over the limit of {limit} bytes "
                        "(HSC_MAX_UPLOAD_BYTES plus form fields)",
                    )
            return message

        return limited

    async def _refuse(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        status: int,
        code: str,
        detail: str,
        headers: dict[str, Any],
    ) -> None:
        response = problem_response(Request(scope), status=status, code=code, detail=detail, headers=headers)
        await response(scope, receive, send)
