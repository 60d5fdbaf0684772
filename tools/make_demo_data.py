"""Generate a synthetic proposal set: crops of textured surfaces with drawn cracks.

    python tools/make_demo_data.py OUT [--images N] [--proposals-per-image K] [--seed S]
                                       [--large COUNT [--large-split NAME]]

Writes OUT/train, OUT/valid and OUT/test, each holding 224x224 JPEG crops named
`<stem>.<proposal>.<iou>.<label>.jpg`, exactly the layout a real R-CNN proposal
run produces. Deterministic by seed.

--large COUNT also writes OUT/<large-split> (default `large`) with COUNT names
hard-linked to the train crops (`<stem>_c<copy>.<proposal>.<iou>.<label>.jpg`):
a proposal folder at the scale users have (1M names) for a few MB of disk, to
measure listing, packing and index costs (tools/bench.py --split large).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from crackio.cli import ArgumentParser  # noqa: E402
from crackio.format.layout import SPLITS as LAYOUT_SPLITS  # noqa: E402
from crackio.writing.filenames import format_name  # noqa: E402
from crackio.writing.regions import box_iou  # noqa: E402

FULL = 512  # side of the synthetic full image; proposals are cut from it
CROP = 224  # proposals are resized to the backbone's input size
SPLITS = tuple(zip(LAYOUT_SPLITS, (0.7, 0.15, 0.15)))  # train, valid, test and their shares of the images
POSITIVE_IOU = 0.5  # R-CNN fine-tuning label rule: crack if IoU > 0.5


def surface(rng: np.random.Generator) -> Image.Image:
    """A concrete- or tile-like background."""
    base = rng.uniform(110, 200, size=3).astype(np.float32)
    # Low-frequency blotches: a coarse noise field upsampled by PIL (cheap and smooth).
    coarse = rng.normal(0, 18, size=(16, 16)).astype(np.float32)
    gray = np.asarray(Image.fromarray(coarse, mode="F").resize((FULL, FULL), Image.Resampling.BILINEAR)).copy()
    gray += rng.standard_normal((FULL, FULL), dtype=np.float32) * np.float32(rng.uniform(4, 14))
    if rng.random() < 0.5:  # tile: a per-tile tint and dark grout lines
        pitch = int(rng.integers(96, 200))
        cells = np.arange(FULL) // pitch
        tint = (np.sin((cells[:, None] * 7 + cells[None, :]) * 12.9898) * 10).astype(np.float32)
        gray += tint
        grout = (np.arange(FULL) % pitch) < 4
        gray[grout, :] -= 35
        gray[:, grout] -= 35
    rgb = np.empty((FULL, FULL, 3), np.uint8)
    for c in range(3):
        np.clip(gray + base[c], 0, 255, out=rgb[..., c], casting="unsafe")
    return Image.fromarray(rgb, mode="RGB")


def draw_crack(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, mask: ImageDraw.ImageDraw | None = None
) -> np.ndarray:
    """A branching random-walk crack (also drawn into `mask` as 255); returns its ground-truth box (x0, y0, x1, y1)."""
    length = int(rng.integers(12, 40))
    step = rng.uniform(5, 9)
    shade = int(rng.uniform(10, 70))  # contrast varies from faint to stark
    x, y = rng.uniform(FULL * 0.2, FULL * 0.8, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    walkers = [(x, y, angle, length, rng.uniform(1.5, 5.0))]
    points = [(x, y)]
    while walkers:
        x, y, angle, steps, width = walkers.pop()
        for _ in range(steps):
            angle += rng.normal(0, 0.35)
            nx = min(max(x + step * math.cos(angle), 2), FULL - 3)
            ny = min(max(y + step * math.sin(angle), 2), FULL - 3)
            draw.line([(x, y), (nx, ny)], fill=(shade, shade, shade), width=max(1, round(width)))
            if mask is not None:
                mask.line([(x, y), (nx, ny)], fill=255, width=max(1, round(width)))
            x, y = nx, ny
            width = max(1.0, width * rng.uniform(0.93, 1.03))
            points.append((x, y))
            if rng.random() < 0.06 and steps > 6:  # branch off at a sharp angle
                walkers.append((x, y, angle + rng.choice((-1, 1)) * rng.uniform(0.5, 1.2), steps // 2, width * 0.7))
    pts = np.asarray(points)
    pad = 6
    return np.array([*(pts.min(0) - pad), *(pts.max(0) + pad)]).clip(0, FULL)


def proposals(rng: np.random.Generator, gt: np.ndarray, count: int) -> np.ndarray:
    """Boxes around the cracks (jittered ground truth) and elsewhere (random)."""
    boxes = []
    for _ in range(count):
        if rng.random() < 0.5:
            x0, y0, x1, y1 = gt[rng.integers(len(gt))]
            w, h = x1 - x0, y1 - y0
            cx = (x0 + x1) / 2 + rng.normal(0, 0.25) * w
            cy = (y0 + y1) / 2 + rng.normal(0, 0.25) * h
            w *= rng.uniform(0.6, 1.5)
            h *= rng.uniform(0.6, 1.5)
        else:
            w, h = rng.uniform(40, 260, size=2)
            cx, cy = rng.uniform(0, FULL, size=2)
        w, h = max(w, 24), max(h, 24)
        boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    return np.clip(np.asarray(boxes), 0, FULL)


def full_image(rng: np.random.Generator) -> tuple[Image.Image, np.ndarray, Image.Image]:
    """One synthetic photo (FULL x FULL), its ground-truth boxes (N, 4) and its crack mask (L, 255 = crack)."""
    img = surface(rng)
    mask = Image.new("L", img.size, 0)
    draw, mask_draw = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    gt = np.stack([draw_crack(draw, rng, mask_draw) for _ in range(int(rng.integers(1, 3)))])
    return img.filter(ImageFilter.BoxBlur(1)), gt, mask  # soften the drawn lines like a lens would


def make_image(out: Path, stem: str, rng: np.random.Generator, count: int) -> tuple[int, int]:
    """Draw one full image, cut `count` proposals from it; returns (written, positives)."""
    img, gt, _ = full_image(rng)
    boxes = proposals(rng, gt, count)
    ious = box_iou(boxes, gt).max(axis=1)
    positives = 0
    for p, (box, iou) in enumerate(zip(boxes, ious)):
        iou = round(float(iou), 3)  # the name holds 3 decimals; the label must agree with it
        label = int(iou > POSITIVE_IOU)
        positives += label
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        crop = img.crop((x0, y0, x1, y1)).resize((CROP, CROP), Image.Resampling.BILINEAR)
        crop.save(out / format_name(stem, p, iou, label), quality=90)
    return count, positives


def image_plan(images: int, seed: int) -> list[tuple[str, str, np.random.Generator]]:
    """(split, stem, the photo's own generator) for every synthetic photo: crops and photos share it."""
    order = np.random.default_rng(seed).permutation(images)
    plan, start = [], 0
    for i, (split, share) in enumerate(SPLITS):
        n = images - start if i == len(SPLITS) - 1 else max(1, round(images * share))
        for number in order[start : start + n]:
            # Roboflow-style stem with dots: the case a naive split(".") gets wrong.
            stem = f"IMG_{number:04d}_jpg.rf.{(number * 2654435761) % 16**6:06x}"
            plan.append((split, stem, np.random.default_rng([seed, int(number)])))
        start += n
    return plan


def generate(out: Path, images: int, per_image: int, seed: int) -> dict[str, tuple[int, int]]:
    """Write the three splits under `out`; returns {split: (crops, positives)}."""
    counts: dict[str, tuple[int, int]] = {split: (0, 0) for split, _ in SPLITS}
    for split, stem, rng in image_plan(images, seed):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        written, positives = make_image(folder, stem, rng, per_image)
        counts[split] = (counts[split][0] + written, counts[split][1] + positives)
    return counts


FORMATS = ("coco", "yolo", "voc", "mask")


def write_photos(out: Path, images: int, seed: int, size: tuple[int, int], formats=FORMATS) -> int:
    """The synthetic photos (resized to `size` = (width, height)) with their ground truth, one dataset per
    format in OUT/<format>/<split>/, laid out as Roboflow exports them. Returns the photos written."""
    width, height = size
    scale = np.array([width, height, width, height]) / FULL
    photos: dict[str, list] = {}
    for split, stem, rng in image_plan(images, seed):
        img, gt, mask = full_image(rng)
        img = img.resize(size, Image.Resampling.BILINEAR)
        boxes = (gt * scale).round(1)
        photos.setdefault(split, []).append((stem, img, boxes, mask.resize(size, Image.Resampling.NEAREST)))
    for fmt in formats:
        for split, items in photos.items():
            folder = out / fmt / split
            folder.mkdir(parents=True, exist_ok=True)
            coco = {
                "images": [],
                "annotations": [],
                "categories": [{"id": 0, "name": "cracks"}, {"id": 1, "name": "crack"}],
            }
            for number, (stem, img, boxes, mask) in enumerate(items):
                name = f"{stem}.jpg"
                target = {"coco": folder, "voc": folder}.get(fmt, folder / "images")
                target.mkdir(exist_ok=True)
                img.save(target / name, quality=95)
                if fmt == "coco":
                    coco["images"].append({"id": number, "file_name": name, "width": width, "height": height})
                    first = len(coco["annotations"])  # COCO annotation ids are unique in a file
                    coco["annotations"] += [
                        {
                            "id": first + k,
                            "image_id": number,
                            "category_id": 1,
                            "bbox": [b[0], b[1], round(b[2] - b[0], 1), round(b[3] - b[1], 1)],
                            "area": float((b[2] - b[0]) * (b[3] - b[1])),
                            "iscrowd": 0,
                        }
                        for k, b in enumerate(boxes)
                    ]
                elif fmt == "yolo":
                    (folder / "labels").mkdir(exist_ok=True)
                    lines = [
                        f"0 {(b[0] + b[2]) / 2 / width:.6f} {(b[1] + b[3]) / 2 / height:.6f} "
                        f"{(b[2] - b[0]) / width:.6f} {(b[3] - b[1]) / height:.6f}"
                        for b in boxes
                    ]
                    (folder / "labels" / f"{stem}.txt").write_text("".join(line + "\n" for line in lines))
                elif fmt == "voc":
                    objects = "".join(
                        f"<object><name>crack</name><difficult>0</difficult><bndbox><xmin>{b[0] + 1:g}</xmin>"
                        f"<ymin>{b[1] + 1:g}</ymin><xmax>{b[2]:g}</xmax><ymax>{b[3]:g}</ymax></bndbox></object>"
                        for b in boxes
                    )
                    (folder / f"{stem}.xml").write_text(
                        f"<annotation><filename>{name}</filename><size><width>{width}</width><height>{height}"
                        f"</height><depth>3</depth></size>{objects}</annotation>\n"
                    )
                else:
                    (folder / "masks").mkdir(exist_ok=True)
                    mask.save(folder / "masks" / f"{stem}.png")
            if fmt == "coco":
                (folder / "_annotations.coco.json").write_text(json.dumps(coco))
        if fmt == "yolo":
            (out / fmt / "data.yaml").write_text("names: [crack]\nnc: 1\n")
    return sum(len(v) for v in photos.values())


def link_large(out: Path, split: str, count: int) -> int:
    """OUT/<split> with `count` hard links to the train crops under new unique names; returns the count."""
    from crackio.writing.filenames import parse_name

    sources = sorted((out / "train").iterdir())
    if not sources:
        raise SystemExit(f"error: {out / 'train'} holds no crops to link")
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        src = sources[i % len(sources)]
        stem = parse_name(src.name).stem
        name = f"{stem}_c{i // len(sources)}{src.name[len(stem) :]}"  # same proposal, IoU text and label
        try:
            (folder / name).hardlink_to(src)
        except FileExistsError:
            pass  # a re-run: the name is already there
        except OSError as e:
            raise SystemExit(
                f"error: cannot hard-link {src} into {folder} ({e}); use a filesystem with hard "
                f"links, or a smaller --large"
            ) from e
    return count


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="output folder (gets train/, valid/, test/)")
    ap.add_argument("--images", type=int, default=60, help="synthetic full images (split 70/15/15)")
    ap.add_argument("--proposals-per-image", type=int, default=40, help="proposal crops cut from each")
    ap.add_argument("--seed", type=int, default=0, help="same seed, same files")
    ap.add_argument(
        "--large",
        type=int,
        default=0,
        metavar="COUNT",
        help="also write a split of COUNT names hard-linked to the train crops (e.g. 1000000)",
    )
    ap.add_argument("--large-split", default="large", help="that split's folder name (default: large)")
    ap.add_argument(
        "--photos",
        type=Path,
        help="also write the full photos with their ground truth here, as "
        "PHOTOS/{coco,yolo,voc,mask}/<split>/ (tools/propose.py's input)",
    )
    ap.add_argument("--photo-size", default="480x320", help="photos' WIDTHxHEIGHT (default 480x320)")
    ap.add_argument("--formats", default=",".join(FORMATS), help="annotation formats for --photos")
    ap.add_argument("--photos-only", action="store_true", help="write --photos and no crops")
    args = ap.parse_args(argv)
    if args.images < len(SPLITS) or args.proposals_per_image < 1 or args.large < 0:
        ap.error(f"--images must be >= {len(SPLITS)}, --proposals-per-image >= 1, --large >= 0")
    if args.large_split in {name for name, _ in SPLITS}:
        ap.error(f"--large-split must not be one of {[name for name, _ in SPLITS]}")
    formats = [f for f in args.formats.split(",") if f]
    if any(f not in FORMATS for f in formats):
        ap.error(f"--formats takes {', '.join(FORMATS)}")
    try:
        size = tuple(int(v) for v in args.photo_size.lower().split("x"))
        assert len(size) == 2 and min(size) >= 32
    except (ValueError, AssertionError):
        ap.error(f"--photo-size must look like 480x320 (each side >= 32), got {args.photo_size!r}")
    if args.photos:
        t0 = time.perf_counter()
        n = write_photos(args.photos, args.images, args.seed, size, formats)
        print(
            f"wrote {n} photos with ground truth as {', '.join(formats)} under {args.photos} "
            f"in {time.perf_counter() - t0:.1f} s"
        )
    if args.photos_only:
        return 0
    t0 = time.perf_counter()
    counts = generate(args.out, args.images, args.proposals_per_image, args.seed)
    dt = time.perf_counter() - t0
    crops = sum(c for c, _ in counts.values())
    parts = ", ".join(f"{s} {c} ({p} crack)" for s, (c, p) in counts.items())
    print(f"wrote {crops} crops to {args.out}: {parts} in {dt:.1f} s ({crops / dt:.0f} crops/s)")
    if args.large:
        t0 = time.perf_counter()
        link_large(args.out, args.large_split, args.large)
        print(f"linked {args.large} names into {args.out / args.large_split} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
