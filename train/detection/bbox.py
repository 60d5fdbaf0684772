"""`python -m train bbox`: R-CNN's bounding-box regression (Girshick et al. 2014, appendix C).

For a proposal P (centre x, y, width w, height h) and its ground-truth box G, the targets are

    t_x = (G_x - P_x) / P_w,   t_y = (G_y - P_y) / P_h,   t_w = log(G_w / P_w),   t_h = log(G_h / P_h)

fitted by ridge regression on the frozen fine-tuned backbone's pooled features (the input of its last Linear: the
SVM stage's features, crackio's stand-in for R-CNN's pool5), from the training proposals whose IoU with their
ground truth is at least --min-iou (0.6, R-CNN's). The regularization (R-CNN: lambda = 1000) is chosen on the
validation split's proposals among --alphas by the mean IoU of the moved boxes. Detection applies it to every
scored proposal before NMS (`apply`), once, as R-CNN does; `detect --no-bbox-reg` compares without it.

Features come from the pack's crops through the eval loader (cached under OUT/features/ as the SVM stage caches
them); boxes and ground truth from the pack's index (tools/propose.py records both).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from crackio.errors import ConfigError
from crackio.fsio import make_dir, remove_temporaries, save_npz, write_json, write_text
from crackio.storage.packs import open_pack
from train.run.checkpoint import file_sha256, load_checkpoint, trained
from train.run.features import cache_key, cached_features, checkpoint_digest, features_of
from train.run.model import model_from_checkpoint
from train.settings.commands import BboxSettings

OUTPUTS = ("report.txt", "bbox_regressor.npz", "summary.json")
REGRESSOR = "bbox_regressor.npz"  # RUN/bbox/bbox_regressor.npz: what detect looks for beside the checkpoint
MAX_LOG = float(np.log(1000.0 / 16))  # the largest scale change applied (torchvision's clamp for box deltas)


def _centres(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    w = np.maximum(boxes[:, 2] - boxes[:, 0], 1e-6)
    h = np.maximum(boxes[:, 3] - boxes[:, 1], 1e-6)
    return boxes[:, 0] + w / 2, boxes[:, 1] + h / 2, w, h


def targets(proposals: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """float64 (N, 4) t_x, t_y, t_w, t_h of R-CNN's appendix C, for float (N, 4) x0 y0 x1 y1 proposals and their
    ground-truth boxes (photo pixels)."""
    px, py, pw, ph = _centres(np.asarray(proposals, np.float64))
    gx, gy, gw, gh = _centres(np.asarray(gt, np.float64))
    return np.stack([(gx - px) / pw, (gy - py) / ph, np.log(gw / pw), np.log(gh / ph)], axis=1)


def apply(proposals: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """The boxes `deltas` (N, 4: t_x, t_y, t_w, t_h) move `proposals` (N, 4 x0 y0 x1 y1) to: the inverse of
    `targets` (scale changes clamped at log(1000/16), as torchvision clamps them)."""
    px, py, pw, ph = _centres(np.asarray(proposals, np.float64))
    d = np.asarray(deltas, np.float64)
    cx, cy = px + pw * d[:, 0], py + ph * d[:, 1]
    w, h = pw * np.exp(np.minimum(d[:, 2], MAX_LOG)), ph * np.exp(np.minimum(d[:, 3], MAX_LOG))
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def box_iou_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of each row of `a` with the same row of `b` (torchvision.ops.box_iou computes every pair)."""
    import torchvision

    if not len(a):
        return np.zeros(0)
    return torchvision.ops.box_iou(torch.as_tensor(a), torch.as_tensor(b)).diagonal().numpy()


