"""Time the full pseudo-label pipeline (multi-scale CAM + dense CRF) per image on the CPU.

Three implementations run on the same images, each in its own fresh process (so that its peak RSS is
its own, and the runs do not share warm caches):

* ``official`` -- the authors' ``inference.py`` step by step, written here from docs/algorithm.md
  5.2-5.4 (and only here): one forward at a time (batch 1, 8 passes), ``torch.no_grad``, softmax of all
  21 channels resized to the image, numpy conversion and numpy flips per pass, the numpy sum of all 20
  foreground channels, the 21-channel argmax PNG, the CRF, and its three outputs (``cam_npy`` dict,
  grey PNG, CRF ``npy`` dict);
* ``exact`` -- :class:`hsc.model.predictor.Predictor` in exact mode (float32, official numbers; on the
  CPU float32 Winograd F(4x4, 3x3) for the 3x3 layers with >= 256 channels);
* ``fast``  -- the predictor in fast mode (bfloat16 autocast + channels_last on the CPU, and Winograd
  for the wide 3x3 layers where :func:`hsc.model.winograd.pays_on_this_cpu`);
* ``exact-direct``, ``exact-winograd``, ``fast-direct``, ``fast-winograd`` -- a mode with Winograd
  forced off or on (``--modes exact-direct,exact-winograd,fast-direct,fast-winograd``).

Per image: ``network`` (pre-processing, the 8 passes, merging), ``crf``, ``post`` (threshold mask /
post-processing), ``io`` (read the JPEG, write the outputs: ours write one palette PNG), ``total``.
Peak RSS is the process's ``ru_maxrss``; ``load`` is the RSS after the model is built. The ratio column
divides by the official total of the same run. Agreement lines compare the CAMs and masks.

Run from the repository root::

    python benchmarks/bench_inference.py --width 0.125 --images 2
    python benchmarks/bench_inference.py --width 1.0 --images 1 --weights seeded

Images are generated (a disc and a box on a noisy field, 500x375 JPEGs): timings do not depend on the
content; agreement does, and random weights are a weak proxy for a trained network (``--weights
seeded`` uses the golden file's deterministic width-1.0 weights; ``--checkpoint`` a real model).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCALES = (0.5, 1.0, 1.5, 2.0)
THR = 0.22
CRF_T, CRF_ALPHA = 8, 7
LABEL_SETS = (("aeroplane", "person"), ("dog", "cat"), ("car",), ("horse", "person", "dog"))
# our impls: (Predictor mode, its winograd argument; None = the predictor's own choice)
OURS = {
    "exact": ("exact", None),
    "exact-direct": ("exact", False),
    "exact-winograd": ("exact", True),
    "fast": ("fast", None),
    "fast-direct": ("fast", False),
    "fast-winograd": ("fast", True),
}
IMPLS = ("official", *OURS)


def rss_mb() -> float:
    """Current resident set size (Linux /proc), MB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


# --------------------------------------------------------------------------------------------------
# the official script, step by step (docs/algorithm.md 5.2-5.4); benchmark only


