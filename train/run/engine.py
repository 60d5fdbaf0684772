"""The training loop: one epoch (`train_epoch`, whose signature is what it needs) and the epochs of a run
(`fit`: validation, checkpoints, early stopping)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import time
import zlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from crackio.cli import Interrupted, deferred_signals
from crackio.errors import CrackioError
from crackio.format.layout import ShardError
from crackio.loading.loader import Batch, Loader
from crackio.loading.stages import SLOW_WAIT
from crackio.storage.remote import STATS
from train.evaluation.predict import Prediction, merged, predict
from train.evaluation.report import crack_metrics
from train.run.checkpoint import EpochProgress, checkpoint, save_epoch, save_step
from train.run.logs import Console
from train.run.setup import Run


class NonFiniteLoss(CrackioError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class EpochTotals:
    """An epoch's running sums, kept so that an epoch stopped and resumed reports what an uninterrupted one would.

    `sums` ([loss sum, correct], float64 on the device), `seen` and `digest` are this rank's since it started the
    epoch, on rank 0 plus what a resumed checkpoint carried for all ranks (`base_seen`); `wait` and `seconds` are
    rank 0's clock, resumed ones included. `digest` fingerprints which samples each step trained on (`step_digest`).
    """

    sums: torch.Tensor
    seen: int = 0
    base_seen: int = 0
    wait: float = 0.0
    seconds: float = 0.0
    digest: int = 0
    gpu: float = 0.0  # seconds the device spent in training steps (CUDA events around each step; 0 on CPU)

    @classmethod
    def start(cls, device: torch.device, progress: EpochProgress | None, rank: int) -> EpochTotals:
        """A new epoch's totals, or (`progress`) a stopped epoch's, carried by rank 0 alone."""
        if progress is None or rank != 0:
            seen = progress.seen if progress else 0
            return cls(torch.zeros(2, device=device, dtype=torch.float64), base_seen=seen)
        sums = torch.tensor(progress.sums, device=device, dtype=torch.float64)
        return cls(sums, 0, progress.seen, progress.wait, progress.seconds, progress.digest, progress.gpu)

    def gathered(self) -> EpochTotals:
        """These totals over all ranks, on every rank (a collective under torchrun: every rank calls)."""
        sums, world, digest = self.sums.clone(), 1, self.digest
        if dist.is_initialized():
            dist.all_reduce(sums)
            world = dist.get_world_size()
            digests = torch.tensor([digest], device=sums.device, dtype=torch.int64)
            dist.all_reduce(digests)
            digest = int(digests.item()) % DIGEST_MOD
        # Train batches are full and equal in number on every rank.
        return EpochTotals(sums, 0, self.base_seen + self.seen * world, self.wait, self.seconds, digest, self.gpu)

    def progress(self, loader: Loader) -> EpochProgress:
        """What step.pt saves, from gathered totals."""
        cuda = loader.device.type == "cuda"
        return EpochProgress(
            loader.state_dict(),
            self.sums.tolist(),
            self.base_seen + self.seen,
            self.wait,
            self.seconds,
            torch.get_rng_state(),
            [torch.cuda.get_rng_state(d) for d in range(torch.cuda.device_count())] if cuda else None,
            self.digest,
            self.gpu,
        )

    def row(self) -> dict:
        """The epoch's training figures, from gathered totals."""
        loss_sum, correct = self.sums.tolist()
        seen = self.base_seen + self.seen
        return {
            "train_loss": loss_sum / seen,
            "train_accuracy": 100.0 * correct / seen,
            "train_samples": seen,
            "train_digest": f"{self.digest:014x}",
            "images_per_sec": seen / self.seconds,
            "data_wait_share": self.wait / self.seconds,
        } | ({"gpu_busy_share": self.gpu / self.seconds} if self.gpu else {})


