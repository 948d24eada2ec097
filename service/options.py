"""Request options shared by ``POST /pseudo-label`` and ``POST /jobs``: parsing and validation.

Labels are class names (case-insensitive) or integer indices in the VOC label space of the model's
``classes`` (``1..K`` foreground; ``background``/``0`` is implicit and ignored); they become the
**channel indices** (``label - 1``) the worker takes. ``labels=auto`` (any case) asks the model's
image-level classifier instead: the classes with a probability >= ``label_threshold`` (default 0.5;
the top-1 when none reaches it). In a job's ``options``, ``"labels": "auto"`` replaces the items' own
labels. A job's ``options`` may also hold a ``webhook`` (:func:`parse_webhook`); its secret is kept
out of :meth:`Options.as_dict` and out of every answer (:func:`redact_webhook`).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any
from urllib.parse import urlsplit

from hsc.core.results import parse_outputs
from hsc.core.settings import Settings

from .errors import Problem

__all__ = [
    "AUTO_LABELS",
    "DEFAULT_LABEL_THRESHOLD",
    "JOB_OPTION_FIELDS",
    "OPTION_FIELDS",
    "Options",
    "WEBHOOK_EVENTS",
    "WebhookSpec",
    "is_auto",
    "parse_bool",
    "parse_options",
    "parse_webhook",
    "redact_webhook",
    "webhook_host_allowed",
    "default_model_id",
    "resolve_labels",
    "resolve_model",
    "split_labels",
]

_TRUE = {"1", "true", "yes", "on", "t", "y"}
_FALSE = {"0", "false", "no", "off", "f", "n"}
OPTION_FIELDS = ("model", "crf", "bg_threshold", "outputs", "labels", "label_threshold")
#: A job's ``options`` also take a ``webhook``.
JOB_OPTION_FIELDS = (*OPTION_FIELDS, "webhook")
#: What a job webhook may ask for (``completed``: any final status, the body's job says which).
WEBHOOK_EVENTS = ("started", "progress", "completed")
#: Longest webhook URL and secret accepted.
_MAX_URL, _MAX_SECRET = 2048, 256
#: ``labels`` value asking for the classifier's labels (matched ignoring case and spaces).
AUTO_LABELS = "auto"
#: What the worker uses when ``label_threshold`` is not given.
DEFAULT_LABEL_THRESHOLD = 0.5


@dataclass(frozen=True)
class WebhookSpec:
    """A job's ``webhook`` option: where to POST, which events, the HMAC secret (never shown back)."""

    url: str
    events: tuple[str, ...] = WEBHOOK_EVENTS
    secret: str | None = None

    def as_record(self) -> dict[str, Any]:
        return {"url": self.url, "events": list(self.events), "secret": self.secret}


def webhook_host_allowed(url: str, allowed: Sequence[str]) -> bool:
    """Whether ``url``'s host is one of ``allowed`` (``HSC_WEBHOOK_HOSTS``); an empty list allows any.

    An entry is a host name (any case; ``hooks.example.org``), ``*.example.org`` (its subdomains, not
    the name itself), an IP address (``10.0.0.7``, ``::1``) or a network (``10.0.0.0/8``). Names are
    compared as written, never resolved: ``localhost`` does not match ``127.0.0.1``.
    """
    if not allowed:
        return True
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    if not host:
        return False
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for entry in allowed:
        e = entry.strip().rstrip(".").lower()
        if not e:
            continue
        if e.startswith("*."):
            if ip is None and host.endswith(e[1:]):
                return True
            continue
        if ip is not None:
            try:
                if ip in ipaddress.ip_network(e, strict=False):
                    return True
            except ValueError:
                pass
            continue
        if host == e:
            return True
    return False


def redact_webhook(webhook: Any) -> Any:
    """The stored webhook as GET /jobs shows it: the secret replaced by ``has_secret``."""
    if not isinstance(webhook, Mapping):
        return webhook
    out = {k: v for k, v in webhook.items() if k != "secret"}
    out["has_secret"] = bool(webhook.get("secret"))
    return out


def _webhook_problem(detail: str, field: str) -> Problem:
    return Problem("invalid_option", detail, extra={"field": f"webhook.{field}" if field else "webhook"})


