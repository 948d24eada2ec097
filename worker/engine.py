"""What a worker process does, free of Celery: load the checkpoints once, answer one image, run a chunk
of a job. The Celery tasks (:mod:`.tasks`) and the embedded pool (:mod:`.embedded`) are thin doors to
:class:`Engine`.

One image (:meth:`Engine.pseudo_label`): decode (EXIF orientation applied), predict, and build the D3
result dict (:func:`hsc.core.results.build_result`); a problem with the image or the request is an
:class:`ItemError` (code, detail, HTTP status) that the caller turns into an error reply.

A chunk of a job (:meth:`Engine.run_chunk`) writes, per item, under ``job_dir(results_dir, job_id)``:
``masks/<id>.png``, ``cams/<id>.npz``, ``heatmaps/<id>/<class>.png`` (when asked) and, **last**,
``items/<id>.json`` (the result dict with file paths instead of base64 blobs). Each file goes through
a temporary name and a rename, so the json's existence means the item is complete: a chunk delivered
again after a crash marks such items done without computing them, and skips items already final.
A bad image fails that item (its code in the job's errors), never the chunk. The cancel flag is read
between images. With the CRF on and ``settings.crf_workers > 0``, the CRF of each image runs in a
process pool while the network works on the next image, and on a GPU up to ``batch_images`` images
of one size share the network's forwards (:meth:`Predictor.predict_many`).

Labels predicted by the classifier: a request (or a job's ``options``) with ``"labels": "auto"`` and
an optional ``"label_threshold"`` (default 0.5) lets :meth:`Predictor.predict` choose the classes
(probability >= threshold, else the top-1); the result's ``labels`` block then says ``"source":
"predicted"`` with the ``classifier_scores`` of every class. In a job, ``"labels": "auto"`` replaces
the items' own labels.

Nothing is kept between images (the predictor is the only state), so memory stays flat however many
images a process serves.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hsc.core.cam_files import atomic_write_bytes, save_cams
from hsc.core.encoders import IGNORE_INDEX, label_to_png
from hsc.core.images import ImageError, decode_image
from hsc.core.jobs import JobItem, JobStore, job_dir
from hsc.core.results import build_result, parse_outputs, rgb_png
from hsc.core.settings import WINOGRAD_CHOICES, Settings
from hsc.model.classes import BACKGROUND
from hsc.model.predictor import (
    AUTO_LABELS,
    DEFAULT_LABEL_THRESHOLD,
    Prediction,
    Predictor,
    check_label_threshold,
    is_auto_labels,
)

__all__ = ["Engine", "ItemError", "get_engine", "heatmap_file_name"]

log = logging.getLogger(__name__)

_STATUS = {
    "no_labels": 422,
    "unknown_class": 422,
    "invalid_option": 422,
    "corrupt_image": 422,
    "unsupported_media": 415,
    "too_large": 413,
    "not_found": 404,
    "unreadable": 422,
    "gpu_oom": 503,
    "internal": 500,
}


class ItemError(Exception):
    """Why one image could not be pseudo-labelled: a stable ``code``, a ``detail`` saying what to
    change, and the HTTP ``status`` the API answers with (default from the code)."""

    def __init__(self, code: str, detail: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.status = int(status if status is not None else _STATUS.get(code, 422))

    @classmethod
    def from_image_error(cls, e: ImageError) -> ItemError:
        return cls(e.code, e.detail, e.status)

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "code": self.code, "detail": self.detail}


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def heatmap_file_name(class_name: str) -> str:
    """``<class>.png`` with anything but ``[A-Za-z0-9._-]`` replaced by ``_`` (and no leading dot)."""
    safe = _UNSAFE.sub("_", class_name) or "_"
    return ("_" + safe[1:] if safe.startswith(".") else safe) + ".png"


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)


@dataclass
class _Options:
    """What decides the numbers of a request or a job."""

    model_id: str
    predictor: Predictor
    crf: bool
    bg_threshold: float | None
    outputs: set[str]
    auto_labels: bool = False
    label_threshold: float = DEFAULT_LABEL_THRESHOLD

    @property
    def predictor_outputs(self) -> set[str]:
        return {"mask", "cams"} | ({"heatmaps"} if "heatmaps" in self.outputs else set())


@dataclass
class _ChunkState:
    done: int = 0
    failed: int = 0
    already_final: int = 0
    recovered: int = 0
    cancelled: bool = False
    running_marked: bool = False


class Engine:
    """The checkpoints of ``settings.checkpoints``, each loaded once into a :class:`Predictor` (device
    ``settings.device``, mode ``settings.mode``) and kept; model id = the file's stem."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        loaded: dict[str, Predictor] = {}
        paths: dict[str, str] = {}
        for path in settings.checkpoints:
            model_id = Path(path).stem
            if model_id in loaded:
                raise ValueError(f"two checkpoints with the model id {model_id!r}: {paths[model_id]}, {path}")
            t0 = time.perf_counter()
            loaded[model_id] = Predictor.from_checkpoint(
                path,
                device=settings.device,
                mode=settings.mode,
                batch_images=settings.batch_images or None,
                winograd=WINOGRAD_CHOICES[settings.winograd],
                compile=settings.compile,
            )
            if settings.compile:  # compile now, not in the first request's time
                log.info("model %s compiled in %.1f s", model_id, loaded[model_id].warm_up())
            paths[model_id] = str(Path(path).resolve())
            log.info("loaded model %s from %s in %.1f s", model_id, path, time.perf_counter() - t0)
        if not loaded:
            raise ValueError("no checkpoints to serve (settings.checkpoints is empty)")
        self.predictors = loaded
        self._cards = {k: self._card(k, p, paths[k]) for k, p in loaded.items()}
        self.default_model = settings.default_model or next(iter(loaded))
        if self.default_model not in loaded:
            raise ValueError(f"default model {self.default_model!r} is not loaded ({', '.join(loaded)})")
        self.images_processed = 0
        self._count_lock = threading.Lock()

    @staticmethod
    def _card(model_id: str, p: Predictor, path: str) -> dict[str, Any]:
        return {
            "id": model_id,
            "sha256": p.checkpoint_sha256,
            "classes": [BACKGROUND, *p.class_names],
            "bg_threshold": float(p.info.bg_threshold),
            "network_type": p.info.network_type,
            "backbone": p.info.backbone,
            "mode": p.mode,
            "compiled": p.compiled,
            "winograd": p.winograd,
            "device": str(p.device),
            "path": path,
        }

    def cards(self) -> list[dict[str, Any]]:
        """The model card of every loaded checkpoint (JSON-able copies), default model first."""
        order = [self.default_model] + [k for k in self._cards if k != self.default_model]
        return [dict(self._cards[k], classes=list(self._cards[k]["classes"])) for k in order]

    def _count(self) -> None:
        with self._count_lock:
            self.images_processed += 1

    # ----------------------------------------------------------------------------------- options

    def _model(self, model: Any) -> tuple[str, Predictor]:
        """``None``/``""`` (default model), an id, ``id@<sha256 prefix>`` or a card dict."""
        if isinstance(model, Mapping):
            model = model.get("id")
        if model is None or model == "":
            return self.default_model, self.predictors[self.default_model]
        model_id, _, version = str(model).partition("@")
        if model_id in self.predictors:
            sha = self._cards[model_id]["sha256"] or ""
            if not version or sha.startswith(version.lower()):
                return model_id, self.predictors[model_id]
        loaded = ", ".join(f"{k}@{(c['sha256'] or '')[:12]}" for k, c in self._cards.items())
        raise ItemError("not_found", f"unknown model {model!r}; loaded: {loaded}")

    def _options(self, model: Any, options: Mapping[str, Any]) -> _Options:
        model_id, predictor = self._model(model)
        bg = options.get("bg_threshold")
        if bg is not None:
            if isinstance(bg, bool) or not isinstance(bg, (int, float)) or not math.isfinite(bg):
                raise ItemError("invalid_option", f"bg_threshold must be a finite number, got {bg!r}")
            bg = float(bg)
        try:
            outputs = parse_outputs(options.get("outputs"))
        except ValueError as e:
            raise ItemError("invalid_option", str(e)) from None
        auto = is_auto_labels(options.get("labels"))
        label_thr = DEFAULT_LABEL_THRESHOLD
        if auto and options.get("label_threshold") is not None:
            try:
                label_thr = check_label_threshold(options["label_threshold"])
            except ValueError as e:
                raise ItemError("invalid_option", str(e)) from None
        return _Options(model_id, predictor, bool(options.get("crf", True)), bg, outputs, auto, label_thr)

    @staticmethod
    def _channels(predictor: Predictor, labels: Sequence[Any]) -> tuple[int, ...]:
        """Channel indices (ascending); names are accepted too (matched ignoring case)."""
        if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
            raise ItemError("invalid_option", f"labels must be a list of channel indices, got {labels!r}")
        if not labels:
            raise ItemError(
                "no_labels", "no image-level labels: give at least one class present in the image"
            )
        k = predictor.num_classes
        bad = [
            c
            for c in labels
            if isinstance(c, (int, np.integer)) and not isinstance(c, bool) and not 0 <= c < k
        ]
        if bad:
            raise ItemError("unknown_class", f"class channel(s) {bad} outside 0..{k - 1}")
        try:
            return predictor.class_indices(list(labels))
        except (ValueError, TypeError) as e:
            raise ItemError("unknown_class", str(e)) from None

    # ------------------------------------------------------------------------------------ predict

    def _decode(self, data: bytes) -> tuple[np.ndarray, dict[str, Any]]:
        try:
            return decode_image(data, max_pixels=self.settings.max_pixels)
        except ImageError as e:
            raise ItemError.from_image_error(e) from None

    @staticmethod
    def _predict(opts: _Options, rgb: np.ndarray, channels: Sequence[int]) -> Prediction:
        """Predict with ``channels``, or with the classifier's labels when ``opts.auto_labels``."""
        kw: dict[str, Any] = dict(
            crf=opts.crf, bg_threshold=opts.bg_threshold, outputs=opts.predictor_outputs
        )
        labels: list[int] | str = list(channels)
        if opts.auto_labels:
            labels, kw["label_threshold"] = AUTO_LABELS, opts.label_threshold
        for attempt in (1, 2):
            try:
                return opts.predictor.predict(rgb, labels, **kw)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if attempt == 2:
                    raise ItemError(
                        "gpu_oom", f"out of GPU memory on a {rgb.shape[1]}x{rgb.shape[0]} image (tried twice)"
                    ) from None
                log.warning("CUDA out of memory on a %sx%s image; retrying once", rgb.shape[1], rgb.shape[0])
            except ValueError as e:
                raise ItemError("invalid_option", str(e)) from None
        raise AssertionError("unreachable")

    def _result(
        self,
        *,
        request_id: str,
        opts: _Options,
        pred: Prediction,
        info: Mapping[str, Any],
        labels_requested: Sequence[Any] | str,
        timings: dict[str, float],
        outputs: set[str],
        mask_png: bytes | None = None,
    ) -> dict[str, Any]:
        assert pred.mask is not None and pred.cams is not None
        predicted = pred.labels_source == "predicted"
        return build_result(
            request_id=request_id,
            model=self._cards[opts.model_id],
            image_info=info,
            labels_requested=AUTO_LABELS if predicted else list(labels_requested),
            classes=pred.classes,
            class_names=pred.class_names,
            mask=pred.mask,
            cams=pred.cams,
            heatmaps=pred.heatmaps,
            settings=pred.settings,
            timings_ms=timings,
            outputs=outputs,
            mask_png=mask_png,
            labels_source=pred.labels_source,
            classifier_scores=pred.class_scores,
            label_threshold=opts.label_threshold if predicted else None,
        )

    @staticmethod
    def _timings(t_decode: float, pred: Prediction) -> dict[str, float]:
        out = {
            "decode": _ms(t_decode),
            "network": _ms(pred.timings.get("network", 0.0)),
            "crf": _ms(pred.timings.get("crf", 0.0)),
            "postprocess": _ms(pred.timings.get("postprocess", 0.0)),
        }
        if "classify" in pred.timings:
            out["classify"] = _ms(pred.timings["classify"])
        return out

    def pseudo_label(self, request: Mapping[str, Any], image: bytes) -> dict[str, Any]:
        """The D3 result dict of one image, or :class:`ItemError`.

        ``request``: ``{"request_id", "model" (id or None), "labels" (channel indices, or ``"auto"``:
        the classifier's), "label_threshold" (with ``"auto"``; default 0.5), "labels_requested" (as
        the client gave them), "crf" (default true), "bg_threshold" (None: the model's), "outputs"
        (names), "enqueued_at" (optional unix time: adds ``queue`` to the timings)}``.
        """
        t0 = time.perf_counter()
        queued = request.get("enqueued_at")
        opts = self._options(request.get("model"), request)
        channels: tuple[int, ...] = ()
        if not opts.auto_labels:
            channels = self._channels(opts.predictor, request.get("labels") or [])
        rgb, info = self._decode(image)
        t_decode = time.perf_counter() - t0
        pred = self._predict(opts, rgb, channels)
        timings = self._timings(t_decode, pred)
        t_enc = time.perf_counter()
        result = self._result(
            request_id=str(request.get("request_id", "")),
            opts=opts,
            pred=pred,
            info=info,
            labels_requested=request.get("labels_requested") or list(request.get("labels") or []),
            timings=timings,
            outputs=opts.outputs,
        )
        result["timings_ms"]["encode"] = _ms(time.perf_counter() - t_enc)
        result["timings_ms"]["total"] = _ms(time.perf_counter() - t0)
        if isinstance(queued, (int, float)) and not isinstance(queued, bool):
            result["timings_ms"]["queue"] = _ms(
                max(0.0, time.time() - result["timings_ms"]["total"] / 1000 - queued)
            )
        self._count()
        return result

    # -------------------------------------------------------------------------------------- jobs

    def _load_item(self, item: JobItem, opts: _Options) -> tuple[np.ndarray, dict[str, Any], float]:
        """Check the item's labels, read and decode its image: ``(rgb, info, seconds)``."""
        t0 = time.perf_counter()
        if not opts.auto_labels:
            if not item.labels:
                raise ItemError("no_labels", f"item {item.id} has no image-level labels")
            self._channels(opts.predictor, item.labels)
        try:
            data = Path(item.image).read_bytes()
        except FileNotFoundError:
            raise ItemError("not_found", f"image file {item.image} does not exist") from None
        except OSError as e:
            raise ItemError("unreadable", f"image file {item.image}: {e.strerror or e}") from None
        rgb, info = self._decode(data)
        return rgb, info, time.perf_counter() - t0

    def _write_item(
        self,
        jdir: Path,
        job_id: str,
        item: JobItem,
        opts: _Options,
        pred: Prediction,
        info: dict,
        t_decode: float,
    ) -> None:
        """The item's files; ``items/<id>.json`` last (its existence means the item is complete)."""
        assert pred.mask is not None and pred.cams is not None
        t0 = time.perf_counter()
        mask_png = label_to_png(pred.mask)
        atomic_write_bytes(jdir / "masks" / f"{item.id}.png", mask_png)
        save_cams(jdir / "cams" / f"{item.id}.npz", pred.cams, pred.classes, pred.class_names)
        heat: dict[str, dict[str, str]] = {}
        if "heatmaps" in opts.outputs:
            for name, rgb in pred.heatmaps.items():
                rel = f"heatmaps/{item.id}/{heatmap_file_name(name)}"
                atomic_write_bytes(jdir / rel, rgb_png(rgb))
                heat[name] = {"path": rel, "normalisation": "per-class max"}
        inline = opts.outputs - {"heatmaps", "cams"}  # files instead of base64
        result = self._result(
            request_id=f"{job_id}/{item.id}",
            opts=opts,
            pred=pred,
            info=info,
            labels_requested=list(pred.class_names),
            timings=self._timings(t_decode, pred),
            outputs=inline,
            mask_png=mask_png,
        )
        result["item"] = {"index": item.index, "id": item.id, "image": item.image}
        result["mask"] = {
            "encoding": "png-palette",
            "palette": "voc",
            "ignore_index": IGNORE_INDEX,
            "path": f"masks/{item.id}.png",
        }
        result["cams"] = {
            "path": f"cams/{item.id}.npz",
            "format": "npz",
            "dtype": "float32",
            "classes": list(pred.class_names),
        }
        if heat:
            result["heatmaps"] = heat
        result["timings_ms"]["encode"] = _ms(time.perf_counter() - t0)
        result["timings_ms"]["total"] = round(sum(result["timings_ms"].values()), 2)
        atomic_write_bytes(jdir / "items" / f"{item.id}.json", json.dumps(result).encode("utf-8"))

    def run_chunk(
        self,
        store: JobStore,
        results_dir: Path,
        job_id: str,
        start: int,
        stop: int,
        *,
        passthrough: tuple[type[BaseException], ...] = (),
    ) -> dict[str, Any]:
        """Pseudo-label items ``start..stop-1`` of a job (module docstring); returns a summary
        ``{job_id, start, stop, done, failed, already_final, recovered, cancelled, status}``.

        ``passthrough``: exception types that must leave at once (a Celery time limit) instead of
        failing the current item. Errors of the store or of writing results propagate too: the items
        stay pending, for the redelivery or a resume.
        """
        state = _ChunkState()
        summary: dict[str, Any] = {"job_id": job_id, "start": int(start), "stop": int(stop)}
        job = store.get_job(job_id)
        if job is None:
            log.warning("chunk %s[%d:%d]: no such job (deleted?)", job_id, start, stop)
            return {**summary, **self._summary(state), "status": None}
        if store.cancel_requested(job_id) or job.get("status") in ("cancelling", "cancelled"):
            state.cancelled = True
            self._cancelled(store, job_id)
            return {**summary, **self._summary(state), "status": self._status(store, job_id)}
        jdir = job_dir(Path(results_dir), job_id)
        items = store.get_items(job_id, start, stop)
        states = {
            s["index"]: s["state"] for s in store.item_states(job_id, None, start, max(0, stop - start))
        }
        todo: list[JobItem] = []
        for item in items:
            if states.get(item.index, "pending") != "pending":
                state.already_final += 1
            elif (jdir / "items" / f"{item.id}.json").is_file():  # written before a crash: complete
                state.recovered += int(store.mark(job_id, item.index, "done"))
            else:
                todo.append(item)
        if todo:
            try:
                opts = self._options(job.get("model"), job.get("options") or {})
            except ItemError as e:  # the job cannot run here: fail its items, say why
                for item in todo:
                    self._fail(store, job_id, item, e, state)
            else:
                self._run_items(store, job_id, jdir, todo, opts, state, passthrough)
        if state.cancelled:
            self._cancelled(store, job_id)
            status = self._status(store, job_id)
        else:
            status = store.finish_if_complete(job_id)
        return {**summary, **self._summary(state), "status": status}

    @staticmethod
    def _summary(state: _ChunkState) -> dict[str, Any]:
        return {
            "done": state.done,
            "failed": state.failed,
            "already_final": state.already_final,
            "recovered": state.recovered,
            "cancelled": state.cancelled,
        }

    @staticmethod
    def _status(store: JobStore, job_id: str) -> str | None:
        job = store.get_job(job_id)
        return None if job is None else job.get("status")

    @staticmethod
    def _cancelled(store: JobStore, job_id: str) -> None:
        try:
            store.update(job_id, if_status="cancelling", status="cancelled", finished_at=time.time())
        except KeyError:  # deleted meanwhile
            pass

    @staticmethod
    def _running(store: JobStore, job_id: str, state: _ChunkState) -> None:
        if not state.running_marked:
            store.update(job_id, if_status="queued", status="running", started_at=time.time())
            state.running_marked = True

    def _fail(self, store: JobStore, job_id: str, item: JobItem, e: ItemError, state: _ChunkState) -> None:
        if store.mark(job_id, item.index, "failed", code=e.code, detail=e.detail):
            state.failed += 1
        log.info("job %s item %s failed: %s", job_id, item.id, e)

    def _done(self, store: JobStore, job_id: str, item: JobItem, state: _ChunkState) -> None:
        if store.mark(job_id, item.index, "done"):
            state.done += 1
        self._count()

    def _run_items(
        self,
        store: JobStore,
        job_id: str,
        jdir: Path,
        todo: list[JobItem],
        opts: _Options,
        state: _ChunkState,
        passthrough: tuple[type[BaseException], ...],
    ) -> None:
        pending: Iterator[JobItem] = iter(todo)
        pipelined = opts.crf and self.settings.crf_workers > 0
        if len(todo) > 1 and (pipelined or opts.predictor.batch_images > 1):
            left = self._run_pipelined(store, job_id, jdir, pending, opts, state, passthrough)
            if left is None:
                return
            pending = iter(left)
        for item in pending:
            if store.cancel_requested(job_id):
                state.cancelled = True
                return
            self._running(store, job_id, state)
            try:
                rgb, info, t_decode = self._load_item(item, opts)
                pred = self._predict(opts, rgb, item.labels)
            except passthrough:
                raise
            except ItemError as e:
                self._fail(store, job_id, item, e, state)
                continue
            except Exception as e:  # an image that breaks the model fails alone, with the reason
                log.exception("job %s item %s: unexpected error", job_id, item.id)
                self._fail(store, job_id, item, ItemError("internal", f"{type(e).__name__}: {e}"), state)
                continue
            self._write_item(jdir, job_id, item, opts, pred, info, t_decode)
            self._done(store, job_id, item, state)

    def _run_pipelined(
        self,
        store: JobStore,
        job_id: str,
        jdir: Path,
        pending: Iterator[JobItem],
        opts: _Options,
        state: _ChunkState,
        passthrough: tuple[type[BaseException], ...],
    ) -> list[JobItem] | None:
        """:meth:`Predictor.predict_many` over the items: up to ``batch_images`` images of one size
        share the network's forwards, and the CRF of each image runs in ``crf_workers`` processes
        while the network works on the next.

        Returns None when every item was handled, else the items to run one by one: after an error
        inside the pipeline, whose item cannot be told, the images in flight and the rest go through
        the sequential path, where each failure is its own item's.
        """
        inflight: deque[tuple[JobItem, dict[str, Any], float]] = deque()
        current: list[JobItem] = []  # the item being read (not yet in flight)

        def inputs() -> Iterator[tuple[np.ndarray, list[int] | str]]:
            for item in pending:
                if store.cancel_requested(job_id):
                    state.cancelled = True
                    return
                self._running(store, job_id, state)
                current[:] = [item]
                try:
                    rgb, info, t_decode = self._load_item(item, opts)
                except ItemError as e:
                    current.clear()
                    self._fail(store, job_id, item, e, state)
                    continue
                current.clear()
                inflight.append((item, info, t_decode))
                yield rgb, (AUTO_LABELS if opts.auto_labels else list(item.labels))

        stream = opts.predictor.predict_many(
            inputs(),
            crf=opts.crf,
            crf_workers=self.settings.crf_workers,
            bg_threshold=opts.bg_threshold,
            outputs=opts.predictor_outputs,
            label_threshold=opts.label_threshold,
        )
        try:
            while True:
                try:
                    pred = next(stream)
                except StopIteration:
                    return None
                except passthrough:
                    raise
                except Exception as e:
                    log.warning("job %s: batched pipeline stopped (%s: %s); going on image by image",
                                job_id, type(e).__name__, e)  # fmt: skip
                    return current + [x[0] for x in inflight] + list(pending)
                item, info, t_decode = inflight.popleft()
                self._write_item(jdir, job_id, item, opts, pred, info, t_decode)
                self._done(store, job_id, item, state)
        finally:
            stream.close()


