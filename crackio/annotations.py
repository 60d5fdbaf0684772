"""Annotated photos as labelling tools export them: COCO JSON, YOLO txt, Pascal VOC XML, segmentation masks.

Each reader returns the photos with their ground-truth boxes (x0, y0, x1, y1 in pixels of the
upright photo, EXIF orientation applied, as labelling tools display it) and every problem
found, with the file and the reason. Splits come from the dataset's own folders when it has
them (`val` and `validation` are named `valid`, the trainer's default), else None: the caller
assigns them by photo. Boxes that need the photo's size (YOLO's normalized ones) or its mask
are resolved when the photo is decoded (`resolve_boxes`), in the proposal workers.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crackio.errors import ConfigError, MissingFile
from crackio.names import display_name

FORMATS = ("coco", "yolo", "voc", "mask")
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPLIT_NAMES = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid", "test": "test"}
# Masks: crack pixels are > 0. One crack drawn or predicted as fragments is joined by a dilation
# with a MASK_JOIN x MASK_JOIN ellipse (gaps up to ~MASK_JOIN - 1 pixels); components with fewer than
# MASK_MIN_PIXELS crack pixels are specks and dropped. The box spans the component's own crack pixels.
MASK_JOIN = 9
MASK_MIN_PIXELS = 20


@dataclass
class Photo:
    path: Path
    stem: str                    # unique within the dataset: the proposals' <stem>
    split: str | None            # from the dataset's folders; None: assigned by ratios
    boxes: np.ndarray            # float64 (N, 4); x0, y0, x1, y1 (normalized cx, cy, w, h when `normalized`)
    normalized: bool = False     # YOLO: boxes are fractions of the photo's size
    mask: Path | None = None     # mask format: boxes come from this image
    difficult: list[bool] = field(default_factory=list)  # VOC's flag per box (kept as ground truth)


@dataclass
class Annotated:
    photos: list[Photo]
    problems: list[tuple[str, str]]  # (path, reason): photos or annotations that could not be used
    classes: list[str]               # every class name seen
    positive: list[str]              # the class names taken as crack


def _is_photo(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in PHOTO_EXTENSIONS and not p.name.startswith(".")


def _split_dirs(src: Path) -> dict[str, Path]:
    return {SPLIT_NAMES[d.name.lower()]: d for d in sorted(src.iterdir())
            if d.is_dir() and d.name.lower() in SPLIT_NAMES}


def _pick(classes: list[str], wanted: list[str] | None, where: str) -> list[str]:
    if not wanted:
        return classes
    unknown = [c for c in wanted if c not in classes]
    if unknown:
        raise ConfigError(f"--classes {','.join(unknown)}: not in {where} (it has: {', '.join(classes) or 'none'})")
    return wanted


def read_annotations(src: str | os.PathLike, fmt: str, classes: list[str] | None = None) -> Annotated:
    """Read a dataset in `fmt` (coco | yolo | voc | mask); `classes` picks the positive class names.

    Raises:
        MissingFile: `src` does not exist.
        ConfigError: unknown format, a class not in the dataset, or no photo found.
    """
    src = Path(src)
    if not src.exists():
        raise MissingFile(f"annotated dataset {display_name(src)} does not exist")
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    result = {"coco": _coco, "yolo": _yolo, "voc": _voc, "mask": _mask}[fmt](src, classes)
    stems: dict[str, Path] = {}
    unique = []
    for photo in result.photos:  # the stem names every proposal of the photo: it must be unique
        if photo.stem in stems:
            result.problems.append((display_name(photo.path), f"a second photo named {photo.stem!r} (the first: "
                                    f"{display_name(stems[photo.stem])}); rename one of them"))
            continue
        stems[photo.stem] = photo.path
        unique.append(photo)
    result.photos = unique
    if not result.photos:
        raise ConfigError(f"no annotated photo found in {display_name(src)} as --format {fmt}: "
                          f"{'; '.join(r for _, r in result.problems[:3]) or 'see README for the layouts'}")
    return result


# --- COCO --------------------------------------------------------------------------------------------------

def _coco(src: Path, wanted: list[str] | None) -> Annotated:
    if src.is_file():
        files = [(None, src)]
    else:
        splits = _split_dirs(src)
        files = [(split, j) for split, d in splits.items() for j in sorted(d.glob("*.json"))]
        if not files:
            files = [(None, j) for j in sorted(src.glob("*.json"))] + \
                    [(None, j) for j in sorted((src / "annotations").glob("*.json"))]
    problems: list[tuple[str, str]] = []
    docs = []
    for split, path in files:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            problems.append((display_name(path), f"not readable JSON ({e})"))
            continue
        if not isinstance(doc, dict) or "images" not in doc:
            continue  # some other JSON file beside the annotations
        docs.append((split, path, doc))
    names = sorted({str(c.get("name")) for _, _, doc in docs for c in doc.get("categories", [])})
    positive = _pick(names, wanted, "the COCO categories")
    photos = []
    for split, path, doc in docs:
        cats = {c.get("id"): str(c.get("name")) for c in doc.get("categories", [])}
        by_image: dict = {}
        for a in doc.get("annotations", []):
            by_image.setdefault(a.get("image_id"), []).append(a)
        for im in doc["images"]:
            file_name = str(im.get("file_name", ""))
            photo = next((p for p in (path.parent / file_name, path.parent / "images" / file_name,
                                      path.parent.parent / "images" / file_name) if p.is_file()), None)
            if photo is None:
                problems.append((display_name(path.parent / file_name), f"missing image named in {path.name}"))
                continue
            boxes = []
            for a in by_image.get(im.get("id"), []):
                if cats.get(a.get("category_id")) not in positive:
                    continue
                box = _coco_box(a)
                if box is None:
                    problems.append((display_name(photo), f"annotation {a.get('id')} has neither a usable bbox nor "
                                                          f"a polygon"))
                    continue
                boxes.append(box)
            photos.append(Photo(photo, Path(file_name).stem, split, np.array(boxes, np.float64).reshape(-1, 4)))
    return Annotated(photos, problems, names, positive)


def _coco_box(a: dict) -> list[float] | None:
    bbox = a.get("bbox")
    if isinstance(bbox, list) and len(bbox) == 4 and bbox[2] > 0 and bbox[3] > 0:
        x, y, w, h = (float(v) for v in bbox)
        return [x, y, x + w, y + h]
    seg = a.get("segmentation")
    if isinstance(seg, list) and seg and all(isinstance(p, list) and len(p) >= 6 for p in seg):  # polygons
        pts = np.concatenate([np.asarray(p, np.float64).reshape(-1, 2) for p in seg])
        return [*pts.min(0), *pts.max(0)]
    return None


# --- YOLO --------------------------------------------------------------------------------------------------

def _yolo_names(src: Path) -> list[str]:
    import yaml  # PyYAML: Ultralytics' data.yaml (names as a list or an {id: name} mapping)

    for yml in (src / "data.yaml", src / "dataset.yaml"):
        if yml.is_file():
            names = (yaml.safe_load(yml.read_text()) or {}).get("names", [])
            if isinstance(names, dict):
                return [str(names[k]) for k in sorted(names)]
            return [str(n) for n in names]
    if (src / "classes.txt").is_file():
        return [line.strip() for line in (src / "classes.txt").read_text().splitlines() if line.strip()]
    return []


def _yolo(src: Path, wanted: list[str] | None) -> Annotated:
    layouts = [(split, d / "images", d / "labels") for split, d in _split_dirs(src).items()]
    if not layouts and (src / "images").is_dir():
        layouts = [(split, d, src / "labels" / d.name) for split, d in _split_dirs(src / "images").items()]
        layouts = layouts or [(None, src / "images", src / "labels")]
    names = _yolo_names(src)
    positive = _pick(names, wanted, "data.yaml / classes.txt") if names or wanted else []
    ids = {i for i, n in enumerate(names) if n in positive} if names else None  # None: every class
    photos, problems = [], []
    for split, images, labels in layouts:
        for photo in sorted(p for p in images.iterdir() if _is_photo(p)) if images.is_dir() else []:
            txt = labels / (photo.stem + ".txt")
            boxes = []
            if txt.is_file():  # no label file: a background photo, as YOLO reads it
                for number, line in enumerate(txt.read_text().splitlines(), 1):
                    parts = line.split()
                    if not parts:
                        continue
                    try:
                        cls, values = int(parts[0]), [float(v) for v in parts[1:]]
                    except ValueError:
                        problems.append((display_name(txt), f"line {number} is not 'class cx cy w h'"))
                        continue
                    if ids is not None and cls not in ids:
                        continue
                    if len(values) == 4:
                        boxes.append(values)
                    elif len(values) >= 6 and len(values) % 2 == 0:  # a segment: its polygon's box
                        pts = np.asarray(values).reshape(-1, 2)
                        (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
                        boxes.append([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
                    else:
                        problems.append((display_name(txt), f"line {number} has {len(values)} numbers after the "
                                                            f"class, not 4 (a box) or an even count (a polygon)"))
            photos.append(Photo(photo, photo.stem, split, np.array(boxes, np.float64).reshape(-1, 4), normalized=True))
    return Annotated(photos, problems, names, positive or names)


# --- Pascal VOC --------------------------------------------------------------------------------------------

def _voc(src: Path, wanted: list[str] | None) -> Annotated:
    splits = _split_dirs(src)
    if splits:
        xmls = [(split, x, d) for split, d in splits.items() for x in sorted(d.glob("*.xml"))]
    else:
        folder = src / "Annotations" if (src / "Annotations").is_dir() else src
        sets = {}
        for name in ("train", "val", "test"):
            listed = src / "ImageSets" / "Main" / f"{name}.txt"
            if listed.is_file():
                sets |= {line.split()[0]: SPLIT_NAMES[name] for line in listed.read_text().splitlines() if line.strip()}
        images = src / "JPEGImages" if (src / "JPEGImages").is_dir() else folder
        xmls = [(sets.get(x.stem), x, images) for x in sorted(folder.glob("*.xml"))]
    parsed, problems, names = [], [], set()
    for split, xml, images in xmls:
        try:
            root = ET.parse(xml).getroot()
        except (ET.ParseError, OSError) as e:
            problems.append((display_name(xml), f"not readable XML ({e})"))
            continue
        objects = []
        for obj in root.iter("object"):
            name = (obj.findtext("name") or "").strip()
            names.add(name)
            bb = obj.find("bndbox")
            try:
                # VOC boxes are 1-based and inclusive: pixel columns xmin..xmax are x0 = xmin - 1 .. x1 = xmax.
                box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]  # type: ignore[union-attr]
            except (AttributeError, TypeError, ValueError):
                problems.append((display_name(xml), f"object {name!r} has no numeric bndbox"))
                continue
            objects.append((name, [box[0] - 1, box[1] - 1, box[2], box[3]], (obj.findtext("difficult") or "0") == "1"))
        parsed.append((split, xml, images, (root.findtext("filename") or xml.stem).strip(), objects))
    classes = sorted(names)
    positive = _pick(classes, wanted, "the VOC object names")
    photos = []
    for split, xml, images, filename, objects in parsed:
        photo = next((p for p in (images / filename, xml.parent / filename) if p.is_file()), None)
        if photo is None:
            candidates = [p for p in images.glob(xml.stem + ".*") if _is_photo(p)]
            photo = candidates[0] if candidates else None
        if photo is None:
            problems.append((display_name(images / filename), f"missing image named in {xml.name}"))
            continue
        kept = [(box, hard) for name, box, hard in objects if name in positive]
        photos.append(Photo(photo, photo.stem, split, np.array([b for b, _ in kept], np.float64).reshape(-1, 4),
                            difficult=[h for _, h in kept]))
    return Annotated(photos, problems, classes, positive)


# --- segmentation masks ------------------------------------------------------------------------------------

def _mask(src: Path, wanted: list[str] | None) -> Annotated:
    if wanted:
        raise ConfigError("--classes does not apply to --format mask: every non-zero mask pixel is crack")
    layouts = [(split, d / "images", d / "masks") for split, d in _split_dirs(src).items()]
    layouts = layouts or [(None, src / "images", src / "masks")]
    photos, problems = [], []
    for split, images, masks in layouts:
        for photo in sorted(p for p in images.iterdir() if _is_photo(p)) if images.is_dir() else []:
            found = [m for m in sorted(masks.glob(photo.stem + ".*")) + sorted(masks.glob(photo.stem + "_mask.*"))
                     if _is_photo(m)] if masks.is_dir() else []
            if not found:
                problems.append((display_name(photo), f"no mask {photo.stem}.png in {display_name(masks)}"))
                continue
            photos.append(Photo(photo, photo.stem, split, np.zeros((0, 4)), mask=found[0]))
    return Annotated(photos, problems, ["crack"], ["crack"])


def mask_boxes(mask: np.ndarray) -> np.ndarray:
    """Ground-truth boxes of a crack mask (H x W, crack > 0): see MASK_JOIN and MASK_MIN_PIXELS."""
    import cv2

    crack = (mask > 0).astype(np.uint8)
    joined = cv2.dilate(crack, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (MASK_JOIN, MASK_JOIN)))
    count, labels = cv2.connectedComponents(joined, connectivity=8)
    boxes = []
    for k in range(1, count):
        ys, xs = np.nonzero((labels == k) & (crack > 0))
        if len(xs) >= MASK_MIN_PIXELS:
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return np.array(boxes, np.float64).reshape(-1, 4)


def resolve_boxes(photo: Photo, width: int, height: int) -> tuple[np.ndarray, list[str]]:
    """The photo's ground-truth boxes in pixels, clipped to it; and the problems with them."""
    problems = []
    if photo.mask is not None:
        from PIL import Image, ImageOps

        try:
            with Image.open(photo.mask) as m:
                mask = np.asarray(ImageOps.exif_transpose(m).convert("L"))
        except (OSError, ValueError, SyntaxError) as e:
            return np.zeros((0, 4)), [f"unreadable mask {display_name(photo.mask)} ({e})"]
        if mask.shape != (height, width):
            return np.zeros((0, 4)), [f"mask {display_name(photo.mask)} is {mask.shape[1]}x{mask.shape[0]}, the "
                                      f"photo {width}x{height}"]
        return mask_boxes(mask), []
    boxes = photo.boxes.copy()
    if photo.normalized:
        cx, cy, w, h = boxes.T * np.array([[width], [height], [width], [height]])
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    clipped = boxes.copy()
    clipped[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    clipped[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    # A box that overshoots the border by more than a pixel (not rounding) or is empty once clipped is reported.
    far = np.abs(clipped - boxes).max(1) > 1 if len(boxes) else np.zeros(0, bool)
    empty = (clipped[:, 2] - clipped[:, 0] < 1) | (clipped[:, 3] - clipped[:, 1] < 1)
    for box in boxes[far | empty]:
        what = "outside the photo" if empty[(boxes == box).all(1)].any() else "beyond the photo's border (clipped)"
        problems.append(f"box {[round(float(v), 1) for v in box]} is {what} ({width}x{height})")
    return clipped[~empty], problems
