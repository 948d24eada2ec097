"""Fixtures of the worker tests: one random width-0.125 checkpoint per session and an engine on it."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from workerlib import Ckpt, make_checkpoint  # noqa: E402


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny images: one thread is faster than two on a shared, busy machine (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Ckpt:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="session")
def engine_settings(ckpt: Ckpt, tmp_path_factory: pytest.TempPathFactory):
    from hsc.core.settings import Settings

    return Settings(
        checkpoints=[str(ckpt.path)],
        device="cpu",
        results_dir=tmp_path_factory.mktemp("results"),
        crf_workers=0,
        max_pixels=1_000_000,
    )


@pytest.fixture(scope="session")
def engine(engine_settings):
    from hsc.worker.engine import Engine

    return Engine(engine_settings)


@pytest.fixture()
def results_dir(tmp_path: Path) -> Path:
    return tmp_path / "results"
