"""Evaluation passes: a model's predictions over a split, gathered from every rank."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from train.evaluation.mistakes import Mistakes


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
    mistakes: Mistakes | None = None  # the most confident mistakes, when asked for (train.evaluation.mistakes)


def predict(
    model: torch.nn.Module,
    loader,
    loss_fn,
    amp: torch.dtype | None,
    limit: int = 0,
    mistakes: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Prediction:
    """The model's predictions over the whole split (its first `limit` batches per rank when > 0: --limit-batches),
    gathered from every rank; with `mistakes`, also the pass's most confident mistakes and their images.
    `progress(batches done, batches)` is called after each batch (the trainer's console: a line now and then)."""
    loss_sum = torch.zeros((), device=loader.device, dtype=torch.float64)
    labels, logits, names = [], [], []
    worst = Mistakes() if mistakes else None
    total = min(len(loader), limit) if limit else len(loader)
    for done, (batch, out) in enumerate(forward_batches(model, loader, amp, limit), 1):
        if progress is not None:
            progress(done, total)
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
    return _joined(parts, sum(p.loss for p in parts) / n)  # each rank's part holds its loss sum


def merged(parts: list[Prediction]) -> Prediction:
    """One prediction of the parts' samples together (a mixture's packs; the ranks' parts of one split): the mean
    loss over every sample (each part's `loss` its mean), the arrays concatenated in order, the mistakes merged."""
    if len(parts) == 1:
        return parts[0]
    return _joined(parts, sum(p.loss * len(p.labels) for p in parts) / sum(len(p.labels) for p in parts))


def _joined(parts: list[Prediction], loss: float) -> Prediction:
    return Prediction(
        loss,
        np.concatenate([p.labels for p in parts]).astype(int),
        np.concatenate([p.probs for p in parts]),
        [x for p in parts for x in p.names],
        parts[0].mistakes.merge([p.mistakes for p in parts[1:] if p.mistakes]) if parts[0].mistakes else None,
    )
