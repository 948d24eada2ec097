"""Winograd F(2x2, 3x3) and F(4x4, 3x3) convolutions for the CPU.

A 3x3 convolution computes each output pixel from 9 products per input channel. Winograd's minimal
filtering algorithm F(m x m, 3x3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural
Networks", CVPR 2016) computes an m x m block of outputs from an (m + 2) x (m + 2) block of inputs
with (m + 2)^2 products: F(2x2, 3x3) 16 instead of 36 (2.25x fewer multiply-adds), F(4x4, 3x3) 36
instead of 144 (4x fewer); the rest is cheap additions (the input and output transforms). The
products become (m + 2)^2 batched matrix products ``(tiles x C_in) @ (C_in x C_out)``, which oneDNN
runs near the core's peak, as it runs its direct convolutions.

Dilated 3x3 convolutions (b5-b7 of ResNet-38d, dilation 2 and 4) are handled without a polyphase
split: the m x m output block of a dilation-``d`` convolution is the outputs ``(y + i*d, x + j*d)``,
``0 <= i, j < m``, and its input block the inputs at offsets ``{-d, 0, d, ..., m*d}``. Blocks start at
rows ``m*d*k + r`` (``0 <= r < d``), so every output is in exactly one block.

Numerics: exact in exact arithmetic. In float32, F(2x2, 3x3) equals a direct convolution to ~5e-7 of
the output's mean magnitude (its error against float64 is below the direct convolution's), and
F(4x4, 3x3), whose transforms have coefficients up to 8 and 1/24, to ~2e-6 (about twice the direct
convolution's own rounding); both far below the golden file's 1e-4 on the CAMs. In bfloat16 the
transformed inputs and the block products are rounded to bfloat16, which roughly doubles the error of
a direct bfloat16 convolution with F(2x2, 3x3) (~9e-3 instead of ~4e-3 of the output's range on random
data), so the fast mode keeps that tile. The modes' agreement is measured end to end by
``benchmarks/bench_inference.py``.

The rows of blocks go through the transforms and products in chunks of about ``BLOCK_BYTES`` of
transformed tiles, which stay in the caches (unchunked, the transforms' memory traffic eats most of the
gain).

Where it is used (:class:`~hsc.model.predictor.Predictor`, :func:`use_winograd`; measured with
``benchmarks/bench_winograd.py`` and ``benchmarks/bench_inference.py``, 2 threads):

* the exact mode (float32), F(4x4, 3x3) on the 3x3 layers with 256 or more channels, by default on
  every CPU: on an AMD EPYC those layers take 1.8-3.5x less time than oneDNN's direct convolution
  (F(2x2, 3x3): 1.2-1.8x). The transformed filters take 4x the memory of the 3x3 weights they replace
  (1.25 GB at width 1.0).
* the fast mode (bfloat16), F(2x2, 3x3) on the 3x3 layers with 256 or more channels, by default only
  where it pays (:func:`pays_on_this_cpu`): a CPU with AVX-512 bfloat16 instructions but no AMX tiles.
  AMX (Intel Sapphire Rapids and later) runs oneDNN's direct bfloat16 convolution several times faster
  than AVX-512 does (measured: 5.5 ms instead of 25 ms for 256 -> 256 channels at 125x94), and the
  batched products cannot catch up with it there.

On CUDA cuDNN picks its own algorithms; nothing here runs there.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# F(m x m, 3x3): Y = A^T [(G g G^T) * (B^T d B)] A, tiles of m + 2 inputs. G by output tile m; B^T and
# A^T are applied by _bt2/_at2 and _bt4/_at4 (interpolation points 0, -1, 1 and 0, +-1, +-2: Lavin and
# Gray's matrices).
_G = {
    2: ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)),
    4: (
        (1 / 4, 0.0, 0.0),
        (-1 / 6, -1 / 6, -1 / 6),
        (-1 / 6, 1 / 6, -1 / 6),
        (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6),
        (0.0, 0.0, 1.0),
    ),
}
TILES = tuple(_G)

# Below this many input and output channels the batched products are too thin to beat oneDNN's
# direct convolution (measured: 128 -> 128 channels at 188x250 is 1.3x slower; 256 -> 256 at 94x125
# is 1.3x faster).
MIN_CHANNELS = 256
# The exact mode's float32 F(4x4, 3x3) (AMD EPYC, 2 threads, 32 MiB chunks): 128 -> 128 at 500x375
# 1.1-1.2x (too close to call), 256 -> 256 at 250x188 1.8x, 512 -> 512 at 125x94 2.3x, 1024 -> 512
# 3.5x, 1024 -> 2048 2.7x faster than oneDNN's direct convolution (``benchmarks/bench_winograd.py``).
MIN_CHANNELS_FP32 = 256
# Chunk size of the transformed tiles (winograd_conv3x3's block_bytes), by tile. F(2x2, 3x3): on an
# AMX Xeon 1-16 MiB all beat one chunk for the whole image (fp32, 512 -> 512 at 125x94: 105 ms at
# 4 MiB against 180 ms unchunked and 162 ms direct); on the EPYC bfloat16 16 MiB beats 4 MiB by
# 10-20 %. F(4x4, 3x3), float32, EPYC: 32 MiB is 1.3-2x faster than 4 MiB (each chunk streams all the
# (C_in x C_out) filters; small chunks make short, filter-bound matrix products), 64-128 MiB no better.
BLOCK_BYTES = {2: 1 << 24, 4: 1 << 25}


def pays_on_this_cpu() -> bool:
    """Whether Winograd beats oneDNN's direct bfloat16 convolution on this CPU: AVX-512 bfloat16
    without AMX tiles (``benchmarks/bench_winograd.py`` measures it)."""
    cpu = torch.cpu
    amx = getattr(cpu, "_is_amx_tile_supported", None)
    bf16 = getattr(cpu, "_is_avx512_bf16_supported", None)
    if amx is None or bf16 is None:  # a torch without the probes: keep oneDNN's own choice
        return False
    return bool(bf16()) and not bool(amx())


def winograd_weights(weight: Tensor, dtype: torch.dtype | None = None, tile: int = 2) -> Tensor:
    """The transformed filters ``G g G^T`` of a ``(C_out, C_in, 3, 3)`` weight for F(tile x tile,
    3x3), laid out for the batched product: ``((tile + 2)^2, C_in, C_out)``, computed in the weight's
    precision (at least float32) and stored as ``dtype`` (default: the weight's)."""
    if weight.dim() != 4 or weight.shape[2:] != (3, 3):
        raise ValueError(f"expected a (C_out, C_in, 3, 3) weight, got {tuple(weight.shape)}")
    if tile not in _G:
        raise ValueError(f"tile must be one of {list(TILES)}, got {tile!r}")
    # float64 for float32 weights would make b7's filters a 600 MB transient, for no visible gain
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    g = torch.tensor(_G[tile], dtype=work, device=weight.device)
    u = torch.einsum("ak,oikl,bl->abio", g, weight.detach().to(work), g)  # (T, T, C_in, C_out)
    t = tile + 2
    return u.reshape(t * t, weight.shape[1], weight.shape[0]).to(dtype or weight.dtype).contiguous()


def tile_of(u: Tensor) -> int:
    """The output tile ``m`` of transformed filters from :func:`winograd_weights` (``(m + 2)^2`` rows)."""
    for m in TILES:
        if u.dim() == 3 and u.shape[0] == (m + 2) ** 2:
            return m
    raise ValueError(f"not Winograd filters: {tuple(u.shape)}")


def _taps(t: Tensor, dim: int, d: int, n: int, m: int) -> list[Tensor]:
    """The ``m + 2`` input taps of every block along ``dim``: views of shape ``(..., n, d, ...)`` of
    the rows ``m*d*i + r + k*d`` (block ``i``, phase ``r``) for ``k = 0..m+1``."""
    return [
        t.narrow(dim, k * d, m * d * n).unflatten(dim, (n, m, d)).select(dim + 1, 0) for k in range(m + 2)
    ]


Out = list[Tensor] | None


def _new(like: Tensor, out: Out, count: int) -> list[Tensor]:
    return out if out is not None else [like.new_empty(like.shape) for _ in range(count)]


def _bt2(d: list[Tensor], out: Out = None) -> list[Tensor]:
    """B^T of F(2x2, 3x3) along the taps ``d`` (4 -> 4)."""
    o = _new(d[0], out, 4)
    torch.sub(d[0], d[2], out=o[0])
    torch.add(d[1], d[2], out=o[1])
    torch.sub(d[2], d[1], out=o[2])
    torch.sub(d[1], d[3], out=o[3])
    return o


def _at2(m: list[Tensor], out: Out = None) -> list[Tensor]:
    """A^T of F(2x2, 3x3) (4 -> 2)."""
    o = _new(m[0], out, 2)
    torch.add(m[0], m[1], out=o[0]).add_(m[2])
    torch.sub(m[1], m[2], out=o[1]).sub_(m[3])
    return o


def _bt4(d: list[Tensor], out: Out = None) -> list[Tensor]:
    """B^T of F(4x4, 3x3) along the taps ``d`` (6 -> 6), with its common subexpressions shared."""
    o = _new(d[0], out, 6)
    torch.add(d[4], d[0], alpha=4, out=o[0]).add_(d[2], alpha=-5)
    torch.add(d[5], d[1], alpha=4, out=o[5]).add_(d[3], alpha=-5)
    a = torch.add(d[4], d[2], alpha=-4)
    b = torch.add(d[3], d[1], alpha=-4)
    torch.add(a, b, out=o[1])
    torch.sub(a, b, out=o[2])
    torch.sub(d[4], d[2], out=a)
    torch.sub(d[3], d[1], out=b)
    torch.add(a, b, alpha=2, out=o[3])
    torch.add(a, b, alpha=-2, out=o[4])
    return o


def _at4(m: list[Tensor], out: Out = None) -> list[Tensor]:
    """A^T of F(4x4, 3x3) (6 -> 4)."""
    o = _new(m[0], out, 4)
    a = m[1] + m[2]
    b = m[1] - m[2]
    c = m[3] + m[4]
    e = m[3] - m[4]
    torch.add(m[0], a, out=o[0]).add_(c)
    torch.add(b, e, alpha=2, out=o[1])
    torch.add(a, c, alpha=4, out=o[2])
    torch.add(b, e, alpha=8, out=o[3]).add_(m[5])
    return o


_TRANSFORMS = {2: (_bt2, _at2), 4: (_bt4, _at4)}


def winograd_conv3x3(
    x: Tensor,
    u: Tensor,
    dilation: int = 1,
    bias: Tensor | None = None,
    block_bytes: int | None = None,
) -> Tensor:
    """``F.conv2d(x, w, bias, padding=dilation, dilation=dilation)`` by Winograd F(m x m, 3x3).

    Args:
        x: ``(N, C_in, H, W)``; fastest in channels_last memory (the result is channels_last too).
        u: :func:`winograd_weights` of ``w`` (its tile ``m``, 2 or 4, follows from its shape), same
            dtype as ``x``.
        dilation: the convolution's dilation (and padding: the output has the input's size).
        bias: optional ``(C_out,)``.
        block_bytes: rows of blocks are transformed, multiplied and transformed back in chunks whose
            transformed tiles take about this many bytes, so they stay in the CPU's caches (default:
            ``BLOCK_BYTES[m]``).
    """
    n, c, h, w = x.shape
    m = tile_of(u)
    if u.shape[1] != c:
        raise ValueError(f"weights {tuple(u.shape)} do not fit an input with {c} channels")
    d = int(dilation)
    c_out = u.shape[2]
    nh, nw = math.ceil(h / (m * d)), math.ceil(w / (m * d))
    # N, H, W, C view; zero padding: d before, and enough after for the last block's m + 2 taps
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, d, m * d * nw - w + m * d, d, m * d * nh - h + m * d))
    y = x.new_empty((n, nh, m, d, nw, m, d, c_out))
    row_bytes = (m + 2) ** 2 * n * d * nw * d * max(c, c_out) * x.element_size()
    step = max(1, (block_bytes or BLOCK_BYTES[m]) // row_bytes)
    for i0 in range(0, nh, step):
        nb = min(step, nh - i0)
        _blocks(xp.narrow(1, m * d * i0, m * d * nb + (m + 1) * d), u, d, m, nb, nw, y[:, i0 : i0 + nb])
    out = y.view(n, m * d * nh, m * d * nw, c_out)[:, :h, :w]
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def _blocks(xp: Tensor, u: Tensor, d: int, m: int, nh: int, nw: int, y: Tensor) -> None:
    """``nh`` rows of blocks: padded NHWC input rows ``xp`` -> ``y`` (N, nh, m, d, nw, m, d, C_out)."""
    n, c, c_out = xp.shape[0], xp.shape[3], u.shape[2]
    t = m + 2
    bt, at = _TRANSFORMS[m]
    rows = bt(_taps(xp, 1, d, nh, m))  # B^T along the height: each (N, nh, d, Wp, C)
    v = xp.new_empty((t, t, n, nh, d, nw, d, c))
    for a, row in enumerate(rows):
        bt(_taps(row, 3, d, nw, m), out=list(v[a]))  # B^T along the width
    p = n * nh * d * nw * d
    prod = torch.bmm(v.view(t * t, p, c), u).view(t, t, n, nh, d, nw, d, c_out)
    for i, s in enumerate(at(list(prod))):  # A^T along the height: each (T, N, nh, d, nw, d, C_out)
        at(list(s), out=[y[:, :, i, :, :, j] for j in range(m)])  # A^T along the width


def eligible(conv: nn.Module, min_channels: int = MIN_CHANNELS) -> bool:
    """Whether ``conv`` is a 3x3, stride-1, same-size (padding == dilation), ungrouped, zero-padded
    ``nn.Conv2d`` with at least ``min_channels`` input and output channels."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.dilation[0] == conv.dilation[1]
        and conv.padding == conv.dilation
        and min(conv.in_channels, conv.out_channels) >= min_channels
    )


class WinogradConv2d(nn.Module):
    """Inference-only stand-in for an eligible ``nn.Conv2d`` (see :func:`eligible`), holding its
    transformed filters in ``dtype``.

    Inputs are cast to ``dtype``. The result is ``dtype`` under autocast (as autocast's own
    convolution would be) and the input's dtype otherwise.
    """

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype, tile: int = 2) -> None:
        super().__init__()
        if not eligible(conv, min_channels=1):
            raise ValueError(f"not a 3x3 stride-1 same-size convolution: {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.dilation = conv.dilation[0]
        self.register_buffer("u", winograd_weights(conv.weight, dtype, tile), persistent=False)
        bias = None if conv.bias is None else conv.bias.detach().to(dtype)
        self.register_buffer("bias", bias, persistent=False)

    u: Tensor
    bias: Tensor | None

    @property
    def tile(self) -> int:
        return tile_of(self.u)

    @torch.compiler.disable  # eager: Dynamo cannot trace the chunks' out= writes (a graph break)
    def forward(self, x: Tensor) -> Tensor:
        u = self.u
        y = winograd_conv3x3(x.to(u.dtype), u, self.dilation, self.bias)
        if torch.is_autocast_enabled(x.device.type):
            return y
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, dilation={self.dilation}, tile={self.tile}, "
            f"dtype={self.u.dtype}"
        )


def use_winograd(
    net: nn.Module,
    dtype: torch.dtype,
    *,
    min_channels: int = MIN_CHANNELS,
    only: Collection[str] | None = None,
    tile: int = 2,
) -> list[str]:
    """Replace, in place, every eligible convolution of ``net`` (among the module names ``only``, if
    given) by a :class:`WinogradConv2d` with ``dtype`` filters; returns the names of the replaced
    modules. Inference only: the new modules have no parameters (the network can no longer be
    trained or saved as it was)."""
    replaced = []
    for name, module in list(net.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if (only is None or full in only) and eligible(child, min_channels):
                setattr(module, child_name, WinogradConv2d(child, dtype, tile))
                replaced.append(full)
    return replaced
