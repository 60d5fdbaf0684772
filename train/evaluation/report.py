"""Epoch-end metrics with scikit-learn, the classification report, and the plots."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    average_precision_score,
    classification_report,
    confusion_matrix,
    precision_recall_curve,
)

from crackio import fsio

TARGET_NAMES = ["No crack", "Crack"]
CLASS_KEYS = ["no_crack", "crack"]  # the same classes as data keys


def crack_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Crack precision, recall, F1 at the threshold, and the threshold-free average precision (`crack_ap`)."""
    metrics = class_metrics(labels, probs, threshold)
    return {
        **{f"crack_{m}": float(metrics["crack"][m]) for m in ("precision", "recall", "f1")},
        "crack_ap": metrics["average_precision"],
    }


def class_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict:
    """The classification report as data: per class precision/recall/f1/support, accuracy, crack AP."""
    preds = (probs >= threshold).astype(int)
    report = classification_report(
        labels, preds, labels=[0, 1], target_names=TARGET_NAMES, output_dict=True, zero_division=0
    )
    per_class = {
        key: {
            "precision": report[name]["precision"],
            "recall": report[name]["recall"],
            "f1": report[name]["f1-score"],
            "support": int(report[name]["support"]),
        }
        for key, name in zip(CLASS_KEYS, TARGET_NAMES)
    }
    ap = float(average_precision_score(labels, probs)) if labels.any() else float("nan")
    return {
        **per_class,
        "accuracy": float((preds == labels).mean()),
        "average_precision": ap,
        "threshold": float(threshold),
    }


def proposal_ap(labels: np.ndarray, probs: np.ndarray, added: np.ndarray | None) -> float | None:
    """The proposal-level AP: crack AP over the crops that are the method's proposals (R-CNN scores those at
    detection time), leaving out ground-truth boxes and their jittered copies added for training (`added`, bool per
    crop). None when the pack does not record which crops were added; NaN without a positive proposal."""
    if added is None:
        return None
    keep = ~added
    return float(average_precision_score(labels[keep], probs[keep])) if labels[keep].any() else float("nan")


def added_ground_truth(indexes: list, names: list[str]) -> np.ndarray | None:
    """bool per name: the crop is a ground-truth box (or a jittered copy) that the proposal stage added, which
    detection never scores; None when an index does not record it (a pack of tools/pack.py's proposal folders).
    `indexes`: the loader's (crackio.format.index.SplitIndex), `names`: the predictions' crop file names."""
    if not all("ground_truth" in (index.rows.dtype.names or ()) for index in indexes):
        return None
    added = np.concatenate([index.rows["filename"][index.rows["ground_truth"] == 1] for index in indexes])
    return np.isin(np.array([n.encode() for n in names], dtype=bytes), added)


def sampled_negatives(manifests: list[dict]) -> int:
    """The negatives per photo a pack's validation and test crops were sampled down to (tools/propose.py
    --negatives-per-image with --eval-like-detection false); 0 when every proposal is there."""
    for manifest in manifests:
        proposals = manifest.get("proposals") or {}
        if proposals.get("eval_like_detection") is False and proposals.get("negatives_per_image"):
            return int(proposals["negatives_per_image"])
    return 0


def proposal_ap_line(labels: np.ndarray, probs: np.ndarray, added: np.ndarray | None, sampled: int = 0) -> str:
    """The report's line beside the crop AP: the proposal-level AP, or that the two are one ("" when unknown).
    `sampled`: the negatives per photo the split's crops were sampled down to (0: every proposal is there)."""
    ap = proposal_ap(labels, probs, added)
    if ap is None or added is None:
        return ""
    if sampled:
        caveat = (
            f"; its negatives were sampled to {sampled} per photo by the proposal stage, so positives are commoner "
            "than among detection's proposals (tools/propose.py --eval-like-detection true keeps them all)"
        )
    else:
        caveat = ""
    if not added.any():
        if sampled:
            return f"every crop is a proposal (no ground-truth box added){caveat}\n"
        return (
            "every crop is a proposal as detection scores them (no ground-truth box added): the crack average "
            "precision above is the proposal-level AP\n"
        )
    return (
        f"proposal-level AP {ap:.3f} over the {int((~added).sum())} proposals, without the {int(added.sum())} "
        f"ground-truth boxes and jittered copies the proposal stage added (chance {labels[~added].mean():.3f})"
        f"{caveat}\n"
    )