def parse_webhook(value: Any) -> WebhookSpec | None:
    """``{"url": "https://...", "events": [...], "secret": "..."}`` (events default to all), or None."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _webhook_problem('webhook must be an object: {"url": "https://...", "events": [...]}', "")
    unknown = sorted(set(value) - {"url", "events", "secret"})
    if unknown:
        raise _webhook_problem(
            f"unknown webhook field(s) {', '.join(unknown)}; valid: url, events, secret", ""
        )
    url = value.get("url")
    if not isinstance(url, str) or not url.strip() or len(url) > _MAX_URL:
        raise _webhook_problem(f"webhook.url must be an http(s) URL of at most {_MAX_URL} characters", "url")
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        parts = None
    if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise _webhook_problem(f"webhook.url {url!r} is not an http:// or https:// URL with a host", "url")
    events = value.get("events", list(WEBHOOK_EVENTS))
    if isinstance(events, str):
        events = [e.strip() for e in events.split(",") if e.strip()]
    if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
        raise _webhook_problem(
            f"webhook.events must be a non-empty list of {', '.join(WEBHOOK_EVENTS)}", "events"
        )
    bad = sorted({e for e in events if e not in WEBHOOK_EVENTS})
    if bad:
        raise _webhook_problem(
            f"unknown webhook event(s) {', '.join(map(repr, bad))}; valid: {', '.join(WEBHOOK_EVENTS)}",
            "events",
        )
    secret = value.get("secret")
    if secret is not None and (not isinstance(secret, str) or len(secret) > _MAX_SECRET):
        raise _webhook_problem(
            f"webhook.secret must be a string of at most {_MAX_SECRET} characters", "secret"
        )
    return WebhookSpec(
        url=url.strip(), events=tuple(e for e in WEBHOOK_EVENTS if e in events), secret=secret or None
    )


def is_auto(labels: Any) -> bool:
    """``"auto"`` (any case), alone or as the only entry of a list."""
    if isinstance(labels, (list, tuple)) and len(labels) == 1:
        labels = labels[0]
    return isinstance(labels, str) and labels.strip().lower() == AUTO_LABELS


@dataclass(frozen=True)
class Options:
    """What a request asks beyond the image and its labels."""

    model: str | None = None
    crf: bool = True
    bg_threshold: float | None = None
    outputs: tuple[str, ...] = ("mask",)
    labels: str | None = None  # "auto": the classifier's labels; None: the given ones
    label_threshold: float | None = None  # with labels="auto"; None: DEFAULT_LABEL_THRESHOLD
    webhook: WebhookSpec | None = None  # jobs only; stored apart from ``as_dict`` (it holds a secret)

    @property
    def auto_labels(self) -> bool:
        return self.labels == AUTO_LABELS

    def as_dict(self, model_id: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": model_id,
            "crf": self.crf,
            "bg_threshold": self.bg_threshold,
            "outputs": list(self.outputs),
        }
        if self.auto_labels:
            out["labels"] = AUTO_LABELS
            out["label_threshold"] = self.effective_label_threshold
        return out

    @property
    def effective_label_threshold(self) -> float:
        return DEFAULT_LABEL_THRESHOLD if self.label_threshold is None else self.label_threshold


def parse_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise Problem("invalid_option", f"{name} must be true or false, got {value!r}", extra={"field": name})


def _threshold(value: Any, name: str = "bg_threshold", default: str = "the model's") -> float | None:
    if value is None or (isinstance(value, str) and value.strip() in ("", "null", "none", "default")):
        return None
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = float("nan")
    if not 0.0 <= t <= 1.0:
        raise Problem(
            "invalid_option",
            f"{name} must be a number in [0, 1] (or empty for {default}), got {value!r}",
            extra={"field": name},
        )
    return t


def _auto_option(value: Any) -> str | None:
    """The ``labels`` of a job's options: absent/empty, or ``"auto"``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if is_auto(value):
        return AUTO_LABELS
    raise Problem(
        "invalid_option",
        f'options.labels may only be "auto" (the classifier\'s labels), got {value!r}; '
        "the items' labels come from the dataset",
        extra={"field": "labels"},
    )


def _outputs(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) and value.strip().startswith("["):
        value = _json_list(value, "outputs")
    try:
        return tuple(sorted(parse_outputs(value)))
    except ValueError as e:
        raise Problem("invalid_option", str(e), extra={"field": "outputs"}) from None


