"""hsc as a Label Studio ML backend (docs/product.md A1, D7).

Paste ``http://<hsc>/integrations/label-studio`` as the model URL of a Label Studio project; with API keys
on, give the connection HTTP Basic auth (any user name, an hsc key as the password). Label Studio
appends the route names:

- ``GET health`` (also ``GET`` on the base URL, and ``GET /health``): ``{"status": "UP", "model_class":
  "HSC"}`` at once; touches neither the pool nor Redis.
- ``POST setup``: parses the labeling config (``schema``), remembers the ``from_name``/``to_name`` of
  the first ``<BrushLabels>`` (or ``<BitmaskLabels>``) on an ``<Image>``, maps the model's classes onto
  its ``<Label>`` values (``predicted_values`` attribute, then exact, then case-insensitive names) and
  answers ``{"model_version": "<model id>@<sha256[:12]>"}``.
- ``POST predict``: per task, the image-level labels from (1) the task data field
  :data:`LABELS_FIELD` (a list or a comma string), else (2) the ``<Choices>`` on the same image of the
  latest annotation or draft, else (3) the ``context.result`` choices (interactive mode); the image from
  the task data (an http(s) URL, a Label Studio path ``/data/...`` fetched from ``LABEL_STUDIO_URL``
  with ``Authorization: Token LABEL_STUDIO_API_KEY``, a cloud URI through the task's presign link, a
  ``data:`` URI, or a local path under ``HSC_ALLOWED_ROOTS``); then the same runner call as
  ``POST /pseudo-label`` (EXIF orientation applied by the worker). The answer is ``{"results": [one
  prediction per task, in order]}``: one region per present class at the oriented size, region
  ``score`` = the class's mean confidence, prediction ``score`` = the image's ``quality``,
  ``model_version``. A task without labels, or whose image fails, gets an empty ``result`` (logged);
  it never fails the others.
- ``POST webhook``: 200 ``{}`` (no training).

The projects' parsed configs live in this process (``app.state``); ``predict`` parses the
``label_config`` Label Studio sends with every call, so nothing depends on ``setup`` having reached the
same API process.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import http.client
import io
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit
from urllib.request import url2pathname

import anyio
import numpy as np
from fastapi import APIRouter, Request
from PIL import Image

from hsc.core.encoders import mask_from_base64_png
from hsc.core.images import ImageError, probe_image
from hsc.core.results import DEFAULT_LABELSTUDIO, model_version
from hsc.core.settings import Settings

from ..deps import MetricsDep, RunnerDep, SettingsDep
from ..errors import Problem
from ..metrics import Metrics
from ..options import default_model_id, resolve_labels, split_labels
from ..runner import Runner

__all__ = [
    "LABELS_FIELD",
    "MODEL_CLASS",
    "PREFIX",
    "FetchError",
    "LabelConfig",
    "LabelTag",
    "build_label_map",
    "fetch_image",
    "parse_label_config",
    "router",
    "task_labels",
]

log = logging.getLogger("hsc.service.labelstudio")

PREFIX = "/integrations/label-studio"
#: ``model_class`` of the health answer.
MODEL_CLASS = "HSC"
#: Task data field holding the image-level labels when ``HSC_LS_LABELS_FIELD`` is empty.
LABELS_FIELD = "labels"
#: Tasks of one ``/predict`` in flight at once (fetching and waiting for the runner).
PREDICT_CONCURRENCY = 4
#: Longest wait for one image download.
FETCH_TIMEOUT_S = 30.0
#: Projects whose setup is remembered per API process.
MAX_PROJECTS = 1000
#: URI schemes of cloud storage that Label Studio resolves through ``/tasks/{id}/presign/``.
CLOUD_SCHEMES = frozenset({"s3", "gs", "gcs", "azure-blob", "azure"})

_SEGMENTATION_CONTROLS = ("brushlabels", "bitmasklabels")
_DTD = re.compile(r"<!\s*(doctype|entity)", re.IGNORECASE)

router = APIRouter(tags=["label-studio"])


# --------------------------------------------------------------------------------------------------
# the labeling config


class ConfigError(ValueError):
    """A labeling config hsc cannot predict for."""


@dataclass(frozen=True)
class LabelTag:
    """A ``<Label>`` or ``<Choice>``: its ``value``, the ``alias`` results carry instead (if any), and
    its ``predicted_values`` (model class names it stands for)."""

    value: str
    alias: str | None = None
    predicted: tuple[str, ...] = ()

    @property
    def output(self) -> str:
        """What a result names it by."""
        return self.alias or self.value


@dataclass(frozen=True)
class LabelConfig:
    """What ``predict`` needs from a project's labeling config."""

    kind: str  # "brushlabels" or "bitmasklabels": the region type answered
    from_name: str
    to_name: str
    image_value: str  # the <Image> value attribute, "$image" = the task data key "image"
    labels: tuple[LabelTag, ...]
    choices: tuple[LabelTag, ...] = ()  # <Choice> tags of <Choices> on the same image


