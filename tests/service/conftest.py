"""Fixtures of the service tests: the checkpoint, the dataset and the service in both modes.

Everything is tiny so the suite stays fast on two cores: a random width-0.125 checkpoint with the five
classes of the synthetic dataset, 64x48 images, one torch thread per process. Broker tests use Redis
db 15, a random queue and a model id of their own, and delete what they made.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from svclib import N_TRAIN, SIZE, Model, Service, running_service  # noqa: E402


@pytest.fixture(scope="session")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """A random width-0.125 HSC checkpoint with the synthetic dataset's five classes."""
    import torch

    from hsc.model.checkpoint import save_checkpoint
    from hsc.model.config import ModelInfo
    from hsc.model.hsc_net import build_hsc_net
    from hsc.training.synth import class_names

    names = tuple(class_names(5))
    torch.manual_seed(0)
    net = build_hsc_net(num_classes=len(names), width=0.125).eval()
    mid = f"svc-{secrets.token_hex(4)}"
    path = tmp_path_factory.mktemp("ckpt") / f"{mid}.safetensors"
    digest = save_checkpoint(path, net, info=ModelInfo(net=net.cfg, class_names=names, bg_threshold=0.3))
    return Model(path, mid, digest, ("background", *names))


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic VOC-layout dataset (20 train + 2 val images, 64x48) with manifests."""
    from hsc.training.synth import synthesize

    root = tmp_path_factory.mktemp("data") / "synth"
    synthesize(root, train=N_TRAIN, val=2, size=SIZE, num_classes=5, seed=3)
    return root


@pytest.fixture(scope="module", params=["embedded", "broker"])
def svc(
    request: pytest.FixtureRequest, model: Model, dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """The service in one mode, started once per module (and per mode)."""
    mode = request.param
    with running_service(mode, model, dataset, tmp_path_factory.mktemp(f"svc-{mode}")) as s:
        yield s


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failure, show the logs of the processes behind the test."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "svc" in getattr(item, "funcargs", {}):
        report.sections.append(("service logs", item.funcargs["svc"].logs()))  # type: ignore[index]
