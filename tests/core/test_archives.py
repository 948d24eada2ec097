"""Archives (core/archives.py): safe extraction of uploads, job items of a dataset, result zips."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from hsc.core import archives
from hsc.core.archives import (
    ARCHIVE_FORMATS,
    ArchiveError,
    extract_upload,
    item_id_from,
    items_from_index,
    iter_archive,
    labelmap_text,
)
from hsc.core.datasets import DatasetIndex, Item
from hsc.core.encoders import labelstudio_results_to_label, png_to_label, voc_palette
from hsc.core.jobs import JobItem, is_safe_name

LIMITS = dict(max_bytes=1 << 20, max_files=50)

# --------------------------------------------------------------------------------------------------
# extraction


def _zip(path: Path, entries: dict[str, bytes], **kw) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, **kw) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, **kw) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def test_extracts_a_zip_and_returns_its_only_folder(tmp_path):
    arc = _zip(tmp_path / "u.zip", {"data/manifest.jsonl": b"{}\n", "data/img/a.jpg": b"jpeg", "data/": b""})
    root = extract_upload(arc, tmp_path / "out", **LIMITS)
    assert root == tmp_path / "out" / "data"
    assert (root / "img" / "a.jpg").read_bytes() == b"jpeg"
    arc2 = _zip(tmp_path / "flat.zip", {"manifest.jsonl": b"{}\n", "./img/b.jpg": b"x"})
    assert extract_upload(arc2, tmp_path / "flat", **LIMITS) == tmp_path / "flat"
    assert (tmp_path / "flat" / "img" / "b.jpg").read_bytes() == b"x"


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_extracts_tars(tmp_path, mode):
    members = [(_info("d", tarfile.DIRTYPE, mode=0o777), None), (_info("d/x.txt", mode=0o4755), b"hello")]
    arc = _tar(tmp_path / "u.tar", members, mode)
    root = extract_upload(arc, tmp_path / "out", **LIMITS)
    assert (root / "x.txt").read_bytes() == b"hello"
    assert not os.stat(root / "x.txt").st_mode & stat.S_ISUID  # archive modes are not applied


def _assert_refused(arc: Path, dest: Path, code: str, match: str, **limits) -> None:
    with pytest.raises(ArchiveError, match=match) as e:
        extract_upload(arc, dest, **{**LIMITS, **limits})
    assert e.value.code == code and e.value.status == (413 if code == "too_large" else 422)
    assert list(dest.iterdir()) == []  # nothing left behind


@pytest.mark.parametrize(
    "name, match",
    [
        ("/etc/passwd", "absolute"),
        ("C:/x.txt", "absolute"),
        ("../escape.txt", r"\.\."),
        ("a/../../escape.txt", r"\.\."),
        ("a\\..\\..\\escape.txt", r"\.\."),
    ],
)
def test_refuses_paths_outside(tmp_path, name, match):
    arc = _zip(tmp_path / "u.zip", {"ok.txt": b"1", name: b"evil"})
    _assert_refused(arc, tmp_path / "out", "invalid_archive", match)
    arc = _tar(tmp_path / "u.tgz", [(_info("ok.txt"), b"1"), (_info(name), b"evil")])
    _assert_refused(arc, tmp_path / "out2", "invalid_archive", match)
    assert not (tmp_path / "escape.txt").exists()


@pytest.mark.parametrize(
    "info, match",
    [
        (_info("link", tarfile.SYMTYPE, linkname="/etc/passwd"), "link"),
        (_info("hard", tarfile.LNKTYPE, linkname="ok.txt"), "link"),
        (_info("dev", tarfile.CHRTYPE, devmajor=1, devminor=3), "device"),
        (_info("fifo", tarfile.FIFOTYPE), "device"),
    ],
)
def test_refuses_links_and_devices_in_tars(tmp_path, info, match):
    arc = _tar(tmp_path / "u.tgz", [(_info("ok.txt"), b"1"), (info, None)])
    _assert_refused(arc, tmp_path / "out", "invalid_archive", match)


def test_refuses_links_devices_and_encryption_in_zips(tmp_path):
    for kind, match in ((stat.S_IFLNK, "link"), (stat.S_IFCHR, "device"), (stat.S_IFIFO, "device")):
        arc = tmp_path / f"{kind}.zip"
        with zipfile.ZipFile(arc, "w") as zf:
            zf.writestr("ok.txt", b"1")
            zi = zipfile.ZipInfo("special")
            zi.external_attr = (kind | 0o777) << 16
            zf.writestr(zi, b"/etc/passwd")
        _assert_refused(arc, tmp_path / f"out{kind}", "invalid_archive", match)
    arc = tmp_path / "enc.zip"
    _zip(arc, {"secret.txt": b"not really encrypted"})
    data = bytearray(arc.read_bytes())  # zipfile cannot encrypt: set the "encrypted" flag bit by hand
    data[6] |= 1  # local header at offset 0, general purpose flags at +6
    central = data.index(b"PK\x01\x02")
    data[central + 8] |= 1  # central directory entry: flags at +8
    arc.write_bytes(bytes(data))
    with zipfile.ZipFile(arc) as zf:
        assert zf.getinfo("secret.txt").flag_bits & 1
    _assert_refused(arc, tmp_path / "enc", "invalid_archive", "encrypted")


def test_refuses_zip_bombs_while_extracting(tmp_path):
    arc = _zip(tmp_path / "bomb.zip", {"a.txt": b"ok", "zeros.bin": bytes(8 << 20)})
    assert arc.stat().st_size < 100_000
    _assert_refused(arc, tmp_path / "out", "too_large", "more than 1048576 bytes")
    # a bomb whose central directory lies about its size: stopped by the size check or the CRC
    lying = tmp_path / "lying.zip"
    with zipfile.ZipFile(lying, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", bytes(8 << 20))
        zf.getinfo("zeros.bin").file_size = 10
    with zipfile.ZipFile(lying) as zf:
        assert zf.getinfo("zeros.bin").file_size == 10
    with pytest.raises(ArchiveError) as e:
        extract_upload(lying, tmp_path / "out2", max_bytes=1 << 24, max_files=50)
    assert e.value.code in ("invalid_archive", "too_large")
    assert list((tmp_path / "out2").iterdir()) == []
    tar = _tar(tmp_path / "bomb.tgz", [(_info("zeros.bin"), bytes(8 << 20))])
    _assert_refused(tar, tmp_path / "out3", "too_large", "bytes")


def test_refuses_too_many_files_and_non_archives(tmp_path):
    arc = _zip(tmp_path / "many.zip", {f"f{i}.txt": b"x" for i in range(6)})
    _assert_refused(arc, tmp_path / "out", "too_large", "more than 5 files", max_files=5)
    assert extract_upload(arc, tmp_path / "ok", max_bytes=100, max_files=6) == tmp_path / "ok"
    (tmp_path / "x.png").write_bytes(b"\x89PNG not an archive")
    _assert_refused(tmp_path / "x.png", tmp_path / "out2", "invalid_archive", "not a zip or tar")
    good = _zip(tmp_path / "g.zip", {"a.txt": os.urandom(5000)})
    (tmp_path / "cut.zip").write_bytes(good.read_bytes()[:-30])  # no central directory left
    _assert_refused(tmp_path / "cut.zip", tmp_path / "out3", "invalid_archive", "not a zip or tar")
    data = bytearray(good.read_bytes())
    data[100:200] = bytes(100)  # damaged member data: a CRC or inflate error
    (tmp_path / "bad.zip").write_bytes(bytes(data))
    _assert_refused(tmp_path / "bad.zip", tmp_path / "out5", "invalid_archive", "cannot read the archive")
    tgz = _tar(tmp_path / "g.tgz", [(_info("a.txt"), os.urandom(50_000))])
    (tmp_path / "cut.tgz").write_bytes(tgz.read_bytes()[:20_000])
    _assert_refused(tmp_path / "cut.tgz", tmp_path / "out4", "invalid_archive", "cannot read the archive")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        extract_upload(good, tmp_path / "busy", **LIMITS)


# --------------------------------------------------------------------------------------------------
# items


def test_items_from_index_makes_unique_safe_ids(tmp_path):
    def item(id_: str, *labels: int) -> Item:
        y = np.zeros(4, np.float32)
        y[list(labels)] = 1
        return Item(id_, tmp_path / f"{len(id_)}.jpg", y)

    ids = ["a b", "a_b", "A_B", ".x", "-y", "ok", "é/ü", "x" * 300]
    index = DatasetIndex(("c0", "c1", "c2", "c3"), tuple(item(i, 1, 3) for i in ids), tmp_path, "manifest")
    items = items_from_index(index)
    assert [it.id for it in items][:7] == ["a_b", "a_b-2", "A_B-3", "_x", "_y", "ok", "___"]
    assert len(items[7].id) == archives.MAX_ID_LENGTH
    assert all(is_safe_name(it.id) for it in items)
    assert len({it.id.lower() for it in items}) == len(items)
    assert [it.index for it in items] == list(range(len(ids)))
    assert all(it.labels == (1, 3) and os.path.isabs(it.image) for it in items)
    assert item_id_from("2007_000032") == "2007_000032"


# --------------------------------------------------------------------------------------------------
# results archives

CLASSES = ["background", "cat", "dog", "bird"]


def _label(seed: int, h: int = 12, w: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.zeros((h, w), np.uint8)
    lab[2:7, 3:9] = 1 + seed % 3
    lab[8:11, 10:15] = 1 + (seed + 1) % 3
    lab[0, rng.integers(0, w)] = 255
    return lab


def _write_palette_png(path: Path, lab: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(lab, "P")
    im.putpalette(voc_palette().reshape(-1).tolist())
    im.save(path)


def _job(
    tmp_path: Path, n: int = 3, finished: int = 2, shape: tuple[int, int] = (12, 16)
) -> tuple[Path, list]:
    """A job folder in the workers' layout: ``finished`` of ``n`` items complete, plus a temp file."""
    jdir = tmp_path / "jobs" / "job_T"
    items = [JobItem(i, f"img{i}", f"/data/in/img{i}.jpg", (0, 1)) for i in range(n)]
    for it in items:
        lab = _label(it.index, *shape)
        _write_palette_png(jdir / "masks" / f"{it.id}.png", lab)
        (jdir / "cams").mkdir(parents=True, exist_ok=True)
        (jdir / "cams" / f"{it.id}.npz").write_bytes(b"npz-" + it.id.encode())
        (jdir / "heatmaps" / it.id).mkdir(parents=True, exist_ok=True)
        (jdir / "heatmaps" / it.id / "cat.png").write_bytes(b"heat")
        if it.index >= finished:
            continue
        present = sorted(set(np.unique(lab).tolist()) - {0, 255})
        result = {
            "request_id": f"job_T/{it.id}",
            "model": {"id": "demo", "sha256": "ab" * 32, "classes": CLASSES},
            "image": {"width": shape[1], "height": shape[0], "format": "JPEG", "exif_orientation_applied": 1},
            "classes": [{"index": v, "name": CLASSES[v], "mean_confidence": 0.5 + v / 10} for v in present],
            "quality": 0.7,
            "warnings": [],
            "mask": {"path": f"masks/{it.id}.png"},
        }
        (jdir / "items").mkdir(parents=True, exist_ok=True)
        (jdir / "items" / f"{it.id}.json").write_text(json.dumps(result))
    (jdir / "masks" / ".img0.png.123.tmp").write_bytes(b"half-written")
    return jdir, items