def _tag(el: ET.Element) -> str:
    return str(el.tag).rpartition("}")[2].lower()


def _attrs(el: ET.Element) -> dict[str, str]:
    return {k.rpartition("}")[2].lower(): v for k, v in el.attrib.items()}


def _targets(attrs: Mapping[str, str]) -> list[str]:
    return [t.strip() for t in attrs.get("toname", "").split(",") if t.strip()]


def _label_tags(control: ET.Element, child: str) -> tuple[LabelTag, ...]:
    out = []
    for el in control.iter():
        if _tag(el) != child:
            continue
        a = _attrs(el)
        value = a.get("value", "").strip()
        if not value:
            continue
        predicted = tuple(p.strip() for p in a.get("predicted_values", "").split(",") if p.strip())
        out.append(LabelTag(value=value, alias=a.get("alias") or None, predicted=predicted))
    return tuple(out)


def parse_label_config(xml: str) -> LabelConfig:
    """The first ``<BrushLabels>``/``<BitmaskLabels>`` on an ``<Image>`` of a Label Studio labeling config,
    its ``<Label>`` tags and the ``<Choice>`` tags of the ``<Choices>`` on the same image.

    Raises :class:`ConfigError` (not XML, a DTD or entities, no such control).
    """
    if not isinstance(xml, str) or not xml.strip():
        raise ConfigError("the labeling config is empty")
    if _DTD.search(xml):
        raise ConfigError("a labeling config with a DOCTYPE or entities is not accepted")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise ConfigError(f"the labeling config is not valid XML: {e}") from None
    elements = list(root.iter())
    images = {}
    for el in elements:
        a = _attrs(el)
        if _tag(el) == "image" and a.get("name"):
            images[a["name"]] = a.get("value", "")
    for el in elements:
        kind = _tag(el)
        if kind not in _SEGMENTATION_CONTROLS:
            continue
        a = _attrs(el)
        image = next((t for t in _targets(a) if t in images), None)
        if not a.get("name") or image is None:
            continue
        choices: list[LabelTag] = []
        for other in elements:
            if _tag(other) == "choices" and image in _targets(_attrs(other)):
                choices.extend(_label_tags(other, "choice"))
        return LabelConfig(
            kind=kind,
            from_name=a["name"],
            to_name=image,
            image_value=images[image],
            labels=_label_tags(el, "label"),
            choices=tuple(choices),
        )
    raise ConfigError(
        "the labeling config has no <BrushLabels> or <BitmaskLabels> control on an <Image>: "
        "hsc answers segmentation masks (use the 'Semantic Segmentation with Masks' template)"
    )


@lru_cache(maxsize=64)
def _parse_cached(xml: str) -> LabelConfig:
    return parse_label_config(xml)