def official_pipeline(
    net: Any, jpg: Path, label_vec: np.ndarray, out_dir: Path
) -> tuple[dict[str, float], Any]:
    import pydensecrf.densecrf as dcrf
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from pydensecrf.utils import unary_from_softmax

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    t = {}
    t0 = time.perf_counter()
    img = Image.open(jpg).convert("RGB")
    w, h = img.size
    t["io"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # 5.2 steps 1-3: PIL bicubic resize per scale, Normalize (float64 maths, float32 array), HWC->CHW,
    # the flipped copy; the 8 inputs in the official order
    inputs = []
    for s in SCALES:
        im = img.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC)
        a = np.asarray(im)
        x = np.empty_like(a, np.float32)
        for c in range(3):
            x[..., c] = (a[..., c] / 255.0 - mean[c]) / std[c]
        x = x.transpose(2, 0, 1)
        inputs += [torch.from_numpy(x.copy()), torch.from_numpy(np.flip(x, -1).copy())]
    # steps 4-6: one pass at a time, softmax of all 21 channels, resized to (H, W), numpy per pass
    outs = []
    with torch.no_grad():
        for i, xt in enumerate(inputs):
            z = net.forward_cam(xt.unsqueeze(0))
            prob = F.softmax(z, dim=1)
            prob = F.interpolate(prob, (h, w), mode="bilinear", align_corners=False)[0]
            p = prob.cpu().numpy()
            fg = p[:-1] * label_vec.reshape(-1, 1, 1)
            bg = p[-1:]
            if i % 2 == 1:
                fg, bg = np.flip(fg, -1), np.flip(bg, -1)
            outs.append((fg, bg))
    # steps 7-9: numpy sum of the foreground maps, max normalisation of all 20 channels, the dict
    total = np.sum([o[0] for o in outs], axis=0)
    norm = total / (np.max(total, axis=(1, 2), keepdims=True) + 1e-5)
    cam_dict = {c: norm[c] for c in range(len(label_vec)) if label_vec[c] > 1e-5}
    t["network"] = time.perf_counter() - t0

    # 5.3: the thresholded PNG
    t0 = time.perf_counter()
    scores = np.zeros((len(label_vec) + 1, h, w), np.float32)
    for c, v in cam_dict.items():
        scores[c + 1] = v
    scores[0] = THR
    label = np.argmax(scores, axis=0).astype(np.uint8)
    t["post"] = time.perf_counter() - t0

    # 5.4: the CRF on [(1 - max)^alpha, CAMs]
    t0 = time.perf_counter()
    v = np.array(list(cam_dict.values()))
    bg_score = np.power(1 - np.max(v, axis=0, keepdims=True), CRF_ALPHA)
    u = np.concatenate((bg_score, v), axis=0)
    d = dcrf.DenseCRF2D(w, h, u.shape[0])
    d.setUnaryEnergy(unary_from_softmax(u))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(np.copy(np.asarray(img))), compat=10)
    q = np.array(d.inference(CRF_T)).reshape((u.shape[0], h, w))
    crf_dict = {0: q[0]}
    for i, c in enumerate(cam_dict):
        crf_dict[c + 1] = q[i + 1]
    t["crf"] = time.perf_counter() - t0

    # the three files of the official script
    t0 = time.perf_counter()
    np.save(out_dir / f"{jpg.stem}_cam.npy", np.asarray(cam_dict, dtype=object))  # a pickled dict
    Image.fromarray(label, mode="L").save(out_dir / f"{jpg.stem}.png")
    np.save(out_dir / f"{jpg.stem}_crf.npy", np.asarray(crf_dict, dtype=object))
    t["io"] += time.perf_counter() - t0

    return t, (cam_dict, label, crf_dict)


def official_outputs(cam_dict: dict[int, Any], label: np.ndarray, crf_dict: dict[int, Any]) -> tuple:
    """(CAMs of the present classes, threshold mask, CRF argmax mask) for the comparisons (untimed)."""
    keys = sorted(crf_dict)
    crf_label = np.asarray(keys, np.uint8)[np.stack([crf_dict[k] for k in keys]).argmax(0)]
    cams = np.stack([cam_dict[c] for c in sorted(cam_dict)]).astype(np.float32)
    return cams, label, crf_label


# --------------------------------------------------------------------------------------------------
# one implementation in its own process


def build_net(width: float, weights: str, num_classes: int = 20) -> Any:
    import torch

    from hsc.model.hsc_net import build_hsc_net

    if weights not in ("random", "seeded"):
        from hsc.model.checkpoint import load_any

        return load_any(weights).net.eval()
    torch.manual_seed(0)
    net = build_hsc_net(num_classes=num_classes, width=width)
    if weights == "seeded":
        sys.path.insert(0, str(REPO / "tests"))
        from goldenlib import seeded_weights  # the golden file's deterministic weights (width 1.0)

        net.load_state_dict(seeded_weights(), strict=True)
    return net.eval()


