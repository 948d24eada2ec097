"""Memory of one worker process over many images: does it grow?

Loads the worker's engine (:class:`hsc.worker.engine.Engine`, what a Celery worker or an embedded pool
process keeps for its life) and sends it ``--images`` single-image requests exactly as the Celery
task does (``Engine.pseudo_label(request, jpeg_bytes)``: decode, multi-scale CAM, CRF, result
encoding with every output), cycling through images of several sizes and label sets so that the
allocator sees the shapes a real stream brings. Every ``--every`` images it records the process's
resident memory (``/proc/self/statm``) and, on CUDA, ``torch.cuda.memory_allocated`` and
``memory_reserved``. It prints the samples and, after a warm-up, the growth: last minus first sample,
and a least-squares slope in MB per 1,000 images.

    python benchmarks/bench_worker_memory.py                               # demo checkpoint, CPU
    python benchmarks/bench_worker_memory.py --images 5000 --device cuda --checkpoint hsc_eps_v2.pth
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    """A smooth random image (blobs, not noise: the CRF and JPEG behave as on photos)."""
    small = rng.integers(0, 256, size=(max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    from hsc.core.settings import DEMO_CHECKPOINT, Settings
    from hsc.worker.engine import Engine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT))
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--every", type=int, default=100, help="sample period in images")
    p.add_argument("--warmup", type=int, default=100, help="images before the first counted sample")
    p.add_argument("--sizes", default="160x120,200x150,240x180", help="image sizes WxH, cycled")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-crf", action="store_true")
    p.add_argument("--json", help="write the samples here")
    args = p.parse_args(argv)

    import torch

    tmp = tempfile.mkdtemp(prefix="hsc-memory-")
    settings = Settings(checkpoints=[args.checkpoint], device=args.device, results_dir=tmp)
    engine = Engine(settings)
    card = engine.cards()[0]
    k = len([c for c in card["classes"] if c != "background"])  # foreground channels 0..k-1
    cuda = torch.cuda.is_available() and args.device != "cpu"
    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    images = [jpeg(rng, w, h) for w, h in sizes for _ in range(4)]
    label_sets = [[c] for c in range(k)] + [list(range(min(k, 3)))]
    outputs = ["mask", "heatmaps", "cams", "coco_rle", "labelstudio"]

    samples: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    print(f"# {Path(args.checkpoint).name} on {args.device}, {args.images} images of sizes {args.sizes}, "
          f"crf={not args.no_crf}, torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print("| images | RSS MB | CUDA allocated MB | CUDA reserved MB | s |")
    print("|---|---|---|---|---|")
    for i in range(1, args.images + 1):
        request = {
            "request_id": f"mem-{i}",
            "labels": label_sets[i % len(label_sets)],
            "crf": not args.no_crf,
            "outputs": outputs,
        }
        result = engine.pseudo_label(request, images[i % len(images)])
        if "mask" not in result:
            raise SystemExit(f"image {i}: no mask in the result: {json.dumps(result)[:300]}")
        if i % args.every == 0:
            s = {"images": i, "rss_mb": rss_mb(), "s": time.perf_counter() - t0}
            if cuda:
                s["cuda_allocated_mb"] = torch.cuda.memory_allocated() / 2**20
                s["cuda_reserved_mb"] = torch.cuda.memory_reserved() / 2**20
            samples.append(s)
            print(f"| {i} | {s['rss_mb']:.1f} | {s.get('cuda_allocated_mb', float('nan')):.1f} | "
                  f"{s.get('cuda_reserved_mb', float('nan')):.1f} | {s['s']:.0f} |", flush=True)  # fmt: skip

    counted = [s for s in samples if s["images"] >= args.warmup]
    if len(counted) >= 2:
        x = np.array([s["images"] for s in counted], dtype=np.float64)
        for key in ("rss_mb", "cuda_allocated_mb", "cuda_reserved_mb"):
            if key not in counted[0]:
                continue
            y = np.array([s[key] for s in counted])
            slope = np.polyfit(x, y, 1)[0] * 1000
            span = f"from image {int(x[0])} to {int(x[-1])}"
            growth = f"{y[-1] - y[0]:+.1f} MB; slope {slope:+.2f} MB per 1,000 images; max {y.max():.1f}"
            print(f"{key}: {y[0]:.1f} -> {y[-1]:.1f} MB {span} ({growth})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "samples": samples}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
