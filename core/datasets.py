"""Datasets with image-level labels: the PASCAL VOC layout and a JSONL manifest (numpy + Pillow, no torch).

A dataset is opened into a :class:`DatasetIndex` (no tensors): the K foreground class names
(background excluded) and one :class:`Item` per image with its multi-hot labels in **channel
space** (``labels[c] = 1`` ⇔ class ``classes[c]`` is present; docs/algorithm.md 4.1) and the
optional mask (VOC label space) and saliency paths. Opening validates everything first and raises
one :class:`DatasetError` listing every problem with its file and line.

**VOC layout** (:func:`open_voc`), ``root`` = the folder holding ``JPEGImages/`` (``VOC2012/`` or
``VOCdevkit/VOC2012/`` below it are found too):

* images ``JPEGImages/<id>.jpg`` (``.jpeg``/``.png`` accepted when no ``.jpg`` exists);
* masks ``SegmentationClassAug/<id>.png``, else ``SegmentationClass/<id>.png`` (optional);
* the list of a split: ``ImageSets/Segmentation/<split>.txt``, ``ImageSets/SegmentationAug/<split>.txt``,
  ``<root>/<split>.txt`` or ``<root>/<split>_id.txt`` (first found), or the path of a list file.
  A line is an id (``2007_000032``) or a path pair (``/JPEGImages/2007_000032.jpg
  /SegmentationClassAug/2007_000032.png``, the id is the stem of the first path); blank lines and
  surrounding whitespace are ignored. Without a split: ``train_aug`` if found, else ``train``;
* image-level labels from ``cls_labels.npy`` (the SEAM/EPS file: a pickled dict id → float32[K],
  channel space) in the root or at the path given. **It is loaded with pickle, so only open files
  you trust.** Ids missing from it (or every id, when there is no such file) get the classes
  present in their mask (values ``1..K``; 0 and 255 are ignored);
* saliency maps ``<saliency_root>/<id>.png`` (EPS), by default the root's ``saliency/`` folder when
  it exists; a missing map leaves the item without saliency unless ``require_saliency``;
* class names: the ``classes`` argument, else the root's ``classes.txt`` (below), else
  ``default_classes`` (:mod:`hsc.training.datasets` passes the 20 VOC classes; the service and
  the workers pass the served model's foreground names).

**Manifest** (:func:`open_manifest`): a JSONL file, one object a line::

    {"image": "img/0001.jpg", "labels": ["cat", "dog"], "mask": "masks/0001.png", "saliency": "sal/0001.png"}

``mask`` (VOC label space, for evaluation), ``saliency``, ``id`` (default: the image's file name
without extension) and ``split`` are optional; other keys are ignored. Relative paths resolve
against the manifest's folder. Label names match the classes case-insensitively;
``"background"`` in a label list is ignored. The classes come from the ``classes`` argument (a
file or a list of names), else from ``classes.txt`` beside the manifest, else ``default_classes``.

**Classes files**: one name a line, optionally ``background`` first (dropped: the index holds the
K foreground names), blank lines ignored; names must be unique (case-insensitively).

:func:`open_dataset` picks the layout (:func:`resolve_dataset`): a ``.jsonl`` file is a manifest;
a folder with ``JPEGImages/`` is VOC (even when it also holds a manifest); a folder with
``<split>.jsonl`` or ``manifest_<split>.jsonl`` (that file is the split), or else
``manifest.jsonl`` (filtered by the lines' ``"split"``), is a manifest.

The torch ``Dataset`` of training lives in :mod:`hsc.training.datasets`, which re-exports the
openers, readers and types of this module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image

__all__ = [
    "BACKGROUND",
    "IGNORE_INDEX",
    "DatasetError",
    "DatasetIndex",
    "Item",
    "load_rgb",
    "load_saliency",
    "open_dataset",
    "open_manifest",
    "open_voc",
    "read_classes_file",
    "read_id_list",
    "read_label_png",
    "resolve_dataset",
]

PathLike = str | os.PathLike[str]

MAX_LISTED_PROBLEMS = 50
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VOC_MASK_DIRS = ("SegmentationClassAug", "SegmentationClass")
VOC_LIST_DIRS = ("ImageSets/Segmentation", "ImageSets/SegmentationAug", ".")
DEFAULT_SPLITS = ("train_aug", "train")
MANIFEST_NAME = "manifest.jsonl"
CLASSES_NAME = "classes.txt"
CLS_LABELS_NAME = "cls_labels.npy"
SALIENCY_DIR = "saliency"
BACKGROUND = "background"
"""The implicit class 0 of the VOC label space (never listed among a dataset's K classes)."""
IGNORE_INDEX = 255
"""The void/ignore value of label maps."""


class DatasetError(ValueError):
    """Everything wrong with a dataset, in one message: ``file:line: problem`` per line.

    ``problems`` holds them all; the message lists the first :data:`MAX_LISTED_PROBLEMS` and
    counts the rest.
    """

    def __init__(self, problems: Sequence[str], source: str = "dataset") -> None:
        self.problems = list(problems)
        self.source = source
        n = len(self.problems)
        lines = [f"{n} problem{'s' if n != 1 else ''} in {source}:"]
        lines += [f"  {p}" for p in self.problems[:MAX_LISTED_PROBLEMS]]
        if n > MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {n - MAX_LISTED_PROBLEMS} more")
        super().__init__("\n".join(lines))


class _Problems:
    """Collects ``file[:line]: message`` strings."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: PathLike | str, message: str, line: int | None = None) -> None:
        loc = os.fspath(where) if line is None else f"{os.fspath(where)}:{line}"
        self.items.append(f"{loc}: {message}")

    def raise_if_any(self, source: str) -> None:
        if self.items:
            raise DatasetError(self.items, source)

    def __bool__(self) -> bool:
        return bool(self.items)


@dataclass(frozen=True, eq=False)
class Item:
    """One image of a dataset.

    Attributes:
        id: unique name of the image (output files are named after it).
        image: path of the image file.
        labels: (K,) float32 multi-hot vector in channel space.
        mask: ground-truth label PNG (VOC label space: 0 background, c+1 class c, 255 ignore).
        saliency: saliency map PNG (8-bit, 255 = salient) for EPS.
    """

    id: str
    image: Path
    labels: NDArray[np.float32] = field(repr=False)
    mask: Path | None = None
    saliency: Path | None = None

    @property
    def classes(self) -> tuple[int, ...]:
        """Channel indices of the present classes, ascending."""
        return tuple(int(c) for c in np.flatnonzero(self.labels))


@dataclass(frozen=True)
class DatasetIndex:
    """An opened dataset: K foreground class names and its items (validated)."""

    classes: tuple[str, ...]
    items: tuple[Item, ...]
    root: Path
    kind: Literal["voc", "manifest"]
    split: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Alias of :attr:`classes`."""
        return self.classes

    @property
    def ids(self) -> list[str]:
        return [it.id for it in self.items]

    @property
    def has_saliency(self) -> bool:
        """True when every item has a saliency map."""
        return bool(self.items) and all(it.saliency is not None for it in self.items)

    @property
    def has_masks(self) -> bool:
        """True when every item has a ground-truth mask."""
        return bool(self.items) and all(it.mask is not None for it in self.items)

    def label_matrix(self) -> NDArray[np.float32]:
        """(N, K) float32 multi-hot labels of all items."""
        if not self.items:
            return np.zeros((0, self.num_classes), np.float32)
        return np.stack([it.labels for it in self.items])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Item:
        return self.items[i]

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)


