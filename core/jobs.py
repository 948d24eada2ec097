"""Job records: what a dataset job is, which of its images are done, and how far it got.

A job is a record (a dict of JSON values: ``id``, ``status``, ``created_at``, ``model``,
``options``, ``dataset``, ...) plus its items (:class:`JobItem`, fixed at creation) and one state
per item: pending, or one of the final states ``done``, ``failed``, ``skipped``. Marking an item
final has **set semantics** (:meth:`JobStore.mark` answers True only the first time), so a chunk
delivered twice after a worker crash counts every image exactly once. :meth:`JobStore.get_job`
adds the derived fields: ``total``, ``progress {total, done, failed, skipped, percent}``,
``rate_images_per_s``, ``eta_s``, ``errors_sample`` (the first 10 failures by index).

Two stores keep the same promises (the tests run one suite over both):

* :class:`RedisJobStore` (broker mode): keys ``<prefix>:job:<id>`` (hash of JSON values),
  ``...:items`` (list), ``...:ids`` (hash id -> index), ``...:state`` (hash index -> state, set
  with ``HSETNX``), ``...:done|failed|skipped`` (sorted sets of indices, their sizes are the
  counts), ``...:errors``, ``...:cancel``, ``...:once``; ``<prefix>:jobs`` (the ids, sorted) and
  ``<prefix>:idem:<sha256 of the key>``. Multi-key steps are Lua scripts, so they are atomic.
* :class:`FileJobStore` (embedded mode): one folder per job under ``<root>/jobs/<id>/`` with
  ``record.json`` (replaced atomically), ``items.jsonl`` + ``items.idx`` (byte offsets),
  ``states.bin`` (one byte per item), ``errors.jsonl``, a ``cancel`` marker and ``once.*`` markers.
  Writers hold an ``fcntl.flock`` on the job's ``lock`` file, so processes sharing the folder never
  lose a mark or an update; a job folder appears (and disappears) with one ``rename``.

Job ids sort by creation time (:func:`new_job_id`); :meth:`JobStore.list_jobs` lists newest first
and pages with the last id seen as the cursor.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import redis

__all__ = [
    "FINAL_STATES",
    "ITEM_STATES",
    "JOB_STATUSES",
    "TERMINAL",
    "FileJobStore",
    "JobItem",
    "JobStore",
    "RedisJobStore",
    "is_safe_name",
    "job_dir",
    "new_job_id",
]

JOB_STATUSES = ("queued", "running", "cancelling", "cancelled", "succeeded", "failed", "partially_succeeded")
TERMINAL = frozenset({"cancelled", "succeeded", "failed", "partially_succeeded"})
ITEM_STATES = ("pending", "done", "failed", "skipped")
FINAL_STATES = ("done", "failed", "skipped")
ERRORS_SAMPLE = 10
MAX_LIST_LIMIT = 1000
# fields get_job derives: never stored, never updated
DERIVED_FIELDS = frozenset({"progress", "rate_images_per_s", "eta_s", "errors_sample"})
FIXED_FIELDS = frozenset({"id", "total"})

Claim = tuple[str, bool] | None
"""What :meth:`JobStore.claim_idempotency` answers."""

_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")


def is_safe_name(name: object) -> bool:
    """True for a file-name-safe id: ``[A-Za-z0-9._-]``, 1-200 characters, no leading ``.`` or ``-``."""
    return isinstance(name, str) and _SAFE_NAME.fullmatch(name) is not None


def _check_job_id(job_id: str) -> str:
    if not is_safe_name(job_id):
        raise ValueError(f"invalid job id {job_id!r} (letters, digits, '.', '_', '-'; at most 200)")
    return job_id


# --------------------------------------------------------------------------------------------------
# ids and folders

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_id_lock = threading.Lock()
_last_id: list[int] = [0, 0]  # [milliseconds, random part] of the last id made by this process


def _b32(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_job_id() -> str:
    """``"job_"`` + a ULID (26 Crockford base-32 characters: 48-bit milliseconds, 80 random bits).

    Ids sort by creation time; within one process they strictly increase even inside one
    millisecond (the random part is incremented, as monotonic ULIDs do).
    """
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_id[0]:
            ms, rand = _last_id[0], _last_id[1] + 1
        else:
            rand = secrets.randbits(80)
        _last_id[:] = [ms, rand]
    return "job_" + _b32(ms, 10) + _b32(rand & ((1 << 80) - 1), 16)


def job_dir(results_dir: Path, job_id: str) -> Path:
    """Where a job's results live: ``results_dir / "jobs" / job_id`` (ValueError for an unsafe id)."""
    return Path(results_dir) / "jobs" / _check_job_id(job_id)


# --------------------------------------------------------------------------------------------------
# items


