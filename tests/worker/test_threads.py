"""How many CPU threads a model process takes: HSC_TORCH_THREADS, or the usable CPUs shared among the
processes of one `hsc serve` / `hsc worker` that hold models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hsc.core.settings import Settings
from hsc.worker.engine import model_processes, torch_threads, usable_cpus


def test_usable_cpus_follow_the_affinity_mask() -> None:
    assert usable_cpus() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    "kw,processes",
    [
        ({}, 1),  # embedded, one pool process
        ({"embedded_workers": 3}, 3),
        ({"redis_url": "redis://x:6379/0", "worker_pool": "prefork", "worker_concurrency": 4}, 4),
        ({"redis_url": "redis://x:6379/0", "worker_pool": "threads", "worker_concurrency": 4}, 1),
        ({"redis_url": "redis://x:6379/0", "worker_pool": "solo"}, 1),
    ],
)
def test_model_processes(kw: dict[str, object], processes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    s = Settings(**kw)  # type: ignore[arg-type]
    assert model_processes(s) == processes
    assert torch_threads(s) == max(1, usable_cpus() // processes)


def test_the_setting_wins_then_omp_num_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert torch_threads(Settings(torch_threads=3, embedded_workers=8)) == 3
    assert torch_threads(Settings(embedded_workers=8)) == 5
    with pytest.raises(ValueError):
        Settings(torch_threads=-1)


def test_loading_the_engine_sets_the_threads(tmp_path: Path) -> None:
    """In a fresh process pinned to one CPU, as `taskset` or a container would: the engine takes 1
    thread (torch alone would take the machine's core count); HSC_TORCH_THREADS=2 gives 2."""
    code = (
        "import os, torch; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from hsc.core.settings import Settings; from hsc.worker.engine import get_engine; "
        f"get_engine(Settings(results_dir={str(tmp_path)!r}, device='cpu')); print(torch.get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HSC_", "OMP_", "MKL_"))}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "1"
    env["HSC_TORCH_THREADS"] = "2"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "2"
    env["OMP_NUM_THREADS"] = "3"  # the setting wins over OpenMP's variable
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "2"