def _json_list(text: str, name: str) -> list[Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise Problem("bad_request", f"{name}: not valid JSON: {text[:80]!r}") from None
    if not isinstance(value, list):
        raise Problem("invalid_option", f"{name} must be a list", extra={"field": name})
    return value


def parse_options(fields: Mapping[str, Any], *, strict: bool = False) -> Options:
    """Options from form fields or a JSON object; ``strict`` (a job's ``options``) refuses unknown keys
    and takes a ``webhook``."""
    if strict:
        unknown = sorted(set(fields) - set(JOB_OPTION_FIELDS))
        if unknown:
            raise Problem(
                "invalid_option",
                f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(JOB_OPTION_FIELDS)}",
                extra={"field": unknown[0]},
            )
    model = fields.get("model")
    if model is not None and not isinstance(model, str):
        raise Problem("invalid_option", "model must be a model id string", extra={"field": "model"})
    crf = fields.get("crf")
    return Options(
        model=(model or "").strip() or None,
        crf=True if crf is None or crf == "" else parse_bool(crf, "crf"),
        bg_threshold=_threshold(fields.get("bg_threshold")),
        outputs=_outputs(fields.get("outputs")),
        labels=_auto_option(fields.get("labels")),
        label_threshold=_threshold(
            fields.get("label_threshold"), "label_threshold", str(DEFAULT_LABEL_THRESHOLD)
        ),
        webhook=parse_webhook(fields.get("webhook")) if strict else None,
    )


def split_labels(values: Iterable[Any]) -> list[str | int]:
    """The labels as given: repeated fields, comma strings, JSON lists, names or integers."""
    out: list[str | int] = []
    for value in values:
        if isinstance(value, bool):
            raise Problem(
                "invalid_option",
                f"label {value!r} is neither a class name nor an index",
                extra={"field": "labels"},
            )
        if isinstance(value, int):
            out.append(value)
        elif isinstance(value, (list, tuple)):
            out.extend(split_labels(value))
        elif isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                out.extend(split_labels(_json_list(text, "labels")))
                continue
            for part in text.split(","):
                part = part.strip()
                if part:
                    out.append(int(part) if part.lstrip("-").isdigit() else part)
        elif isinstance(value, float) and value.is_integer():
            out.append(int(value))
        else:
            raise Problem(
                "invalid_option",
                f"label {value!r} is neither a class name nor an index",
                extra={"field": "labels"},
            )
    return out


def default_model_id(settings: Settings) -> str | None:
    """The model a request without ``model`` gets: ``settings.default_model``, else the first of
    ``settings.checkpoints`` (model id = file stem), as the workers choose."""
    if settings.default_model:
        return settings.default_model
    return PurePath(settings.checkpoints[0]).stem if settings.checkpoints else None


def resolve_model(
    cards: Sequence[Mapping[str, Any]], wanted: str | None, default: str | None
) -> dict[str, Any]:
    """The card of ``wanted`` (``id`` or ``id@<sha256 prefix>``), else of ``default``, else the first."""
    by_id = {str(c["id"]): dict(c) for c in cards}
    name = wanted or default
    if name is None:
        return dict(cards[0])
    mid, _, version = name.partition("@")
    card = by_id.get(mid)
    if card is None and wanted is None:
        return dict(cards[0])  # the configured default is not loaded: any model answers
    if card is None or (version and not str(card.get("sha256", "")).startswith(version.lower())):
        raise Problem(
            "not_found",
            f"model {name!r} is not loaded; loaded: {', '.join(sorted(by_id))}",
            extra={"valid_models": sorted(by_id)},
        )
    return card


def resolve_labels(card: Mapping[str, Any], labels: Sequence[str | int]) -> tuple[int, ...]:
    """Channel indices (sorted, unique) of ``labels`` in the model ``card``; background dropped.

    Raises 422 ``unknown_class`` (with ``valid_classes``) or ``no_labels``.
    """
    classes = [str(c) for c in card["classes"]]
    lower = {c.lower(): i for i, c in enumerate(classes)}
    valid = classes[1:]
    channels: set[int] = set()
    unknown: list[str] = []
    for label in labels:
        if isinstance(label, int):
            if label == 0:
                continue
            if 1 <= label < len(classes):
                channels.add(label - 1)
            else:
                unknown.append(str(label))
            continue
        idx = lower.get(label.strip().lower())
        if idx is None:
            unknown.append(label)
        elif idx > 0:
            channels.add(idx - 1)
    if unknown:
        raise Problem(
            "unknown_class",
            f"unknown class(es) {', '.join(map(repr, unknown))} for model "
            f"{card['id']!r}; use names (any case) or indices 1..{len(valid)}",
            extra={"valid_classes": valid, "unknown": unknown},
        )
    if not channels:
        raise Problem(
            "no_labels",
            "no foreground labels: give the image-level labels of the image (background is implicit)",
            extra={"valid_classes": valid},
        )
    return tuple(sorted(channels))
