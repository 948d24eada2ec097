"""Per-layer time and error of Winograd (:mod:`hsc.model.winograd`) against the direct convolution,
on the 3x3 layers of the real network at the shapes one image's CAM pass gives them.

One ``forward_cam`` of the HSC network (seeded random weights, ``--width``) at each ``--scales``
of a ``--size`` image records the input of every 3x3 stride-1 same-size convolution. For each distinct
(channels, dilation, size) it times, in ``--dtype`` (bfloat16: the fast mode, F(2x2, 3x3); float32:
the exact mode, F(4x4, 3x3); ``--tile`` to choose), oneDNN's direct convolution against
:func:`winograd_conv3x3` on channels_last inputs (median of ``--repeat``), and measures both results'
error against a float64 convolution (mean and max of ``|y - y64|``, relative to the mean ``|y64|``).
Rows marked ``*`` are the ones :func:`use_winograd` replaces (both channel counts >= ``MIN_CHANNELS``
in bfloat16, ``MIN_CHANNELS_FP32`` in float32: the Predictor's rule).
The last line sums the network's 3x3 time both ways.

Run from the repository root::

    python benchmarks/bench_winograd.py --width 1.0 --scales 1.0 --threads 2
    python benchmarks/bench_winograd.py --width 1.0 --scales 0.5,1.0,1.5,2.0 --dtype float32
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from typing import Any


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=float, default=1.0, help="network width multiplier (1.0 = HSC)")
    ap.add_argument("--size", default="500x375", help="image size WxH (VOC: 500x375)")
    ap.add_argument("--scales", default="1.0", help="image scales, comma-separated")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument(
        "--tile",
        type=int,
        choices=(0, 2, 4),
        default=0,
        help="F(m x m, 3x3); 0: the Predictor's (fp32 4, bf16 2)",
    )
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per layer (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torch import nn

    from hsc.model.hsc_net import build_hsc_net
    from hsc.model.winograd import (
        MIN_CHANNELS,
        MIN_CHANNELS_FP32,
        eligible,
        winograd_conv3x3,
        winograd_weights,
    )

    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    min_channels = MIN_CHANNELS if dtype == torch.bfloat16 else MIN_CHANNELS_FP32
    tile = a.tile or (2 if dtype == torch.bfloat16 else 4)
    w, h = (int(v) for v in a.size.lower().split("x"))
    scales = [float(s) for s in a.scales.split(",") if s]
    torch.manual_seed(0)
    net = build_hsc_net(width=a.width).eval()

    seen: Counter[tuple[Any, ...]] = Counter()
    convs: dict[tuple[Any, ...], nn.Conv2d] = {}

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        assert isinstance(module, nn.Conv2d)
        _, c, hh, ww = inputs[0].shape
        key = (c, module.out_channels, module.dilation[0], hh, ww)
        seen[key] += 1
        convs.setdefault(key, module)

    hooks = [m.register_forward_pre_hook(record) for m in net.modules() if eligible(m, min_channels=1)]
    with torch.inference_mode():
        for s in scales:
            net.forward_cam(torch.randn(1, 3, round(h * s), round(w * s)))
    for hk in hooks:
        hk.remove()

    def timed(fn: Any, *args: Any) -> float:
        fn(*args)
        runs = []
        for _ in range(a.repeat):
            t = time.perf_counter()
            fn(*args)
            runs.append(time.perf_counter() - t)
        return statistics.median(runs)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.dtype}, width {a.width}, "
        f"{w}x{h} at scales {scales}; Winograd F({tile}x{tile}, 3x3) from {min_channels} channels"
    )
    print(
        f"{'':2}{'c_in':>5}{'c_out':>6}{'dil':>4}{'size':>10}{'n':>3}{'direct ms':>11}{'wino ms':>10}"
        f"{'speed-up':>9}{'err direct':>12}{'err wino':>10}{'max direct':>12}{'max wino':>10}"
    )
    total_direct = total_mixed = 0.0
    with torch.inference_mode():
        for key in sorted(seen, key=lambda k: (k[0], k[1], -k[3])):
            c, c_out, d, hh, ww = key
            conv = convs[key]
            weight = conv.weight
            x = torch.randn(1, c, hh, ww).to(memory_format=torch.channels_last)
            xd, wd = x.to(dtype), weight.to(dtype).contiguous(memory_format=torch.channels_last)
            u = winograd_weights(weight, dtype, tile)
            t_direct = timed(F.conv2d, xd, wd, None, 1, d, d)
            t_wino = timed(winograd_conv3x3, xd, u, d)
            y64 = F.conv2d(x.double(), weight.double(), None, 1, d, d)
            scale = float(y64.abs().mean())
            err = {}
            for name, y in (
                ("direct", F.conv2d(xd, wd, None, 1, d, d)),
                ("wino", winograd_conv3x3(xd, u, d)),
            ):
                diff = (y.double() - y64).abs()
                err[name] = (float(diff.mean()) / scale, float(diff.max()) / scale)
            used = eligible(conv, min_channels)
            n = seen[key]
            total_direct += n * t_direct
            total_mixed += n * (t_wino if used else t_direct)
            print(
                f"{'*' if used else '':2}{c:>5}{c_out:>6}{d:>4}{f'{ww}x{hh}':>10}{n:>3}"
                f"{1e3 * t_direct:>11.2f}{1e3 * t_wino:>10.2f}{t_direct / t_wino:>8.2f}x"
                f"{err['direct'][0]:>12.2e}{err['wino'][0]:>10.2e}{err['direct'][1]:>12.2e}{err['wino'][1]:>10.2e}"
            )
    print(
        f"3x3 layers of one pass per scale: direct {total_direct:.3f} s, with Winograd where used "
        f"{total_mixed:.3f} s ({total_direct / total_mixed:.2f}x)"
    )


if __name__ == "__main__":
    main()