def report_text(title: str, labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> str:
    preds = (probs >= threshold).astype(int)
    report = classification_report(labels, preds, labels=[0, 1], target_names=TARGET_NAMES, zero_division=0)
    cm = confusion_matrix(labels, preds, labels=[0, 1])
    ap = average_precision_score(labels, probs) if labels.any() else float("nan")
    return (
        f"== {title} (threshold {threshold:.3f}, {len(labels)} samples) ==\n{report}\n"
        f"crack average precision {ap:.3f} (chance: the crack share, {labels.mean():.3f})\n"
        f"confusion matrix (rows: true, columns: predicted)\n"
        f"{'':>10}{TARGET_NAMES[0]:>10}{TARGET_NAMES[1]:>10}\n"
        f"{TARGET_NAMES[0]:>10}{cm[0, 0]:>10}{cm[0, 1]:>10}\n"
        f"{TARGET_NAMES[1]:>10}{cm[1, 0]:>10}{cm[1, 1]:>10}\n"
    )


def threshold_for_recall(labels: np.ndarray, probs: np.ndarray, target: float) -> tuple[float, float, float]:
    """The highest threshold whose crack recall is >= target: (threshold, recall, precision); NaNs when the split
    holds no crack (no recall to reach)."""
    if not np.any(labels):
        return float("nan"), float("nan"), float("nan")
    precision, recall, thresholds = precision_recall_curve(labels, probs)
    # recall[i] and precision[i] belong to thresholds[i]; recall falls as the threshold rises.
    ok = np.flatnonzero(recall[:-1] >= target)
    i = ok[-1] if len(ok) else 0
    return float(thresholds[i]), float(recall[i]), float(precision[i])


def threshold_for_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold with the highest crack F1."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    return float(thresholds[int(np.argmax(f1))])


def save_figure(fig, path: Path) -> None:
    """The figure as a PNG through the atomic writer (raises WriteError: full disk, I/O error); closed either way."""
    try:
        # Encoded in memory, then written: Pillow (matplotlib's PNG writer) writes straight to the file's
        # descriptor when it has one, and reports a full disk as "encoder error -2", not the OS error.
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
    finally:
        plt.close(fig)
    fsio.atomic_write(path, png.getvalue())


def epoch_axis(ax, epochs: list[int]) -> None:
    """Whole epochs only on the x axis: every epoch when there are few (one epoch included: matplotlib would
    otherwise draw 0.96, 0.98, ... around a single point), else integer ticks."""
    if epochs and len(set(epochs)) <= 20:
        ax.set_xticks(sorted(set(epochs)))
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_curves(history: list[dict], path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        ax_loss.plot(epochs, [h[key] for h in history], marker="o", label=label)
    for key, label in (("train_accuracy", "train"), ("val_accuracy", "validation")):
        ax_acc.plot(epochs, [h[key] for h in history], marker="o", label=label)
    ax_loss.set(title="Loss", xlabel="epoch")
    ax_acc.set(title="Accuracy (%)", xlabel="epoch")
    for ax in (ax_loss, ax_acc):
        epoch_axis(ax, epochs)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_val_losses(histories: dict[str, list[dict]], path: Path) -> None:
    """Validation loss per epoch, one line per named run history."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, history in histories.items():
        ax.plot([h["epoch"] for h in history], [h["val_loss"] for h in history], marker="o", label=name)
    ax.set(title="Validation loss", xlabel="epoch", ylabel="loss")
    epoch_axis(ax, [h["epoch"] for history in histories.values() for h in history])
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


def plot_pr(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, marks=(), title: str = "Precision-recall, crack class"
) -> None:
    """Crack-class precision-recall curves, one per named (labels, scores). marks: (label, recall, precision)
    points, or (label, recall, precision, curve name) drawn in that curve's colour."""
    crowded = len(curves) + len(marks) > 4
    fig, ax = plt.subplots(figsize=(11, 5.5) if crowded else (5.5, 5))
    colors = {}
    for name, (labels, probs) in curves.items():
        if not np.any(labels):  # no crack in the split (a smoke run's few batches): no curve, said in the legend
            ax.plot([], [], label=f"{name} (no crack: no curve)")
            continue
        precision, recall, _ = precision_recall_curve(labels, probs)
        ap = average_precision_score(labels, probs)
        colors[name] = ax.plot(recall, precision, label=f"{name} (AP {ap:.3f})")[0].get_color()
    for label, recall, precision, *curve in marks:
        color = colors.get(curve[0]) if curve else None
        ax.plot([recall], [precision], "D" if curve else "o", color=color, markeredgecolor="black", label=label)
    ax.set(xlabel="crack recall", ylabel="crack precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    if crowded:  # many entries: the legend goes beside the axes, not over the curves
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    else:
        ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)