def _unzip(chunks) -> zipfile.ZipFile:
    data = b"".join(chunks)
    zf = zipfile.ZipFile(io.BytesIO(data))
    assert zf.testzip() is None
    return zf


def _no_ignore(lab: np.ndarray) -> np.ndarray:
    return np.where(lab == 255, 0, lab)


def test_voc_archive(tmp_path):
    jdir, items = _job(tmp_path)
    zf = _unzip(iter_archive(jdir, items, "voc", CLASSES))
    assert sorted(zf.namelist()) == [
        "SegmentationClass/img0.png",
        "SegmentationClass/img1.png",
        "cams/img0.npz",
        "cams/img1.npz",
        "labelmap.txt",
        "summary.json",
    ]  # img2 is not finished: left out
    for i in (0, 1):
        png = Image.open(io.BytesIO(zf.read(f"SegmentationClass/img{i}.png")))
        assert png.mode == "P"
        np.testing.assert_array_equal(np.array(png), _label(i))
    assert zf.read("cams/img1.npz") == b"npz-img1"
    assert zf.read("labelmap.txt").decode().splitlines()[1:3] == ["background:0,0,0::", "cat:128,0,0::"]
    summary = json.loads(zf.read("summary.json"))
    assert summary["job"] == "job_T" and summary["count"] == 2 and summary["classes"] == CLASSES
    assert summary["model"]["id"] == "demo"
    assert [r["id"] for r in summary["items"]] == ["img0", "img1"]
    assert summary["items"][0]["width"] == 16 and summary["items"][0]["quality"] == 0.7


