"""`python -m train svm`: R-CNN's second stage, a linear SVM on the frozen fine-tuned backbone's features.

Features are the input of the backbone's last Linear layer (the pooled 2048-d vector for ResNeXt50),
taken through the eval loader in the same pass as the network head's probabilities, and cached per
split under OUT/features/ (reused while the checkpoint and the shards are unchanged). Training follows
R-CNN: positives IoU >= --pos-iou, negatives IoU < --neg-iou, the band between ignored, positive loss
weight 2, hard-negative mining rounds. Evaluation uses the run's own labels (the names', or IoU > its
--iou-threshold), so the SVM and the head are compared on the same samples.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from crackio.errors import ConfigError
from crackio.fsio import make_dir, remove_temporaries, save_npz, write_json, write_text
from crackio.loading.samplers import label_source
from crackio.storage.packs import open_pack
from train.evaluation.report import class_metrics, plot_pr, report_text, threshold_for_f1, threshold_for_recall
from train.run.checkpoint import file_sha256, load_checkpoint, trained
from train.run.features import cache_key, cached_features, checkpoint_digest, features_of
from train.run.model import model_from_checkpoint
from train.settings.commands import SvmSettings

OUTPUTS = ("report.txt", "pr_curve.png", "svm_model.npz", "summary.json")  # in OUT; features/<split>.npz below


def train_svm(x: np.ndarray, ious: np.ndarray, args, log: list[str]) -> tuple[StandardScaler, LinearSVC]:
    """R-CNN's protocol: start from every positive and a random negative cache, then add the negatives
    the SVM scores inside the margin (decision > -1), hardest first, for --rounds rounds."""
    pos = np.flatnonzero(ious >= args.pos_iou)
    neg = np.flatnonzero(ious < args.neg_iou)
    if len(pos) == 0 or len(neg) == 0:
        raise ConfigError(
            f"the train split has {len(pos)} samples with IoU >= {args.pos_iou} and {len(neg)} with "
            f"IoU < {args.neg_iou}; the SVM needs both (adjust --pos-iou / --neg-iou)"
        )
    log.append(
        f"training set: {len(pos)} positives (IoU >= {args.pos_iou}), {len(neg)} negatives "
        f"(IoU < {args.neg_iou}), {len(ious) - len(pos) - len(neg)} in between ignored"
    )
    scaler = StandardScaler().fit(x[np.concatenate([pos, neg])])
    z = scaler.transform(x).astype(np.float32)
    rng = np.random.default_rng(args.seed)
    cache = np.sort(rng.choice(neg, size=min(len(neg), args.negatives), replace=False))
    for round_ in range(args.rounds + 1):
        rows = np.concatenate([pos, cache])
        y = (np.arange(len(rows)) < len(pos)).astype(int)
        svm = LinearSVC(C=args.C, class_weight={0: 1.0, 1: 2.0}, max_iter=10_000, random_state=args.seed)
        svm.fit(z[rows], y)
        scores = svm.decision_function(z[neg])
        hard = neg[scores > -1]
        new = np.setdiff1d(hard, cache)
        log.append(
            f"round {round_}: trained on {len(pos)} positives + {len(cache)} negatives; {len(hard)} "
            f"negatives inside the margin, {len(new)} of them new"
        )
        if round_ == args.rounds or len(new) == 0:
            break
        order = np.argsort(-svm.decision_function(z[new]))
        cache = np.union1d(cache, new[order[: args.negatives]])
    return scaler, svm


def run_svm(args: SvmSettings) -> Path:
    """Extract (or reuse) features, train the SVM, choose its threshold on validation, report.

    Raises:
        MissingFile, CheckpointError: a missing or refused checkpoint.
        ShardError, ConfigError: unusable shards or settings.
        WriteError: an output cannot be written (full disk, I/O error); earlier outputs are unchanged.
    """
    path = Path(args.checkpoint)
    ckpt = load_checkpoint(path, torch.device("cpu"))
    model, cfg = model_from_checkpoint(ckpt, path)
    shards = list(args.shards or cfg.data.shards)
    splits = [cfg.data.train_split, cfg.data.val_split]
    if all(cfg.data.test_split in open_pack(s, args.remote.settings()).manifest["splits"] for s in shards):
        splits.append(cfg.data.test_split)
    out = Path(args.out) if args.out else path.parent / "svm"
    remove_temporaries(out, OUTPUTS)  # what a kill -9 during a write left
    remove_temporaries(out / "features", ["*.npz"])
    data, digest = {}, checkpoint_digest(path, shards, args.remote.settings())
    for split in splits:
        key = cache_key(digest, split, cfg.data.iou_threshold)
        data[split] = cached_features(out / "features", key, split, partial(features_of, model, cfg, split, args))
    log = [
        f"checkpoint {path} ({trained(ckpt)}, {cfg.model.arch}/{cfg.model.head}); "
        f"{data[cfg.data.train_split]['features'].shape[1]}-d features from the frozen backbone"
    ]
    train = data[cfg.data.train_split]
    scaler, svm = train_svm(train["features"], train["ious"], args, log)
    scores = {s: svm.decision_function(scaler.transform(data[s]["features"])) for s in splits[1:]}
    val = data[cfg.data.val_split]
    chosen = {}
    for name, values in (("svm", scores[cfg.data.val_split]), ("head", val["probs"])):
        if args.target_recall:
            chosen[name] = threshold_for_recall(val["labels"], values, args.target_recall)[0]
        else:
            chosen[name] = threshold_for_f1(val["labels"], values)
    rule = f"crack recall >= {args.target_recall}" if args.target_recall else "the highest crack F1"
    log.append(
        f"thresholds chosen on {cfg.data.val_split} for {rule}: SVM {chosen['svm']:.4f}, head {chosen['head']:.4f}"
    )
    log.append(f"evaluated with the run's {label_source(cfg.data.iou_threshold)}")
    held_out = cfg.data.test_split if cfg.data.test_split in splits else None
    if held_out is None:
        log.append(
            f"no {cfg.data.test_split!r} split in {' and '.join(shards)}: every figure below is on "
            f"{cfg.data.val_split}, the split "
            f"both thresholds were tuned on (optimistic; pack a test split for held-out figures)"
        )
    text = ["\n".join(log) + "\n"]
    per_split: dict[str, dict] = {}
    summary = {"log": log, "thresholds": chosen, "held_out_split": held_out, "splits": per_split}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in splits[1:]:
        labels, probs = data[split]["labels"], data[split]["probs"]
        text += [
            report_text(f"{split}: SVM", labels, scores[split], chosen["svm"]),
            report_text(f"{split}: network head", labels, probs, chosen["head"]),
            report_text(f"{split}: network head at 0.5", labels, probs, 0.5),
        ]
        per_split[split] = {
            "svm": class_metrics(labels, scores[split], chosen["svm"]),
            "head": class_metrics(labels, probs, chosen["head"]),
        }
        curves |= {f"SVM, {split}": (labels, scores[split]), f"network head, {split}": (labels, probs)}
    make_dir(out)
    write_text(out / "report.txt", "\n".join(text))
    plot_pr(curves, out / "pr_curve.png", title="Crack precision-recall: SVM vs network head")
    # The model as plain arrays (no pickle): score = ((x - mean) / scale) @ coef + intercept.
    save_npz(
        out / "svm_model.npz",
        mean=scaler.mean_,
        scale=scaler.scale_,
        coef=svm.coef_[0],
        intercept=svm.intercept_,
        threshold=np.float64(chosen["svm"]),
        checkpoint_sha256=np.array(file_sha256(path).hexdigest()),  # whose features these are
    )
    write_json(out / "summary.json", summary)  # last: marks the stage finished
    print("\n".join(text))
    print(f"SVM folder: {out}")
    return out
