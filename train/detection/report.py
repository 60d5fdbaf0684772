"""Detection outputs: COCO results, pictures with boxes, a contact sheet, AP, report and summary."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.ops import box_iou, nms

from crackio import fsio
from crackio.fsio import make_dir, remove_temporaries, write_json, write_text
from crackio.writing.proposal_stage import load_photo
from crackio.writing.regions import ProposalSettings, covered

OUTPUTS = (
    "detections.json",
    "images.json",
    "overview.jpg",
    "pr_curve.png",
    "report.txt",
    "summary.json",
)  # images/ apart
DETECTION = (230, 30, 30)
TRUTH = (40, 200, 60)


KEEP = 100  # detections kept per photo after NMS for AP (COCO's maxDets); the output keeps those above threshold


def suppress(boxes: np.ndarray, scores: np.ndarray, nms_iou: float) -> np.ndarray:
    """Indices of the boxes greedy NMS keeps at `nms_iou` (torchvision.ops.nms, R-CNN's test-time step), best
    first, at most KEEP: float (N, 4) x0 y0 x1 y1 boxes and (N,) scores."""
    ranked = torch.from_numpy(np.asarray(scores, dtype=np.float64))
    return nms(torch.from_numpy(np.ascontiguousarray(boxes)), ranked, nms_iou)[:KEEP].numpy()


def ap_figures(results) -> dict[str, float]:
    """`ap50_voc` (train.detection.report.voc_ap) and COCO's `ap_coco`, `ap50_coco` of annotated photos."""
    coco = coco_ap(results)
    return {"ap50_voc": voc_ap(results)[0], "ap_coco": coco["ap"], "ap50_coco": coco["ap50"]}


def match(boxes: np.ndarray, gt: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """True positives among `boxes` (best first) against `gt`, greedily, each ground truth once (VOC rule)."""
    tp = np.zeros(len(boxes), bool)
    if not len(boxes) or not len(gt):
        return tp
    overlaps = box_iou(torch.from_numpy(boxes), torch.from_numpy(gt)).numpy()
    taken = np.zeros(len(gt), bool)
    for i, row in enumerate(overlaps):
        j = int(np.argmax(row))
        if row[j] >= iou and not taken[j]:
            tp[i] = taken[j] = True
    return tp


def proposal_recall(proposals: np.ndarray, gt: np.ndarray, iou: float = 0.5) -> int:
    """How many ground-truth boxes some proposal covers at IoU >= `iou`: the ceiling of any classifier."""
    return covered(gt, proposals, iou)


def voc_ap(results, iou: float = 0.5) -> tuple[float, np.ndarray, np.ndarray]:
    """VOC-style AP at `iou` over all annotated photos: (AP, precision, recall) along the ranked detections.

    Written here because pycocotools interpolates precision at 101 recall points while the VOC
    2010+ protocol (and the R-CNN paper's mAP) integrates the whole precision envelope, and
    scikit-learn's average_precision_score knows nothing of box matching.
    """
    scores, tps = [], []
    total = 0
    for r in results:
        if r.gt is None:
            continue
        total += len(r.gt)
        tps.append(match(r.boxes, r.gt, iou))
        scores.append(r.scores)
    if not total:
        return float("nan"), np.zeros(0), np.zeros(0)
    order = np.argsort(-np.concatenate(scores), kind="stable") if scores else np.zeros(0, int)
    tp = np.concatenate(tps)[order] if tps else np.zeros(0, bool)
    ctp = np.cumsum(tp)
    recall = ctp / total
    precision = ctp / np.arange(1, len(tp) + 1)
    envelope = np.maximum.accumulate(np.concatenate([precision, [0.0]])[::-1])[::-1][:-1]
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float((steps * envelope).sum()), precision, recall


def coco_ap(results, ids: list | None = None) -> dict[str, float]:
    """COCO AP@[.5:.95] and AP@0.5 through pycocotools, over the annotated photos, whose image ids are `ids` (the
    order pycocotools breaks score ties in: detections.json's, so that evaluating that file gives these figures;
    default 1, 2, ...)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = ids if ids is not None else list(range(1, len(results) + 1))
    annotated = [(i, r) for i, r in zip(ids, results) if r.gt is not None]
    if not annotated or not sum(len(r.gt) for _, r in annotated):
        return {"ap": float("nan"), "ap50": float("nan")}
    gt = {
        "images": [{"id": i, "width": r.size[0], "height": r.size[1]} for i, r in annotated],
        "categories": [{"id": 1, "name": "crack"}],
        "annotations": [],
    }
    for i, r in annotated:
        for b in r.gt:
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": i,
                    "category_id": 1,
                    "bbox": xywh(b),
                    "area": float((b[2] - b[0]) * (b[3] - b[1])),
                    "iscrowd": 0,
                }
            )
    dets = [
        {"image_id": i, "category_id": 1, "bbox": xywh(b), "score": float(s)}
        for i, r in annotated
        for b, s in zip(r.boxes, r.scores)
    ]
    if not dets:
        return {"ap": 0.0, "ap50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        truth = COCO()
        truth.dataset = gt
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(dets), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {"ap": float(evaluation.stats[0]), "ap50": float(evaluation.stats[1])}


def image_ids(results) -> list:
    """Each photo's id in detections.json and images.json: its annotation file's (COCO), else the next free
    number from 1."""
    taken = {r.image_id for r in results if r.image_id is not None}
    numbers = (k for k in range(1, len(results) + len(taken) + 2) if k not in taken)
    return [r.image_id if r.image_id is not None else next(numbers) for r in results]


def xywh(box) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]


def _font(size: int):
    """Pillow's bundled scalable font at `size` pixels (no system font needed)."""
    return ImageFont.load_default(size=max(10, size))


def draw(r, threshold: float) -> Image.Image:
    """The photo with its ground truth (green) and its detections above the threshold (red), each score in a
    filled label large enough to read at the photo's size."""
    img = Image.fromarray(load_photo(r.path))
    pen = ImageDraw.Draw(img)
    width = max(2, round(max(r.size) / 300))
    font = _font(round(max(r.size) / 28))  # still ~11 px when the contact sheet shrinks the photo to 320 wide
    for b in r.gt if r.gt is not None else []:
        pen.rectangle([float(v) for v in b], outline=TRUTH, width=width)
    for b, s in zip(r.boxes, r.scores):
        if s >= threshold:
            pen.rectangle([float(v) for v in b], outline=DETECTION, width=width)
            x, y = float(b[0]), float(b[1])
            label = pen.textbbox((x, y), f"{s:.2f}", font=font)
            pen.rectangle(label, fill=DETECTION)
            pen.text((x, y), f"{s:.2f}", fill=(255, 255, 255), font=font)
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


def write_outputs(
    out: Path,
    results: list,
    problems: list[tuple[str, str]],
    *,
    threshold: float,
    nms_iou: float,
    settings: ProposalSettings,
    scored_by: str,
    annotated: bool,
    overview: int,
    seconds: float,
    baselines: dict[str, dict[str, float]] | None = None,
    settings_from: str = "the training crops' own",
) -> None:
    """detections.json, images/<stem>.jpg, overview.jpg, pr_curve.png (annotated), report.txt, summary.json last.

    Raises:
        WriteError: a file cannot be written (full disk, I/O error); the files written before are complete.
    """
    make_dir(out / "images")
    remove_temporaries(out, OUTPUTS)  # what a kill -9 during a write left
    remove_temporaries(out / "images", ["*.jpg"])
    done = [r for r in results if r.size != (0, 0)]
    ids = image_ids(results)
    write_json(
        out / "images.json",  # the photos and their ids: what detections.json's image_id names
        [
            {"id": i, "file_name": str(r.path), "width": r.size[0], "height": r.size[1]}
            for i, r in zip(ids, results)
            if r.size != (0, 0)
        ],
    )
    # Every detection AP is computed on (after NMS, up to KEEP per photo), as a COCO results file: pycocotools on it
    # and the user's own annotations gives the reported COCO AP. The pictures show those above the threshold.
    write_json(
        out / "detections.json",
        [
            {
                "image_id": i,
                "category_id": 1 if r.category_id is None else r.category_id,
                "bbox": xywh(b),
                "score": float(s),
            }  # fmt: skip
            for i, r in zip(ids, results)
            for b, s in zip(r.boxes, r.scores)
        ],
    )
    pictures: list[tuple[str, Image.Image]] = []
    for r in done:
        picture = draw(r, threshold)
        save_jpeg(picture, out / "images" / f"{r.stem}.jpg")
        if len(pictures) < overview:
            pictures.append((r.path.name, picture))
    if pictures:
        save_jpeg(contact_sheet(pictures), out / "overview.jpg")
    timing = {
        k: float(np.mean([r.seconds[k] for r in done])) if done else 0.0
        for k in ("proposals", "warping", "scoring", "nms")
    }
    rows, text = [], []
    for r in done:
        row = {"photo": r.stem, "proposals": len(r.proposals), "detections": int((r.scores >= threshold).sum())}
        if r.gt is not None:
            above = r.scores >= threshold
            tp = match(r.boxes[above], r.gt)
            row |= {
                "ground_truth": len(r.gt),
                "true_positives": int(tp.sum()),
                "false_positives": int((~tp).sum()),
                "covered_by_proposals": proposal_recall(r.proposals, r.gt),
            }
        rows.append(row)
    summary: dict = {
        "photos": len(results),
        "detected": len(done),
        "scored_by": scored_by,
        "score_threshold": threshold,
        "nms_iou": nms_iou,
        "proposals": settings.as_dict(),
        "proposals_from": settings_from,
        # detections.json's category_id per photo's annotation file: pycocotools' params.catIds for the same AP
        "category_ids": sorted({str(r.category_id) for r in results if r.category_id is not None}) or ["1"],
        "seconds_per_photo": timing,
        "photos_per_sec": len(done) / seconds if seconds else 0.0,
        "crops_per_sec": sum(len(r.proposals) for r in done) / seconds if seconds else 0.0,
        "problems": [{"path": p, "reason": why} for p, why in problems],
        "per_photo": rows,
    }
    head = (
        f"{len(done)} of {len(results)} photos, scores from the {scored_by}, threshold {threshold:.3f}, "
        f"NMS IoU {nms_iou}; {summary['photos_per_sec']:.2f} photos/s, {summary['crops_per_sec']:.0f} crops/s; "
        f"per photo: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in timing.items())
        + f"; proposals: {settings.method} {settings.mode}, at most {settings.max_proposals}, context "
        f"{settings.context} px"
        + (f", searched at {settings.search_max_side} px" if settings.search_max_side else "")
        + f" ({settings_from})"
    )
    text.append(head)
    if annotated:
        ap, precision, recall = voc_ap(done)
        coco = coco_ap(results, ids)
        gt_total = sum(row.get("ground_truth", 0) for row in rows)
        covered = sum(row.get("covered_by_proposals", 0) for row in rows)
        summary |= {
            "ap50_voc": ap,
            "ap_coco": coco["ap"],
            "ap50_coco": coco["ap50"],
            "ground_truth_boxes": gt_total,
            "proposal_recall": covered / gt_total if gt_total else float("nan"),
        }
        text.append(
            f"detection AP@0.5 (VOC, all points) {ap:.3f}; COCO AP@[.5:.95] {coco['ap']:.3f}, "
            f"AP@0.5 {coco['ap50']:.3f}; proposal recall {summary['proposal_recall']:.3f} "
            f"({covered} of {gt_total} ground-truth boxes covered at IoU >= 0.5: the ceiling of any "
            f"classifier)"
        )
        if baselines is not None:
            summary["baselines"] = baselines
            floors = ", ".join(f"{BASELINE_NAMES[k]} {v['ap50_voc']:.3f}" for k, v in baselines.items())
            text.append(
                f"baselines without the network (the same proposals, NMS and AP@0.5 VOC): {floors}; "
                + verdict(ap, baselines)
            )
        if len(recall):
            plot_curve(recall, precision, ap, out / "pr_curve.png")
    keys = (
        [
            "photo",
            "ground_truth",
            "detections",
            "true_positives",
            "false_positives",
            "covered_by_proposals",
            "proposals",
        ]
        if annotated
        else ["photo", "detections", "proposals"]
    )
    text.append("\n" + " | ".join(keys))
    text += [" | ".join(str(row.get(k, "")) for k in keys) for row in rows]
    if problems:
        text.append(f"\n{len(problems)} problems:")
        text += [f"{p}: {why}" for p, why in problems]
    write_text(out / "report.txt", "\n".join(text) + "\n")
    write_json(out / "summary.json", summary)
    print("\n".join(text[: 3 if baselines is not None else 2]))
    print(f"detections, annotated images (images/), overview.jpg and report.txt in {out}")


BASELINE_NAMES = {"area": "box area", "whole_photo": "one whole-photo box", "random": "random scores"}


def verdict(model: float, baselines: dict[str, dict[str, float]], key: str = "ap50_voc") -> str:
    """One sentence: whether the model's AP (`key`) clears every baseline, in plain words."""
    above = {kind: figures[key] for kind, figures in baselines.items() if figures[key] > model}
    if not np.isfinite(model):
        return "no AP: no ground truth among the photos"
    if not above:
        return f"the model's AP@0.5 {model:.3f} is above every baseline"
    worse = ", ".join(f"{BASELINE_NAMES[kind]} ({ap:.3f})" for kind, ap in above.items())
    return (
        f"the model's AP@0.5 {model:.3f} is BELOW {worse}: it ranks crack regions no better than "
        + ("chance" if "random" in above else "these trivial rules")
        + "; train longer, on more photos, or check the labels"
    )


def plot_curve(recall: np.ndarray, precision: np.ndarray, ap: float, path: Path) -> None:
    from train.evaluation.report import (  # pyplot with the file-only backend train.evaluation.report selects
        plt,
        save_figure,
    )

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot(recall, precision, label=f"detections (AP@0.5 {ap:.3f})")
    ax.set(
        xlabel="recall (ground-truth boxes found)",
        ylabel="precision",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title="Crack detection precision-recall at IoU 0.5",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    save_figure(fig, path)
