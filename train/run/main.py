"""`main(cfg)`: a training run as setup (train.run.setup), fit (train.run.engine), report."""

from __future__ import annotations

import contextlib
import functools
import signal
from pathlib import Path

import numpy as np
import torch.distributed as dist

from crackio.cli import Interrupted
from crackio.errors import WriteError
from crackio.format.layout import ShardError
from crackio.fsio import save_npz, write_json, write_text
from crackio.loading.samplers import Shuffle, label_source
from crackio.storage.packs import open_pack
from train.evaluation.predict import Prediction, merged, predict
from train.evaluation.report import (
    added_ground_truth,
    class_metrics,
    plot_curves,
    plot_pr,
    proposal_ap,
    proposal_ap_line,
    report_text,
    sampled_negatives,
    threshold_for_recall,
)
from train.run.checkpoint import STEP, load_checkpoint
from train.run.engine import fit, selection_key
from train.run.resume import run_folder_of
from train.run.runtime import RankFailure, world
from train.run.setup import Run, RunFinished, build_run, per_pack, split_loader
from train.settings.run import RunSettings

# gloo reports a peer that went away or timed out only as a RuntimeError's text ("Connection closed by peer",
# "Timed out waiting 600000ms for recv operation"); nccl raises torch.distributed.DistError.
PEER_FAILED = ("timed out", "timeout", "connection closed", "connection reset", "connection refused", "broken pipe")


def kept(out: Path | None, epochs_saved: int, stopped_at: tuple[int, int] | None = None) -> str:
    """What a stopped run leaves, and how to go on: the end of its one-line message. `stopped_at`: the (epoch,
    samples consumed) of step.pt when it is newer than last.pt."""
    if out is None or not (out / "config.json").is_file():
        return "nothing to resume: run the same command again"
    if stopped_at and (out / STEP).is_file():
        epoch, samples = stopped_at
        where = f"epoch {epoch + 1} after {samples} samples" if samples else f"epoch {epoch} before its validation"
        return f"{out / STEP} holds {where}: continue with `python -m train --resume {out / STEP}`"
    if epochs_saved:
        return f"{out / 'last.pt'} holds epoch {epochs_saved}: continue with `python -m train --resume {out}`"
    return f"no epoch finished: `python -m train --resume {out}` starts it again with its saved settings"


def main(cfg: RunSettings) -> Path:
    """Train, validate, checkpoint, report; returns the run folder.

    Raises:
        CrackioError: bad settings or shards (ConfigError, ShardError, MissingFile); a refused checkpoint
            (CheckpointError); on --resume, shards holding another pack than the run's; a file that cannot be
            written (WriteError: full disk, I/O error); a NaN loss (NonFiniteLoss); under torchrun, another
            rank stopped, hung past --dist-timeout or died (RankFailure). One line each.
        Interrupted: SIGINT or SIGTERM (crackio.cli.stop_on_signals); its note says what was kept.
    """
    run: Run | None = None
    try:
        try:
            run = build_run(cfg)
        except RunFinished as e:  # a request to continue what is done: said, not an error
            if world()[0] == 0:
                print(f"note: {e}")
            return run_folder_of(cfg.checkpoints.resume)
        with contextlib.closing(run.logs):
            fit(run)
            final_report(run)
        return run.out
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM through crackio.cli.stop_on_signals
        raise Interrupted(getattr(e, "signum", signal.SIGINT), stopped(run)) from None
    except WriteError as e:
        raise WriteError(f"{e}; {stopped(run)}") from e
    except ShardError as e:  # a data fault mid-run (a remote pack failed, a sample's bytes changed): what was saved
        if run is None:
            raise  # before the run existed: the error's own fix is the whole story
        raise type(e)(f"{e}; {stopped(run)}") from None
    except RuntimeError as e:
        text = str(e).strip()
        if not (
            dist.is_initialized() and (isinstance(e, dist.DistError) or any(p in text.lower() for p in PEER_FAILED))
        ):
            raise  # a bug (or a CrackioError): keeps its traceback or its own line
        first = text.splitlines()[0] if text else type(e).__name__
        why = (first.split("] ", 1)[1] if first.startswith("[") and "] " in first else first)[:200]  # gloo: [file:line]
        raise RankFailure(
            f"rank {dist.get_rank()}: waiting for the other ranks failed ({why}): one of them stopped, hung for "
            f"more than --dist-timeout {cfg.runtime.dist_timeout:g} s or died; {stopped(run)}"
        ) from e


def stopped(run: Run | None) -> str:
    return kept(run.out, run.saved, run.stopped_at) if run is not None else kept(None, 0)


def split_results(run: Run) -> tuple[dict[str, Prediction], dict[str, np.ndarray | None]]:
    """best.pt's predictions on the validation split and (when the pack has one) the test split; a mixture's for
    every pack together under the split's name and for each pack as "split[pack]" (the packs that have it). With
    them, per result, which crops are ground truth added for training (`added_ground_truth`)."""
    cfg = run.cfg
    prints = run.pack.get("packs", [run.pack])  # the packs' splits, as read when the run was built
    results, added = {}, {}
    for split, sampler in ((cfg.data.val_split, None), (cfg.data.test_split, Shuffle())):
        parts = {}
        for (name, shards), fingerprint in zip(per_pack(cfg).items(), prints):
            if split in fingerprint["samples"]:
                loader = (
                    run.val_loaders[name]
                    if sampler is None
                    else split_loader(cfg, split, False, run.device, sampler, shards)
                )
                beat = functools.partial(
                    run.console.beat, f"best.pt on {split}" + (f" [{name}]" if len(prints) > 1 else "")
                )
                parts[name] = predict(run.model, loader, run.loss_fn, run.amp, cfg.data.limit_batches, progress=beat)
                # A validation cut (--val-sampler hard-negatives) is not the split's distribution: nothing to say of it.
                whole = sampler is not None or cfg.sampling.val_sampler == "shuffle"
                added[f"{split}[{name}]"] = added_ground_truth(loader.indexes, parts[name].names) if whole else None
        if parts:
            results[split] = merged(list(parts.values()))
            marks = [m for name in parts if (m := added[f"{split}[{name}]"]) is not None]
            added[split] = np.concatenate(marks) if len(marks) == len(parts) else None
        if len(prints) > 1:
            results |= {f"{split}[{name}]": p for name, p in parts.items()}
    return results, added


