"""Evaluation passes and `python -m train eval --checkpoint RUN/best.pt`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from crackio import make_loader
from crackio.errors import MissingFile
from train.config import Config
from train.model import WeightsError, build_model
from train.report import report_text


def world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA: bf16 where supported (no scaler needed), else fp16; fp32 (None) on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def forward_batches(model: torch.nn.Module, loader, amp: torch.dtype | None):
    """(batch, float logits) for every batch of the loader, in eval mode without gradients."""
    model.eval()
    with torch.no_grad():
        for batch in loader:
            with torch.autocast(loader.device.type, dtype=amp, enabled=amp is not None):
                out = model(batch.images)
            yield batch, out.float()


def predict(model: torch.nn.Module, loader, loss_fn, amp: torch.dtype | None) -> tuple[float, np.ndarray, np.ndarray,
                                                                                      list]:
    """(mean loss, labels, crack probabilities, names) over the whole split, gathered from every rank."""
    loss_sum = torch.zeros((), device=loader.device, dtype=torch.float64)
    labels, logits, names = [], [], []
    for batch, out in forward_batches(model, loader, amp):
        loss_sum += loss_fn(out, batch.labels).double() * len(batch.labels)
        labels.append(batch.labels)
        logits.append(out)
        names += batch.names
    part = (float(loss_sum), torch.cat(labels).cpu().numpy(), torch.sigmoid(torch.cat(logits)).cpu().numpy(), names)
    if dist.is_initialized():  # every rank evaluated a disjoint part; sizes differ, so gather objects
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, part)
    else:
        parts = [part]
    n = sum(len(p[1]) for p in parts)
    return (sum(p[0] for p in parts) / n, np.concatenate([p[1] for p in parts]).astype(int),
            np.concatenate([p[2] for p in parts]), [x for p in parts for x in p[3]])


def load_checkpoint(path: Path, device: torch.device) -> dict:
    if not path.is_file():
        raise MissingFile(f"checkpoint {path} does not exist (a run writes best.pt and last.pt)")
    # weights_only: a checkpoint is data, never code; nothing is unpickled beyond tensors and plain types.
    return torch.load(path, map_location=device, weights_only=True)


def model_from_checkpoint(ckpt: dict, path: Path) -> tuple[torch.nn.Module, Config]:
    cfg = Config.from_dict(ckpt["config"])
    model = build_model(cfg.arch, "none", cfg.head)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise WeightsError(f"{path} does not fit its own config (arch {cfg.arch}, head {cfg.head}): "
                           f"{str(e).splitlines()[0]}") from e
    return model, cfg


def eval_loader(cfg: Config, shards: str, split: str, batch_size: int, device: str, backend: str):
    """Every sample of a split once, labelled with the run's IoU threshold (for eval and the SVM stage)."""
    return make_loader(shards, split, batch_size=batch_size, train=False, iou_threshold=cfg.iou_threshold,
                       seed=cfg.seed, device=device, backend=backend)


def run_eval(checkpoint: str, shards: str, split: str, batch_size: int, device: str, backend: str,
             threshold: float) -> str:
    """Evaluate a saved model on a split; returns the report (also printed by the CLI)."""
    from train.losses import make_loss

    path = Path(checkpoint)
    ckpt = load_checkpoint(path, torch.device("cpu"))
    model, cfg = model_from_checkpoint(ckpt, path)
    loader = eval_loader(cfg, shards or cfg.shards, split, batch_size, device, backend)
    model.to(loader.device)
    loss_fn = make_loss(cfg.loss, cfg.pos_weight, cfg.focal_alpha, cfg.focal_gamma, loader.device)
    loss, labels, probs, _ = predict(model, loader, loss_fn, amp_dtype(loader.device))
    return (f"checkpoint {path} (epoch {ckpt['epoch']}, {cfg.arch}/{cfg.head}), split {split!r}, "
            f"loss {loss:.4f}\n" + report_text(split, labels, probs, threshold))


def atomic_save(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)
