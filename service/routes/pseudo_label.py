"""``POST /pseudo-label``: one image and its image-level labels in, the mask and the extras out (D3).

Multipart (``image`` file, ``labels``, ``model``, ``crf``, ``bg_threshold``, ``outputs``,
``label_threshold``) or JSON with ``image_base64``. ``Accept: image/png`` answers the palette mask
alone; ``Prefer: respond-async`` makes it a one-image job (202 + ``Location``).

``labels=auto`` (any case) lets the model's image-level classifier choose the classes (probability
>= ``label_threshold``, default 0.5, else the top-1); the answer's ``labels`` block then has
``"source": "predicted"`` and the ``classifier_scores`` of every class.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from hsc.core.images import ImageError, ImageInfo, probe_image
from hsc.core.jobs import JobItem, job_dir, new_job_id

from ..deps import MetricsDep, RunnerDep, SettingsDep
from ..errors import PROBLEM_JSON, Problem
from ..options import (
    AUTO_LABELS,
    Options,
    default_model_id,
    is_auto,
    parse_options,
    resolve_labels,
    resolve_model,
    split_labels,
)
from ..runner import Runner
from ..submit import safe_item_id, start_job

router = APIRouter(tags=["pseudo-labels"])

_FORM_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "labels"],
                    "properties": {
                        "image": {
                            "type": "string",
                            "format": "binary",
                            "description": "JPEG, PNG, WebP, BMP or TIFF (first frame)",
                        },
                        "labels": {
                            "type": "string",
                            "description": "class names (any case) or indices "
                            "1..K, comma-separated, repeated, or a JSON list; background is implicit; "
                            "or `auto`: the classes the model's classifier predicts",
                        },
                        "label_threshold": {
                            "type": "number",
                            "minimum": 0,
                            "maximum": 1,
                            "default": 0.5,
                            "description": "with labels=auto: classes whose probability reaches it "
                            "(the top-1 when none does)",
                        },
                        "model": {"type": "string", "description": "model id (or id@sha256-prefix)"},
                        "crf": {"type": "boolean", "default": True},
                        "bg_threshold": {
                            "type": "number",
                            "minimum": 0,
                            "maximum": 1,
                            "description": "default: the model's",
                        },
                        "outputs": {
                            "type": "string",
                            "description": "comma list of mask, heatmaps, cams, "
                            "coco_rle, labelstudio, cvat (mask always)",
                        },
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["image_base64", "labels"],
                    "properties": {
                        "image_base64": {"type": "string"},
                        "filename": {"type": "string"},
                        "labels": {
                            "oneOf": [
                                {"type": "array", "items": {"type": ["string", "integer"]}},
                                {"type": "string", "description": "comma list, or `auto`"},
                            ]
                        },
                        "label_threshold": {"type": "number", "minimum": 0, "maximum": 1},
                        "model": {"type": "string"},
                        "crf": {"type": "boolean"},
                        "bg_threshold": {"type": "number"},
                        "outputs": {"type": "array", "items": {"type": "string"}},
                    },
                }
            },
        },
    }
}

_PROBLEMS: dict[int | str, dict[str, Any]] = {
    s: {"description": d, "content": {PROBLEM_JSON: {}}}
    for s, d in [
        (400, "malformed form or JSON"),
        (401, "API key missing or wrong"),
        (404, "unknown model"),
        (413, "image too large in bytes or pixels"),
        (415, "not an image / unknown container"),
        (422, "unknown_class (valid_classes listed), no_labels, corrupt_image, invalid_option"),
        (503, "no_worker, queue_full, model_loading (Retry-After)"),
        (504, "timeout"),
    ]
}


@dataclass
class _Input:
    image: bytes
    filename: str
    labels: list[str | int]
    options: Options


async def _read_input(request: Request, max_bytes: int) -> _Input:
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=2, max_fields=64)
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise Problem("bad_request", "multipart field 'image' (the image file) is missing")
        data = await upload.read(max_bytes + 1)
        fields: dict[str, Any] = {k: form.get(k) for k in ("model", "crf", "bg_threshold", "label_threshold")}
        outputs = [v for v in form.getlist("outputs") if isinstance(v, str)]
        fields["outputs"] = ",".join(outputs) if outputs else None
        labels = split_labels(v for v in form.getlist("labels") if isinstance(v, str))
        return _Input(data, upload.filename or "image", labels, parse_options(fields))
    if ctype.startswith("application/json"):
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise Problem("bad_request", "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise Problem("bad_request", "the JSON body must be an object")
        b64 = body.get("image_base64")
        if not isinstance(b64, str) or not b64:
            raise Problem("bad_request", "JSON field 'image_base64' (the image, base64) is missing")
        if len(b64) > (max_bytes + 2) * 4 // 3 + 4:
            raise Problem("too_large", f"image over the limit of {max_bytes} bytes (HSC_MAX_UPLOAD_BYTES)")
        try:
            data = base64.b64decode(b64.split(",", 1)[-1] if b64.startswith("data:") else b64, validate=True)
        except (binascii.Error, ValueError):
            raise Problem("bad_request", "image_base64 is not valid base64") from None
        raw = body.get("labels")
        labels = split_labels([raw] if raw is not None else [])
        fields = {k: body.get(k) for k in ("model", "crf", "bg_threshold", "outputs", "label_threshold")}
        return _Input(data, str(body.get("filename") or "image"), labels, parse_options(fields))
    raise Problem(
        "unsupported_media",
        f"request content type {ctype or 'none'!r}: send multipart/form-data with "
        "an 'image' file field, or JSON with 'image_base64'",
    )


def _with_auto(inp: _Input) -> _Input:
    """``labels=auto`` (any case, alone) switches the options to the classifier's labels."""
    if is_auto(inp.labels):
        return replace(inp, labels=[AUTO_LABELS], options=replace(inp.options, labels=AUTO_LABELS))
    if any(is_auto(label) for label in inp.labels):
        raise Problem(
            "invalid_option",
            "labels: 'auto' cannot be mixed with class names; give either the classes or auto",
            extra={"field": "labels"},
        )
    return inp


