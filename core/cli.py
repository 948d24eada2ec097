"""The ``hsc`` command line. Subcommands import their heavy modules lazily, so ``hsc --help`` and the
torch-free parts stay fast and never import torch."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], int]


def _version() -> str:
    try:
        return version("hsc")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "0+unknown"


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _cmd_demo(args: argparse.Namespace) -> int:
    from hsc.training.demo import run_demo

    summary = run_demo(
        out_dir=Path(args.out), width=args.width, size=args.size, seed=args.seed, crf=not args.no_crf
    )
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from hsc.model.checkpoint import convert_official

    class_names = None
    if args.classes:
        class_names = [ln.strip() for ln in Path(args.classes).read_text().splitlines() if ln.strip()]
        if class_names and class_names[0].lower() == "background":
            class_names = class_names[1:]
    convert_official(args.src, args.dst, class_names=class_names, bg_threshold=args.bg_threshold)
    print(f"wrote {args.dst}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from hsc.model.checkpoint import load_any
    from hsc.model.seg_checkpoint import is_segmenter_file, load_segmenter

    if is_segmenter_file(args.checkpoint):
        seg = load_segmenter(args.checkpoint, placeholder_names=True)
        seg_info = {
            "path": str(args.checkpoint),
            "sha256": seg.sha256,
            "kind": "step-2 segmenter (DeepLab)",
            "source_format": seg.source_format,
            "labels": list(seg.label_names),
            "net": seg.net.config(),
            "num_parameters": sum(p.numel() for p in seg.net.parameters()),
            "step": seg.step,
            "meta": seg.meta,
        }
        print(json.dumps(seg_info, indent=2, default=str))
        return 0
    ck = load_any(args.checkpoint)
    info = {
        "path": str(args.checkpoint),
        "sha256": ck.sha256,
        "classes": list(ck.info.class_names),
        "net": ck.info.net.to_dict(),
        "bg_threshold": ck.info.bg_threshold,
        "network_type": ck.info.network_type,
        "banks": sorted(ck.banks) if ck.banks else [],
        "meta": ck.meta,
    }
    print(json.dumps(info, indent=2, default=str))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import logging

    from hsc.training.config import config_from_args
    from hsc.training.train_hsc import train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    final = train(config_from_args(args))
    print(f"wrote {final}")
    return 0


def _cmd_train_seg(args: argparse.Namespace) -> int:
    import logging

    from hsc.training.seg_config import seg_config_from_args
    from hsc.training.train_seg import train_seg

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    final = train_seg(seg_config_from_args(args))
    print(f"wrote {final}")
    return 0


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from hsc.training.synth import run_synth

    return run_synth(args)


def _report_dataset_run(s: dict[str, Any], out: Path) -> int:
    """Print the counts of an ``hsc infer``/``hsc segment`` run; exit status 3 when images failed."""
    print(
        f"{s['done']} done, {s['skipped_existing']} already there, {s['failed']} failed of {s['total']}; "
        f"summary in {out / 'summary.json'}"
    )
    for f in s["failures"][:20]:
        print(f"  failed {f['id']}: {f['error']}", file=sys.stderr)
    return 0 if s["failed"] == 0 else 3


def _cmd_infer(args: argparse.Namespace) -> int:
    from hsc.core.settings import WINOGRAD_CHOICES
    from hsc.training.pseudo_labels import run_infer

    s = run_infer(
        args.checkpoint,
        args.data,
        args.out,
        split=args.split,
        crf=args.crf,
        bg_threshold=args.bg_threshold,
        device=args.device,
        fast=args.fast,
        heatmaps=not args.no_heatmaps,
        crf_workers=args.crf_workers,
        batch_images=args.batch_images,
        winograd=WINOGRAD_CHOICES[args.winograd],
        compile=args.compile,
        progress=not args.quiet,
    )
    return _report_dataset_run(s, Path(args.out))


def _scales(text: str) -> tuple[float, ...]:
    """argparse type: a comma-separated list of positive resize rates, e.g. ``0.5,1,1.5``."""
    try:
        rates = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not rates or any(not (r > 0 and r != float("inf")) for r in rates):
        raise argparse.ArgumentTypeError(f"need one or more finite rates > 0, got {text!r}")
    return rates


def _cmd_segment(args: argparse.Namespace) -> int:
    from hsc.training.segment import DEFAULT_SCALES, segment_dataset

    s = segment_dataset(
        args.checkpoint,
        args.data,
        args.out,
        split=args.split,
        scales=args.scales or DEFAULT_SCALES,
        flip=not args.no_flip,
        crf=not args.no_crf,
        device=args.device,
        progress=not args.quiet,
    )
    return _report_dataset_run(s, Path(args.out))


def _cmd_eval(args: argparse.Namespace) -> int:
    from hsc.training.report import run_eval

    r = run_eval(args.data, args.split, args.masks, args.cams, args.json, args.plot)
    line = f"mIoU {r['miou']:.2f}% over {r['n_images']} images"
    if r["mode"] == "cams":
        line += f" at the best background threshold {r['best_threshold']:.2f}"
    print(line)
    print(f"wrote {args.json}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def _settings_from(args: argparse.Namespace, fields: Sequence[str]) -> Any:
    """Settings from the environment (``HSC_*``), with the flags that were given on top."""
    from hsc.core.settings import Settings

    overrides = {f: getattr(args, f) for f in fields if getattr(args, f, None) not in (None, [])}
    return Settings(**overrides)


SERVE_FIELDS = (
    "host",
    "port",
    "checkpoints",
    "redis_url",
    "results_dir",
    "device",
    "embedded_workers",
    "torch_threads",
)
WORKER_FIELDS = (
    "checkpoints",
    "redis_url",
    "results_dir",
    "device",
    "worker_concurrency",
    "worker_pool",
    "queue",
    "torch_threads",
)
GATEWAY_FIELDS = tuple(f for f in SERVE_FIELDS if f != "port")


def _cmd_serve(args: argparse.Namespace) -> int:
    from hsc.service.main import run_server

    settings = _settings_from(args, SERVE_FIELDS)
    if args.fast:
        settings = settings.model_copy(update={"mode": "fast"})
    return run_server(settings)


def _cmd_cvat_gateway(args: argparse.Namespace) -> int:
    from hsc.service.cvat import run_cvat_gateway

    settings = _settings_from(args, GATEWAY_FIELDS)
    if args.fast:
        settings = settings.model_copy(update={"mode": "fast"})
    return run_cvat_gateway(settings, host=args.host, port=args.port)


def _cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings_from(args, WORKER_FIELDS)
    if args.fast:
        settings = settings.model_copy(update={"mode": "fast"})
    if not settings.redis_url:
        raise ValueError("a worker needs a broker: set HSC_REDIS_URL or pass --redis-url redis://HOST:6379/0")
    from hsc.worker.main import run_worker

    return run_worker(settings, hostname=args.hostname)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hsc",
        description="HSC pseudo-labels for weakly supervised semantic segmentation: CAMs and masks "
        "from image-level tags (Hierarchical Semantic Contrast, IJCAI 2023).",
    )
    p.add_argument("--version", action="version", version=f"hsc {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser(
        "demo",
        help="smoke run: CAMs and a mask for a generated image with a random small network",
        description="Smoke run of the whole CAM pipeline (multi-scale + flip CAM, threshold mask, "
        "dense CRF) on a generated image with a RANDOMLY INITIALISED width-0.125 network. It checks "
        "that the installation works; the mask it draws is meaningless.",
    )
    d.add_argument("--out", default="hsc-demo", help="output folder (default: %(default)s)")
    d.add_argument(
        "--width", type=float, default=0.125, help="backbone width multiplier (default: %(default)s)"
    )
    d.add_argument("--size", default="200x150", help="generated image size WxH (default: %(default)s)")
    d.add_argument(
        "--seed", type=int, default=0, help="seed of the image and the weights (default: %(default)s)"
    )
    d.add_argument("--no-crf", action="store_true", help="skip the dense CRF")
    d.set_defaults(handler=_cmd_demo)

    c = sub.add_parser(
        "convert",
        help="convert the authors' HSC_eps_v2.pth into our safetensors checkpoint",
        description="Convert an official HSC state dict (.pth, with or without 'module.' prefix) into "
        "an hsc checkpoint (.safetensors with metadata). Loads with weights_only=True; never runs pickles.",
    )
    c.add_argument("src", help="official checkpoint, e.g. HSC_eps_v2.pth")
    c.add_argument("dst", help="output .safetensors file")
    c.add_argument(
        "--classes", help="classes.txt (one name a line, optional 'background' first); default VOC"
    )
    c.add_argument("--bg-threshold", type=float, default=0.22, help="background score (default: %(default)s)")
    c.set_defaults(handler=_cmd_convert)

    t = sub.add_parser(
        "train",
        help="step 1: train the HSC classifier on a dataset with image-level labels",
        description="Train HSC (or its SEAM/EPS baseline) on a VOC-layout dataset or a manifest and write "
        "RUN/final.safetensors. Defaults are the official code's; --config FILE (JSON) applies first and "
        "the flags given override it.",
    )
    from hsc.training.config import add_train_arguments

    add_train_arguments(t)
    t.set_defaults(handler=_cmd_train)

    ts = sub.add_parser(
        "train-seg",
        help="step 2: train the DeepLab segmentation network on pseudo-labels",
        description="Train the official step-2 network (deep-stem dilated ResNet-101 + ASPP) on the "
        "images of a dataset and a folder of label PNGs (hsc infer's PRED/masks, or 'gt'), and write "
        "RUN/final.safetensors for hsc segment. Defaults are the official code's; --config FILE (JSON) "
        "applies first and the flags given override it.",
    )
    from hsc.training.seg_config import add_seg_train_arguments

    add_seg_train_arguments(ts)
    ts.set_defaults(handler=_cmd_train_seg)

    data = sub.add_parser("data", help="dataset tools", description="Dataset tools.")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    synth = data_sub.add_parser(
        "synth",
        help="write a synthetic VOC-layout dataset with known pixel truth (tests, benchmarks)",
        description="Write a synthetic dataset in VOC layout (plus classes.txt, a manifest and imperfect "
        "saliency maps) whose images hold the failure modes CAMs are known for. For tests and benchmarks.",
    )
    from hsc.training.synth import add_synth_arguments

    add_synth_arguments(synth)
    synth.set_defaults(handler=_cmd_data_synth)

    inf = sub.add_parser(
        "infer",
        help="pseudo-labels (masks, CAMs, heatmaps) for every image of a dataset split",
        description="Run the multi-scale + flip CAM pipeline over a VOC list or a manifest and write "
        "PRED/masks/<id>.png (VOC palette), PRED/cams/<id>.npz, PRED/heatmaps/<id>/<class>.jpg and "
        "PRED/summary.json. Resumable: finished images are skipped. A bad image is reported and skipped. "
        "Exit status 3 when some images failed.",
    )
    inf.add_argument("--checkpoint", required=True, help="our .safetensors checkpoint or the official .pth")
    inf.add_argument("--data", required=True, help="dataset (VOC root or manifest) with image-level labels")
    inf.add_argument("--out", required=True, help="output folder PRED")
    inf.add_argument("--split", help="list to run on (VOC: ImageSets/Segmentation/<split>.txt)")
    inf.add_argument("--crf", action="store_true", help="masks from the dense CRF (t=8, alpha=7)")
    inf.add_argument("--bg-threshold", type=float, help="background score (default: the checkpoint's)")
    inf.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    inf.add_argument("--fast", action="store_true", help="bf16/fp16 autocast + channels_last (not bit-exact)")
    inf.add_argument("--no-heatmaps", action="store_true", help="do not write heatmap images")
    inf.add_argument(
        "--crf-workers", type=int, default=1, help="CRF processes beside the network (default: 1)"
    )
    inf.add_argument(
        "--batch-images",
        type=_positive_int,
        help="images of one size per network batch (default: 4 on CUDA, 1 on the CPU)",
    )
    inf.add_argument(
        "--winograd",
        choices=("auto", "on", "off"),
        default="auto",
        help="Winograd for the wide 3x3 convolutions on the CPU (default auto: the exact mode always, "
        "the fast mode where it pays; off: 1.25 GB less memory at width 1.0)",
    )
    inf.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the network first (tens of seconds once, then 10-20 %% faster per image on CPU)",
    )
    inf.add_argument("--quiet", action="store_true", help="no progress bar")
    inf.set_defaults(handler=_cmd_infer)

    sg = sub.add_parser(
        "segment",
        help="step 2: label maps from a DeepLab checkpoint for every image of a dataset split",
        description="Run the step-2 test-time pipeline (multi-scale + flip mean of the logits, softmax, "
        "dense CRF) over a VOC list or a manifest and write PRED/masks/<id>.png (VOC palette, 0 = "
        "background; score them with hsc eval --masks) and PRED/summary.json. Resumable: finished "
        "images are skipped. A bad image is reported and skipped. Exit status 3 when some images failed.",
    )
    sg.add_argument(
        "--checkpoint", required=True, help="our step-2 .safetensors segmenter or the official step-2 .pth"
    )
    sg.add_argument(
        "--data", required=True, help="dataset (VOC root or manifest); its classes must be the checkpoint's"
    )
    sg.add_argument("--out", required=True, help="output folder PRED")
    sg.add_argument("--split", help="list to run on (VOC: ImageSets/Segmentation/<split>.txt)")
    sg.add_argument(
        "--scales",
        type=_scales,
        help="comma-separated resize rates (default: the official 0.5,0.75,1,1.25,1.5,1.75)",
    )
    sg.add_argument("--no-flip", action="store_true", help="do not add the width-flipped copies")
    sg.add_argument("--no-crf", action="store_true", help="argmax of the softmax, without the dense CRF")
    sg.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    sg.add_argument("--quiet", action="store_true", help="no progress bar")
    sg.set_defaults(handler=_cmd_segment)

    e = sub.add_parser(
        "eval",
        help="mIoU of pseudo-label masks or CAMs against the ground truth",
        description="Score masks (PRED/masks/<id>.png) or CAMs (PRED/cams/<id>.npz) against a dataset's "
        "ground-truth masks: mIoU over all classes (background included, ignore label 255), per-class "
        "IoU, precision, recall, confusion matrix. For CAMs, the background-threshold sweep 0.00..0.59 "
        "with the best threshold (the paper's 'Seed').",
    )
    e.add_argument("--data", required=True, help="dataset with ground-truth masks (VOC root or manifest)")
    e.add_argument("--split", help="list to evaluate (default: the dataset's default)")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--masks", help="folder of <id>.png label maps")
    src.add_argument("--cams", help="folder of <id>.npz CAM files written by hsc infer")
    e.add_argument("--json", required=True, help="report file (JSON with top-level 'miou')")
    e.add_argument("--plot", help="PNG of the mIoU-vs-threshold curve (with --cams)")
    e.set_defaults(handler=_cmd_eval)

    i = sub.add_parser(
        "info", help="print what a checkpoint holds", description="Print a checkpoint's metadata."
    )
    i.add_argument("checkpoint", help="our .safetensors checkpoint or an official .pth")
    i.set_defaults(handler=_cmd_info)

    sv = sub.add_parser(
        "serve",
        help="serve pseudo-labels over HTTP (embedded pool, or Celery workers when a broker is set)",
        description="Start the REST API (OpenAPI at /docs). Without a broker (HSC_REDIS_URL / --redis-url) "
        "the model runs in a local process pool and job records live under the results folder; with one, "
        "`hsc worker` processes do the work. Every option also reads its HSC_* environment variable "
        "(README 'Settings'); flags win.",
    )
    sv.add_argument("--host", help="listen address (HSC_HOST, default 127.0.0.1)")
    sv.add_argument("--port", type=int, help="listen port (HSC_PORT, default 8000)")
    sv.add_argument(
        "--workers", dest="embedded_workers", type=int, help="embedded pool processes (HSC_EMBEDDED_WORKERS)"
    )
    w = sub.add_parser(
        "worker",
        help="run a Celery worker that computes pseudo-labels for the API (needs Redis)",
        description="Start a Celery worker on the broker HSC_REDIS_URL: it loads the checkpoints once, "
        "announces them to the API, and runs single-image and job-chunk tasks. On CUDA keep the solo pool "
        "and run one worker per GPU (CUDA_VISIBLE_DEVICES).",
    )
    w.add_argument("--concurrency", dest="worker_concurrency", type=int, help="HSC_WORKER_CONCURRENCY")
    w.add_argument(
        "--pool", dest="worker_pool", choices=("solo", "prefork", "threads"), help="HSC_WORKER_POOL"
    )
    w.add_argument("--queue", help="queue to read (HSC_QUEUE, default hsc)")
    w.add_argument("--hostname", help="Celery node name (default: hsc@<this host's name>)")
    cg = sub.add_parser(
        "cvat-gateway",
        help="serve the models to CVAT as serverless detector functions (no Nuclio needed)",
        description="Answer the part of the Nuclio API that CVAT's lambda manager uses, so that CVAT's "
        "'Automatic annotation' runs hsc models; each frame gets labels=auto (the model's classifier picks "
        "the classes). On CVAT's side: CVAT_SERVERLESS=1, CVAT_NUCLIO_HOST=<this host>, "
        "CVAT_NUCLIO_PORT=<--port>, a CVAT_NUCLIO_DEFAULT_TIMEOUT above one frame's time. It checks no API "
        "key (CVAT sends none): keep it on an internal network. Same settings as `hsc serve`.",
    )
    cg.add_argument("--host", help="listen address (HSC_HOST, default 127.0.0.1)")
    cg.add_argument("--port", type=int, default=8070, help="listen port (default: %(default)s)")
    for sp in (sv, w, cg):
        sp.add_argument(
            "--checkpoint",
            dest="checkpoints",
            action="append",
            help="checkpoint to serve (repeatable; HSC_CHECKPOINTS; default: the shipped demo checkpoint)",
        )
        sp.add_argument("--redis-url", help="broker and job records, e.g. redis://localhost:6379/0")
        sp.add_argument("--results-dir", help="job outputs and embedded job records (HSC_RESULTS_DIR)")
        sp.add_argument("--device", help="auto, cpu, cuda or cuda:N (HSC_DEVICE)")
        sp.add_argument("--fast", action="store_true", help="bf16/fp16 autocast (HSC_MODE=fast)")
        sp.add_argument(
            "--threads",
            dest="torch_threads",
            type=int,
            help="CPU threads per model process (HSC_TORCH_THREADS; default: the CPUs shared among them)",
        )
    cg.add_argument(
        "--workers", dest="embedded_workers", type=int, help="embedded pool processes (HSC_EMBEDDED_WORKERS)"
    )
    sv.set_defaults(handler=_cmd_serve)
    cg.set_defaults(handler=_cmd_cvat_gateway)
    w.set_defaults(handler=_cmd_worker)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"hsc {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
