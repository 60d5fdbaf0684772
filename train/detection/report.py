"""Detection outputs: COCO results, pictures with boxes, a contact sheet, AP, report and summary."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou, nms

from crackio.fsio import make_dir, remove_temporaries, write_json, write_text
from crackio.writing.regions import ProposalSettings, covered
from train.detection.pictures import contact_sheet, draw, save_jpeg

OUTPUTS = (
    "detections.json",
    "images.json",
    "overview.jpg",
    "pr_curve.png",
    "report.txt",
    "summary.json",
)  # images/ apart


KEEP = 100  # detections kept per photo after NMS for AP (COCO's maxDets); the output keeps those above threshold


@dataclass(frozen=True)
class Nms:
    """Test-time suppression: greedy NMS at `iou` (R-CNN's 0.3), then, with `contained`, greedy suppression of a
    box lying mostly inside a better kept box: at least `contained` of its own area in their intersection (a thin
    piece of a crack inside the crack's whole box has a small IoU with it, which NMS keeps). A larger box around a
    better small one is kept: the whole crack stays when a piece of it scores higher."""

    iou: float = 0.3
    contained: float | None = None

    def describe(self) -> str:
        extra = f", boxes {self.contained:g} inside a better one" if self.contained is not None else ""
        return f"NMS IoU {self.iou:g}{extra}"


def suppress(boxes: np.ndarray, scores: np.ndarray, rule: Nms) -> np.ndarray:
    """Indices of the boxes `rule` keeps (torchvision.ops.nms, R-CNN's test-time step; then the containment rule),
    best first, at most KEEP: float (N, 4) x0 y0 x1 y1 boxes and (N,) scores."""
    # Copies: arrays that came back from Ray's object store are read-only, which torch.from_numpy warns about.
    ranked = torch.tensor(np.asarray(scores, dtype=np.float64))
    keep = nms(torch.tensor(np.asarray(boxes, dtype=np.float64)), ranked, rule.iou).numpy()
    if rule.contained is not None and len(keep) > 1:
        keep = keep[_not_contained(np.asarray(boxes, dtype=np.float64)[keep], rule.contained)]
    return keep[:KEEP]


def _not_contained(boxes: np.ndarray, share: float) -> np.ndarray:
    """Which of `boxes` (best first) greedy containment suppression keeps: bool (N,). torchvision has IoU but no
    intersection over one box's own area, so the intersections are computed here (NumPy broadcasting, N <= the
    boxes NMS kept)."""
    lo = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    hi = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area = np.maximum(np.prod(boxes[:, 2:] - boxes[:, :2], axis=1), 1e-9)
    covers = inter / area[:, None] >= share  # [i, j]: box i lies `share` inside box j
    kept = np.zeros(len(boxes), bool)
    for i in range(len(boxes)):
        kept[i] = not (covers[i, :i] & kept[:i]).any()
    return kept


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


@dataclass(frozen=True)
class Detections:
    """A detection run's photos and how they were scored: what its outputs are written from."""

    results: list  # train.detection.detect.PhotoDetections, one per photo; size (0, 0) where skipped
    problems: list[tuple[str, str]]  # (photo, why) for the report
    threshold: float
    nms: Nms
    settings: ProposalSettings
    scored_by: str
    annotated: bool
    seconds: float  # wall time of the whole pass, for the rates
    baselines: dict[str, dict[str, float]] | None = None
    settings_from: str = "the training crops' own"

    @property
    def done(self) -> list:
        """The photos detected (not skipped)."""
        return [r for r in self.results if r.size != (0, 0)]


def write_outputs(out: Path, run: Detections, overview: int = 16) -> None:
    """detections.json, images/<stem>.jpg, overview.jpg (the first `overview` pictures), pr_curve.png (annotated),
    report.txt, summary.json last.

    Raises:
        WriteError: a file cannot be written (full disk, I/O error); the files written before are complete.
    """
    make_dir(out / "images")
    remove_temporaries(out, OUTPUTS)  # what a kill -9 during a write left
    remove_temporaries(out / "images", ["*.jpg"])
    ids = image_ids(run.results)
    write_coco(out, run.results, ids)
    write_pictures(out, run.done, run.threshold, overview)
    rows = per_photo(run.done, run.threshold)
    summary = summarize(run, rows)
    heading = [headline(run, summary["seconds_per_photo"], summary["photos_per_sec"], summary["crops_per_sec"])]
    if run.annotated:
        figures, precision, recall = accuracy(run, ids, rows)
        summary |= figures
        heading.append(accuracy_line(figures, rows))
        if run.baselines is not None:
            summary["baselines"] = run.baselines
            heading.append(baseline_line(figures["ap50_voc"], run.baselines))
        if len(recall):
            plot_curve(recall, precision, figures["ap50_voc"], out / "pr_curve.png")
    text = heading + table(rows, run.annotated) + problem_lines(run.problems)
    write_text(out / "report.txt", "\n".join(text) + "\n")
    write_json(out / "summary.json", summary)
    print("\n".join(heading))
    print(f"detections, annotated images (images/), overview.jpg and report.txt in {out}")


def write_coco(out: Path, results: list, ids: list) -> None:
    """images.json (the photos and their ids: what detections.json's image_id names) and detections.json."""
    write_json(
        out / "images.json",
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


def write_pictures(out: Path, done: list, threshold: float, overview: int) -> None:
    """images/<stem>.jpg for every photo detected, and overview.jpg of the first `overview` of them."""
    pictures: list[tuple[str, Image.Image]] = []
    for r in done:
        picture = draw(r, threshold)
        save_jpeg(picture, out / "images" / f"{r.stem}.jpg")
        if len(pictures) < overview:
            pictures.append((r.path.name, picture))
    if pictures:
        save_jpeg(contact_sheet(pictures), out / "overview.jpg")


def per_photo(done: list, threshold: float) -> list[dict]:
    """summary.json's per_photo rows: detections above the threshold, and with ground truth their matches."""
    rows = []
    for r in done:
        row = {"photo": r.stem, "proposals": len(r.proposals), "detections": int((r.scores >= threshold).sum())}
        if r.gt is not None:
            tp = match(r.boxes[r.scores >= threshold], r.gt)
            row |= {
                "ground_truth": len(r.gt),
                "true_positives": int(tp.sum()),
                "false_positives": int((~tp).sum()),
                "covered_by_proposals": proposal_recall(r.proposals, r.gt),
            }
        rows.append(row)
    return rows


def summarize(run: Detections, rows: list[dict]) -> dict:
    """summary.json without the AP figures: the settings, the timing and rates, the problems, the photos."""
    done = run.done
    timing = {
        k: float(np.mean([r.seconds[k] for r in done])) if done else 0.0
        for k in ("proposals", "warping", "scoring", "nms")
    }
    return {
        "photos": len(run.results),
        "detected": len(done),
        "scored_by": run.scored_by,
        "score_threshold": run.threshold,
        "nms_iou": run.nms.iou,
        "nms_contained": run.nms.contained,
        "proposals": run.settings.as_dict(),
        "proposals_from": run.settings_from,
        # detections.json's category_id per photo's annotation file: pycocotools' params.catIds for the same AP
        "category_ids": sorted({str(r.category_id) for r in run.results if r.category_id is not None}) or ["1"],
        "seconds_per_photo": timing,
        "photos_per_sec": len(done) / run.seconds if run.seconds else 0.0,
        "crops_per_sec": sum(len(r.proposals) for r in done) / run.seconds if run.seconds else 0.0,
        "problems": [{"path": p, "reason": why} for p, why in run.problems],
        "per_photo": rows,
    }


def headline(run: Detections, timing: dict[str, float], photos_per_sec: float, crops_per_sec: float) -> str:
    """report.txt's first line: what was detected, how, how fast."""
    s = run.settings
    return (
        f"{len(run.done)} of {len(run.results)} photos, scores from the {run.scored_by}, threshold "
        f"{run.threshold:.3f}, {run.nms.describe()}; {photos_per_sec:.2f} photos/s, {crops_per_sec:.0f} crops/s; "
        f"per photo: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in timing.items())
        + f"; proposals: {s.method} {s.mode}, at most {s.max_proposals}, context {s.context} px"
        + (f", searched at {s.search_max_side} px" if s.search_max_side else "")
        + f" ({run.settings_from})"
    )


def accuracy(run: Detections, ids: list, rows: list[dict]) -> tuple[dict, np.ndarray, np.ndarray]:
    """summary.json's AP figures and proposal recall over the annotated photos, and the VOC precision-recall
    curve."""
    ap, precision, recall = voc_ap(run.done)
    coco = coco_ap(run.results, ids)
    gt_total, covered = _total(rows, "ground_truth"), _total(rows, "covered_by_proposals")
    figures: dict = {
        "ap50_voc": ap,
        "ap_coco": coco["ap"],
        "ap50_coco": coco["ap50"],
        "ground_truth_boxes": gt_total,
        "proposal_recall": covered / gt_total if gt_total else float("nan"),
    }
    if any(r.plain_boxes is not None for r in run.done):  # bounding-box regression applied: the figures without
        plain = [replace(r, boxes=r.plain_boxes, scores=r.plain_scores) for r in run.done]
        figures["without_bbox_regression"] = {
            "ap50_voc": voc_ap(plain)[0],
            "ap_coco": coco_ap(plain, [i for i, r in zip(ids, run.results) if r.size != (0, 0)])["ap"],
        }
    return figures, precision, recall


def accuracy_line(figures: dict, rows: list[dict]) -> str:
    without = figures.get("without_bbox_regression")
    moved = (
        f" with bounding-box regression (without: {without['ap50_voc']:.3f}, COCO {without['ap_coco']:.3f})"
        if without
        else ""
    )
    return (
        f"detection AP@0.5 (VOC, all points) {figures['ap50_voc']:.3f}; COCO AP@[.5:.95] {figures['ap_coco']:.3f}"
        f"{moved}, "
        f"AP@0.5 {figures['ap50_coco']:.3f}; proposal recall {figures['proposal_recall']:.3f} "
        f"({_total(rows, 'covered_by_proposals')} of {figures['ground_truth_boxes']} ground-truth boxes covered at "
        f"IoU >= 0.5: the ceiling of any classifier)"
    )


def baseline_line(ap: float, baselines: dict[str, dict[str, float]]) -> str:
    floors = ", ".join(f"{BASELINE_NAMES[k]} {v['ap50_voc']:.3f}" for k, v in baselines.items())
    return f"baselines without the network (the same proposals, NMS and AP@0.5 VOC): {floors}; {verdict(ap, baselines)}"


def _total(rows: list[dict], key: str) -> int:
    return sum(row.get(key, 0) for row in rows)


# report.txt's table columns for annotated photos
COLUMNS = tuple("photo ground_truth detections true_positives false_positives covered_by_proposals proposals".split())


def table(rows: list[dict], annotated: bool) -> list[str]:
    """report.txt's table of the photos, after a blank line."""
    keys = COLUMNS if annotated else ("photo", "detections", "proposals")
    return ["\n" + " | ".join(keys)] + [" | ".join(str(row.get(k, "")) for k in keys) for row in rows]


def problem_lines(problems: list[tuple[str, str]]) -> list[str]:
    if not problems:
        return []
    return [f"\n{len(problems)} problems:"] + [f"{p}: {why}" for p, why in problems]


BASELINE_NAMES = {"area": "box area", "whole_photo": "one whole-photo box", "random": "random scores"}


def verdict(model: float, baselines: dict[str, dict[str, float]], key: str = "ap50_voc") -> str:
    """One sentence: whether the model's AP (`key`) clears every baseline, in plain words."""
    above = {kind: figures[key] for kind, figures in baselines.items() if figures[key] > model}
    if not np.isfinite(model):
        return "no AP: no ground truth among the photos"
    if not above:
        tied = [BASELINE_NAMES[kind] for kind, figures in baselines.items() if figures[key] == model]
        if tied:
            return f"the model's AP@0.5 {model:.3f} is above every baseline but equals {', '.join(tied)}"
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
