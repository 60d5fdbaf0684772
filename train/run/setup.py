"""A run built before anything is written: every setting that can be checked is checked here (settings,
shards, resume point, batch size against the split, architecture, weights), then the run folder is made."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from crackio import make_loader
from crackio.errors import ConfigError, CrackioError
from crackio.format.layout import ShardError
from crackio.format.manifest import check_split
from crackio.fsio import make_dir, remove_temporaries
from crackio.loading.loader import Loader
from crackio.loading.mixture import check_distinct
from crackio.loading.samplers import Shuffle
from crackio.storage.packs import open_pack
from crackio.storage.remote import is_remote
from train.run.checkpoint import (
    STEP,
    EpochProgress,
    TrainState,
    mixture_fingerprint,
    new_run_id,
    pack_fingerprint,
    restore,
)
from train.run.logs import Console, RunLogs, tensorboard_writer
from train.run.losses import make_loss
from train.run.model import CrackClassifier, build_model, make_optimizer
from train.run.resume import check_resumed, resume_point, saved_run_id
from train.run.runtime import amp_dtype, init_distributed, pick_device, rank0s, use_threads, world
from train.run.schedule import make_scheduler
from train.settings.data import Data
from train.settings.run import RunSettings

# Every file a run writes (atomically): what a kill -9 mid-write may leave as <name>.XXXXXXXX.tmp.
RUN_FILES = (
    "config.json",
    "best.pt",
    "last.pt",
    STEP,
    "history.json",
    "metrics.jsonl",
    "predictions.npz",
    "report.txt",
    "curves.png",
    "pr_curve.png",
    "summary.json",
    "steps.csv",
    "epochs.csv",
)


@dataclasses.dataclass
class Run:
    """Everything a training run is made of, built and checked by `build_run`."""

    cfg: RunSettings
    out: Path  # the run folder (made by `build_run`, after every check)
    rank: int
    world_size: int
    device: torch.device
    amp: torch.dtype | None  # mixed precision on CUDA (train.run.runtime.amp_dtype)
    proposals: dict | None  # the proposal stage's settings, saved in every checkpoint for detection
    pack: dict  # the pack's fingerprint (a mixture's: its packs'), checked on --resume (checkpoint.check_same_pack)
    run_id: str  # the run's identity, in config.json and every checkpoint (checked on --resume)
    train_loader: Loader
    val_loaders: dict[str, Loader]  # each pack's validation split, by pack name ("" for a run of one pack)
    model: CrackClassifier  # the bare model: what checkpoints save
    net: Callable[[torch.Tensor], torch.Tensor]  # what the loop calls: DDP and torch.compile around `model`
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    state: TrainState  # where the run is: epochs done, best validation loss, history
    scheduler: torch.optim.lr_scheduler.LambdaLR  # the learning rate per step (train.run.schedule)
    console: Console  # progress on rank 0 (train.run.logs)
    logs: RunLogs  # --log's TensorBoard and CSV logs (none on other ranks)
    progress: EpochProgress | None = None  # a run resumed mid-epoch: where that epoch stopped
    saved: int = 0  # epochs last.pt holds: what a stopped run reports
    stopped_at: tuple[int, int] | None = None  # (epoch, samples) step.pt holds, when newer than last.pt


def split_loader(
    cfg: RunSettings,
    split: str,
    train: bool,
    device: torch.device,
    sampler: Shuffle | None = None,
    shards: list[str] | None = None,
) -> Loader:
    """The one place a run's loaders are built: every split shares threshold, seed, device, backend, ranks. The
    sampler is the run's training sampler or validation selection, unless `sampler` is given (the test split:
    every sample). Training reads every pack, mixed by --mix; `shards` picks packs (one pack's validation)."""
    rank, world_size = world()
    return make_loader(
        list(shards or cfg.data.shards),
        split,
        batch_size=cfg.optim.batch_size,
        train=train,
        iou_threshold=cfg.data.iou_threshold,
        seed=cfg.data.seed,
        device=device,
        backend=cfg.data.backend,
        rank=rank,
        world_size=world_size,
        workers=cfg.data.workers or None,
        # On CUDA the loader hands over uint8 images (4x fewer bytes) and the model normalizes them on the GPU.
        output="uint8" if device.type == "cuda" else "float32",
        order=cfg.order.kind,
        **cfg.order.flat(),  # block: its block_size
        sampler=sampler or cfg.sampling.make(train),
        remote=cfg.remote.settings(),
        mix=cfg.data.mix or None if train else None,
    )


def per_pack(cfg: RunSettings) -> dict[str, list[str]]:
    """Each pack's location by its name ("" for a run of one pack: its reports keep their single-pack form)."""
    shards = list(cfg.data.shards)
    return {"": shards} if len(shards) == 1 else {n: [s] for n, s in zip(cfg.data.pack_names, shards)}


def run_folder(cfg: RunSettings) -> Path:
    """The run's folder name (rank 0's timestamp on every rank); refused when it holds another run."""
    name = cfg.checkpoints.out or str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if dist.is_initialized():
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    out = Path(name)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: choose a folder for the run")
    for shards in cfg.data.shards:
        if not is_remote(shards) and out.resolve().is_relative_to(Path(shards).resolve()):
            raise ConfigError(
                f"--out {out} is inside the shards folder {shards}: the run's files would go among the shards; "
                f"choose another --out (e.g. runs/NAME)"
            )
    if not cfg.checkpoints.resume and (out / "last.pt").exists():
        raise ConfigError(
            f"{out} already holds a run (last.pt): continue it with --resume {out}, or choose another --out"
        )
    return out


class RunFinished(CrackioError):
    """--resume of a run with nothing left to train: it reached --epochs or stopped early, and reported."""


def check_unfinished(cfg: RunSettings, state: TrainState, out: Path) -> None:
    """Raises RunFinished, saying how to train more, when `state` (the resumed run's, summary.json written) has
    nothing left to train under `cfg`: every epoch of --epochs done, or early stopping reached."""
    epochs, patience = cfg.optim.epochs, cfg.optim.patience
    if state.epoch >= epochs:
        why = f"it trained all {state.epoch} epochs of --epochs {epochs}"
        more = f"--resume {out} --epochs {state.epoch + max(1, epochs // 2)} (any number above {state.epoch})"
    elif state.bad_epochs >= patience:
        why = f"it stopped early, {state.bad_epochs} epochs without a lower validation loss (--patience {patience})"
        more = f"--resume {out} --patience {state.bad_epochs + patience} (any number above {state.bad_epochs})"
    else:
        return
    raise RunFinished(
        f"{out} is a finished run: {why}, and its reports are written; nothing was trained or written. To train "
        f"more: python -m train {more}"
    )


def checked_pack(cfg: RunSettings) -> tuple[dict | None, dict]:
    """The run's packs read once (the loaders check their splits against them), their train and validation splits
    checked; returns the proposal stage's settings they record and their fingerprint. The proposal settings go
    into every checkpoint, so detection makes crops the way these were made even when the shards have moved or
    been re-made; so does the fingerprint, so --resume refuses other data. A mixture records the first pack's
    proposal settings that has them (a note says so when the packs' differ) and each pack's fingerprint."""
    prints, proposals = [], []
    sources = [open_pack(shards, cfg.remote.settings(), "--shards") for shards in cfg.data.shards]
    check_distinct(sources, "--shards", " (and a larger proportion in --mix to draw more of it)")
    for shards, source in zip(cfg.data.shards, sources):
        manifest = source.manifest
        for option, split in (("--train-split", cfg.data.train_split), ("--val-split", cfg.data.val_split)):
            check_mixture_split(cfg, sources, shards, split, option)
        if cfg.data.test_split != Data.test_split:  # named: a typo must not pass as "the pack has no test split"
            check_mixture_split(cfg, sources, shards, cfg.data.test_split, "--test-split")
        proposals.append(manifest.get("proposals"))
        prints.append(pack_fingerprint(source.sha256, manifest))
    if len(prints) == 1:
        return proposals[0], prints[0]
    made = [p for p in proposals if p is not None]
    if len({json.dumps(p, sort_keys=True) for p in made}) > 1 and world()[0] == 0 and not cfg.logging.quiet:
        first = proposals.index(made[0])
        print(
            f"note: the packs were made with different proposal settings; checkpoints record those of "
            f"{cfg.data.pack_names[first]} for detection (detect --max-proposals etc. change them)"
        )
    return (made[0] if made else None), mixture_fingerprint(prints, cfg.data.pack_names)


def check_mixture_split(cfg: RunSettings, sources: list, shards: str, split: str, option: str) -> None:
    """`check_split` for the run's pack at `shards` (`sources`: every pack of the run, in order); in a mixture, a
    split one pack lacks is said as the packs' disagreement (each pack's splits), since --train-split and
    --val-split name the split of every pack.

    Raises:
        ShardError: one line.
    """
    manifest = sources[cfg.data.shards.index(shards)].manifest
    if len(sources) == 1 or split in manifest["splits"]:
        check_split(manifest, shards, split, option)
        return
    have = "; ".join(f"{n}: {', '.join(s.manifest['splits'])}" for n, s in zip(cfg.data.pack_names, sources))
    raise ShardError(
        f"{option} {split!r} is not a split of every pack ({have}): the packs of a mixture share their split "
        f"names, so each needs a {split}/ split; pack the ones without it again with one (tools/pack.py, "
        f"tools/propose.py), or leave them out"
    )


def start_point(
    cfg: RunSettings, out: Path, device: torch.device, pack: dict, rank: int, run_id: str | None
) -> tuple[Path, dict | None, TrainState, EpochProgress | None]:
    """Where the run starts: (checkpoint path, its contents or None, the state, a stopped epoch's progress);
    `run_id`: the resumed run's identity (its config.json's).

    Raises:
        RunFinished: a resumed run with nothing left to train.
    """
    point = resume_point(cfg, out, device, pack, rank, run_id) if cfg.checkpoints.resume else None
    path, ckpt = point if point else (out / "last.pt", None)
    state = TrainState.from_checkpoint(ckpt, path) if ckpt else TrainState()
    progress = EpochProgress.from_checkpoint(ckpt, path) if ckpt and "progress" in ckpt else None
    if ckpt and progress is None and (out / "summary.json").is_file():
        check_unfinished(cfg, state, out)  # reported too: nothing is left to train or to write
    return path, ckpt, state, progress


def placed_loaders(
    cfg: RunSettings, device: torch.device, state: TrainState, progress: EpochProgress | None, path: Path
) -> tuple[Loader, dict[str, Loader]]:
    """The training loader and each pack's validation loader, training's where the run continues: a stopped
    epoch's next batch (`progress`), else the start of the next epoch."""
    train_loader = split_loader(cfg, cfg.data.train_split, True, device)
    val_loaders = {
        name: split_loader(cfg, cfg.data.val_split, False, device, None, s) for name, s in per_pack(cfg).items()
    }
    if progress:  # mid-epoch: the next batch is the one the stopped run would have trained on next
        try:
            train_loader.load_state_dict(progress.loader)
        except ConfigError as e:
            raise ConfigError(
                f"--resume {cfg.checkpoints.resume}: {path} cannot continue its epoch with these settings ({e}); "
                f"resume with the run's own --order and --block-size until that epoch ends, or from "
                f"{path.parent / 'last.pt'}"
            ) from None
    else:
        train_loader.epoch = state.epoch
    return train_loader, val_loaders


def build_learner(cfg: RunSettings, device: torch.device, steps: int, world_size: int, ckpt: dict | None, path: Path):
    """(model, network as the loop calls it, optimizer, loss scaler, scheduler, autocast dtype) on `device`, restored
    from `ckpt` (read from `path`) when resuming, before DDP and torch.compile wrap the model."""
    model = build_model(cfg.model.arch, cfg.model.weights, cfg.model.head).to(device)
    cuda = device.type == "cuda"
    amp = amp_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)  # fp16 needs loss scaling
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg.optim.optimizer, model.parameters(), cfg.optim.lr, cfg.optim.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.schedule, steps, cfg.optim.epochs)
    if ckpt:
        restore(ckpt, path, model, optimizer, scaler, scheduler)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if world_size > 1 else model
    net: Callable[[torch.Tensor], torch.Tensor] = torch.compile(ddp) if cfg.model.compile else ddp
    return model, net, optimizer, scaler, scheduler, amp