@dataclasses.dataclass(frozen=True)
class Learner:
    """What one optimizer step uses: the network as the loop calls it (DDP, torch.compile), the loss, the
    optimizer, its loss scaler (fp16) and learning-rate schedule, and the autocast dtype (None: full precision)."""

    net: Callable[[torch.Tensor], torch.Tensor]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: torch.optim.lr_scheduler.LRScheduler
    amp: torch.dtype | None

    def step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step on `batch`; returns its logits, loss and the learning rate it was taken at (the
        scheduler then steps)."""
        with torch.autocast(batch.images.device.type, dtype=self.amp, enabled=self.amp is not None):
            logits = self.net(batch.images)
        loss = self.loss_fn(logits, batch.labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        rate = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return logits, loss, rate


class DeviceTimer:
    """On CUDA, events around each step measure the device's busy time without a host sync (read where the loop
    syncs anyway): with the host's wait for data, what the stall figures are made of. On the CPU: nothing."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start(self) -> None:
        if self.cuda:
            self.events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.events[-1][0].record()

    def stop(self) -> None:
        if self.events:
            self.events[-1][1].record()

    def collect(self) -> float:
        """Seconds of the steps timed since the last collect (the device must be idle: call where the loop syncs)."""
        seconds = sum(a.elapsed_time(b) for a, b in self.events) / 1000
        self.events.clear()
        return seconds


class StepRows:
    """The steps not logged yet, handed to `log` as rows (train.run.logs.STEP_FIELDS) with one host sync for all
    of them: the step counted over the run, its loss, rate, img/s over all ranks and data-wait share."""

    def __init__(self, log: Callable[[list[dict]], None], epoch: int, ranks: int):
        self.log, self.epoch, self.ranks = log, epoch, ranks
        self.pending: list[tuple[int, float, float, float, int, torch.Tensor]] = []  # (step, lr, s, wait, n, loss)

    def add(self, step: int, lr: float, seconds: float, wait: float, n: int, loss: torch.Tensor) -> None:
        self.pending.append((step, lr, seconds, wait, n, loss))

    def flush(self) -> None:
        if self.pending:
            losses = torch.stack([p[5] for p in self.pending]).float().tolist()
            self.log(
                [
                    {
                        "step": g,
                        "epoch": self.epoch + 1,
                        "train_loss": value,
                        "lr": lr,
                        "images_per_sec": n * self.ranks / secs,
                        "data_wait_share": wait / secs,
                    }  # fmt: skip
                    for (g, lr, secs, wait, n, _), value in zip(self.pending, losses)
                ]
            )
            self.pending.clear()


@dataclasses.dataclass(frozen=True)
class Saver:
    """Mid-epoch checkpoints: `checkpoint(totals)` (on every rank) after every `every` steps (0: never), and when a
    stop is asked for."""

    checkpoint: Callable[[EpochTotals], None]
    every: int

    def due(self, step: int, steps: int) -> bool:
        """After step `step` (0-based) of `steps`: not after the last, which the epoch's own checkpoint saves."""
        return bool(self.every) and (step + 1) % self.every == 0 and step < steps - 1


def train_epoch(
    learner: Learner,
    loader: Loader,
    totals: EpochTotals,
    saver: Saver,
    limit: int,
    console: Console,
    log: Callable[[list[dict]], None],
    desc: str,
) -> None:
    """One pass over `loader`'s next epoch (its first `limit` steps when > 0), from the step it is at (mid-epoch
    after a resume), adding to `totals`.

    `saver` checkpoints on its cadence and when SIGINT or SIGTERM arrives (deferred to the end of a whole step; then
    Interrupted is raised). Under torchrun the ranks agree on the stop at every 10th step, where the loss is also
    checked, `console` shows progress and `log` receives the rows of the steps since the last sync (StepRows).

    Raises:
        NonFiniteLoss: the loss became NaN or infinite (checked every 10 steps: no per-step host sync).
        Interrupted: SIGINT or SIGTERM, after the checkpoint.
    """
    device = loader.device
    finite = torch.ones((), device=device, dtype=torch.bool)
    first = loader.step
    steps = min(len(loader), limit) if limit else len(loader)
    ranks = dist.get_world_size() if dist.is_initialized() else 1
    start = tick = time.perf_counter()
    base = Shown(start, totals.seconds, totals.wait, totals.seen, ranks)
    timer, rows = DeviceTimer(device), StepRows(log, loader.epoch, ranks)
    with deferred_signals() as stop, contextlib.closing(iter(loader)) as batches:  # a stop waits for a whole step
        saving = _saving_on_data_error(batches, rows.flush, saver.checkpoint, totals, ranks)
        shown = console.wrap(itertools.islice(saving, max(steps - first, 0)), steps, first, desc)
        for step, batch in enumerate(shown, first):
            waited = time.perf_counter() - tick
            totals.wait += waited  # time blocked on the loader, kept apart from compute
            timer.start()
            logits, loss, rate = learner.step(batch)
            timer.stop()
            n = len(batch.labels)
            totals.seen += n
            totals.digest = (totals.digest + step_digest(step, batch.names)) % DIGEST_MOD
            finite &= torch.isfinite(loss.detach())
            totals.sums += torch.stack(
                [loss.detach().double() * n, ((logits.detach() >= 0) == (batch.labels > 0.5)).sum()]
            )
            totals.seconds = base.seconds + time.perf_counter() - start
            rows.add(learner.scheduler.last_epoch - 1, rate, time.perf_counter() - tick, waited, n, loss.detach())
            # The steps where every rank agrees on a stop: the same on every rank, so never rank 0's console
            # schedule (--log-every), which only rank 0 has (the ranks would wait in different collectives).
            synced = step % 10 == 0 or step == steps - 1
            if synced or console.due(step):  # a host sync every 10 steps (and at a progress line), not every step
                if synced and not bool(finite):
                    raise NonFiniteLoss(f"loss became NaN/inf ({desc}, step {step + 1})")  # counted as shown
                totals.gpu += timer.collect()  # the device is idle here: all done
                rows.flush()
                console.show(step, base.figures(totals))
            signum = stop.signum
            if ranks > 1:  # every rank must stop at the same step: agreed where the ranks sync anyway
                signum = _agreed(signum, device) if synced else 0
            if signum or saver.due(step, steps):
                rows.flush()  # the logs hold every step the checkpoint holds
                saver.checkpoint(totals)
            if signum:
                stop.signum = 0  # acted on: raised here, with the checkpoint saved
                raise Interrupted(signum)
            tick = time.perf_counter()
        console.close()


