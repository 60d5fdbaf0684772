"""Detection pictures: a photo with its boxes and readable score labels, and a contact sheet of several."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from crackio import fsio
from crackio.writing.proposal_stage import load_photo

DETECTION = (230, 30, 30)
TRUTH = (40, 200, 60)

Rect = tuple[float, float, float, float]  # x0 y0 x1 y1, half-open: a label's pixels are x0 <= x < x1, y0 <= y < y1


def _font(size: int):
    """Pillow's bundled scalable font at `size` pixels (no system font needed)."""
    return ImageFont.load_default(size=max(10, size))


def pen_sizes(size: tuple[int, int]) -> tuple[int, int]:
    """(box line width, label font size) for a photo of `size`: the font is still ~11 px when the contact sheet
    shrinks the photo to 320 wide."""
    return max(2, round(max(size) / 300)), max(10, round(max(size) / 28))


def edge_strips(boxes: np.ndarray, width: int) -> np.ndarray:
    """(4N, 4) rectangles of the pixels the boxes' outlines cover (Pillow draws a `width` outline inside x0..x1,
    y0..y1, both ends included)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0, y0, x1, y1 = boxes.T
    x1, y1 = x1 + 1, y1 + 1
    return np.concatenate(
        [
            np.stack([x0, y0, x1, y0 + width], 1),  # top
            np.stack([x0, y1 - width, x1, y1], 1),  # bottom
            np.stack([x0, y0, x0 + width, y1], 1),  # left
            np.stack([x1 - width, y0, x1, y1], 1),  # right
        ]
    )


def overlaps(rects: np.ndarray, others: np.ndarray) -> np.ndarray:
    """(len(rects),) how many of `others` each rectangle intersects (both (N, 4), half-open)."""
    if not len(others):
        return np.zeros(len(rects), int)
    a, b = rects[:, None, :], others[None, :, :]
    hit = (a[..., 0] < b[..., 2]) & (b[..., 0] < a[..., 2]) & (a[..., 1] < b[..., 3]) & (b[..., 1] < a[..., 3])
    return hit.sum(1)


def place_labels(
    size: tuple[int, int], boxes: np.ndarray, labels: list[tuple[float, float]], drawn: np.ndarray, width: int
) -> list[Rect | None]:
    """Where each box's label goes: `labels` are their (width, height), `boxes` best first (the best gets the first
    pick), `drawn` every box outlined on the photo (these and the ground truth). Each label takes the first of the
    places above, inside, below and beside its box that lies in the photo and meets no label placed before and no
    box's outline; where none is free of box outlines, the one meeting the fewest. A label with no place free of
    the labels before it is left out (None): covering another label would change the digits both show (a 0.832
    under a 0.53 reads "0.53" or "0.33"); its score stays in detections.json."""
    strips = edge_strips(drawn, width) + [-0.5, -0.5, 0.5, 0.5]  # Pillow rounds coordinates: half a pixel of room
    placed: list[Rect] = []
    out: list[Rect | None] = []
    for (x0, y0, x1, y1), (w, h) in zip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), labels):
        right, bottom, gap = x1 + 1, y1 + 1, 1  # a pixel between a label and its box's outline
        corners = [
            (x0, y0 - gap - h),  # above, left
            (x0 + width + gap, y0 + width + gap),  # inside, top left
            (x0, bottom + gap),  # below, left
            (x0 + width + gap, bottom - width - gap - h),  # inside, bottom left
            (right - w, y0 - gap - h),  # above, right
            (right - width - gap - w, y0 + width + gap),  # inside, top right
            (right - w, bottom + gap),  # below, right
            (right - width - gap - w, bottom - width - gap - h),  # inside, bottom right
            (x0 - gap - w, y0),  # left of the box
            (right + gap, y0),  # right of it
        ]
        xy = np.array(corners)
        xy[:, 0] = np.clip(xy[:, 0], 0, max(size[0] - w, 0))  # in the photo: shifted in where the edge cuts it
        xy[:, 1] = np.clip(xy[:, 1], 0, max(size[1] - h, 0))
        rects = np.concatenate([xy, xy + [w, h]], 1)
        crowded = overlaps(rects, np.array(placed).reshape(-1, 4))
        cost = np.where(crowded > 0, np.inf, overlaps(rects, strips))
        if np.isinf(cost).all():
            out.append(None)
            continue
        placed.append(tuple(float(v) for v in rects[int(np.argmin(cost))]))  # type: ignore[arg-type]
        out.append(placed[-1])
    return out


def score_labels(r, threshold: float) -> list[tuple[str, Rect, tuple[float, float]]]:
    """(text, background rectangle, text origin) of each detection's score label above `threshold` in `r`'s
    picture (train.detection.detect.PhotoDetections)."""
    width, size = pen_sizes(r.size)
    font = _font(size)
    pad = max(1, size // 10)
    above = r.scores >= threshold
    texts = [f"{s:.2f}" for s in r.scores[above]]
    bounds = [ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), t, font=font) for t in texts]
    sizes = [(right - left + 2 * pad, bottom - top + 2 * pad) for left, top, right, bottom in bounds]
    gt = r.gt if r.gt is not None else np.zeros((0, 4))
    drawn = np.concatenate([np.asarray(r.boxes[above], dtype=np.float64).reshape(-1, 4), gt])
    rects = place_labels(r.size, r.boxes[above], sizes, drawn, width)
    return [
        (t, rect, (rect[0] + pad - bound[0], rect[1] + pad - bound[1]))
        for t, rect, bound in zip(texts, rects, bounds)
        if rect is not None
    ]


def draw(r, threshold: float) -> Image.Image:
    """The photo with its ground truth (green) and its detections above the threshold (red), each score in a
    filled label large enough to read at the photo's size, placed clear of the other labels (left out where there
    is no such place) and of the boxes where there is room (score_labels), and drawn over every box."""
    img = Image.fromarray(load_photo(r.path))
    pen = ImageDraw.Draw(img)
    width, size = pen_sizes(r.size)
    font = _font(size)
    for b in r.gt if r.gt is not None else []:
        pen.rectangle([float(v) for v in b], outline=TRUTH, width=width)
    for b in r.boxes[r.scores >= threshold]:
        pen.rectangle([float(v) for v in b], outline=DETECTION, width=width)
    for text, (x0, y0, x1, y1), origin in score_labels(r, threshold):
        pen.rectangle([x0, y0, x1 - 1, y1 - 1], fill=DETECTION)  # opaque: no line crosses the digits
        pen.text(origin, text, fill=(255, 255, 255), font=font)
    return img


def contact_sheet(pictures: list[tuple[str, Image.Image]], columns: int = 4, width: int = 320) -> Image.Image:
    """The pictures as thumbnails, each with its photo's name, under a legend of the colours."""
    caption, legend = 22, 30
    font = _font(14)
    thumbs = [(name, p.resize((width, max(1, round(p.height * width / p.width))))) for name, p in pictures]
    height = max(t.height for _, t in thumbs) + caption
    rows = (len(thumbs) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * width, legend + rows * height), (255, 255, 255))
    pen = ImageDraw.Draw(sheet)
    x = 8
    for colour, text in ((TRUTH, "ground truth"), (DETECTION, "detection (score)")):
        pen.rectangle([x, 8, x + 14, 22], outline=colour, width=3)
        pen.text((x + 20, 7), text, fill=(0, 0, 0), font=font)
        x += 30 + round(pen.textlength(text, font=font))
    for k, (name, t) in enumerate(thumbs):
        left, top = (k % columns) * width, legend + (k // columns) * height
        sheet.paste(t, (left, top))
        shown = name if len(name) <= 40 else name[:18] + "..." + name[-18:]
        pen.text((left + 4, top + t.height + 3), shown, fill=(0, 0, 0), font=font)
    return sheet


def save_jpeg(picture: Image.Image, path: Path) -> None:
    """A JPEG through the atomic writer (raises WriteError: full disk, I/O error)."""
    data = io.BytesIO()  # in memory first: Pillow reports a full disk as "encoder error", not the OS error
    picture.save(data, format="JPEG", quality=90)
    fsio.atomic_write(path, data.getvalue())
