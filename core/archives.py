"""Archives in and out of jobs: safe extraction of an uploaded zip/tar, job items from a dataset,
and the streamed zip of a job's results in the formats annotation tools import.

**Extraction** (:func:`extract_upload`): zip, tar, tar.gz/bz2/xz. Refused with
:class:`ArchiveError`: absolute member paths, ``..`` components, links (symbolic or hard), devices,
FIFOs, encrypted zip members (``invalid_archive``); more than ``max_files`` files or more than
``max_bytes`` uncompressed, counted on the bytes actually written, so a zip bomb whose headers lie
stops at the limit (``too_large``). On any error nothing extracted is left behind.

**Results** (:func:`iter_archive`) are read from a job folder in the layout the workers write
(``masks/<id>.png``, ``cams/<id>.npz``, ``heatmaps/<id>/<class>.png``, ``items/<id>.json`` last).
An item is in an archive when its ``items/<id>.json`` exists. Formats:

* ``voc``: ``SegmentationClass/<id>.png`` (VOC palette, 255 = ignore), ``cams/<id>.npz``,
  ``labelmap.txt``, ``summary.json`` (model, classes, one row per item);
* ``coco``: ``annotations.json`` with ``images``, ``categories`` (id = VOC label of the model's
  classes) and one RLE annotation per class per image (``score`` = the class's mean confidence);
* ``labelstudio``: ``tasks.json``, one task per image with its ``predictions``;
* ``cvat-segmask``: CVAT "Segmentation mask 1.1": ``labelmap.txt`` listing every model class,
  ``ImageSets/Segmentation/default.txt``, ``SegmentationClass/<id>.png`` in the class colours
  (ignore pixels drawn as background, so no colour is undeclared);
* ``raw``: every file of the job folder as it is.

The zip is produced while it is sent: the stdlib ``zipfile`` writes into a sink that
:func:`iter_archive` empties after each piece, and the large JSON files are written item by item,
so memory stays flat whatever the job size.
"""

from __future__ import annotations

import io
import json
import lzma
import os
import re
import shutil
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from .datasets import BACKGROUND, IGNORE_INDEX, DatasetIndex, read_label_png
from .encoders import coco_rle_encode, labelstudio_prediction, labelstudio_results, voc_palette
from .jobs import JobItem, is_safe_name
from .results import DEFAULT_LABELSTUDIO, model_version

__all__ = [
    "ARCHIVE_FORMATS",
    "ArchiveError",
    "extract_upload",
    "item_id_from",
    "items_from_index",
    "iter_archive",
    "labelmap_text",
]

ARCHIVE_FORMATS = ("voc", "coco", "labelstudio", "cvat-segmask", "raw")
COPY_CHUNK = 1 << 20
STREAM_CHUNK = 1 << 16  # bytes per chunk the archive stream hands on
MAX_ID_LENGTH = 180  # room for a "-<n>" suffix and an extension within 255 bytes
ZIP64_ABOVE_ITEMS = 1000  # streamed JSON entries of larger jobs may pass 2 GiB: write them as zip64

# --------------------------------------------------------------------------------------------------
# extraction