@dataclass(frozen=True)
class Regressor:
    """deltas = ((features - mean) / scale) @ coef.T + intercept; coef (4, D)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray

    def deltas(self, features: np.ndarray) -> np.ndarray:
        return ((np.asarray(features, np.float64) - self.mean) / self.scale) @ self.coef.T + self.intercept

    def move(self, proposals: np.ndarray, features: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """The proposals (N, 4) moved by their features (N, D), clipped to their photos (`sizes`: width, height, one
        (2,) for every row or (N, 2)), as R-CNN clips its regressed boxes. Clipped here rather than with
        torchvision's clip_boxes_to_image, which takes one image's size, where rows may come from many photos."""
        moved = apply(proposals, self.deltas(features))
        size = np.broadcast_to(np.asarray(sizes, np.float64).reshape(-1, 2), (len(moved), 2))
        moved[:, [0, 2]] = np.clip(moved[:, [0, 2]], 0, size[:, :1])
        moved[:, [1, 3]] = np.clip(moved[:, [1, 3]], 0, size[:, 1:])
        return moved


def load_regressor(path: Path, checkpoint: Path | None, dim: int) -> Regressor:
    """The regressor `python -m train bbox` saved, checked against the checkpoint whose features it reads.

    Raises:
        ConfigError: not such a file, another checkpoint's, or features of another size.
    """
    try:
        with np.load(path, allow_pickle=False) as z:  # data only: never unpickled
            reg = Regressor(*(z[k].astype(np.float64) for k in ("mean", "scale", "coef", "intercept")))
            made_from = str(z["checkpoint_sha256"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{path} is not a regressor saved by `python -m train bbox` ({e})") from e
    if checkpoint is not None and file_sha256(checkpoint).hexdigest() != made_from:
        raise ConfigError(
            f"{path} was fitted on another checkpoint's features (not {checkpoint}'s): run `python -m train bbox "
            f"--checkpoint {checkpoint}` again, or give --no-bbox-reg"
        )
    if reg.coef.shape != (4, dim) or reg.mean.shape != (dim,):
        raise ConfigError(f"{path} takes {reg.coef.shape[-1]}-d features; this checkpoint's backbone gives {dim}-d")
    return reg


def boxes_of(
    shards: list[str], split: str, names: np.ndarray, remote
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(proposal boxes, ground-truth boxes, IoU, photo width and height) of the crops `names` (the loader's order),
    from the packs' index.

    Raises:
        ConfigError: a pack without boxes (made by tools/pack.py from a crop folder).
    """
    indexes = []
    for location in shards:
        index = open_pack(location, remote).index(split).rows
        if "gt_box" not in (index.dtype.names or ()):
            raise ConfigError(
                f"{location} records no proposal boxes (packed from a crop folder by tools/pack.py): bounding-box "
                "regression needs a pack made by tools/propose.py"
            )
        indexes.append(index)
    width = max(i.dtype["filename"].itemsize for i in indexes)
    filenames = np.concatenate([i["filename"].astype(f"S{width}") for i in indexes])
    order = np.argsort(filenames, kind="stable")  # each name's row by binary search, not a dict of every row
    at = order[np.searchsorted(filenames, np.asarray([str(n).encode() for n in names], f"S{width}"), sorter=order)]
    box, gt, iou, size = (
        np.concatenate([np.asarray(i[c], np.float64) for i in indexes]) for c in ("box", "gt_box", "iou", "photo_size")
    )
    return box[at].reshape(-1, 4), gt[at].reshape(-1, 4), iou[at], size[at].reshape(-1, 2)


MIN_VALIDATION = 10  # validation proposals at --min-iou below which lambda is chosen by cross-validation on train


def mean_iou_after(reg: Regressor, x: np.ndarray, box: np.ndarray, gt: np.ndarray, size: np.ndarray) -> float:
    """The mean IoU with their ground truth of proposals `box` moved by `reg` (the criterion lambda is chosen by)."""
    return float(box_iou_pairs(reg.move(box, x, size), gt).mean())


def cross_validated(x: np.ndarray, t: np.ndarray, rows: tuple, alpha: float) -> float:
    """`mean_iou_after` of held-out folds (scikit-learn's KFold, 5 folds, seeded) of the training proposals."""
    from sklearn.model_selection import KFold

    _, box, gt, size = rows
    folds = KFold(n_splits=min(5, len(x)), shuffle=True, random_state=0).split(x)
    return float(np.mean([mean_iou_after(fit(x[a], t[a], alpha), x[b], box[b], gt[b], size[b]) for a, b in folds]))


def fit(x: np.ndarray, t: np.ndarray, alpha: float) -> Regressor:
    """Ridge regression (scikit-learn's) of the targets on the standardized features."""
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    ridge = Ridge(alpha=alpha).fit(scaler.transform(x), t)
    return Regressor(scaler.mean_, scaler.scale_, np.atleast_2d(ridge.coef_), np.atleast_1d(ridge.intercept_))


