"""Winograd F(2x2, 3x3) convolution for the fast mode on the CPU.

A 3x3 convolution computes each output pixel from 9 products per input channel. Winograd's minimal
filtering algorithm F(2x2, 3x3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks",
CVPR 2016) computes a 2x2 block of outputs from a 4x4 block of inputs with 16 products instead of
36, so 2.25x fewer multiply-adds; the rest is cheap additions (the input and output transforms).
On this project's CPUs oneDNN runs bfloat16 convolutions directly (no Winograd), near the core's
peak; the products here become 16 batched matrix products ``(tiles x C_in) @ (C_in x C_out)``, which
oneDNN also runs near peak, so the 3x3 layers of ResNet-38d with 256 or more channels take 1.3-1.9x
less time (``benchmarks/bench_winograd.py``).

Dilated 3x3 convolutions (b5-b7 of ResNet-38d, dilation 2 and 4) are handled without a polyphase
split: the 2x2 output block of a dilation-``d`` convolution is the outputs ``(y, x), (y, x + d),
(y + d, x), (y + d, x + d)``, and its 4x4 input block the inputs at offsets ``{-d, 0, d, 2d}``. Blocks
start at rows ``2d*i + r`` (``0 <= r < d``), so every output is in exactly one block.

Numerics: exact in exact arithmetic; in float32 the results equal a direct convolution to ~5e-7 of
the output's range. In bfloat16 (the fast mode) the transformed inputs and the block products are
rounded to bfloat16, which roughly doubles the error of a direct bfloat16 convolution (~9e-3 instead
of ~4e-3 of the output's range on random data). The fast mode's agreement with the exact mode is
measured end to end by ``benchmarks/bench_inference.py``.

The rows of blocks go through the transforms and products in chunks of about ``BLOCK_BYTES`` of
transformed tiles, which stay in the caches: in float32 this makes the layers with 512 or more
channels 1.4-1.7x faster than oneDNN's direct convolution at the largest scale (unchunked: 1.0-1.2x).

Only the fast mode on the CPU uses this (:func:`use_winograd`), and by default only where it pays
(:func:`pays_on_this_cpu`): a CPU with AVX-512 bfloat16 instructions but no AMX tiles. AMX (Intel
Sapphire Rapids and later) runs oneDNN's direct bfloat16 convolution several times faster than
AVX-512 does (measured: 5.5 ms instead of 25 ms for 256 -> 256 channels at 125x94), and the batched
products cannot catch up with it there. The exact mode never uses Winograd, and on CUDA cuDNN picks
its own algorithms.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# F(2x2, 3x3): Y = A^T [(G g G^T) * (B^T d B)] A
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))

# Below this many input and output channels the batched products are too thin to beat oneDNN's
# direct convolution (measured: 128 -> 128 channels at 188x250 is 1.3x slower; 256 -> 256 at 94x125
# is 1.3x faster).
MIN_CHANNELS = 256
# In float32 the direct convolution is relatively faster: 256 -> 256 at 125x94 is 1.25x slower by
# Winograd, 512 -> 512 at 63x47 1.39x faster (AMX CPU, ``benchmarks/bench_winograd.py``).
MIN_CHANNELS_FP32 = 512
# Chunk size of the transformed tiles (winograd_conv3x3's block_bytes): 1-16 MiB all beat one
# chunk for the whole image, 4 MiB by a little (fp32, 512 -> 512 at 125x94: 105 ms against 180 ms
# unchunked and 162 ms direct).
BLOCK_BYTES = 1 << 22


def pays_on_this_cpu() -> bool:
    """Whether Winograd beats oneDNN's direct bfloat16 convolution on this CPU: AVX-512 bfloat16
    without AMX tiles (``benchmarks/bench_winograd.py`` measures it)."""
    cpu = torch.cpu
    amx = getattr(cpu, "_is_amx_tile_supported", None)
    bf16 = getattr(cpu, "_is_avx512_bf16_supported", None)
    if amx is None or bf16 is None:  # a torch without the probes: keep oneDNN's own choice
        return False
    return bool(bf16()) and not bool(amx())


def winograd_weights(weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The transformed filters ``G g G^T`` of a ``(C_out, C_in, 3, 3)`` weight, laid out for the
    batched product: ``(16, C_in, C_out)``, computed in float64 and stored as ``dtype`` (default: the
    weight's)."""
    if weight.dim() != 4 or weight.shape[2:] != (3, 3):
        raise ValueError(f"expected a (C_out, C_in, 3, 3) weight, got {tuple(weight.shape)}")
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    g = torch.tensor(_G, dtype=work, device=weight.device)
    u = torch.einsum("ak,oikl,bl->abio", g, weight.detach().to(work), g)  # (4, 4, C_in, C_out)
    return u.reshape(16, weight.shape[1], weight.shape[0]).to(dtype or weight.dtype).contiguous()