def test_coco_archive_round_trips_with_pycocotools(tmp_path):
    jdir, items = _job(tmp_path)
    zf = _unzip(iter_archive(jdir, items, "coco", CLASSES[1:]))  # background added when missing
    ann_file = tmp_path / "annotations.json"
    ann_file.write_bytes(zf.read("annotations.json"))
    coco = COCO(str(ann_file))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["cat", "dog", "bird"]
    assert coco.getCatIds() == [1, 2, 3]
    assert len(coco.getImgIds()) == 2
    for img in coco.loadImgs(coco.getImgIds()):
        lab = _label(int(img["hsc_item"][3:]))
        assert img["file_name"] == f"{img['hsc_item']}.jpg" and (img["height"], img["width"]) == lab.shape
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        assert sorted(a["category_id"] for a in anns) == sorted(set(np.unique(lab).tolist()) - {0, 255})
        for a in anns:
            m = lab == a["category_id"]
            np.testing.assert_array_equal(coco.annToMask(a), m)
            assert a["area"] == int(coco_mask.area(a["segmentation"])) == m.sum()
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert a["score"] == pytest.approx(0.5 + a["category_id"] / 10)
            assert a["iscrowd"] == 0


def test_labelstudio_archive(tmp_path):
    jdir, items = _job(tmp_path)
    zf = _unzip(iter_archive(jdir, items, "labelstudio", CLASSES))
    tasks = json.loads(zf.read("tasks.json"))
    assert [t["data"]["hsc_item"] for t in tasks] == ["img0", "img1"]
    for t in tasks:
        pred = t["predictions"][0]
        assert pred["model_version"] == "demo@" + "ab" * 6 and pred["score"] == 0.7
        lab = _label(int(t["data"]["hsc_item"][3:]))
        np.testing.assert_array_equal(
            labelstudio_results_to_label(pred["result"], CLASSES[1:]), _no_ignore(lab)
        )
        scores = {r["value"]["brushlabels"][0]: r["score"] for r in pred["result"]}
        assert scores == {CLASSES[v]: 0.5 + v / 10 for v in set(np.unique(lab).tolist()) - {0, 255}}
    # a prediction stored by the worker (asked for when the job ran) is used as it is
    stored = json.loads((jdir / "items" / "img0.json").read_text())
    stored["labelstudio"] = {"result": [], "score": 0.1, "model_version": "given"}
    (jdir / "items" / "img0.json").write_text(json.dumps(stored))
    tasks = json.loads(_unzip(iter_archive(jdir, items, "labelstudio", CLASSES)).read("tasks.json"))
    assert tasks[0]["predictions"] == [stored["labelstudio"]]


