"""The training loop: one epoch (`train_epoch`, whose signature is what it needs) and the epochs of a run
(`fit`: validation, checkpoints, early stopping)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from crackio.errors import CrackioError
from crackio.loading.loader import Loader
from train.checkpoint import save_epoch
from train.evaluate import predict
from train.report import crack_metrics
from train.setup import Run


class NonFiniteLoss(CrackioError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def train_epoch(
    net: Callable[[torch.Tensor], torch.Tensor],
    loader: Loader,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    amp: torch.dtype | None,
    desc: str,
    show: bool,
) -> dict:
    """One pass over `loader`'s next epoch; returns train_loss, train_accuracy (%), images_per_sec and
    data_wait_share (the share of the epoch spent waiting for the loader), summed over ranks.

    Raises:
        NonFiniteLoss: the loss became NaN or infinite (checked every 10 steps: no per-step host sync).
    """
    device = loader.device
    totals = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, correct: summed on the device
    seen = 0  # samples, counted on the host: no per-step host-to-device copy
    finite = torch.ones((), device=device, dtype=torch.bool)
    wait = 0.0
    steps = len(loader)
    start = tick = time.perf_counter()
    bar = tqdm(loader, total=steps, desc=desc, unit="batch", disable=not show, leave=False)
    for step, batch in enumerate(bar):
        wait += time.perf_counter() - tick  # time blocked on the loader, kept apart from compute
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = net(batch.images)
        loss = loss_fn(logits, batch.labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        n = len(batch.labels)
        seen += n
        finite &= torch.isfinite(loss.detach())
        totals += torch.stack([loss.detach().double() * n, ((logits.detach() >= 0) == (batch.labels > 0.5)).sum()])
        if step % 10 == 0 or step == steps - 1:  # a sync every 10 steps, not every step
            if not bool(finite):
                raise NonFiniteLoss(f"loss became NaN/inf ({desc}, step {step})")
            if show:
                elapsed = time.perf_counter() - start
                loss_avg, correct = totals.tolist()
                bar.set_postfix(
                    loss=f"{loss_avg / seen:.4f}",
                    acc=f"{100 * correct / seen:.1f}%",
                    img_s=f"{seen / elapsed:.0f}",
                    wait=f"{100 * wait / elapsed:.0f}%",
                )
        tick = time.perf_counter()
    elapsed = time.perf_counter() - start
    if dist.is_initialized():
        dist.all_reduce(totals)
        seen *= dist.get_world_size()  # train batches are full and equal in number on every rank
    loss_sum, correct = totals.tolist()
    return {
        "train_loss": loss_sum / seen,
        "train_accuracy": 100.0 * correct / seen,
        "images_per_sec": seen / elapsed,
        "data_wait_share": wait / elapsed,
    }


def fit(run: Run) -> None:
    """Train `run` from its state to `cfg.epochs` or early stopping; after each epoch, validate, update
    `run.state` and (rank 0) save the checkpoints, history and metrics."""
    cfg, state = run.cfg, run.state
    show = run.rank == 0
    for epoch in range(state.epoch, cfg.epochs):
        if state.bad_epochs >= cfg.patience:
            break
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout etc.: a resumed epoch repeats exactly
        run.train_loader.epoch = epoch
        run.model.train()
        epoch_start = time.perf_counter()
        desc = f"epoch {epoch + 1}/{cfg.epochs}"
        row: dict[str, float] = {"epoch": epoch + 1}
        row |= train_epoch(run.net, run.train_loader, run.loss_fn, run.optimizer, run.scaler, run.amp, desc, show)
        val_start = time.perf_counter()
        val = predict(run.model, run.val_loader, run.loss_fn, run.amp)
        if not math.isfinite(val.loss):
            raise NonFiniteLoss(f"validation loss is {val.loss} after epoch {epoch + 1}")
        now = time.perf_counter()
        row |= {
            "val_loss": val.loss,
            "val_accuracy": 100.0 * float(((val.probs >= 0.5) == val.labels).mean()),
            **crack_metrics(val.labels, val.probs),
            "epoch_seconds": now - epoch_start,
            "train_seconds": val_start - epoch_start,
            "val_seconds": now - val_start,
        }
        improved = val.loss < state.best_val_loss
        state.history.append(row)
        state.epoch, state.best_val_loss = epoch + 1, min(val.loss, state.best_val_loss)
        state.bad_epochs = 0 if improved else state.bad_epochs + 1
        if run.rank == 0:
            save_epoch(run.out, run.model, run.optimizer, run.scaler, state, run.proposals, run.pack, cfg, improved)
            print(
                f"epoch {epoch + 1}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.1f}% | "
                f"val loss {val.loss:.4f} acc {row['val_accuracy']:.1f}% crack P/R/F1 "
                f"{row['crack_precision']:.2f}/{row['crack_recall']:.2f}/{row['crack_f1']:.2f} "
                f"AP {row['crack_ap']:.3f} | "
                f"{row['images_per_sec']:.0f} img/s, {100 * row['data_wait_share']:.0f}% waiting for data"
                + ("" if improved else f" (no improvement {state.bad_epochs}/{cfg.patience})")
            )
        run.saved = state.epoch
    if state.bad_epochs >= cfg.patience and run.rank == 0:
        print(f"early stopping: validation loss has not improved for {cfg.patience} epochs")
