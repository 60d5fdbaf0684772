"""Resuming a run: which settings may change, the run's saved config read back as untrusted input, and the
checkpoint it continues from (on the same pack: train.run.checkpoint.check_same_pack)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from crackio.errors import ConfigError, MissingFile
from train.run.checkpoint import (
    STEP,
    EpochProgress,
    TrainState,
    check_same_pack,
    check_same_run,
    load_checkpoint,
)
from train.settings.run import RUN_ID, RunSettings, launched_world_size

# On resume only these may change (to extend a run, move it to other hardware, or follow its shards to another
# folder: main() then checks that folder holds the same pack); every other setting comes from the run's
# config.json, and asking for another value is refused rather than silently ignored.
# How to read and where to run may change between epochs; what is learned from may not.
# --batch-size is per rank: on resume it follows the run's global batch at the new number of ranks.
RESUMABLE = (
    "epochs",
    "patience",
    "device",
    "backend",
    "workers",
    "threads",
    "order",
    "block_size",
    "dist_timeout",
    "shards",
    "batch_size",
    "checkpoint_every",
    "log",
    "log_every",
    "quiet",
    "cache_dir",
    "cache_limit",
    "remote_timeout",
)


def run_folder_of(resume: str | Path) -> Path:
    """The run folder `--resume` names: the folder itself, or the folder of a checkpoint file in it."""
    path = Path(resume)
    return path.parent if path.is_file() else path


def read_config(run: str | Path) -> RunSettings:
    """The config a run saved (RUN/config.json), checked as untrusted input.

    Raises:
        MissingFile: `run` holds no config.json.
        ConfigError: config.json is unreadable, not JSON, or holds unknown keys or values of the wrong type.
    """
    path, data = _saved(run)
    return RunSettings.from_flat(data, source=str(path))  # type: ignore[arg-type]  # checked there: JSON of any shape


def saved_run_id(run: str | Path) -> str | None:
    """The identity the run in folder `run` recorded in its config.json (train.run.checkpoint.new_run_id); None
    when it recorded none (or not as 32 hex digits).

    Raises:
        MissingFile, ConfigError: as `read_config`.
    """
    data = _saved(run)[1]
    value = data.get(RUN_ID) if isinstance(data, dict) else None
    return value if isinstance(value, str) and len(value) == 32 and value.isalnum() else None


def _saved(run: str | Path) -> tuple[Path, object]:
    """RUN/config.json's path and its table, as JSON gave it."""
    path = run_folder_of(run) / "config.json"
    named = Path(run)
    if named.suffix == ".pt" and not named.exists() and (named.parent / "config.json").is_file():
        there = sorted(p.name for p in named.parent.glob("*.pt")) or ["no checkpoint"]
        raise MissingFile(
            f"--resume {run}: no such checkpoint; {named.parent} holds {', '.join(there)}: name one of them, or "
            f"give --resume {named.parent} for the latest"
        )
    if not path.is_file():
        raise MissingFile(
            f"--resume {run}: no config.json there (is it a run folder? A run killed before writing it "
            f"trained nothing: start it again with its original command)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise ConfigError(
            f"{path} is unreadable ({e}): python -m train writes it at the start of a run; start a new run with --out"
        ) from e
    return path, data


