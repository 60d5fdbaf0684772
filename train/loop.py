"""`main(cfg)`: train the crack classifier, validate each epoch, stop early, report."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from crackio import make_loader, read_manifest
from crackio.errors import ConfigError, CrackioError
from crackio.loader import resolve_device
from crackio.samplers import label_source
from train.config import Config, add_config_arguments, check_applicable
from train.evaluate import predict
from train.losses import make_loss
from train.model import build_model, make_optimizer
from train.report import class_metrics, crack_metrics, plot_curves, plot_pr, report_text, threshold_for_recall
from train.resume import check_resumed, check_same_pack, pack_fingerprint, resume_config
from train.runtime import (
    CheckpointError,
    Interrupted,
    RankFailure,
    WriteError,
    amp_dtype,
    atomic_save,
    load_checkpoint,
    make_dir,
    remove_temporaries,
    save_npz,
    world,
    write_json,
    write_text,
)

# Every file a run writes (atomically): what a kill -9 mid-write may leave as <name>.XXXXXXXX.tmp.
RUN_FILES = (
    "config.json",
    "best.pt",
    "last.pt",
    "history.json",
    "metrics.jsonl",
    "predictions.npz",
    "report.txt",
    "curves.png",
    "pr_curve.png",
    "summary.json",
)


@dataclasses.dataclass
class TrainState:
    """What a checkpoint carries besides the weights: where the run is and how it went."""

    epoch: int = 0  # epochs finished
    best_val_loss: float = math.inf
    bad_epochs: int = 0  # epochs since the best validation loss (early stopping)
    history: list[dict] = dataclasses.field(default_factory=list)  # one row per epoch

    @classmethod
    def from_checkpoint(cls, ckpt: dict, path: Path) -> TrainState:
        """The state a checkpoint carries, its types checked (the file is untrusted input).

        Raises:
            CheckpointError: a field missing or of the wrong type, naming the file.
        """
        kinds = {"epoch": int, "best_val_loss": float, "bad_epochs": int, "history": list}
        for name, kind in kinds.items():
            value = ckpt.get(name)
            ok = isinstance(value, kind) and not isinstance(value, bool)
            ok = ok or (kind is float and isinstance(value, int) and not isinstance(value, bool))
            if not ok or (isinstance(value, int) and value < 0):
                raise CheckpointError(
                    f"{path} is not a checkpoint a run can continue from ({name} = {value!r}): "
                    f"it was not written by python -m train"
                )
        if not all(isinstance(row, dict) for row in ckpt["history"]) or len(ckpt["history"]) != ckpt["epoch"]:
            raise CheckpointError(f"{path} holds a history that does not match its epoch {ckpt['epoch']}")
        return cls(**{f.name: ckpt[f.name] for f in dataclasses.fields(cls)})


class NonFiniteLoss(CrackioError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def init_distributed(timeout: float = Config.dist_timeout) -> None:
    """torchrun sets WORLD_SIZE; nccl on GPU, gloo on CPU. No home-made cluster code. Every collective gives
    up after `timeout` seconds (--dist-timeout), so a stopped or hung rank ends the job instead of blocking it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))


# What gloo says when a peer does not answer in time or went away ("Timed out waiting 600000ms for recv
# operation", "Connection closed by peer", ...); other RuntimeErrors under torchrun are bugs and keep their traceback.
_PEER_FAILED = re.compile(r"timed out|timeout|connection (closed|reset|refused)|broken pipe|closed by peer", re.I)


def pick_device(cfg: Config) -> torch.device:
    """The loaders' device rule (crackio.loader.resolve_device), on this rank's GPU under torchrun."""
    device = resolve_device(cfg.device)
    if device.type != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def run_dir(cfg: Config, rank: int) -> Path:
    name = cfg.out or str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if dist.is_initialized():  # every rank must agree on rank 0's timestamp
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    out = Path(name)
    if not cfg.resume and (out / "last.pt").exists():
        raise ConfigError(
            f"{out} already holds a run (last.pt): continue it with --resume {out}, or choose another --out"
        )
    if rank == 0:
        make_dir(out)
        remove_temporaries(out, RUN_FILES)  # left by a kill -9 or a power cut during a write
    return out


