"""Epoch-end metrics with scikit-learn, the classification report, and the plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    average_precision_score,
    classification_report,
    confusion_matrix,
    precision_recall_curve,
    precision_recall_fscore_support,
)

TARGET_NAMES = ["No crack", "Crack"]


def crack_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    preds = (probs >= threshold).astype(int)
    p, r, f, _ = precision_recall_fscore_support(labels, preds, average="binary", pos_label=1, zero_division=0)
    return {"crack_precision": float(p), "crack_recall": float(r), "crack_f1": float(f)}


def report_text(title: str, labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> str:
    preds = (probs >= threshold).astype(int)
    report = classification_report(labels, preds, labels=[0, 1], target_names=TARGET_NAMES, zero_division=0)
    cm = confusion_matrix(labels, preds, labels=[0, 1])
    ap = average_precision_score(labels, probs) if labels.any() else float("nan")
    return (f"== {title} (threshold {threshold:.3f}, {len(labels)} samples) ==\n{report}\n"
            f"crack average precision {ap:.3f} (chance: the crack share, {labels.mean():.3f})\n"
            f"confusion matrix (rows: true, columns: predicted)\n"
            f"{'':>10}{TARGET_NAMES[0]:>10}{TARGET_NAMES[1]:>10}\n"
            f"{TARGET_NAMES[0]:>10}{cm[0, 0]:>10}{cm[0, 1]:>10}\n"
            f"{TARGET_NAMES[1]:>10}{cm[1, 0]:>10}{cm[1, 1]:>10}\n")


def threshold_for_recall(labels: np.ndarray, probs: np.ndarray, target: float) -> tuple[float, float, float]:
    """The highest threshold whose crack recall is >= target: (threshold, recall, precision)."""
    precision, recall, thresholds = precision_recall_curve(labels, probs)
    # recall[i] and precision[i] belong to thresholds[i]; recall falls as the threshold rises.
    ok = np.flatnonzero(recall[:-1] >= target)
    i = ok[-1] if len(ok) else 0
    return float(thresholds[i]), float(recall[i]), float(precision[i])


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
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pr(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, marks=()) -> None:
    """Crack-class precision-recall curves, one per named (labels, probs)."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (labels, probs) in curves.items():
        precision, recall, _ = precision_recall_curve(labels, probs)
        ap = average_precision_score(labels, probs)
        ax.plot(recall, precision, label=f"{name} (AP {ap:.3f})")
    for label, recall, precision in marks:
        ax.plot([recall], [precision], "o", label=label)
    ax.set(xlabel="crack recall", ylabel="crack precision", xlim=(0, 1), ylim=(0, 1.02),
           title="Precision-recall, crack class")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