def build_label_map(tags: Sequence[LabelTag], classes: Sequence[str]) -> dict[str, str]:
    """Model class name -> the project's label (its ``alias`` or ``value``): a tag listing the class in
    ``predicted_values`` first, then a tag of exactly its name, then one of its name in any case.
    Classes left out have no label in the project."""
    out: dict[str, str] = {}
    for c in classes:
        tag = (
            next((t for t in tags if c in t.predicted), None)
            or next((t for t in tags if t.value == c), None)
            or next((t for t in tags if t.value.lower() == c.lower()), None)
        )
        if tag is not None:
            out[c] = tag.output
    return out


# --------------------------------------------------------------------------------------------------
# image-level labels of a task


def _time_key(item: Mapping[str, Any]) -> float:
    text = item.get("updated_at") or item.get("created_at")
    if not isinstance(text, str) or not text:
        return float("-inf")
    try:
        return datetime.fromisoformat(text.strip().replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("-inf")


def _choices(results: Any, to_name: str | None) -> list[str]:
    """The values of the ``choices`` results on image ``to_name`` (any image when ``None``)."""
    out: list[str] = []
    if not isinstance(results, list):
        return out
    for r in results:
        if not isinstance(r, dict) or r.get("type") != "choices":
            continue
        if to_name is not None and r.get("to_name") not in (None, to_name):
            continue
        value = r.get("value")
        picked = value.get("choices") if isinstance(value, dict) else None
        if isinstance(picked, list):
            out.extend(str(v) for v in picked if isinstance(v, (str, int)) and not isinstance(v, bool))
    return out


def task_labels(
    task: Mapping[str, Any], cfg: LabelConfig | None, field_name: str, context: Any = None
) -> tuple[list[str | int], str]:
    """The image-level labels of a task and where they came from: ``"task_data"`` (the data field
    ``field_name``), ``"annotation"`` / ``"draft"`` (the latest one with choices on the image),
    ``"context"`` (interactive mode), or ``([], "none")``."""
    to_name = cfg.to_name if cfg is not None else None
    data = task.get("data")
    raw = data.get(field_name) if isinstance(data, dict) else None
    if raw not in (None, "", []):
        try:
            values = split_labels([raw])
        except Problem as e:
            log.warning("task %s: data field %r unreadable (%s)", task.get("id"), field_name, e.detail)
            values = []
        if values:
            return values, "task_data"
    dated: list[tuple[float, int, str, Mapping[str, Any]]] = []
    order = 0
    for key, source in (("annotations", "annotation"), ("drafts", "draft")):
        items = task.get(key)
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and not item.get("was_cancelled"):
                dated.append((_time_key(item), order, source, item))
                order += 1
    for _, _, source, item in sorted(dated, key=lambda d: (d[0], d[1]), reverse=True):
        picked = _choices(item.get("result"), to_name)
        if picked:
            return list(picked), source
    if isinstance(context, dict):
        picked = _choices(context.get("result"), to_name)
        if picked:
            return list(picked), "context"
    return [], "none"


def _model_labels(
    values: Sequence[str | int], cfg: LabelConfig | None, classes: Sequence[str]
) -> tuple[list[str | int], list[str]]:
    """The labels as model class names (or VOC indices) and the ones that name no model class.

    A value may be a model class name (any case), or a project ``<Choice>``/``<Label>`` value or alias
    that the label map sends to one or more model classes."""
    fg = list(classes[1:])
    lookup: dict[str, list[str]] = {}
    if cfg is not None:
        for tags in (cfg.choices, cfg.labels):
            for tag in tags:
                names = [c for c, out in build_label_map([tag], fg).items() if out == tag.output]
                for key in {tag.value.lower(), tag.output.lower()}:
                    lookup.setdefault(key, [])
                    lookup[key] += [n for n in names if n not in lookup[key]]
    known = {c.lower() for c in classes}
    out: list[str | int] = []
    unknown: list[str] = []
    for v in values:
        if isinstance(v, int):
            if 0 <= v <= len(fg):
                out.append(v)
            else:
                unknown.append(str(v))
            continue
        key = v.strip().lower()
        if lookup.get(key):
            out.extend(lookup[key])
        elif key in known:
            out.append(v)
        else:
            unknown.append(v)
    return out, unknown


# --------------------------------------------------------------------------------------------------
# fetching the image


class FetchError(Exception):
    """The image of a task could not be read (the reason is logged, the task answered empty)."""


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port


def _shown(url: str) -> str:
    """A URL fit for a log line: no query (presigned links carry credentials), no user info."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" + ("?..." if parts.query else "")


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Redirects only to http(s); the Label Studio token follows only to Label Studio's own origin
    (a presign link redirects to the cloud bucket, which must not see it)."""

    max_redirections = 5

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        if urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise FetchError(f"redirect to a non-http URL from {_shown(req.full_url)}")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth: tuple[tuple[str, str, int | None], str] | None = getattr(req, "hsc_auth", None)
        if new is not None and auth is not None:
            new.hsc_auth = auth  # type: ignore[attr-defined]
            if _origin(newurl) == auth[0]:
                new.add_unredirected_header("Authorization", auth[1])
        return new


_OPENER = urllib.request.build_opener(_Redirects)


def _http_get(url: str, *, ls_url: str | None, token: str | None, max_bytes: int, timeout: float) -> bytes:
    req = urllib.request.Request(
        url, headers={"User-Agent": "hsc-labelstudio", "Accept": "image/*,*/*;q=0.5"}
    )
    if token and ls_url and _origin(url) == _origin(ls_url):
        header = f"Token {token}"
        req.add_unredirected_header("Authorization", header)
        req.hsc_auth = (_origin(ls_url), header)  # type: ignore[attr-defined]
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise FetchError(f"{_shown(url)}: {length} bytes, over HSC_MAX_UPLOAD_BYTES={max_bytes}")
            data: bytes = resp.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        hint = " (set LABEL_STUDIO_API_KEY to a Label Studio access token)" if e.code in (401, 403) else ""
        raise FetchError(f"{_shown(url)}: HTTP {e.code}{hint}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise FetchError(f"{_shown(url)}: {type(e).__name__}: {reason}") from None
    if len(data) > max_bytes:
        raise FetchError(f"{_shown(url)}: over HSC_MAX_UPLOAD_BYTES={max_bytes}")
    return data


def _data_uri(ref: str, max_bytes: int) -> bytes:
    head, sep, payload = ref.partition(",")
    if not sep:
        raise FetchError("a data: URI without a comma")
    if len(payload) > (max_bytes + 2) * 4 // 3 + 4:
        raise FetchError(f"data: URI over HSC_MAX_UPLOAD_BYTES={max_bytes}")
    try:
        if head.lower().endswith(";base64"):
            data = base64.b64decode(payload.strip(), validate=False)
        else:
            data = unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as e:
        raise FetchError(f"data: URI not decodable: {e}") from None
    if len(data) > max_bytes:
        raise FetchError(f"data: URI over HSC_MAX_UPLOAD_BYTES={max_bytes}")
    return data


def _local(path: str, roots: Sequence[Path], max_bytes: int) -> bytes | None:
    """The file's bytes when ``path`` is an absolute file under one of ``roots``, else ``None``."""
    p = Path(path).expanduser()
    if not p.is_absolute() or not roots:
        return None
    try:
        real = p.resolve()
    except (OSError, RuntimeError):
        return None
    if not any(real == r or real.is_relative_to(r) for r in roots) or not real.is_file():
        return None
    size = real.stat().st_size
    if size > max_bytes:
        raise FetchError(f"{path}: {size} bytes, over HSC_MAX_UPLOAD_BYTES={max_bytes}")
    return real.read_bytes()


def fetch_image(
    ref: str,
    *,
    task_id: Any = None,
    ls_url: str | None = None,
    token: str | None = None,
    roots: Sequence[Path] = (),
    max_bytes: int,
    timeout: float = FETCH_TIMEOUT_S,
) -> bytes:
    """The bytes of a task's image reference (blocking; run it in a thread).

    ``data:`` URI; ``http(s)://`` URL (with ``Authorization: Token <token>`` only on ``ls_url``'s
    origin); a cloud URI (``s3://``, ``gs://``, ``azure-blob://``) through ``ls_url``'s
    ``/tasks/{task_id}/presign/``; a path (or ``file://``) read when it lies under ``roots``; any other
    path starting with ``/`` (``/data/upload/...``, ``/data/local-files/?d=...``) from ``ls_url``.
    Raises :class:`FetchError`.
    """
    ref = ref.strip()
    scheme = urlsplit(ref).scheme.lower() if "://" in ref or ref.lower().startswith("data:") else ""
    base = ls_url.rstrip("/") if ls_url else None
    if scheme == "data":
        return _data_uri(ref, max_bytes)
    if scheme in ("http", "https"):
        return _http_get(ref, ls_url=base, token=token, max_bytes=max_bytes, timeout=timeout)
    if scheme in CLOUD_SCHEMES:
        if not base or task_id is None:
            raise FetchError(f"{scheme}:// image needs LABEL_STUDIO_URL and the task id to be presigned")
        fileuri = base64.urlsafe_b64encode(ref.encode()).decode("ascii")
        url = f"{base}/tasks/{task_id}/presign/?fileuri={fileuri}"
        return _http_get(url, ls_url=base, token=token, max_bytes=max_bytes, timeout=timeout)
    if scheme == "file":
        path = url2pathname(urlsplit(ref).path)
    elif scheme:
        raise FetchError(f"unsupported image URI scheme {scheme!r}")
    else:
        path = ref
    data = _local(path, roots, max_bytes)
    if data is not None:
        return data
    if scheme == "" and ref.startswith("/") and base:
        try:
            return _http_get(base + ref, ls_url=base, token=token, max_bytes=max_bytes, timeout=timeout)
        except FetchError as e:
            raise FetchError(f"{e} (and not a file under HSC_ALLOWED_ROOTS)") from None
    if scheme == "" and ref.startswith("/"):
        raise FetchError(
            f"{urlsplit(ref).path}: not a file under HSC_ALLOWED_ROOTS, and LABEL_STUDIO_URL is not set "
            "to fetch it from Label Studio"
        )
    raise FetchError(f"{ref[:80]!r}: a local image must be an absolute path under HSC_ALLOWED_ROOTS")


# --------------------------------------------------------------------------------------------------
# per-process state and settings


@dataclass
class _Project:
    config: LabelConfig
    hostname: str | None = None
    access_token: str | None = None


@dataclass
class _State:
    projects: OrderedDict[str, _Project] = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, key: str, project: _Project) -> None:
        with self.lock:
            self.projects[key] = project
            self.projects.move_to_end(key)
            while len(self.projects) > MAX_PROJECTS:
                self.projects.popitem(last=False)

    def get(self, key: str) -> _Project | None:
        with self.lock:
            return self.projects.get(key)


def _state(request: Request) -> _State:
    state = getattr(request.app.state, "labelstudio", None)
    if not isinstance(state, _State):
        state = _State()
        request.app.state.labelstudio = state
    return state


def _project_key(body: Mapping[str, Any]) -> str | None:
    project = body.get("project")
    if isinstance(project, dict):
        project = project.get("id")
    return str(project) if project not in (None, "") else None


def _first(*values: Any) -> str | None:
    for v in values:
        if isinstance(v, str) and v.strip():
            return v.strip()
    return None


def _ls_url(settings: Settings, project: _Project | None) -> str | None:
    return _first(
        settings.ls_url,
        project.hostname if project else None,
    )


def _ls_token(settings: Settings, project: _Project | None) -> str | None:
    return _first(
        settings.ls_api_key,
        project.access_token if project else None,
    )


def _labels_field(settings: Settings) -> str:
    return _first(settings.ls_labels_field) or LABELS_FIELD


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise Problem("bad_request", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Problem("bad_request", "the JSON body must be an object")
    return body


def _pick_model(cards: Sequence[Mapping[str, Any]], wanted: Any, settings: Settings) -> dict[str, Any]:
    """The model Label Studio names in ``model_version`` (``id@sha``, the id is enough) when it is
    loaded, else the default model."""
    by_id = {str(c["id"]): dict(c) for c in cards}
    if isinstance(wanted, str) and wanted.partition("@")[0] in by_id:
        return by_id[wanted.partition("@")[0]]
    default = default_model_id(settings)
    return by_id.get(default or "", dict(cards[0]))


# --------------------------------------------------------------------------------------------------
# the answer of one task


def _bitmask_png(sel: np.ndarray) -> str:
    """``<BitmaskLabels>`` value: a PNG data URL, black opaque pixels on a transparent background."""
    rgba = np.zeros((*sel.shape, 4), dtype=np.uint8)
    rgba[sel, 3] = 255
    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _prediction(
    result: Mapping[str, Any], cfg: LabelConfig | None, classes: Sequence[str], version: str, task_id: Any
) -> dict[str, Any]:
    """The worker's ``labelstudio`` answer, addressed to the project's control and labels."""
    regions = (result.get("labelstudio") or {}).get("result") or []
    label_map = build_label_map(cfg.labels, classes[1:]) if cfg is not None and cfg.labels else None
    index = {str(row["name"]): int(row["index"]) for row in result.get("classes") or []}
    mask = None
    out: list[dict[str, Any]] = []
    dropped: list[str] = []
    for region in regions:
        name = str(region["value"]["brushlabels"][0])
        label = label_map.get(name) if label_map is not None else name
        if label is None:
            dropped.append(name)
            continue
        r = dict(region)
        r["from_name"] = cfg.from_name if cfg else DEFAULT_LABELSTUDIO["from_name"]
        r["to_name"] = cfg.to_name if cfg else DEFAULT_LABELSTUDIO["to_name"]
        if cfg is not None and cfg.kind == "bitmasklabels":
            if mask is None:
                mask = mask_from_base64_png(str(result["mask"]["data"]))
            r["type"] = "bitmasklabels"
            r["value"] = {"imageDataURL": _bitmask_png(mask == index[name]), "bitmasklabels": [label]}
        else:
            r["value"] = {**region["value"], "brushlabels": [label]}
        out.append(r)
    if dropped:
        log.warning(
            "task %s: class(es) %s have no label in the project's <%s>; their regions are left out "
            "(add a <Label> with that value or predicted_values)",
            task_id,
            ", ".join(dropped),
            cfg.kind if cfg else "BrushLabels",
        )
    pred: dict[str, Any] = {"result": out, "model_version": version}
    quality = result.get("quality")
    if isinstance(quality, (int, float)):
        pred["score"] = float(quality)
    return pred


def _image_ref(task: Mapping[str, Any], cfg: LabelConfig | None) -> str | None:
    data = task.get("data")
    value = cfg.image_value if cfg is not None else "$image"
    if value.startswith("$"):
        ref = data.get(value[1:]) if isinstance(data, dict) else None
    else:
        ref = value or None
    return ref if isinstance(ref, str) and ref.strip() else None


@dataclass
class _Call:
    """What the tasks of one ``/predict`` share."""

    request_id: str
    settings: Settings
    runner: Runner
    metrics: Metrics
    card: dict[str, Any]
    version: str
    cfg: LabelConfig | None
    project: _Project | None
    context: Any
    deadline: float
    budget_s: float  # HSC_LS_PREDICT_BUDGET_S: LS gives up on /predict after 100 s
    gate: asyncio.Semaphore


async def _one(call: _Call, i: int, task: Any) -> dict[str, Any]:
    empty: dict[str, Any] = {"result": [], "model_version": call.version}
    if not isinstance(task, dict):
        log.warning("predict %s: task #%d is not an object; empty result", call.request_id, i)
        return empty
    tid = task.get("id", f"#{i}")
    settings = call.settings
    classes = [str(c) for c in call.card["classes"]]
    values, source = task_labels(task, call.cfg, _labels_field(settings), call.context)
    if not values:
        log.info(
            "task %s: no image-level labels (data field %r, annotation/draft choices, context); empty result",
            tid,
            _labels_field(settings),
        )
        return empty
    names, unknown = _model_labels(values, call.cfg, classes)
    if unknown:
        log.warning("task %s: label(s) %s name no class of model %s; ignored", tid, unknown, call.card["id"])
    try:
        channels = resolve_labels(call.card, names)
    except Problem as e:
        log.info("task %s: %s (labels %s from %s); empty result", tid, e.detail, values, source)
        return empty
    ref = _image_ref(task, call.cfg)
    if ref is None:
        log.warning("task %s: no image in the task data; empty result", tid)
        return empty
    async with call.gate:
        left = call.deadline - time.monotonic()
        if left <= 0:
            log.warning("task %s: the /predict time budget (%g s) is spent; empty result", tid, call.budget_s)
            return empty
        try:
            roots = [Path(r).expanduser().resolve() for r in settings.allowed_roots if r]
            data = await anyio.to_thread.run_sync(
                lambda: fetch_image(
                    ref,
                    task_id=task.get("id"),
                    ls_url=_ls_url(settings, call.project),
                    token=_ls_token(settings, call.project),
                    roots=roots,
                    max_bytes=settings.max_upload_bytes,
                    timeout=min(FETCH_TIMEOUT_S, left),
                )
            )
            probe_image(data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
            await anyio.to_thread.run_sync(call.runner.check_queue, "image")
            request = {
                "request_id": f"{call.request_id}-{i}",
                "model": str(call.card["id"]),
                "labels": list(channels),
                "labels_requested": list(values),
                "crf": True,
                "bg_threshold": None,
                "outputs": ["labelstudio", "mask"],
                "enqueued_at": time.time(),
            }
            left = call.deadline - time.monotonic()
            if left <= 0:
                raise FetchError(f"the /predict time budget ({call.budget_s:g} s) is spent")
            result = await call.runner.pseudo_label(request, data, min(settings.sync_timeout_s, left))
        except FetchError as e:
            log.warning("task %s: image not read: %s; empty result", tid, e)
            return empty
        except ImageError as e:
            log.warning("task %s: image refused: %s; empty result", tid, e)
            call.metrics.images.labels(model=str(call.card["id"]), outcome=e.code).inc()
            return empty
        except Problem as e:
            log.warning("task %s: %s: %s; empty result", tid, e.code, e.detail)
            return empty
        except Exception:
            log.exception("task %s: prediction failed; empty result", tid)
            return empty
    err = result.get("error")
    if isinstance(err, dict):
        call.metrics.images.labels(model=str(call.card["id"]), outcome=str(err.get("code", "error"))).inc()
        log.warning("task %s: %s: %s; empty result", tid, err.get("code"), err.get("detail"))
        return empty
    call.metrics.observe_result(str(call.card["id"]), result.get("timings_ms") or {})
    try:
        return _prediction(result, call.cfg, classes, call.version, tid)
    except Exception:
        log.exception("task %s: the answer could not be converted; empty result", tid)
        return empty


# --------------------------------------------------------------------------------------------------
# routes


_HEALTH = {"status": "UP", "model_class": MODEL_CLASS}


@router.get(PREFIX + "/health", summary="Label Studio health check")
async def health() -> dict[str, str]:
    """``{"status": "UP", "model_class": "HSC"}`` at once: touches neither the pool nor Redis."""
    return dict(_HEALTH)


@router.get(PREFIX, include_in_schema=False)
@router.get(PREFIX + "/", include_in_schema=False)
@router.get("/health", include_in_schema=False)  # the URL pasted without the prefix
async def health_base() -> dict[str, str]:
    return dict(_HEALTH)


@router.post(PREFIX + "/setup", summary="Label Studio project setup")
async def setup(request: Request, settings: SettingsDep, runner: RunnerDep) -> dict[str, str]:
    """Parse the project's labeling config (``schema``); answer the ``model_version``."""
    body = await _json_body(request)
    try:
        cfg = _parse_cached(body.get("schema") or body.get("label_config") or "")
    except ConfigError as e:
        raise Problem("invalid_option", str(e), extra={"field": "schema"}) from None
    cards = await anyio.to_thread.run_sync(runner.models)
    card = _pick_model(cards, body.get("model_version"), settings)
    classes = [str(c) for c in card["classes"]][1:]
    label_map = build_label_map(cfg.labels, classes)
    key = _project_key(body)
    if key is not None:
        _state(request).put(
            key,
            _Project(
                cfg, hostname=_first(body.get("hostname")), access_token=_first(body.get("access_token"))
            ),
        )
    unmapped = [c for c in classes if c not in label_map]
    log.info(
        "label studio project %s: <%s name=%r toName=%r>, model %s, label map %s%s",
        key,
        cfg.kind,
        cfg.from_name,
        cfg.to_name,
        card["id"],
        label_map,
        f", classes without a label: {unmapped}" if unmapped and cfg.labels else "",
    )
    return {"model_version": model_version(card)}


@router.post(PREFIX + "/predict", summary="Label Studio predictions")
async def predict(
    request: Request, settings: SettingsDep, runner: RunnerDep, metrics: MetricsDep
) -> dict[str, Any]:
    """One prediction per task, in order; a task that cannot be answered gets an empty ``result``."""
    started = time.monotonic()
    body = await _json_body(request)
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        raise Problem("bad_request", "the body needs 'tasks', a list of Label Studio tasks")
    key = _project_key(body)
    project = _state(request).get(key) if key is not None else None
    cfg: LabelConfig | None = project.config if project is not None else None
    config_error: str | None = None
    label_config = body.get("label_config")
    if isinstance(label_config, str) and label_config.strip():
        try:
            cfg = _parse_cached(label_config)
        except ConfigError as e:
            config_error = str(e)
    cards = await anyio.to_thread.run_sync(runner.models)
    card = _pick_model(cards, body.get("model_version"), settings)
    version = model_version(card)
    if config_error is not None:
        log.warning("predict for project %s: %s; %d empty results", key, config_error, len(tasks))
        return {"results": [{"result": [], "model_version": version} for _ in tasks]}
    params = body.get("params")
    context = body.get("context")
    if isinstance(params, dict) and params.get("context") is not None:
        context = params.get("context")
    call = _Call(
        request_id=str(request.state.request_id),
        settings=settings,
        runner=runner,
        metrics=metrics,
        card=card,
        version=version,
        cfg=cfg,
        project=project,
        context=context,
        deadline=started + settings.ls_predict_budget_s,
        budget_s=settings.ls_predict_budget_s,
        gate=asyncio.Semaphore(PREDICT_CONCURRENCY),
    )
    results = await asyncio.gather(*(_one(call, i, t) for i, t in enumerate(tasks)))
    answered = sum(1 for r in results if r["result"])
    log.info(
        "predict for project %s: %d task(s), %d with regions, %.2f s",
        key,
        len(tasks),
        answered,
        time.monotonic() - started,
    )
    return {"results": list(results)}


@router.post(PREFIX + "/webhook", summary="Label Studio webhooks (ignored)")
async def webhook() -> dict[str, Any]:
    """Accepted and ignored: hsc does not train from annotations."""
    return {}