def resume_point(cfg: Config, out: Path, device: torch.device, pack: dict, rank: int) -> dict | None:
    """The checkpoint --resume continues from (RUN/last.pt, checked to have trained on this pack), or None
    when the run stopped before its first epoch finished: it then starts from epoch 0 with its saved config.

    Raises:
        CheckpointError: last.pt is not a checkpoint of a run.
        ConfigError: the shards hold another pack than the run trained on.
    """
    path = out / "last.pt"
    if not path.exists():
        if rank == 0:
            print(f"note: {out} has no last.pt (stopped before its first epoch finished): starting at epoch 1")
        return None
    ckpt = load_checkpoint(path, device)
    warning = check_same_pack(ckpt.get("pack"), pack, cfg.resume, cfg.shards, ckpt["config"].get("shards"))
    if warning and rank == 0:
        print(warning, file=sys.stderr)
    TrainState.from_checkpoint(ckpt, path)  # checked now, before anything is built or written
    return ckpt


def kept(out: Path | None, epochs_saved: int) -> str:
    """What a stopped run leaves, and how to go on: the end of its one-line message."""
    if out is None or not (out / "config.json").is_file():
        return "nothing to resume: run the same command again"
    if epochs_saved:
        return f"{out / 'last.pt'} holds epoch {epochs_saved}: continue with `python -m train --resume {out}`"
    return f"no epoch finished: `python -m train --resume {out}` starts it again with its saved settings"


def split_loader(
    cfg: Config, split: str, train: bool, sampler: str, negatives: int, device: torch.device, rank: int, world_size: int
):
    """The one place a run's loaders are built: every split shares threshold, seed, device, backend, ranks."""
    return make_loader(
        cfg.shards,
        split,
        batch_size=cfg.batch_size,
        train=train,
        sampler=sampler,
        iou_threshold=cfg.iou_threshold,
        seed=cfg.seed,
        device=device,
        backend=cfg.backend,
        rank=rank,
        world_size=world_size,
        workers=cfg.workers or None,
        # On CUDA the loader hands over uint8 images (4x fewer bytes) and the model normalizes them on the GPU.
        output="uint8" if device.type == "cuda" else "float32",
        order=cfg.order,
        block_size=cfg.block_size,
        **cfg.sampler_options(sampler, negatives),
    )


def loaders(cfg: Config, device: torch.device, rank: int, world_size: int):
    train = split_loader(cfg, cfg.train_split, True, cfg.sampler, cfg.negatives, device, rank, world_size)
    val = split_loader(cfg, cfg.val_split, False, cfg.val_sampler, cfg.val_negatives, device, rank, world_size)
    return train, val


def train_epoch(model, loader, loss_fn, optimizer, scaler, amp, epoch: int, cfg: Config, show: bool) -> dict:
    model.train()
    device = loader.device
    totals = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, correct: summed on the device
    seen = 0  # samples, counted on the host: no per-step host-to-device copy
    finite = torch.ones((), device=device, dtype=torch.bool)
    wait = 0.0
    steps = len(loader)
    start = tick = time.perf_counter()
    bar = tqdm(loader, total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not show, leave=False)
    for step, batch in enumerate(bar):
        wait += time.perf_counter() - tick  # time blocked on the loader, kept apart from compute
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(batch.images)
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
                raise NonFiniteLoss(f"loss became NaN/inf in epoch {epoch + 1} (step {step})")
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