_engine: Engine | None = None
_engine_lock = threading.Lock()


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def model_processes(settings: Settings) -> int:
    """Processes of one ``hsc serve`` / ``hsc worker`` that each hold the models and share the CPUs:
    the embedded pool's, or a prefork worker's children (threads and solo pools: one)."""
    if settings.embedded:
        return settings.embedded_workers
    return settings.worker_concurrency if settings.worker_pool == "prefork" else 1


def torch_threads(settings: Settings) -> int:
    """Intra-op threads of one model process: ``settings.torch_threads`` when set; else
    ``OMP_NUM_THREADS`` when the environment sets it; else the usable CPUs divided among
    :func:`model_processes` (at least 1)."""
    if settings.torch_threads > 0:
        return settings.torch_threads
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return max(1, usable_cpus() // model_processes(settings))


def get_engine(settings: Settings) -> Engine:
    """This process's engine, loaded on first use and kept (a new one when the settings change).
    Loading sets torch's CPU threads to :func:`torch_threads`."""
    global _engine
    with _engine_lock:
        if _engine is None or _engine.settings != settings:
            _engine = None  # release the old models first
            n = torch_threads(settings)
            if torch.get_num_threads() != n:
                torch.set_num_threads(n)
            _engine = Engine(settings)
        return _engine
