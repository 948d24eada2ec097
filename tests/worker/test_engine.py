"""The engine in-process (worker/engine.py): model cards, one image end to end against the predictor,
every item error, and job chunks over the file job store: the results layout, a bad image failing
alone, re-delivery and crash recovery without recomputing, cancellation, the CRF pipeline and its
fallback."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from workerlib import CLASSES, create_job, encode, rgb, write_images

from hsc.core.cam_files import load_cams
from hsc.core.encoders import mask_from_base64_png
from hsc.core.jobs import FileJobStore, job_dir
from hsc.core.settings import Settings
from hsc.model.predictor import Predictor
from hsc.worker import engine as engine_module
from hsc.worker.engine import Engine, ItemError, get_engine, heatmap_file_name


def request(**kw):
    req = {
        "request_id": "req_test",
        "model": None,
        "labels": [0, 2],
        "labels_requested": ["road", "tree"],
        "crf": False,
        "bg_threshold": None,
        "outputs": ["mask"],
    }
    req.update(kw)
    return req


def item_error(engine: Engine, req: dict, data: bytes) -> ItemError:
    with pytest.raises(ItemError) as e:
        engine.pseudo_label(req, data)
    return e.value


# ----------------------------------------------------------------------------- cards and one image


def test_cards(engine, ckpt):
    (card,) = engine.cards()
    assert card == {
        "id": ckpt.id,
        "sha256": ckpt.sha256,
        "classes": ["background", *CLASSES],
        "bg_threshold": 0.3,
        "network_type": "hsc_eps_seam",
        "backbone": "resnet38d",
        "mode": "exact",
        "compiled": False,
        "winograd": False,
        "device": "cpu",
        "path": str(ckpt.path.resolve()),
    }
    card["classes"].append("x")  # a copy
    assert len(engine.cards()[0]["classes"]) == 4


@pytest.mark.parametrize("crf", [False, True])
def test_one_image_equals_the_predictor(engine, ckpt, crf):
    img = rgb()
    res = engine.pseudo_label(
        request(crf=crf, outputs="cams,coco_rle,cvat,labelstudio,heatmaps"), encode(img)
    )
    ref = Predictor.from_checkpoint(ckpt.path, device="cpu").predict(
        img, [0, 2], crf=crf, outputs={"mask", "cams"}
    )
    json.dumps(res)
    assert res["request_id"] == "req_test"
    assert res["model"] == {"id": ckpt.id, "sha256": ckpt.sha256, "classes": ["background", *CLASSES]}
    assert res["image"] == {"width": 56, "height": 40, "format": "PNG", "exif_orientation_applied": 1}
    assert res["labels"] == {"requested": ["road", "tree"], "used": [1, 3], "source": "given"}
    assert np.array_equal(mask_from_base64_png(res["mask"]["data"]), ref.mask)
    assert res["settings"]["crf"] is crf and res["settings"]["checkpoint_sha256"] == ckpt.sha256
    assert res["settings"]["bg_threshold"] == 0.3
    assert [c["name"] for c in res["classes"]] == ["road", "tree"]
    assert set(res) >= {"cams", "coco_rle", "cvat", "labelstudio", "heatmaps", "quality", "warnings"}
    assert set(res["heatmaps"]) == {"road", "tree"}
    assert set(res["timings_ms"]) == {"decode", "network", "crf", "postprocess", "encode", "total"}
    assert (res["timings_ms"]["crf"] > 0) is crf
    assert res["timings_ms"]["total"] >= res["timings_ms"]["network"] > 0


def test_exif_rotated_jpeg_gives_an_upright_mask(engine):
    img = rgb(56, 40)
    res = engine.pseudo_label(request(enqueued_at=time.time() - 0.5), encode(img, "JPEG", orientation=6))
    assert res["image"] == {"width": 40, "height": 56, "format": "JPEG", "exif_orientation_applied": 6}
    assert mask_from_base64_png(res["mask"]["data"]).shape == (56, 40)
    assert res["timings_ms"]["queue"] >= 400  # enqueued half a second before


def test_labels_by_name_model_by_id_and_version(engine, ckpt):
    data = encode(rgb())
    a = engine.pseudo_label(request(model=ckpt.id, labels=["Tree", "road"]), data)
    b = engine.pseudo_label(request(model=f"{ckpt.id}@{ckpt.sha256[:8]}"), data)
    assert a["labels"]["used"] == b["labels"]["used"] == [1, 3]
    assert a["mask"]["data"] == b["mask"]["data"]


def test_item_errors(engine, ckpt):
    data = encode(rgb())
    cases = [
        (request(labels=[]), data, "no_labels", 422),
        (request(labels=[3]), data, "unknown_class", 422),
        (request(labels=["dog"]), data, "unknown_class", 422),
        (request(model="nope"), data, "not_found", 404),
        (request(model=f"{ckpt.id}@ffffffff"), data, "not_found", 404),
        (request(outputs="mask,bogus"), data, "invalid_option", 422),
        (request(bg_threshold=math.nan), data, "invalid_option", 422),
        (request(bg_threshold="0.3"), data, "invalid_option", 422),
        (request(), data[: len(data) // 2], "corrupt_image", 422),
        (request(), b"just text", "unsupported_media", 415),
        (request(), encode(rgb(1200, 900)), "too_large", 413),  # over max_pixels = 1e6
    ]
    for req, body, code, status in cases:
        e = item_error(engine, req, body)
        assert (e.code, e.status) == (code, status), (req, e)
        assert e.as_dict() == {"status": status, "code": code, "detail": e.detail}
    assert "valid names: road, car, tree" in item_error(engine, request(labels=["dog"]), data).detail
    assert ckpt.id in item_error(engine, request(model="nope"), data).detail


def test_get_engine_is_cached_per_settings(engine_settings):
    a = get_engine(engine_settings)
    assert get_engine(engine_settings) is a
    other = Settings(**{**engine_settings.model_dump(), "mode": "fast", "winograd": "on"})
    b = get_engine(other)
    assert b is not a and b.cards()[0]["mode"] == "fast"
    # winograd "on" at width 0.125: no 3x3 layer is wide enough, so none is replaced
    (pb,) = b.predictors.values()
    assert b.cards()[0]["winograd"] is False and pb.winograd_layers == ()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_setting_compiles_at_load(engine_settings):
    e = Engine(Settings(**{**engine_settings.model_dump(), "compile": True}))
    (p,) = e.predictors.values()
    assert e.cards()[0]["compiled"] and p.compiled


def test_unknown_default_model_and_duplicate_ids_are_refused(engine_settings, ckpt):
    with pytest.raises(ValueError, match="default model 'x' is not loaded"):
        Engine(Settings(**{**engine_settings.model_dump(), "default_model": "x"}))
    with pytest.raises(ValueError, match="two checkpoints with the model id"):
        Engine(Settings(**{**engine_settings.model_dump(), "checkpoints": [str(ckpt.path)] * 2}))


def test_heatmap_file_names():
    assert heatmap_file_name("tree") == "tree.png"
    assert heatmap_file_name("potted plant/x") == "potted_plant_x.png"
    assert heatmap_file_name(".hidden") == "_hidden.png"


# ----------------------------------------------------------------------------- job chunks


def store_and_job(tmp_path: Path, n: int, model: str, **kw):
    store = FileJobStore(tmp_path / "state")
    images = write_images(tmp_path / "images", n, corrupt=kw.pop("corrupt", ()))
    job_id, items = create_job(store, images, model, **kw)
    return store, job_id, items


def test_chunk_writes_the_results_layout_and_a_bad_image_fails_alone(engine, ckpt, tmp_path, results_dir):
    labels = [(0, 2), (1,), (0, 2), (), (2, 1)]
    store, job_id, items = store_and_job(
        tmp_path,
        5,
        ckpt.id,
        corrupt=[2],
        labels=labels,
        options={"crf": False, "outputs": ["heatmaps", "coco_rle"]},
    )
    Path(items[4].image).unlink()  # a file that went missing
    before = engine.images_processed
    out = engine.run_chunk(store, results_dir, job_id, 0, 5)
    assert out == {"job_id": job_id, "start": 0, "stop": 5, "done": 2, "failed": 3, "already_final": 0,
                   "recovered": 0, "cancelled": False, "status": "partially_succeeded"}  # fmt: skip
    assert engine.images_processed == before + 2
    job = store.get_job(job_id)
    assert job["status"] == "partially_succeeded" and job["started_at"] and job["finished_at"]
    assert job["progress"] == {"total": 5, "done": 2, "failed": 3, "skipped": 0, "percent": 100.0}
    codes = {e["item"]: e["code"] for e in job["errors_sample"]}
    assert codes == {"item-2": "corrupt_image", "item-3": "no_labels", "item-4": "not_found"}
    jd = job_dir(results_dir, job_id)
    for it in items[:2]:
        mask = np.array(Image.open(jd / "masks" / f"{it.id}.png"))
        assert Image.open(jd / "masks" / f"{it.id}.png").mode == "P" and mask.shape == (40, 56)
        cams, classes, names = load_cams(jd / "cams" / f"{it.id}.npz")
        assert classes == it.labels and names == tuple(CLASSES[c] for c in it.labels)
        assert cams.shape == (len(it.labels), 40, 56)
        res = json.loads((jd / "items" / f"{it.id}.json").read_text())
        assert res["mask"] == {"encoding": "png-palette", "palette": "voc", "ignore_index": 255,
                               "path": f"masks/{it.id}.png"}  # fmt: skip
        assert res["cams"]["path"] == f"cams/{it.id}.npz"
        assert res["item"] == {"index": it.index, "id": it.id, "image": it.image}
        assert res["labels"]["used"] == [c + 1 for c in it.labels]
        assert set(res["coco_rle"]) <= {CLASSES[c] for c in it.labels}
        for name in names:
            assert res["heatmaps"][name]["path"] == f"heatmaps/{it.id}/{name}.png"
            assert np.array(Image.open(jd / res["heatmaps"][name]["path"])).shape == (40, 56, 3)
        assert "data" not in res["mask"] and all("png" not in h for h in res["heatmaps"].values())
        assert res["request_id"] == f"{job_id}/{it.id}"
    assert not (jd / "items" / "item-2.json").exists() and not (jd / "masks" / "item-2.png").exists()
    assert not list(jd.rglob("*.tmp"))  # no temporary files left behind
    states = {s["id"]: s["state"] for s in store.item_states(job_id)}
    assert states == {"item-0": "done", "item-1": "done", "item-2": "failed", "item-3": "failed",
                      "item-4": "failed"}  # fmt: skip


def test_chunk_mask_equals_the_single_image_answer(engine, ckpt, tmp_path, results_dir):
    store, job_id, items = store_and_job(tmp_path, 1, ckpt.id, options={"crf": True, "bg_threshold": 0.5})
    engine.run_chunk(store, results_dir, job_id, 0, 1)
    jd = job_dir(results_dir, job_id)
    single = engine.pseudo_label(request(crf=True, bg_threshold=0.5), Path(items[0].image).read_bytes())
    assert np.array_equal(
        np.array(Image.open(jd / "masks/item-0.png")), mask_from_base64_png(single["mask"]["data"])
    )
    res = json.loads((jd / "items/item-0.json").read_text())
    assert res["settings"]["bg_threshold"] == 0.5 and res["settings"]["crf"] is True


def test_redelivered_chunk_recomputes_nothing(engine, ckpt, tmp_path, results_dir):
    store, job_id, _ = store_and_job(tmp_path, 3, ckpt.id, corrupt=[1])
    engine.run_chunk(store, results_dir, job_id, 0, 3)
    mtimes = {p: p.stat().st_mtime_ns for p in job_dir(results_dir, job_id).rglob("*") if p.is_file()}
    before = engine.images_processed
    out = engine.run_chunk(store, results_dir, job_id, 0, 3)
    assert (out["done"], out["failed"], out["already_final"], out["status"]) == (
        0,
        0,
        3,
        "partially_succeeded",
    )
    assert engine.images_processed == before
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_items_written_before_a_crash_are_marked_done_without_work(engine, ckpt, tmp_path, results_dir):
    """The item files exist but the store never heard of them (the worker died between the rename of
    items/<id>.json and the mark): a new delivery marks them done and computes only the rest."""
    images = write_images(tmp_path / "images", 4)
    first = FileJobStore(tmp_path / "first")
    job_id, _ = create_job(first, images, ckpt.id)
    engine.run_chunk(first, results_dir, job_id, 0, 2)  # items 0 and 1 written
    after_crash = FileJobStore(tmp_path / "second")  # the same job, no item marked yet
    create_job(after_crash, images, ckpt.id, job_id=job_id)
    before = engine.images_processed
    out = engine.run_chunk(after_crash, results_dir, job_id, 0, 4)
    assert (out["recovered"], out["done"], out["status"]) == (2, 2, "succeeded")
    assert engine.images_processed == before + 2
    assert after_crash.get_job(job_id)["progress"]["done"] == 4


def test_chunks_of_one_job_finish_it_once(engine, ckpt, tmp_path, results_dir):
    store, job_id, _ = store_and_job(tmp_path, 4, ckpt.id)
    a = engine.run_chunk(store, results_dir, job_id, 0, 2)
    assert a["status"] is None and store.get_job(job_id)["status"] == "running"
    b = engine.run_chunk(store, results_dir, job_id, 2, 10)  # clipped to the job
    assert (b["done"], b["status"]) == (2, "succeeded")


class CancelAfter(FileJobStore):
    """A store whose cancel flag goes up (as DELETE /jobs/{id} does) after ``n`` checks."""

    def __init__(self, root: Path, n: int) -> None:
        super().__init__(root)
        self.n = n

    def cancel_requested(self, job_id: str) -> bool:
        self.n -= 1
        if self.n < 0 and not super().cancel_requested(job_id):
            self.update(job_id, status="cancelling")
            self.request_cancel(job_id)
        return super().cancel_requested(job_id)


def test_cancel_between_images(engine, ckpt, tmp_path, results_dir):
    store = CancelAfter(tmp_path / "state", n=2)  # one check at the start, one before the first image
    job_id, _ = create_job(store, write_images(tmp_path / "images", 4), ckpt.id)
    out = engine.run_chunk(store, results_dir, job_id, 0, 4)
    assert (out["done"], out["cancelled"], out["status"]) == (1, True, "cancelled")
    job = store.get_job(job_id)
    assert job["status"] == "cancelled" and job["finished_at"] and job["progress"]["done"] == 1
    assert len(store.pending_indices(job_id)) == 3
    # a chunk delivered after the cancel does nothing
    out = engine.run_chunk(store, results_dir, job_id, 0, 4)
    assert (out["done"], out["cancelled"], out["status"]) == (0, True, "cancelled")


def test_unknown_job_and_unknown_model(engine, tmp_path, results_dir):
    store = FileJobStore(tmp_path / "state")
    assert engine.run_chunk(store, results_dir, "job_missing", 0, 4)["status"] is None
    job_id, _ = create_job(store, write_images(tmp_path / "images", 2), "not-loaded")
    out = engine.run_chunk(store, results_dir, job_id, 0, 2)
    assert (out["failed"], out["status"]) == (2, "failed")
    assert {e["code"] for e in store.get_job(job_id)["errors_sample"]} == {"not_found"}


def test_crf_pipeline_equals_one_by_one(engine_settings, ckpt, tmp_path):
    """With ``crf_workers`` the CRF runs in a process pool beside the network: same masks."""
    piped = Engine(Settings(**{**engine_settings.model_dump(), "crf_workers": 1}))
    images = write_images(tmp_path / "images", 3, corrupt=[1])
    outs = {}
    for name, eng in (("seq", get_engine(engine_settings)), ("piped", piped)):
        store = FileJobStore(tmp_path / f"state-{name}")
        job_id, _ = create_job(store, images, ckpt.id, options={"crf": True})
        out = eng.run_chunk(store, tmp_path / name, job_id, 0, 3)
        assert (out["done"], out["failed"], out["status"]) == (2, 1, "partially_succeeded")
        outs[name] = job_dir(tmp_path / name, job_id)
    for i in (0, 2):
        a, b = (np.array(Image.open(outs[k] / "masks" / f"item-{i}.png")) for k in ("seq", "piped"))
        assert np.array_equal(a, b)


@pytest.mark.parametrize("crf", [False, True])
def test_batched_images_equal_one_by_one(engine_settings, ckpt, tmp_path, crf):
    """``batch_images`` (HSC_BATCH_IMAGES; 4 by default on CUDA) runs same-size images of a chunk
    through the network together: the same masks and CAMs, and a corrupt image still fails alone."""
    batched = Engine(Settings(**{**engine_settings.model_dump(), "batch_images": 3}))
    assert batched.predictors[ckpt.id].batch_images == 3
    assert get_engine(engine_settings).predictors[ckpt.id].batch_images == 1  # 0 = auto: 1 on the CPU
    images = write_images(tmp_path / "images", 5, corrupt=[3])
    outs = {}
    for name, eng in (("seq", get_engine(engine_settings)), ("batched", batched)):
        store = FileJobStore(tmp_path / f"state-{name}")
        job_id, _ = create_job(store, images, ckpt.id, options={"crf": crf, "outputs": ["cams"]})
        out = eng.run_chunk(store, tmp_path / name, job_id, 0, 5)
        assert (out["done"], out["failed"], out["status"]) == (4, 1, "partially_succeeded")
        assert {e["item"] for e in store.get_job(job_id)["errors_sample"]} == {"item-3"}
        outs[name] = job_dir(tmp_path / name, job_id)
    for i in (0, 1, 2, 4):
        a, b = (np.array(Image.open(outs[k] / "masks" / f"item-{i}.png")) for k in ("seq", "batched"))
        assert float((a == b).mean()) >= 0.999
        ca, cb = (np.load(outs[k] / "cams" / f"item-{i}.npz")["cams"] for k in ("seq", "batched"))
        np.testing.assert_allclose(ca, cb, rtol=0, atol=1e-5)


def test_a_broken_pipeline_falls_back_to_one_by_one(engine_settings, ckpt, tmp_path, monkeypatch):
    """An error inside the CRF pipeline (say, a CRF process that died) is nobody's item: the images in
    flight and the rest run one by one, and every one is done."""
    eng = Engine(Settings(**{**engine_settings.model_dump(), "crf_workers": 1}))
    predictor = eng.predictors[ckpt.id]

    def broken(items, **kw):
        for n, (image, labels) in enumerate(items):
            if n == 1:
                raise RuntimeError("A process in the process pool was terminated abruptly")
            yield predictor.predict(image, labels, crf=kw["crf"], outputs=kw["outputs"])

    monkeypatch.setattr(predictor, "predict_many", broken)
    store = FileJobStore(tmp_path / "state")
    job_id, _ = create_job(store, write_images(tmp_path / "images", 4), ckpt.id, options={"crf": True})
    out = eng.run_chunk(store, tmp_path / "results", job_id, 0, 4)
    assert (out["done"], out["failed"], out["status"]) == (4, 0, "succeeded")


def test_an_unexpected_error_fails_only_its_item(engine_settings, ckpt, tmp_path, monkeypatch):
    eng = Engine(Settings(**engine_settings.model_dump()))
    predictor = eng.predictors[ckpt.id]
    real = predictor.predict
    calls = []

    def flaky(image, labels, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("something inside torch")
        return real(image, labels, **kw)

    monkeypatch.setattr(predictor, "predict", flaky)
    store = FileJobStore(tmp_path / "state")
    job_id, _ = create_job(store, write_images(tmp_path / "images", 3), ckpt.id)
    out = eng.run_chunk(store, tmp_path / "results", job_id, 0, 3)
    assert (out["done"], out["failed"]) == (2, 1)
    (err,) = store.get_job(job_id)["errors_sample"]
    assert err == {"item": "item-1", "code": "internal", "detail": "RuntimeError: something inside torch"}


def test_passthrough_errors_leave_the_item_pending(engine_settings, ckpt, tmp_path, monkeypatch):
    class TimeLimit(Exception):
        pass

    eng = Engine(Settings(**engine_settings.model_dump()))

    def slow(*a, **kw):
        raise TimeLimit()

    monkeypatch.setattr(eng.predictors[ckpt.id], "predict", slow)
    store = FileJobStore(tmp_path / "state")
    job_id, _ = create_job(store, write_images(tmp_path / "images", 2), ckpt.id)
    with pytest.raises(TimeLimit):
        eng.run_chunk(store, tmp_path / "results", job_id, 0, 2, passthrough=(TimeLimit,))
    assert store.pending_indices(job_id) == [0, 1]


def test_module_keeps_no_per_image_state(engine):
    """What could grow with the number of images: nothing but a counter on the engine."""
    assert set(vars(engine)) == {"settings", "predictors", "_cards", "default_model", "images_processed",
                                 "_count_lock"}  # fmt: skip
    assert engine_module._engine is None or isinstance(engine_module._engine, Engine)