@dataclass(frozen=True)
class JobItem:
    """One image of a job.

    Attributes:
        index: position in the job, ``0..total-1``.
        id: unique within the job and file-name safe (:func:`is_safe_name`); outputs are named after it.
        image: absolute path of the image file.
        labels: the image-level labels as channel indices (``0..K-1``), ascending, no duplicates.
    """

    index: int
    id: str
    image: str
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.index, (int, np.integer)) or self.index < 0:
            raise ValueError(f"item index must be an int >= 0, got {self.index!r}")
        if not is_safe_name(self.id):
            raise ValueError(f"item id {self.id!r} is not file-name safe ([A-Za-z0-9._-], at most 200)")
        if not os.path.isabs(self.image):
            raise ValueError(f"item image must be an absolute path, got {self.image!r}")
        labels = tuple(sorted({int(c) for c in self.labels}))
        if any(c < 0 for c in labels):
            raise ValueError(f"item labels are channel indices >= 0, got {self.labels!r}")
        object.__setattr__(self, "index", int(self.index))
        object.__setattr__(self, "image", os.fspath(self.image))
        object.__setattr__(self, "labels", labels)

    def to_json(self) -> str:
        return json.dumps([self.index, self.id, self.image, list(self.labels)], separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> JobItem:
        index, id_, image, labels = json.loads(text)
        return cls(index, id_, image, tuple(labels))


def _check_items(items: Sequence[JobItem]) -> None:
    seen: set[str] = set()
    for pos, it in enumerate(items):
        if not isinstance(it, JobItem):
            raise TypeError(f"items[{pos}] is a {type(it).__name__}, not a JobItem")
        if it.index != pos:
            raise ValueError(f"items[{pos}] has index {it.index}: indices must be 0..n-1 in order")
        if it.id in seen:
            raise ValueError(f"duplicate item id {it.id!r}")
        seen.add(it.id)


def _new_record(record: Mapping[str, Any], total: int) -> dict[str, Any]:
    rec = dict(record)
    if "id" not in rec:
        raise ValueError("a job record needs an 'id'")
    _check_job_id(rec["id"])
    bad = (DERIVED_FIELDS | {"total"}) & rec.keys()
    if bad:
        raise ValueError(f"derived fields cannot be stored: {sorted(bad)}")
    rec.setdefault("status", "queued")
    if rec["status"] not in JOB_STATUSES:
        raise ValueError(f"unknown job status {rec['status']!r}; valid: {', '.join(JOB_STATUSES)}")
    rec.setdefault("created_at", time.time())
    rec.setdefault("started_at", None)
    rec.setdefault("finished_at", None)
    rec["total"] = total
    json.dumps(rec)  # JSON values only: fail here, not on a later read
    return rec


def _check_update(fields: Mapping[str, Any]) -> None:
    bad = (DERIVED_FIELDS | FIXED_FIELDS) & fields.keys()
    if bad:
        raise ValueError(f"fields that cannot be updated: {sorted(bad)}")
    if "status" in fields and fields["status"] not in JOB_STATUSES:
        raise ValueError(f"unknown job status {fields['status']!r}; valid: {', '.join(JOB_STATUSES)}")
    json.dumps(dict(fields))


def _statuses(if_status: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if if_status is None:
        return None
    out = (if_status,) if isinstance(if_status, str) else tuple(if_status)
    unknown = [s for s in out if s not in JOB_STATUSES]
    if unknown:
        raise ValueError(f"unknown job status(es) {unknown}; valid: {', '.join(JOB_STATUSES)}")
    return out


def _check_state(state: str, code: str | None, detail: str | None) -> None:
    if state not in FINAL_STATES:
        raise ValueError(f"an item's final state is one of {', '.join(FINAL_STATES)}, got {state!r}")
    if code is not None and not isinstance(code, str):
        raise TypeError("code must be a string")
    if detail is not None and not isinstance(detail, str):
        raise TypeError("detail must be a string")


def _final_status(done: int, failed: int) -> str:
    """Status of a job whose items are all final: no failure, nothing done, or a mix."""
    if failed == 0:
        return "succeeded"
    return "failed" if done == 0 else "partially_succeeded"


def _summary(
    record: dict[str, Any], done: int, failed: int, skipped: int, errors: list[dict], now: float
) -> dict[str, Any]:
    """The record plus the derived fields of :meth:`JobStore.get_job`."""
    total = int(record["total"])
    processed = done + failed + skipped
    out = dict(record)
    out.setdefault("started_at", None)
    out.setdefault("finished_at", None)
    out["progress"] = {
        "total": total,
        "done": done,
        "failed": failed,
        "skipped": skipped,
        "percent": round(100.0 * processed / total, 2) if total else 100.0,
    }
    rate = None
    started = record.get("started_at")
    if isinstance(started, (int, float)):
        end = record.get("finished_at")
        end = end if isinstance(end, (int, float)) else now
        elapsed = end - started
        rate = round(processed / elapsed, 3) if elapsed > 0 else None
    out["rate_images_per_s"] = rate
    remaining = total - processed
    if remaining == 0:
        eta: float | None = 0.0
    elif record.get("status") in TERMINAL or not rate:
        eta = None
    else:
        eta = round(remaining / rate, 1)
    out["eta_s"] = eta
    out["errors_sample"] = errors
    return out


# --------------------------------------------------------------------------------------------------
# the interface


class JobStore(ABC):
    """Job records and per-item states (module docstring).

    Reads of an unknown job answer None (:meth:`get_job`, :meth:`find_item`) or False
    (:meth:`cancel_requested`); the other calls raise ``KeyError``, except :meth:`delete_job`, which
    does nothing.
    """

    @abstractmethod
    def create_job(self, record: Mapping[str, Any], items: Sequence[JobItem]) -> None:
        """Store a new job: ``record`` (JSON values; ``id`` required, ``status`` defaults to
        ``"queued"``, ``created_at`` to now) and its items (``items[i].index == i``, unique ids).
        ``total`` is set to ``len(items)``. ValueError when the id exists or anything is invalid."""

    @abstractmethod
    def get_job(self, job_id: str) -> dict[str, Any] | None:
        """The record plus ``total``, ``progress``, ``rate_images_per_s``, ``eta_s``, ``errors_sample``."""

    @abstractmethod
    def list_jobs(
        self, status: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Jobs as :meth:`get_job` gives them, newest first, optionally of one status; ``cursor`` is
        the previous page's answer (None: no more pages)."""

    @abstractmethod
    def get_items(self, job_id: str, start: int, stop: int) -> list[JobItem]:
        """Items ``start..stop-1`` (clipped to the job)."""

    @abstractmethod
    def item_states(
        self, job_id: str, status: str | None = None, start: int = 0, limit: int = 100
    ) -> list[dict[str, Any]]:
        """``[{"index", "id", "state", "code", "detail"}]`` by index, optionally of one state;
        ``start`` counts within the filtered list."""

    @abstractmethod
    def find_item(self, job_id: str, item_id: str) -> JobItem | None:
        """The item with this id, or None."""

    @abstractmethod
    def pending_indices(self, job_id: str) -> list[int]:
        """Indices not yet done, failed or skipped, ascending."""

    @abstractmethod
    def mark(
        self, job_id: str, index: int, state: str, code: str | None = None, detail: str | None = None
    ) -> bool:
        """Make item ``index`` final (``done``, ``failed``, ``skipped``; ``code``/``detail`` say why).
        True only the first time: later marks of the same index change nothing."""

    @abstractmethod
    def clear_failed(self, job_id: str) -> int:
        """Make every failed item pending again (before a retry); returns how many."""

    @abstractmethod
    def update(self, job_id: str, *, if_status: str | Iterable[str] | None = None, **fields: Any) -> bool:
        """Merge ``fields`` into the record, atomically. With ``if_status``, only when the current
        status is (one of) it; returns whether the record changed."""

    @abstractmethod
    def request_cancel(self, job_id: str) -> None:
        """Raise the job's cancel flag (chunks check it between images)."""

    @abstractmethod
    def clear_cancel(self, job_id: str) -> None:
        """Lower the cancel flag (before a resume)."""

    @abstractmethod
    def cancel_requested(self, job_id: str) -> bool:
        """Whether the cancel flag is up."""

    @abstractmethod
    def finish_if_complete(self, job_id: str) -> str | None:
        """When every item is final: set ``status`` (``succeeded`` without failures, ``failed`` when
        nothing was done, else ``partially_succeeded``) and ``finished_at``, atomically, and return
        the status. A job already in a terminal status keeps it (returned). None while items are
        pending."""

    @abstractmethod
    def claim_once(self, job_id: str, name: str) -> bool:
        """True the first time ``name`` is claimed for the job, False after (in any process): what
        several senders use to do a thing once, e.g. deliver a webhook. Removed with the job."""

    @abstractmethod
    def claim_idempotency(self, key: str, fingerprint: str, job_id: str, ttl_s: float) -> Claim:
        """None when ``key`` was new (now bound to ``job_id`` for ``ttl_s``); else the bound job id and
        whether ``fingerprint`` matches the one stored with it."""

    @abstractmethod
    def release_idempotency(self, key: str, job_id: str) -> None:
        """Forget ``key`` if it is bound to ``job_id`` (when creating that job failed)."""

    @abstractmethod
    def delete_job(self, job_id: str) -> None:
        """Remove the job's record, items and states (not its results folder)."""

    @abstractmethod
    def ping(self) -> None:
        """Raise when the storage cannot be read and written."""


def _check_list_args(status: str | None, limit: int) -> None:
    if status is not None and status not in JOB_STATUSES:
        raise ValueError(f"unknown job status {status!r}; valid: {', '.join(JOB_STATUSES)}")
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise ValueError(f"limit must be in 1..{MAX_LIST_LIMIT}, got {limit}")


def _check_item_filter(status: str | None, start: int, limit: int) -> None:
    if status is not None and status not in ITEM_STATES:
        raise ValueError(f"unknown item state {status!r}; valid: {', '.join(ITEM_STATES)}")
    if start < 0 or limit < 0:
        raise ValueError("start and limit must be >= 0")


def _idem_name(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------
# Redis

_LUA_MARK = """
-- KEYS: record, state hash, state zset, errors ; ARGV: index, state, error json or ''
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local i = tonumber(ARGV[1])
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
if i < 0 or i >= total then return -2 end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('ZADD', KEYS[3], i, ARGV[1])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[4], ARGV[1], ARGV[3]) end
return 1
"""

_LUA_CLEAR_FAILED = """
-- KEYS: record, state hash, failed zset, errors
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local idx = redis.call('ZRANGE', KEYS[3], 0, -1)
for s = 1, #idx, 1000 do
  local e = math.min(s + 999, #idx)
  redis.call('HDEL', KEYS[2], unpack(idx, s, e))
  redis.call('HDEL', KEYS[4], unpack(idx, s, e))
end
redis.call('DEL', KEYS[3])
return #idx
"""

_LUA_UPDATE = """
-- KEYS: record ; ARGV: allowed statuses joined by ',' or '', then field, value, ...
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if ARGV[1] ~= '' then
  local cur = cjson.decode(redis.call('HGET', KEYS[1], 'status'))
  local ok = false
  for s in string.gmatch(ARGV[1], '[^,]+') do
    if s == cur then ok = true end
  end
  if not ok then return 0 end
end
if #ARGV > 1 then redis.call('HSET', KEYS[1], unpack(ARGV, 2)) end
return 1
"""

_LUA_FINISH = """
-- KEYS: record, done, failed, skipped zsets ; ARGV: now (JSON number), terminal statuses joined by ','
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
local d = redis.call('ZCARD', KEYS[2])
local f = redis.call('ZCARD', KEYS[3])
local s = redis.call('ZCARD', KEYS[4])
if d + f + s < total then return {0} end
local cur = cjson.decode(redis.call('HGET', KEYS[1], 'status'))
for t in string.gmatch(ARGV[2], '[^,]+') do
  if t == cur then return {1, cur} end
end
local st = 'partially_succeeded'
if f == 0 then st = 'succeeded' elseif d == 0 then st = 'failed' end
redis.call('HSET', KEYS[1], 'status', cjson.encode(st), 'finished_at', ARGV[1])
return {1, st}
"""

_LUA_CLAIM = """
-- KEYS: idempotency key ; ARGV: value, ttl ms
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

_LUA_ONCE = """
-- KEYS: record, once hash ; ARGV: name, now
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
"""

_LUA_RELEASE = """
-- KEYS: idempotency key ; ARGV: job id
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v)['job_id'] == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


class RedisJobStore(JobStore):
    """Job records in Redis (module docstring); works with ``decode_responses`` on or off.

    Args:
        client: a connected ``redis.Redis``.
        prefix: first part of every key (tests use a random one).
    """

    def __init__(self, client: redis.Redis, prefix: str = "hsc") -> None:
        self.r = client
        self.prefix = prefix
        self._mark = client.register_script(_LUA_MARK)
        self._clear_failed = client.register_script(_LUA_CLEAR_FAILED)
        self._update = client.register_script(_LUA_UPDATE)
        self._finish = client.register_script(_LUA_FINISH)
        self._claim = client.register_script(_LUA_CLAIM)
        self._release = client.register_script(_LUA_RELEASE)
        self._once = client.register_script(_LUA_ONCE)

    # keys
    def _k(self, job_id: str, part: str | None = None) -> str:
        base = f"{self.prefix}:job:{job_id}"
        return base if part is None else f"{base}:{part}"

    def _keys(self, job_id: str) -> list[str]:
        parts = ("items", "ids", "state", *FINAL_STATES, "errors", "cancel", "once")
        return [self._k(job_id)] + [self._k(job_id, p) for p in parts]

    @property
    def _index(self) -> str:
        return f"{self.prefix}:jobs"

    def _require(self, job_id: str) -> None:
        if not is_safe_name(job_id) or not self.r.exists(self._k(job_id)):
            raise KeyError(job_id)

    def create_job(self, record: Mapping[str, Any], items: Sequence[JobItem]) -> None:
        _check_items(items)
        rec = _new_record(record, len(items))
        job_id = rec["id"]
        key = self._k(job_id)
        with self.r.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                if pipe.exists(key):
                    raise ValueError(f"job {job_id} exists")
                pipe.multi()
                for part in ("items", "ids", "state", *FINAL_STATES, "errors", "cancel", "once"):
                    pipe.delete(self._k(job_id, part))  # leftovers of a half-deleted job
                for s in range(0, len(items), 1000):
                    chunk = items[s : s + 1000]
                    pipe.rpush(self._k(job_id, "items"), *[it.to_json() for it in chunk])
                    pipe.hset(self._k(job_id, "ids"), mapping={it.id: it.index for it in chunk})
                pipe.hset(key, mapping={k: json.dumps(v) for k, v in rec.items()})
                pipe.zadd(self._index, {job_id: 0})
                pipe.execute()
            except redis.WatchError as e:
                raise ValueError(f"job {job_id} exists") from e

    def _counts_and_errors(self, job_ids: Sequence[str]) -> list[tuple[dict | None, int, int, int, list]]:
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self._k(job_id))
            for st in FINAL_STATES:
                pipe.zcard(self._k(job_id, st))
            pipe.zrange(self._k(job_id, "failed"), 0, ERRORS_SAMPLE - 1)
        res = pipe.execute()
        out = []
        fetch = self.r.pipeline(transaction=False)
        for n, job_id in enumerate(job_ids):
            raw, d, f, s, failed_idx = res[5 * n : 5 * n + 5]
            rec = {_text(k): json.loads(v) for k, v in raw.items()} if raw else None
            idx = [_text(i) for i in failed_idx] if rec else []
            for i in idx:
                fetch.lindex(self._k(job_id, "items"), int(i))
            if idx:
                fetch.hmget(self._k(job_id, "errors"), idx)
            out.append((rec, int(d), int(f), int(s), idx))
        fetched = fetch.execute() if len(fetch) else []
        pos = 0
        result = []
        for rec, d, f, s, idx in out:
            errors = []
            if idx:
                items, errs = fetched[pos : pos + len(idx)], fetched[pos + len(idx)]
                pos += len(idx) + 1
                for it, err in zip(items, errs):
                    code, detail = json.loads(err) if err else (None, None)
                    item_id = JobItem.from_json(it).id if it else None
                    errors.append({"item": item_id, "code": code, "detail": detail})
            result.append((rec, d, f, s, errors))
        return result

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        if not is_safe_name(job_id):
            return None
        rec, d, f, s, errors = self._counts_and_errors([job_id])[0]
        return None if rec is None else _summary(rec, d, f, s, errors, time.time())

    def list_jobs(
        self, status: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        _check_list_args(status, limit)
        top = "+" if not cursor else "(" + cursor
        out: list[dict[str, Any]] = []
        batch = max(2 * limit, 100) if status else limit + 1
        now = time.time()
        while len(out) <= limit:
            ids = [_text(i) for i in self.r.zrevrangebylex(self._index, top, "-", start=0, num=batch)]
            if not ids:
                break
            for rec, d, f, s, errors in self._counts_and_errors(ids):
                if rec is not None and (status is None or rec.get("status") == status):
                    out.append(_summary(rec, d, f, s, errors, now))
            if len(ids) < batch:
                break
            top = "(" + ids[-1]
        if len(out) > limit:
            return out[:limit], out[limit - 1]["id"]
        return out, None

    def get_items(self, job_id: str, start: int, stop: int) -> list[JobItem]:
        self._require(job_id)
        start, stop = max(0, start), max(0, stop)
        if stop <= start:
            return []
        return [JobItem.from_json(x) for x in self.r.lrange(self._k(job_id, "items"), start, stop - 1)]

    def item_states(
        self, job_id: str, status: str | None = None, start: int = 0, limit: int = 100
    ) -> list[dict[str, Any]]:
        _check_item_filter(status, start, limit)
        self._require(job_id)
        if limit == 0:
            return []
        if status in FINAL_STATES:
            members: list[Any] = self.r.zrange(self._k(job_id, str(status)), start, start + limit - 1)
            idx = [int(_text(i)) for i in members]
        elif status == "pending":
            idx = self.pending_indices(job_id)[start : start + limit]
        else:
            total = int(json.loads(self.r.hget(self._k(job_id), "total") or "0"))
            idx = list(range(start, min(start + limit, total)))
        if not idx:
            return []
        pipe = self.r.pipeline(transaction=False)
        contiguous = idx[-1] - idx[0] == len(idx) - 1
        if contiguous:
            pipe.lrange(self._k(job_id, "items"), idx[0], idx[-1])
        else:
            for i in idx:
                pipe.lindex(self._k(job_id, "items"), i)
        pipe.hmget(self._k(job_id, "state"), idx)
        pipe.hmget(self._k(job_id, "errors"), idx)
        *got, states, errs = pipe.execute()
        items = got[0] if contiguous else got
        out = []
        for i, it, st, err in zip(idx, items, states, errs):
            code, detail = json.loads(err) if err else (None, None)
            out.append(
                {
                    "index": i,
                    "id": JobItem.from_json(it).id,
                    "state": _text(st) if st else "pending",
                    "code": code,
                    "detail": detail,
                }
            )
        return out

    def find_item(self, job_id: str, item_id: str) -> JobItem | None:
        if not is_safe_name(job_id) or not isinstance(item_id, str):
            return None
        index = self.r.hget(self._k(job_id, "ids"), item_id)
        if index is None:
            return None
        raw = self.r.lindex(self._k(job_id, "items"), int(index))
        return JobItem.from_json(raw) if raw else None

    def pending_indices(self, job_id: str) -> list[int]:
        self._require(job_id)
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(self._k(job_id), "total")
        pipe.hkeys(self._k(job_id, "state"))
        total_raw, final = pipe.execute()
        pending = np.ones(int(json.loads(total_raw)), dtype=bool)
        if final:
            pending[np.fromiter((int(_text(i)) for i in final), dtype=np.int64, count=len(final))] = False
        return np.flatnonzero(pending).tolist()

    def mark(
        self, job_id: str, index: int, state: str, code: str | None = None, detail: str | None = None
    ) -> bool:
        _check_state(state, code, detail)
        if not is_safe_name(job_id):
            raise KeyError(job_id)
        err = json.dumps([code, detail]) if code is not None or detail is not None else ""
        keys = [self._k(job_id), self._k(job_id, "state"), self._k(job_id, state), self._k(job_id, "errors")]
        res = int(self._mark(keys=keys, args=[int(index), state, err]))
        if res == -1:
            raise KeyError(job_id)
        if res == -2:
            raise IndexError(f"item index {index} outside job {job_id}")
        return res == 1

    def clear_failed(self, job_id: str) -> int:
        if not is_safe_name(job_id):
            raise KeyError(job_id)
        keys = [self._k(job_id)] + [self._k(job_id, p) for p in ("state", "failed", "errors")]
        n = int(self._clear_failed(keys=keys))
        if n < 0:
            raise KeyError(job_id)
        return n

    def update(self, job_id: str, *, if_status: str | Iterable[str] | None = None, **fields: Any) -> bool:
        _check_update(fields)
        allowed = _statuses(if_status)
        if not is_safe_name(job_id):
            raise KeyError(job_id)
        args: list[str] = [",".join(allowed) if allowed is not None else ""]
        for k, v in fields.items():
            args += [k, json.dumps(v)]
        res = int(self._update(keys=[self._k(job_id)], args=args))
        if res < 0:
            raise KeyError(job_id)
        return res == 1

    def request_cancel(self, job_id: str) -> None:
        self._require(job_id)
        self.r.set(self._k(job_id, "cancel"), "1")

    def clear_cancel(self, job_id: str) -> None:
        self._require(job_id)
        self.r.delete(self._k(job_id, "cancel"))

    def cancel_requested(self, job_id: str) -> bool:
        return is_safe_name(job_id) and bool(self.r.exists(self._k(job_id, "cancel")))

    def finish_if_complete(self, job_id: str) -> str | None:
        if not is_safe_name(job_id):
            raise KeyError(job_id)
        keys = [self._k(job_id)] + [self._k(job_id, st) for st in FINAL_STATES]
        res = self._finish(keys=keys, args=[json.dumps(time.time()), ",".join(sorted(TERMINAL))])
        if int(res[0]) < 0:
            raise KeyError(job_id)
        return _text(res[1]) if int(res[0]) == 1 else None

    def claim_once(self, job_id: str, name: str) -> bool:
        if not is_safe_name(job_id):
            raise KeyError(job_id)
        res = int(self._once(keys=[self._k(job_id), self._k(job_id, "once")], args=[name, time.time()]))
        if res < 0:
            raise KeyError(job_id)
        return res == 1

    def claim_idempotency(self, key: str, fingerprint: str, job_id: str, ttl_s: float) -> Claim:
        value = json.dumps({"job_id": job_id, "fingerprint": fingerprint})
        ttl_ms = max(1, math.ceil(ttl_s * 1000))
        got = self._claim(keys=[f"{self.prefix}:idem:{_idem_name(key)}"], args=[value, ttl_ms])
        if got is None:
            return None
        stored = json.loads(got)
        return stored["job_id"], stored["fingerprint"] == fingerprint

    def release_idempotency(self, key: str, job_id: str) -> None:
        self._release(keys=[f"{self.prefix}:idem:{_idem_name(key)}"], args=[job_id])

    def delete_job(self, job_id: str) -> None:
        if not is_safe_name(job_id):
            return
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(*self._keys(job_id))
        pipe.zrem(self._index, job_id)
        pipe.execute()

    def ping(self) -> None:
        self.r.set(f"{self.prefix}:probe", "1", ex=10)  # a read-only replica or a full disk raises


# --------------------------------------------------------------------------------------------------
# files

_STATE_BYTES = {"done": 1, "failed": 2, "skipped": 3}
_BYTE_STATES = {0: "pending", 1: "done", 2: "failed", 3: "skipped"}


def _write_atomic(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to a temporary file beside ``path``, then ``os.replace`` it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@lru_cache(maxsize=8)
def _id_table(path: str, inode: int, mtime_ns: int) -> dict[str, int]:
    """id -> index of an ``items.jsonl`` (cached per file version; items never change)."""
    with open(path, "rb") as f:
        return {JobItem.from_json(line).id: n for n, line in enumerate(f)}


class FileJobStore(JobStore):
    """Job records in a folder, safe for several processes on one machine (module docstring).

    Args:
        root: the state folder (created when missing), e.g. ``results_dir / "state"``.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.jobs = self.root / "jobs"
        self.tmp = self.root / "tmp"
        self.idem = self.root / "idempotency"
        for d in (self.jobs, self.tmp, self.idem):
            d.mkdir(parents=True, exist_ok=True)

    def _dir(self, job_id: str) -> Path:
        if not is_safe_name(job_id):
            raise KeyError(job_id)
        return self.jobs / job_id

    @contextmanager
    def _locked(self, job_id: str) -> Iterator[Path]:
        """Hold the job's exclusive lock; KeyError when the job does not exist."""
        d = self._dir(job_id)
        try:
            fd = os.open(d / "lock", os.O_RDWR)
        except FileNotFoundError:
            raise KeyError(job_id) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not (d / "record.json").exists():  # deleted while we waited
                raise KeyError(job_id)
            yield d
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _read_record(d: Path) -> dict[str, Any]:
        return json.loads((d / "record.json").read_bytes())

    @staticmethod
    def _states(d: Path) -> np.ndarray:
        return np.frombuffer((d / "states.bin").read_bytes(), dtype=np.uint8)

    @staticmethod
    def _errors(d: Path) -> dict[int, tuple[str | None, str | None]]:
        """index -> (code, detail); the last line of an index wins."""
        path = d / "errors.jsonl"
        out: dict[int, tuple[str | None, str | None]] = {}
        if path.exists():
            with open(path, "rb") as f:
                for line in f:
                    if line.endswith(b"\n"):  # a line cut by a crash is ignored
                        i, code, detail = json.loads(line)
                        out[int(i)] = (code, detail)
        return out

    def create_job(self, record: Mapping[str, Any], items: Sequence[JobItem]) -> None:
        _check_items(items)
        rec = _new_record(record, len(items))
        job_id = rec["id"]
        if (self.jobs / job_id).exists():
            raise ValueError(f"job {job_id} exists")
        stage = self.tmp / f"{job_id}.{secrets.token_hex(6)}"
        stage.mkdir()
        try:
            offsets = np.zeros(len(items) + 1, dtype="<u8")
            with open(stage / "items.jsonl", "wb") as f:
                for n, it in enumerate(items):
                    f.write(it.to_json().encode("utf-8") + b"\n")
                    offsets[n + 1] = f.tell()
            (stage / "items.idx").write_bytes(offsets.tobytes())
            (stage / "states.bin").write_bytes(bytes(len(items)))
            (stage / "lock").touch()
            _write_atomic(stage / "record.json", json.dumps(rec).encode("utf-8"))
            try:
                os.rename(stage, self.jobs / job_id)  # atomic; fails when the folder exists (not empty)
            except OSError as e:
                raise ValueError(f"job {job_id} exists") from e
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise

    def _summary_of(self, d: Path, now: float) -> dict[str, Any] | None:
        errors = []
        try:
            rec = self._read_record(d)
            states = self._states(d)
            counts = np.bincount(states, minlength=4)
            if counts[2]:
                failed = np.flatnonzero(states == 2)[:ERRORS_SAMPLE].tolist()
                table = self._errors(d)
                for i, it in zip(failed, self._items_at(d, failed)):
                    code, detail = table.get(i, (None, None))
                    errors.append({"item": it.id, "code": code, "detail": detail})
        except FileNotFoundError:  # deleted meanwhile
            return None
        return _summary(rec, int(counts[1]), int(counts[2]), int(counts[3]), errors, now)

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        if not is_safe_name(job_id):
            return None
        return self._summary_of(self.jobs / job_id, time.time())

    def list_jobs(
        self, status: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        _check_list_args(status, limit)
        names = sorted((n for n in os.listdir(self.jobs) if is_safe_name(n)), reverse=True)
        if cursor:
            names = [n for n in names if n < cursor]
        out: list[dict[str, Any]] = []
        now = time.time()
        for name in names:
            if status is not None:
                try:
                    if self._read_record(self.jobs / name).get("status") != status:
                        continue
                except FileNotFoundError:
                    continue
            job = self._summary_of(self.jobs / name, now)
            if job is not None and (status is None or job.get("status") == status):
                out.append(job)
                if len(out) > limit:
                    return out[:limit], out[limit - 1]["id"]
        return out, None

    @staticmethod
    def _items_at(d: Path, indices: Sequence[int]) -> list[JobItem]:
        """Items at the given indices (any order), read through the offsets table."""
        if not indices:
            return []
        offsets = np.frombuffer((d / "items.idx").read_bytes(), dtype="<u8")
        out = []
        with open(d / "items.jsonl", "rb") as f:
            for i in indices:
                f.seek(int(offsets[i]))
                out.append(JobItem.from_json(f.read(int(offsets[i + 1] - offsets[i]))))
        return out

    def get_items(self, job_id: str, start: int, stop: int) -> list[JobItem]:
        d = self._dir(job_id)
        try:
            offsets = np.frombuffer((d / "items.idx").read_bytes(), dtype="<u8")
            total = len(offsets) - 1
            start, stop = min(max(0, start), total), min(max(0, stop), total)
            if stop <= start:
                return []
            with open(d / "items.jsonl", "rb") as f:
                f.seek(int(offsets[start]))
                data = f.read(int(offsets[stop] - offsets[start]))
        except FileNotFoundError:
            raise KeyError(job_id) from None
        return [JobItem.from_json(line) for line in data.splitlines()]

    def item_states(
        self, job_id: str, status: str | None = None, start: int = 0, limit: int = 100
    ) -> list[dict[str, Any]]:
        _check_item_filter(status, start, limit)
        d = self._dir(job_id)
        try:
            states = self._states(d)
            if status is None:
                idx = list(range(start, min(start + limit, len(states))))
            else:
                code = 0 if status == "pending" else _STATE_BYTES[status]
                idx = np.flatnonzero(states == code)[start : start + limit].tolist()
            items = self._items_at(d, idx)
            table = self._errors(d) if any(states[i] for i in idx) else {}
        except FileNotFoundError:
            raise KeyError(job_id) from None
        out = []
        for i, it in zip(idx, items):
            st = _BYTE_STATES[int(states[i])]
            code_, detail = table.get(i, (None, None)) if st != "pending" else (None, None)
            out.append({"index": i, "id": it.id, "state": st, "code": code_, "detail": detail})
        return out

    def find_item(self, job_id: str, item_id: str) -> JobItem | None:
        if not is_safe_name(job_id) or not isinstance(item_id, str):
            return None
        d = self.jobs / job_id
        try:
            st = os.stat(d / "items.jsonl")
            index = _id_table(str(d / "items.jsonl"), st.st_ino, st.st_mtime_ns).get(item_id)
            return None if index is None else self._items_at(d, [index])[0]
        except FileNotFoundError:
            return None

    def pending_indices(self, job_id: str) -> list[int]:
        try:
            return np.flatnonzero(self._states(self._dir(job_id)) == 0).tolist()
        except FileNotFoundError:
            raise KeyError(job_id) from None

    def mark(
        self, job_id: str, index: int, state: str, code: str | None = None, detail: str | None = None
    ) -> bool:
        _check_state(state, code, detail)
        index = int(index)
        with self._locked(job_id) as d:
            fd = os.open(d / "states.bin", os.O_RDWR)
            try:
                total = os.fstat(fd).st_size
                if not 0 <= index < total:
                    raise IndexError(f"item index {index} outside job {job_id}")
                if os.pread(fd, 1, index) != b"\0":
                    return False
                if code is not None or detail is not None:  # the reason first: a state never lacks it
                    with open(d / "errors.jsonl", "ab") as f:
                        f.write(json.dumps([index, code, detail]).encode("utf-8") + b"\n")
                os.pwrite(fd, bytes([_STATE_BYTES[state]]), index)
                return True
            finally:
                os.close(fd)

    def clear_failed(self, job_id: str) -> int:
        with self._locked(job_id) as d:
            states = self._states(d).copy()
            failed = states == 2
            n = int(failed.sum())
            if n:
                keep = {i: e for i, e in self._errors(d).items() if not failed[i]}
                lines = b"".join(json.dumps([i, c, t]).encode("utf-8") + b"\n" for i, (c, t) in keep.items())
                _write_atomic(d / "errors.jsonl", lines)
                states[failed] = 0
                _write_atomic(d / "states.bin", states.tobytes())
            return n

    def update(self, job_id: str, *, if_status: str | Iterable[str] | None = None, **fields: Any) -> bool:
        _check_update(fields)
        allowed = _statuses(if_status)
        with self._locked(job_id) as d:
            rec = self._read_record(d)
            if allowed is not None and rec.get("status") not in allowed:
                return False
            if fields:
                rec.update(fields)
                _write_atomic(d / "record.json", json.dumps(rec).encode("utf-8"))
            return True

    def request_cancel(self, job_id: str) -> None:
        with self._locked(job_id) as d:
            (d / "cancel").touch()

    def clear_cancel(self, job_id: str) -> None:
        with self._locked(job_id) as d:
            (d / "cancel").unlink(missing_ok=True)

    def cancel_requested(self, job_id: str) -> bool:
        return is_safe_name(job_id) and (self.jobs / job_id / "cancel").exists()

    def finish_if_complete(self, job_id: str) -> str | None:
        with self._locked(job_id) as d:
            counts = np.bincount(self._states(d), minlength=4)
            if counts[0]:
                return None
            rec = self._read_record(d)
            if rec.get("status") in TERMINAL:
                return rec["status"]
            rec["status"] = _final_status(int(counts[1]), int(counts[2]))
            rec["finished_at"] = time.time()
            _write_atomic(d / "record.json", json.dumps(rec).encode("utf-8"))
            return rec["status"]

    def claim_once(self, job_id: str, name: str) -> bool:
        marker = "once." + hashlib.sha256(name.encode("utf-8")).hexdigest()[:32]
        with self._locked(job_id) as d:
            try:
                os.close(os.open(d / marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                return False
            return True

    @contextmanager
    def _idem_locked(self) -> Iterator[None]:
        fd = os.open(self.idem / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def claim_idempotency(self, key: str, fingerprint: str, job_id: str, ttl_s: float) -> Claim:
        path = self.idem / f"{_idem_name(key)}.json"
        with self._idem_locked():
            now = time.time()
            if path.exists():
                stored = json.loads(path.read_bytes())
                if stored["expires_at"] > now:
                    return stored["job_id"], stored["fingerprint"] == fingerprint
            value = {"job_id": job_id, "fingerprint": fingerprint, "expires_at": now + ttl_s}
            _write_atomic(path, json.dumps(value).encode("utf-8"))
            # forget expired keys now and then, so the folder does not grow for ever
            if secrets.randbelow(64) == 0:
                for p in self.idem.glob("*.json"):
                    try:
                        if json.loads(p.read_bytes())["expires_at"] <= now:
                            p.unlink()
                    except (OSError, ValueError, KeyError):
                        pass
            return None

    def release_idempotency(self, key: str, job_id: str) -> None:
        path = self.idem / f"{_idem_name(key)}.json"
        with self._idem_locked():
            if path.exists() and json.loads(path.read_bytes())["job_id"] == job_id:
                path.unlink()

    def delete_job(self, job_id: str) -> None:
        if not is_safe_name(job_id):
            return
        d = self.jobs / job_id
        if not d.exists():
            return
        trash = self.tmp / f"deleted.{job_id}.{secrets.token_hex(6)}"
        try:
            with self._locked(job_id):
                os.rename(d, trash)  # gone at once for every reader; removed below
        except (KeyError, FileNotFoundError):
            return
        shutil.rmtree(trash, ignore_errors=True)

    def ping(self) -> None:
        probe = self.tmp / f".probe.{os.getpid()}.{secrets.token_hex(4)}"
        probe.write_bytes(b"ok")
        probe.unlink()
        os.listdir(self.jobs)
