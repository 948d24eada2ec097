"""Start a worker: :func:`run_worker` runs a Celery worker in this process (what ``hsc worker`` does);
``python -m hsc.worker.main [--hostname NAME]`` does the same with the ``HSC_*`` settings.

The worker reads the queue ``settings.queue`` with ``settings.worker_pool`` (solo by default: one
process per GPU) and ``settings.worker_concurrency``; under solo and threads the models load before
the worker takes its first task, so a broken checkpoint stops it at once with exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Sequence

from hsc.core.settings import Settings, get_settings

from .app import make_celery
from .engine import get_engine

__all__ = ["main", "run_worker"]

log = logging.getLogger(__name__)


def run_worker(settings: Settings, *, hostname: str | None = None) -> int:
    """Run a Celery worker for ``settings`` until it is shut down (SIGTERM / SIGINT: warm shutdown,
    the task in progress finishes; a second signal stops at once). Returns the exit code."""
    if not settings.redis_url:
        sys.stderr.write("hsc worker: no broker; set HSC_REDIS_URL (e.g. redis://localhost:6379/0)\n")
        return 2
    app = make_celery(settings)
    if settings.worker_pool != "prefork":
        try:
            get_engine(settings)
        except Exception as e:
            sys.stderr.write(f"hsc worker: cannot load the models: {type(e).__name__}: {e}\n")
            return 1
    worker = app.Worker(
        hostname=hostname or f"hsc@{socket.gethostname()}",
        queues=[settings.queue],
        pool=settings.worker_pool,
        concurrency=settings.worker_concurrency,
        loglevel=settings.log_level.upper(),
        without_gossip=True,
        without_mingle=True,
        optimization="fair",
    )
    worker.start()
    return int(worker.exitcode or 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hsc.worker.main", description=__doc__)
    parser.add_argument("--hostname", default=None, help="worker name (default: hsc@<host name>)")
    args = parser.parse_args(argv)
    return run_worker(get_settings(), hostname=args.hostname)


if __name__ == "__main__":
    sys.exit(main())
