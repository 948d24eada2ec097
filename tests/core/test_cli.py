"""The hsc command line, run as a user would (a subprocess on the installed console script)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from hsc.model.hsc_net import build_hsc_net

HSC = shutil.which("hsc")


def run(*args, check=True):
    cmd = [HSC, *args] if HSC else [sys.executable, "-m", "hsc.core.cli", *args]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check:
        assert out.returncode == 0, out.stderr
    return out


@pytest.mark.parametrize("sub", ["demo", "convert", "info"])
def test_every_subcommand_has_help(sub):
    out = run(sub, "--help")
    assert "usage: hsc " + sub in out.stdout


def test_no_command_prints_help_and_fails():
    out = run(check=False)
    assert out.returncode == 2 and "COMMAND" in out.stdout


@pytest.mark.slow
def test_demo_writes_cams_masks_and_heatmaps(tmp_path):
    out = run("demo", "--out", str(tmp_path / "d"), "--size", "64x48")
    summary = json.loads(out.stdout)
    assert "RANDOM WEIGHTS" in summary["smoke_run"]
    d = tmp_path / "d"
    for f in summary["files"]:
        assert (d / f).is_file(), f
    mask = np.array(Image.open(d / "mask.png"))
    assert mask.shape == (48, 64) and set(np.unique(mask)) <= {0, 1, 2}
    assert Image.open(d / "mask.png").mode == "P"
    cams = np.load(d / "cams.npy")
    assert cams.shape == (2, 48, 64) and 0 <= cams.min() and cams.max() < 1
    assert json.loads((d / "summary.json").read_text())["image_size"] == [48, 64]


def test_demo_rejects_a_bad_size(tmp_path):
    out = run("demo", "--out", str(tmp_path), "--size", "big", check=False)
    assert out.returncode == 1 and "size must look like" in out.stderr


def test_convert_then_info_on_an_official_form_file(tmp_path):
    torch.manual_seed(0)
    net = build_hsc_net(width=0.125)
    src = tmp_path / "official.pth"
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, src)
    dst = tmp_path / "ours.safetensors"
    run("convert", str(src), str(dst))
    info = json.loads(run("info", str(dst)).stdout)
    assert info["classes"][0] == "aeroplane" and len(info["classes"]) == 20
    assert info["bg_threshold"] == 0.22 and info["net"]["width"] == 0.125


def test_convert_refuses_a_corrupt_file_with_a_clear_message(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(os.urandom(1000))
    out = run("convert", str(bad), str(tmp_path / "x.safetensors"), check=False)
    assert out.returncode == 1
    assert "bad.pth" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_convert_with_a_classes_file(tmp_path):
    net = build_hsc_net(num_classes=3, width=0.125)
    src = tmp_path / "k3.pth"
    torch.save(net.state_dict(), src)
    classes = tmp_path / "classes.txt"
    classes.write_text("background\ncat\ndog\nbird\n")
    run("convert", str(src), str(tmp_path / "k3.safetensors"), "--classes", str(classes))
    info = json.loads(run("info", str(tmp_path / "k3.safetensors")).stdout)
    assert info["classes"] == ["cat", "dog", "bird"]
