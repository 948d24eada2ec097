"""Helpers of the service tests: real processes (a uvicorn server with
``--factory hsc.service.main:app_factory``; in broker mode a Celery worker through
``hsc.worker.main.run_worker``), polling, the upload archives, Redis clean-up."""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REDIS_URL = "redis://127.0.0.1:6379/15"
SIZE = (64, 48)
N_TRAIN = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns a truthy value; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


def base_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSC_")}
    env.update(
        {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HSC_LOG_LEVEL": "warning"}
    )
    env.update(extra)
    return env


class Proc:
    """A subprocess with its output in a log file (printed when a test fails)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"{name}-{secrets.token_hex(3)}.log"
        self._fh = open(self.log, "wb")
        self.p = subprocess.Popen(
            args, env=env, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.alive():
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(10)
        else:  # its children (a pool) may outlive it
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._fh.close()

    def kill(self) -> None:
        """SIGKILL the process alone (not its group): what a crash looks like."""
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)


def start_server(
    env: dict[str, str], log_dir: Path, *, ready: bool = True, timeout: float = 60.0
) -> tuple[Proc, str]:
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "hsc.service.main:app_factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = Proc("api", args, env, log_dir)
    url = f"http://127.0.0.1:{port}"
    key = env.get("HSC_API_KEYS", "").split(",")[0]
    headers = {"X-API-Key": key} if key else {}

    def up(path: str) -> bool:
        if not proc.alive():
            raise AssertionError(f"the API exited:\n{proc.tail()}")
        try:
            return httpx.get(url + path, timeout=2, headers=headers).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(lambda: up("/healthz"), timeout, "the API to answer /healthz")
        if ready:
            wait_for(lambda: up("/readyz"), timeout, "the API to be ready", interval=0.2)
    except BaseException:
        print(proc.tail())
        proc.stop()
        raise
    return proc, url


WORKER_CODE = (
    "import sys; from hsc.core.settings import Settings; from hsc.worker.main import run_worker; "
    "sys.exit(run_worker(Settings(), hostname=sys.argv[1]))"
)


def start_worker(env: dict[str, str], log_dir: Path, hostname: str) -> Proc:
    return Proc("worker", [sys.executable, "-c", WORKER_CODE, hostname], env, log_dir)


# --------------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class Model:
    path: Path
    id: str
    sha256: str
    classes: tuple[str, ...]  # background first


def upload_zip(dataset: Path, n: int = N_TRAIN, *, extra: dict[str, bytes] | None = None) -> bytes:
    """A zip of ``n`` train images + ``manifest.jsonl`` (+ ``classes.txt``), as a user would upload."""
    lines = (dataset / "manifest_train.jsonl").read_text().splitlines()[:n]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        out = []
        for line in lines:
            rec = json.loads(line)
            z.write(dataset / rec["image"], rec["image"])
            out.append(json.dumps({"id": rec["id"], "image": rec["image"], "labels": rec["labels"]}))
        z.writestr("manifest.jsonl", "\n".join(out) + "\n")
        z.writestr("classes.txt", (dataset / "classes.txt").read_text())
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return buf.getvalue()


def image_bytes(dataset: Path, i: int = 0) -> bytes:
    return (dataset / "JPEGImages" / f"train_{i:06d}.jpg").read_bytes()


def labels_of(dataset: Path, i: int = 0) -> list[str]:
    line = (dataset / "manifest_train.jsonl").read_text().splitlines()[i]
    return list(json.loads(line)["labels"])


# --------------------------------------------------------------------------------------------------
# the service under test


@dataclass
class Service:
    """One API (and, in broker mode, one worker) with a client; restartable."""

    mode: str
    env: dict[str, str]
    log_dir: Path
    results_dir: Path
    model: Model
    dataset: Path
    api: Proc | None = None
    url: str = ""
    worker: Proc | None = None
    worker_names: list[str] = field(default_factory=list)
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=60))

    def start_api(self) -> None:
        self.api, self.url = start_server(self.env, self.log_dir)
        self.client.close()
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def stop_api(self) -> None:
        if self.api is not None:
            self.api.stop()
            self.api = None

    def restart_api(self) -> None:
        self.stop_api()
        self.start_api()

    def start_worker(self) -> None:
        name = f"svc-test-{secrets.token_hex(3)}@{socket.gethostname()}"
        self.worker_names.append(name)
        self.worker = start_worker(self.env, self.log_dir, name)

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.worker is not None and not self.worker.alive():
                raise AssertionError(f"the worker exited:\n{self.worker.tail()}")
            return self.client.get("/readyz").status_code == 200

        wait_for(ready, timeout, "/readyz", interval=0.2)

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.client.get(f"/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def wait_job(
        self, job_id: str, timeout: float = 60.0, statuses: tuple[str, ...] | None = None
    ) -> dict[str, Any]:
        final = statuses or ("succeeded", "failed", "partially_succeeded", "cancelled")
        return wait_for(
            lambda: (j := self.job(job_id))["status"] in final and j,
            timeout,  # type: ignore[no-any-return]
            f"job {job_id} to reach {final}",
            interval=0.1,
        )

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail()}" for p in (self.api, self.worker) if p is not None)

    def close(self) -> None:
        self.client.close()
        self.stop_api()
        if self.worker is not None:
            self.worker.stop()


def cleanup_redis(queue: str, model_id: str, worker_names: list[str]) -> None:
    """Delete the jobs of ``model_id``, the queue's lists and the heartbeats this test made."""
    import redis

    from hsc.core.jobs import RedisJobStore
    from hsc.core.queue import worker_key

    r = redis.Redis.from_url(REDIS_URL)
    store = RedisJobStore(r)
    cursor = None
    mine: set[str] = set()
    while True:
        jobs, cursor = store.list_jobs(limit=500, cursor=cursor)
        for j in jobs:
            if j.get("model") == model_id:
                store.delete_job(j["id"])
                mine.add(j["id"])
        if not cursor:
            break
    for key in r.scan_iter(match="hsc:idem:*"):  # Idempotency-Keys bound to those jobs
        value = r.get(key)
        if value is not None and json.loads(value).get("job_id") in mine:
            r.delete(key)
    names = (
        [queue]
        + [f"{queue}\x06\x16{p}" for p in (3, 6, 9)]
        + [f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
    )
    r.delete(*names, *[worker_key(n) for n in worker_names])
    r.close()


def service_env(
    mode: str, model: Model, dataset: Path, results: Path, queue: str, **extra: str
) -> dict[str, str]:
    env = {
        "HSC_RESULTS_DIR": str(results),
        "HSC_CHECKPOINTS": str(model.path),
        "HSC_ALLOWED_ROOTS": str(dataset),
        "HSC_DEVICE": "cpu",
        "HSC_JOB_CHUNK": "4",
        "HSC_CRF_WORKERS": "0",
        "HSC_SYNC_TIMEOUT_S": "60",
        "HSC_MAX_UPLOAD_BYTES": str(2 * 1024 * 1024),
        "HSC_MAX_PIXELS": str(1_000_000),
        "HSC_QUEUE": queue,
        "HSC_HEARTBEAT_S": "1",
        "HSC_VISIBILITY_TIMEOUT_S": "4",
    }
    if mode == "broker":
        env["HSC_REDIS_URL"] = REDIS_URL
    env.update(extra)
    return base_env(env)


@contextmanager
def running_service(
    mode: str, model: Model, dataset: Path, tmp: Path, prefix: str = "hsc-svctest", **extra: str
) -> Iterator[Service]:
    """A ready service in ``mode`` ("embedded" or "broker": a Celery worker too) under ``tmp`` (removed
    afterwards), its logs printed when the block fails, its Redis keys removed. ``extra``: more
    environment (``HSC_...=value``) for its processes."""
    queue = f"{prefix}-{secrets.token_hex(4)}"
    env = service_env(mode, model, dataset, tmp / "results", queue, **extra)
    s = Service(mode, env, tmp, tmp / "results", model, dataset)
    try:
        if mode == "broker":
            s.start_worker()
        s.start_api()
        s.wait_ready()
        yield s
    except BaseException:
        print(s.logs())
        raise
    finally:
        s.close()
        if mode == "broker":
            cleanup_redis(queue, model.id, s.worker_names)
        shutil.rmtree(tmp, ignore_errors=True)
