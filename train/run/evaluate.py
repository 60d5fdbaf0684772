"""Evaluation passes and `python -m train eval --checkpoint RUN/best.pt`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from crackio import make_loader
from crackio.format.manifest import check_split
from crackio.loading.mixture import check_distinct, pack_names
from crackio.storage.packs import open_pack
from train.evaluation.predict import Prediction, merged, predict
from train.evaluation.report import added_ground_truth, proposal_ap_line, report_text, sampled_negatives
from train.run.checkpoint import load_checkpoint, trained
from train.run.model import model_from_checkpoint
from train.run.runtime import amp_dtype, use_threads
from train.settings.commands import BboxSettings, EvalSettings, SvmSettings
from train.settings.run import RunSettings


def eval_loader(
    cfg: RunSettings, split: str, command: EvalSettings | SvmSettings | BboxSettings, shards: list[str] | None = None
):
    """Every sample of a split once, labelled with the run's IoU threshold, read as the command says (its packs or
    the run's, all of them together unless `shards` picks some; batch size, device, backend, remote settings): for
    eval and the SVM stage."""
    return make_loader(
        shards or list(command.shards or cfg.data.shards),
        split,
        batch_size=command.batch_size,
        train=False,
        iou_threshold=cfg.data.iou_threshold,
        seed=cfg.data.seed,
        device=command.device,
        backend=command.backend,
        remote=command.remote.settings(),
    )


def run_eval(settings: EvalSettings) -> str:
    """`python -m train eval`: a saved model on a split; returns the report (also printed by the CLI)."""
    from train.run.losses import make_loss

    use_threads(settings.threads)
    path, split = Path(settings.checkpoint), settings.split
    ckpt = load_checkpoint(path, torch.device("cpu"))
    model, cfg = model_from_checkpoint(ckpt, path)
    shards = settings.shards or cfg.data.shards
    packs = [open_pack(location, settings.remote.settings(), "--shards") for location in shards]
    check_distinct(packs, "--shards")
    having = [s for s, p in zip(shards, packs) if split in p.manifest["splits"]]
    if len(packs) == 1 or not having:  # none has it: the first pack's refusal names the splits it has
        check_split(packs[0].manifest, shards[0], split, "--split")
    names = dict(zip(shards, cfg.data.pack_names if not settings.shards else pack_names(list(shards))))
    lacking = [names[s] for s in shards if s not in having]
    parts: dict[str, Prediction] = {}
    added: dict[str, np.ndarray | None] = {}
    for location in having:  # each pack's figures, then (several packs) all together
        name = names[location]
        loader = eval_loader(cfg, split, settings, [location])
        model.to(loader.device)
        parts[name] = predict(model, loader, make_loss(cfg.loss, loader.device), amp_dtype(loader.device))
        added[name] = added_ground_truth(loader.indexes, parts[name].names)
    p = merged(list(parts.values()))
    marks = [m for m in added.values() if m is not None]
    every = np.concatenate(marks) if len(marks) == len(added) else None
    sampled = sampled_negatives([pack.manifest for s, pack in zip(shards, packs) if s in having])
    tuned = (
        f"note: {split} is the split the run chose its best epoch on: its figures are optimistic (a held-out split "
        f"gives the unbiased figure)\n"
        if split == cfg.data.val_split and set(shards) & set(cfg.data.shards)
        else ""
    )
    each = [
        report_text(f"{split}[{n}]", q.labels, q.probs, settings.threshold)
        + proposal_ap_line(q.labels, q.probs, added[n], sampled)
        for n, q in parts.items()
    ]
    if lacking:
        tuned += f"note: {', '.join(lacking)} ha{'s' if len(lacking) == 1 else 've'} no {split!r} split: left out\n"
    return (
        f"checkpoint {path} ({trained(ckpt)}, {cfg.model.arch}/{cfg.model.head}), split {split!r}"
        + (f" of {len(having)} packs" if len(having) > 1 else "")
        + f", loss {p.loss:.4f}\n"
        + tuned
        + report_text(split, p.labels, p.probs, settings.threshold)
        + proposal_ap_line(p.labels, p.probs, every, sampled)
        + ("".join("\n" + text for text in each) if len(parts) > 1 else "")
    )
