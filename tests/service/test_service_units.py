"""In-process checks of the service's pure parts (label and option parsing, chunking) and of its
import hygiene: the API process never imports torch nor the worker's code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hsc.service.errors import Problem
from hsc.service.options import parse_options, resolve_labels, resolve_model, split_labels
from hsc.service.runner import chunk_ranges
from hsc.service.submit import safe_item_id

CARD = {"id": "m", "sha256": "abcdef0123", "classes": ["background", "Dog", "cat", "person"]}


def test_the_api_process_never_imports_torch_nor_the_worker(tmp_path):
    """Importing the app, and serving in embedded mode until the pool has loaded the models (in the
    pool's processes), leave torch, hsc.model and hsc.worker out of the API process."""
    code = f"""
import sys, time
from fastapi.testclient import TestClient
from hsc.core.settings import Settings
import hsc.service.main as m
app = m.create_app(Settings(results_dir={str(tmp_path)!r}, device="cpu"))
ours = ("torch", "hsc.worker", "hsc.model", "hsc.training")
bad = lambda: sorted(k for k in sys.modules if k.startswith(ours) and k.split(".")[0] in ("torch", "hsc"))
print(bad())
with TestClient(app) as c:
    end = time.time() + 60
    while c.get("/readyz").status_code != 200 and time.time() < end:
        time.sleep(0.1)
    print(c.get("/readyz").json()["ready"], c.get("/models").json()["default"])
print(bad())
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split("\n")[:3] == ["[]", "True hsc-demo-synth", "[]"], out.stdout + out.stderr


def test_labels_by_name_or_index_in_any_form():
    assert split_labels(["dog, Cat", "3"]) == ["dog", "Cat", 3]
    assert split_labels(['["dog", 2]']) == ["dog", 2]
    assert split_labels([["person", 1]]) == ["person", 1]
    assert resolve_labels(CARD, ["DOG", 2, "background", 0]) == (0, 1)  # VOC label space -> channels
    assert resolve_labels(CARD, [3, "cat"]) == (1, 2)


@pytest.mark.parametrize(
    ("labels", "code"),
    [
        (["horse"], "unknown_class"),
        ([4], "unknown_class"),
        ([-1], "unknown_class"),
        (["background"], "no_labels"),
        ([], "no_labels"),
    ],
)
def test_bad_labels(labels, code):
    with pytest.raises(Problem) as e:
        resolve_labels(CARD, labels)
    assert e.value.code == code and e.value.status == 422
    assert e.value.extra["valid_classes"] == ["Dog", "cat", "person"]


def test_options_and_models():
    o = parse_options({"crf": "off", "bg_threshold": "0.25", "outputs": "cams, heatmaps"})
    assert (o.crf, o.bg_threshold, o.outputs) == (False, 0.25, ("cams", "heatmaps", "mask"))
    assert parse_options({}) == parse_options({"crf": "", "bg_threshold": ""})
    for bad in ({"crf": "perhaps"}, {"bg_threshold": "-0.1"}, {"bg_threshold": "nan"}, {"outputs": "gif"}):
        with pytest.raises(Problem) as e:
            parse_options(bad)
        assert e.value.code == "invalid_option"
    with pytest.raises(Problem, match="labels"):
        parse_options({"labels": "x"}, strict=True)
    other = {**CARD, "id": "n"}
    assert resolve_model([CARD, other], None, None)["id"] == "m"
    assert resolve_model([CARD, other], None, "n")["id"] == "n"
    assert resolve_model([CARD, other], "m@abc", None)["id"] == "m"
    for wanted in ("x", "m@fff"):
        with pytest.raises(Problem) as e:
            resolve_model([CARD, other], wanted, None)
        assert e.value.status == 404


def test_chunk_ranges_cover_exactly_the_pending_items():
    assert chunk_ranges(range(10), 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_ranges([0, 1, 5, 6, 7, 9], 2) == [(0, 2), (5, 7), (7, 8), (9, 10)]
    assert chunk_ranges([], 4) == []
    pending = [3, 4, 8, 11, 12, 13, 14, 15]
    covered = [i for a, b in chunk_ranges(pending, 3) for i in range(a, b)]
    assert covered == pending


def test_item_ids_are_file_name_safe():
    assert safe_item_id("my photo (1).JPG") == "my_photo_1"
    assert safe_item_id("../../etc/passwd") == "passwd"
    assert safe_item_id(".hidden") == "hidden"
    assert safe_item_id("") == "image"


def test_default_model_and_cards_from_heartbeats(tmp_path):
    from hsc.core.settings import Settings
    from hsc.service.options import default_model_id
    from hsc.service.runner import _aggregate_cards

    s = Settings(results_dir=tmp_path, checkpoints=["/ckpt/first.safetensors", "/ckpt/HSC_eps_v2.pth"])
    assert default_model_id(s) == "first"
    assert default_model_id(Settings(results_dir=tmp_path, default_model="HSC_eps_v2")) == "HSC_eps_v2"
    beats = [("w1", [CARD, {"id": "broken"}, "junk"]), ("w2", [{**CARD, "id": "n"}, CARD])]
    cards = _aggregate_cards(beats)  # type: ignore[arg-type]
    assert [(c["id"], c["workers"]) for c in cards] == [("m", ["w1", "w2"]), ("n", ["w2"])]