def test_cvat_segmentation_mask_archive(tmp_path):
    jdir, items = _job(tmp_path)
    zf = _unzip(iter_archive(jdir, items, "cvat-segmask", CLASSES))
    assert sorted(zf.namelist()) == [
        "ImageSets/Segmentation/default.txt",
        "SegmentationClass/img0.png",
        "SegmentationClass/img1.png",
        "labelmap.txt",
    ]
    assert zf.read("ImageSets/Segmentation/default.txt").decode().split() == ["img0", "img1"]
    lines = zf.read("labelmap.txt").decode().splitlines()
    assert lines[0].startswith("# label:color_rgb")
    declared = {}
    for line in lines[1:]:
        name, rgb, _, _ = line.split(":")
        declared[tuple(int(v) for v in rgb.split(","))] = name
    assert list(declared.values()) == CLASSES
    for i in (0, 1):
        png = Image.open(io.BytesIO(zf.read(f"SegmentationClass/img{i}.png")))
        assert png.mode == "RGB"
        colours = {tuple(c) for c in np.array(png).reshape(-1, 3).tolist()}
        assert colours <= set(declared)  # every colour is a declared class (ignore drawn as background)
        np.testing.assert_array_equal(
            png_to_label(zf.read(f"SegmentationClass/img{i}.png")), _no_ignore(_label(i))
        )