@dataclasses.dataclass(frozen=True)
class Shown:
    """Where the pass started (its clock, and the totals a resumed epoch carried): the progress line's figures are
    of this pass, its loss and accuracy of the whole epoch (rank 0's, with what a resumed checkpoint carried)."""

    start: float
    seconds: float
    wait: float
    seen: int
    ranks: int

    def figures(self, totals: EpochTotals) -> dict[str, str]:
        loss_sum, correct = totals.sums.tolist()
        seen = max(totals.base_seen + totals.seen, 1)
        elapsed = time.perf_counter() - self.start
        return {
            "loss": f"{loss_sum / seen:.4f}",
            "acc": f"{100 * correct / seen:.1f}%",
            "img_s": f"{(totals.seen - self.seen) * self.ranks / elapsed:.0f}",
            "wait": f"{100 * (totals.wait - self.wait) / elapsed:.0f}%",
        }


def _saving_on_data_error(
    batches: Iterator[Batch],
    flush: Callable[[], None],
    checkpoint: Callable[[EpochTotals], None],
    totals: EpochTotals,
    ranks: int,
) -> Iterator[Batch]:
    """`batches`, but a data fault (a ShardError: a remote pack's server gone past --remote-timeout, access
    revoked, an object changed, or a sample whose bytes fail their checksum, local or remote, whichever backend
    reads it) first saves the whole steps done as step.pt (one rank; under torchrun the ranks cannot agree on a
    step with one of them stuck, so the last periodic step.pt stays), then raises."""
    try:
        yield from batches
    except ShardError:
        if ranks == 1:
            flush()
            checkpoint(totals)
        raise


def remote_line(before: dict[str, int]) -> str:
    """This process's requests to a remote pack since `before` (crackio.storage.remote.STATS), for the epoch
    line; "" for a local pack."""
    now = STATS.snapshot()
    requests, fetched, retries = (now[k] - before[k] for k in ("requests", "bytes", "retries"))
    return f" | remote: {requests} requests, {fetched / 1e6:.1f} MB, {retries} retried" if requests else ""


DIGEST_MOD = 1 << 56  # the sum of 128 ranks' digests still fits an int64


def step_digest(step: int, names: list[str]) -> int:
    """A fingerprint of the samples of step `step` (0-based) of an epoch: summed over steps and ranks, it is the
    same for every way the ranks share a global batch, and differs when a step trains on other samples (the
    history's `train_digest`; elastic resume keeps it). CRC-32 of each name: ~10 us a batch."""
    return (step + 1) * sum(zlib.crc32(name.encode()) for name in names)


