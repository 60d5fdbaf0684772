"""Proposal recall and photos/s against --method, --max-proposals, --mode and --search-max-side, on photos like
real ones.

    python tools/bench_proposals.py [--photos 20] [--quality-photos 8] [--size 800x600]
        [--caps 100,300,1000,2000] [--max-sides 0,500] [--seed 0] [--json OUT] [--write-photos DIR]

Generates seeded photos of concrete (aggregate, blotches, stains) and asphalt (bright grains) with
1-3 long thin branching cracks (40-100% of the longer side, 1-4 px wide, faint to dark), saved
and read back as JPEG (quality 90) like camera photos. Ground truth is the crack mask's boxes by
`--format mask`'s rule (crackio.writing.annotations.mask_boxes: one box per connected crack
network). Each photo goes through the proposal stage's own functions, one core (OpenCV one thread,
as each `--workers` thread runs): `search_regions` and `ridges` (each timed), then for each method
(selective search, crack-following windows, both: the default) and every cap the stage's `capped`
and recall (ground-truth boxes some proposal covers at IoU >= 0.5, the manifest's
`proposal_recall`), and the recall of every region (`proposal_recall_uncapped`). photos/s at a cap
= 1 / (search seconds + crops x seconds per crop), a crop per proposal and ground-truth box (warp +
JPEG, as the stage stores every one with --negatives-per-image 0), the crop cost measured on 500
proposals of each of the first 3 photos. Quality mode takes ~4x as long, so it runs on the first
--quality-photos photos, and the fast rows on those same photos are printed beside it.
--write-photos also writes the photos (their JPEG bytes and masks) as a `--format mask` dataset
(DIR/test/{images,masks}): tools/propose.py on it gives the same regions and recall.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from crackio.cli import ArgumentParser  # noqa: E402
from crackio.writing.annotations import mask_boxes  # noqa: E402
from crackio.writing.regions import (  # noqa: E402
    RIDGES,
    SELECTIVE_SEARCH,
    cap,
    capped,
    covered,
    encode_jpeg,
    not_among,
    ridges,
    search_regions,
    warp,
)

MIN_SIZE = 8  # ProposalSettings().min_size


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int], sigma: float) -> np.ndarray:
    import cv2

    coarse = rng.normal(0, sigma, cells).astype(np.float32)
    return cv2.resize(coarse, shape[::-1], interpolation=cv2.INTER_CUBIC)


def surface(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float32 H x W x 3: concrete (pebbles of aggregate, blotches) or asphalt (dense bright grains), stained."""
    import cv2

    shape = (height, width)
    concrete = rng.random() < 0.5
    gray = (135 if concrete else 85) + smooth_noise(rng, shape, (4, 5), 14 if concrete else 10)
    gray += rng.normal(0, 9 if concrete else 14, shape).astype(np.float32)
    if concrete:
        gray += smooth_noise(rng, shape, (30, 40), 6)
    spots = np.zeros(shape, np.float32)
    n = int(height * width / (200 if concrete else 50))
    radius = rng.uniform(1, 6, n) if concrete else rng.uniform(0.5, 3.5, n)
    shade = rng.normal(0, 28, n) if concrete else rng.uniform(-35, 60, n)
    for x, y, r, v in zip(rng.uniform(0, width, n), rng.uniform(0, height, n), radius, shade):
        cv2.circle(spots, (int(x), int(y)), int(round(r)), float(v), -1)
    gray += cv2.GaussianBlur(spots, (0, 0), 0.8) if concrete else spots
    for _ in range(int(rng.integers(0, 3))):  # stains: wet patches, oil
        stain = np.zeros(shape, np.float32)
        centre = (int(rng.uniform(0, width)), int(rng.uniform(0, height)))
        axes = (int(rng.uniform(30, 150)), int(rng.uniform(20, 90)))
        cv2.ellipse(stain, centre, axes, float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(-30, 20)), -1)
        gray += cv2.GaussianBlur(stain, (0, 0), 15)
    return gray[..., None] + rng.uniform(-8, 8, 3).astype(np.float32)