def test_raw_archive_holds_every_file_but_temporaries(tmp_path):
    jdir, items = _job(tmp_path)
    zf = _unzip(iter_archive(jdir, items, "raw", CLASSES))
    expected = sorted(
        p.relative_to(jdir).as_posix() for p in jdir.rglob("*") if p.is_file() and not p.name.startswith(".")
    )
    assert (
        sorted(zf.namelist()) == expected and "items/img1.json" in expected and "masks/img2.png" in expected
    )
    for name in expected:
        assert zf.read(name) == (jdir / name).read_bytes()


def test_archives_stream_in_chunks_and_handle_zip64(tmp_path, monkeypatch):
    jdir, items = _job(tmp_path, n=40, finished=40, shape=(120, 160))
    for it in items:  # incompressible masks, so the zip is big enough to need many chunks
        noise = np.random.default_rng(it.index).integers(0, 4, (120, 160)).astype(np.uint8)
        _write_palette_png(jdir / "masks" / f"{it.id}.png", noise)
    gen = iter_archive(jdir, items, "voc", CLASSES)
    first = next(gen)
    assert 0 < len(first) <= 2 * archives.STREAM_CHUNK + archives.COPY_CHUNK
    chunks = [first, *gen]
    assert len(chunks) > 2 and all(chunks)
    assert len(_unzip(chunks).namelist()) == 82
    monkeypatch.setattr(archives, "ZIP64_ABOVE_ITEMS", 0)  # the JSON entries of large jobs
    zf = _unzip(iter_archive(jdir, items, "coco", CLASSES))
    assert len(json.loads(zf.read("annotations.json"))["images"]) == 40


def test_empty_and_unknown_archives(tmp_path):
    jdir, items = _job(tmp_path, n=2, finished=0)
    for fmt in ARCHIVE_FORMATS[:-1]:
        zf = _unzip(iter_archive(jdir, items, fmt, CLASSES))
        assert not any(n.startswith("SegmentationClass/") for n in zf.namelist())
    assert (
        json.loads(_unzip(iter_archive(jdir, items, "coco", CLASSES)).read("annotations.json"))["images"]
        == []
    )
    assert json.loads(_unzip(iter_archive(jdir, items, "labelstudio", CLASSES)).read("tasks.json")) == []
    with pytest.raises(ValueError, match="valid: voc, coco"):
        iter_archive(jdir, items, "pascal", CLASSES)


def test_labelmap_text():
    assert labelmap_text(["a"]) == "# label:color_rgb:parts:actions\nbackground:0,0,0::\na:128,0,0::\n"
