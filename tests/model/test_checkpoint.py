"""Checkpoint I/O: official HSC state dicts, ImageNet initialisation (MXNet .params and .pth), our format.

The MXNet files are written here from the layout of docs/algorithm.md 1.6 (the real file is not
available), in each header form, with the backbone's names and shapes.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from hsc.model import checkpoint as C
from hsc.model.checkpoint import CheckpointError
from hsc.model.classes import VOC_CLASSES
from hsc.model.config import HSCNetConfig, ModelInfo, Normalization
from hsc.model.hsc_net import HSCNet, build_hsc_net
from hsc.model.mxnet_params import MXNetParamsError, read_mxnet_params

W = 0.125  # test width: every state-dict key and topology, 1/64 of the channels


def randomized(net: HSCNet, seed: int = 0) -> HSCNet:
    """Fill every tensor (BN statistics and num_batches_tracked included) with seeded values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in net.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + (0.5 if k.endswith("running_var") else -0.5))
            else:
                t.fill_(int(torch.randint(0, 100, (), generator=g)))
    return net


def small_net(k: int = 20, seed: int = 0) -> HSCNet:
    return randomized(build_hsc_net(num_classes=k, width=W), seed)


def meta_net(**kw) -> HSCNet:
    with torch.device("meta"):
        return HSCNet(HSCNetConfig(**kw))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def error_of(fn, *args, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        fn(*args, **kw)
    return str(info.value)


# ================================================================================ MXNet .params


def mxnet_name(key: str) -> str:
    """The ademxapp name of one of our backbone keys (the inverse of the documented mapping)."""
    if key == "conv1a.weight":
        return "arg:conv1a_weight"
    module, layer, param = (
        key.split(".") if key.count(".") == 2 else (key.split(".")[0], "", key.split(".")[1])
    )
    bn_param = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_var"}
    prefix = "aux:" if param.startswith("running") else "arg:"
    if module == "bn7":
        return f"{prefix}bn7_{bn_param[param]}"
    stage, _, unit = module[1:].partition("_")
    unit = "a" if not unit else f"b{unit}"
    kind, branch = layer.split("_branch")
    if kind == "conv":
        return f"{prefix}res{stage}{unit}_branch{branch}_weight"
    return f"{prefix}bn{stage}{unit}_branch{branch}_{bn_param[param]}"


MX_DTYPE_CODES = {
    np.float32: 0,
    np.float64: 1,
    np.float16: 2,
    np.uint8: 3,
    np.int32: 4,
    np.int8: 5,
    np.int64: 6,
}


def write_params(path: Path, arrays: dict[str, np.ndarray], form: str) -> Path:
    """Write an MXNet NDArray-list file in the ``legacy``, ``v1`` or ``v2`` NDArray form."""
    out = bytearray(struct.pack("<QQQ", 0x112, 0, len(arrays)))
    for a in arrays.values():
        if form == "legacy":
            out += struct.pack(f"<I{a.ndim}I", a.ndim, *a.shape)
        elif form == "v1":
            out += struct.pack(f"<II{a.ndim}q", 0xF993FAC8, a.ndim, *a.shape)
        elif form == "v2":
            out += struct.pack(f"<IiI{a.ndim}q", 0xF993FAC9, 0, a.ndim, *a.shape)
        else:
            raise AssertionError(form)
        if a.ndim == 0:
            continue  # MXNet's empty array: nothing after the shape
        out += struct.pack("<iii", 2, 0, MX_DTYPE_CODES[a.dtype.type])  # dev_type 2 (GPU), id 0
        out += np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
    out += struct.pack("<Q", len(arrays))
    for name in arrays:
        raw = name.encode()
        out += struct.pack("<Q", len(raw)) + raw
    path.write_bytes(bytes(out))
    return path


def imagenet_arrays(net: nn.Module, seed: int = 1) -> dict[str, np.ndarray]:
    """Seeded ImageNet-like arrays for every backbone tensor of ``net`` under MXNet names, plus the
    1000-way classifier the file carries."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, t in net.state_dict().items():
        if k.split(".")[0] in C.BACKBONE_MODULES and not k.endswith("num_batches_tracked"):
            out[mxnet_name(k)] = rng.standard_normal(tuple(t.shape)).astype(np.float32)
    c6 = net.state_dict()["bn7.weight"].shape[0]
    out["arg:linear1000_weight"] = rng.standard_normal((1000, c6, 1, 1)).astype(np.float32)
    out["arg:linear1000_bias"] = rng.standard_normal(1000).astype(np.float32)
    return out


@pytest.mark.parametrize(
    "name, key",
    [
        ("arg:conv1a_weight", "conv1a.weight"),
        ("arg:res2a_branch1_weight", "b2.conv_branch1.weight"),
        ("arg:res4b5_branch2b1_weight", "b4_5.conv_branch2b1.weight"),
        ("arg:res6a_branch1_weight", "b6.conv_branch1.weight"),
        ("arg:res7a_branch2b2_weight", "b7.conv_branch2b2.weight"),
        ("arg:bn5b2_branch2a_gamma", "b5_2.bn_branch2a.weight"),
        ("arg:bn3a_branch2b1_beta", "b3.bn_branch2b1.bias"),
        ("aux:bn6a_branch2b2_moving_mean", "b6.bn_branch2b2.running_mean"),
        ("aux:bn7_moving_var", "bn7.running_var"),
        ("bn7_gamma", "bn7.weight"),  # no prefix
        ("arg:linear1000_weight", None),
        ("arg:fc_extra_weight", None),
        ("arg:res4b_branch2a_weight", None),
    ],
)
def test_mxnet_name_to_key(name, key):
    assert C.mxnet_name_to_key(name) == key


def test_mxnet_mapping_covers_exactly_the_191_backbone_tensors_at_width_1():
    net = meta_net()  # shapes only, nothing allocated
    sd = net.state_dict()
    backbone = C.backbone_keys(net)
    tensors = [k for k in backbone if not k.endswith("num_batches_tracked")]
    assert len(backbone) == 191 + 37 and len(tensors) == 191
    params = [k for k in tensors if ".running_" not in k]
    assert sum(sd[k].numel() for k in params) == 105_070_912  # docs/algorithm.md 1.4
    file_like = {mxnet_name(k): torch.empty(sd[k].shape, device="meta") for k in tensors}
    file_like["arg:linear1000_weight"] = torch.empty(1000, 4096, 1, 1, device="meta")
    file_like["arg:linear1000_bias"] = torch.empty(1000, device="meta")
    assert len(file_like) == 193  # as the real file should
    kept, dropped, unexpected = C.imagenet_filter_fn(file_like, backbone)
    assert set(kept) == set(tensors) and unexpected == []
    assert dropped == ["arg:linear1000_weight", "arg:linear1000_bias"]
    assert all(kept[k].shape == sd[k].shape for k in kept)
    report = C.load_imagenet_weights(net, file_like)  # meta -> meta: checks shapes, copies nothing
    assert report.complete and len(report.loaded) == 191 and report.unexpected == ()


@pytest.mark.parametrize("form", ["legacy", "v1", "v2"])
def test_mxnet_reader_reads_every_header_form_and_dtype(tmp_path, form):
    arrays = {
        "arg:a": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "arg:b": np.array([1.5, -2.25], dtype=np.float64),
        "aux:c": np.array([[0.5, 1.0]], dtype=np.float16),
        "d": np.array([0, 255], dtype=np.uint8),
        "e": np.array([-(2**31), 2**31 - 1], dtype=np.int32),
        "f": np.array([-128, 127], dtype=np.int8),
        "g": np.array([2**40], dtype=np.int64),
        "h": np.zeros((0, 3), dtype=np.float32),
        "none": np.zeros((), dtype=np.float32),  # ndim 0: MXNet's empty array
    }
    got = read_mxnet_params(write_params(tmp_path / "x.params", arrays, form))
    assert list(got) == list(arrays)
    for name, a in arrays.items():
        if name == "none":
            assert got[name].size == 0
            continue
        assert got[name].dtype == a.dtype and got[name].shape == a.shape, name
        np.testing.assert_array_equal(got[name], a)
        assert got[name].flags.writeable


@pytest.mark.parametrize("form", ["legacy", "v1", "v2"])
def test_imagenet_params_file_initialises_the_backbone_only(tmp_path, form):
    net = build_hsc_net(width=W)
    heads_before = {
        k: v.clone() for k, v in net.state_dict().items() if k.split(".")[0] not in C.BACKBONE_MODULES
    }
    arrays = imagenet_arrays(net)
    path = write_params(tmp_path / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params", arrays, form)
    report = C.load_imagenet_weights(net, path)
    assert report.complete and len(report.loaded) == 191 and report.unexpected == ()
    assert set(report.dropped) == {"arg:linear1000_weight", "arg:linear1000_bias"}
    sd = net.state_dict()
    for k in report.loaded:
        assert torch.equal(sd[k], torch.from_numpy(arrays[mxnet_name(k)])), k
    assert torch.equal(
        sd["b4_5.conv_branch2b1.weight"], torch.from_numpy(arrays["arg:res4b5_branch2b1_weight"])
    )
    assert torch.equal(sd["bn7.running_var"], torch.from_numpy(arrays["aux:bn7_moving_var"]))
    for k, v in heads_before.items():
        assert torch.equal(sd[k], v), f"head {k} changed"


def test_imagenet_report_lists_unmappable_and_missing_names(tmp_path):
    net = build_hsc_net(width=W)
    arrays = imagenet_arrays(net)
    del arrays["aux:bn7_moving_mean"], arrays["arg:res3b1_branch2a_weight"]
    arrays["arg:fc_extra_weight"] = np.zeros(3, np.float32)
    report = C.load_imagenet_weights(net, write_params(tmp_path / "x.params", arrays, "legacy"))
    assert not report.complete
    assert report.missing == ("b3_1.conv_branch2a.weight", "bn7.running_mean")
    assert report.unexpected == ("arg:fc_extra_weight",)
    assert "fc_extra_weight" in str(report) and "bn7.running_mean" in str(report)


def test_imagenet_shape_mismatch_is_one_error_and_nothing_is_written(tmp_path):
    net = build_hsc_net(width=W)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    arrays = imagenet_arrays(build_hsc_net(width=2 * W))  # the file of another width
    msg = error_of(C.load_imagenet_weights, net, write_params(tmp_path / "x.params", arrays, "v2"))
    assert "conv1a.weight: expected [8, 3, 3, 3], found [16, 3, 3, 3]" in msg
    assert "bn7.running_var: expected [512], found [1024]" in msg
    assert msg.count("expected [") == 191
    assert_same_tensors(net.state_dict(), before)


def test_imagenet_pth_form_keeps_backbone_keys_and_drops_the_rest(tmp_path):
    src = small_net(seed=3)
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}
    sd["module.linear1000.weight"] = torch.zeros(1000, 512, 1, 1)
    torch.save(sd, tmp_path / "ilsvrc.pth")
    net = build_hsc_net(width=W)
    fc8 = net.fc8.weight.clone()
    report = C.load_imagenet_weights(nn.DataParallel(net), tmp_path / "ilsvrc.pth")  # wrappers are fine
    assert report.complete and report.dropped == ("linear1000.weight",)
    assert "fc8.weight" in report.unexpected and "extra_F.0.bias" in report.unexpected
    assert torch.equal(net.fc8.weight, fc8)
    for k in C.backbone_keys(net):
        assert torch.equal(net.state_dict()[k], src.state_dict()[k]), k


def test_imagenet_two_names_for_one_key_is_an_error():
    net = meta_net(width=W)
    t = net.state_dict()["conv1a.weight"]
    msg = error_of(C.load_imagenet_weights, net, {"arg:conv1a_weight": t, "conv1a.weight": t})
    assert "arg:conv1a_weight" in msg and "conv1a.weight" in msg


def _params_error(tmp_path: Path, data: bytes) -> str:
    p = tmp_path / "bad.params"
    p.write_bytes(data)
    with pytest.raises(MXNetParamsError) as info:
        read_mxnet_params(p)
    assert str(p) in str(info.value)
    # the checkpoint layer turns it into a CheckpointError with the same message
    assert error_of(C.load_imagenet_weights, build_hsc_net(width=W), p) == str(info.value)
    return str(info.value)


def _one_array_file(body: bytes, names: list[str] | None = None) -> bytes:
    names = ["arg:x"] if names is None else names
    out = struct.pack("<QQQ", 0x112, 0, 1) + body + struct.pack("<Q", len(names))
    for n in names:
        out += struct.pack("<Q", len(n)) + n.encode()
    return out


def test_mxnet_reader_rejects_v3_sparse_and_bad_files(tmp_path):
    v3 = struct.pack("<IiI1q", 0xF993FACA, 0, 1, 2) + struct.pack("<iii", 1, 0, 0) + bytes(8)
    assert "V3" in _params_error(tmp_path, _one_array_file(v3))
    sparse = struct.pack("<IiI1q", 0xF993FAC9, 1, 1, 2)
    assert "row_sparse" in _params_error(tmp_path, _one_array_file(sparse))
    bad_dtype = struct.pack("<II", 1, 2) + struct.pack("<iii", 1, 0, 9) + bytes(8)
    assert "dtype code 9" in _params_error(tmp_path, _one_array_file(bad_dtype))
    good = struct.pack("<II", 1, 2) + struct.pack("<iii", 1, 0, 0) + bytes(8)
    whole = _one_array_file(good)
    assert "truncated" in _params_error(tmp_path, whole[:40])
    assert "trailing" in _params_error(tmp_path, whole + b"\0")
    assert "2 names for 1 arrays" in _params_error(tmp_path, _one_array_file(good, ["a", "b"]))
    assert "ndim" in _params_error(tmp_path, _one_array_file(struct.pack("<I", 0xDEADBEEF)))
    p = tmp_path / "x.params"
    p.write_bytes(struct.pack("<QQQ", 0x113, 0, 0))
    with pytest.raises(MXNetParamsError, match="magic"):
        read_mxnet_params(p)


# ================================================================================ official HSC


def documented_keys() -> list[tuple[str, list[int]]]:
    """The 242 (key, shape) pairs of docs/algorithm.md 2.6, as listed by the golden file."""
    from goldenlib import case

    return [(k, list(s)) for k, s in case("seeded_weights")["keys (state-dict order, KEYS)"]]


def test_official_form_of_the_documented_242_keys_is_accepted_without_allocating():
    keys = documented_keys()
    assert len(keys) == 242
    plain = {k: torch.empty(s, device="meta") for k, s in keys}
    for sd in (
        plain,
        {f"module.{k}": v for k, v in plain.items()},
        {k: v for k, v in plain.items() if not k.endswith("num_batches_tracked")},
    ):
        sd = C.official_filter_fn(sd)
        assert set(sd) == set(plain)
        cfg = C.infer_net_config(sd)
        assert cfg == HSCNetConfig()
        C.check_state_dict(sd, cfg)


def _save_official(tmp_path: Path, sd: dict[str, torch.Tensor], form: str) -> Path:
    if form == "safetensors":
        p = tmp_path / "HSC_eps_v2.safetensors"
        safetensors.torch.save_file(sd, str(p))
    elif form == "legacy-pickle":
        p = tmp_path / "HSC_eps_v2.pth"
        torch.save(sd, p, _use_new_zipfile_serialization=False)
    else:
        p = tmp_path / "HSC_eps_v2.pth"
        torch.save(sd, p)
    return p


@pytest.mark.parametrize(
    "variant, form",
    [
        ("plain", "zip"),
        ("plain", "legacy-pickle"),
        ("plain", "safetensors"),
        ("module", "zip"),
        ("no-nbt", "zip"),
        ("wrapped", "zip"),
    ],
)
def test_official_checkpoint_loads_strictly(tmp_path, variant, form):
    src = small_net(seed=1)
    ref = src.state_dict()
    sd = dict(ref)
    if variant == "module":
        sd = {f"module.{k}": v for k, v in sd.items()}
    elif variant == "no-nbt":
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    elif variant == "wrapped":
        sd = {"state_dict": sd, "epoch": 3}
    ckpt = C.load_any(_save_official(tmp_path, sd, form))
    assert ckpt.source_format == C.OFFICIAL_FORMAT
    assert ckpt.net.cfg == HSCNetConfig(width=W) and not ckpt.net.training
    assert ckpt.info.class_names == VOC_CLASSES and ckpt.info.bg_threshold == 0.22
    got = ckpt.net.state_dict()
    for k, v in ref.items():
        expected = torch.zeros((), dtype=torch.long) if variant == "no-nbt" and "num_batches" in k else v
        assert torch.equal(got[k], expected), k
    assert ckpt.sha256 == C.file_sha256(ckpt.path) and ckpt.banks == {}


def test_official_with_other_class_count(tmp_path):
    torch.save(small_net(k=5).state_dict(), tmp_path / "k5.pth")
    ckpt = C.load_any(tmp_path / "k5.pth", class_names=["a", "b", "c", "d", "e"])
    assert ckpt.net.cfg.num_classes == 5 and ckpt.class_names == ("a", "b", "c", "d", "e")
    assert "pass class_names" in error_of(C.load_any, tmp_path / "k5.pth")
    msg = error_of(C.load_any, tmp_path / "k5.pth", class_names=["a", "b"])
    assert "2 class names" in msg and "5 foreground classes" in msg and "6 rows" in msg


def test_width_and_dims_are_read_from_the_tensors():
    for width in (0.125, 0.25, 0.3, 0.5):
        sd = meta_net(width=width, num_classes=7, pixel_dim=32, roi_dim=48).state_dict()
        cfg = C.infer_net_config(sd)
        assert (cfg.num_classes, cfg.pixel_dim, cfg.roi_dim) == (7, 32, 48)
        C.check_state_dict(sd, cfg)  # the inferred width rebuilds exactly these shapes


def test_truncated_wrong_shapes_and_extra_keys_give_one_error_listing_all(tmp_path):
    sd = dict(small_net().state_dict())
    del sd["b7.conv_branch1.weight"], sd["bn7.running_var"]
    sd["f9.weight"] = torch.zeros(192, 190, 1, 1)
    sd["proj_fc.weight"] = torch.zeros(128, 100, 1, 1)
    sd["aux_head.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.pth")
    msg = error_of(C.load_any, tmp_path / "bad.pth")
    assert msg.startswith(f"{tmp_path / 'bad.pth'}: does not match an HSC network")
    assert "2 missing keys, 1 unexpected key, 2 shape mismatches" in msg
    for part in (
        "b7.conv_branch1.weight",
        "bn7.running_var",
        "aux_head.weight",
        "f9.weight: expected [192, 195, 1, 1], found [192, 190, 1, 1]",
        "proj_fc.weight: expected [128, 512, 1, 1], found [128, 100, 1, 1]",
    ):
        assert part in msg
    assert "Traceback" not in msg


def test_width_mismatch_lists_the_shape_differences(tmp_path):
    sd = dict(small_net().state_dict())
    sd["conv1a.weight"] = torch.zeros(16, 3, 3, 3)  # a width-0.25 stem on a width-0.125 network
    torch.save(sd, tmp_path / "w.pth")
    msg = error_of(C.load_any, tmp_path / "w.pth")
    assert "1 shape mismatch" in msg and "conv1a.weight: expected [8, 3, 3, 3], found [16, 3, 3, 3]" in msg
    # our format: the stored config says width 0.25, the tensors are width 0.125
    net = small_net(k=3)
    good = tmp_path / "good.safetensors"
    C.save_checkpoint(good, net, info=_info(net))
    bad = _rewrite_meta(good, tmp_path / "w.safetensors", net_config={**net.cfg.to_dict(), "width": 0.25})
    msg = error_of(C.load_checkpoint, bad)
    assert "width=0.25" in msg and "conv1a.weight: expected [16, 3, 3, 3], found [8, 3, 3, 3]" in msg
    assert "missing" not in msg and "unexpected" not in msg


def test_a_deeplab_file_is_not_an_hsc_checkpoint(tmp_path):
    deeplab = {
        "backbone.conv1.0.weight": torch.zeros(64, 3, 3, 3),
        "backbone.conv1.1.weight": torch.zeros(64),
        "aspp.c0.weight": torch.zeros(21, 2048, 3, 3),
    }
    torch.save(deeplab, tmp_path / "deeplab.pth")
    msg = error_of(C.load_any, tmp_path / "deeplab.pth")
    assert "242 missing keys, 3 unexpected keys" in msg and "aspp.c0.weight" in msg and "conv1a.weight" in msg
    assert "none of its keys is an HSC network key" in msg.splitlines()[0]


class _Marker:
    ran: list[str] = []


def _side_effect() -> _Marker:
    _Marker.ran.append("executed")
    return _Marker()


class _Evil:
    def __reduce__(self):
        return (_side_effect, ())


def test_files_that_are_not_checkpoints(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(small_net().state_dict(), good)
    data = good.read_bytes()
    cases = {
        "truncated.pth": data[: len(data) // 2],
        "flipped.pth": data[:100] + bytes(b ^ 0xFF for b in data[100:400]) + data[400:],
        "random.bin": np.random.default_rng(0).bytes(4096),
        "empty.pth": b"",
        "text.pth": b"not a checkpoint at all\n",
    }
    for name, blob in cases.items():
        p = tmp_path / name
        p.write_bytes(blob)
        msg = error_of(C.load_any, p)
        assert str(p) in msg and "\n" not in msg, msg
    msg = error_of(C.load_checkpoint, tmp_path / "random.bin")
    assert "not an hsc checkpoint" in msg
    st = tmp_path / "bad.safetensors"
    st.write_bytes(struct.pack("<Q", 20) + b'{"a": {"dtype": 1}}  ')
    assert "safetensors" in error_of(C.load_any, st)


def test_pickles_with_objects_are_refused_without_running_them(tmp_path):
    _Marker.ran.clear()
    torch.save({"conv1a.weight": torch.zeros(1), "x": _Evil()}, tmp_path / "evil.pth")
    assert _Marker.ran == []
    msg = error_of(C.load_any, tmp_path / "evil.pth")
    assert "refused to unpickle" in msg and "_side_effect" in msg and "weights_only=True" in msg
    assert _Marker.ran == []
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    assert "holds a list, not a state dict" in error_of(C.load_any, tmp_path / "list.pth")
    torch.save({"a": torch.zeros(1), "b": 3}, tmp_path / "mixed.pth")
    assert "'b' (int)" in error_of(C.load_any, tmp_path / "mixed.pth")


def test_missing_file_and_directory(tmp_path):
    for fn in (C.load_any, C.load_checkpoint, C.read_imagenet_weights):
        with pytest.raises(FileNotFoundError, match="no such file"):
            fn(tmp_path / "nope.pth")
        with pytest.raises(C.CheckpointNotFoundError):
            fn(tmp_path / "nope.pth")
    assert "not a regular file" in error_of(C.load_any, tmp_path)


def test_an_mxnet_file_is_not_an_hsc_checkpoint(tmp_path):
    p = write_params(tmp_path / "x.params", {"arg:conv1a_weight": np.zeros((2, 3), np.float32)}, "v1")
    assert "load_imagenet_weights" in error_of(C.load_any, p)


# ================================================================================ our format


BANK_SHAPES = {
    "memobank1": (21, 256),
    "memobank_fb": (2, 256),
    "memobank1_p": (21, 128),
    "memobank2": (21, 256),
    "memobank1_fb": (2, 256),
    "memobank2_p": (21, 128),
}


def _banks(seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in BANK_SHAPES.items()}


def _info(net: HSCNet, names=("cat", "dog", "bird")) -> ModelInfo:
    return ModelInfo(
        net=net.cfg,
        class_names=tuple(names),
        normalization=Normalization(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)),
        bg_threshold=0.3,
    )


def test_our_format_round_trips_exactly(tmp_path):
    net = small_net(k=3, seed=7)
    banks = _banks()
    train = {"lr": 0.01, "batch_size": 12, "steps": [1, 2], "paths": {"voc": "/data/voc"}, "flag": None}
    info = _info(net)
    digest = C.save_checkpoint(
        tmp_path / "m.safetensors",
        net,
        info=info,
        banks=banks,
        train_config=train,
        step=1234,
        extra={"run": "x"},
    )
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind
    ckpt = C.load_checkpoint(tmp_path / "m.safetensors")
    assert ckpt.sha256 == digest == C.file_sha256(tmp_path / "m.safetensors")
    assert_same_tensors(ckpt.net.state_dict(), net.state_dict())
    assert_same_tensors(ckpt.banks, banks)
    assert ckpt.info == info and ckpt.net.cfg == net.cfg and not ckpt.net.training
    assert ckpt.train_config == train and ckpt.step == 1234 and ckpt.source_format == C.FORMAT
    m = ckpt.meta
    assert (m["format"], m["format_version"]) == ("hsc-checkpoint", 1)
    assert m["class_names"] == ["cat", "dog", "bird"] and m["net_config"] == net.cfg.to_dict()
    assert (m["num_classes"], m["cam_channels"], m["background_channel"]) == (3, 4, 3)
    assert m["backbone"] == "resnet38d" and m["network_type"] == "hsc_eps_seam"
    assert (
        m["normalization"] == {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]} and m["bg_threshold"] == 0.3
    )
    assert m["software"]["torch"] == torch.__version__ and m["created_at"].endswith("+00:00")
    assert m["extra"] == {"run": "x"} and m["banks"] == list(BANK_SHAPES)
    assert m["num_parameters"] == sum(p.numel() for p in net.parameters())
    # the file is plain safetensors: the network keys are the official ones, the banks are prefixed
    raw = safetensors.torch.load_file(str(tmp_path / "m.safetensors"))
    assert set(raw) == set(net.state_dict()) | {f"banks.{k}" for k in BANK_SHAPES}
    # saving the loaded checkpoint again gives the same tensors and metadata (but created_at)
    C.save_checkpoint(
        tmp_path / "again.safetensors", ckpt.net, info=ckpt.info, banks=ckpt.banks,
        train_config=ckpt.train_config, step=ckpt.step, extra=m["extra"],
    )  # fmt: skip
    again = C.load_checkpoint(tmp_path / "again.safetensors")
    assert {k: v for k, v in again.meta.items() if k != "created_at"} == {
        k: v for k, v in m.items() if k != "created_at"
    }
    assert_same_tensors(again.net.state_dict(), net.state_dict())
    assert C.load_any(tmp_path / "m.safetensors").info == info


def test_our_format_banks_module_wrappers_and_overwrite(tmp_path):
    net = small_net(k=3)
    module = nn.Module()
    for k, v in _banks().items():
        module.register_buffer(k, v)
    p = tmp_path / "m.safetensors"
    p.write_bytes(b"old")
    C.save_checkpoint(p, nn.DataParallel(net), info=_info(net), banks=module)
    ckpt = C.load_checkpoint(p)
    assert_same_tensors(ckpt.banks, _banks()) and ckpt.train_config is None and ckpt.step is None
    assert_same_tensors(ckpt.net.state_dict(), net.state_dict())


def test_save_refuses_inconsistent_information(tmp_path):
    net = small_net(k=3)
    p = tmp_path / "m.safetensors"
    msg = error_of(C.save_checkpoint, p, net, info=_info(net, names=("a", "b")))
    assert "2 class names" in msg and "3 foreground classes" in msg
    assert "differs from the network's config" in error_of(
        C.save_checkpoint, p, net, info=ModelInfo(class_names=("a", "b", "c"))
    )
    assert "not JSON-serialisable" in error_of(
        C.save_checkpoint, p, net, info=_info(net), train_config={"p": Path("/")}
    )
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp file left


def _rewrite_meta(src: Path, dst: Path, **changes) -> Path:
    with safetensors.safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["hsc"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(changes)
    safetensors.torch.save_file(tensors, str(dst), metadata={"hsc": json.dumps(meta)})
    return dst


def test_load_refuses_inconsistent_files(tmp_path):
    net = small_net(k=3)
    good = tmp_path / "good.safetensors"
    C.save_checkpoint(good, net, info=_info(net))
    bad = _rewrite_meta(good, tmp_path / "names.safetensors", class_names=["a", "b", "c", "d"])
    assert "4 class names for a network with 3 foreground classes" in error_of(C.load_checkpoint, bad)
    bad = _rewrite_meta(
        good,
        tmp_path / "fc8.safetensors",
        class_names=list("abcd"),
        net_config={**net.cfg.to_dict(), "num_classes": 4},
    )
    assert "fc8.weight has 4 rows (expected 5" in error_of(C.load_checkpoint, bad)
    bad = _rewrite_meta(good, tmp_path / "new.safetensors", format_version=2)
    assert "newer hsc" in error_of(C.load_checkpoint, bad)
    bad = _rewrite_meta(good, tmp_path / "fmt.safetensors", format="something")
    assert "not 'hsc-checkpoint'" in error_of(C.load_checkpoint, bad)
    assert "stores class names" in error_of(C.load_any, good, class_names=["x", "y", "z"])
    # a bare safetensors state dict is not our format, but load_any reads it as an official file
    bare = tmp_path / "bare.safetensors"
    safetensors.torch.save_file(dict(net.state_dict()), str(bare))
    assert "without hsc metadata" in error_of(C.load_checkpoint, bare)
    assert C.load_any(bare, class_names=["a", "b", "c"]).net.cfg.num_classes == 3
    torch.save(net.state_dict(), tmp_path / "x.pth")
    assert "not a safetensors file" in error_of(C.load_checkpoint, tmp_path / "x.pth")


def test_convert_official(tmp_path):
    src = small_net(seed=2)
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, tmp_path / "HSC_eps_v2.pth")
    digest = C.convert_official(tmp_path / "HSC_eps_v2.pth", tmp_path / "out" / "hsc_voc.safetensors")
    ckpt = C.load_checkpoint(tmp_path / "out" / "hsc_voc.safetensors")
    assert ckpt.sha256 == digest
    assert ckpt.class_names == VOC_CLASSES and ckpt.info.bg_threshold == 0.22
    assert ckpt.info.net == HSCNetConfig(width=W) and ckpt.banks == {} and ckpt.train_config is None
    assert_same_tensors(ckpt.net.state_dict(), src.state_dict())
    conv = ckpt.meta["extra"]["converted_from"]
    assert conv["file"] == "HSC_eps_v2.pth" and conv["sha256"] == C.file_sha256(tmp_path / "HSC_eps_v2.pth")
    assert not any(n.startswith(".") for n in os.listdir(tmp_path / "out"))