def run_impl(impl: str, args: dict[str, Any], jpgs: list[str], out: str) -> dict[str, Any]:
    import torch
    from PIL import Image

    torch.set_num_threads(args["threads"])
    from hsc.core.encoders import label_to_png
    from hsc.model.cam import cams_to_label
    from hsc.model.classes import VOC_CLASSES
    from hsc.model.config import ModelInfo
    from hsc.model.predictor import Predictor

    out_dir = Path(out) / impl
    out_dir.mkdir(parents=True, exist_ok=True)
    net = build_net(args["width"], args["weights"])
    predictor = None
    if impl != "official":
        predictor = Predictor(
            net,
            ModelInfo(net=net.cfg, class_names=VOC_CLASSES),
            device="cpu",
            mode=OURS[impl][0],
            compile=args["compile"],
            winograd=OURS[impl][1],
        )
    load_rss = rss_mb()
    # warm-up: one small image through the same code (thread pools, first-call library set-up)
    warm = np.full((48, 64, 3), 128, np.uint8)
    t0 = time.perf_counter()
    if predictor is not None:
        predictor.predict(warm, ["dog"])
    else:
        with torch.no_grad():
            net.forward_cam(torch.zeros(1, 3, 48, 64))
    warmup_s = time.perf_counter() - t0

    rows, results = [], []
    for i, jpg in enumerate(map(Path, jpgs)):
        names = LABEL_SETS[i % len(LABEL_SETS)]
        t_start = time.perf_counter()
        if predictor is None:
            vec = np.zeros(20, np.float32)
            vec[[VOC_CLASSES.index(n) for n in names]] = 1.0
            t, raw = official_pipeline(net, jpg, vec, out_dir)
            t["total"] = time.perf_counter() - t_start
            res = official_outputs(*raw)
        else:
            t0 = time.perf_counter()
            image = np.asarray(Image.open(jpg).convert("RGB"))
            t_read = time.perf_counter() - t0
            pred = predictor.predict(image, names, crf=True, crf_iters=CRF_T, crf_alpha=CRF_ALPHA)
            t0 = time.perf_counter()
            assert pred.mask is not None and pred.cams is not None
            (out_dir / f"{jpg.stem}.png").write_bytes(label_to_png(pred.mask))
            t_write = time.perf_counter() - t0
            t = {
                "io": t_read + t_write,
                "network": pred.timings["network"],
                "crf": pred.timings["crf"],
                "post": pred.timings["postprocess"],
                "total": time.perf_counter() - t_start,
            }
            res = (pred.cams, cams_to_label(pred.cams, pred.classes, THR), pred.mask)
        rows.append(t)
        results.append(res)
    return {
        "impl": impl,
        "rows": rows,
        "results": results,
        "load_rss_mb": load_rss,
        "warmup_s": warmup_s,
        "peak_rss_mb": peak_rss_mb(),
    }


def _child(impl: str, args: dict[str, Any], jpgs: list[str], out: str, result_path: str) -> None:
    import torch

    res = run_impl(impl, args, jpgs, out)
    # arrays travel as tensors, so the parent reads them back with torch.load(weights_only=True)
    res["results"] = [tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in r) for r in res["results"]]
    torch.save(res, result_path)


# --------------------------------------------------------------------------------------------------
# driver