def draw_crack(rng: np.random.Generator, shade: np.ndarray, mask: np.ndarray) -> None:
    """A long thin crack grown both ways from a point, wandering around its heading, with a few branches."""
    import cv2

    height, width = mask.shape
    step = 4.0
    steps = int(rng.uniform(0.4, 1.0) * max(height, width) / step / 2)
    x, y = rng.uniform(0.15 * width, 0.85 * width), rng.uniform(0.15 * height, 0.85 * height)
    heading, width_px, depth = rng.uniform(0, 2 * math.pi), rng.uniform(1.0, 3.5), rng.uniform(20, 80)
    walkers = [(x, y, heading, steps, width_px), (x, y, heading + math.pi, steps, width_px)]
    while walkers:
        x, y, heading, steps, w = walkers.pop()
        angle = heading
        for _ in range(steps):
            angle = heading + 0.8 * (angle - heading) + rng.normal(0, 0.3)  # wanders, pulled back to the heading
            nx, ny = x + step * math.cos(angle), y + step * math.sin(angle)
            if not (1 <= nx < width - 1 and 1 <= ny < height - 1):
                break
            thickness = max(1, int(round(w)))
            cv2.line(mask, (int(x), int(y)), (int(nx), int(ny)), 255, thickness)
            cv2.line(shade, (int(x), int(y)), (int(nx), int(ny)), -depth, thickness)
            x, y, w = nx, ny, min(max(0.8, w * rng.uniform(0.95, 1.05)), 4.0)
            if rng.random() < 0.015 and steps > 20:
                turn = rng.choice((-1, 1)) * rng.uniform(0.5, 1.1)
                walkers.append((x, y, angle + turn, steps // 3, w * 0.7))


def photo(seed: int, number: int, width: int, height: int) -> tuple[bytes, np.ndarray]:
    """The photo as a quality-90 JPEG, as a camera gives it, and its crack mask (uint8 H x W, 255 = crack)."""
    import cv2

    rng = np.random.default_rng([seed, number])
    base = surface(rng, height, width)
    shade, mask = np.zeros((height, width), np.float32), np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        draw_crack(rng, shade, mask)
    rgb = np.clip(base + cv2.GaussianBlur(shade, (0, 0), 0.7)[..., None], 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=90)
    return out.getvalue(), mask


def measure(photos: list, mode: str, max_side: int, caps: list[int], seed: int) -> list[dict]:
    """Selective search and crack-following windows on each photo: per method (selective search, the windows, both),
    regions, seconds, and the proposals and hits at each cap and uncapped."""
    rows: dict[str, list] = {SELECTIVE_SEARCH: [], RIDGES: [], f"{SELECTIVE_SEARCH}+{RIDGES}": []}
    for stem, rgb, gt in photos:
        t0 = time.perf_counter()
        search = search_regions(rgb, mode, MIN_SIZE, max_side)
        t1 = time.perf_counter()
        lines = ridges(rgb, MIN_SIZE, max_side)
        t2 = time.perf_counter()
        rest = not_among(search, lines)
        photo_seed = [seed, zlib.crc32(stem.encode())]
        for method, (first, second, seconds) in {
            SELECTIVE_SEARCH: (np.zeros((0, 4)), search, t1 - t0),
            RIDGES: (lines, np.zeros((0, 4)), t2 - t1),
            f"{SELECTIVE_SEARCH}+{RIDGES}": (lines, rest, t2 - t0),
        }.items():
            every = np.concatenate([first, second])
            kept = {n: capped(first, second, n, photo_seed) for n in caps}
            rows[method].append(
                {
                    "stem": stem,
                    "gt": len(gt),
                    "regions": len(every),
                    "seconds": seconds,
                    "proposals": {n: len(b) for n, b in kept.items()},
                    "hits": {n: covered(gt, b) for n, b in kept.items()} | {"all": covered(gt, every)},
                }
            )
    return [{"method": m, "mode": mode, "max_side": max_side, "photos": r} for m, r in rows.items()]


def crop_seconds(photos: list, boxes_per_photo: int) -> float:
    """Seconds per stored crop (warp of appendix A + JPEG, the stage's defaults) on up to `boxes_per_photo` of each
    photo's regions."""
    work = [
        (rgb, rgb.reshape(-1, 3).mean(0), cap(search_regions(rgb, "fast", MIN_SIZE, 500), boxes_per_photo, 0))
        for _, rgb, _ in photos
    ]
    t0 = time.perf_counter()  # the crops only, not the search that found their boxes
    for rgb, fill, boxes in work:
        for box in boxes:
            encode_jpeg(warp(rgb, box, 16, 224, fill), 95)
    return (time.perf_counter() - t0) / max(sum(len(boxes) for *_, boxes in work), 1)


def tables(results: list[dict], caps: list[int], per_crop: float) -> str:
    """Two markdown tables, one row per mode and search size: recall at each cap and of every region; photos/s."""
    head = ["method", "mode", "search at", "photos", "regions per photo"]
    recall = [head + [f"recall at {n}" for n in caps] + ["every region"]]
    speed = [head[:4] + ["s per search"] + [f"photos/s at {n}" for n in caps]]
    for r in results:
        rows = r["photos"]
        gt = sum(p["gt"] for p in rows) or 1
        search = float(np.mean([p["seconds"] for p in rows]))
        mode = "-" if r["method"] == RIDGES else r["mode"]
        name = [r["method"], mode, f"{r['max_side']} px" if r["max_side"] else "full size", str(len(rows))]
        crops = [float(np.mean([p["proposals"][n] + p["gt"] for p in rows])) for n in caps]  # + ground truth's crops
        recall.append(
            name
            + [f"{np.mean([p['regions'] for p in rows]):.0f}"]
            + [f"{sum(p['hits'][n] for p in rows) / gt:.2f}" for n in caps]
            + [f"{sum(p['hits']['all'] for p in rows) / gt:.2f}"]
        )
        speed.append(name + [f"{search:.2f}"] + [f"{1 / (search + c * per_crop):.2f}" for c in crops])
    return "\n\n".join(
        "\n".join(
            ["| " + " | ".join(t[0]) + " |", "|" + " --- |" * len(t[0])] + ["| " + " | ".join(r) + " |" for r in t[1:]]
        )
        for t in (recall, speed)
    )


def write_mask_dataset(out: Path, stems: list[str], jpegs: list[bytes], masks: list[np.ndarray]) -> None:
    """The photos' own JPEG bytes and their masks: tools/propose.py reads exactly the pixels measured here."""
    for folder in ("images", "masks"):
        (out / "test" / folder).mkdir(parents=True, exist_ok=True)
    for stem, jpeg, mask in zip(stems, jpegs, masks):
        (out / "test" / "images" / f"{stem}.jpg").write_bytes(jpeg)
        Image.fromarray(mask).save(out / "test" / "masks" / f"{stem}.png")


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=int, default=20, help="photos for fast mode")
    ap.add_argument("--quality-photos", type=int, default=8, help="the first N photos for quality mode (~4x slower)")
    ap.add_argument("--size", default="800x600", help="photo WIDTHxHEIGHT")
    ap.add_argument("--caps", default="100,300,1000,2000", help="--max-proposals values")
    ap.add_argument("--max-sides", default="0,500", help="--search-max-side values (0 = full size)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the photos and the caps")
    ap.add_argument("--json", type=Path, help="also write every per-photo figure here")
    ap.add_argument("--write-photos", type=Path, help="also write the photos as a --format mask dataset here")
    args = ap.parse_args(argv)
    import cv2

    cv2.setNumThreads(1)  # one core per photo, as each proposal-stage worker thread runs
    width, height = (int(v) for v in args.size.lower().split("x"))
    caps = [int(v) for v in args.caps.split(",")]
    sides = [int(v) for v in args.max_sides.split(",")]
    stems = [f"photo_{i:03d}" for i in range(args.photos)]
    jpegs, masks = zip(*(photo(args.seed, i, width, height) for i in range(args.photos)))
    # Decoded by Pillow as the proposal stage reads photos: selective search is sensitive to the decoder's pixels.
    photos = [
        (s, np.asarray(Image.open(io.BytesIO(j)).convert("RGB")), mask_boxes(m)) for s, j, m in zip(stems, jpegs, masks)
    ]
    if args.write_photos:
        write_mask_dataset(args.write_photos, stems, list(jpegs), list(masks))
    boxes = np.concatenate([p[2] for p in photos])
    sizes = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1).max(1)
    print(
        f"{len(photos)} photos {width}x{height}, {len(boxes)} ground-truth boxes (longer side median "
        f"{np.median(sizes):.0f} px, {np.min(sizes):.0f}-{np.max(sizes):.0f}); load {os.getloadavg()[0]:.2f} "
        f"on {len(os.sched_getaffinity(0))} cores",
        flush=True,
    )
    per_crop = crop_seconds(photos[:3], 500)
    print(f"crops (warp + JPEG): {per_crop * 1000:.2f} ms each", flush=True)
    results = []
    for mode, count in (("fast", args.photos), ("quality", args.quality_photos)):
        for side in sides if count else []:
            t0 = time.perf_counter()
            rows = measure(photos[:count], mode, side, caps, args.seed)
            results += [r for r in rows if r["method"] != RIDGES or mode == "fast"]  # the windows have no mode
            print(f"{mode} at {side or 'full size'} on {count} photos: {time.perf_counter() - t0:.0f} s", flush=True)
    if 0 < args.quality_photos < args.photos:  # fast on the quality rows' photos: the same photos compared
        subset = [
            r | {"photos": r["photos"][: args.quality_photos]}
            for r in results
            if r["mode"] == "fast" and r["method"] != RIDGES
        ]
        fast = [r for r in results if r["mode"] == "fast"]
        results = fast + subset + results[len(fast) :]
    print(tables(results, caps, per_crop))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"per_crop_seconds": per_crop, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
