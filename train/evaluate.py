"""Evaluation passes and `python -m train eval --checkpoint RUN/best.pt`."""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from crackio import make_loader
from crackio.errors import ConfigError
from crackio.format.manifest import check_split
from crackio.storage.packs import open_pack
from train.checkpoint import CheckpointError, load_checkpoint, trained
from train.config import Config
from train.logs import Mistakes
from train.model import CrackClassifier, WeightsError, build_model
from train.report import report_text
from train.runtime import amp_dtype


def forward_batches(model: torch.nn.Module, loader, amp: torch.dtype | None, limit: int = 0):
    """(batch, float logits) for every batch of the loader (the first `limit` when > 0), in eval mode without
    gradients."""
    model.eval()
    with torch.no_grad(), contextlib.closing(iter(loader)) as batches:  # closed: a limited pass ends the epoch's
        for batch in itertools.islice(batches, limit or None):
            with torch.autocast(loader.device.type, dtype=amp, enabled=amp is not None):
                out = model(batch.images)
            yield batch, out.float()


class Prediction(NamedTuple):
    """A whole split's evaluation, gathered from every rank."""

    loss: float  # mean loss per sample
    labels: np.ndarray  # int 0/1, the run's labels
    probs: np.ndarray  # float32 P(crack)
    names: list[str]  # proposal file names
    mistakes: Mistakes | None = None  # the most confident mistakes, when asked for (train.logs)


def predict(
    model: torch.nn.Module, loader, loss_fn, amp: torch.dtype | None, limit: int = 0, mistakes: bool = False
) -> Prediction:
    """The model's predictions over the whole split (its first `limit` batches per rank when > 0: --limit-batches),
    gathered from every rank; with `mistakes`, also the pass's most confident mistakes and their images."""
    loss_sum = torch.zeros((), device=loader.device, dtype=torch.float64)
    labels, logits, names = [], [], []
    worst = Mistakes() if mistakes else None
    for batch, out in forward_batches(model, loader, amp, limit):
        loss_sum += loss_fn(out, batch.labels).double() * len(batch.labels)
        labels.append(batch.labels)
        logits.append(out)
        names += batch.names
        if worst is not None:
            probs = torch.sigmoid(out).cpu().numpy()
            worst.add(batch.images, batch.labels.cpu().numpy().astype(int), probs, batch.names)
    part = Prediction(
        float(loss_sum),
        torch.cat(labels).cpu().numpy(),
        torch.sigmoid(torch.cat(logits)).cpu().numpy(),
        names,
        worst,
    )
    parts: list = [part]
    if dist.is_initialized():  # every rank evaluated a disjoint part; sizes differ, so gather objects
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, part)
    parts = [Prediction(*p) for p in parts]
    n = sum(len(p.labels) for p in parts)
    return Prediction(
        sum(p.loss for p in parts) / n,
        np.concatenate([p.labels for p in parts]).astype(int),
        np.concatenate([p.probs for p in parts]),
        [x for p in parts for x in p.names],
        parts[0].mistakes.merge([p.mistakes for p in parts[1:]]) if parts[0].mistakes else None,
    )


def model_from_checkpoint(ckpt: dict, path: Path) -> tuple[CrackClassifier, Config]:
    """The classifier and run config a checkpoint (from train.checkpoint.load_checkpoint) holds.

    Raises:
        CheckpointError: its config is refused (unknown keys, wrong types, values no run could have).
        WeightsError: its weights do not fit its own config.
    """
    try:
        cfg = Config.from_dict(ckpt["config"], f"{path} (its config)")
        cfg.validate()  # its split names become paths (features/<split>.npz): checked like a command line's
    except ConfigError as e:
        raise CheckpointError(f"{path} holds a config no run could have: {e}") from e
    model = build_model(cfg.arch, "none", cfg.head)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise WeightsError(
            f"{path} does not fit its own config (arch {cfg.arch}, head {cfg.head}): {str(e).splitlines()[0]}"
        ) from e
    return model, cfg


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
    from train.losses import make_loss

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
