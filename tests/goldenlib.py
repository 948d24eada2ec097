"""Reading and checking the golden file (docs/golden.md of the reference material).

The golden file holds, per case, a *recipe* (Python text using only torch) that rebuilds the inputs,
the sha256 of every input, and the values the authors' code produced. Tests call :func:`case` to get a
case, :func:`build_inputs` to execute its recipe and check the inputs, and the ``assert_*`` helpers to
compare results with the tolerances of docs/golden.md section 2.

``HSC_GOLDEN=/path/to/other.json`` points every golden test at another file of the same form.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

DEFAULT_GOLDEN = Path(__file__).parent / "data" / "hsc_official.json"

# Every case kind the tests know how to check. A file with any other top-level key fails loudly
# (tests/test_golden_file.py), so a new kind of case can never be skipped silently.
KNOWN_KINDS = frozenset(
    {
        "cls_and_amp",
        "eps_saliency",
        "er_ecr",
        "rsc",
        "csc",
        "psc",
        "hsc_end_to_end",
        "crf",
        "poly_optimizer",
        "eval_miou",
        "seeded_weights",
        "parameter_groups",
        "network_forward",
        "inference_one_image",
        "train_step_end_to_end",
        "deeplab_keys",
    }
)
META_KEYS = frozenset({"about"})


def golden_path() -> Path:
    return Path(os.environ.get("HSC_GOLDEN") or DEFAULT_GOLDEN)


@functools.lru_cache(maxsize=4)
def _load(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def golden() -> dict[str, Any]:
    return _load(str(golden_path()))


def case(name: str) -> dict[str, Any]:
    """The case ``name`` of the golden file; skipped (with the reason shown) if the file lacks it."""
    assert name in KNOWN_KINDS, f"unknown case kind {name!r}"
    data = golden()
    if name not in data:
        pytest.skip(f"{golden_path()} has no case {name!r}")
    return data[name]


# --------------------------------------------------------------------------------------------------
# recipes and inputs


def run_recipe(recipe: str, **extra: Any) -> dict[str, Any]:
    """Execute a recipe as docs/golden.md section 1 says: CPU, float32, after the standard imports."""
    ns: dict[str, Any] = {"math": math, "zlib": zlib, "torch": torch, "F": F}
    ns.update(extra)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        exec(compile(recipe, "<golden recipe>", "exec"), ns)
    finally:
        torch.set_default_dtype(prev)
    return ns


def sha256_of(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def check_inputs(ns: dict[str, Any], inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Check every named input (names may be expressions such as ``gt['a']``) and return them."""
    out = {}
    for name, spec in inputs.items():
        t = eval(name, ns)  # noqa: S307 - names come from the golden file, e.g. "cams['a'][0]"
        assert isinstance(t, torch.Tensor), name
        assert list(t.shape) == list(spec["shape"]), f"{name}: shape {list(t.shape)} != {spec['shape']}"
        assert str(t.dtype).replace("torch.", "") == spec["dtype"], f"{name}: dtype {t.dtype}"
        assert sha256_of(t) == spec["sha256"], f"{name}: recipe did not rebuild the recorded input"
        out[name] = t
    return out


