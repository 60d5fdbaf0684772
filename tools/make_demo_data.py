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

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from crackio.names import format_name  # noqa: E402

FULL = 512  # side of the synthetic full image; proposals are cut from it
CROP = 224  # proposals are resized to the backbone's input size
SPLITS = (("train", 0.7), ("valid", 0.15), ("test", 0.15))
POSITIVE_IOU = 0.5  # R-CNN fine-tuning label rule: crack if IoU > 0.5


def surface(rng: np.random.Generator) -> Image.Image:
    """A concrete- or tile-like background."""
    base = rng.uniform(110, 200, size=3).astype(np.float32)
    # Low-frequency blotches: a coarse noise field upsampled by PIL (cheap and smooth).
    coarse = rng.normal(0, 18, size=(16, 16)).astype(np.float32)
    gray = np.asarray(Image.fromarray(coarse, mode="F").resize((FULL, FULL), Image.BILINEAR)).copy()
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


def draw_crack(draw: ImageDraw.ImageDraw, rng: np.random.Generator) -> np.ndarray:
    """A branching random-walk crack; returns its ground-truth box (x0, y0, x1, y1)."""
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


def make_image(out: Path, stem: str, rng: np.random.Generator, count: int) -> tuple[int, int]:
    """Draw one full image, cut `count` proposals from it; returns (written, positives)."""
    img = surface(rng)
    draw = ImageDraw.Draw(img)
    gt = np.stack([draw_crack(draw, rng) for _ in range(int(rng.integers(1, 3)))])
    img = img.filter(ImageFilter.BoxBlur(1))  # soften the drawn lines like a lens would
    boxes = proposals(rng, gt, count)
    ious = box_iou(torch.from_numpy(boxes), torch.from_numpy(gt)).max(dim=1).values.numpy()
    positives = 0
    for p, (box, iou) in enumerate(zip(boxes, ious)):
        iou = round(float(iou), 3)  # the name holds 3 decimals; the label must agree with it
        label = int(iou > POSITIVE_IOU)
        positives += label
        crop = img.crop(tuple(int(round(v)) for v in box)).resize((CROP, CROP), Image.BILINEAR)
        crop.save(out / format_name(stem, p, iou, label), quality=90)
    return count, positives


def generate(out: Path, images: int, per_image: int, seed: int) -> dict[str, tuple[int, int]]:
    """Write the three splits under `out`; returns {split: (crops, positives)}."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(images)
    counts: dict[str, tuple[int, int]] = {}
    start = 0
    for i, (split, share) in enumerate(SPLITS):
        n = images - start if i == len(SPLITS) - 1 else max(1, round(images * share))
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        total = pos = 0
        for number in order[start:start + n]:
            # Roboflow-style stem with dots: the case a naive split(".") gets wrong.
            stem = f"IMG_{number:04d}_jpg.rf.{(number * 2654435761) % 16**6:06x}"
            image_rng = np.random.default_rng([seed, int(number)])
            written, positives = make_image(folder, stem, image_rng, per_image)
            total += written
            pos += positives
        counts[split] = (total, pos)
        start += n
    return counts


def link_large(out: Path, split: str, count: int) -> int:
    """OUT/<split> with `count` hard links to the train crops under new unique names; returns the count."""
    from crackio.names import parse_name

    sources = sorted((out / "train").iterdir())
    if not sources:
        raise SystemExit(f"error: {out / 'train'} holds no crops to link")
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        src = sources[i % len(sources)]
        stem = parse_name(src.name).stem
        name = f"{stem}_c{i // len(sources)}{src.name[len(stem):]}"  # same proposal, IoU text and label
        try:
            (folder / name).hardlink_to(src)
        except FileExistsError:
            pass  # a re-run: the name is already there
        except OSError as e:
            raise SystemExit(f"error: cannot hard-link {src} into {folder} ({e}); use a filesystem with hard "
                             f"links, or a smaller --large") from e
    return count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="output folder (gets train/, valid/, test/)")
    ap.add_argument("--images", type=int, default=60, help="synthetic full images (split 70/15/15)")
    ap.add_argument("--proposals-per-image", type=int, default=40, help="proposal crops cut from each")
    ap.add_argument("--seed", type=int, default=0, help="same seed, same files")
    ap.add_argument("--large", type=int, default=0, metavar="COUNT",
                    help="also write a split of COUNT names hard-linked to the train crops (e.g. 1000000)")
    ap.add_argument("--large-split", default="large", help="that split's folder name (default: large)")
    args = ap.parse_args(argv)
    if args.images < len(SPLITS) or args.proposals_per_image < 1 or args.large < 0:
        ap.error(f"--images must be >= {len(SPLITS)}, --proposals-per-image >= 1, --large >= 0")
    if args.large_split in {name for name, _ in SPLITS}:
        ap.error(f"--large-split must not be one of {[name for name, _ in SPLITS]}")
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
