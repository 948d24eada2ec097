"""Job records (core/jobs.py): one suite over RedisJobStore (real Redis, db 15) and FileJobStore."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import re
import shutil
import time
import uuid
from pathlib import Path

import pytest
import redis

from hsc.core.jobs import (
    JOB_STATUSES,
    TERMINAL,
    FileJobStore,
    JobItem,
    JobStore,
    RedisJobStore,
    job_dir,
    new_job_id,
)

REDIS_URL = os.environ.get("HSC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _redis_client() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as e:
        pytest.skip(f"no Redis at {REDIS_URL}: {e}")
    return client


def _make_store(kind: str, where: str) -> JobStore:
    """A store of ``kind``: ``where`` is the Redis key prefix or the state folder."""
    if kind == "redis":
        return RedisJobStore(redis.Redis.from_url(REDIS_URL), prefix=where)
    return FileJobStore(Path(where))


@pytest.fixture(params=["redis", "file"])
def backend(request, tmp_path):
    """(kind, where): a fresh, empty store location; Redis keys are deleted afterwards."""
    if request.param == "redis":
        client = _redis_client()
        prefix = f"hsc-test-{uuid.uuid4().hex[:12]}"
        yield "redis", prefix
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    else:
        yield "file", str(tmp_path / "state")


@pytest.fixture
def store(backend) -> JobStore:
    return _make_store(*backend)


def items(n: int, root: str = "/data") -> list[JobItem]:
    return [JobItem(i, f"img_{i:05d}", f"{root}/img_{i:05d}.jpg", (i % 3, 2)) for i in range(n)]


def make_job(store: JobStore, n: int = 5, **record) -> str:
    job_id = new_job_id()
    rec = {"id": job_id, "model": "m1", "options": {"crf": True}, "dataset": {"kind": "upload"}}
    store.create_job({**rec, **record}, items(n))
    return job_id


# --------------------------------------------------------------------------------------------------
# ids and items


def test_job_ids_are_unique_sortable_and_safe():
    ids = [new_job_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)  # strictly increasing within a process, even inside one millisecond
    assert all(re.fullmatch(r"job_[0-9A-HJKMNP-TV-Z]{26}", i) for i in ids)
    before = new_job_id()
    time.sleep(0.003)
    assert new_job_id() > before


def test_job_dir_refuses_unsafe_ids(tmp_path):
    assert job_dir(tmp_path, "job_X1") == tmp_path / "jobs" / "job_X1"
    for bad in ("..", "../x", "a/b", "", ".hidden", "-x", "a b"):
        with pytest.raises(ValueError):
            job_dir(tmp_path, bad)


def test_job_item_validates_and_normalises():
    it = JobItem(0, "a.b_c-1", "/x/y.jpg", (3, 1, 3))
    assert it.labels == (1, 3)
    assert JobItem.from_json(it.to_json()) == it
    for bad in (
        dict(index=-1, id="a", image="/a", labels=(0,)),
        dict(index=0, id="../a", image="/a", labels=(0,)),
        dict(index=0, id="..", image="/a", labels=(0,)),
        dict(index=0, id="a", image="rel/a.jpg", labels=(0,)),
        dict(index=0, id="a", image="/a", labels=(-1,)),
    ):
        with pytest.raises(ValueError):
            JobItem(**bad)


# --------------------------------------------------------------------------------------------------
# records


def test_create_and_get(store):
    job_id = make_job(store, 4, extra={"k": [1, 2]})
    job = store.get_job(job_id)
    assert job["id"] == job_id and job["status"] == "queued" and job["model"] == "m1"
    assert job["options"] == {"crf": True} and job["extra"] == {"k": [1, 2]}
    assert job["total"] == 4 and abs(job["created_at"] - time.time()) < 60
    assert job["started_at"] is None and job["finished_at"] is None
    assert job["progress"] == {"total": 4, "done": 0, "failed": 0, "skipped": 0, "percent": 0.0}
    assert job["rate_images_per_s"] is None and job["eta_s"] is None and job["errors_sample"] == []
    assert store.get_job(new_job_id()) is None
    assert store.get_job("../../etc") is None


def test_create_refuses_duplicates_and_bad_input(store):
    job_id = make_job(store, 2)
    with pytest.raises(ValueError, match="exists"):
        store.create_job({"id": job_id}, items(1))
    assert store.get_job(job_id)["total"] == 2  # the first job is untouched
    with pytest.raises(ValueError, match="index"):
        store.create_job({"id": new_job_id()}, items(3)[1:])
    dup = [JobItem(0, "a", "/a.jpg", (0,)), JobItem(1, "a", "/b.jpg", (0,))]
    with pytest.raises(ValueError, match="duplicate"):
        store.create_job({"id": new_job_id()}, dup)
    with pytest.raises(ValueError, match="status"):
        store.create_job({"id": new_job_id(), "status": "sleeping"}, items(1))
    with pytest.raises(ValueError):
        store.create_job({"id": "a/b"}, items(1))
    with pytest.raises(ValueError):
        store.create_job({"model": "no id"}, items(1))
    assert [j["id"] for j in store.list_jobs()[0]] == [job_id]  # nothing half-made


def test_items_and_lookup(store):
    job_id = make_job(store, 7)
    assert store.get_items(job_id, 2, 5) == items(7)[2:5]
    assert store.get_items(job_id, 5, 100) == items(7)[5:]
    assert store.get_items(job_id, 4, 4) == [] and store.get_items(job_id, 9, 12) == []
    assert store.find_item(job_id, "img_00006") == items(7)[6]
    assert store.find_item(job_id, "img_00099") is None
    assert store.find_item(new_job_id(), "img_00001") is None
    with pytest.raises(KeyError):
        store.get_items(new_job_id(), 0, 3)


def test_mark_counts_each_item_once(store):
    job_id = make_job(store, 5)
    assert store.mark(job_id, 0, "done") is True
    assert store.mark(job_id, 0, "done") is False
    assert store.mark(job_id, 0, "failed", "corrupt_image", "x") is False  # final stays final
    assert store.mark(job_id, 1, "failed", "corrupt_image", "cannot decode") is True
    assert store.mark(job_id, 2, "skipped", "cancelled") is True
    job = store.get_job(job_id)
    assert job["progress"] == {"total": 5, "done": 1, "failed": 1, "skipped": 1, "percent": 60.0}
    assert job["errors_sample"] == [{"item": "img_00001", "code": "corrupt_image", "detail": "cannot decode"}]
    assert store.pending_indices(job_id) == [3, 4]
    with pytest.raises(IndexError):
        store.mark(job_id, 5, "done")
    with pytest.raises(IndexError):
        store.mark(job_id, -1, "done")
    with pytest.raises(ValueError):
        store.mark(job_id, 3, "pending")
    with pytest.raises(KeyError):
        store.mark(new_job_id(), 0, "done")


def test_item_states_filter_and_page(store):
    job_id = make_job(store, 12)
    for i in (1, 4, 7, 10):
        store.mark(job_id, i, "failed", "corrupt_image", f"bad {i}")
    for i in (0, 2, 3):
        store.mark(job_id, i, "done")
    store.mark(job_id, 5, "skipped")
    page = store.item_states(job_id, start=0, limit=3)
    assert page == [
        {"index": 0, "id": "img_00000", "state": "done", "code": None, "detail": None},
        {"index": 1, "id": "img_00001", "state": "failed", "code": "corrupt_image", "detail": "bad 1"},
        {"index": 2, "id": "img_00002", "state": "done", "code": None, "detail": None},
    ]
    assert [s["index"] for s in store.item_states(job_id, start=10)] == [10, 11]
    failed = store.item_states(job_id, "failed", start=1, limit=2)
    assert [(s["index"], s["detail"]) for s in failed] == [(4, "bad 4"), (7, "bad 7")]
    assert [s["index"] for s in store.item_states(job_id, "pending")] == [6, 8, 9, 11]
    assert [s["index"] for s in store.item_states(job_id, "pending", start=2, limit=5)] == [9, 11]
    assert [s["state"] for s in store.item_states(job_id, "skipped")] == ["skipped"]
    assert store.item_states(job_id, "done", start=3) == []
    with pytest.raises(ValueError):
        store.item_states(job_id, "nope")
    with pytest.raises(KeyError):
        store.item_states(new_job_id())


def test_errors_sample_is_the_first_ten_failures(store):
    job_id = make_job(store, 30)
    for i in reversed(range(3, 30, 2)):
        store.mark(job_id, i, "failed", "corrupt_image", str(i))
    sample = store.get_job(job_id)["errors_sample"]
    assert [e["detail"] for e in sample] == [str(i) for i in range(3, 23, 2)]


def test_clear_failed_makes_failures_pending_again(store):
    job_id = make_job(store, 6)
    store.mark(job_id, 0, "done")
    store.mark(job_id, 1, "failed", "corrupt_image", "a")
    store.mark(job_id, 2, "failed", "gpu_oom", "b")
    store.mark(job_id, 3, "skipped", "why", "kept")
    assert store.clear_failed(job_id) == 2
    assert store.clear_failed(job_id) == 0
    assert store.pending_indices(job_id) == [1, 2, 4, 5]
    job = store.get_job(job_id)
    assert job["progress"]["failed"] == 0 and job["errors_sample"] == []
    assert store.item_states(job_id, start=3, limit=1)[0]["detail"] == "kept"
    assert store.mark(job_id, 1, "done") is True  # marks count again after the reset
    assert store.item_states(job_id, start=1, limit=1)[0] == {
        "index": 1,
        "id": "img_00001",
        "state": "done",
        "code": None,
        "detail": None,
    }


def test_update_merges_and_can_be_conditional(store):
    job_id = make_job(store, 2)
    assert store.update(job_id, status="running", started_at=123.5, note={"a": 1}) is True
    job = store.get_job(job_id)
    assert (job["status"], job["started_at"], job["note"], job["model"]) == ("running", 123.5, {"a": 1}, "m1")
    assert store.update(job_id, if_status="queued", status="running", started_at=999.0) is False
    assert store.get_job(job_id)["started_at"] == 123.5
    assert store.update(job_id, if_status=("queued", "running"), status="cancelling") is True
    assert store.update(job_id, if_status="cancelling", status="cancelled") is True
    assert store.get_job(job_id)["status"] == "cancelled"
    assert store.update(job_id, finished_at=None) is True and store.get_job(job_id)["finished_at"] is None
    bads: list[dict[str, object]] = [{"status": "sleeping"}, {"id": "x"}, {"total": 3}, {"progress": {}}]
    for bad in bads:
        with pytest.raises(ValueError):
            store.update(job_id, **bad)
    with pytest.raises(ValueError):
        store.update(job_id, if_status="sleeping", status="queued")
    with pytest.raises(KeyError):
        store.update(new_job_id(), status="running")


def test_cancel_flag(store):
    job_id = make_job(store, 2)
    assert store.cancel_requested(job_id) is False
    store.request_cancel(job_id)
    store.request_cancel(job_id)
    assert store.cancel_requested(job_id) is True
    store.clear_cancel(job_id)
    assert store.cancel_requested(job_id) is False
    assert store.cancel_requested(new_job_id()) is False
    with pytest.raises(KeyError):
        store.request_cancel(new_job_id())


@pytest.mark.parametrize(
    "marks, status",
    [
        (["done", "done", "done"], "succeeded"),
        (["done", "skipped", "done"], "succeeded"),
        (["done", "failed", "skipped"], "partially_succeeded"),
        (["failed", "failed", "failed"], "failed"),
        (["failed", "skipped", "failed"], "failed"),
    ],
)
def test_finish_if_complete(store, marks, status):
    job_id = make_job(store, 3)
    store.update(job_id, status="running", started_at=time.time() - 2)
    for i, m in enumerate(marks[:-1]):
        store.mark(job_id, i, m, "code" if m != "done" else None)
    assert store.finish_if_complete(job_id) is None
    assert store.get_job(job_id)["status"] == "running"
    store.mark(job_id, 2, marks[-1])
    assert store.finish_if_complete(job_id) == status
    job = store.get_job(job_id)
    assert job["status"] == status and job["finished_at"] is not None
    assert job["progress"]["percent"] == 100.0 and job["eta_s"] == 0.0
    assert 0.5 < job["rate_images_per_s"] < 3.0
    finished = job["finished_at"]
    time.sleep(0.01)
    assert store.finish_if_complete(job_id) == status  # a second call changes nothing
    assert store.get_job(job_id)["finished_at"] == finished


def test_finish_keeps_a_terminal_status_and_retry_reopens(store):
    job_id = make_job(store, 2)
    store.mark(job_id, 0, "done")
    store.update(job_id, status="cancelled")
    store.mark(job_id, 1, "failed", "x")
    assert store.finish_if_complete(job_id) == "cancelled"
    # retry-failed: reset the failures, reopen the job, finish again
    assert store.clear_failed(job_id) == 1
    store.update(job_id, status="queued", finished_at=None)
    assert store.finish_if_complete(job_id) is None
    store.mark(job_id, 1, "done")
    assert store.finish_if_complete(job_id) == "succeeded"


def test_rate_and_eta_while_running(store):
    job_id = make_job(store, 10)
    store.update(job_id, status="running", started_at=time.time() - 4.0)
    for i in range(4):
        store.mark(job_id, i, "done")
    job = store.get_job(job_id)
    assert job["rate_images_per_s"] == pytest.approx(1.0, rel=0.2)
    assert job["eta_s"] == pytest.approx(6.0, rel=0.2)
    assert job["progress"]["percent"] == 40.0


def test_list_jobs_newest_first_with_filter_and_cursor(store):
    ids = [make_job(store, 1) for _ in range(7)]
    for job_id in ids[::2]:
        store.update(job_id, status="running")
    newest = ids[::-1]
    seen, cursor = [], None
    while True:
        page, cursor = store.list_jobs(limit=3, cursor=cursor)
        seen += [j["id"] for j in page]
        assert len(page) <= 3
        if cursor is None:
            break
    assert seen == newest
    page, cursor = store.list_jobs(limit=7)
    assert len(page) == 7 and cursor is None and "progress" in page[0]
    running, cursor = store.list_jobs(status="running", limit=2)
    assert [j["id"] for j in running] == newest[0:4:2][:2] and cursor == running[-1]["id"]
    running2, cursor2 = store.list_jobs(status="running", limit=2, cursor=cursor)
    assert [j["id"] for j in running2] == [ids[2], ids[0]] and cursor2 is None
    assert store.list_jobs(status="failed") == ([], None)
    with pytest.raises(ValueError):
        store.list_jobs(status="sleeping")
    with pytest.raises(ValueError):
        store.list_jobs(limit=0)


def test_delete_job(store):
    job_id, other = make_job(store, 3), make_job(store, 2)
    store.mark(job_id, 0, "failed", "x", "y")
    store.request_cancel(job_id)
    store.delete_job(job_id)
    store.delete_job(job_id)  # twice is fine
    assert store.get_job(job_id) is None
    assert store.find_item(job_id, "img_00000") is None
    assert store.cancel_requested(job_id) is False
    assert [j["id"] for j in store.list_jobs()[0]] == [other]
    with pytest.raises(KeyError):
        store.mark(job_id, 1, "done")
    store.create_job({"id": job_id}, items(1))  # the id can be used again, from scratch
    job = store.get_job(job_id)
    assert job["total"] == 1 and job["progress"]["failed"] == 0 and store.pending_indices(job_id) == [0]


def test_claim_once(backend):
    store, other_process = _make_store(*backend), _make_store(*backend)
    job_id = make_job(store, 2)
    assert store.claim_once(job_id, "webhook:completed:1.5") is True
    assert store.claim_once(job_id, "webhook:completed:1.5") is False
    assert other_process.claim_once(job_id, "webhook:completed:1.5") is False
    assert other_process.claim_once(job_id, "webhook:completed:2.5") is True
    with pytest.raises(KeyError):
        store.claim_once(new_job_id(), "x")
    store.delete_job(job_id)  # the claims go with the job
    store.create_job({"id": job_id}, items(1))
    assert store.claim_once(job_id, "webhook:completed:1.5") is True


def test_idempotency_claims(store):
    key = f"key-{uuid.uuid4().hex}"
    assert store.claim_idempotency(key, "fp1", "job_A", ttl_s=60) is None
    assert store.claim_idempotency(key, "fp1", "job_B", ttl_s=60) == ("job_A", True)
    assert store.claim_idempotency(key, "fp2", "job_C", ttl_s=60) == ("job_A", False)
    store.release_idempotency(key, "job_B")  # not bound to job_B: kept
    assert store.claim_idempotency(key, "fp1", "job_D", ttl_s=60) == ("job_A", True)
    store.release_idempotency(key, "job_A")
    assert store.claim_idempotency(key, "fp3", "job_E", ttl_s=0.2) is None
    time.sleep(0.35)
    assert store.claim_idempotency(key, "fp3", "job_F", ttl_s=60) is None  # expired, claimed again
    assert store.claim_idempotency(key, "fp3", "job_G", ttl_s=60) == ("job_F", True)


def test_ping(store):
    store.ping()


def test_ping_raises_for_unusable_storage(tmp_path):
    bad = RedisJobStore(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5))
    with pytest.raises(redis.ConnectionError):
        bad.ping()
    fs = FileJobStore(tmp_path / "broken")
    shutil.rmtree(tmp_path / "broken" / "tmp")
    (tmp_path / "broken" / "tmp").write_bytes(b"not a folder")  # works as root too, unlike chmod
    with pytest.raises(OSError):
        fs.ping()


def test_file_store_is_shared_by_instances_and_survives_a_new_instance(tmp_path):
    a = FileJobStore(tmp_path / "state")
    job_id = make_job(a, 3)
    a.mark(job_id, 1, "done")
    b = FileJobStore(tmp_path / "state")
    assert b.get_job(job_id)["progress"]["done"] == 1
    assert b.mark(job_id, 1, "done") is False
    assert b.find_item(job_id, "img_00002") == items(3)[2]


# --------------------------------------------------------------------------------------------------
# several processes at once


def _hammer(kind: str, where: str, job_id: str, proc: int, n: int, barrier, results) -> None:
    """Mark every item of the job (in a shuffled order), update the record, try to finish."""
    store = _make_store(kind, where)
    order = list(range(n))
    random.Random(proc).shuffle(order)
    barrier.wait()
    firsts = 0
    finished = []
    for step, i in enumerate(order):
        state = "failed" if i % 5 == 0 else "done"
        firsts += store.mark(job_id, i, state, "corrupt_image" if state == "failed" else None, f"p{proc}")
        if step % 10 == 0:
            store.update(job_id, **{f"seen_by_{proc}": step})
        finished.append(store.finish_if_complete(job_id))
    results.put((proc, firsts, [s for s in finished if s is not None]))


@pytest.mark.parametrize("nproc", [4])
def test_concurrent_processes_count_exactly_once(backend, nproc):
    kind, where = backend
    store = _make_store(kind, where)
    n = 300
    job_id = make_job(store, n)
    store.update(job_id, status="running", started_at=time.time())
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(nproc), ctx.Queue()
    procs = [
        ctx.Process(target=_hammer, args=(kind, where, job_id, p, n, barrier, results)) for p in range(nproc)
    ]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sum(firsts for _, firsts, _ in got) == n  # every item counted by exactly one process
    job = store.get_job(job_id)
    assert job["progress"] == {"total": n, "done": 240, "failed": 60, "skipped": 0, "percent": 100.0}
    assert job["status"] == "partially_succeeded"
    assert all(job[f"seen_by_{p}"] == 290 for p in range(nproc))  # no update lost another's field
    assert all(set(fin) == {"partially_succeeded"} for _, _, fin in got)
    assert store.pending_indices(job_id) == []
    assert len(store.item_states(job_id, "failed", limit=1000)) == 60


def test_statuses_constants():
    assert TERMINAL < set(JOB_STATUSES)
    assert set(JOB_STATUSES) - TERMINAL == {"queued", "running", "cancelling"}


def test_redis_store_works_with_decoded_responses():
    client = _redis_client()
    prefix = f"hsc-test-{uuid.uuid4().hex[:12]}"
    store = RedisJobStore(redis.Redis.from_url(REDIS_URL, decode_responses=True), prefix=prefix)
    try:
        job_id = make_job(store, 3)
        store.mark(job_id, 0, "failed", "corrupt_image", "d")
        store.mark(job_id, 1, "done")
        store.mark(job_id, 2, "skipped")
        assert store.finish_if_complete(job_id) == "partially_succeeded"
        job = store.get_job(job_id)
        assert job["errors_sample"] == [{"item": "img_00000", "code": "corrupt_image", "detail": "d"}]
        assert [s["state"] for s in store.item_states(job_id)] == ["failed", "done", "skipped"]
        assert store.list_jobs()[0][0]["id"] == job_id
        assert store.find_item(job_id, "img_00002") == items(3)[2]
        assert store.claim_idempotency("k", "fp", job_id, 60) is None
        assert store.claim_idempotency("k", "fp", "other", 60) == (job_id, True)
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
