"""Does HSC improve its baseline? Train the width-0.125 network on a synthetic set for a fixed budget,
with SEAM and EPS, each alone and with HSC, then report the seed mIoU (best background threshold) and
the +CRF mIoU on the val split. CPU only; prints a table. Not a test: the figures are reported, not
asserted.

    python benchmarks/bench_hsc_gain.py --out /tmp/hsc-gain [--iters 1500] [--train 200] [--val 60]
    python benchmarks/bench_hsc_gain.py --out /tmp/hsc-gain --seeds 0-6 --variants EPS,EPS+HSC
    python benchmarks/bench_hsc_gain.py --summarize /tmp/hsc-gain/seed-*  # tables from earlier runs

The synthetic set is generated (``hsc data synth``) unless ``--data`` is given. One run per variant
and seed is noisy on so small a set (the baseline alone moves by 10+ mIoU points between seeds), so
``--seeds`` runs several seeds (each its own data, initialisation and sampling, under
``OUT/seed-N``) and prints the mean and standard deviation of each figure and of the gains.
Finished runs are reused: a variant whose ``final.safetensors`` exists is only evaluated again.

By default every variant starts from random weights (with BatchNorm trained, ``--no-freeze-bn``),
unlike the paper, which starts from ImageNet. ``--pretrain-iters N`` plays ImageNet's part: a
classifier (SEAM alone) is first trained for N steps on a separate synthetic set with all 20 classes
(``OUT/pretrain``, made once and shared by the seeds), and every variant then starts from its
backbone, with BatchNorm trained, or with ``--pretrain-freeze-bn`` in the official frozen-BatchNorm
regime (``conv1a``/``b2`` never trained; on this small pretraining it learns far less).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from hsc.model.cam import crf_from_cams, crf_to_label, multiscale_cam
from hsc.model.checkpoint import load_checkpoint
from hsc.training.config import TrainConfig
from hsc.training.datasets import load_rgb, open_dataset
from hsc.training.evaluate import ConfusionMatrix, ThresholdSweep, read_label_png
from hsc.training.synth import synthesize
from hsc.training.train_hsc import train

WIDE_THRESHOLDS = tuple(i / 100 for i in range(96))
VARIANTS = {
    "SEAM": {"baseline": "seam", "no_hsc": True},
    "SEAM+HSC": {"baseline": "seam"},
    "EPS": {"baseline": "eps", "no_hsc": True},
    "EPS+HSC": {"baseline": "eps"},
}


def evaluate(final: Path, data: Path, *, crf_alpha: float, crf_iters: int, scales: tuple[float, ...]) -> dict:
    ck = load_checkpoint(final)
    net = ck.net.eval()
    index = open_dataset(data, split="val")
    k = len(index.classes)
    # the official sweep is t = 0.00..0.59; diffuse CAMs can peak above it, so sweep up to 0.95 and
    # report both maxima
    sweep = ThresholdSweep(WIDE_THRESHOLDS, num_classes=k + 1, class_names=("background", *index.classes))
    crf_cm = ConfusionMatrix(k + 1, class_names=("background", *index.classes))
    t0 = time.perf_counter()
    for item in index:
        image = np.asarray(load_rgb(item.image))
        gt = read_label_png(item.mask)
        res = multiscale_cam(net, image, item.labels, scales=scales)
        cams = res.cams.cpu().numpy()
        sweep.update(gt, {c: cams[i] for i, c in enumerate(res.classes)})
        q, keys = crf_from_cams(image, cams, res.classes, alpha=crf_alpha, iters=crf_iters)
        crf_cm.update(gt, crf_to_label(q, keys))
    s = sweep.result()
    official = [(r.miou, t) for t, r in zip(s.thresholds, s.results) if t <= 0.595]
    best_official = max(official, key=lambda mt: mt[0])
    return {
        "seed_miou": best_official[0],
        "best_threshold": best_official[1],
        "seed_miou_wide": s.best_miou,
        "best_threshold_wide": s.best_threshold,
        "crf_miou": crf_cm.result().miou,
        "eval_s": time.perf_counter() - t0,
    }


def parse_seeds(text: str) -> list[int]:
    """``"3"``, ``"0-6"``, ``"1,4,7-9"`` -> the seeds in order, each once."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            span = range(int(lo), int(hi) + 1) if sep else range(int(lo), int(lo) + 1)
        except ValueError:
            raise argparse.ArgumentTypeError(f"seeds: {part!r} is not N or N-M") from None
        if not span:
            raise argparse.ArgumentTypeError(f"seeds: {part!r} is an empty range")
        seeds.extend(x for x in span if x not in seeds)
    if not seeds:
        raise argparse.ArgumentTypeError("seeds: none given")
    return seeds