# --------------------------------------------------------------------------------------------------
# small readers


def read_classes_file(path: PathLike) -> tuple[str, ...]:
    """Foreground class names of a classes file (a leading ``background`` line is dropped).

    Raises :class:`DatasetError` for a missing file, an empty list, duplicates or ``background``
    anywhere but the first line.
    """
    path = Path(path)
    probs = _Problems()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DatasetError([f"{path}: cannot read the classes file ({e.strerror or e})"], str(path)) from e
    names: list[str] = []
    seen: dict[str, int] = {}
    first = True
    for lineno, raw in enumerate(text.splitlines(), 1):
        name = raw.strip()
        if not name:
            continue
        if name.lower() == BACKGROUND:
            if not first:
                probs.add(path, "'background' may only be the first class", lineno)
            first = False
            continue
        first = False
        key = name.lower()
        if key in seen:
            probs.add(path, f"duplicate class {name!r} (first on line {seen[key]})", lineno)
            continue
        seen[key] = lineno
        names.append(name)
    if not names and not probs:
        probs.add(path, "no class names")
    probs.raise_if_any(str(path))
    return tuple(names)


def _classes_from(arg: PathLike | Sequence[str]) -> tuple[str, ...]:
    if isinstance(arg, (str, os.PathLike)):
        return read_classes_file(arg)
    names = tuple(n for n in (str(x).strip() for x in arg) if n)
    if names and names[0].lower() == BACKGROUND:
        names = names[1:]
    lowered = [n.lower() for n in names]
    bad = [n for n in names if n.lower() == BACKGROUND or lowered.count(n.lower()) > 1]
    if not names or bad:
        raise DatasetError([f"invalid class list {list(names)} (empty, duplicates or 'background')"])
    return names


