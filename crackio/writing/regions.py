"""R-CNN's proposal stage for one photo: selective search, ground truth, IoU and label, warped crops.

Follows Girshick et al. 2014 (R-CNN), section 2.3 and appendix A:
- proposals from selective search (`opencv-contrib`'s `cv2.ximgproc.segmentation`, fast mode by
  default) and, by default, crack-following windows (`ridges` below: the boxes of a photo's dark thin
  lines, which selective search's merged colour regions seldom outline), optionally on the photo
  downscaled to `search_max_side` (R-CNN's code searched photos resized to 500 pixels wide) with the
  boxes scaled back to photo pixels, capped at `max_proposals` (R-CNN used ~2,000 per image), plus
  every ground-truth box and `gt_jitter` jittered copies of each (fine-tuning also trains on ground
  truth; `train_only_gt` keeps those out of the validation and test splits, whose crops are then
  every proposal detection will score);
- each proposal's IoU with its best-matching ground-truth box (`torchvision.ops.box_iou`), written
  to 3 decimals as the original's file names carry it; label = that IoU > `positive_iou` (0.5 for
  fine-tuning, the original's rule);
- the warp of appendix A: the box is dilated so that `context` pixels of context surround it at the
  warped size (16 in R-CNN), pixels outside the photo take the photo's mean colour, and the region
  is warped anisotropically to `size` x `size` (bilinear), then stored as an RGB JPEG (quality 95,
  the quality `tools/pack.py` converts with).
The detection stage (`python -m train detect`) uses the same functions, so it sees crops exactly
like the ones the network was trained on.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from crackio.errors import Broken, ConfigError, OutOfRange, below

SELECTIVE_SEARCH, RIDGES = "selective-search", "ridges"
METHODS = (f"{SELECTIVE_SEARCH}+{RIDGES}", SELECTIVE_SEARCH, RIDGES)
# Crack-following windows (`ridges`): a crack is a line darker than the surface around it, so the
# photo's grey levels minus their morphological closing (OpenCV's black-hat) with an ellipse of
# RIDGE_KERNELS pixels keep lines narrower than the kernel (blurred by sigma 1 against JPEG noise);
# the pixels above each RIDGE_PERCENTILES percentile of that response, joined by dilation with an
# ellipse of RIDGE_JOINS pixels (gaps up to about that size), give one box per connected line
# network with at least 4 x join^2 pixels after the dilation (specks dropped). Percentiles rather
# than fixed levels: a photo's contrast varies, and a crack covers ~0.5-5% of a photo. Chosen on
# tools/bench_proposals.py's generated photos (docs/performance.md#proposal-recall): recall of these
# windows alone 0.89 at ~530 boxes and 0.18 s per 800x600 photo, against 0.82 for 3 percentiles and
# 3 kernels' 0.93 at 0.63 s.
RIDGE_KERNELS = (9, 17)
RIDGE_PERCENTILES = (95.0, 97.0, 98.0, 99.0, 99.5)
RIDGE_JOINS = (9, 21, 41)
MODES = ("fast", "quality")
MIN_SEARCH_SIDE = 32  # a smaller photo leaves selective search a handful of regions


@dataclass(frozen=True)
class ProposalSettings:
    method: str = "selective-search+ridges"  # proposal method: selective search, crack-following windows, or both
    mode: str = "fast"  # selective search mode
    max_proposals: int = 2000  # cap per photo (R-CNN: ~2,000)
    min_size: int = 8  # proposals narrower or lower than this many pixels (of the photo) are dropped
    search_max_side: int = 0  # search the photo downscaled to this longer side (R-CNN's code: 500); 0 = full size
    context: int = 16  # pixels of context around the box at the warped size (R-CNN: 16)
    size: int = 224  # warped crop side
    quality: int = 95  # JPEG quality of the crops
    positive_iou: float = 0.5  # label = IoU > this
    negatives_per_image: int = 0  # keep an IoU-stratified sample of N negatives per photo; 0 = every negative
    gt_jitter: int = 0  # jittered copies of each ground-truth box
    eval_like_detection: bool = True  # valid, test: every proposal up to the cap, no ground truth, no negatives cap

    def __post_init__(self) -> None:
        # Named as this object's arguments; tools/propose.py names them as its flags (OutOfRange.named). Every
        # field's kind first (these settings are also read back from manifests, checkpoints and ONNX files), then
        # how they bound each other.
        side = self.search_max_side
        if isinstance(side, int) and not isinstance(side, bool) and side != 0 and not side >= MIN_SEARCH_SIDE:
            raise ConfigError(
                f"--search-max-side must be 0 (search the photo at full size) or at least {MIN_SEARCH_SIDE} "
                f"pixels, got {side}"
            )
        OutOfRange.check(
            "ProposalSettings",
            [
                None if self.method in METHODS else ("method", self.method, f"one of {METHODS}"),
                None if self.mode in MODES else ("mode", self.mode, f"one of {MODES}"),
                below("max_proposals", self.max_proposals, 1),
                below("min_size", self.min_size, 0, 2**16),  # pixels of a photo
                below("search_max_side", self.search_max_side, 0, 2**16),
                below("context", self.context, 0),
                below("size", self.size, 1, 4096),  # a crop's side: every crop is held in memory as it is made
                below("quality", self.quality, 1, 100),
                _fraction("positive_iou", self.positive_iou),
                below("negatives_per_image", self.negatives_per_image, 0),
                below("gt_jitter", self.gt_jitter, 0, 1000),  # copies per ground-truth box, each one a crop
                None
                if isinstance(self.eval_like_detection, bool)
                else ("eval_like_detection", self.eval_like_detection, "true or false"),
            ],
        )
        OutOfRange.check("ProposalSettings", [_under("context", self.context, self.size // 2)])
        if self.method == RIDGES and self.mode != ProposalSettings.mode:
            raise ConfigError(
                f"--mode {self.mode} is selective search's, and --method {RIDGES} runs none: drop --mode, or give "
                f"--method {SELECTIVE_SEARCH}+{RIDGES}"
            )

    def as_dict(self) -> dict:
        return asdict(self) | {
            "warp": "anisotropic, bilinear",
            "fill": "photo mean colour",
            "label_rule": "IoU (3 decimals) > positive_iou",
        }


def _under(field: str, value: int, most: int) -> Broken | None:
    """An integer field that must stay below `most` (context: at most half the crop's side is context)."""
    return None if int(value) < most else (field, value, f"in [0, {most})")


def _fraction(field: str, value: object) -> Broken | None:
    number = isinstance(value, int | float | np.floating) and not isinstance(value, bool)
    return None if number and 0 <= value < 1 else (field, value, "in [0, 1)")  # type: ignore[operator]


def downscaled(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """The photo with its longer side at most `max_side` (area interpolation); 0 or a smaller photo: as it is."""
    import cv2

    height, width = rgb.shape[:2]
    if not max_side or max(height, width) <= max_side:
        return rgb
    scale = max_side / max(height, width)
    return cv2.resize(rgb, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)


def _to_photo(rects: np.ndarray, searched: np.ndarray, rgb: np.ndarray, min_size: int) -> np.ndarray:
    """x, y, w, h boxes of the searched image to deduplicated, sorted x0, y0, x1, y1 float64 in photo pixels, those
    narrower or lower than `min_size` photo pixels dropped. Searched at full size the factors are exactly 1.0, so
    the boxes are the integers OpenCV gave."""
    height, width = rgb.shape[:2]
    sx, sy = width / searched.shape[1], height / searched.shape[0]
    rects = rects.reshape(-1, 4)
    rects = rects[(rects[:, 2] * sx >= min_size) & (rects[:, 3] * sy >= min_size)]
    rects = np.unique(rects, axis=0)  # sorted and unique
    x, y, w, h = rects.T.astype(np.float64)
    return np.stack([x * sx, y * sy, np.minimum((x + w) * sx, width), np.minimum((y + h) * sy, height)], 1)


def search_regions(rgb: np.ndarray, mode: str, min_size: int, max_side: int = 0) -> np.ndarray:
    """Every selective-search box (N, 4) float64 x0, y0, x1, y1 in photo pixels, deduplicated and sorted: the
    regions before any cap.

    `max_side` > 0 searches the photo downscaled (area interpolation) so that its longer side is `max_side`
    (photos already that small are searched as they are) and scales the boxes back; `min_size` applies in
    photo pixels either way.
    """
    import cv2

    small = downscaled(rgb, max_side)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(np.ascontiguousarray(small[:, :, ::-1]))  # OpenCV wants BGR
    search.switchToSelectiveSearchFast() if mode == "fast" else search.switchToSelectiveSearchQuality()
    return _to_photo(np.asarray(search.process()), small, rgb, min_size)


def ridges(rgb: np.ndarray, min_size: int, max_side: int = 0) -> np.ndarray:
    """Crack-following windows (N, 4) float64 x0, y0, x1, y1 in photo pixels, deduplicated and sorted: the boxes of
    the photo's dark thin line networks at several thresholds and joins (see RIDGE_KERNELS above), found on the
    photo downscaled as `search_regions` searches it. Every step is an OpenCV routine (black-hat, blur,
    dilation, connected components); none is written here."""
    import cv2

    small = downscaled(rgb, max_side)
    gray = cv2.cvtColor(np.ascontiguousarray(small), cv2.COLOR_RGB2GRAY)
    found = []
    for kernel in RIDGE_KERNELS:
        ellipse = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel, kernel))
        response = cv2.GaussianBlur(cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, ellipse), (0, 0), 1.0)
        for level in np.percentile(response, RIDGE_PERCENTILES):
            lines = (response > level).astype(np.uint8)
            for join in RIDGE_JOINS:
                joined = cv2.dilate(lines, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (join, join)))
                stats = cv2.connectedComponentsWithStats(joined, connectivity=8)[2][1:]
                found.append(stats[stats[:, 4] >= 4 * join * join, :4])
    return _to_photo(np.concatenate(found) if found else np.zeros((0, 4), np.int64), small, rgb, min_size)