def gains(rows: dict) -> dict[str, tuple[float, float]]:
    """HSC minus its baseline, (seed mIoU, +CRF mIoU), for each baseline run with and without HSC."""
    out = {}
    for b in ("SEAM", "EPS"):
        if b in rows and f"{b}+HSC" in rows:
            hsc, alone = rows[f"{b}+HSC"], rows[b]
            out[b] = (hsc["seed_miou"] - alone["seed_miou"], hsc["crf_miou"] - alone["crf_miou"])
    return out


def print_table(rows: dict) -> None:
    print(
        f"{'variant':10s} {'seed mIoU':>10s} {'best t':>7s} {'seed(0-.95)':>11s} {'best t':>7s} "
        f"{'+CRF mIoU':>10s} {'train s':>8s}"
    )
    for name, r in rows.items():
        print(
            f"{name:10s} {r['seed_miou']:10.2f} {r['best_threshold']:7.2f} {r['seed_miou_wide']:11.2f} "
            f"{r['best_threshold_wide']:7.2f} {r['crf_miou']:10.2f} {r.get('train_s', float('nan')):8.0f}"
        )
    for b, (d1, d2) in gains(rows).items():
        print(f"HSC gain over {b}: seed {d1:+.2f}, +CRF {d2:+.2f}")


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{statistics.fmean(values):6.2f} (1 run)"
    return f"{statistics.fmean(values):6.2f} ± {statistics.stdev(values):5.2f}"


def print_summary(runs: dict[str, dict]) -> None:
    """Per-run gains, then mean ± sample standard deviation over the runs of every figure."""
    print(f"\n{len(runs)} runs: " + ", ".join(runs))
    names = [n for n in VARIANTS if any(n in rows for rows in runs.values())]
    print(f"{'variant':10s} {'n':>3s} {'seed mIoU':>15s} {'+CRF mIoU':>15s}")
    for name in names:
        got = [rows[name] for rows in runs.values() if name in rows]
        seed = _mean_sd([r["seed_miou"] for r in got])
        crf = _mean_sd([r["crf_miou"] for r in got])
        print(f"{name:10s} {len(got):3d} {seed:>15s} {crf:>15s}")
    for b in ("SEAM", "EPS"):
        per_run = {run: g[b] for run, rows in runs.items() if b in (g := gains(rows))}
        if not per_run:
            continue
        listed = ", ".join(f"{run} {d1:+.1f}/{d2:+.1f}" for run, (d1, d2) in per_run.items())
        d1s = [d[0] for d in per_run.values()]
        d2s = [d[1] for d in per_run.values()]
        print(f"HSC gain over {b} (seed/+CRF) per run: {listed}")
        print(
            f"HSC gain over {b}, mean ± sd over {len(per_run)}: seed {_mean_sd(d1s)}, +CRF {_mean_sd(d2s)}; "
            f"runs with a gain >= 3: seed {sum(d >= 3 for d in d1s)}/{len(d1s)}, "
            f"+CRF {sum(d >= 3 for d in d2s)}/{len(d2s)}"
        )


def summarize(dirs: list[Path]) -> None:
    runs = {}
    for d in dirs:
        f = d / "results.json"
        if not f.is_file():
            raise SystemExit(f"{f}: no results.json (was the run finished?)")
        runs[d.name] = json.loads(f.read_text())
    for name, rows in runs.items():
        print(f"\n== {name}")
        print_table(rows)
    print_summary(runs)


def synthetic_set(data: Path, size: tuple[int, int], *, train: int, val: int, seed: int, k: int) -> Path:
    """``data``, generated unless a finished set is already there."""
    if not (data / "classes.txt").exists():
        synthesize(data, train=train, val=val, seed=seed, size=size, num_classes=k)
    return data


