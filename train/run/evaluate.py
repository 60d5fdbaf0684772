"""Evaluation passes and `python -m train eval --checkpoint RUN/best.pt`."""

from __future__ import annotations

from pathlib import Path

import torch

from crackio import make_loader
from crackio.format.manifest import check_split
from crackio.storage.packs import open_pack
from train.evaluation.predict import predict
from train.evaluation.report import report_text
from train.run.checkpoint import load_checkpoint, trained
from train.run.model import model_from_checkpoint
from train.run.runtime import amp_dtype
from train.settings.config import Config


def eval_loader(cfg: Config, shards: str, split: str, batch_size: int, device: str, backend: str):
    """Every sample of a split once, labelled with the run's IoU threshold (for eval and the SVM stage)."""
    return make_loader(
        shards,
        split,
        batch_size=batch_size,
        train=False,
        iou_threshold=cfg.iou_threshold,
        seed=cfg.seed,
        device=device,
        backend=backend,
    )


def run_eval(
    checkpoint: str, shards: str, split: str, batch_size: int, device: str, backend: str, threshold: float
) -> str:
    """Evaluate a saved model on a split; returns the report (also printed by the CLI)."""
    from train.run.losses import make_loss

    path = Path(checkpoint)
    ckpt = load_checkpoint(path, torch.device("cpu"))
    model, cfg = model_from_checkpoint(ckpt, path)
    check_split(open_pack(shards or cfg.shards).manifest, shards or cfg.shards, split, "--split")
    loader = eval_loader(cfg, shards or cfg.shards, split, batch_size, device, backend)
    model.to(loader.device)
    loss_fn = make_loss(cfg.loss, cfg.pos_weight, cfg.focal_alpha, cfg.focal_gamma, loader.device)
    p = predict(model, loader, loss_fn, amp_dtype(loader.device))
    return (
        f"checkpoint {path} ({trained(ckpt)}, {cfg.arch}/{cfg.head}), split {split!r}, "
        f"loss {p.loss:.4f}\n" + report_text(split, p.labels, p.probs, threshold)
    )
