"""The embedded mode's worker functions (worker/embedded.py) in a real spawned process pool, as
``hsc serve`` runs them: the initializer loads the model, answers are plain dicts (errors too), job
chunks go through the file job store under ``results_dir/state``."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from workerlib import create_job, encode, rgb, write_images

from hsc.core.jobs import FileJobStore, job_dir
from hsc.core.settings import Settings
from hsc.worker import embedded


@pytest.fixture(scope="module")
def pool_settings(ckpt, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        checkpoints=[str(ckpt.path)],
        device="cpu",
        results_dir=tmp_path_factory.mktemp("embedded") / "results",
        crf_workers=0,
        embedded_workers=2,
    )


@pytest.fixture(scope="module")
def pool(pool_settings: Settings) -> Iterator[ProcessPoolExecutor]:
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=1, mp_context=ctx, initializer=embedded.init, initargs=(pool_settings.model_dump(),)
    ) as ex:
        yield ex


def test_cards_and_one_image(pool, ckpt):
    (card,) = pool.submit(embedded.cards).result(120)
    assert card["id"] == ckpt.id and card["sha256"] == ckpt.sha256 and card["device"] == "cpu"
    req = {"request_id": "r1", "model": ckpt.id, "labels": [1], "labels_requested": ["car"], "crf": True,
           "bg_threshold": None, "outputs": ["mask", "labelstudio"]}  # fmt: skip
    res = pool.submit(embedded.pseudo_label, req, encode(rgb(), "WEBP")).result(120)
    assert res["image"]["format"] == "WEBP" and res["labels"]["used"] == [2]
    assert res["labelstudio"]["model_version"] == f"{ckpt.id}@{ckpt.sha256[:12]}"


def test_errors_are_answers(pool):
    req = {"request_id": "r2", "model": None, "labels": [0], "crf": False, "outputs": ["mask"]}
    res = pool.submit(embedded.pseudo_label, req, b"not an image").result(120)
    assert res == {"error": {"status": 415, "code": "unsupported_media", "detail": res["error"]["detail"]}}
    res = pool.submit(embedded.pseudo_label, {**req, "labels": [7]}, encode(rgb())).result(120)
    assert res["error"]["code"] == "unknown_class"


def test_a_job_chunk_on_the_file_store(pool, pool_settings, ckpt, tmp_path):
    store = FileJobStore(embedded.state_dir(pool_settings))
    job_id, items = create_job(store, write_images(tmp_path / "images", 3, corrupt=[0]), ckpt.id)
    out = pool.submit(embedded.run_chunk, job_id, 0, 3).result(120)
    assert (out["done"], out["failed"], out["status"]) == (2, 1, "partially_succeeded")
    jd = job_dir(Path(pool_settings.results_dir), job_id)
    assert sorted(p.name for p in (jd / "items").iterdir()) == ["item-1.json", "item-2.json"]
    assert store.get_job(job_id)["errors_sample"][0]["code"] == "corrupt_image"


def test_functions_refuse_to_run_before_init():
    assert embedded._settings is None  # this (test) process never ran the initializer
    with pytest.raises(RuntimeError, match="init"):
        embedded.cards()