def final_report(run: Run) -> None:
    """Reload best.pt; classification reports on validation (and test), PR curves, curves.png; summary.json last."""
    cfg, out, history = run.cfg, run.out, run.state.history
    if dist.is_initialized():
        dist.barrier()  # best.pt is written by rank 0
    if not history:
        return
    run.model.load_state_dict(load_checkpoint(out / "best.pt", run.device)["model"])
    results, added = split_results(run)
    if run.rank != 0:
        return
    key = selection_key(cfg.data.val_pack)
    best = min(history, key=lambda h: h[key])
    chosen_on = f"{cfg.data.val_pack}'s validation loss" if cfg.data.val_pack else "validation loss"
    text = [
        f"best epoch {best['epoch']} ({chosen_on} {best[key]:.4f}); {cfg.model.arch}/{cfg.model.head}, "
        f"loss {cfg.loss.kind}, sampler {cfg.sampling.sampler}; {label_source(cfg.data.iou_threshold)}\n"
    ]
    marks = []
    sampled = sampled_negatives([open_pack(s, cfg.remote.settings()).manifest for s in cfg.data.shards])
    for name, r in results.items():
        text.append(
            report_text(name, r.labels, r.probs) + proposal_ap_line(r.labels, r.probs, added.get(name), sampled)
        )
    summary = {
        "best_epoch": best["epoch"],
        "best_val_loss": best[key],  # the figure that chose it (--val-pack's pack's, or all packs')
        "epochs_run": len(history),
        "labels": label_source(cfg.data.iou_threshold),
        "iou_threshold": cfg.data.iou_threshold,
        "train_seconds": sum(h["train_seconds"] for h in history),  # training and validation passes apart
        "val_seconds": sum(h["val_seconds"] for h in history),
        "images_per_sec": sum(h["images_per_sec"] for h in history) / len(history),
        "splits": {
            name: class_metrics(r.labels, r.probs) | {"proposal_ap": proposal_ap(r.labels, r.probs, added.get(name))}
            for name, r in results.items()
        },
    }
    if cfg.data.val_pack:
        summary |= {"val_pack": cfg.data.val_pack, "best_val_loss_all_packs": best["val_loss"]}
    held_out = cfg.data.test_split if cfg.data.test_split in results else None
    lacking = [p["name"] for p in run.pack.get("packs", []) if cfg.data.test_split not in p["samples"]]
    if held_out and lacking:
        text.append(
            f"{held_out}: of the packs that have it; {', '.join(lacking)} ha{'s' if len(lacking) == 1 else 've'} none\n"
        )
    summary["held_out_split"] = held_out
    if held_out is None:
        text.append(
            f"no {cfg.data.test_split!r} split in {' or '.join(cfg.data.shards)}: every figure above is on "
            f"{cfg.data.val_split}, "
            f"the split the best epoch{' and the threshold were' if cfg.logging.target_recall else ' was'} chosen on "
            f"(optimistic; pack a test split for held-out figures)\n"
        )
    if cfg.data.limit_batches:  # a smoke run: say so wherever its figures go
        summary["limit_batches"] = cfg.data.limit_batches
        text.append(
            f"--limit-batches {cfg.data.limit_batches}: a smoke run, every figure is of the first batches only\n"
        )
    # Labels and probabilities per split, for re-plotting and for `python -m train sweep` (no pickles).
    arrays = {
        f"{name}_{field}": np.asarray(getattr(r, field))
        for name, r in results.items()
        for field in ("labels", "probs", "names")
    }
    save_npz(out / "predictions.npz", **arrays)
    if cfg.logging.target_recall:
        val = results[cfg.data.val_split]
        threshold, recall, precision = threshold_for_recall(val.labels, val.probs, cfg.logging.target_recall)
        summary["target_recall"] = {
            "target": cfg.logging.target_recall,
            "threshold": threshold,
            "recall": recall,
            "precision": precision,
        }
        text.append(
            f"target crack recall {cfg.logging.target_recall:.2f} on {cfg.data.val_split}: threshold {threshold:.4f} "
            f"gives recall {recall:.3f} at precision {precision:.3f}\n"
        )
        for name, r in results.items():
            text.append(report_text(f"{name} at the target-recall threshold", r.labels, r.probs, threshold))
        marks.append((f"threshold {threshold:.3f}", recall, precision))
    write_text(out / "report.txt", "\n".join(text))
    plot_curves(history, out / "curves.png")
    plot_pr({name: (r.labels, r.probs) for name, r in results.items()}, out / "pr_curve.png", marks)
    write_json(out / "summary.json", summary)  # last, atomically: marks the run finished (the sweep relies on it)
    if not cfg.logging.quiet:
        print("\n".join(text))
    print(f"run folder: {out}")