def run_bbox(args: BboxSettings) -> Path:
    """Fit the regressors, choose lambda on validation, report the IoU before and after; returns the folder.

    Raises:
        MissingFile, CheckpointError: a missing or refused checkpoint.
        ShardError, ConfigError: unusable shards (a pack without boxes), too few proposals at --min-iou.
        WriteError: an output cannot be written.
    """
    path = Path(args.checkpoint)
    ckpt = load_checkpoint(path, torch.device("cpu"))
    model, cfg = model_from_checkpoint(ckpt, path)
    shards = list(args.shards or cfg.data.shards)
    remote = args.remote.settings()
    out = Path(args.out) if args.out else path.parent / "bbox"
    remove_temporaries(out, OUTPUTS)
    remove_temporaries(out / "features", ["*.npz"])
    digest = checkpoint_digest(path, shards, remote)
    splits = [cfg.data.train_split, cfg.data.val_split]
    if all(cfg.data.test_split in open_pack(s, remote).manifest["splits"] for s in shards):
        splits.append(cfg.data.test_split)
    sets = {}
    for split in splits:
        key = cache_key(digest, split, cfg.data.iou_threshold)
        data = cached_features(out / "features", key, split, partial(features_of, model, cfg, split, args))
        box, gt, iou, size = boxes_of(shards, split, data["names"], remote)
        near = iou >= args.min_iou
        sets[split] = (data["features"][near], box[near], gt[near], size[near])
    x, box, gt, size = sets[cfg.data.train_split]
    if len(x) < 10:
        raise ConfigError(
            f"only {len(x)} {cfg.data.train_split} proposals have IoU >= --min-iou {args.min_iou}: too few to fit "
            "the regressors; lower --min-iou, or propose more photos"
        )
    t = targets(box, gt)
    val = sets[cfg.data.val_split]
    if len(val[0]) >= MIN_VALIDATION:
        chosen_on = f"{cfg.data.val_split}'s {len(val[0])} proposals with IoU >= {args.min_iou}"
        scores = {alpha: mean_iou_after(fit(x, t, alpha), *val) for alpha in args.alphas}
    else:  # a validation split of detection-time crops holds few proposals that close to a crack
        chosen_on = (
            f"5-fold cross-validation on {cfg.data.train_split} ({cfg.data.val_split} has {len(val[0])} proposals "
            f"with IoU >= {args.min_iou}, under {MIN_VALIDATION})"
        )
        scores = {alpha: cross_validated(x, t, sets[cfg.data.train_split], alpha) for alpha in args.alphas}
    alpha = max(args.alphas, key=lambda a: (scores[a], -abs(np.log10(a) - 3)))
    reg = fit(x, t, alpha)
    lines = [
        f"checkpoint {path} ({trained(ckpt)}, {cfg.model.arch}/{cfg.model.head}); {x.shape[1]}-d features; "
        f"{len(x)} {cfg.data.train_split} proposals with IoU >= {args.min_iou} fitted",
        f"lambda chosen by the mean IoU after, on {chosen_on}: "
        + ", ".join(f"{a:g}: {scores[a]:.4f}" for a in args.alphas) + f" -> {alpha:g}",
    ]  # fmt: skip
    per_split = {}
    for split, (sx, sbox, sgt, ssize) in sets.items():
        before = box_iou_pairs(sbox, sgt)
        after = box_iou_pairs(reg.move(sbox, sx, ssize), sgt) if len(sx) else np.zeros(0)
        per_split[split] = {
            "proposals": len(sx),
            "mean_iou_before": float(before.mean()) if len(before) else None,
            "mean_iou_after": float(after.mean()) if len(after) else None,
            "share_improved": float((after > before).mean()) if len(after) else None,
        }
        if len(sx):
            lines.append(
                f"{split}: {len(sx)} proposals with IoU >= {args.min_iou}: mean IoU with their ground truth "
                f"{before.mean():.4f} -> {after.mean():.4f}, {100 * (after > before).mean():.0f}% moved closer"
            )
    make_dir(out)
    write_text(out / "report.txt", "\n".join(lines) + "\n")
    save_npz(
        out / REGRESSOR,
        mean=reg.mean,
        scale=reg.scale,
        coef=reg.coef,
        intercept=reg.intercept,
        alpha=np.float64(alpha),
        min_iou=np.float64(args.min_iou),
        checkpoint_sha256=np.array(file_sha256(path).hexdigest()),  # whose features these are
    )
    write_json(out / "summary.json", {"lambda": alpha, "lambda_scores": scores, "splits": per_split})
    print("\n".join(lines))
    print(f"bounding-box regressor: {out / REGRESSOR} (detect applies it; --no-bbox-reg leaves it out)")
    return out
