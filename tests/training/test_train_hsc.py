"""``hsc train`` on a generated mini dataset: Table-4 configurations, exact resume, determinism."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from hsc.model.checkpoint import load_checkpoint
from hsc.training.config import TrainConfig, add_train_arguments, config_from_args
from hsc.training.synth import synthesize
from hsc.training.train_hsc import train

pytestmark = pytest.mark.filterwarnings("ignore:no --init")

TABLE4_FLAGS = {
    1: {"no_hsc": True},
    2: {"csc": False, "rsc": False, "momentum_prototypes": False, "crf_psc": False, "crf_all": False},
    3: {"rsc": False, "momentum_prototypes": False, "crf_psc": False, "crf_all": False},
    4: {"momentum_prototypes": False, "crf_psc": False, "crf_all": False},
    5: {"cross_supervision": False, "momentum_prototypes": False, "crf_psc": False, "crf_all": False},
    6: {"crf_psc": False, "crf_all": False},
    7: {"crf_all": False},
    8: {},
}


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synthesize(root / "data", train=12, val=4, seed=3, size=(64, 48), num_classes=3)
    return root / "data"


def _cfg(data, out, **kw):
    base = dict(
        data=str(data),
        out=str(out),
        width=0.125,
        iters=2,
        batch=2,
        crop=64,
        resize_long=(64, 96),
        workers=0,
        log_every=1,
        save_every=100,
    )
    base.update(kw)
    return TrainConfig(**base)


def _metrics(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("row", sorted(TABLE4_FLAGS))
def test_every_table4_configuration_trains_and_writes_a_loadable_checkpoint(mini, tmp_path, row):
    final = train(_cfg(mini, tmp_path / "run", **TABLE4_FLAGS[row]), progress=False)
    ck = load_checkpoint(final)
    assert ck.info.class_names == tuple((mini / "classes.txt").read_text().split()[1:])
    assert ck.info.net.width == 0.125 and ck.step == 2
    assert len(ck.banks) == 6
    m = _metrics(tmp_path / "run")
    assert [x["step"] for x in m] == [1, 2]
    hsc_terms = [m[-1][k] for k in ("loss_rsc", "loss_csc", "loss_psc")]
    if row == 1:
        assert hsc_terms == [0.0, 0.0, 0.0]
    else:
        assert m[-1]["loss_psc"] > 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["width"] == 0.125


def test_seam_baseline_trains_without_saliency(mini, tmp_path):
    final = train(_cfg(mini, tmp_path / "run", baseline="seam"), progress=False)
    assert load_checkpoint(final).info.network_type == "hsc_seam"
    assert all(x["loss_sal"] == 0 for x in _metrics(tmp_path / "run"))


@pytest.mark.slow
def test_resume_continues_exactly(mini, tmp_path):
    cfg = _cfg(mini, tmp_path / "a", iters=5, batch=2)
    train(cfg, progress=False)
    full = _metrics(tmp_path / "a")

    cfg_b = replace(cfg, out=str(tmp_path / "b"))
    train(cfg_b, progress=False, stop_after=2)  # as if Ctrl-C after step 2
    assert (tmp_path / "b" / "step_2.safetensors").is_file()
    train(replace(cfg_b, resume=True), progress=False)
    resumed = _metrics(tmp_path / "b")
    assert [x["step"] for x in resumed] == [1, 2, 3, 4, 5]
    for a, b in zip(full, resumed):
        for k in a:
            if k.startswith("loss") or k == "lr":
                assert a[k] == b[k], (a["step"], k, a[k], b[k])
    wa = load_checkpoint(tmp_path / "a" / "final.safetensors")
    wb = load_checkpoint(tmp_path / "b" / "final.safetensors")
    for (k, va), vb in zip(wa.net.state_dict().items(), wb.net.state_dict().values()):
        assert torch.equal(va, vb), k
    for k in wa.banks:
        assert torch.equal(wa.banks[k], wb.banks[k]), k


def test_cpu_runs_are_deterministic_for_a_seed(mini, tmp_path):
    a = load_checkpoint(train(_cfg(mini, tmp_path / "a", seed=7), progress=False))
    b = load_checkpoint(train(_cfg(mini, tmp_path / "b", seed=7), progress=False))
    c = load_checkpoint(train(_cfg(mini, tmp_path / "c", seed=8), progress=False))
    assert torch.equal(a.net.fc8.weight, b.net.fc8.weight)
    assert not torch.equal(a.net.fc8.weight, c.net.fc8.weight)


def test_resume_without_a_run_is_a_clear_error(mini, tmp_path):
    with pytest.raises(ValueError, match="nothing to resume"):
        train(_cfg(mini, tmp_path / "none", resume=True), progress=False)


def test_config_file_then_flags(tmp_path):
    import argparse

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps({"data": "D", "out": "O", "width": 0.5, "iters": 7, "psc": False}))
    cfg = config_from_args(p.parse_args(["--config", str(cfg_file), "--iters", "9", "--no-csc"]))
    assert (cfg.width, cfg.iters, cfg.psc, cfg.csc, cfg.lr) == (0.5, 9, False, False, 0.01)
    cfg_file.write_text(json.dumps({"data": "D", "out": "O", "widht": 1}))
    with pytest.raises(ValueError, match="widht"):
        config_from_args(p.parse_args(["--config", str(cfg_file)]))
    with pytest.raises(ValueError, match="--data"):
        config_from_args(p.parse_args([]))


def test_official_poly_length_and_corrected_forms():
    cfg = TrainConfig(data="d", out="o")
    assert cfg.poly_max_step(10582) == 13215  # (10582 // 12) * 15
    assert replace(cfg, poly_over_run=True).poly_max_step(10582) == 20000
    assert replace(cfg, max_step=5).poly_max_step(10582) == 5


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(mini, tmp_path):
    """DistributedDataParallel over 2 CPU processes (gloo), launched as a user would with torchrun."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "hsc.core.cli", "train", "--data", str(mini), "--out", str(out), "--width", "0.125",
        "--iters", "3", "--batch", "4", "--crop", "64", "--resize-long", "64", "96", "--workers", "0",
        "--log-every", "1", "--save-every", "2", "--device", "cpu",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load_checkpoint(out / "final.safetensors")
    assert ck.step == 3 and len(ck.banks) == 6
    assert [x["step"] for x in _metrics(out)] == [1, 2, 3]  # rank 0 alone writes the metrics
    assert (out / "rng.rank0.pt").is_file() and (out / "rng.rank1.pt").is_file()


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_and_resume_finishes(mini, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = [
        "--data", str(mini), "--out", str(out), "--width", "0.125", "--iters", "400", "--batch", "2",
        "--crop", "64", "--resize-long", "64", "96", "--workers", "0", "--log-every", "1",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.Popen([sys.executable, "-m", "hsc.core.cli", "train", *args], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr[-2000:]
    ckpts = list(out.glob("step_*.safetensors"))
    assert len(ckpts) == 1 and (out / "state.pt").is_file(), stderr[-2000:]
    step = load_checkpoint(ckpts[0]).step
    assert 2 <= step < 400
    cfg = TrainConfig(**{**_cfg(mini, out).to_dict(), "iters": step + 2, "batch": 2, "resume": True,
                         "resize_long": (64, 96)})  # fmt: skip
    train(cfg, progress=False)
    assert load_checkpoint(out / "final.safetensors").step == step + 2
