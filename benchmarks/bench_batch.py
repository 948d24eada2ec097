"""Images per second of a job's network stage against ``batch_images`` (images of one size sharing the
network's forwards, :meth:`hsc.model.predictor.Predictor.predict_many`).

For each batch size the same generated images (VOC size by default) go through ``predict_many``
(4 scales x flip, no CRF: the CRF runs in other processes beside the network and does not depend on
the batch), after a warm-up batch. Printed per batch size: images/s, seconds per image, peak CUDA
memory (on a GPU), and the largest CAM difference against batch size 1 (batched convolutions may
pick other algorithms: last bits of float32; fp16/bf16 in the fast mode).

Run from the repository root::

    python benchmarks/bench_batch.py --device cuda --width 1.0 --images 32 --batches 1,2,4,8
    python benchmarks/bench_batch.py --device cpu --width 0.125 --images 8 --batches 1,2,4
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--mode", default="exact", choices=("exact", "fast"))
    ap.add_argument("--width", type=float, default=1.0, help="network width multiplier (1.0 = HSC)")
    ap.add_argument("--images", type=int, default=16, help="images per batch size")
    ap.add_argument("--size", default="500x375", help="image size WxH (VOC: 500x375)")
    ap.add_argument("--batches", default="1,2,4,8", help="batch_images values, comma-separated")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = ap.parse_args(argv)

    import torch

    from hsc.model.classes import VOC_CLASSES
    from hsc.model.config import ModelInfo
    from hsc.model.hsc_net import build_hsc_net
    from hsc.model.predictor import Predictor
    from hsc.training.demo import generated_image

    if a.threads:
        torch.set_num_threads(a.threads)
    w, h = (int(v) for v in a.size.lower().split("x"))
    batches = [int(b) for b in a.batches.split(",") if b]
    torch.manual_seed(0)
    net = build_hsc_net(width=a.width)
    p = Predictor(net, ModelInfo(net=net.cfg, class_names=VOC_CLASSES), device=a.device, mode=a.mode)
    cuda = p.device.type == "cuda"
    images = [generated_image(w, h, seed=i) for i in range(a.images)]
    labels = [("dog", "person"), ("car",), ("cat", "sofa", "chair")]
    items = [(img, labels[i % len(labels)]) for i, img in enumerate(images)]
    print(
        f"torch {torch.__version__}, device {p.device}"
        + (f" ({torch.cuda.get_device_name(p.device)})" if cuda else f", {torch.get_num_threads()} threads")
        + f", mode {a.mode}, width {a.width}, {a.images} images {w}x{h}, 4 scales x flip, no CRF"
    )
    print(f"{'batch':>6}{'images/s':>10}{'s/image':>10}{'peak GiB':>10}{'max |dCAM|':>12}")
    ref: list[np.ndarray] | None = None
    for b in batches:
        list(p.predict_many(items[:b], batch_images=b, outputs={"cams"}))  # warm-up (and cuDNN choice)
        if cuda:
            torch.cuda.synchronize(p.device)
            torch.cuda.reset_peak_memory_stats(p.device)
        t0 = time.perf_counter()
        cams = [r.cams for r in p.predict_many(items, batch_images=b, outputs={"cams"})]
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(p.device) / 2**30 if cuda else float("nan")
        if ref is None:
            ref = cams  # type: ignore[assignment]
        assert ref is not None
        diff = max(float(np.abs(x - y).max()) for x, y in zip(cams, ref))  # type: ignore[operator]
        print(f"{b:>6}{a.images / dt:>10.2f}{dt / a.images:>10.3f}{peak:>10.2f}{diff:>12.2e}")


if __name__ == "__main__":
    main()