def cli(argv: list[str]) -> None:
    """`python -m train [options]`: the flags actually given make the config (or extend a resumed run)."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m train",
        description="Train the crack classifier.",
        epilog="Subcommands: python -m train {eval,sweep,svm,detect} --help",
    )
    add_config_arguments(ap)
    given = vars(ap.parse_args(argv))  # only the flags given: their defaults are argparse.SUPPRESS
    if given.get("resume"):
        cfg = resume_config(given.pop("resume"), **given)
        check_applicable(cfg, given)  # e.g. --block-size on a run in random order
    else:
        cfg = Config(**given)
        cfg.validate()  # values first, then whether each option applies
        check_applicable(cfg, given)
    main(cfg)


def main(cfg: Config) -> Path:
    """Train, validate, checkpoint, report; returns the run folder.

    Raises:
        CrackioError: bad settings or shards (ConfigError, ShardError, MissingFile); a refused checkpoint
            (CheckpointError); on --resume, shards holding another pack than the run's; a file that cannot be
            written (WriteError: full disk, I/O error); a NaN loss (NonFiniteLoss); under torchrun, another
            rank stopped, hung past --dist-timeout or died (RankFailure). One line each.
        Interrupted: SIGINT or SIGTERM (train.runtime.stop_on_signals); its note says what was kept.
    """
    cfg.validate()
    if cfg.resume:  # cfg must be the run's own config (train.resume.resume_config builds it)
        check_resumed(cfg)
    init_distributed(cfg.dist_timeout)
    rank, world_size = world()
    device = pick_device(cfg)
    # Read first: fails early, naming the folder. The proposal stage's settings go into every checkpoint, so
    # detection makes crops the way these were made even when the shards have moved or been re-made; so does
    # the pack's fingerprint, so that --resume refuses other data.
    proposals = read_manifest(cfg.shards).get("proposals")
    pack = pack_fingerprint(cfg.shards)
    out, saved = None, 0  # the run folder, the epochs its last.pt holds: what a stopped run reports
    try:
        out = run_dir(cfg, rank)
        ckpt = resume_point(cfg, out, device, pack, rank) if cfg.resume else None
        if rank == 0:  # after the checks: a refused --resume leaves the run's config as it was
            cfg.save(out / "config.json")
        state = TrainState.from_checkpoint(ckpt, out / "last.pt") if ckpt else TrainState()
        saved = state.epoch
        torch.manual_seed(cfg.seed)
        train_loader, val_loader = loaders(cfg, device, rank, world_size)
        model = build_model(cfg.arch, cfg.weights, cfg.head).to(device)
        cuda = device.type == "cuda"
        amp = amp_dtype(device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)  # fp16 needs loss scaling
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if world_size > 1 else model
        net: Callable[[torch.Tensor], torch.Tensor] = torch.compile(ddp) if cfg.compile else ddp
        optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
        loss_fn = make_loss(cfg.loss, cfg.pos_weight, cfg.focal_alpha, cfg.focal_gamma, device)
        if ckpt:
            restore(ckpt, out / "last.pt", model, optimizer, scaler)
        show = rank == 0
        for epoch in range(state.epoch, cfg.epochs):
            if state.bad_epochs >= cfg.patience:
                break
            torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout etc.: a resumed epoch repeats exactly
            train_loader.epoch = epoch
            epoch_start = time.perf_counter()
            row = {
                "epoch": epoch + 1,
                **train_epoch(net, train_loader, loss_fn, optimizer, scaler, amp, epoch, cfg, show),
            }
            val_start = time.perf_counter()
            val = predict(model, val_loader, loss_fn, amp)
            val_loss = val.loss
            if not math.isfinite(val_loss):
                raise NonFiniteLoss(f"validation loss is {val_loss} after epoch {epoch + 1}")
            now = time.perf_counter()
            row |= {
                "val_loss": val_loss,
                "val_accuracy": 100.0 * float(((val.probs >= 0.5) == val.labels).mean()),
                **crack_metrics(val.labels, val.probs),
                "epoch_seconds": now - epoch_start,
                "train_seconds": val_start - epoch_start,
                "val_seconds": now - val_start,
            }
            improved = val_loss < state.best_val_loss
            state.history.append(row)
            state.epoch, state.best_val_loss = epoch + 1, min(val_loss, state.best_val_loss)
            state.bad_epochs = 0 if improved else state.bad_epochs + 1
            if rank == 0:
                save_epoch(out, model, optimizer, scaler, state, proposals, pack, cfg, improved)
                print(
                    f"epoch {epoch + 1}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.1f}% | "
                    f"val loss {val_loss:.4f} acc {row['val_accuracy']:.1f}% crack P/R/F1 "
                    f"{row['crack_precision']:.2f}/{row['crack_recall']:.2f}/{row['crack_f1']:.2f} "
                    f"AP {row['crack_ap']:.3f} | "
                    f"{row['images_per_sec']:.0f} img/s, {100 * row['data_wait_share']:.0f}% waiting for data"
                    + ("" if improved else f" (no improvement {state.bad_epochs}/{cfg.patience})")
                )
            saved = state.epoch
        if state.bad_epochs >= cfg.patience and rank == 0:
            print(f"early stopping: validation loss has not improved for {cfg.patience} epochs")
        final_report(cfg, out, model, val_loader, loss_fn, amp, device, rank, world_size, state.history)
        return out
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM through train.runtime.stop_on_signals
        raise Interrupted(getattr(e, "signum", signal.SIGINT), kept(out, saved)) from None
    except WriteError as e:
        raise WriteError(f"{e}; {kept(out, saved)}") from e
    except RuntimeError as e:
        if isinstance(e, CrackioError) or not (dist.is_initialized() and _PEER_FAILED.search(str(e))):
            raise
        why = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0])[:200]  # gloo prefixes its source file
        raise RankFailure(
            f"rank {rank}: waiting for the other ranks failed ({why}): one of them stopped, hung for more than "
            f"--dist-timeout {cfg.dist_timeout:g} s or died; {kept(out, saved)}"
        ) from e


def restore(ckpt: dict, path: Path, model, optimizer, scaler) -> None:
    """Weights, optimizer and scaler state from a resumed checkpoint.

    Raises:
        CheckpointError: a state that does not fit this run's model or optimizer.
    """
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} does not fit this run's model and optimizer: {first}") from e


def save_epoch(
    out: Path,
    model,
    optimizer,
    scaler,
    state: TrainState,
    proposals: dict | None,
    pack: dict,
    cfg: Config,
    improved: bool,
) -> None:
    ckpt = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "config": dataclasses.asdict(cfg),
        "proposals": proposals,
        "pack": pack,  # what --resume checks the shards against (train.resume.check_same_pack)
        **dataclasses.asdict(state),
    }
    # best.pt before last.pt: whatever fails or is killed in between, last.pt's best_val_loss is never
    # lower than best.pt's, and a resume repeats the epoch (same seed) and rewrites best.pt.
    if improved:
        atomic_save(ckpt, out / "best.pt")
    atomic_save(ckpt, out / "last.pt")
    write_json(out / "history.json", state.history)
    # Rewritten whole from the history last.pt holds (not appended): no half line after a full disk, and no
    # line twice or missing after a resume.
    write_text(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in state.history))


def final_report(cfg, out, model, val_loader, loss_fn, amp, device, rank, world_size, history) -> None:
    """Reload best.pt; classification reports on validation (and test), PR curves, curves.png."""
    if dist.is_initialized():
        dist.barrier()  # best.pt is written by rank 0
    if not history:
        return
    model.load_state_dict(load_checkpoint(out / "best.pt", device)["model"])
    splits = {cfg.val_split: val_loader}
    if cfg.test_split in read_manifest(cfg.shards)["splits"]:
        splits[cfg.test_split] = split_loader(cfg, cfg.test_split, False, "shuffle", 0, device, rank, world_size)
    results = {name: predict(model, loader, loss_fn, amp) for name, loader in splits.items()}
    if rank != 0:
        return
    best = min(history, key=lambda h: h["val_loss"])
    text = [
        f"best epoch {best['epoch']} (validation loss {best['val_loss']:.4f}); {cfg.arch}/{cfg.head}, "
        f"loss {cfg.loss}, sampler {cfg.sampler}; {label_source(cfg.iou_threshold)}\n"
    ]
    marks = []
    for name, r in results.items():
        text.append(report_text(name, r.labels, r.probs))
    summary = {
        "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"],
        "epochs_run": len(history),
        "labels": label_source(cfg.iou_threshold),
        "iou_threshold": cfg.iou_threshold,
        # training passes and validation passes apart (older histories have epoch_seconds only)
        "train_seconds": sum(h.get("train_seconds", h.get("epoch_seconds", 0.0)) for h in history),
        "val_seconds": sum(h.get("val_seconds", 0.0) for h in history),
        "images_per_sec": sum(h["images_per_sec"] for h in history) / len(history),
        "splits": {name: class_metrics(r.labels, r.probs) for name, r in results.items()},
    }
    # Labels and probabilities per split, for re-plotting and for `python -m train sweep` (no pickles).
    arrays = {
        f"{name}_{field}": np.asarray(getattr(r, field))
        for name, r in results.items()
        for field in ("labels", "probs", "names")
    }
    save_npz(out / "predictions.npz", **arrays)
    if cfg.target_recall:
        val = results[cfg.val_split]
        threshold, recall, precision = threshold_for_recall(val.labels, val.probs, cfg.target_recall)
        summary["target_recall"] = {
            "target": cfg.target_recall,
            "threshold": threshold,
            "recall": recall,
            "precision": precision,
        }
        text.append(
            f"target crack recall {cfg.target_recall:.2f} on {cfg.val_split}: threshold {threshold:.4f} "
            f"gives recall {recall:.3f} at precision {precision:.3f}\n"
        )
        for name, r in results.items():
            text.append(report_text(f"{name} at the target-recall threshold", r.labels, r.probs, threshold))
        marks.append((f"threshold {threshold:.3f}", recall, precision))
    write_text(out / "report.txt", "\n".join(text))
    plot_curves(history, out / "curves.png")
    plot_pr({name: (r.labels, r.probs) for name, r in results.items()}, out / "pr_curve.png", marks)
    write_json(out / "summary.json", summary)  # last, atomically: marks the run finished (the sweep relies on it)
    print("\n".join(text))
    print(f"run folder: {out}")
