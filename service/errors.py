"""Errors of the API: RFC 9457 problem details with a stable ``code`` (docs/product.md D5).

Routes raise :class:`Problem`; the handlers installed by :func:`install_error_handlers` turn it, and
every other exception, into ``application/problem+json`` carrying the request id. Tracebacks stay
in the log, never in a body.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["PROBLEM_JSON", "Problem", "install_error_handlers", "problem_response"]

log = logging.getLogger("hsc.service")

PROBLEM_JSON = "application/problem+json"

#: Default status of each code of table D5 (a Problem may still say otherwise).
CODES: dict[str, int] = {
    "bad_request": 400,
    "unauthenticated": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "not_acceptable": 406,
    "conflict": 409,
    "too_large": 413,
    "unsupported_media": 415,
    "unknown_class": 422,
    "no_labels": 422,
    "corrupt_image": 422,
    "idempotency_mismatch": 422,
    "invalid_option": 422,
    "invalid_dataset": 422,
    "invalid_archive": 422,
    "rate_limited": 429,
    "internal": 500,
    "no_worker": 503,
    "queue_full": 503,
    "model_loading": 503,
    "broker_unavailable": 503,
    "timeout": 504,
}


class Problem(Exception):
    """An error answer: ``status``, stable ``code``, a ``detail`` that says what to change.

    ``extra`` adds members to the body (``valid_classes``, ``job_id``, ...); ``headers`` are sent
    with it (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        status: int | None = None,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status if status is not None else CODES.get(code, 500)
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def problem_response(
    request: Request,
    *,
    status: int,
    code: str,
    detail: str,
    extra: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"urn:hsc:problem:{code}",
        "title": _title(status),
        "status": status,
        "code": code,
        "detail": detail,
        "instance": request.url.path,
        "request_id": request_id_of(request),
    }
    body.update(extra or {})
    request.state.problem_code = code
    return JSONResponse(body, status_code=status, headers=dict(headers or {}), media_type=PROBLEM_JSON)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media",
}


def _validation_detail(exc: RequestValidationError) -> tuple[str, str, list[dict[str, Any]]]:
    errors = []
    malformed = False
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        errors.append({"field": loc, "message": str(e.get("msg", ""))})
        malformed |= e.get("type") in ("json_invalid", "model_attributes_type", "dict_type") and loc == "body"
    text = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
    return ("bad_request" if malformed else "invalid_option"), text, errors


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the API as problem+json."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(
            request, status=exc.status, code=exc.code, detail=exc.detail, extra=exc.extra, headers=exc.headers
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "internal" if exc.status_code >= 500 else "bad_request")
        detail = exc.detail if isinstance(exc.detail, str) else _title(exc.status_code)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}; see /docs"
        return problem_response(
            request, status=exc.status_code, code=code, detail=detail, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        code, detail, errors = _validation_detail(exc)
        status = 400 if code == "bad_request" else 422
        return problem_response(request, status=status, code=code, detail=detail, extra={"errors": errors})

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def _broker_down(request: Request, exc: Exception) -> JSONResponse:
        log.error("Redis unreachable on %s %s: %s", request.method, request.url.path, exc)
        return problem_response(
            request,
            status=503,
            code="broker_unavailable",
            detail="the broker (Redis) does not answer; retry shortly (see /readyz)",
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception(
            "internal error on %s %s (request %s)", request.method, request.url.path, request_id_of(request)
        )
        return problem_response(
            request,
            status=500,
            code="internal",
            detail=f"internal error; quote request id {request_id_of(request)} when reporting it",
        )
