"""A pure-numpy reader of MXNet NDArray-list files (``*.params``), without MXNet.

The ResNet-38 ImageNet weights of SEAM/EPS/HSC (``ilsvrc-cls_rna-a1_cls1000_ep-0001.params``) are such
a file. Layout (little-endian, docs/algorithm.md 1.6)::

    uint64 magic = 0x112, uint64 reserved, uint64 n_arrays,
    n_arrays x NDArray,
    uint64 n_names, n_names x (uint64 len, len bytes of name)      # names pair with arrays by position

Each NDArray starts with a ``uint32``:

* ``0xF993FAC9`` (V2): ``int32 storage_type`` (0 = dense), ``uint32 ndim``, ``ndim x int64`` dims;
* ``0xF993FAC8`` (V1): ``uint32 ndim``, ``ndim x int64`` dims;
* ``0xF993FACA`` (V3, numpy-shape semantics): not supported;
* anything else (legacy): that ``uint32`` is ``ndim``, followed by ``ndim x uint32`` dims;

then, if ``ndim > 0``: ``int32 dev_type``, ``int32 dev_id``, ``int32 dtype``, and the raw C-order data.

Only this module knows the binary layout; mapping the names onto network keys lives in checkpoint.py.
"""

from __future__ import annotations

import io
import os
import struct
from collections import Counter
from pathlib import Path

import numpy as np

LIST_MAGIC = 0x112
NDARRAY_V1_MAGIC = 0xF993FAC8
NDARRAY_V2_MAGIC = 0xF993FAC9
NDARRAY_V3_MAGIC = 0xF993FACA

# MXNet dtype codes (mshadow type flags) -> little-endian numpy dtypes.
DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("<f8"),
    2: np.dtype("<f2"),
    3: np.dtype("u1"),
    4: np.dtype("<i4"),
    5: np.dtype("i1"),
    6: np.dtype("<i8"),
}
STORAGE_TYPES = {0: "dense", 1: "row_sparse", 2: "csr"}
MAX_NDIM = 32


class MXNetParamsError(ValueError):
    """The file is not a readable MXNet NDArray-list file (the message says why and where)."""


def is_mxnet_params(head: bytes) -> bool:
    """True if ``head`` (the first 8+ bytes of a file) starts with the NDArray-list magic."""
    return len(head) >= 8 and struct.unpack_from("<Q", head)[0] == LIST_MAGIC


class _Reader:
    """Bounds-checked little-endian reads; every failure names the byte offset."""

    def __init__(self, f: io.BufferedReader, size: int, name: str) -> None:
        self.f, self.size, self.name = f, size, name

    @property
    def pos(self) -> int:
        return self.f.tell()

    def fail(self, what: str) -> MXNetParamsError:
        return MXNetParamsError(f"{self.name}: {what} (at byte {self.pos} of {self.size})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"file truncated while reading {what}: needs {n} bytes, {self.size - self.pos} left"
            )

    def unpack(self, fmt: str, what: str) -> tuple[int, ...]:
        n = struct.calcsize(fmt)
        self.need(n, what)
        return struct.unpack(fmt, self.f.read(n))

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)[0]

    def i32(self, what: str) -> int:
        return self.unpack("<i", what)[0]

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)[0]

    def array(self, dtype: np.dtype, shape: tuple[int, ...], what: str) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        nbytes = count * dtype.itemsize
        self.need(nbytes, what)
        out = np.empty(count, dtype=dtype)
        buf = memoryview(out).cast("B")  # type: ignore[arg-type]
        got = self.f.readinto(buf)
        if got != nbytes:
            raise self.fail(f"short read of {what}: {got} of {nbytes} bytes")
        if not out.dtype.isnative:
            out = out.astype(out.dtype.newbyteorder("="))
        return out.reshape(shape)


def _read_ndarray(r: _Reader, index: int) -> np.ndarray:
    what = f"array #{index}"
    head = r.u32(f"{what} header")
    if head == NDARRAY_V3_MAGIC:
        raise r.fail(
            f"{what} uses the NDArray V3 format (numpy-shape semantics, MXNet >= 1.6), which is not "
            "supported; re-save the file with an older MXNet or convert it to a PyTorch state dict"
        )
    if head == NDARRAY_V2_MAGIC:
        stype = r.i32(f"{what} storage type")
        if stype != 0:
            kind = STORAGE_TYPES.get(stype, f"unknown storage type {stype}")
            raise r.fail(f"{what} is a {kind} array; only dense arrays are supported")
    if head in (NDARRAY_V1_MAGIC, NDARRAY_V2_MAGIC):
        ndim = r.u32(f"{what} ndim")
        if ndim > MAX_NDIM:
            raise r.fail(f"{what} has ndim {ndim} > {MAX_NDIM}: not an NDArray file or corrupt")
        dims = r.unpack(f"<{ndim}q", f"{what} shape") if ndim else ()
    else:  # legacy: the first word is ndim, dims are uint32
        ndim = head
        if ndim > MAX_NDIM:
            raise r.fail(
                f"{what} starts with 0x{head:08X}: neither a known NDArray magic nor a plausible ndim"
            )
        dims = r.unpack(f"<{ndim}I", f"{what} shape") if ndim else ()
    if any(d < 0 for d in dims):
        raise r.fail(f"{what} has a negative dimension in shape {tuple(dims)}")
    if ndim == 0:
        return np.zeros((0,), dtype=np.float32)  # MXNet's "none" array: nothing follows
    r.i32(f"{what} device type")
    r.i32(f"{what} device id")
    code = r.i32(f"{what} dtype")
    if code not in DTYPES:
        raise r.fail(f"{what} has unknown dtype code {code} (known: {sorted(DTYPES)})")
    return r.array(DTYPES[code], tuple(int(d) for d in dims), f"{what} data")


def read_mxnet_params(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read an MXNet NDArray-list file into ``{name: array}`` in file order.

    Names keep their ``arg:``/``aux:`` prefixes. Raises :class:`MXNetParamsError` for a wrong magic, a
    truncated file, an unsupported NDArray version or storage type, an unknown dtype, a missing or
    duplicate name, or trailing bytes.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _Reader(f, size, str(path))
        magic = r.u64("the file magic")
        if magic != LIST_MAGIC:
            raise r.fail(f"magic 0x{magic:X} is not the MXNet NDArray-list magic 0x{LIST_MAGIC:X}")
        r.u64("the reserved word")
        n_arrays = r.u64("the array count")
        if n_arrays > size // 4:
            raise r.fail(f"array count {n_arrays} is impossible for a file of {size} bytes")
        arrays = [_read_ndarray(r, i) for i in range(n_arrays)]
        n_names = r.u64("the name count")
        if n_names != n_arrays:
            raise r.fail(f"{n_names} names for {n_arrays} arrays; a weight file must name every array")
        names: list[str] = []
        for i in range(n_names):
            n = r.u64(f"name #{i} length")
            r.need(n, f"name #{i}")
            raw = f.read(n)
            try:
                names.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise r.fail(f"name #{i} is not valid text ({e})") from None
        if r.pos != size:
            raise r.fail(f"{size - r.pos} unexpected trailing bytes after the name list")
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        raise MXNetParamsError(f"{path}: duplicate array names {dupes}")
    return dict(zip(names, arrays))