def resume_settings(run: str | Path, **changes) -> RunSettings:
    """The settings that continue the run in folder `run`, with `changes` (RESUMABLE fields only).

    Raises:
        MissingFile: `run` holds no config.json.
        ConfigError: an unreadable config.json, or a change to a setting a resumed run cannot change (e.g. --lr).
    """
    saved = read_config(run)
    folder = run_folder_of(run)
    changes.pop("resume", None)
    if changes.get("out") in (str(run), str(folder), saved.checkpoints.out):
        changes.pop("out")
    flat = saved.flat()
    if "batch_size" in changes:  # per rank: it must give the run's global batch at this number of ranks
        ranks = launched_world_size()
        if changes["batch_size"] * ranks != saved.optim.global_batch_size:
            raise ConfigError(
                f"--resume {run} keeps the run's global batch of {saved.optim.global_batch_size} samples per step: "
                f"--batch-size {changes['batch_size']} x {ranks} rank(s) would make it "
                f"{changes['batch_size'] * ranks}; drop --batch-size (each rank then takes the global batch / "
                f"ranks) or run on a number of ranks that gives {saved.optim.global_batch_size}"
            )
    if "shards" in changes:
        given = (changes["shards"],) if isinstance(changes["shards"], str) else tuple(changes["shards"] or ())
        if len(given) != len(saved.data.shards):
            raise ConfigError(
                f"--resume {run}: the run trained on {len(saved.data.shards)} pack(s) "
                f"({', '.join(saved.data.pack_names)}) and --shards names {len(given)}: give --shards once for each "
                f"of its packs, in the run's order (another folder or URL of the same pack is fine)"
            )
    refused = [k for k, v in changes.items() if k not in RESUMABLE and v != flat.get(k)]
    if refused:
        said = ", ".join(f"--{k.replace('_', '-')} {shown(changes[k])} (the run has {shown(flat[k])})" for k in refused)
        raise ConfigError(
            f"--resume {run} continues the run with its own settings and cannot change {said}; "
            f"resumable: {', '.join('--' + k.replace('_', '-') for k in RESUMABLE)} (--shards: the same pack "
            f"in another folder). To train with other settings, start a new run with --out"
        )
    return RunSettings.from_flat(flat | changes | {"resume": str(run), "out": str(folder)}, changes)


def shown(value) -> str:
    """A setting's value as the command line writes it (a tuple of numbers: 0.3,0.7)."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else repr(value)


def check_resumed(cfg: RunSettings) -> None:
    """`cfg` (with resume set) must be its run's settings apart from RESUMABLE ones: build it with resume_settings."""
    saved, given = read_config(cfg.checkpoints.resume).flat(), cfg.flat()
    differ = [k for k in given if k not in (*RESUMABLE, "resume", "out") and given[k] != saved.get(k)]
    if differ:
        raise ConfigError(
            f"resuming {cfg.checkpoints.resume} with settings other than the run's ({', '.join(differ)}): "
            f"build the config with train.run.resume.resume_settings({cfg.checkpoints.resume!r}, epochs=...)"
        )


def resume_point(
    cfg: RunSettings, out: Path, device: torch.device, pack: dict, rank: int, run_id: str | None
) -> tuple[Path, dict] | None:
    """The checkpoint --resume continues from and its path: the file --resume names, or the run's latest (step.pt,
    the last mid-epoch checkpoint, unless last.pt has finished more epochs), checked to be this run's (`run_id`,
    its config.json's; a refusal names the settings a resume could not change that differ), to have trained on
    this pack and to carry a run's state; None when the run stopped before writing either: it then starts from
    epoch 0 with its saved config.

    Raises:
        MissingFile: the checkpoint --resume names does not exist.
        CheckpointError: the checkpoint is not a run's.
        ConfigError: the checkpoint is another run's; the shards hold another pack than the run trained on.
    """
    named = Path(cfg.checkpoints.resume)
    if named.suffix == ".pt" or named.is_file():
        candidates = [named]
    else:
        candidates = [p for p in (out / STEP, out / "last.pt") if p.exists()]
    if not candidates:
        if rank == 0:
            print(f"note: {out} has no checkpoint (stopped before its first one): starting at epoch 1")
        return None
    found = []
    for path in candidates:
        ckpt = load_checkpoint(path, device)
        learned = {k: v for k, v in cfg.flat().items() if k not in (*RESUMABLE, "resume", "out")}
        check_same_run(ckpt, run_id, path, cfg.checkpoints.resume, learned)
        check_same_pack(ckpt.get("pack"), pack, cfg.checkpoints.resume, cfg.data.shards)
        state = TrainState.from_checkpoint(ckpt, path)  # checked now, before anything is built or written
        if "progress" in ckpt or path.name == STEP:
            EpochProgress.from_checkpoint(ckpt, path)
        found.append((state.epoch, "progress" in ckpt, path, ckpt))
    # The most epochs finished wins; at equal epochs, the mid-epoch checkpoint is further along.
    epochs, _, path, ckpt = max(found, key=lambda f: f[:2])
    return path, ckpt
