"""Bounded load test of the service on loopback: latency and throughput of ``POST /pseudo-label`` with 1
and 2 workers, in broker mode and embedded mode, against calling the Predictor directly.

For each configuration the script starts its own processes and stops them afterwards:

* ``embedded-N`` -- ``hsc serve`` without a broker: the API process and its pool of N model processes;
* ``broker-N``   -- ``hsc serve`` with ``HSC_REDIS_URL`` and N ``hsc worker`` processes (solo pool) on a
  real Redis, a queue and worker names of their own (deleted afterwards).

A fixed number of requests (``--requests``) is sent by ``--concurrency`` client tasks (httpx, one
connection each), after a warm-up that loads the model in every worker. Each request uploads one JPEG
of the synthetic dataset with its labels and waits for the JSON answer (mask as base64 PNG, the
service's defaults otherwise: CRF on). Per run: p50/p95/max latency and images/s of the answered
requests (answers / wall time); refusals (problem+json) are counted by status and code, not hidden.

``direct`` calls :meth:`Predictor.predict` on the same images in this process, one at a time, with the
torch threads one worker gets (decode + CAM + CRF, the outputs the worker asks for: mask and CAMs). The
overhead lines compare it with the 1-worker runs at concurrency 1 (end to end), and give for every run
the time each request spent outside the worker's own work (its answer's ``timings_ms.total``: decode,
predict, result encoding): HTTP, multipart parsing and checks in the API, the queue or pool hand-off
and the way back, JSON, the client. That part does not depend on how fast the model runs.

Torch threads: each model process gets ``cpu_count // workers`` (``HSC_TORCH_THREADS``; the service's
own default rule), so 1 and 2 workers use the same cores; ``--threads`` changes it for every model
process and the direct run. On a machine shared with other work the figures move, 2-thread processes
most (a descheduled thread stalls the other at each parallel region: seen here 6-25x slower with
another job holding one of the two cores; ``--threads 1`` avoids it); the script prints the load
average before and after.

    python benchmarks/bench_service.py                          # the shipped demo checkpoint
    python benchmarks/bench_service.py --requests 64 --concurrency 1 4 --size 500x375 --json out.json
    python benchmarks/bench_service.py --configs embedded-1 broker-2 --checkpoint my.safetensors
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from hsc.core.settings import DEMO_CHECKPOINT

CONFIGS = ("embedded-1", "embedded-2", "broker-1", "broker-2")


@dataclass(frozen=True)
class Sample:
    name: str
    data: bytes
    labels: tuple[str, ...]


# --------------------------------------------------------------------------------------------------
# figures


def summarise(latencies_s: list[float], wall_s: float) -> dict[str, float]:
    """p50/p95/max latency (ms) and images/s of one run (answered requests only)."""
    lat = sorted(latencies_s)
    if not lat:
        nan = float("nan")
        return {"n": 0, "p50_ms": nan, "p95_ms": nan, "max_ms": nan, "images_per_s": 0.0, "wall_s": wall_s}
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    return {
        "n": len(lat),
        "p50_ms": 1000 * statistics.median(lat),
        "p95_ms": 1000 * q[94],
        "max_ms": 1000 * lat[-1],
        "images_per_s": len(lat) / wall_s,
        "wall_s": wall_s,
    }


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --------------------------------------------------------------------------------------------------
# data and the direct baseline


def make_samples(root: Path, n: int, size: tuple[int, int], seed: int) -> list[Sample]:
    """``n`` synthetic JPEGs with their labels (the demo checkpoint's five classes)."""
    from hsc.training.synth import synthesize

    synthesize(root, train=n, val=1, size=size, num_classes=5, seed=seed)
    out = []
    for line in (root / "manifest_train.jsonl").read_text().splitlines()[:n]:
        rec = json.loads(line)
        out.append(Sample(rec["id"], (root / rec["image"]).read_bytes(), tuple(rec["labels"])))
    return out


def run_direct(
    checkpoint: Path, samples: list[Sample], *, threads: int, crf: bool, mode: str
) -> dict[str, Any]:
    """Decode + :meth:`Predictor.predict` per image, one at a time, in this process."""
    import torch

    from hsc.model.predictor import Predictor

    torch.set_num_threads(threads)
    p = Predictor.from_checkpoint(checkpoint, device="cpu", mode=mode)

    def one(s: Sample) -> float:
        t0 = time.perf_counter()
        rgb = np.asarray(Image.open(io.BytesIO(s.data)).convert("RGB"))
        p.predict(rgb, list(s.labels), crf=crf, outputs={"mask", "cams"})
        return time.perf_counter() - t0

    for s in samples[:2]:  # warm-up, as the service runs get
        one(s)
    t0 = time.perf_counter()
    lat = [one(s) for s in samples]
    return summarise(lat, time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to its process group (the pool children too), SIGKILL after ``timeout``."""
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.popen.wait(wait)
                os.killpg(self.popen.pid, signal.SIGKILL)  # children left behind, if any
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                pass
            return


def start(name: str, args: list[str], env: dict[str, str], log_dir: Path) -> Proc:
    log = log_dir / f"{name}.log"
    with open(log, "wb") as fh:
        popen = subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    return Proc(name, popen, log)


def wait_for(check: Callable[[], bool], timeout: float, what: str, procs: list[Proc]) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited while waiting for {what}:\n{p.tail()}")
        if check():
            return
        time.sleep(0.25)
    logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}\n{logs}")


@dataclass
class Deployment:
    """One configuration's processes (API + workers) and what it made in Redis."""

    kind: str  # "embedded" | "broker"
    workers: int
    checkpoint: Path
    tmp: Path
    redis_url: str
    threads: int
    mode: str
    url: str = ""
    procs: list[Proc] = field(default_factory=list)
    queue: str = field(default_factory=lambda: f"hsc-bench-{secrets.token_hex(4)}")
    worker_names: list[str] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HSC_")}
        env |= {
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": str(self.threads),
            "MKL_NUM_THREADS": str(self.threads),
            "HSC_TORCH_THREADS": str(self.threads),
            "HSC_LOG_LEVEL": "warning",
            "HSC_CHECKPOINTS": str(self.checkpoint),
            "HSC_RESULTS_DIR": str(self.tmp / "results"),
            "HSC_MODE": self.mode,
            "HSC_DEVICE": "cpu",
            "HSC_QUEUE": self.queue,
            "HSC_EMBEDDED_WORKERS": str(self.workers),
        }
        if self.kind == "broker":
            env["HSC_REDIS_URL"] = self.redis_url
        return env

    def start(self) -> None:
        hsc = [sys.executable, "-m", "hsc.core.cli"]
        env = self.env()
        if self.kind == "broker":
            for i in range(self.workers):
                name = f"bench{i}-{self.queue}@{socket.gethostname()}"
                self.worker_names.append(name)
                self.procs.append(start(f"worker{i}", [*hsc, "worker", "--hostname", name], env, self.tmp))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.procs.append(
            start("api", [*hsc, "serve", "--host", "127.0.0.1", "--port", str(port)], env, self.tmp)
        )
        wait_for(self._ready, 300, f"{self.kind}-{self.workers} to be ready", self.procs)

    def _ready(self) -> bool:
        try:
            if httpx.get(self.url + "/readyz", timeout=5).status_code != 200:
                return False
        except httpx.HTTPError:
            return False
        if self.kind == "broker":  # every worker announced with its model, not only the first
            import redis

            from hsc.core.queue import worker_key

            r = redis.Redis.from_url(self.redis_url)
            try:
                return all(r.exists(worker_key(n)) for n in self.worker_names)
            finally:
                r.close()
        return True

    def stop(self) -> None:
        """Stop every process (the API first, then its workers) and delete what the run made in
        Redis, even when one step is interrupted; the first interruption is raised at the end."""
        pending: BaseException | None = None
        for p in reversed(self.procs):
            try:
                p.stop()
            except BaseException as e:  # e.g. SystemExit from SIGTERM: stop the others anyway
                pending = pending or e
        try:
            self._delete_keys()
        except BaseException as e:
            pending = pending or e
        if pending is not None:
            raise pending

    def _delete_keys(self) -> None:
        if self.kind == "broker":
            import redis

            from hsc.core.queue import worker_key

            r = redis.Redis.from_url(self.redis_url)
            try:  # what this run made: its queue (and its priority lists), Kombu's bindings of it,
                # heartbeats a killed worker left; the queue name is unique to this run
                mine = [*r.scan_iter(match=f"*{self.queue}*"), *(worker_key(n) for n in self.worker_names)]
                r.delete(*mine)
            finally:
                r.close()


# --------------------------------------------------------------------------------------------------
# the load


@dataclass
class Run:
    """What one load run measured: latencies of the answered requests (s), the wall time (s), the
    server-side timings of each answer, and the refused requests by ``"<status> <code>"``."""

    latencies: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    timings: list[dict[str, float]] = field(default_factory=list)
    outside_s: list[float] = field(default_factory=list)  # latency minus the worker's own total
    errors: dict[str, int] = field(default_factory=dict)
    first_error: str = ""


async def load(
    url: str, samples: list[Sample], *, requests: int, concurrency: int, model: str, crf: bool
) -> Run:
    """``requests`` uploads by ``concurrency`` tasks. A problem+json answer is counted by its status and
    code (a load test reports refusals, it does not stop at the first); a 200 without a mask is a bug."""
    todo = list(range(requests))
    run = Run()

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=300) as c:
            while todo:
                s = samples[todo.pop() % len(samples)]
                t0 = time.perf_counter()
                r = await c.post(
                    "/pseudo-label",
                    files={"image": (f"{s.name}.jpg", s.data, "image/jpeg")},
                    data={"labels": ",".join(s.labels), "model": model, "crf": str(crf).lower()},
                )
                dt = time.perf_counter() - t0
                if r.status_code != 200:
                    try:
                        code = str(r.json().get("code"))
                    except ValueError:
                        code = "?"
                    key = f"{r.status_code} {code}"
                    run.errors[key] = run.errors.get(key, 0) + 1
                    run.first_error = run.first_error or f"{key} after {dt:.1f} s: {r.text[:300]}"
                    continue
                body = r.json()
                if body["mask"]["encoding"] != "png-palette" or not body["mask"]["data"]:
                    raise RuntimeError(f"no mask in the answer: {str(body)[:300]}")
                timings = body.get("timings_ms") or {}
                run.latencies.append(dt)
                run.timings.append(timings)
                if "total" in timings:
                    run.outside_s.append(dt - timings["total"] / 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    run.wall_s = time.perf_counter() - t0
    return run


def mean_timings(timings: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for t in timings for k in t})
    return {k: statistics.fmean(t.get(k, 0.0) for t in timings) for k in keys}


def run_config(
    name: str, args: argparse.Namespace, samples: list[Sample], tmp: Path, model: str
) -> list[dict[str, Any]]:
    kind, n = name.split("-")
    workers = int(n)
    per_worker = max(1, (os.cpu_count() or 1) // workers)
    threads = args.threads or per_worker
    d = Deployment(kind, workers, args.checkpoint, tmp / name, args.redis_url, threads, args.mode)
    d.tmp.mkdir(parents=True)
    rows = []
    t_start = time.perf_counter()
    try:
        d.start()
        startup = time.perf_counter() - t_start
        # warm-up: every worker loads its model and runs a few images
        warm = asyncio.run(
            load(d.url, samples, requests=3 * workers, concurrency=workers, model=model, crf=args.crf)
        )
        if warm.errors:
            print(f"  ({name} warm-up refusals: {warm.errors}; first: {warm.first_error})", flush=True)
        for c in args.concurrency:
            run = asyncio.run(
                load(d.url, samples, requests=args.requests, concurrency=c, model=model, crf=args.crf)
            )
            row = {"config": name, "workers": workers, "threads": threads, "concurrency": c}
            row |= summarise(run.latencies, run.wall_s)
            outside = 1000 * statistics.median(run.outside_s) if run.outside_s else float("nan")
            row |= {"outside_worker_p50_ms": outside, "errors": run.errors, "startup_s": startup}
            row |= {"server_ms": mean_timings(run.timings)}
            rows.append(row)
            print(fmt_row(row), flush=True)
            if run.errors:
                print(f"  (first refusal: {run.first_error})", flush=True)
    except BaseException:
        for p in d.procs:  # the logs go with the temporary folder: show them now
            print(f"--- {name} {p.name} log (tail)\n{p.tail()}", file=sys.stderr)
        raise
    finally:
        d.stop()
    return rows


# --------------------------------------------------------------------------------------------------
# report


def fmt_row(r: dict[str, Any]) -> str:
    errors = ", ".join(f"{n} x {k}" for k, n in r.get("errors", {}).items()) or "-"
    return (
        f"| {r['config']} | {r['workers']} | {r['threads']} | {r.get('concurrency', '-')} | {r['n']} | "
        f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['max_ms']:.0f} | {r['images_per_s']:.2f} | "
        f"{r.get('outside_worker_p50_ms', float('nan')):.0f} | {errors} |"
    )


HEADER = (
    "| config | workers | threads | concurrency | answered | p50 ms | p95 ms | max ms | images/s "
    "| outside worker p50 ms | refused |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def overhead(direct: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """The service against the direct call: end to end (p50 at concurrency 1 with 1 worker), and the
    part of each request spent outside the worker's own decode + predict + encode (any run)."""
    lines = []
    for r in rows:
        if r["concurrency"] != 1:
            continue
        server = {k: round(v, 1) for k, v in r["server_ms"].items()}
        line = f"{r['config']} at concurrency 1: outside the worker {r['outside_worker_p50_ms']:.0f} ms (p50)"
        if r["workers"] == 1:
            extra, ratio = r["p50_ms"] - direct["p50_ms"], r["p50_ms"] / direct["p50_ms"]
            line += (
                f"; end to end p50 {r['p50_ms']:.0f} ms vs direct {direct['p50_ms']:.0f} ms "
                f"({extra:+.0f} ms, x{ratio:.2f}), {r['images_per_s']:.2f} vs "
                f"{direct['images_per_s']:.2f} images/s"
            )
        lines.append(f"{line}; worker timings (mean ms): {json.dumps(server)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--checkpoint", type=Path, default=DEMO_CHECKPOINT, help="default: the shipped demo checkpoint"
    )
    p.add_argument(
        "--requests", type=int, default=32, help="measured requests per run (default: %(default)s)"
    )
    p.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 4], help="client tasks, one run each (default: 1 4)"
    )
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--images", type=int, default=16, help="distinct images, cycled (default: %(default)s)")
    p.add_argument("--size", default="192x144", help="image size WxH (default: %(default)s)")
    p.add_argument("--no-crf", dest="crf", action="store_false", help="requests with crf=false")
    p.add_argument("--mode", choices=("exact", "fast"), default="exact")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per model process (default: CPUs // workers; the direct run: CPUs)",
    )
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/15", help="broker of the broker runs")
    p.add_argument("--json", type=Path, help="write every figure here")
    args = p.parse_args(argv)

    # SIGTERM (and SIGINT, which a background job ignores by default) end the run through the
    # `finally` blocks, so the servers and workers it started are stopped
    def terminate(*_: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the clean-up must not be interrupted
        sys.exit(143)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if not args.checkpoint.is_file():
        p.error(f"no checkpoint at {args.checkpoint}")
    w, h = (int(v) for v in args.size.lower().split("x"))
    model = args.checkpoint.stem

    print(
        f"# bench_service: {args.checkpoint.name}, {args.images} images {w}x{h}, {args.requests} requests "
        f"per run, crf={args.crf}, mode={args.mode}, {os.cpu_count()} CPUs; load average {load_average()}"
    )
    with tempfile.TemporaryDirectory(prefix="hsc-bench-service-") as tmp_name:
        tmp = Path(tmp_name)
        samples = make_samples(tmp / "data", args.images, (w, h), seed=1)
        print(HEADER, flush=True)
        threads = args.threads or os.cpu_count() or 1
        direct_samples = [samples[i % len(samples)] for i in range(args.requests)]
        direct = run_direct(args.checkpoint, direct_samples, threads=threads, crf=args.crf, mode=args.mode)
        direct |= {"config": "direct (Predictor)", "workers": 1, "threads": threads, "concurrency": "-"}
        print(fmt_row(direct), flush=True)
        rows: list[dict[str, Any]] = []
        for name in args.configs:
            rows += run_config(name, args, samples, tmp, model)
    print()
    for line in overhead(direct, rows):
        print(line)
    print(f"load average after: {load_average()}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "runs": rows, "direct": direct}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
