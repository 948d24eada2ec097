"""Helpers of the worker tests: a tiny random checkpoint, encoded test images, jobs of image files."""

from __future__ import annotations

import io
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hsc.core.jobs import JobItem, JobStore, new_job_id
from hsc.training.demo import generated_image

REDIS_URL = "redis://127.0.0.1:6379/15"
CLASSES = ("road", "car", "tree")


@dataclass(frozen=True)
class Ckpt:
    path: Path
    id: str
    sha256: str


def make_checkpoint(folder: Path, seed: int = 0) -> Ckpt:
    """A random width-0.125 HSC checkpoint with three classes and a model id of its own."""
    import torch

    from hsc.model.checkpoint import save_checkpoint
    from hsc.model.config import ModelInfo
    from hsc.model.hsc_net import build_hsc_net

    torch.manual_seed(seed)
    net = build_hsc_net(num_classes=len(CLASSES), width=0.125).eval()
    mid = f"wrk-{secrets.token_hex(4)}"
    path = folder / f"{mid}.safetensors"
    digest = save_checkpoint(path, net, info=ModelInfo(net=net.cfg, class_names=CLASSES, bg_threshold=0.3))
    return Ckpt(path, mid, digest)


def rgb(w: int = 56, h: int = 40, seed: int = 0) -> np.ndarray:
    return generated_image(w, h, seed)


def encode(arr: np.ndarray, fmt: str = "PNG", orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    kw: dict[str, Any] = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_images(
    folder: Path, n: int, *, corrupt: Sequence[int] = (), size: tuple[int, int] = (56, 40)
) -> list[Path]:
    """``n`` PNG files (``img_<i>.png``); the indices in ``corrupt`` are cut in half (truncated data)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        data = encode(rgb(*size, seed=i))
        if i in corrupt:
            data = data[: len(data) // 2]
        p = folder / f"img_{i}.png"
        p.write_bytes(data)
        out.append(p)
    return out


def create_job(
    store: JobStore,
    images: Sequence[Path],
    model: str,
    *,
    labels: Sequence[Sequence[int]] | None = None,
    options: dict[str, Any] | None = None,
    status: str = "queued",
    job_id: str | None = None,
) -> tuple[str, list[JobItem]]:
    """A job over ``images`` (labels: channels 0 and 2 unless given), as the API would create it."""
    job_id = job_id or new_job_id()
    items = [
        JobItem(i, f"item-{i}", str(p.resolve()), tuple(labels[i]) if labels is not None else (0, 2))
        for i, p in enumerate(images)
    ]
    record = {
        "id": job_id,
        "status": status,
        "created_at": time.time(),
        "model": model,
        "options": options if options is not None else {"crf": False, "outputs": ["mask"]},
        "dataset": {"kind": "test"},
    }
    store.create_job(record, items)
    return job_id, items


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")