def _agreed(signum: int, device: torch.device) -> int:
    """The signal any rank received (0: none), on every rank."""
    flag = torch.tensor([signum], device=device, dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def fit(run: Run) -> None:
    """Train `run` from its state to `cfg.optim.epochs` or early stopping; after each epoch, validate, update
    `run.state` and (rank 0) save the checkpoints, history and metrics. A run resumed mid-epoch (`run.progress`)
    finishes that epoch first, from the step it stopped at.

    Raises:
        Interrupted: SIGINT or SIGTERM; step.pt then holds the last whole step (or the whole training pass when
            it came during validation).
    """
    cfg, state = run.cfg, run.state
    traffic = {"requests": 0, "bytes": 0, "retries": 0}  # the first epoch's line counts the start's requests too
    for epoch in range(state.epoch, cfg.optim.epochs):
        if state.bad_epochs >= cfg.optim.patience:
            break
        progress = begin_epoch(run, epoch)
        totals = EpochTotals.start(run.device, progress, run.rank)
        trained = run.train_loader.epoch == epoch  # not when a stop came after the training pass, during validation
        if trained:
            train_epoch(
                Learner(run.net, run.loss_fn, run.optimizer, run.scaler, run.scheduler, run.amp),
                run.train_loader,
                totals,
                Saver(functools.partial(save_progress, run), cfg.checkpoints.checkpoint_every),
                cfg.data.limit_batches,
                run.console,
                run.logs.steps,
                f"epoch {epoch + 1}/{cfg.optim.epochs}",
            )
        done = totals.gathered()
        row, val = validate(run, epoch, done)
        if trained:  # where this rank's loader spent its time (crackio.loading.stages): which stage starves a wait
            row |= run.train_loader.stage_stats.row()
        if len(run.val_loaders) > 1:  # a mixture: what each pack gave to the epoch (all ranks, the steps trained)
            steps = min(len(run.train_loader), cfg.data.limit_batches or len(run.train_loader))
            drawn = run.train_loader.drawn(epoch, steps)
            row |= {f"{name}/train_samples": n for name, n in zip(run.val_loaders, drawn)}
        chosen = row[selection_key(cfg.data.val_pack)]
        improved = chosen < state.best_val_loss
        state.history.append(row)
        state.epoch, state.best_val_loss = epoch + 1, min(chosen, state.best_val_loss)
        state.bad_epochs = 0 if improved else state.bad_epochs + 1
        if run.rank == 0:
            save_epoch(run.out, checkpoint_of(run), state.history, improved)
            line = epoch_line(row, state.bad_epochs, cfg.optim.patience, improved)
            print(line + mixture_line(run, epoch, row) + remote_line(traffic))
            traffic = STATS.snapshot()
            run.logs.epoch(run.scheduler.last_epoch - 1, state.history, val.labels, val.probs, val.mistakes)
        run.saved, run.stopped_at = state.epoch, None
    if state.bad_epochs >= cfg.optim.patience and run.rank == 0:
        print(f"early stopping: validation loss has not improved for {cfg.optim.patience} epochs")


def begin_epoch(run: Run, epoch: int) -> EpochProgress | None:
    """Seed epoch `epoch` (or restore a stopped one's random state) and put the model in training mode; returns
    the stopped epoch's progress, taken from the run (None for a new epoch)."""
    progress, run.progress = run.progress, None
    if progress is None:
        torch.manual_seed(run.cfg.data.seed * 1000 + epoch)  # dropout etc.: a resumed epoch repeats exactly
        run.train_loader.epoch = epoch
    else:  # the loader was put where the epoch stopped (train.run.setup.build_run)
        torch.set_rng_state(progress.rng)
        if progress.cuda_rng is not None and run.device.type == "cuda":
            for d, rng in enumerate(progress.cuda_rng[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(rng, d)
    run.model.train()
    return progress


def validate(run: Run, epoch: int, done: EpochTotals) -> tuple[dict, Prediction]:
    """The validation pass after the training pass `done` (gathered totals): the epoch's history row and the
    predictions.

    Raises:
        KeyboardInterrupt, ShardError: a stop or a data fault during validation, after step.pt saved the whole
            training pass.
        NonFiniteLoss: a NaN or infinite validation loss.
    """
    start = time.perf_counter()
    many = len(run.val_loaders) > 1
    try:
        packs = {
            name: predict(
                run.model,
                loader,
                run.loss_fn,
                run.amp,
                run.cfg.data.limit_batches,
                mistakes=run.logs.wants_mistakes,
                progress=functools.partial(run.console.beat, f"epoch {epoch + 1} validation{f' [{name}]' * many}"),
            )
            for name, loader in run.val_loaders.items()
        }
    except (KeyboardInterrupt, ShardError):  # keep the training pass: step.pt with the loader at the epoch's end
        progress = done.progress(run.train_loader)  # gathered already: no collective on a stopping rank
        if run.rank == 0:
            save_step(run.out, checkpoint_of(run), progress)
        run.stopped_at = (progress.loader["epoch"], progress.loader["samples"])
        raise
    val = merged(list(packs.values()))
    if not math.isfinite(val.loss):
        raise NonFiniteLoss(f"validation loss is {val.loss} after epoch {epoch + 1}")
    now = time.perf_counter()
    row = {"epoch": epoch + 1} | done.row()
    row |= {
        "val_loss": val.loss,
        "val_accuracy": 100.0 * float(((val.probs >= 0.5) == val.labels).mean()),
        **crack_metrics(val.labels, val.probs),
        "epoch_seconds": done.seconds + now - start,
        "train_seconds": done.seconds,
        "val_seconds": now - start,
        "lr": last_rate(run.scheduler),
    }
    if len(packs) > 1:  # each pack's own figures beside the combined ones
        for name, p in packs.items():
            row |= {f"{name}/val_loss": p.loss} | {
                f"{name}/{k}": v for k, v in crack_metrics(p.labels, p.probs).items()
            }
    return row, val


def selection_key(val_pack: str) -> str:
    """The history's key whose minimum picks the best epoch: the validation loss of every pack together, or of
    the pack --val-pack names."""
    return f"{val_pack}/val_loss" if val_pack else "val_loss"


def mixture_line(run: Run, epoch: int, row: dict) -> str:
    """A mixture's part of the epoch line: each pack's samples trained on (how its share was made when it is
    not its own epoch: a subset, or repeats) and its validation AP; "" for one pack."""
    if len(run.val_loaders) <= 1:
        return ""
    shares = run.train_loader.shares(epoch)
    parts = []
    for name, share in zip(run.val_loaders, shares):
        trained = row[f"{name}/train_samples"]
        drawn = share.describe() if trained == share.share else f"{trained} (of its share {share.describe()})"
        parts.append(f"{name} {drawn}, val AP {row[f'{name}/crack_ap']:.3f}")
    return " | packs: " + "; ".join(parts)


def slow_stage(row: dict) -> str:
    """The epoch line's note on a run that waits for data more than SLOW_WAIT of its time: the loader's slowest
    stage and its thread time per image ("" otherwise)."""
    stage = row.get("slowest_stage")
    if row["data_wait_share"] <= SLOW_WAIT or stage is None:
        return ""
    ms = row[f"stage_{stage}_ms"]
    if stage == "pipeline":  # DALI's stages in one pipeline: timed as the consumer's wait (crackio.loading.stages)
        return (
            f" (slowest loader stage: DALI's pipeline (decode, augmentation, normalization), {ms:.2f} ms per image "
            "of waiting for it)"
        )
    return f" (slowest loader stage: {stage}, {ms:.2f} ms per image)"


def epoch_line(row: dict, bad_epochs: int, patience: int, improved: bool) -> str:
    """The console's line for an epoch's history row."""
    return (
        f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.1f}% | "
        f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.1f}% crack P/R/F1 "
        f"{row['crack_precision']:.2f}/{row['crack_recall']:.2f}/{row['crack_f1']:.2f} "
        f"AP {row['crack_ap']:.3f} | "
        f"{row['images_per_sec']:.0f} img/s, {100 * row['data_wait_share']:.0f}% waiting for data"
        + slow_stage(row)
        + ("" if improved else f" (no improvement {bad_epochs}/{patience})")
    )


def last_rate(scheduler: torch.optim.lr_scheduler.LambdaLR) -> float:
    """The learning rate of the last step taken (the optimizer's holds the next one's)."""
    return float(scheduler.base_lrs[0] * scheduler.lr_lambdas[0](max(scheduler.last_epoch - 1, 0)))


def save_progress(run: Run, totals: EpochTotals) -> None:
    """step.pt: the run after its last whole step (a collective under torchrun: every rank calls)."""
    progress = totals.gathered().progress(run.train_loader)
    if run.rank == 0:
        save_step(run.out, checkpoint_of(run), progress)
    run.stopped_at = (progress.loader["epoch"], progress.loader["samples"])


def checkpoint_of(run: Run) -> dict:
    """The run's checkpoint as it stands (train.run.checkpoint.checkpoint)."""
    return checkpoint(
        run.model, run.optimizer, run.scaler, run.scheduler, run.state, run.proposals, run.pack, run.cfg, run.run_id
    )