class ArchiveError(ValueError):
    """An upload that cannot be extracted: ``code`` ``invalid_archive`` (HTTP 422) or ``too_large`` (413)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.status = 413 if code == "too_large" else 422


def _member_parts(name: str) -> tuple[str, ...]:
    """The path components of an archive member; ArchiveError for absolute paths and ``..``."""
    if "\0" in name:
        raise ArchiveError("invalid_archive", f"member name {name!r} holds a NUL character")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"[A-Za-z]:", norm):
        raise ArchiveError("invalid_archive", f"member {name!r} has an absolute path")
    parts = tuple(p for p in norm.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError("invalid_archive", f"member {name!r} points outside the archive ('..')")
    return parts


class _Budget:
    """Counts files and bytes written; ArchiveError ``too_large`` past either limit."""

    def __init__(self, max_bytes: int, max_files: int) -> None:
        self.max_bytes, self.max_files = max_bytes, max_files
        self.bytes = self.files = 0

    def add_file(self, name: str) -> None:
        self.files += 1
        if self.files > self.max_files:
            raise ArchiveError("too_large", f"the archive holds more than {self.max_files} files")

    def add_bytes(self, n: int) -> None:
        self.bytes += n
        if self.bytes > self.max_bytes:
            raise ArchiveError("too_large", f"the archive expands to more than {self.max_bytes} bytes")


def _copy_member(src: IO[bytes], target: Path, budget: _Budget) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        while chunk := src.read(COPY_CHUNK):
            budget.add_bytes(len(chunk))
            out.write(chunk)


def _extract_zip(archive: Path, dest: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > 2 * budget.max_files + 16:
            raise ArchiveError("too_large", f"the archive lists {len(infos)} entries")
        for info in infos:
            parts = _member_parts(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise ArchiveError("invalid_archive", f"member {info.filename!r} is a link")
            if mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise ArchiveError("invalid_archive", f"member {info.filename!r} is a device or a pipe")
            if info.flag_bits & 0x1:
                raise ArchiveError("invalid_archive", f"member {info.filename!r} is encrypted")
            if not parts:
                continue
            if info.is_dir():
                dest.joinpath(*parts).mkdir(parents=True, exist_ok=True)
                continue
            budget.add_file(info.filename)
            with zf.open(info) as src:
                _copy_member(src, dest.joinpath(*parts), budget)


def _extract_tar(archive: Path, dest: Path, budget: _Budget) -> None:
    with tarfile.open(archive, "r:*") as tf:
        entries = 0
        for m in tf:
            entries += 1
            if entries > 2 * budget.max_files + 16:
                raise ArchiveError("too_large", f"the archive lists more than {entries - 1} entries")
            parts = _member_parts(m.name)
            if m.issym() or m.islnk():
                raise ArchiveError("invalid_archive", f"member {m.name!r} is a link")
            if m.isdev():
                raise ArchiveError("invalid_archive", f"member {m.name!r} is a device or a pipe")
            if m.isdir():
                if parts:
                    dest.joinpath(*parts).mkdir(parents=True, exist_ok=True)
                continue
            if not m.isfile():
                raise ArchiveError("invalid_archive", f"member {m.name!r} is not a regular file")
            if not parts:
                continue
            budget.add_file(m.name)
            src = tf.extractfile(m)
            if src is None:
                raise ArchiveError("invalid_archive", f"member {m.name!r} cannot be read")
            with src:
                _copy_member(src, dest.joinpath(*parts), budget)


def extract_upload(archive: Path, dest: Path, *, max_bytes: int, max_files: int) -> Path:
    """Extract a zip or tar(.gz/.bz2/.xz) upload into ``dest`` (created; must be empty or absent).

    Returns the dataset root: ``dest``, or its only entry when that is a folder (an archive made
    from a folder). The archive's permissions and owners are ignored. Raises
    :class:`ArchiveError` (module docstring); nothing stays in ``dest`` then.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise ValueError(f"{dest} is not empty")
    dest.mkdir(parents=True, exist_ok=True)
    budget = _Budget(max_bytes, max_files)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, dest, budget)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, dest, budget)
        else:
            raise ArchiveError("invalid_archive", "not a zip or tar archive")
    except ArchiveError:
        _empty(dest)
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, RuntimeError) as e:
        _empty(dest)
        raise ArchiveError("invalid_archive", f"cannot read the archive ({type(e).__name__}: {e})") from None
    except OSError as e:
        _empty(dest)
        raise ArchiveError("invalid_archive", f"cannot extract the archive ({e.strerror or e})") from None
    entries = [p for p in dest.iterdir() if p.name != "__MACOSX"]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else dest