def _taps(t: Tensor, dim: int, d: int, n: int) -> list[Tensor]:
    """The four input taps of every block along ``dim``: views of shape ``(..., n, d, ...)`` of the
    rows ``2d*i + r + k*d`` (block ``i``, phase ``r``) for ``k = 0..3``."""
    out = []
    for k in range(4):
        s = t.narrow(dim, k * d, 2 * d * n).unflatten(dim, (n, 2, d))
        out.append(s.select(dim + 1, 0))
    return out


def winograd_conv3x3(
    x: Tensor,
    u: Tensor,
    dilation: int = 1,
    bias: Tensor | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> Tensor:
    """``F.conv2d(x, w, bias, padding=dilation, dilation=dilation)`` by Winograd F(2x2, 3x3).

    Args:
        x: ``(N, C_in, H, W)``; fastest in channels_last memory (the result is channels_last too).
        u: :func:`winograd_weights` of ``w``, same dtype as ``x``.
        dilation: the convolution's dilation (and padding: the output has the input's size).
        bias: optional ``(C_out,)``.
        block_bytes: rows of blocks are transformed, multiplied and transformed back in chunks whose
            transformed tiles take about this many bytes, so they stay in the CPU's caches.
    """
    n, c, h, w = x.shape
    if u.dim() != 3 or u.shape[0] != 16 or u.shape[1] != c:
        raise ValueError(f"weights {tuple(u.shape)} do not fit an input with {c} channels")
    d = int(dilation)
    c_out = u.shape[2]
    nh, nw = math.ceil(h / (2 * d)), math.ceil(w / (2 * d))
    # N, H, W, C view; zero padding: d before, and enough after for the last block's four taps
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, d, 2 * d * nw - w + 2 * d, d, 2 * d * nh - h + 2 * d))
    y = x.new_empty((n, nh, 2, d, nw, 2, d, c_out))
    row_bytes = 16 * n * d * nw * d * max(c, c_out) * x.element_size()
    step = max(1, block_bytes // row_bytes)
    for i0 in range(0, nh, step):
        nb = min(step, nh - i0)
        _blocks(xp.narrow(1, 2 * d * i0, 2 * d * nb + 3 * d), u, d, nb, nw, y[:, i0 : i0 + nb])
    out = y.view(n, 2 * d * nh, 2 * d * nw, c_out)[:, :h, :w]
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def _blocks(xp: Tensor, u: Tensor, d: int, nh: int, nw: int, y: Tensor) -> None:
    """``nh`` rows of blocks: padded NHWC input rows ``xp`` -> ``y`` (N, nh, 2, d, nw, 2, d, C_out)."""
    n, c, c_out = xp.shape[0], xp.shape[3], u.shape[2]
    r = _taps(xp, 1, d, nh)  # each (N, nh, d, Wp, C)
    rows = (r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3])  # B^T along the height
    v = xp.new_empty((16, n, nh, d, nw, d, c))
    for a, t in enumerate(rows):
        k = _taps(t, 3, d, nw)  # each (N, nh, d, nw, d, C)
        torch.sub(k[0], k[2], out=v[4 * a])
        torch.add(k[1], k[2], out=v[4 * a + 1])
        torch.sub(k[2], k[1], out=v[4 * a + 2])
        torch.sub(k[1], k[3], out=v[4 * a + 3])
    p = n * nh * d * nw * d
    m = torch.bmm(v.view(16, p, c), u).view(4, 4, n, nh, d, nw, d, c_out)
    for i, s in enumerate((m[0] + m[1] + m[2], m[1] - m[2] - m[3])):  # A^T along the height
        torch.add(s[0] + s[1], s[2], out=y[:, :, i, :, :, 0])  # A^T along the width
        torch.sub(s[1] - s[2], s[3], out=y[:, :, i, :, :, 1])


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

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype) -> None:
        super().__init__()
        if not eligible(conv, min_channels=1):
            raise ValueError(f"not a 3x3 stride-1 same-size convolution: {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.dilation = conv.dilation[0]
        self.register_buffer("u", winograd_weights(conv.weight, dtype), persistent=False)
        bias = None if conv.bias is None else conv.bias.detach().to(dtype)
        self.register_buffer("bias", bias, persistent=False)

    u: Tensor
    bias: Tensor | None

    @torch.compiler.disable  # eager: Dynamo cannot trace the chunks' out= writes (a graph break)
    def forward(self, x: Tensor) -> Tensor:
        u = self.u
        y = winograd_conv3x3(x.to(u.dtype), u, self.dilation, self.bias)
        if torch.is_autocast_enabled(x.device.type):
            return y
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, dilation={self.dilation}, dtype={self.u.dtype}"


def use_winograd(
    net: nn.Module,
    dtype: torch.dtype,
    *,
    min_channels: int = MIN_CHANNELS,
    only: Collection[str] | None = None,
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
                setattr(module, child_name, WinogradConv2d(child, dtype))
                replaced.append(full)
    return replaced
