"""The predictor (model/predictor.py): labels by name or index, masks and sizes, CRF, heatmaps, settings,
the exact mode equal to ``multiscale_cam`` (and to the golden CAMs), the fast mode close to it.

Width-0.125 networks keep most tests fast; the golden check and the fast/exact agreement use the
width-1.0 seeded weights of the golden file (docs/golden.md section 3).
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from hsc.model.cam import cams_to_label, crf_from_cams, crf_to_label, multiscale_cam
from hsc.model.checkpoint import save_checkpoint
from hsc.model.classes import VOC_CLASSES
from hsc.model.config import HSCNetConfig, ModelInfo
from hsc.model.hsc_net import HSCNet, build_hsc_net
from hsc.model.predictor import (
    DEFAULT_OUTPUTS,
    Prediction,
    Predictor,
    cudnn_conv_ieee_fp32,
    resolve_device,
)
from hsc.model.visualize import heatmap_overlay
from hsc.training.demo import generated_image

from goldenlib import assert_label_map, assert_summary, build_inputs, case, seeded_weights

W = 0.125


def small_net(k: int = 20, seed: int = 0) -> HSCNet:
    torch.manual_seed(seed)
    return build_hsc_net(num_classes=k, width=W).eval()


@functools.lru_cache(maxsize=2)
def voc_predictor(mode: str = "exact") -> Predictor:
    return Predictor(small_net(), ModelInfo(net=HSCNetConfig(width=W)), device="cpu", mode=mode)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=1)
def seeded_net_state() -> dict[str, torch.Tensor]:
    return seeded_weights()


def seeded_predictor(mode: str, **kwargs: Any) -> Predictor:
    net = build_hsc_net()
    net.load_state_dict(seeded_net_state(), strict=True)
    return Predictor(net, ModelInfo(), device="cpu", mode=mode, **kwargs)  # type: ignore[arg-type]


def image(h: int = 45, w: int = 61, seed: int = 0) -> np.ndarray:
    return generated_image(w, h, seed)


# ----------------------------------------------------------------------------- labels


def test_names_and_indices_are_the_same_classes():
    p = voc_predictor()
    dog, person = VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")
    assert p.class_indices(["dog", "person"]) == (dog, person)
    assert p.class_indices([person, dog]) == (dog, person)  # ascending
    assert p.class_indices(["person", dog, np.int64(person)]) == (dog, person)  # mixed, merged
    assert p.class_indices("dog") == (dog,)  # one string is one name
    assert p.class_indices(np.array([person, dog])) == (dog, person)
    img = image()
    by_name = p.predict(img, ["dog", "person"])
    by_index = p.predict(img, [person, dog])
    assert by_name.classes == by_index.classes == (dog, person)
    assert by_name.class_names == ("dog", "person")
    assert np.array_equal(by_name.cams, by_index.cams) and np.array_equal(by_name.mask, by_index.mask)
    assert by_name.label_names == {0: "background", dog + 1: "dog", person + 1: "person"}


def test_names_ignore_case_and_spaces():
    p = voc_predictor()
    assert p.class_indices(["DOG", " Person ", "pottedPlant"]) == p.class_indices(
        ["dog", "person", "pottedplant"]
    )


def test_unknown_names_list_the_valid_names():
    p = voc_predictor()
    with pytest.raises(ValueError) as e:
        p.predict(image(), ["dog", "unicorn"])
    msg = str(e.value)
    assert "'unicorn'" in msg and "'dog'" not in msg.split("valid")[0]
    assert all(name in msg for name in VOC_CLASSES)
    with pytest.raises(ValueError, match="background is implicit"):
        p.class_indices(["Background"])


@pytest.mark.parametrize(
    "labels,err,match",
    [
        ([], ValueError, "empty"),
        ((), ValueError, "empty"),
        ([20], ValueError, r"out of range \[0, 20\)"),
        ([-1], ValueError, "out of range"),
        ([True], TypeError, "class name or an integer"),
        ([1.0], TypeError, "class name or an integer"),
    ],
)
def test_bad_labels(labels, err, match):
    with pytest.raises(err, match=match):
        voc_predictor().predict(image(), labels)


def test_class_names_come_from_the_info_and_must_fit():
    net = small_net(k=3)
    info = ModelInfo(net=HSCNetConfig(num_classes=3, width=W), class_names=("Cat", "dog", "Tree"))
    p = Predictor(net, info, device="cpu")
    assert p.class_indices(["tree", "CAT"]) == (0, 2)
    with pytest.raises(ValueError, match="2 class names for a network with 3"):
        Predictor(small_net(k=3), ModelInfo(class_names=("a", "b")), device="cpu")
    with pytest.raises(ValueError, match="equal ignoring case"):
        Predictor(small_net(k=3), ModelInfo(class_names=("a", "A", "b")), device="cpu")
    generic = Predictor(small_net(k=3), ModelInfo(), device="cpu")  # no names: class_0, class_1, ...
    assert generic.class_names == ("class_0", "class_1", "class_2")


# ----------------------------------------------------------------------------- masks and outputs


@pytest.mark.parametrize("size", [(45, 61), (37, 50), (20, 33)])
def test_mask_holds_only_labelled_classes_at_the_original_size(size):
    p = voc_predictor()
    img = image(*size, seed=size[0])
    labels = ["cat", "horse", "bus"]
    allowed = {0} | {VOC_CLASSES.index(n) + 1 for n in labels}
    for thr in (None, 0.0, 0.22, 0.5, 1.0):
        pred = p.predict(img, labels, bg_threshold=thr)
        assert pred.image_size == size
        assert pred.mask is not None and pred.mask.shape == size and pred.mask.dtype == np.uint8
        assert pred.cams is not None and pred.cams.shape == (3, *size) and pred.cams.dtype == np.float32
        assert set(np.unique(pred.mask).tolist()) <= allowed
        assert 0.0 <= pred.cams.min() and pred.cams.max() < 1.0
        assert np.array_equal(
            pred.mask, cams_to_label(pred.cams, pred.classes, pred.settings["bg_threshold"])
        )
    assert np.all(p.predict(img, labels, bg_threshold=1.0).mask == 0)


def test_default_threshold_comes_from_the_checkpoint_info():
    info = ModelInfo(net=HSCNetConfig(width=W), bg_threshold=0.4)
    p = Predictor(small_net(), info, device="cpu")
    img = image()
    pred = p.predict(img, ["dog", "cat"])
    assert pred.settings["bg_threshold"] == 0.4
    assert np.array_equal(pred.mask, cams_to_label(pred.cams, pred.classes, 0.4))
    assert p.predict(img, ["dog"], bg_threshold=0.1).settings["bg_threshold"] == 0.1


def test_crf_on_and_off():
    p = voc_predictor()
    img = image(40, 52, seed=4)
    labels = ["car", "person"]
    off = p.predict(img, labels)
    on = p.predict(img, labels, crf=True)
    q, keys = crf_from_cams(img, off.cams, off.classes, alpha=7, iters=8)
    assert np.array_equal(on.mask, crf_to_label(q, keys))
    assert np.array_equal(on.cams, off.cams)  # the CAMs do not depend on the CRF
    assert set(np.unique(on.mask).tolist()) <= {
        0,
        VOC_CLASSES.index("car") + 1,
        VOC_CLASSES.index("person") + 1,
    }
    assert on.settings["crf"] and on.settings["mask_from"] == "crf"
    assert (on.settings["crf_iters"], on.settings["crf_alpha"]) == (8, 7)
    assert on.settings["crf_pairwise"]["bilateral_sxy"] == 80
    assert (
        not off.settings["crf"]
        and off.settings["mask_from"] == "threshold"
        and "crf_iters" not in off.settings
    )
    assert on.timings["crf"] > 0.0 and off.timings["crf"] == 0.0
    other = p.predict(img, labels, crf=True, crf_iters=2, crf_alpha=4)
    q2, keys2 = crf_from_cams(img, off.cams, off.classes, alpha=4, iters=2)
    assert np.array_equal(other.mask, crf_to_label(q2, keys2))
    with pytest.raises(ValueError, match="crf_iters"):
        p.predict(img, labels, crf=True, crf_iters=-1)
    with pytest.raises(ValueError, match="crf_alpha"):
        p.predict(img, labels, crf=True, crf_alpha=0)


def test_read_only_images_as_pillow_gives_them():
    img = image(30, 40, seed=5)
    ro = np.asarray(Image.fromarray(img))
    assert not ro.flags.writeable
    p = voc_predictor()
    a = p.predict(ro, ["dog"], crf=True, outputs={"mask", "heatmaps"})
    b = p.predict(img, ["dog"], crf=True, outputs={"mask", "heatmaps"})
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.heatmaps["dog"], b.heatmaps["dog"])


def test_outputs_and_heatmaps():
    p = voc_predictor()
    img = image(33, 47, seed=2)
    pred = p.predict(img, ["sheep", "cow"], outputs={"mask", "cams", "heatmaps"})
    assert set(pred.heatmaps) == {"cow", "sheep"}
    for name, cam in zip(pred.class_names, pred.cams):
        hm = pred.heatmaps[name]
        assert hm.shape == (33, 47, 3) and hm.dtype == np.uint8
        assert np.array_equal(hm, heatmap_overlay(img, cam))
    only_mask = p.predict(img, ["sheep"], outputs={"mask"})
    assert only_mask.cams is None and only_mask.heatmaps == {} and only_mask.mask is not None
    only_cams = p.predict(img, ["sheep"], outputs="cams", crf=True)
    assert only_cams.mask is None and only_cams.cams is not None and only_cams.timings["crf"] == 0.0
    assert p.predict(img, ["sheep"]).heatmaps == {} and DEFAULT_OUTPUTS == {"mask", "cams"}
    with pytest.raises(ValueError, match="unknown outputs"):
        p.predict(img, ["sheep"], outputs={"mask", "probs"})


def test_settings_and_timings_are_recorded_and_json_able():
    pred = voc_predictor().predict(image(), ["dog"], crf=True)
    assert isinstance(pred, Prediction)
    s = pred.settings
    assert s["mode"] == "exact" and s["device"] == "cpu" and s["dtype"] == "float32"
    assert s["scales"] == [0.5, 1.0, 1.5, 2.0] and s["flip"] is True and s["bg_threshold"] == 0.22
    assert s["channels_last"] is True and s["batch_flips"] is False  # the CPU defaults
    json.dumps(s)
    assert set(pred.timings) == {"network", "crf", "postprocess", "total"}
    assert all(math.isfinite(v) and v >= 0 for v in pred.timings.values())
    assert pred.timings["total"] >= pred.timings["network"] + pred.timings["crf"]


def test_bad_images_and_arguments():
    p = voc_predictor()
    with pytest.raises(ValueError, match="uint8"):
        p.predict(image().astype(np.float32), ["dog"])
    with pytest.raises(ValueError, match="3 channels"):
        p.predict(image()[..., :2], ["dog"])
    with pytest.raises(ValueError, match="finite"):
        p.predict(image(), ["dog"], bg_threshold=float("nan"))
    with pytest.raises(ValueError, match="mode"):
        Predictor(small_net(), ModelInfo(), device="cpu", mode="turbo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fast"):
        Predictor(small_net(), ModelInfo(), device="cpu", autocast_dtype=torch.bfloat16)


def test_predictor_owns_an_eval_network_and_custom_scales():
    net = small_net()
    net.train()
    p = Predictor(net, ModelInfo(), device="cpu", scales=(1.0,), flip=False)
    assert not p.net.training and not any(q.requires_grad for q in p.net.parameters())
    img = image()
    pred = p.predict(img, ["dog"])
    ref = multiscale_cam(
        p.net, img, [VOC_CLASSES.index("dog")], scales=(1.0,), flip=False, channels_last=True
    )
    assert np.array_equal(pred.cams, ref.cams.numpy())
    assert pred.settings["scales"] == [1.0] and pred.settings["flip"] is False
    with pytest.raises(ValueError, match="scales"):
        Predictor(small_net(), ModelInfo(), device="cpu", scales=())


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("nonsense:0:1")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_exact_mode_switches_tf32_off_for_cudnn_and_restores_it():
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        before = conv.fp32_precision
        with cudnn_conv_ieee_fp32():
            assert conv.fp32_precision == "ieee"
        assert conv.fp32_precision == before
    else:
        before = torch.backends.cudnn.allow_tf32
        with cudnn_conv_ieee_fp32():
            assert not torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.allow_tf32 == before


# ----------------------------------------------------------------------------- checkpoints


def test_from_checkpoint(tmp_path):
    net = small_net(k=3, seed=1)
    info = ModelInfo(net=net.cfg, class_names=("road", "car", "tree"), bg_threshold=0.3)
    path = tmp_path / "m.safetensors"
    digest = save_checkpoint(path, net, info=info)
    p = Predictor.from_checkpoint(path, device="cpu")
    assert p.class_names == ("road", "car", "tree") and p.checkpoint_sha256 == digest
    img = image()
    pred = p.predict(img, ["Tree", "road"])
    assert pred.classes == (0, 2) and pred.settings["bg_threshold"] == 0.3
    assert pred.settings["checkpoint_sha256"] == digest
    ref = multiscale_cam(small_net(k=3, seed=1), img, [0, 2])  # a plain (contiguous) copy
    np.testing.assert_allclose(pred.cams, ref.cams.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="valid names: road, car, tree"):
        p.predict(img, ["dog"])
    fast = Predictor.from_checkpoint(path, device="cpu", mode="fast")
    assert fast.mode == "fast" and fast.predict(img, ["car"]).settings["dtype"] == "bfloat16"


# ----------------------------------------------------------------------------- exact and fast


@pytest.mark.parametrize("labels", [["dog"], ["aeroplane", "person", "tvmonitor"]])
def test_exact_mode_is_multiscale_cam(labels):
    """Exact mode = ``multiscale_cam`` in float32: bit for bit with the predictor's memory layout and
    one-pass-at-a-time (the CPU defaults), within 1e-5 of the default contiguous, batched call."""
    p = voc_predictor("exact")
    img = image(43, 58, seed=7)
    pred = p.predict(img, labels)
    classes = list(p.class_indices(labels))
    same = multiscale_cam(p.net, img, classes, channels_last=True, batch_flips=False)
    assert pred.classes == same.classes
    assert np.array_equal(pred.cams, same.cams.numpy())
    plain = multiscale_cam(small_net(), img, classes)  # the golden-tested default path, own copy
    np.testing.assert_allclose(pred.cams, plain.cams.numpy(), atol=1e-5)
    contiguous = Predictor(small_net(), ModelInfo(), device="cpu", channels_last=False, batch_flips=True)
    assert np.array_equal(contiguous.predict(img, labels).cams, plain.cams.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("winograd", [False, True])
def test_exact_mode_reproduces_the_golden_cams_at_width_1(winograd):
    """The golden inference case (seeded width-1.0 weights) through the predictor: CAMs within 1e-4
    of the official ones, thresholded masks equal; also with float32 Winograd for the wide 3x3s."""
    c = case("inference_one_image")
    ns = build_inputs(c)
    img = ns["img"].numpy()
    classes = [int(i) for i in torch.nonzero(ns["label"] > 1e-5).flatten()]
    p = seeded_predictor("exact", winograd=winograd)
    assert len(p.winograd_layers) == (24 if winograd else 0)  # the 3x3s with >= 256 channels
    pred = p.predict(img, [VOC_CLASSES[i] for i in classes])
    (cam_npy,) = [v for k, v in c.items() if k.startswith("cam_npy")]
    assert sorted(int(k) for k in cam_npy) == list(pred.classes) == classes
    for k, summary in cam_npy.items():
        assert_summary(torch.from_numpy(pred.cams[pred.classes.index(int(k))]), summary, "abs", what=k)
    runs = [c[k] for k in c if k.startswith("run_")]
    assert runs
    for spec in runs:
        for key, value in spec.items():
            if key.startswith("label_png"):
                mask = p.predict(img, classes, bg_threshold=spec["thr"], outputs={"mask"}).mask
                assert_label_map(mask, value, what=key)


@pytest.mark.slow
def test_fast_mode_agrees_with_exact_on_99_percent_of_pixels():
    """Seeded width-1.0 weights (docs/golden.md section 3), a 96x128 generated image, threshold 0.22;
    the fast mode with direct bfloat16 convolutions and with Winograd (the larger rounding error)."""
    exact = seeded_predictor("exact", winograd=False)  # the direct float32 convolutions
    img = generated_image(128, 96, seed=1)
    a = exact.predict(img, ["aeroplane", "person"])
    assert not a.settings["winograd"] and exact.winograd_layers == ()
    for winograd in (False, True):
        fast = seeded_predictor("fast", winograd=winograd)
        assert fast.dtype == torch.bfloat16 and fast.channels_last
        assert len(fast.winograd_layers) == (
            24 if winograd else 0
        )  # the CAM path's 3x3s with >= 256 channels
        b = fast.predict(img, ["aeroplane", "person"])
        assert (
            b.settings["mode"] == "fast" and b.settings["dtype"] == "bfloat16" and b.settings["channels_last"]
        )
        assert b.settings["winograd"] is winograd
        assert a.classes == b.classes and b.cams.dtype == np.float32 and b.cams.shape == a.cams.shape
        agreement = float((a.mask == b.mask).mean())
        assert agreement >= 0.99, (winograd, agreement)
        diff = np.abs(a.cams - b.cams)
        assert diff.max() < 0.05 and diff.mean() < 0.01, (winograd, diff.max(), diff.mean())


def test_fast_mode_at_width_0125_runs_and_stays_close():
    exact, fast = voc_predictor("exact"), voc_predictor("fast")
    img = image(40, 56, seed=3)
    a = exact.predict(img, ["cat", "dog"], crf=True)
    b = fast.predict(img, ["cat", "dog"], crf=True)
    assert b.mask.shape == a.mask.shape and set(np.unique(b.mask).tolist()) <= {0, 8, 12}
    assert np.abs(a.cams - b.cams).max() < 0.1


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_network_gives_the_same_cams():
    """``compile=True`` (inductor, dynamic shapes): one compilation serves every scale and image size."""
    plain, compiled = voc_predictor("exact"), Predictor(small_net(), ModelInfo(), device="cpu", compile=True)
    assert compiled.warm_up() > 0  # compiles on a small grey image
    for size in ((41, 57), (30, 44)):
        img = image(*size, seed=size[0])
        a, b = plain.predict(img, ["dog", "cat"]), compiled.predict(img, ["dog", "cat"])
        np.testing.assert_allclose(b.cams, a.cams, atol=1e-5)
        assert b.settings["compiled"] and not a.settings["compiled"]


# ----------------------------------------------------------------------------- streams


@pytest.mark.slow
def test_predict_many_with_a_crf_process_pool_equals_predict():
    p = voc_predictor()
    items = [(image(30 + i, 41, seed=i), ["dog", "cat"] if i % 2 else ["bus"]) for i in range(3)]
    seq = [p.predict(img, lab, crf=True) for img, lab in items]
    par = list(p.predict_many(items, crf=True, crf_workers=1))
    plain = list(p.predict_many(items, crf=True))
    assert len(par) == len(plain) == 3
    for s, a, b in zip(seq, par, plain):
        assert np.array_equal(s.mask, a.mask) and np.array_equal(s.mask, b.mask)
        assert np.array_equal(s.cams, a.cams) and a.timings["crf"] > 0
    with pytest.raises(ValueError, match="crf_workers"):
        list(p.predict_many(items, crf=True, crf_workers=-1))


def _mixed_size_items() -> list[tuple[np.ndarray, object]]:
    """Five images in two sizes, interleaved; one with labels="auto"."""
    sizes = [(30, 41), (33, 40), (30, 41), (30, 41), (33, 40)]
    labels: list[object] = [["bus"], ["dog", "cat"], "auto", ["person"], ["train", "sofa", "cow"]]
    return [(image(h, w, seed=i), lab) for i, ((h, w), lab) in enumerate(zip(sizes, labels))]


@pytest.mark.parametrize("crf_workers", [0, 1])
def test_predict_many_batches_images_of_one_size_and_equals_predict(crf_workers):
    p = voc_predictor()
    items = _mixed_size_items()
    seq = [p.predict(img, lab, crf=True) for img, lab in items]
    calls: list[int] = []
    forward = p._cam_net.forward_cam

    def counting(x):
        calls.append(x.shape[0])
        return forward(x)

    p._cam_net.forward_cam = counting  # type: ignore[method-assign]
    try:
        got = list(p.predict_many(items, crf=True, crf_workers=crf_workers, batch_images=3))
    finally:
        del p._cam_net.forward_cam
    # windows [0, 1, 2] and [3, 4]: per scale, the 41x30 pair (two images x flip) in one forward;
    # an image alone runs its two inputs one at a time (the CPU's batch_flips=False), so 40x33 in
    # the first window, then 41x30 and 40x33 in the second; plus the "auto" image's classifier pass
    assert sorted(calls) == sorted([1] + [4] * 4 + [1] * 8 + [1] * 16)
    assert len(got) == len(items)
    for s, g, (img, _) in zip(seq, got, items):
        assert g.image_size == img.shape[:2] and g.classes == s.classes
        np.testing.assert_allclose(g.cams, s.cams, rtol=0, atol=1e-5)
        assert float((g.mask == s.mask).mean()) >= 0.999
        assert g.timings["network"] > 0 and g.settings["batch_images"] == 1  # the predictor's default
    assert got[2].labels_source == "predicted"


def test_a_windows_crfs_run_while_the_network_works_on_the_next_window():
    p = voc_predictor()
    items = [(image(30, 41, seed=i), ["dog"]) for i in range(4)]
    calls: list[int] = []
    forward = p._cam_net.forward_cam

    def counting(x):
        calls.append(x.shape[0])
        return forward(x)

    p._cam_net.forward_cam = counting  # type: ignore[method-assign]
    try:
        stream = p.predict_many(items, crf=True, crf_workers=1, batch_images=2)
        first = next(stream)
        forwards_before_first_result = len(calls)
        rest = list(stream)
    finally:
        del p._cam_net.forward_cam
    # 4 scales x one forward of 2 images x flip per window: both windows ran before the first result
    assert forwards_before_first_result == 8 and calls == [4] * 8
    assert len(rest) == 3 and all(r.mask is not None for r in [first, *rest])


def test_batch_images_defaults_and_checks():
    p = voc_predictor()
    assert p.batch_images == 1  # CPU
    net = small_net()
    assert (
        Predictor(net, ModelInfo(net=HSCNetConfig(width=W)), device="cpu", batch_images=3).batch_images == 3
    )
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_images"):
            Predictor(small_net(), ModelInfo(net=HSCNetConfig(width=W)), device="cpu", batch_images=bad)
        with pytest.raises(ValueError, match="batch_images"):
            list(p.predict_many([(image(), ["dog"])], batch_images=bad))


def test_out_of_memory_splits_the_batch_and_keeps_the_smaller_size():
    p = Predictor(small_net(), ModelInfo(net=HSCNetConfig(width=W)), device="cpu", batch_images=4)
    items = [(image(30, 41, seed=i), ["dog"]) for i in range(4)]
    want = [p.predict(img, lab) for img, lab in items]
    forward = p._cam_net.forward_cam
    seen: list[int] = []

    def small_memory(x):  # two inputs (one image and its flip) fit, more do not
        seen.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(x)

    p._cam_net.forward_cam = small_memory  # type: ignore[method-assign]
    try:
        with pytest.warns(RuntimeWarning, match="out of memory") as rec:
            got = list(p.predict_many(items))
    finally:
        del p._cam_net.forward_cam
    assert [str(w.message) for w in rec] == [
        "out of memory with 4 images per batch: going on with 2",
        "out of memory with 2 images per batch: going on with 1",
    ]
    assert p.batch_images == 1  # 4 -> 2 -> 1
    assert seen[:2] == [8, 4]  # the first scale tried with 4 images, then with 2
    for w, g in zip(want, got):
        np.testing.assert_allclose(g.cams, w.cams, rtol=0, atol=1e-5)
    p._cam_net.forward_cam = lambda x: (_ for _ in ()).throw(torch.OutOfMemoryError("one image"))  # type: ignore[method-assign]
    try:
        with pytest.raises(torch.OutOfMemoryError):
            p.predict(items[0][0], ["dog"])  # one image that does not fit: the error goes up
    finally:
        del p._cam_net.forward_cam


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cuda_exact_matches_cpu_and_fast_agrees():
    cpu = voc_predictor("exact")
    gpu = Predictor(small_net(), ModelInfo(net=HSCNetConfig(width=W)), device="cuda", mode="exact")
    gpu_fast = Predictor(small_net(), ModelInfo(net=HSCNetConfig(width=W)), device="cuda", mode="fast")
    img = image(64, 80, seed=9)
    a = cpu.predict(img, ["dog", "person"])
    b = gpu.predict(img, ["dog", "person"], crf=True)
    f = gpu_fast.predict(img, ["dog", "person"])
    assert b.settings["device"].startswith("cuda")
    assert np.abs(a.cams - b.cams).max() < 1e-4
    assert float((a.mask == f.mask).mean()) >= 0.99