def regions_of(rgb: np.ndarray, settings: ProposalSettings) -> tuple[np.ndarray, np.ndarray]:
    """(the method's crack-following windows, its selective-search regions not among them), each (N, 4) float64 in
    photo pixels, deduplicated and sorted; either empty when the method does not use it."""
    parts = settings.method.split("+")
    lines = ridges(rgb, settings.min_size, settings.search_max_side) if RIDGES in parts else np.zeros((0, 4))
    if SELECTIVE_SEARCH not in parts:
        return lines, np.zeros((0, 4))
    return lines, not_among(search_regions(rgb, settings.mode, settings.min_size, settings.search_max_side), lines)


def not_among(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """The rows of `boxes` (N, 4) that are not rows of `others` (exactly), in their order: a region both methods
    found is one region."""
    if not len(others):
        return boxes
    seen = {tuple(b) for b in others.tolist()}
    return boxes[[tuple(b) not in seen for b in boxes.tolist()]].reshape(-1, 4)


def cap(boxes: np.ndarray, max_proposals: int, seed: int | Sequence[int]) -> np.ndarray:
    """At most `max_proposals` of `boxes`: a seeded sample, kept in their order."""
    if len(boxes) <= max_proposals:
        return boxes
    keep = np.random.default_rng(seed).choice(len(boxes), size=max_proposals, replace=False)
    return boxes[np.sort(keep)]


def proposals_of(
    rgb: np.ndarray, settings: ProposalSettings, seed: int | Sequence[int]
) -> tuple[np.ndarray, int, np.ndarray]:
    """A photo's proposals (K, 4) float64 x0, y0, x1, y1 in pixels, K <= max_proposals, reproducible; with how many
    regions there were before the cap, and all of them (N, 4). See `capped` for the cap."""
    lines, search = regions_of(rgb, settings)
    every = np.concatenate([lines, search])
    return capped(lines, search, settings.max_proposals, seed), len(every), every


def capped(lines: np.ndarray, search: np.ndarray, max_proposals: int, seed: int | Sequence[int]) -> np.ndarray:
    """At most `max_proposals` boxes: crack-following windows first and whole (a seeded sample of them only when
    they alone pass the cap), the rest a seeded sample of the selective-search regions.

    OpenCV ranks its regions by hierarchy level times an unseeded random number, so its order (and a cap taken from
    the top of it) changes from run to run, while the set of boxes does not: the set is therefore deduplicated and
    sorted, and a cap is a seeded sample of it.
    """
    room = max_proposals - len(lines)
    if room <= 0:
        return cap(lines, max_proposals, seed)
    return np.concatenate([lines, cap(search, room, seed)]).reshape(-1, 4)


def jitter(boxes: np.ndarray, copies: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """`copies` jittered versions of each box: centre moved by up to 10% and sides scaled by 0.9-1.1."""
    if copies == 0 or not len(boxes):
        return np.zeros((0, 4))
    b = np.repeat(boxes, copies, axis=0)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    cx = (b[:, 0] + b[:, 2]) / 2 + rng.uniform(-0.1, 0.1, len(b)) * w
    cy = (b[:, 1] + b[:, 3]) / 2 + rng.uniform(-0.1, 0.1, len(b)) * h
    w, h = w * rng.uniform(0.9, 1.1, len(b)), h * rng.uniform(0.9, 1.1, len(b))
    out = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` (N x 4, x0 y0 x1 y1) with every box of `b` (M x 4): N x M, torchvision's
    `box_iou` (imported here, not at the top: importing the writing side must not import torch)."""
    import torch
    from torchvision.ops import box_iou as iou

    return iou(torch.from_numpy(np.asarray(a)), torch.from_numpy(np.asarray(b))).numpy()


def covered(gt: np.ndarray, proposals: np.ndarray, iou: float = 0.5) -> int:
    """How many ground-truth boxes some proposal covers at IoU >= `iou`: the recall ceiling of any classifier."""
    if not len(gt) or not len(proposals):
        return 0
    return int((box_iou(gt, proposals).max(axis=1) >= iou).sum())


def best_match(proposals: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(IoU with the best-matching ground-truth box, its position or -1), per proposal."""
    if not len(gt) or not len(proposals):
        return np.zeros(len(proposals)), np.full(len(proposals), -1)
    iou = box_iou(proposals, gt)
    return iou.max(axis=1), iou.argmax(axis=1)


def stratified_negatives(
    ious: np.ndarray, negatives: np.ndarray, count: int, rng: np.random.Generator, bin_width: float = 0.05
) -> np.ndarray:
    """Up to `count` of `negatives` (positions), spread evenly over IoU bins (the original's strata)."""
    if len(negatives) <= count:
        return negatives
    bins = np.floor(ious[negatives] / bin_width).astype(np.int64)
    groups = [rng.permutation(negatives[bins == b]) for b in np.unique(bins)]
    # The j-th member of every bin in turn, j = 0, 1, ...: equal shares per bin, the rare (high-IoU) bins whole.
    turns = sorted((j, g) for g, members in enumerate(groups) for j in range(len(members)))
    return np.sort(np.array([groups[g][j] for j, g in turns[:count]], dtype=np.int64))


def warp(rgb: np.ndarray, box: np.ndarray, context: int, size: int, fill: np.ndarray) -> np.ndarray:
    """The crop of appendix A: `box` dilated by `context` pixels at the warped scale, warped to size x size.

    rgb: uint8 H x W x 3. box: x0, y0, x1, y1 in pixels. fill: the colour outside the photo.
    Returns uint8 size x size x 3.
    """
    import cv2

    inner = size - 2 * context  # the box itself fills the centre; `context` pixels on every side
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    sx, sy = inner / w, inner / h  # anisotropic
    # Output pixel centre u + 0.5 samples photo x = x0 + (u + 0.5 - context) / sx (pixel centres at +0.5).
    matrix = np.array([[sx, 0, sx * (0.5 - x0) + context - 0.5], [0, sy, sy * (0.5 - y0) + context - 0.5]], np.float64)
    return cv2.warpAffine(
        rgb,
        matrix,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=tuple(float(v) for v in fill),
    )


def encode_jpeg(crop: np.ndarray, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(crop).save(out, format="JPEG", quality=quality)
    return out.getvalue()


@dataclass
class PhotoProposals:
    boxes: np.ndarray  # (K, 4) float64, photo pixels
    ious: np.ndarray  # (K,) IoU rounded to 3 decimals
    labels: np.ndarray  # (K,) int 0/1
    gt_ids: np.ndarray  # (K,) best-matching ground-truth position, -1 when none
    kept: np.ndarray  # positions stored: every positive, and the negatives kept
    searched: int  # the method's proposals: boxes[:searched]; the rest are ground truth and its jittered copies
    recall_hits: int  # ground-truth boxes some proposal (not ground truth or its jitter) covers at IoU >= 0.5
    regions: int  # the method's regions before the cap
    uncapped_hits: int  # ground-truth boxes some of those regions covers at IoU >= 0.5: recall without the cap


def propose(
    rgb: np.ndarray, gt: np.ndarray, settings: ProposalSettings, seed: int, stem: str, training: bool = True
) -> PhotoProposals:
    """Proposals of one photo with IoU, label and the ones kept; a pure function of its arguments.

    A training photo's crops are R-CNN's fine-tuning set: the method's proposals, every ground-truth box and its
    `gt_jitter` copies, the negatives sampled down to `negatives_per_image`. A validation or test photo's
    (`training` False, with `eval_like_detection`) are what detection scores: every proposal up to the cap, no
    ground truth added, no negative left out, so a crop AP measured on them is the proposal-level AP.
    """
    height, width = rgb.shape[:2]
    photo_seed = [seed, zlib.crc32(stem.encode())]
    search, regions, every = proposals_of(rgb, settings, photo_seed)
    rng = np.random.default_rng([*photo_seed, 1])
    as_detection = not training and settings.eval_like_detection
    added = [] if as_detection else [gt, jitter(gt, settings.gt_jitter, width, height, rng)]
    boxes = np.concatenate([search, *added]).reshape(-1, 4)
    best, which = best_match(boxes, gt)
    ious = np.round(best, 3)
    labels = (ious > settings.positive_iou).astype(np.int64)
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if settings.negatives_per_image and not as_detection:
        negatives = stratified_negatives(ious, negatives, settings.negatives_per_image, rng)
    hits = covered(gt, search)
    uncapped = covered(gt, every) if regions > len(search) else hits
    kept = np.sort(np.concatenate([positives, negatives]))
    return PhotoProposals(boxes, ious, labels, which, kept, len(search), hits, regions, uncapped)
