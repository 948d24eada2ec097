"""Batch jobs (D4): create from a server-side dataset or an uploaded archive, list, status, cancel,
resume, retry, per-item results and artifacts, and the streamed archive of the results.

Job records live in the runner's store (Redis or disk), never in Celery's result entries; the routes
that only touch the store are plain functions (FastAPI runs them in its thread pool).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile

from hsc.core.archives import ArchiveError, extract_upload, items_from_index, iter_archive
from hsc.core.datasets import DatasetError, DatasetIndex, open_manifest, open_voc
from hsc.core.jobs import JOB_STATUSES, TERMINAL, JobItem, JobStore, is_safe_name, job_dir, new_job_id

from .. import events
from ..deps import RunnerDep, SettingsDep, StoreDep
from ..errors import Problem
from ..options import OPTION_FIELDS, Options, default_model_id, parse_options, resolve_model
from ..runner import Runner, chunk_ranges
from ..submit import job_view, start_job

router = APIRouter(tags=["jobs"])

ARCHIVE_FORMATS = ("voc", "coco", "labelstudio", "cvat-segmask", "raw")
#: An uploaded archive may expand to this many times ``HSC_MAX_UPLOAD_BYTES``.
UPLOAD_EXPANSION = 8
MANIFEST_NAME = "manifest.jsonl"
_COPY_CHUNK = 1024 * 1024
#: A heatmap file name without ``.png`` (the worker replaces anything else by ``_``).
_CLASS_FILE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


# --------------------------------------------------------------------------------------------------
# helpers


def _get_job(store: JobStore, job_id: str) -> dict[str, Any]:
    job = store.get_job(job_id) if is_safe_name(job_id) else None
    if job is None:
        raise Problem("not_found", f"no job {job_id!r} (unknown, or purged)")
    return job


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def _allowed_roots(settings_roots: list[str]) -> list[Path]:
    return [Path(r).expanduser().resolve() for r in settings_roots if r]


def _check_images_under(index: DatasetIndex, roots: list[Path], what: str) -> None:
    outside = [str(it.image) for it in index.items if not _under(Path(it.image).resolve(), roots)]
    if outside:
        raise Problem(
            "forbidden", f"{len(outside)} image(s) of the dataset lie outside {what}, e.g. {outside[0]}"
        )


def _model_items(index: DatasetIndex, card: Mapping[str, Any]) -> list[JobItem]:
    """The dataset's items with their labels mapped onto the model's channels (by class name)."""
    fg = [str(c).lower() for c in card["classes"][1:]]
    mapping: dict[int, int] = {}
    unknown = []
    for i, name in enumerate(index.classes):
        if name.lower() in fg:
            mapping[i] = fg.index(name.lower())
        else:
            unknown.append(name)
    if unknown:
        raise Problem(
            "unknown_class",
            f"the dataset's class(es) {', '.join(map(repr, unknown))} are not classes "
            f"of model {card['id']!r}",
            extra={"valid_classes": list(card["classes"][1:])},
        )
    items = items_from_index(index)
    return [dataclasses.replace(it, labels=tuple(sorted({mapping[c] for c in it.labels}))) for it in items]


def _open_server_dataset(spec: Mapping[str, Any], roots: list[Path], card: Mapping[str, Any]) -> DatasetIndex:
    kind = spec.get("kind", "manifest")
    raw = spec.get("path", spec.get("root"))
    split = spec.get("split")
    if kind not in ("manifest", "voc"):
        raise Problem(
            "invalid_option", f"dataset.kind {kind!r}: use 'manifest' or 'voc'", extra={"field": "kind"}
        )
    if not isinstance(raw, str) or not raw:
        raise Problem(
            "invalid_option",
            "dataset.path (a file or folder on the server) is missing",
            extra={"field": "dataset.path"},
        )
    if split is not None and not isinstance(split, str):
        raise Problem("invalid_option", "dataset.split must be a string", extra={"field": "dataset.split"})
    if not roots:
        raise Problem(
            "forbidden", "server-side datasets are off (HSC_ALLOWED_ROOTS is empty); upload an archive"
        )
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise Problem(
            "invalid_option", f"dataset.path {raw!r} must be absolute", extra={"field": "dataset.path"}
        )
    path = path.resolve()
    if not _under(path, roots):
        raise Problem("forbidden", f"{raw} is outside the allowed roots (HSC_ALLOWED_ROOTS)")
    if not path.exists():
        raise Problem("invalid_dataset", f"{raw}: no such file or folder")
    fg = list(card["classes"][1:])
    try:
        if kind == "voc":
            index = open_voc(path, split, default_classes=fg)
        else:
            manifest = path / MANIFEST_NAME if path.is_dir() else path
            index = open_manifest(manifest, split, default_classes=fg)
    except DatasetError as e:
        raise Problem("invalid_dataset", str(e), extra={"problems": e.problems[:50]}) from None
    _check_images_under(index, roots, "the allowed roots")
    return index


def _fingerprint(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _accepted(job: Mapping[str, Any], *, replayed: bool = False) -> JSONResponse:
    headers = {"Location": f"/jobs/{job['id']}", "Retry-After": "2"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(dict(job), status_code=202, headers=headers)


def _create(
    runner: Runner,
    *,
    job_id: str,
    key: str | None,
    fingerprint: str,
    card: Mapping[str, Any],
    options: Options,
    items: list[JobItem],
    dataset: Mapping[str, Any],
    kind: str,
) -> JSONResponse:
    """Honour ``Idempotency-Key``, then start the job."""
    store = runner.store
    if key:
        claim = store.claim_idempotency(key, fingerprint, job_id, runner.settings.idempotency_ttl_h * 3600.0)
        if claim is not None:
            first, same = claim
            if not same:
                raise Problem(
                    "idempotency_mismatch",
                    f"Idempotency-Key {key!r} was used for another request (job {first}); use a new key",
                    extra={"job_id": first},
                )
            job = store.get_job(first)
            if job is None:
                raise Problem(
                    "conflict",
                    f"the request with Idempotency-Key {key!r} is still being accepted; retry in a moment",
                    extra={"job_id": first},
                    headers={"Retry-After": "1"},
                )
            return _accepted(job_view(job), replayed=True)
    try:
        job = start_job(
            runner,
            job_id=job_id,
            card=card,
            options=options,
            items=items,
            dataset=dataset,
            kind=kind,
            idempotency_key=key,
        )
    except BaseException:
        if key:
            store.release_idempotency(key, job_id)
        raise
    return _accepted(job)


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    key = key.strip().strip('"')
    if not key or len(key) > 255:
        raise Problem("bad_request", "Idempotency-Key must be 1-255 characters")
    return key


# --------------------------------------------------------------------------------------------------
# create


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise Problem("bad_request", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Problem("bad_request", "the JSON body must be an object with 'dataset' and 'options'")
    return body


def _options_of(value: Any) -> Options:
    if value is None:
        return parse_options({}, strict=True)
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            raise Problem("bad_request", "'options' is not valid JSON") from None
    if not isinstance(value, dict):
        raise Problem("invalid_option", "'options' must be an object", extra={"field": "options"})
    return parse_options(value, strict=True)


def _save_upload(upload: UploadFile, dest: Path, max_bytes: int) -> str:
    """Copy the spooled upload to ``dest``; returns its sha256. 413 when over ``max_bytes``."""
    h = hashlib.sha256()
    size = 0
    upload.file.seek(0)
    with open(dest, "wb") as out:
        while chunk := upload.file.read(_COPY_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise Problem(
                    "too_large", f"archive over the limit of {max_bytes} bytes (HSC_MAX_UPLOAD_BYTES)"
                )
            h.update(chunk)
            out.write(chunk)
    if size == 0:
        raise Problem("invalid_archive", "the uploaded archive is empty")
    return h.hexdigest()


def _find_manifest(root: Path) -> Path:
    if (root / MANIFEST_NAME).is_file():
        return root / MANIFEST_NAME
    found = sorted(root.glob(f"*/{MANIFEST_NAME}"))
    if len(found) == 1:
        return found[0]
    raise Problem(
        "invalid_dataset",
        f"the archive holds no {MANIFEST_NAME} at its top level (one JSON object a "
        'line: {"image": "relative/path.jpg", "labels": ["name", ...]})',
    )


def _check_manifest_paths(manifest: Path, root: Path) -> None:
    """403 when an uploaded manifest names a file outside the upload, before anything is opened (so
    the answers cannot tell which files exist on the server)."""
    base = manifest.parent
    with open(manifest, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # the dataset reader reports it
            if not isinstance(rec, dict):
                continue
            for key in ("image", "mask", "saliency"):
                value = rec.get(key)
                if isinstance(value, str) and value and not _under((base / value).resolve(), [root]):
                    raise Problem(
                        "forbidden",
                        f"{MANIFEST_NAME}:{lineno}: {key} {value!r} lies outside the uploaded archive",
                    )


def _accept_upload(
    runner: Runner, upload: UploadFile, options: Options, key: str | None, split: str | None
) -> JSONResponse:
    settings = runner.settings
    card = resolve_model(runner.models(), options.model, default_model_id(settings))
    jid = new_job_id()
    folder = settings.results_dir / "uploads" / jid
    folder.mkdir(parents=True, exist_ok=True)
    try:
        archive = folder / ".upload"
        digest = _save_upload(upload, archive, settings.max_upload_bytes)
        data = folder / "data"
        try:
            root = extract_upload(
                archive,
                data,
                max_bytes=settings.max_upload_bytes * UPLOAD_EXPANSION,
                max_files=settings.max_job_items * 4 + 16,
            )
        except ArchiveError as e:
            raise Problem(e.code, e.detail, status=e.status) from None
        finally:
            archive.unlink(missing_ok=True)
        manifest = _find_manifest(root)
        _check_manifest_paths(manifest, data.resolve())
        try:
            index = open_manifest(manifest, split, default_classes=list(card["classes"][1:]))
        except DatasetError as e:
            raise Problem("invalid_dataset", str(e), extra={"problems": e.problems[:50]}) from None
        _check_images_under(index, [data.resolve()], "the uploaded archive")
        items = _model_items(index, card)
        fingerprint = _fingerprint(
            {"archive": digest, "options": options.as_dict(str(card["id"])), "split": split}
        )
        dataset = {
            "kind": "upload",
            "filename": upload.filename,
            "sha256": digest,
            "split": split,
            "classes": list(index.classes),
        }
        response = _create(
            runner,
            job_id=jid,
            key=key,
            fingerprint=fingerprint,
            card=card,
            options=options,
            items=items,
            dataset=dataset,
            kind="upload",
        )
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if response.headers.get("Idempotent-Replayed"):
        shutil.rmtree(folder, ignore_errors=True)
    return response


def _accept_dataset(runner: Runner, body: Mapping[str, Any], key: str | None) -> JSONResponse:
    unknown = sorted(set(body) - {"dataset", "options"})
    if unknown:
        raise Problem(
            "invalid_option",
            f"unknown field(s) {', '.join(unknown)}; a job takes 'dataset' and 'options'",
            extra={"field": unknown[0]},
        )
    spec = body.get("dataset")
    if not isinstance(spec, dict):
        raise Problem(
            "bad_request",
            '\'dataset\' is missing: {"kind": "manifest"|"voc", "path": ..., '
            "\"split\": ...} (or upload an archive as multipart field 'archive')",
        )
    options = _options_of(body.get("options"))
    settings = runner.settings
    card = resolve_model(runner.models(), options.model, default_model_id(settings))
    index = _open_server_dataset(spec, _allowed_roots(settings.allowed_roots), card)
    items = _model_items(index, card)
    dataset = {
        "kind": spec.get("kind", "manifest"),
        "path": str(spec.get("path", spec.get("root"))),
        "split": spec.get("split"),
        "classes": list(index.classes),
    }
    fingerprint = _fingerprint({"dataset": dataset, "options": options.as_dict(str(card["id"]))})
    jid = new_job_id()
    job_dir(settings.results_dir, jid).mkdir(parents=True, exist_ok=True)
    return _create(
        runner,
        job_id=jid,
        key=key,
        fingerprint=fingerprint,
        card=card,
        options=options,
        items=items,
        dataset=dataset,
        kind="dataset",
    )


_CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["dataset"],
                    "properties": {
                        "dataset": {
                            "type": "object",
                            "properties": {
                                "kind": {"type": "string", "enum": ["manifest", "voc"]},
                                "path": {
                                    "type": "string",
                                    "description": "absolute, under HSC_ALLOWED_ROOTS",
                                },
                                "split": {"type": "string"},
                            },
                        },
                        "options": {
                            "type": "object",
                            "properties": {
                                "model": {"type": "string"},
                                "crf": {"type": "boolean"},
                                "bg_threshold": {"type": "number"},
                                "outputs": {"type": "array", "items": {"type": "string"}},
                                "webhook": {
                                    "type": "object",
                                    "required": ["url"],
                                    "properties": {
                                        "url": {"type": "string", "description": "http(s)"},
                                        "events": {
                                            "type": "array",
                                            "items": {
                                                "type": "string",
                                                "enum": ["started", "progress", "completed"],
                                            },
                                        },
                                        "secret": {"type": "string", "description": "HMAC key"},
                                    },
                                },
                            },
                        },
                    },
                }
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["archive"],
                    "properties": {
                        "archive": {
                            "type": "string",
                            "format": "binary",
                            "description": "zip or tar(.gz) of images plus manifest.jsonl",
                        },
                        "options": {"type": "string", "description": "JSON object, as in the JSON body"},
                        "split": {"type": "string"},
                    },
                }
            },
        },
    }
}


@router.post("/jobs", status_code=202, summary="Start a dataset job", openapi_extra=_CREATE_BODY)
async def create_job(request: Request, runner: RunnerDep) -> JSONResponse:
    """A server-side dataset (JSON) or an uploaded zip/tar with ``manifest.jsonl`` (multipart).
    ``Idempotency-Key``: the same key and payload answer the first job; another payload 422."""
    import anyio

    key = _idempotency_key(request)
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=2, max_fields=32)
        upload = form.get("archive")
        if not isinstance(upload, UploadFile):
            raise Problem(
                "bad_request",
                "multipart field 'archive' (a zip or tar of images + manifest.jsonl) is missing",
            )
        raw = form.get("options")
        if raw is None:  # the options as separate fields, as POST /pseudo-label takes them
            options = parse_options({k: v for k in OPTION_FIELDS if isinstance(v := form.get(k), str)})
        else:
            options = _options_of(raw)
        split = form.get("split")
        split = split if isinstance(split, str) and split else None
        return await anyio.to_thread.run_sync(lambda: _accept_upload(runner, upload, options, key, split))
    if ctype.startswith("application/json"):
        body = await _json_body(request)
        return await anyio.to_thread.run_sync(lambda: _accept_dataset(runner, body, key))
    raise Problem(
        "unsupported_media",
        f'content type {ctype or "none"!r}: send JSON {{"dataset": ...}} or a '
        "multipart form with an 'archive' file",
    )


# --------------------------------------------------------------------------------------------------
# read, cancel, resume


@router.get("/jobs", summary="List jobs")
def list_jobs(
    store: StoreDep,
    status: str | None = None,
    limit: int = Query(50, ge=1, le=1000),
    cursor: str | None = None,
) -> dict[str, Any]:
    """Newest first; ``status`` filters; ``next_cursor`` pages."""
    if status is not None and status not in JOB_STATUSES:
        raise Problem(
            "invalid_option",
            f"status {status!r}; valid: {', '.join(JOB_STATUSES)}",
            extra={"field": "status"},
        )
    if cursor is not None and not is_safe_name(cursor):
        raise Problem("invalid_option", "cursor is not one this API gave", extra={"field": "cursor"})
    jobs, next_cursor = store.list_jobs(status=status, limit=limit, cursor=cursor)
    return {"jobs": [job_view(j) for j in jobs], "next_cursor": next_cursor}


@router.get("/jobs/{job_id}", summary="Job status")
def get_job(job_id: str, store: StoreDep) -> dict[str, Any]:
    """Status, progress (done/failed/skipped/total), rate, ETA, errors sample, links."""
    return job_view(_get_job(store, job_id))


@router.get(
    "/jobs/{job_id}/events",
    summary="Job events (server-sent events)",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(job_id: str, request: Request, store: StoreDep) -> StreamingResponse:
    """``status`` (the job object), then ``progress``, ``item_failed``, and a final ``completed`` /
    ``failed`` / ``cancelled``; then the stream ends. Event ids let a client resume with
    ``Last-Event-ID``; a comment every 15 s keeps the connection open."""
    import anyio

    job = await anyio.to_thread.run_sync(_get_job, store, job_id)
    stream = events.job_events(store, job, request, request.headers.get("last-event-id"))
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.delete(
    "/jobs/{job_id}",
    summary="Cancel a job, or purge a finished one",
    responses={202: {"description": "cancelling"}, 204: {"description": "purged"}},
)
def delete_job(job_id: str, runner: RunnerDep, purge: bool = False) -> Response:
    """Cancel (202, stops between images); ``?purge=true`` on a finished job deletes its results (204)."""
    store = runner.store
    job = _get_job(store, job_id)
    if job["status"] in TERMINAL:
        if not purge:
            raise Problem(
                "conflict", f"job {job_id} already {job['status']}; DELETE ?purge=true deletes its results"
            )
        store.delete_job(job_id)
        if job.get("idempotency_key"):  # the key may name a new job now
            store.release_idempotency(str(job["idempotency_key"]), job_id)
        shutil.rmtree(job_dir(runner.settings.results_dir, job_id), ignore_errors=True)
        shutil.rmtree(runner.settings.results_dir / "uploads" / job_id, ignore_errors=True)
        return Response(status_code=204)
    if purge:
        raise Problem(
            "conflict", f"job {job_id} is {job['status']}: cancel it first, purge once it has stopped"
        )
    # the status before the flag: a chunk that sees the flag finds "cancelling" and ends the job
    store.update(job_id, status="cancelling", if_status=("queued", "running"))
    store.request_cancel(job_id)
    store.finish_if_complete(job_id)
    return JSONResponse(job_view(_get_job(store, job_id)), status_code=202)


def _requeue(runner: Runner, job_id: str) -> JSONResponse:
    store = runner.store
    pending = store.pending_indices(job_id)
    if not pending:
        store.finish_if_complete(job_id)
        return JSONResponse(job_view(_get_job(store, job_id)), status_code=200)
    runner.check_queue("chunk")
    store.clear_cancel(job_id)
    store.update(job_id, status="queued", finished_at=None, if_status=tuple(TERMINAL))
    runner.enqueue_chunks(job_id, chunk_ranges(pending, runner.settings.job_chunk))
    runner.job_queued(job_id)
    return JSONResponse(
        job_view(_get_job(store, job_id)), status_code=202, headers={"Location": f"/jobs/{job_id}"}
    )


@router.post("/jobs/{job_id}/resume", summary="Resume a stopped job")
def resume_job(job_id: str, runner: RunnerDep) -> JSONResponse:
    """Re-enqueue the items not yet done (202); 409 while the job runs."""
    job = _get_job(runner.store, job_id)
    if job["status"] not in TERMINAL:
        raise Problem("conflict", f"job {job_id} is {job['status']}; resume a cancelled or finished job")
    return _requeue(runner, job_id)


@router.post("/jobs/{job_id}/retry-failed", summary="Retry the failed items")
def retry_failed(job_id: str, runner: RunnerDep) -> JSONResponse:
    """Make the failed items pending again and re-enqueue them (202); 409 while the job runs."""
    job = _get_job(runner.store, job_id)
    if job["status"] not in TERMINAL:
        raise Problem("conflict", f"job {job_id} is {job['status']}; retry once it has stopped")
    runner.store.clear_failed(job_id)
    return _requeue(runner, job_id)


# --------------------------------------------------------------------------------------------------
# items and results


@router.get("/jobs/{job_id}/items", summary="Per-image states")
def list_items(
    job_id: str,
    store: StoreDep,
    status: Literal["pending", "done", "failed", "skipped"] | None = None,
    cursor: int = Query(0, ge=0),
    limit: int = Query(100, ge=1, le=1000),
) -> dict[str, Any]:
    """``[{index, id, state, code, detail}]``; ``next_cursor`` pages."""
    _get_job(store, job_id)
    items = store.item_states(job_id, status=status, start=cursor, limit=limit + 1)
    more = len(items) > limit
    return {"items": items[:limit], "next_cursor": cursor + limit if more else None}


def _item_of(store: JobStore, job_id: str, item_id: str) -> JobItem:
    _get_job(store, job_id)
    item = store.find_item(job_id, item_id) if is_safe_name(item_id) else None
    if item is None:
        raise Problem("not_found", f"job {job_id} has no item {item_id!r}")
    return item


@router.get("/jobs/{job_id}/items/{item_id}", summary="The result of one image")
def get_item(job_id: str, item_id: str, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    """The per-image result (the /pseudo-label schema with artifact paths) once done, else its state."""
    item = _item_of(store, job_id, item_id)
    state = store.item_states(job_id, start=item.index, limit=1)[0]
    path = job_dir(settings.results_dir, job_id) / "items" / f"{item.id}.json"
    base = f"/jobs/{job_id}/items/{item.id}"
    links = {"self": base, "mask": f"{base}/mask.png", "cams": f"{base}/cams.npz"}
    if state["state"] != "done" or not path.is_file():
        return {**state, "links": links}
    result = json.loads(path.read_bytes())
    heatmaps = result.get("heatmaps")
    if isinstance(heatmaps, dict):
        links["heatmaps"] = {  # type: ignore[assignment]
            name: f"{base}/heatmaps/{PurePosixPath(str(h.get('path', name + '.png'))).name}"
            for name, h in heatmaps.items()
            if isinstance(h, dict)
        }
    return {**state, "result": result, "links": links}


@router.get(
    "/jobs/{job_id}/items/{item_id}/{artifact:path}",
    summary="A file of one image's result",
    response_class=FileResponse,
)
def get_artifact(
    job_id: str, item_id: str, artifact: str, store: StoreDep, settings: SettingsDep
) -> FileResponse:
    """``mask.png`` (VOC palette), ``cams.npz``, ``heatmaps/<class>.png``."""
    item = _item_of(store, job_id, item_id)
    root = job_dir(settings.results_dir, job_id)
    if artifact == "mask.png":
        path, media = root / "masks" / f"{item.id}.png", "image/png"
    elif artifact == "cams.npz":
        path, media = root / "cams" / f"{item.id}.npz", "application/octet-stream"
    elif artifact.startswith("heatmaps/") and artifact.endswith(".png"):
        name = artifact[len("heatmaps/") : -len(".png")]
        if not _CLASS_FILE.fullmatch(name):
            raise Problem("not_found", f"no heatmap {name!r}")
        path, media = root / "heatmaps" / item.id / f"{name}.png", "image/png"
    else:
        raise Problem(
            "not_found", f"no artifact {artifact!r}; available: mask.png, cams.npz, heatmaps/<class>.png"
        )
    if not path.is_file():
        raise Problem("not_found", f"{artifact} of item {item.id} is not there (not done, or not asked for)")
    return FileResponse(path, media_type=media, filename=f"{item.id}-{os.path.basename(artifact)}")


@router.get(
    "/jobs/{job_id}/archive",
    summary="Streamed zip of the results",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/zip": {}}}},
)
def archive(
    job_id: str,
    store: StoreDep,
    settings: SettingsDep,
    format: Literal["voc", "coco", "labelstudio", "cvat-segmask", "raw"] = "voc",
    partial: bool = False,
) -> StreamingResponse:
    """The finished items as a zip, built while it streams; 409 before the job ends unless ``partial``."""
    job = _get_job(store, job_id)
    if job["status"] not in TERMINAL and not partial:
        raise Problem(
            "conflict",
            f"job {job_id} is {job['status']} ({job['progress']['percent']}%); wait for it "
            "to finish or ask ?partial=true",
        )
    items = store.get_items(job_id, 0, int(job["total"]))
    classes = list((job.get("model_card") or {}).get("classes") or [])
    chunks = iter_archive(job_dir(settings.results_dir, job_id), items, format, classes)
    name = f"{job_id}-{format}.zip"
    return StreamingResponse(
        chunks,
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
