"""A validation pass's most confident mistakes, and the figure of them the logs show each epoch."""

from __future__ import annotations

import numpy as np

from crackio.writing.filenames import BadName, parse_name

WORST = 8  # false positives and false negatives shown per epoch
CAPTION = 28  # characters of a proposal's name under its tile (2.2 inches wide, 7 pt)


def worst_figure(worst: dict, epoch: int):
    """A matplotlib figure: a row of the validation's most confident false positives (no crack, highest P(crack))
    and one of its false negatives (crack, lowest), each tile titled with P(crack) and the proposal's name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(kind, worst[kind]) for kind in ("false_positives", "false_negatives") if worst[kind]]
    cols = max(len(items) for _, items in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 2.6 * len(rows)), squeeze=False)
    for r, (kind, items) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(items):
                prob, image, name = items[c]
                ax.imshow(image)
                ax.set_title(f"P={prob:.2f}\n{caption(name)}", fontsize=7)
        axes[r][0].text(-0.1, 0.5, kind.replace("_", " "), rotation=90, va="center", ha="right",
                        transform=axes[r][0].transAxes, fontsize=9)  # fmt: skip
    fig.suptitle(f"epoch {epoch}: worst validation mistakes at threshold 0.5")
    fig.tight_layout(rect=(0.02, 0, 1, 0.9))  # room for the title above the tiles' captions
    return fig


def caption(name: str, width: int = CAPTION) -> str:
    """`name` in at most `width` characters where it can be: a long stem (Roboflow's `IMG_0042_jpg.rf.<hash>`)
    loses its middle to an ellipsis, never the proposal number, IoU and label after it
    (crackio.writing.filenames); a name that is no proposal's loses its middle."""
    if len(name) <= width:
        return name
    try:
        stem = parse_name(name).stem
    except BadName:
        stem = name
    tail = name[len(stem) :]
    room = max(width - len(tail) - 1, 2)  # the stem's characters left beside the ellipsis
    end = room // 3  # the start of a stem tells photos apart better than its end (often a hash)
    return f"{stem[: room - end]}\u2026{stem[len(stem) - end :] if end else ''}{tail}"


class Mistakes:
    """The `k` most confident mistakes of a pass at threshold 0.5: false positives (no crack) by highest P(crack),
    false negatives (crack) by lowest; each (P(crack), uint8 HWC image, name). Images are copied only for the
    batch's mistakes."""

    def __init__(self, k: int = WORST):
        self.k = k
        self.found: dict[str, list[tuple[float, np.ndarray, str]]] = {"false_positives": [], "false_negatives": []}

    def add(self, images, labels: np.ndarray, probs: np.ndarray, names: list[str]) -> None:
        """One batch: `images` (N, 3, H, W) uint8 or normalized float (crackio.loading.augment), labels and probs
        (N,) numpy."""
        import torch

        from crackio.loading.augment import MEAN, STD

        for kind, wrong, order in (
            ("false_positives", (labels == 0) & (probs >= 0.5), -1),
            ("false_negatives", (labels == 1) & (probs < 0.5), 1),
        ):
            rows = np.flatnonzero(wrong)
            rows = rows[np.argsort(order * probs[rows], kind="stable")][: self.k]
            if not len(rows):
                continue
            picked = images[rows.tolist()].float().cpu()
            if images.dtype.is_floating_point:  # normalized: back to 0-255
                mean = torch.tensor(MEAN).view(1, 3, 1, 1)
                std = torch.tensor(STD).view(1, 3, 1, 1)
                picked = (picked * std + mean) * 255
            tiles = picked.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()
            self._keep(kind, [(float(probs[r]), tiles[j], names[r]) for j, r in enumerate(rows)])

    def merge(self, others: list[Mistakes]) -> Mistakes:
        """These and other ranks' mistakes, the k worst of all."""
        for other in others:
            for kind, found in other.found.items():
                self._keep(kind, found)
        return self

    def _keep(self, kind: str, more: list[tuple[float, np.ndarray, str]]) -> None:
        """The k worst of `kind` among those kept and `more`: most confident first."""
        order = -1 if kind == "false_positives" else 1
        self.found[kind] = sorted(self.found[kind] + more, key=lambda t: order * t[0])[: self.k]