def parse_size(text: str) -> tuple[int, int]:
    """``"128x96"`` -> (128, 96)."""
    try:
        w, h = (int(v) for v in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size: {text!r} is not WxH") from None
    return w, h


def pretrained_backbone(args: argparse.Namespace) -> Path:
    """Train (once) the classifier whose backbone every variant starts from; its final checkpoint."""
    out = args.out / "pretrain"
    final = out / "run" / "final.safetensors"
    if final.exists():
        done = json.loads((out / "run" / "config.json").read_text())["iters"]
        if done != args.pretrain_iters:
            raise SystemExit(
                f"{final} was pretrained for {done} steps, not {args.pretrain_iters}: use another --out"
            )
        return final
    data = synthetic_set(
        out / "data", args.size, train=args.pretrain_train, val=1, seed=args.pretrain_seed, k=20
    )
    cfg = replace(
        base_config(args, data, args.pretrain_seed),
        out=str(out / "run"),
        iters=args.pretrain_iters,
        baseline="seam",
        no_hsc=True,
    )
    t0 = time.perf_counter()
    final = train(cfg, progress=False)
    print(f"pretrained backbone: {final} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return final


def base_config(args: argparse.Namespace, data: Path, seed: int) -> TrainConfig:
    return TrainConfig(
        data=str(data),
        out="",
        width=args.width,
        iters=args.iters,
        batch=args.batch,
        crop=args.crop,
        resize_long=(args.crop, int(args.crop * 1.5)),
        lr=args.lr,
        seed=seed,
        workers=1,
        log_every=50,
        save_every=10**9,
        poly_over_run=True,
        momentum=0.9,
        freeze_bn=False,  # from scratch: no ImageNet statistics for the frozen-BN regime to rely on
    )


def run_seed(args: argparse.Namespace, seed: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    data = args.data or synthetic_set(
        out / "data", args.size, train=args.train, val=args.val, seed=seed, k=args.classes
    )
    w = args.size[0]
    base = base_config(args, data, seed)
    if args.pretrain_iters:
        base = replace(base, init=str(pretrained_backbone(args)), freeze_bn=args.pretrain_freeze_bn)
    scales = (0.5, 1.0, 1.5, 2.0) if w >= 96 else (1.0, 1.5, 2.0)
    rows = {}
    for name in args.variants.split(","):
        cfg = replace(base, out=str(out / name), **VARIANTS[name])
        t0 = time.perf_counter()
        final = Path(cfg.out) / "final.safetensors"
        if not final.exists():
            final = train(cfg, progress=False)
        train_s = time.perf_counter() - t0
        rows[name] = evaluate(final, data, crf_alpha=args.crf_alpha, crf_iters=args.crf_iters, scales=scales)
        rows[name]["train_s"] = train_s
        print(f"seed {seed}", name, json.dumps(rows[name]), flush=True)
    print()
    print_table(rows)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/hsc-gain"))
    p.add_argument("--data", type=Path, help="existing synthetic (or other VOC-layout) dataset")
    p.add_argument("--train", type=int, default=200)
    p.add_argument("--val", type=int, default=60)
    p.add_argument("--size", type=parse_size, default=(128, 96), help="WxH of the generated images")
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--iters", type=int, default=1500)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=112)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--seed", type=int, default=0, help="one seed; its run goes to OUT itself")
    p.add_argument(
        "--seeds", type=parse_seeds, help="several seeds (e.g. 0-6 or 1,3,5); each run goes to OUT/seed-N"
    )
    p.add_argument(
        "--summarize", type=Path, nargs="+", metavar="DIR", help="only print the tables of finished runs"
    )
    p.add_argument(
        "--pretrain-iters", type=int, default=0, help="start from a backbone pretrained for N steps (0: none)"
    )
    p.add_argument("--pretrain-train", type=int, default=400, help="images of the pretraining set")
    p.add_argument("--pretrain-seed", type=int, default=1000)
    p.add_argument(
        "--pretrain-freeze-bn", action="store_true", help="the official frozen-BN regime after pretraining"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS)
    )
    p.add_argument("--crf-alpha", type=float, default=7.0)
    p.add_argument("--crf-iters", type=int, default=8)
    args = p.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    if args.seeds and args.data is not None and len(args.seeds) > 1:
        print("note: --data is given, so the seeds change initialisation and sampling, not the images")
    torch.set_num_threads(args.threads)
    if not args.seeds:
        run_seed(args, args.seed, args.out)
        return
    runs = {f"seed-{s}": run_seed(args, s, args.out / f"seed-{s}") for s in args.seeds}
    print_summary(runs)


if __name__ == "__main__":
    main()