def build_run(cfg: RunSettings) -> Run:
    """Check everything, build loaders, model and optimizer (restored on --resume), then make the run folder
    and save config.json: a start that fails leaves nothing behind.

    Raises:
        CrackioError: bad settings or shards (ConfigError, ShardError, MissingFile), a refused checkpoint or
            weights (CheckpointError, WeightsError), another pack than the resumed run's; one line each.
        RunFinished: --resume of a run with nothing left to train.
    """
    if cfg.checkpoints.resume:  # cfg must be the run's own config (train.run.resume.resume_settings builds it)
        check_resumed(cfg)
    if not cfg.checkpoints.resume and len(cfg.data.shards) > 1 and not cfg.data.pack_name:
        cfg = cfg.replace(pack_name=tuple(cfg.data.pack_names))  # recorded: a pack moved later keeps its name
    use_threads(cfg.runtime.threads)
    init_distributed(cfg.runtime.dist_timeout)
    rank, world_size = world()
    cfg = cfg.for_world(world_size)  # the global batch is the run's; each rank takes its share
    device = pick_device(cfg.runtime.device)
    proposals, pack = checked_pack(cfg)
    out = run_folder(cfg)
    run_id = saved_run_id(cfg.checkpoints.resume) if cfg.checkpoints.resume else None
    path, ckpt, state, progress = start_point(cfg, out, device, pack, rank, run_id)
    run_id = run_id or rank0s(new_run_id())  # a new run, or one stopped before recording an identity
    torch.manual_seed(cfg.data.seed)
    train_loader, val_loaders = placed_loaders(cfg, device, state, progress, path)
    if ckpt and rank == 0 and not cfg.logging.quiet:
        samples = progress.loader["samples"] if progress else 0
        where = (
            (
                f"epoch {state.epoch + 1} after {samples} samples"
                if samples
                else f"the validation of epoch {state.epoch + 1}"
            )
            if progress
            else None
        )
        print(f"resuming {path}: " + (where or f"{state.epoch} epoch(s) done, epoch {state.epoch + 1} next"))
    for loader in (train_loader, *val_loaders.values()):
        len(loader)  # plans the first epoch: a batch size the split cannot fill fails here
    steps = min(len(train_loader), cfg.data.limit_batches or len(train_loader))  # optimizer steps per epoch
    model, net, optimizer, scaler, scheduler, amp = build_learner(cfg, device, steps, world_size, ckpt, path)
    loss_fn = make_loss(cfg.loss, device)
    logs = cfg.logging.logs
    if rank == 0 and "tensorboard" in logs:
        tensorboard_writer()  # installed? Refused before the folder is made
    if rank == 0:  # only now: a refused start leaves no folder, a refused --resume the run as it was
        make_dir(out)
        remove_temporaries(out, RUN_FILES)  # left by a kill -9 or a power cut during a write
        cfg.save(out / "config.json", run_id)
    return Run(
        cfg,
        out,
        rank,
        world_size,
        device,
        amp,
        proposals,
        pack,
        run_id,
        train_loader,
        val_loaders,
        model,
        net,
        optimizer,
        scaler,
        loss_fn,
        state,
        scheduler,
        Console.for_run(cfg.logging.quiet, cfg.logging.log_every, rank),
        RunLogs(logs, out, scheduler.last_epoch, rank),  # a resumed run's logs drop what its checkpoint does not hold
        progress,
        state.epoch,
        (progress.loader["epoch"], progress.loader["samples"]) if progress else None,
    )