def make_images(n: int, size: tuple[int, int], folder: Path) -> list[str]:
    from PIL import Image

    from hsc.training.demo import generated_image

    paths = []
    for i in range(n):
        p = folder / f"img_{i:03d}.jpg"
        Image.fromarray(generated_image(size[0], size[1], seed=i)).save(p, quality=90)
        paths.append(str(p))
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=float, default=0.125, help="network width multiplier (1.0 = HSC)")
    ap.add_argument("--images", type=int, default=2, help="number of images (timed once each)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the issue's figure: 2)")
    ap.add_argument("--size", default="500x375", help="image size WxH (VOC: 500x375)")
    ap.add_argument("--skip-official", action="store_true", help="do not run the official step-by-step code")
    ap.add_argument("--compile", action="store_true", help="our modes with torch.compile (excluded: warm-up)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat, alternating the order; keep the fastest")
    ap.add_argument("--modes", default="exact,fast", help="our modes to run, comma-separated")
    ap.add_argument(
        "--weights",
        default="random",
        help="'random' (seed 0), 'seeded' (golden width-1.0 weights) or a checkpoint",
    )
    a = ap.parse_args(argv)
    w, h = (int(v) for v in a.size.lower().split("x"))
    impls = ([] if a.skip_official else ["official"]) + [m for m in a.modes.split(",") if m]
    for m in impls:
        if m not in IMPLS:
            ap.error(f"unknown mode {m!r}")
    args = {"width": a.width, "weights": a.weights, "threads": a.threads, "compile": a.compile}

    import torch

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"torch {torch.__version__}, {a.threads} thread(s), CPU: {cpu} ({os.cpu_count()} cores visible)")
    print(
        f"width {a.width}, weights {a.weights}, {a.images} image(s) {w}x{h}, "
        f"scales {SCALES} x flip, CRF t={CRF_T} alpha={CRF_ALPHA}, compile {a.compile}"
    )
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")

    ctx = multiprocessing.get_context("spawn")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="hsc-bench-") as tmp:
        jpgs = make_images(a.images, (w, h), Path(tmp))
        for rnd in range(a.rounds):
            order = impls if rnd % 2 == 0 else impls[::-1]  # alternate, so that drifting load evens out
            for impl in order:
                rp = str(Path(tmp) / f"{impl}.pkl")
                p = ctx.Process(target=_child, args=(impl, args, jpgs, tmp, rp))
                p.start()
                p.join()
                if p.exitcode != 0:
                    raise SystemExit(f"{impl}: the benchmark process failed (exit code {p.exitcode})")
                res = torch.load(rp, weights_only=True)
                res["results"] = [tuple(t.numpy() for t in r) for r in res["results"]]
                t = float(np.mean([r["total"] for r in res["rows"]]))
                print(
                    f"  round {rnd + 1}, {impl}: {t:.2f} s/image (warm-up {res['warmup_s']:.1f} s), "
                    f"load {os.getloadavg()[0]:.2f}"
                )
                best = results.get(impl)
                if best is not None:
                    peak = max(res["peak_rss_mb"], best["peak_rss_mb"])
                    if t >= np.mean([r["total"] for r in best["rows"]]):
                        res = best
                    res["peak_rss_mb"] = peak
                results[impl] = res
    print(f"load average at end:   {' '.join(f'{v:.2f}' for v in os.getloadavg())}")

    cols = ("network", "crf", "post", "io", "total")
    ref = np.mean([r["total"] for r in results["official"]["rows"]]) if "official" in results else None
    print()
    print(
        f"{'impl':<15}"
        + "".join(f"{c + ' s':>10}" for c in cols)
        + f"{'ratio':>8}{'load MB':>10}{'peak MB':>10}"
    )
    for impl, r in results.items():
        means = {c: float(np.mean([row[c] for row in r["rows"]])) for c in cols}
        ratio = f"{means['total'] / ref:.3f}" if ref else "-"
        print(
            f"{impl:<15}"
            + "".join(f"{means[c]:>10.3f}" for c in cols)
            + f"{ratio:>8}{r['load_rss_mb']:>10.0f}{r['peak_rss_mb']:>10.0f}"
        )
    print(
        "(mean per image, the fastest of the rounds; load = RSS after building the model, "
        "peak = the process's maximum RSS)"
    )

    def compare(x: str, y: str) -> None:
        if x not in results or y not in results:
            return
        diffs, eq_thr, eq_crf = [], [], []
        for (ca, la, qa), (cb, lb, qb) in zip(results[x]["results"], results[y]["results"]):
            diffs.append(np.abs(ca - cb))
            eq_thr.append(float((la == lb).mean()))
            eq_crf.append(float((qa == qb).mean()))
        d = np.concatenate([v.ravel() for v in diffs])
        print(
            f"{y} vs {x}: CAM max |diff| {d.max():.3g}, mean {d.mean():.3g}; equal mask pixels "
            f"(thr {THR}) {100 * np.mean(eq_thr):.3f} % (min {100 * min(eq_thr):.3f} %), "
            f"CRF masks {100 * np.mean(eq_crf):.3f} %"
        )

    print()
    compare("official", "exact")
    compare("official", "exact-direct")
    compare("official", "exact-winograd")
    compare("exact", "fast")
    compare("exact", "fast-direct")
    compare("exact", "fast-winograd")


if __name__ == "__main__":
    main()