def _probe(data: bytes, max_bytes: int, max_pixels: int) -> ImageInfo:
    if not data:
        raise Problem("unsupported_media", "the image is empty")
    try:
        return probe_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    except ImageError as e:
        raise Problem(e.code, e.detail, status=e.status) from None


def _wants_png(request: Request) -> bool:
    accept = request.headers.get("accept", "").lower()
    if "image/png" not in accept:
        return False
    best: tuple[float, str] = (-1.0, "")
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        if media in ("image/png", "application/json", "application/*") and q > best[0]:
            best = (q, media)
    return best[1] == "image/png"


def _wants_async(request: Request) -> bool:
    prefer = request.headers.get("prefer", "").lower()
    return any(p.strip().split("=")[0] == "respond-async" for p in prefer.replace(";", ",").split(","))


def _start_single_job(
    runner: Runner, inp: _Input, info: ImageInfo, card: dict[str, Any], channels: tuple[int, ...]
) -> dict[str, Any]:
    jid = new_job_id()
    folder = runner.settings.results_dir / "uploads" / jid
    folder.mkdir(parents=True, exist_ok=True)
    item_id = safe_item_id(inp.filename)
    path = folder / f"{item_id}.{info.format.lower()}"
    path.write_bytes(inp.image)
    job_dir(runner.settings.results_dir, jid).mkdir(parents=True, exist_ok=True)
    item = JobItem(index=0, id=item_id, image=str(path.resolve()), labels=channels)
    requested: list[str | int] | str = AUTO_LABELS if inp.options.auto_labels else list(inp.labels)
    dataset = {"kind": "single", "filename": inp.filename, "labels_requested": requested}
    return start_job(
        runner, job_id=jid, card=card, options=inp.options, items=[item], dataset=dataset, kind="single"
    )


@router.post(
    "/pseudo-label",
    summary="Pseudo-label one image",
    openapi_extra=_FORM_SCHEMA,
    responses={
        200: {"content": {"image/png": {}}, "description": "the result (or the palette PNG)"},
        202: {"description": "Prefer: respond-async: the job"},
        **_PROBLEMS,
    },
)
async def pseudo_label(
    request: Request, settings: SettingsDep, runner: RunnerDep, metrics: MetricsDep
) -> Response:
    """One image + its image-level labels -> mask (PNG, base64) and the requested extras."""
    inp = _with_auto(await _read_input(request, settings.max_upload_bytes))
    if not inp.labels:
        raise Problem(
            "no_labels",
            "field 'labels' is missing or empty: give the image-level labels "
            "(names or indices, comma-separated)",
        )
    info = _probe(inp.image, settings.max_upload_bytes, settings.max_pixels)
    cards = await anyio.to_thread.run_sync(runner.models)
    card = resolve_model(cards, inp.options.model, default_model_id(settings))
    channels = () if inp.options.auto_labels else resolve_labels(card, inp.labels)
    if _wants_async(request):
        job = await anyio.to_thread.run_sync(lambda: _start_single_job(runner, inp, info, card, channels))
        return JSONResponse(
            job,
            status_code=202,
            headers={
                "Location": f"/jobs/{job['id']}",
                "Retry-After": "1",
                "Preference-Applied": "respond-async",
            },
        )
    await anyio.to_thread.run_sync(runner.check_queue, "image")
    rid = request.state.request_id
    task = {
        "request_id": rid,
        "model": str(card["id"]),
        "labels": AUTO_LABELS if inp.options.auto_labels else list(channels),
        "labels_requested": AUTO_LABELS if inp.options.auto_labels else list(inp.labels),
        "crf": inp.options.crf,
        "bg_threshold": inp.options.bg_threshold,
        "outputs": list(inp.options.outputs),
        "enqueued_at": time.time(),
    }
    if inp.options.auto_labels:
        task["label_threshold"] = inp.options.effective_label_threshold
    result = await runner.pseudo_label(task, inp.image, settings.sync_timeout_s)
    err = result.get("error")
    if isinstance(err, dict):
        metrics.images.labels(model=str(card["id"]), outcome=str(err.get("code", "error"))).inc()
        raise Problem(
            str(err.get("code", "internal")),
            str(err.get("detail", "the worker failed")),
            status=int(err.get("status", 500)),
        )
    metrics.observe_result(str(card["id"]), result.get("timings_ms") or {})
    if _wants_png(request):
        png = base64.b64decode(result["mask"]["data"])
        present = ",".join(f"{c['index']}:{quote(str(c['name']))}" for c in result.get("classes", []))
        headers = {
            "X-HSC-Model": f"{card['id']}@{str(card.get('sha256', ''))[:12]}",
            "X-HSC-Model-SHA256": str(card.get("sha256", "")),
            "X-HSC-Classes": present,
            "X-HSC-Quality": f"{float(result.get('quality', 0.0)):.4f}",
        }
        return Response(png, media_type="image/png", headers=headers)
    return JSONResponse(result)