def build_inputs(c: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Run the case's recipe, check its inputs, return the recipe's namespace."""
    ns = run_recipe(c["recipe"], **extra)
    check_inputs(ns, c.get("inputs", {}))
    return ns


# --------------------------------------------------------------------------------------------------
# comparisons (docs/golden.md section 2)


def assert_rel(
    actual: float, expected: float, rel: float = 1e-5, floor: float = 1e-7, what: str = ""
) -> None:
    actual = float(actual)
    tol = max(rel * abs(expected), floor)
    assert abs(actual - expected) <= tol, f"{what}: {actual!r} != {expected!r} (tol {tol:.3g})"


def summarize(t: torch.Tensor) -> dict[str, Any]:
    a = t.detach().cpu().to(torch.float64)
    flat = a.reshape(-1)
    n = flat.numel()
    shape = list(a.shape)
    at = {}
    for p in (0, n // 5, 2 * n // 5, 3 * n // 5, 4 * n // 5, n - 1):
        idx = np.unravel_index(p, shape) if shape else ()
        at["[" + ",".join(str(int(i)) for i in idx) + "]"] = float(flat[p])
    return {
        "shape": shape,
        "sum": float(flat.sum()),
        "mean": float(flat.mean()),
        "abs_sum": float(flat.abs().sum()),
        "min": float(flat.min()),
        "max": float(flat.max()),
        "at": at,
    }


def _index(key: str) -> tuple[int, ...]:
    inner = key.strip()[1:-1].strip()
    return tuple(int(x) for x in inner.split(",")) if inner else ()


def assert_summary(t: torch.Tensor, expected: dict[str, Any], mode: str, what: str = "") -> None:
    """Compare a tensor with a summary of the golden file.

    mode ``scale``: every statistic within 1e-5 x its scale (loss cases, bank states);
    mode ``abs``: elements/min/max within 1e-4 absolute, sums within 1e-5 x abs_sum + 1e-4 (network
    outputs, inference CAMs, CRF probabilities);
    mode ``param``: within 2e-3 x scale (training-step parameter changes).
    """
    assert list(t.shape) == list(expected["shape"]), f"{what}: shape {list(t.shape)} != {expected['shape']}"
    a = t.detach().cpu().to(torch.float64)
    n = max(a.numel(), 1)
    got = summarize(a)
    peak = max(abs(expected["min"]), abs(expected["max"]))
    if mode in ("scale", "param"):
        f = 1e-5 if mode == "scale" else 2e-3
        tol = {
            "sum": f * expected["abs_sum"],
            "abs_sum": f * expected["abs_sum"],
            "mean": f * expected["abs_sum"] / n,
            "min": f * peak,
            "max": f * peak,
        }
        tol_at = f * peak
        floor = 1e-12
    elif mode == "abs":
        tol = {
            "sum": 1e-5 * expected["abs_sum"] + 1e-4,
            "abs_sum": 1e-5 * expected["abs_sum"] + 1e-4,
            "mean": (1e-5 * expected["abs_sum"] + 1e-4) / n,
            "min": 1e-4,
            "max": 1e-4,
        }
        tol_at = 1e-4
        floor = 0.0
    else:
        raise ValueError(mode)
    for k, tk in tol.items():
        assert abs(got[k] - expected[k]) <= tk + floor, (
            f"{what}: {k} {got[k]!r} != {expected[k]!r} (tol {tk:.3g})"
        )
    for key, value in expected.get("at", {}).items():
        v = float(a[_index(key)])
        assert abs(v - value) <= tol_at + floor, f"{what}: at {key} {v!r} != {value!r} (tol {tol_at:.3g})"


def assert_label_map(actual: Any, expected: dict[str, Any], n_labels: int = 21, what: str = "") -> None:
    """Exact comparison of an integer label map with its golden description (hist, sha256, rows, map)."""
    a = torch.as_tensor(np.asarray(actual)).to(torch.int64)
    assert list(a.shape) == list(expected["shape"]), what
    if "hist" in expected:
        hist = torch.bincount(a.reshape(-1), minlength=len(expected["hist"])).tolist()
        assert hist == expected["hist"], f"{what}: histogram {hist} != {expected['hist']}"
    if "sha256_uint8" in expected:
        assert sha256_of(a.to(torch.uint8)) == expected["sha256_uint8"], f"{what}: label map differs"
    if "map" in expected:
        assert a.tolist() == expected["map"], what
    if "row_0" in expected:
        assert a[0].tolist() == expected["row_0"], what
    if "row_mid (H//2)" in expected:
        assert a[a.shape[0] // 2].tolist() == expected["row_mid (H//2)"], what


def parse_number(pattern: str, text: str) -> float:
    """A number the golden file states in prose (e.g. 'max_step 13215'); fails loudly if absent."""
    m = re.search(pattern, text)
    assert m, f"golden file: cannot find {pattern!r} in {text!r}"
    return float(m.group(1))


@functools.lru_cache(maxsize=2)
def _seeded_weights(path: str) -> dict[str, torch.Tensor]:
    c = _load(path)["seeded_weights"]
    keys = c["keys (state-dict order, KEYS)"]
    ns = run_recipe(c["recipe"], KEYS=keys)
    return ns["sd"]


def seeded_weights() -> dict[str, torch.Tensor]:
    """The deterministic 'seeded' weights of docs/golden.md section 3 (cached; do not modify)."""
    case("seeded_weights")
    return _seeded_weights(str(golden_path()))