def _id_from_line(line: str) -> str:
    """The id of a list line: an id as it is, or the stem of the first path of a path pair."""
    first = line.split()[0]
    if "/" in first or "\\" in first or first.lower().endswith(IMAGE_EXTENSIONS):
        return Path(first.replace("\\", "/")).stem
    return first


def read_id_list(path: PathLike) -> list[tuple[str, int]]:
    """``(id, line number)`` per non-blank line of a VOC list file (ids or path pairs)."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        return [(_id_from_line(ln), i) for i, ln in enumerate(f, 1) if ln.strip()]


def read_label_png(path: PathLike) -> NDArray[np.integer]:
    """Label values as stored: palette indices of a P-mode PNG, grey values of an L-mode PNG."""
    with Image.open(path) as im:
        return np.array(im)


def load_rgb(path: PathLike) -> Image.Image:
    """An image as the official loader reads it: ``Image.open(path).convert('RGB')`` (no EXIF turn)."""
    with Image.open(path) as im:
        return im.convert("RGB")


def load_saliency(path: PathLike) -> Image.Image:
    """A saliency map: grey ``L`` kept as it is, any other mode converted to RGB (averaged later)."""
    with Image.open(path) as im:
        im.load()
        return im.copy() if im.mode == "L" else im.convert("RGB")


def _check_file(
    probs: _Problems, path: Path, what: str, where: PathLike, line: int | None, verify: bool
) -> bool:
    if not path.is_file():
        probs.add(where, f"{what} not found: {path}", line)
        return False
    if not os.access(path, os.R_OK):
        probs.add(where, f"{what} not readable: {path}", line)
        return False
    if verify:
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as e:  # any decoder error means "unreadable"
            probs.add(where, f"{what} unreadable as an image: {path} ({type(e).__name__}: {e})", line)
            return False
    return True


def _labels_from_mask(path: Path, num_classes: int) -> tuple[NDArray[np.float32], list[int]]:
    """Multi-hot labels of the classes in a VOC-space mask, and the out-of-range values found."""
    values = np.unique(read_label_png(path))
    y = np.zeros(num_classes, np.float32)
    bad: list[int] = []
    for v in values.tolist():
        if v == 0 or v == IGNORE_INDEX:
            continue
        if 1 <= v <= num_classes:
            y[v - 1] = 1.0
        else:
            bad.append(int(v))
    return y, bad


# --------------------------------------------------------------------------------------------------
# VOC layout


def _find_voc_root(root: Path) -> Path:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise DatasetError([f"{root}: no JPEGImages/ folder (not a VOC-layout dataset)"], str(root))


def _find_list(root: Path, split: str | PathLike | None) -> tuple[Path, str]:
    if split is not None:
        p = Path(split)
        if p.suffix == ".txt" or len(p.parts) > 1:
            p = p if p.is_absolute() or p.is_file() else root / p
            if not p.is_file():
                raise DatasetError([f"{p}: list file not found"], str(root))
            return p, p.stem
    names = [str(split)] if split is not None else list(DEFAULT_SPLITS)
    tried = []
    for name in names:
        for d in VOC_LIST_DIRS:
            for fname in (f"{name}.txt", f"{name}_id.txt"):
                cand = root / d / fname
                tried.append(cand)
                if cand.is_file():
                    return cand, name
    shown = ", ".join(str(t.relative_to(root)) for t in tried)
    raise DatasetError([f"{root}: no list file for split {split!r} (looked for {shown})"], str(root))


def _voc_image(root: Path, id_: str) -> Path:
    p = root / "JPEGImages" / f"{id_}.jpg"
    if p.is_file():
        return p
    for ext in IMAGE_EXTENSIONS:
        q = p.with_suffix(ext)
        if q.is_file():
            return q
    return p


def _load_cls_labels(path: Path, num_classes: int, probs: _Problems) -> dict[str, NDArray[np.float32]]:
    try:
        obj = np.load(path, allow_pickle=True)  # trusted input: SEAM/EPS's pickled dict
        d = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object else obj
    except Exception as e:
        probs.add(path, f"cannot load ({type(e).__name__}: {e})")
        return {}
    if not isinstance(d, Mapping):
        probs.add(path, f"expected a pickled dict id -> float32[{num_classes}], got {type(d).__name__}")
        return {}
    out: dict[str, NDArray[np.float32]] = {}
    for k, v in d.items():
        arr = np.asarray(v, dtype=np.float32).reshape(-1)
        if arr.shape != (num_classes,):
            probs.add(path, f"entry {k!r} has {arr.size} values, expected {num_classes} (one per class)")
            continue
        out[str(k)] = (arr > 0.5).astype(np.float32)
    return out


def open_voc(
    root: PathLike,
    split: str | PathLike | None = None,
    *,
    classes: PathLike | Sequence[str] | None = None,
    default_classes: Sequence[str] | None = None,
    cls_labels: PathLike | None = None,
    saliency_root: PathLike | None = None,
    require_masks: bool = False,
    require_saliency: bool = False,
    require_labels: bool = True,
    verify_images: bool = False,
) -> DatasetIndex:
    """Open a dataset in the PASCAL VOC layout (see the module docstring).

    Args:
        root: the folder holding ``JPEGImages/`` (or ``VOC2012/``, ``VOCdevkit/VOC2012/`` above it).
        split: a split name (``train_aug``, ``train``, ``val``, ...) or the path of a list file
            (relative paths are tried against the working directory, then the root).
        classes: class names (a file or a list) instead of the root's ``classes.txt``.
        default_classes: the K foreground names when neither ``classes`` nor ``classes.txt`` gives
            them (an error when None too).
        cls_labels: path of ``cls_labels.npy`` (default: ``<root>/cls_labels.npy`` if present).
            Pickled: trusted files only.
        saliency_root: folder of ``<id>.png`` saliency maps (default ``<root>/saliency`` if present).
        require_masks: a missing mask is an error (evaluation).
        require_saliency: a missing saliency map is an error (EPS training).
        require_labels: an image without image-level labels is an error (step-1 training and CAM
            inference need them). ``False`` (step 2, which needs none, e.g. on VOC's test split):
            such an item gets an all-zero label vector.
        verify_images: also open every image/mask/saliency file with Pillow (``verify()``).

    Raises:
        DatasetError: every problem found, with file and line.
    """
    root = _find_voc_root(Path(root).expanduser())
    if classes is not None:
        names = _classes_from(classes)
    elif (root / CLASSES_NAME).is_file():
        names = read_classes_file(root / CLASSES_NAME)
    elif default_classes is not None:
        names = _classes_from(default_classes)
    else:
        raise DatasetError(
            [f"{root / CLASSES_NAME}: classes file not found (write it, or pass classes=)"], str(root)
        )
    k = len(names)
    list_path, split_name = _find_list(root, split)
    probs = _Problems()

    cls_path = Path(cls_labels).expanduser() if cls_labels is not None else root / CLS_LABELS_NAME
    table: dict[str, NDArray[np.float32]] = {}
    if cls_path.is_file():
        table = _load_cls_labels(cls_path, k, probs)
    elif cls_labels is not None:
        probs.add(cls_path, "cls_labels file not found")

    sal_dir: Path | None = None
    if saliency_root is not None:
        sal_dir = Path(saliency_root).expanduser()
        if not sal_dir.is_dir():
            probs.add(sal_dir, "saliency folder not found")
            sal_dir = None
    elif (root / SALIENCY_DIR).is_dir():
        sal_dir = root / SALIENCY_DIR
    if require_saliency and sal_dir is None and saliency_root is None:
        probs.add(root, f"saliency maps required but there is no {SALIENCY_DIR}/ folder (give saliency_root)")

    mask_dirs = [root / d for d in VOC_MASK_DIRS if (root / d).is_dir()]
    if require_masks and not mask_dirs:
        probs.add(root, f"masks required but there is no {' or '.join(VOC_MASK_DIRS)} folder")

    items: list[Item] = []
    first_line: dict[str, int] = {}
    for id_, line in read_id_list(list_path):
        if id_ in first_line:
            probs.add(list_path, f"duplicate id {id_!r} (first on line {first_line[id_]})", line)
            continue
        first_line[id_] = line
        image = _voc_image(root, id_)
        _check_file(probs, image, "image", list_path, line, verify_images)

        mask = next((d / f"{id_}.png" for d in mask_dirs if (d / f"{id_}.png").is_file()), None)
        if mask is not None and not _check_file(probs, mask, "mask", list_path, line, verify_images):
            mask = None
        elif mask is None and require_masks and mask_dirs:
            probs.add(list_path, f"mask not found for {id_!r} in {', '.join(map(str, mask_dirs))}", line)

        sal: Path | None = None
        if sal_dir is not None:
            cand = sal_dir / f"{id_}.png"
            if cand.is_file():
                sal = (
                    cand if _check_file(probs, cand, "saliency map", list_path, line, verify_images) else None
                )
            elif require_saliency:
                probs.add(list_path, f"saliency map not found: {cand}", line)

        labels = table.get(id_)
        if labels is None and mask is None and not require_labels:
            labels = np.zeros(k, np.float32)
        if labels is None:
            if mask is None:
                src = f"not in {cls_path.name}" if table else f"no {CLS_LABELS_NAME}"
                probs.add(list_path, f"no image-level labels for {id_!r} ({src} and no mask)", line)
                continue
            try:
                labels, bad = _labels_from_mask(mask, k)
            except Exception as e:
                probs.add(list_path, f"mask unreadable: {mask} ({type(e).__name__}: {e})", line)
                continue
            if bad:
                probs.add(
                    list_path, f"mask {mask} holds label values {bad} outside 1..{k} (and 0, 255)", line
                )
                continue
        if require_labels and not labels.any():
            probs.add(list_path, f"empty label list for {id_!r}", line)
            continue
        items.append(Item(id_, image, labels, mask, sal))
    if not first_line:
        probs.add(list_path, "the list is empty")
    probs.raise_if_any(str(list_path))
    return DatasetIndex(tuple(names), tuple(items), root, "voc", split_name)


# --------------------------------------------------------------------------------------------------
# manifest


def _resolve(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


def open_manifest(
    path: PathLike,
    split: str | None = None,
    *,
    classes: PathLike | Sequence[str] | None = None,
    default_classes: Sequence[str] | None = None,
    require_masks: bool = False,
    require_saliency: bool = False,
    require_labels: bool = True,
    verify_images: bool = False,
) -> DatasetIndex:
    """Open a JSONL manifest (see the module docstring).

    Args:
        path: the ``.jsonl`` file.
        split: keep only the lines whose ``"split"`` equals it (an error when none does).
        classes: a classes file or a list of names; default ``classes.txt`` beside the manifest.
        default_classes: the names when neither ``classes`` nor ``classes.txt`` gives them (an
            error when None too).
        require_masks, require_saliency, require_labels, verify_images: as :func:`open_voc`; without
            ``require_labels`` a line may omit ``"labels"`` or give an empty list.

    Raises:
        DatasetError: every problem found (malformed JSON, unknown class names, empty label lists,
            missing or unreadable files, duplicate ids), each with ``file:line``.
    """
    path = Path(path).expanduser()
    base = path.parent
    cpath = base / CLASSES_NAME
    if classes is not None:
        names = _classes_from(classes)
    elif cpath.is_file():
        names = read_classes_file(cpath)
    elif default_classes is not None:
        names = _classes_from(default_classes)
    else:
        raise DatasetError([f"{cpath}: classes file not found (write it, or pass classes=)"], str(path))
    lookup = {n.lower(): i for i, n in enumerate(names)}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise DatasetError([f"{path}: cannot read the manifest ({e.strerror or e})"], str(path)) from e

    probs = _Problems()
    items: list[Item] = []
    first_line: dict[str, int] = {}
    n_records = 0
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec: Any = json.loads(raw)
        except json.JSONDecodeError as e:
            probs.add(path, f"malformed JSON ({e.msg} at column {e.colno})", lineno)
            continue
        if not isinstance(rec, dict):
            probs.add(path, f"expected a JSON object, got {type(rec).__name__}", lineno)
            continue
        if split is not None and rec.get("split") != split:
            continue
        n_records += 1
        ok = True
        image_s = rec.get("image")
        if not isinstance(image_s, str) or not image_s:
            probs.add(path, "missing or invalid 'image' (a path string)", lineno)
            ok = False
            image = None
        else:
            image = _resolve(base, image_s)
            ok &= _check_file(probs, image, "image", path, lineno, verify_images)

        id_ = rec.get("id", Path(image_s).stem if isinstance(image_s, str) else None)
        if id_ is not None and (not isinstance(id_, str) or not id_ or "/" in id_ or "\\" in id_):
            probs.add(path, f"invalid 'id' {id_!r} (a non-empty name without slashes)", lineno)
            ok = False
        elif id_ is not None:
            if id_ in first_line:
                probs.add(path, f"duplicate id {id_!r} (first on line {first_line[id_]}); set 'id'", lineno)
                ok = False
            else:
                first_line[id_] = lineno

        y = np.zeros(len(names), np.float32)
        labels = rec.get("labels")
        if labels is None and not require_labels:
            labels = []
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            probs.add(path, "missing or invalid 'labels' (a list of class names)", lineno)
            ok = False
        else:
            unknown = [
                x for x in labels if x.strip().lower() not in lookup and x.strip().lower() != BACKGROUND
            ]
            if unknown:
                probs.add(path, f"unknown class name(s) {unknown}; known: {', '.join(names)}", lineno)
                ok = False
            for x in labels:
                c = lookup.get(x.strip().lower())
                if c is not None:
                    y[c] = 1.0
            if require_labels and not unknown and not y.any():
                probs.add(path, "empty label list (at least one foreground class is needed)", lineno)
                ok = False

        extra: dict[str, Path | None] = {}
        for key, what, required in (
            ("mask", "mask", require_masks),
            ("saliency", "saliency map", require_saliency),
        ):
            v = rec.get(key)
            extra[key] = None
            if v is None:
                if required:
                    probs.add(path, f"no '{key}' ({what} required)", lineno)
                    ok = False
            elif not isinstance(v, str) or not v:
                probs.add(path, f"invalid '{key}' (a path string)", lineno)
                ok = False
            else:
                p = _resolve(base, v)
                ok &= _check_file(probs, p, what, path, lineno, verify_images)
                extra[key] = p
        if ok and image is not None and isinstance(id_, str):
            items.append(Item(id_, image, y, extra["mask"], extra["saliency"]))
    if n_records == 0 and not probs:
        probs.add(path, "no records" if split is None else f'no records with "split": {split!r}')
    probs.raise_if_any(str(path))
    return DatasetIndex(names, tuple(items), base, "manifest", split)


# --------------------------------------------------------------------------------------------------
# auto-detection


def resolve_dataset(
    path: PathLike, split: str | None = None
) -> tuple[Literal["voc", "manifest"], Path, str | None]:
    """Which layout ``path`` is: ``("voc", folder, split)`` or ``("manifest", jsonl file, split)``.

    For a per-split manifest file (``<split>.jsonl``, ``manifest_<split>.jsonl``) the returned split
    is None: the file is the split, its lines are not filtered.
    """
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".jsonl":
            raise DatasetError([f"{p}: a dataset file must be a .jsonl manifest"], str(p))
        return "manifest", p, split
    if not p.is_dir():
        raise DatasetError([f"{p}: no such file or folder"], str(p))
    if any((p / sub / "JPEGImages").is_dir() for sub in (".", "VOC2012", "VOCdevkit/VOC2012")):
        return "voc", p, split
    per_split = [p / f"{split}.jsonl", p / f"manifest_{split}.jsonl"] if split is not None else []
    for f in per_split:
        if f.is_file():
            return "manifest", f, None
    if (p / MANIFEST_NAME).is_file():
        return "manifest", p / MANIFEST_NAME, split
    raise DatasetError(
        [f"{p}: neither a VOC layout (JPEGImages/) nor a manifest ({MANIFEST_NAME} or <split>.jsonl)"],
        str(p),
    )


def open_dataset(
    path: PathLike,
    split: str | None = None,
    *,
    classes: PathLike | Sequence[str] | None = None,
    default_classes: Sequence[str] | None = None,
    cls_labels: PathLike | None = None,
    saliency_root: PathLike | None = None,
    require_masks: bool = False,
    require_saliency: bool = False,
    require_labels: bool = True,
    verify_images: bool = False,
) -> DatasetIndex:
    """Open a VOC-layout folder or a manifest, whichever ``path`` is (:func:`resolve_dataset`).

    ``cls_labels`` and ``saliency_root`` apply to the VOC layout only.
    """
    kind, where, split = resolve_dataset(path, split)
    common: dict[str, Any] = dict(
        classes=classes,
        default_classes=default_classes,
        require_masks=require_masks,
        require_saliency=require_saliency,
        require_labels=require_labels,
        verify_images=verify_images,
    )
    if kind == "voc":
        return open_voc(where, split, cls_labels=cls_labels, saliency_root=saliency_root, **common)
    if cls_labels is not None or saliency_root is not None:
        raise ValueError("cls_labels and saliency_root apply to VOC-layout datasets only")
    return open_manifest(where, split, **common)
