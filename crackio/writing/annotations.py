"""Annotated photos as labelling tools export them: COCO JSON, YOLO txt, Pascal VOC XML, segmentation masks.

Each reader returns the photos with their ground-truth boxes (x0, y0, x1, y1 in pixels of the
upright photo, EXIF orientation applied, as labelling tools display it) and every problem
found, with the file and the reason. Splits come from the dataset's own folders when it has
them (`val` and `validation` are named `valid`, the trainer's default), else None: the caller
assigns them by photo. Boxes that need the photo's size (YOLO's normalized ones) or its mask
are resolved when the photo is decoded (`resolve_boxes`), in the proposal workers. A SRC in
which nothing is found is refused with what was looked for and a summary of what is there.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crackio.errors import ConfigError, MissingFile
from crackio.format.layout import SPLIT_ALIASES, SPLITS
from crackio.fsio import display_name
from crackio.writing.masks import MASK_MIN_PIECE, mask_boxes, read_crack

FORMATS = ("coco", "yolo", "voc", "mask")
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPLIT_NAMES = {**{s: s for s in SPLITS}, **SPLIT_ALIASES}  # a split folder's name -> the split
IMAGE_DIRS = ("images", "image")  # mask format: the photos' folder (CrackForest: image/)
MASK_DIRS = ("masks", "mask", "groundtruth")  # and the masks' (BSDS, CrackForest: groundTruth/NNN.mat)
SURVEY_LIMIT = 5000  # the "nothing found" error counts at most this many entries of SRC
LOOKED_FOR = {
    "coco": "a COCO JSON file (with an 'images' list): SRC itself, <split>/*.json, SRC/*.json or "
    "SRC/annotations/*.json",
    "yolo": "<split>/images + <split>/labels, images/<split> + labels/<split>, images + labels (the last "
    "'images' folder in a photo's path becomes 'labels'), or a .txt beside each photo",
    "voc": "<split>/*.xml beside the photos, Annotations + JPEGImages, or *.xml beside the photos",
    "mask": "<split>/ or SRC/ holding images/ (or image/) and masks/ (or groundTruth/) with a mask "
    "<stem>.png, <stem>_mask.png or <stem>.mat per photo",
}


@dataclass
class Photo:
    path: Path
    stem: str  # unique within the dataset: the proposals' <stem>
    split: str | None  # from the dataset's folders; None: assigned by ratios
    boxes: np.ndarray  # float64 (N, 4); x0, y0, x1, y1 (normalized cx, cy, w, h when `normalized`)
    normalized: bool = False  # YOLO: boxes are fractions of the photo's size
    mask: Path | None = None  # mask format: boxes come from this image (or BSDS .mat)
    mask_label: int | None = None  # mask format: the crack label; None: above half the maximum
    mask_piece: int = 0  # mask format: > 0 cuts each crack into boxes of about this many pixels along it
    difficult: list[bool] = field(default_factory=list)  # VOC's flag per box (kept as ground truth)
    errors: list[str] = field(default_factory=list)  # ground truth that could not be read: the photo is skipped
    size: tuple[int, int] | None = None  # (width, height) the annotation says, checked against the photo
    image_id: int | str | None = None  # COCO: the annotation file's image id (detections.json's image_id)
    category_ids: tuple = ()  # COCO: the ids of the positive categories in the photo's annotation file


@dataclass
class Annotated:
    photos: list[Photo]
    problems: list[tuple[str, str]]  # (path, reason): photos or annotations that could not be used
    classes: list[str]  # every class name seen
    positive: list[str]  # the class names taken as crack
    # What the manifest records beside format, classes and positive: the mask rules (mask_crack_label,
    # mask_piece); for YOLO the class ids seen in the labels and those taken as crack (all of them when
    # no data.yaml / classes.txt names them) and where the names came from.
    settings: dict = field(default_factory=dict)


def _is_photo(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in PHOTO_EXTENSIONS and not p.name.startswith(".")


def _split_dirs(src: Path) -> dict[str, Path]:
    return {
        SPLIT_NAMES[d.name.lower()]: d for d in sorted(src.iterdir()) if d.is_dir() and d.name.lower() in SPLIT_NAMES
    }


def _pick(classes: list[str], wanted: list[str] | None, where: str) -> list[str]:
    if not wanted:
        return classes
    unknown = [c for c in wanted if c not in classes]
    if unknown:
        raise ConfigError(f"--classes {','.join(unknown)}: not in {where} (it has: {', '.join(classes) or 'none'})")
    return wanted


def read_annotations(
    src: str | os.PathLike,
    fmt: str,
    classes: list[str] | None = None,
    mask_piece: int = 0,
    mask_crack_label: int | None = None,
) -> Annotated:
    """Read a dataset in `fmt` (coco | yolo | voc | mask).

    Args:
        classes: the positive class names (default: every class).
        mask_piece: masks only: 0 = one box per joined crack; L = boxes of about L pixels along it.
        mask_crack_label: masks only: the label (pixel value, `Segmentation` label) that is crack;
            None = pixels above half the mask's maximum.

    Raises:
        MissingFile: `src` does not exist.
        ConfigError: unknown format, a class not in the dataset, a mask option off its format or
            range, or no photo found (the message says what was looked for and what is in `src`).
    """
    src = Path(src)
    if not src.exists():
        raise MissingFile(f"annotated dataset {display_name(src)} does not exist")
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt != "mask" and (mask_piece or mask_crack_label is not None):
        raise ConfigError(f"--mask-piece and --mask-crack-label apply to --format mask, not {fmt}: drop them")
    if mask_piece < 0 or 0 < mask_piece < MASK_MIN_PIECE:
        raise ConfigError(f"--mask-piece must be 0 (one box per crack) or >= {MASK_MIN_PIECE} pixels, got {mask_piece}")
    if mask_crack_label is not None and not 0 <= mask_crack_label <= 65535:
        raise ConfigError(f"--mask-crack-label must be a label value in 0..65535, got {mask_crack_label}")
    if src.is_file() and fmt != "coco":
        raise ConfigError(f"{display_name(src)} is a file: --format {fmt} reads a folder ({LOOKED_FOR[fmt]})")
    if fmt == "mask":
        result = _mask(src, classes, mask_piece, mask_crack_label)
    else:
        result = {"coco": _coco, "yolo": _yolo, "voc": _voc}[fmt](src, classes)
    stems: dict[str, Path] = {}
    unique = []
    result.photos.sort(key=lambda p: (p.stem, str(p.path)))  # the same order (and ratio splits) in every format
    for photo in result.photos:  # the stem names every proposal of the photo: it must be unique
        if photo.stem in stems:
            result.problems.append(
                (
                    display_name(photo.path),
                    f"a second photo named {photo.stem!r} (the first: "
                    f"{display_name(stems[photo.stem])}); rename one of them",
                )
            )
            continue
        stems[photo.stem] = photo.path
        unique.append(photo)
    result.photos = unique
    if not result.photos:
        problems = "; ".join(f"{display_name(Path(path).name)}: {why}" for path, why in result.problems[:3])
        raise ConfigError(
            f"no annotated photo found in {display_name(src)} as --format {fmt}: looked for {LOOKED_FOR[fmt]}; "
            f"{survey(src, fmt)}{'; ' + problems if problems else ''}; see docs/propose.md for the layouts"
        )
    return result


def survey(src: Path, fmt: str, limit: int = SURVEY_LIMIT) -> str:
    """What `src` holds, for the "nothing found" error: counts by kind, top-level folders, a format hint.

    Breadth-first over at most `limit` entries, so a huge folder costs a bounded listing.
    """
    if src.is_file():
        return f"found the file {display_name(src.name)}"
    counts: Counter[str] = Counter()
    beside = seen = 0
    queue, top = [src], []
    while queue and seen < limit:
        folder = queue.pop(0)
        names = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    seen += 1
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir():
                        queue.append(Path(entry.path))
                        top += [entry.name] if folder == src else []
                    else:
                        names.append(entry.name)
                    if seen >= limit:
                        break
        except OSError:
            continue
        in_mask_dir = folder.name.lower() in (*MASK_DIRS, "gt")
        for name in names:
            stem, ext = os.path.splitext(name)
            ext = ext.lower()
            if ext in PHOTO_EXTENSIONS:
                kind = ".png masks" if ext == ".png" and (in_mask_dir or stem.endswith("_mask")) else "photos"
                counts[kind] += 1
                beside += kind == "photos" and stem + ".txt" in names
            elif ext in (".txt", ".json", ".xml", ".mat"):
                counts[ext] += 1
    what = [f"{counts['photos']} photos" + (f" ({beside} with a .txt beside)" if beside else "")]
    what = what if counts["photos"] else ["no photo"]
    what += [f"{counts[k]} {k}" for k in (".txt", ".json", ".xml", ".mat", ".png masks") if counts[k]]
    folders = sorted(top)
    text = f"found {', '.join(what)}; top-level folders: " + (
        ", ".join(display_name(f) for f in folders[:8]) + (f" and {len(folders) - 8} more" if len(folders) > 8 else "")
        if folders
        else "none"
    )
    text += f" (counted the first {limit:,} entries)" if seen >= limit else ""
    hint = {
        "yolo": beside,
        "coco": counts[".json"],
        "voc": counts[".xml"],
        "mask": counts[".mat"] + counts[".png masks"],
    }
    others = [f for f, n in hint.items() if n and f != fmt and counts["photos"]]  # no photo: no format fits
    return text + (f"; this looks like --format {' or '.join(others)}" if others else "")


# --- COCO --------------------------------------------------------------------------------------------------


def _coco_files(src: Path) -> list[tuple[str | None, Path]]:
    """The annotation files with their split: SRC itself, <split>/*.json, else SRC/*.json and SRC/annotations/*.json."""
    if src.is_file():
        return [(None, src)]
    files: list[tuple[str | None, Path]] = [
        (split, j) for split, d in _split_dirs(src).items() for j in sorted(d.glob("*.json"))
    ]
    return files or [(None, j) for j in (*sorted(src.glob("*.json")), *sorted((src / "annotations").glob("*.json")))]


def _coco_docs(
    files: list[tuple[str | None, Path]], problems: list[tuple[str, str]]
) -> list[tuple[str | None, Path, dict]]:
    """Each file that reads as a COCO document (split, path, document); the others are listed in `problems`."""
    docs = []
    for split, path in files:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            problems.append((display_name(path), f"not readable JSON ({e})"))
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
            problems.append((display_name(path), "not a COCO annotation file (no 'images' list): ignored"))
            continue
        docs.append((split, path, doc))
    return docs


def _coco_by_image(path: Path, doc: dict, cats: dict, problems: list[tuple[str, str]]) -> dict:
    """The annotations of `doc` per image id; those naming an unknown image (ignored) or category are listed."""
    image_ids = {im.get("id") for im in doc["images"]}
    by_image: dict = {}
    for a in doc.get("annotations", []):
        number, image, category = a.get("id"), a.get("image_id"), a.get("category_id")
        if image not in image_ids:
            why = f"annotation {number} names image_id {image!r}, which is not in 'images': ignored"
            problems.append((display_name(path), why))
            continue
        if category not in cats:  # its photo is skipped (_coco_boxes): a box of what?
            problems.append(
                (
                    display_name(path),
                    f"annotation {number} names category_id {category!r}, which is not in 'categories'",
                )
            )
        by_image.setdefault(image, []).append(a)
    return by_image


def _coco_image(path: Path, file_name: str) -> Path | None:
    """The photo an image entry names: beside the annotation file, in its images/, or in ../images/."""
    candidates = (
        path.parent / file_name,
        path.parent / "images" / file_name,
        path.parent.parent / "images" / file_name,
    )
    return next((p for p in candidates if p.is_file()), None)


def _coco_boxes(annotations: list[dict], cats: dict, positive: list[str]) -> tuple[np.ndarray, list[str]]:
    """The positive boxes of one image's annotations, and what is wrong with those that cannot be read."""
    boxes, errors = [], []
    for a in annotations:
        if a.get("category_id") not in cats:
            errors.append(f"annotation {a.get('id')} has an unknown category_id {a.get('category_id')!r}")
            continue
        if cats[a.get("category_id")] not in positive:
            continue
        box = _coco_box(a)
        if isinstance(box, str):
            errors.append(f"annotation {a.get('id')}: {box}")
        else:
            boxes.append(box)
    return np.array(boxes, np.float64).reshape(-1, 4), errors


def _coco(src: Path, wanted: list[str] | None) -> Annotated:
    problems: list[tuple[str, str]] = []
    docs = _coco_docs(_coco_files(src), problems)
    names = sorted({str(c.get("name")) for _, _, doc in docs for c in doc.get("categories", [])})
    positive = _pick(names, wanted, "the COCO categories")
    photos = []
    for split, path, doc in docs:
        cats = {c.get("id"): str(c.get("name")) for c in doc.get("categories", [])}
        by_image = _coco_by_image(path, doc, cats, problems)
        for im in doc["images"]:
            file_name = str(im.get("file_name", ""))
            photo = _coco_image(path, file_name)
            if photo is None:
                problems.append((display_name(path.parent / file_name), f"missing image named in {path.name}"))
                continue
            boxes, errors = _coco_boxes(by_image.get(im.get("id"), []), cats, positive)
            size = (
                (im["width"], im["height"])
                if isinstance(im.get("width"), int) and isinstance(im.get("height"), int)
                else None
            )
            photos.append(
                Photo(
                    photo,
                    Path(file_name).stem,
                    split,
                    boxes,
                    errors=errors,
                    size=size,
                    image_id=im.get("id"),
                    category_ids=tuple(k for k, v in cats.items() if v in positive),
                )
            )
    return Annotated(photos, problems, names, positive)


def _numbers(values) -> list[float] | None:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return out if all(np.isfinite(out)) else None


def _coco_box(a: dict) -> list[float] | str:
    """x0, y0, x1, y1 from `bbox` (x, y, w, h), else from the polygons; or what is wrong with it."""
    bbox = a.get("bbox")
    if bbox is not None:
        values = _numbers(bbox) if isinstance(bbox, list) and len(bbox) == 4 else None
        if values is None or values[2] <= 0 or values[3] <= 0:
            return f"bbox {bbox!r} is not 4 finite numbers x, y, w, h with w, h > 0"
        x, y, w, h = values
        return [x, y, x + w, y + h]
    seg = a.get("segmentation")
    if isinstance(seg, list) and seg and all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg):
        values = _numbers(v for p in seg for v in p)
        if values is not None:
            pts = np.asarray(values).reshape(-1, 2)
            return [*pts.min(0), *pts.max(0)]
    return "neither a bbox nor polygons of finite numbers (an RLE mask needs its bbox)"


# --- YOLO --------------------------------------------------------------------------------------------------


def _yolo_names(src: Path) -> tuple[list[str], str | None]:
    """The class names and the file they come from (None: no file names them)."""
    import yaml  # PyYAML: Ultralytics' data.yaml (names as a list or an {id: name} mapping)

    for yml in (src / "data.yaml", src / "dataset.yaml"):
        if yml.is_file():
            names = (yaml.safe_load(yml.read_text()) or {}).get("names", [])
            if isinstance(names, dict):
                return [str(names[k]) for k in sorted(names)], yml.name
            return [str(n) for n in names], yml.name
    if (src / "classes.txt").is_file():
        lines = (src / "classes.txt").read_text().splitlines()
        return [line.strip() for line in lines if line.strip()], "classes.txt"
    return [], None


def _photos_under(root: Path) -> list[Path]:
    """Every photo under `root`, sorted, as Ultralytics lists a folder; linked folders are followed once."""
    found, walked = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        dirs[:] = [] if real in walked else sorted(d for d in dirs if not d.startswith("."))
        walked.add(real)
        found += [p for name in files if _is_photo(p := Path(folder, name))]
    return sorted(found)


def yolo_label(photo: Path) -> Path:
    """Ultralytics' rule: the last `images` folder in the photo's path becomes `labels` (.../images/a/x.jpg ->
    .../labels/a/x.txt); where there is none, or that file does not exist, the .txt beside the photo."""
    parts = photo.absolute().parts[:-1]
    if "images" in parts:
        i = len(parts) - 1 - parts[::-1].index("images")
        label = Path(*parts[:i], "labels", *parts[i + 1 :], photo.stem + ".txt")
        if label.is_file():
            return label
    return photo.with_suffix(".txt")


def _yolo(src: Path, wanted: list[str] | None) -> Annotated:
    # The roots: SRC/<split>, else SRC/images/<split>, else SRC/images, else SRC; every photo under them.
    roots: list[tuple[str | None, Path]] = list(_split_dirs(src).items())
    if not roots and (src / "images").is_dir():
        roots = list(_split_dirs(src / "images").items()) or [(None, src / "images")]
    roots = roots or [(None, src)]
    names, names_from = _yolo_names(src)
    if wanted and not names:
        raise ConfigError(
            f"--classes {','.join(wanted)}: {display_name(src)} names no classes (no data.yaml, dataset.yaml or "
            f"classes.txt), so every class id in the labels counts as crack; to pick some, write their names in "
            f"{display_name(src / 'classes.txt')}, one per line in id order"
        )
    positive = _pick(names, wanted, "data.yaml / classes.txt") if names else []
    ids = {i for i, n in enumerate(names) if n in positive} if names else None  # None: every class
    photos: list[Photo] = []
    seen: set[int] = set()
    labelled = 0
    for split, root in roots:
        for photo in _photos_under(root):
            txt = yolo_label(photo)
            boxes, errors = [], []
            if txt.is_file():  # no label file: a background photo, as YOLO reads it
                labelled += 1
                for number, line in enumerate(txt.read_text(encoding="utf-8-sig").splitlines(), 1):
                    box = _yolo_line(line, len(names))
                    if isinstance(box, str):
                        errors.append(f"{txt.name} line {number}: {box}")
                    elif box is not None:
                        seen.add(box[0])
                        if ids is None or box[0] in ids:
                            boxes.append(box[1])
            photos.append(
                Photo(
                    photo, photo.stem, split, np.array(boxes, np.float64).reshape(-1, 4), normalized=True, errors=errors
                )
            )
    settings = {
        "class_names_from": names_from,
        "class_ids_seen": sorted(seen),
        "crack_class_ids": sorted(seen if ids is None else ids),  # no names: every id seen is crack
    }
    # Not one label file: not a YOLO set (or labels where no rule finds them), not photos without cracks.
    return Annotated(photos if labelled else [], [], names, positive or names, settings)


def _yolo_line(line: str, classes: int) -> tuple[int, list[float]] | str | None:
    """(class, [cx, cy, w, h] normalized) of one label line, None for a blank one, or what is wrong."""
    parts = line.split()
    if not parts:
        return None
    values = _numbers(parts)
    if values is None or values[0] != int(values[0]) or values[0] < 0:
        return f"{line.strip()!r} is not 'class cx cy w h' with an integer class and finite numbers"
    cls, coords = int(values[0]), values[1:]
    if classes and cls >= classes:
        return f"class {cls} is not in the {classes} class names of data.yaml / classes.txt"
    if len(coords) >= 6 and len(coords) % 2 == 0:  # a segment: its polygon's box
        pts = np.asarray(coords).reshape(-1, 2)
        (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
        coords = [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]
    elif len(coords) != 4:
        return f"{len(coords)} numbers after the class, not 4 (a box) or an even count >= 6 (a polygon)"
    cx, cy, w, h = coords
    if w <= 0 or h <= 0 or not all(-0.01 <= v <= 1.01 for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)):
        return f"box {coords} is not normalized to the photo (0..1, w and h > 0): pixel coordinates?"
    return cls, coords


# --- Pascal VOC --------------------------------------------------------------------------------------------


def _voc(src: Path, wanted: list[str] | None) -> Annotated:
    splits = _split_dirs(src)
    xmls: list[tuple[str | None, Path, Path]]
    if splits:
        xmls = [(split, x, d) for split, d in splits.items() for x in sorted(d.glob("*.xml"))]
    else:
        folder = src / "Annotations" if (src / "Annotations").is_dir() else src
        sets: dict[str, str] = {}
        for name in ("train", "val", "test"):
            listed = src / "ImageSets" / "Main" / f"{name}.txt"
            if listed.is_file():
                sets |= {line.split()[0]: SPLIT_NAMES[name] for line in listed.read_text().splitlines() if line.strip()}
        images = src / "JPEGImages" if (src / "JPEGImages").is_dir() else folder
        xmls = [(sets.get(x.stem), x, images) for x in sorted(folder.glob("*.xml"))]
    parsed: list[tuple] = []
    problems: list[tuple[str, str]] = []
    names: set[str] = set()
    for split, xml, images in xmls:
        try:
            root = ET.parse(xml).getroot()
        except (ET.ParseError, OSError) as e:
            problems.append((display_name(xml), f"not readable XML ({e})"))
            continue
        if root.tag != "annotation":
            problems.append((display_name(xml), f"root element <{root.tag}>, not <annotation>: not a VOC file"))
            continue
        objects, errors = [], []
        for obj in root.iter("object"):
            name = (obj.findtext("name") or "").strip()
            names.add(name)
            bb = obj.find("bndbox")
            box = _numbers(bb.findtext(k) for k in ("xmin", "ymin", "xmax", "ymax")) if bb is not None else None
            if box is None or box[2] < box[0] or box[3] < box[1]:
                errors.append(
                    (name, f"object {name!r} has no bndbox of finite numbers with xmin <= xmax, ymin <= ymax")
                )
                continue
            # VOC boxes are 1-based and inclusive: pixel columns xmin..xmax are x0 = xmin - 1 .. x1 = xmax.
            objects.append((name, [box[0] - 1, box[1] - 1, box[2], box[3]], (obj.findtext("difficult") or "0") == "1"))
        wh = _numbers([root.findtext("size/width"), root.findtext("size/height")])
        size = (int(wh[0]), int(wh[1])) if wh and min(wh) > 0 else None
        parsed.append((split, xml, images, (root.findtext("filename") or xml.stem).strip(), objects, errors, size))
    classes = sorted(names)
    positive = _pick(classes, wanted, "the VOC object names")
    photos = []
    described: set[Path] = set()
    for split, xml, images, filename, objects, errors, size in parsed:
        photo = next((p for p in (images / filename, xml.parent / filename) if p.is_file()), None)
        if photo is None:
            candidates = [p for p in images.glob(xml.stem + ".*") if _is_photo(p)]
            photo = candidates[0] if candidates else None
        if photo is None:
            problems.append((display_name(images / filename), f"missing image named in {xml.name}"))
            continue
        described.add(photo.resolve())
        kept = [(box, hard) for name, box, hard in objects if name in positive]
        photos.append(
            Photo(
                photo,
                photo.stem,
                split,
                np.array([b for b, _ in kept], np.float64).reshape(-1, 4),
                difficult=[h for _, h in kept],
                size=size,
                errors=[why for name, why in errors if name in positive or not name],
            )
        )
    folders = {images for _, _, images, *_ in parsed} | {xml.parent for _, xml, *_ in parsed}
    for folder in sorted(folders):  # a photo without an XML is not "no crack": VOC writes a file per photo
        for p in sorted(folder.iterdir()):
            if _is_photo(p) and p.resolve() not in described:
                problems.append((display_name(p), "no VOC annotation (XML) names this photo: left out"))
    return Annotated(photos, problems, classes, positive)


# --- segmentation masks ------------------------------------------------------------------------------------


def _child(root: Path, names: tuple[str, ...]) -> list[Path]:
    """`root`'s folders named one of `names` (any case), in the order of `names`."""
    if not root.is_dir():
        return []
    dirs = {d.name.lower(): d for d in sorted(root.iterdir(), reverse=True) if d.is_dir()}
    return [dirs[n] for n in names if n in dirs]


def _mask(src: Path, wanted: list[str] | None, piece: int = 0, label: int | None = None) -> Annotated:
    if wanted:
        raise ConfigError(
            "--classes does not apply to --format mask: crack pixels are chosen by --mask-crack-label "
            "(default: above half the mask's maximum)"
        )
    photos: list[Photo] = []
    problems: list[tuple[str, str]] = []
    roots: list[tuple[str | None, Path]] = list(_split_dirs(src).items())
    for split, root in roots or [(None, src)]:
        images, masks = _child(root, IMAGE_DIRS)[:1], _child(root, MASK_DIRS)
        by_stem: dict[str, list[Path]] = {}  # a mask's stem (less `_mask`) -> its files, exact names first
        for folder in masks:
            files = sorted(f for f in folder.iterdir() if _is_photo(f) or f.suffix.lower() == ".mat")
            for f in sorted(files, key=lambda f: f.stem.endswith("_mask")):
                by_stem.setdefault(f.stem.removesuffix("_mask") if f.stem.endswith("_mask") else f.stem, []).append(f)
        for photo in sorted(p for p in images[0].iterdir() if _is_photo(p)) if images else []:
            found = by_stem.get(photo.stem)
            if not found:
                where = " or ".join(display_name(m) for m in masks) or f"{display_name(root / 'masks')} (missing)"
                problems.append(
                    (
                        display_name(photo),
                        f"no mask {photo.stem}.png, {photo.stem}_mask.png or {photo.stem}.mat in {where}",
                    )
                )
                continue
            photos.append(
                Photo(photo, photo.stem, split, np.zeros((0, 4)), mask=found[0], mask_label=label, mask_piece=piece)
            )
    settings = {"mask_crack_label": label, "mask_piece": piece}
    return Annotated(photos, problems, ["crack"], ["crack"], settings)


def resolve_boxes(photo: Photo, width: int, height: int) -> tuple[np.ndarray, list[str], list[str]]:
    """The photo's ground-truth boxes in pixels, clipped to it: (boxes (N, 4), notes, errors).

    Notes are boxes clipped at the border (kept). Errors mean the ground truth is incomplete: an
    unreadable annotation or mask, a box outside the photo, a size that disagrees with the photo.
    A photo with errors must be left out: its cracks would become negatives.
    """
    errors = list(photo.errors)
    if photo.size is not None and tuple(photo.size) != (width, height):
        errors.append(
            f"the annotation gives the photo as {photo.size[0]}x{photo.size[1]}, the file is "
            f"{width}x{height} (another version of the photo?)"
        )
    if photo.mask is not None:
        try:
            crack = read_crack(photo.mask, photo.mask_label)
        except ValueError as e:
            return np.zeros((0, 4)), [], [*errors, f"unreadable mask {display_name(photo.mask)} ({e})"]
        if crack.shape != (height, width):
            return (
                np.zeros((0, 4)),
                [],
                [
                    *errors,
                    f"mask {display_name(photo.mask)} is {crack.shape[1]}x{crack.shape[0]}, the photo {width}x{height}",
                ],
            )
        return mask_boxes(crack, photo.mask_piece), [], errors
    boxes = photo.boxes.copy()
    if photo.normalized:
        cx, cy, w, h = boxes.T * np.array([[width], [height], [width], [height]])
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    clipped = boxes.copy()
    clipped[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    clipped[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    # Overshooting the border by more than a pixel (not rounding) is noted; empty once clipped is an error.
    far = np.abs(clipped - boxes).max(1) > 1 if len(boxes) else np.zeros(0, bool)
    empty = (clipped[:, 2] - clipped[:, 0] < 1) | (clipped[:, 3] - clipped[:, 1] < 1)
    text = lambda box: [round(float(v), 1) for v in box]  # noqa: E731
    notes = [f"box {text(b)} reaches beyond the photo ({width}x{height}): clipped" for b in boxes[far & ~empty]]
    errors += [f"box {text(b)} is outside the photo ({width}x{height}) or empty" for b in boxes[empty]]
    return clipped[~empty], notes, errors