def _empty(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# items

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def item_id_from(name: str) -> str:
    """A file-name-safe version of a dataset id (``[A-Za-z0-9._-]``, no leading ``.``/``-``, at most
    :data:`MAX_ID_LENGTH` characters); unchanged when it already is one."""
    safe = _UNSAFE.sub("_", name)[:MAX_ID_LENGTH] or "item"
    if safe[0] in ".-":
        safe = "_" + safe[1:]
    return safe


def items_from_index(index: DatasetIndex) -> list[JobItem]:
    """The job items of an opened dataset, in its order: unique safe ids (:func:`item_id_from`; a
    clash, also one differing only in case, gets ``-2``, ``-3``, ...), absolute image paths, and
    the labels as channel indices of ``index.classes``."""
    out: list[JobItem] = []
    used: set[str] = set()
    for n, it in enumerate(index.items):
        base = item_id_from(it.id)
        cand, k = base, 2
        while cand.lower() in used:
            cand, k = f"{base}-{k}", k + 1
        used.add(cand.lower())
        assert is_safe_name(cand)
        out.append(JobItem(n, cand, os.path.abspath(it.image), it.classes))
    return out


# --------------------------------------------------------------------------------------------------
# results archives


class _Sink:
    """A write-only, unseekable file for ``zipfile``: collects the bytes until :meth:`take`."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def _zip_info(
    name: str, *, mtime: float | None = None, size: int = 0, deflate: bool = True
) -> zipfile.ZipInfo:
    t = time.localtime(time.time() if mtime is None else mtime)
    zi = zipfile.ZipInfo(name, date_time=(max(1980, t.tm_year), *t[1:6]))
    zi.external_attr = (stat.S_IFREG | 0o644) << 16
    zi.file_size = size
    zi.compress_type = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    return zi


def _full_classes(classes: Sequence[str]) -> list[str]:
    """Names indexed by VOC label: ``background`` first (added when the list lacks it)."""
    names = [str(c) for c in classes]
    return names if names and names[0].lower() == BACKGROUND else [BACKGROUND, *names]


def labelmap_text(classes: Sequence[str]) -> str:
    """The ``labelmap.txt`` of CVAT/Datumaro VOC exports: ``name:r,g,b::`` per class, VOC colours."""
    names = _full_classes(classes)
    pal = voc_palette(len(names))
    lines = ["# label:color_rgb:parts:actions"]
    lines += [f"{n}:{r},{g},{b}::" for n, (r, g, b) in zip(names, pal.tolist())]
    return "\n".join(lines) + "\n"


class _Zip:
    """A zip being streamed: each method yields the bytes produced so far."""

    def __init__(self, zip64: bool) -> None:
        self.sink = _Sink()
        self.zf = zipfile.ZipFile(self.sink, "w")  # type: ignore[call-overload]
        self.zip64 = zip64

    def file(self, name: str, path: Path, *, deflate: bool = False) -> Iterator[bytes]:
        """Add a file from disk (skipped when it disappeared meanwhile)."""
        try:
            src = open(path, "rb")
        except FileNotFoundError:
            return
        with src:
            st = os.fstat(src.fileno())
            zi = _zip_info(name, mtime=st.st_mtime, size=st.st_size, deflate=deflate)
            with self.zf.open(zi, "w") as dst:
                while chunk := src.read(COPY_CHUNK):
                    dst.write(chunk)
                    yield self.sink.take()
        yield self.sink.take()

    def data(self, name: str, data: bytes, *, deflate: bool = True) -> Iterator[bytes]:
        self.zf.writestr(_zip_info(name, size=len(data), deflate=deflate), data)
        yield self.sink.take()

    def pieces(self, name: str, parts: Iterator[str]) -> Iterator[bytes]:
        """Add a text file written piece by piece (a large JSON document)."""
        with self.zf.open(_zip_info(name), "w", force_zip64=self.zip64) as dst:
            for text in parts:
                dst.write(text.encode("utf-8"))
                yield self.sink.take()
        yield self.sink.take()

    def close(self) -> Iterator[bytes]:
        self.zf.close()
        yield self.sink.take()


def _finished(job_dir: Path, items: Sequence[JobItem]) -> list[JobItem]:
    return [it for it in items if (job_dir / "items" / f"{it.id}.json").is_file()]


def _result(job_dir: Path, item: JobItem) -> dict[str, Any]:
    return json.loads((job_dir / "items" / f"{item.id}.json").read_bytes())


def _scores(result: Mapping[str, Any]) -> dict[int, float | None]:
    """VOC label -> mean confidence of the classes of an item result."""
    return {int(c["index"]): c.get("mean_confidence") for c in result.get("classes") or []}


def _json_list(values: Iterator[Any]) -> Iterator[str]:
    first = True
    for v in values:
        yield ("[\n" if first else ",\n") + json.dumps(v)
        first = False
    yield "[]" if first else "\n]"


def _voc(job_dir: Path, items: list[JobItem], names: list[str], z: _Zip) -> Iterator[bytes]:
    for it in items:
        yield from z.file(f"SegmentationClass/{it.id}.png", job_dir / "masks" / f"{it.id}.png")
        yield from z.file(f"cams/{it.id}.npz", job_dir / "cams" / f"{it.id}.npz")
    yield from z.data("labelmap.txt", labelmap_text(names).encode("utf-8"))

    def rows() -> Iterator[dict[str, Any]]:
        for it in items:
            r = _result(job_dir, it)
            yield {
                "id": it.id,
                "image": it.image,
                "width": r.get("image", {}).get("width"),
                "height": r.get("image", {}).get("height"),
                "classes": r.get("classes", []),
                "quality": r.get("quality"),
                "warnings": r.get("warnings", []),
            }

    model = _result(job_dir, items[0]).get("model") if items else None
    head = {"job": job_dir.name, "model": model, "classes": names, "count": len(items)}
    text = json.dumps(head)[:-1] + ', "items": '
    yield from z.pieces("summary.json", iter([text, *_json_list(rows()), "}\n"]))


def _bbox_xywh(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]


def _coco(job_dir: Path, items: list[JobItem], names: list[str]) -> Iterator[str]:
    yield '{"info": ' + json.dumps({"description": f"hsc pseudo-labels of {job_dir.name}"})
    cats = [{"id": v, "name": names[v], "supercategory": "object"} for v in range(1, len(names))]
    yield ', "categories": ' + json.dumps(cats) + ', "images": '

    def images() -> Iterator[dict[str, Any]]:
        for n, it in enumerate(items, 1):
            info = _result(job_dir, it).get("image", {})
            yield {
                "id": n,
                "file_name": os.path.basename(it.image),
                "width": info.get("width"),
                "height": info.get("height"),
                "hsc_item": it.id,
            }

    yield from _json_list(images())
    yield ', "annotations": '

    def annotations() -> Iterator[dict[str, Any]]:
        ann_id = 0
        for n, it in enumerate(items, 1):
            scores = _scores(_result(job_dir, it))
            label = read_label_png(job_dir / "masks" / f"{it.id}.png")
            present = np.flatnonzero(np.bincount(label.ravel(), minlength=256)[1 : len(names)]) + 1
            for v in present.tolist():
                m = label == v
                ann_id += 1
                yield {
                    "id": ann_id,
                    "image_id": n,
                    "category_id": v,
                    "segmentation": coco_rle_encode(m),
                    "area": int(m.sum()),
                    "bbox": _bbox_xywh(m),
                    "iscrowd": 0,
                    "score": scores.get(v),
                }

    yield from _json_list(annotations())
    yield "}\n"


def _labelstudio(job_dir: Path, items: list[JobItem], names: list[str]) -> Iterator[str]:
    def tasks() -> Iterator[dict[str, Any]]:
        for it in items:
            r = _result(job_dir, it)
            pred = r.get("labelstudio")
            if not pred:  # not asked for when the job ran: build it from the mask
                label = read_label_png(job_dir / "masks" / f"{it.id}.png")
                score_of = {
                    names[v]: s for v, s in _scores(r).items() if s is not None and 0 < v < len(names)
                }
                results = labelstudio_results(
                    label,
                    names[1:],
                    from_name=DEFAULT_LABELSTUDIO["from_name"],
                    to_name=DEFAULT_LABELSTUDIO["to_name"],
                    scores=score_of,
                )
                card = r.get("model") or {}
                version = model_version(card) if card.get("id") else None
                pred = labelstudio_prediction(results, score=r.get("quality"), model_version=version)
            yield {"data": {"image": it.image, "hsc_item": it.id}, "predictions": [pred]}

    yield from _json_list(tasks())


def _cvat(job_dir: Path, items: list[JobItem], names: list[str], z: _Zip) -> Iterator[bytes]:
    yield from z.data("labelmap.txt", labelmap_text(names).encode("utf-8"))
    yield from z.data("ImageSets/Segmentation/default.txt", "".join(f"{it.id}\n" for it in items).encode())
    colours = voc_palette(256)
    colours[IGNORE_INDEX] = colours[0]  # ignore -> background: CVAT meets no undeclared colour
    for it in items:
        label = read_label_png(job_dir / "masks" / f"{it.id}.png")
        buf = io.BytesIO()
        Image.fromarray(colours[label.astype(np.uint8)], "RGB").save(buf, format="PNG")
        yield from z.data(f"SegmentationClass/{it.id}.png", buf.getvalue(), deflate=False)


def _raw(job_dir: Path, z: _Zip) -> Iterator[bytes]:
    for dirpath, dirnames, filenames in os.walk(job_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.startswith("."):  # temporary files of writers
                continue
            path = Path(dirpath) / f
            if path.is_symlink():
                continue
            yield from z.file(path.relative_to(job_dir).as_posix(), path, deflate=path.suffix == ".json")


def iter_archive(
    job_dir: Path, items: Sequence[JobItem], fmt: str, classes: Sequence[str]
) -> Iterator[bytes]:
    """The zip of a job's finished items in format ``fmt`` (module docstring), as byte chunks.

    Args:
        job_dir: the job's results folder (:func:`hsc.core.jobs.job_dir`).
        items: the job's items; those without ``items/<id>.json`` are left out.
        fmt: one of :data:`ARCHIVE_FORMATS` (ValueError otherwise, raised at once).
        classes: the model's class names by VOC label (``background`` first; added when missing).
    """
    if fmt not in ARCHIVE_FORMATS:
        raise ValueError(f"unknown archive format {fmt!r}; valid: {', '.join(ARCHIVE_FORMATS)}")
    job_dir = Path(job_dir)
    names = _full_classes(classes)
    return _stream(job_dir, list(items), fmt, names)


def _stream(job_dir: Path, items: list[JobItem], fmt: str, names: list[str]) -> Iterator[bytes]:
    """The chunks of :func:`_pieces`, joined up to :data:`STREAM_CHUNK` bytes (no empty ones)."""
    buf: list[bytes] = []
    size = 0
    for data in _pieces(job_dir, items, fmt, names):
        if data:
            buf.append(data)
            size += len(data)
        if size >= STREAM_CHUNK:
            yield b"".join(buf)
            buf, size = [], 0
    if buf:
        yield b"".join(buf)


def _pieces(job_dir: Path, items: list[JobItem], fmt: str, names: list[str]) -> Iterator[bytes]:
    done = _finished(job_dir, items)
    z = _Zip(zip64=len(done) > ZIP64_ABOVE_ITEMS)
    if fmt == "voc":
        yield from _voc(job_dir, done, names, z)
    elif fmt == "coco":
        yield from z.pieces("annotations.json", _coco(job_dir, done, names))
    elif fmt == "labelstudio":
        yield from z.pieces("tasks.json", _labelstudio(job_dir, done, names))
    elif fmt == "cvat-segmask":
        yield from _cvat(job_dir, done, names, z)
    else:
        yield from _raw(job_dir, z)
    yield from z.close()
