"""``GET /ui``: the result viewer, static HTML + CSS + JavaScript from ``service/ui/`` (package data).

The page holds no data: it calls the API from the browser with the key the user typed. So the page and
its files (exactly :data:`PUBLIC_PATHS`, GET and HEAD only) answer without an API key
(service/middleware.py). ``/`` and ``/ui/`` redirect to ``/ui``; the page's links are relative (it
works behind a path prefix). Every file is revalidated (``no-cache`` + ``ETag``) so an upgrade shows
at once; a Content-Security-Policy keeps the page to its own origin.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from ..errors import Problem

__all__ = ["ASSETS", "PUBLIC_PATHS", "router"]

#: Files of service/ui/ served under /ui/<name>, with their media types.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "viewer.js": "text/javascript; charset=utf-8",
    "jobs.js": "text/javascript; charset=utf-8",
    "main.js": "text/javascript; charset=utf-8",
}
#: Paths a GET (or HEAD) may fetch without an API key.
PUBLIC_PATHS = frozenset({"/", "/ui", "/ui/", *(f"/ui/{name}" for name in ASSETS)})

_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)

router = APIRouter(include_in_schema=False)


@cache
def _read(name: str) -> tuple[bytes, str]:
    data = resources.files("hsc.service").joinpath("ui", name).read_bytes()
    return data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


def _serve(request: Request, name: str) -> Response:
    data, etag = _read(name)
    headers = {
        "Cache-Control": "no-cache",
        "ETag": etag,
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": _CSP,
        "Referrer-Policy": "no-referrer",
    }
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=ASSETS[name], headers=headers)


@router.api_route("/", methods=["GET", "HEAD"])
def root() -> RedirectResponse:
    return RedirectResponse("ui", status_code=307)


@router.api_route("/ui/", methods=["GET", "HEAD"])
def slash() -> RedirectResponse:
    """The page's links are relative (it works behind a path prefix): one address only."""
    return RedirectResponse("../ui", status_code=307)


@router.api_route("/ui", methods=["GET", "HEAD"])
def page(request: Request) -> Response:
    """The viewer: upload an image, choose classes, see the mask, heatmaps and the jobs."""
    return _serve(request, "index.html")


@router.api_route("/ui/{name}", methods=["GET", "HEAD"])
def asset(name: str, request: Request) -> Response:
    if name not in ASSETS:
        raise Problem("not_found", f"no file {name!r} in the web page")
    return _serve(request, name)
