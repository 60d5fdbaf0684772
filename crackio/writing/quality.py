"""What a pack reports about its data: the IoU histogram, which thresholds the labels follow, leakage.

All of it is computed from index columns (NumPy arrays), so a million-row split costs
a few sorts, never a pass of Python over the rows.
"""

from __future__ import annotations

import numpy as np

IOU_BIN = 0.05  # manifest histogram bin width, the original's IoU strata
EXAMPLES = 100  # names listed per finding in the manifest; the count is always complete


def iou_histogram(ious: np.ndarray, labels: np.ndarray) -> dict:
    """Counts per class in IoU bins (lo, hi], the label rule's side (label = IoU > threshold):
    a crop at exactly 0.5 is a negative and counts in (0.45, 0.5], never in the bin above. IoU 0
    counts in the first bin. Compared in float32, as the index stores IoUs and `relabel` compares."""
    edges = np.linspace(0.0, 1.0, round(1 / IOU_BIN) + 1)
    bins = np.searchsorted(edges.astype(np.float32), ious.astype(np.float32), side="left") - 1
    bins = np.clip(bins, 0, len(edges) - 2)
    return {
        "bin_edges": [round(float(e), 4) for e in edges],
        "closed": "right",
        "0": np.bincount(bins[labels == 0], minlength=len(edges) - 1).tolist(),
        "1": np.bincount(bins[labels == 1], minlength=len(edges) - 1).tolist(),
    }


def _names(filenames: np.ndarray, rows: np.ndarray) -> list[str]:
    return sorted(b.decode() for b in filenames[rows])[:EXAMPLES]


def label_report(ious: np.ndarray, labels: np.ndarray, filenames: np.ndarray) -> dict:
    """Which IoU thresholds t the names' labels follow (label = IoU > t, the original's rule).

    consistent_thresholds: {"min": a, "below": b} when label == (IoU > t) for every t with
        a <= t < b (a = highest no-crack IoU, b = lowest crack IoU), else None; then
    fewest_conflicts: the threshold that the fewest names contradict, with those names.
    impossible: names no threshold in [0, 1) explains (crack at IoU 0, no crack at IoU 1).
    """
    ious = ious.astype(np.float32)
    pos, neg = np.sort(ious[labels == 1]), np.sort(ious[labels == 0])
    lo = float(neg[-1]) if len(neg) else 0.0
    hi = float(pos[0]) if len(pos) else 1.0
    report: dict = {
        "rule": "label = IoU > t",
        "consistent_thresholds": {"min": round(lo, 6), "below": round(hi, 6)} if lo < hi else None,
    }
    if lo >= hi:
        candidates = np.unique(np.concatenate([[np.float32(0)], ious[ious < 1]]))
        conflicts = np.searchsorted(pos, candidates, "right") + len(neg) - np.searchsorted(neg, candidates, "right")
        best = int(np.argmin(conflicts))  # the lowest such threshold
        t = candidates[best]
        wrong = np.flatnonzero(((labels == 1) & (ious <= t)) | ((labels == 0) & (ious > t)))
        report["fewest_conflicts"] = {
            "threshold": round(float(t), 6),
            "count": int(conflicts[best]),
            "names": _names(filenames, wrong),
        }
    impossible = np.flatnonzero(((labels == 1) & (ious <= 0)) | ((labels == 0) & (ious >= 1)))
    report["impossible"] = {"count": int(len(impossible)), "names": _names(filenames, impossible)}
    return report


def _cross_split_groups(keys: np.ndarray, split_ids: np.ndarray) -> list[np.ndarray]:
    """Positions grouped by equal key, for the keys that occur in more than one split (sorted by key)."""
    order = np.argsort(keys, kind="stable")
    k, s = keys[order], split_ids[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]]) if len(k) else np.zeros(0, np.int64)
    if not len(starts):
        return []
    lo, hi = np.minimum.reduceat(s, starts), np.maximum.reduceat(s, starts)
    ends = np.r_[starts[1:], len(k)]
    return [order[a:b] for a, b, x, y in zip(starts, ends, lo, hi) if x != y]


def leakage_report(splits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict:
    """Samples shared between splits: the same source bytes, or proposals of one full image (stem).

    splits: name -> (filenames, stems, BLAKE2b digests of the source bytes), one row per stored sample.
    """
    names = list(splits)
    split_ids = np.concatenate([np.full(len(splits[s][0]), i) for i, s in enumerate(names)] or [np.zeros(0, int)])
    filenames = np.concatenate([splits[s][0] for s in names]) if names else np.zeros(0, "S1")

    def where(group: np.ndarray) -> dict[str, list[str]]:
        return {
            names[i]: sorted(b.decode() for b in filenames[group[split_ids[group] == i]])[:EXAMPLES]
            for i in np.unique(split_ids[group])
        }

    dup = _cross_split_groups(np.concatenate([splits[s][2] for s in names]), split_ids) if names else []
    # Stems: one entry per (split, stem), so a photo with many proposals in one split is one position.
    stem_rows = [np.unique(splits[s][1], return_index=True) for s in names]
    stems = np.concatenate([u for u, _ in stem_rows]) if names else np.zeros(0, "S1")
    stem_split = np.concatenate([np.full(len(u), i) for i, (u, _) in enumerate(stem_rows)] or [np.zeros(0, int)])
    shared = _cross_split_groups(stems, stem_split)
    return {
        "duplicate_contents": {"count": len(dup), "examples": [where(g) for g in dup[:EXAMPLES]]},
        "shared_stems": {
            "count": len(shared),
            "examples": [
                {"stem": stems[g[0]].decode(), "splits": [names[i] for i in stem_split[g]]} for g in shared[:EXAMPLES]
            ],
        },
    }
