"""The API's wait for a worker's answer in broker mode, against the real Redis: an answer that takes
longer than redis-py's default socket timeout (5 s) still arrives, and no answer gives 504 timeout."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
from svclib import REDIS_URL

from hsc.core.queue import blob_key, reply_key
from hsc.core.settings import Settings
from hsc.service.errors import Problem
from hsc.service.runner import BrokerRunner


def _runner(tmp_path: Path) -> BrokerRunner:
    queue = f"hsc-waittest-{secrets.token_hex(4)}"
    return BrokerRunner(Settings(redis_url=REDIS_URL, queue=queue, results_dir=str(tmp_path)))


def test_an_answer_slower_than_the_socket_timeout_arrives(tmp_path: Path) -> None:
    runner = _runner(tmp_path)
    rid = f"wait-{secrets.token_hex(6)}"
    answer = {"request_id": rid, "mask": "..."}
    r = redis.Redis.from_url(REDIS_URL)

    def late_worker() -> None:
        # Plays the worker's part: reads the upload, answers 7 s later (past redis-py's 5 s default).
        threading.Event().wait(7.0)
        assert r.get(blob_key(rid)) is not None
        r.rpush(reply_key(rid), json.dumps(answer))

    async def main() -> dict[str, Any]:
        await runner.start()
        try:
            return await runner.pseudo_label({"request_id": rid}, b"image bytes", timeout=20)
        finally:
            await runner.close()

    t = threading.Thread(target=late_worker)
    t.start()
    try:
        got = asyncio.run(main())
    finally:
        t.join()
        r.delete(blob_key(rid), reply_key(rid), runner.settings.queue)
        r.close()
    assert got == answer


def test_no_answer_is_a_timeout_and_the_upload_is_removed(tmp_path: Path) -> None:
    runner = _runner(tmp_path)
    rid = f"wait-{secrets.token_hex(6)}"

    async def main() -> None:
        await runner.start()
        try:
            await runner.pseudo_label({"request_id": rid}, b"image bytes", timeout=1)
        finally:
            await runner.close()

    with pytest.raises(Problem) as err:
        asyncio.run(main())
    assert err.value.code == "timeout"
    r = redis.Redis.from_url(REDIS_URL)
    try:
        assert r.get(blob_key(rid)) is None
    finally:
        r.delete(runner.settings.queue)
        r.close()
