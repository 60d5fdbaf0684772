"""Resuming a run: which settings may change, the run's saved config read back as untrusted input, and the
checkpoint it continues from (on the same pack: train.checkpoint.check_same_pack)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from crackio.errors import ConfigError, MissingFile
from train.checkpoint import TrainState, check_same_pack, load_checkpoint
from train.config import Config

# On resume only these may change (to extend a run, move it to other hardware, or follow its shards to another
# folder: main() then checks that folder holds the same pack); every other setting comes from the run's
# config.json, and asking for another value is refused rather than silently ignored.
# How to read and where to run may change between epochs; what is learned from may not.
RESUMABLE = ("epochs", "patience", "device", "backend", "workers", "order", "block_size", "dist_timeout", "shards")


def read_config(run: str | Path) -> Config:
    """The config a run saved (RUN/config.json), checked as untrusted input.

    Raises:
        MissingFile: `run` holds no config.json.
        ConfigError: config.json is unreadable, not JSON, or holds unknown keys or values of the wrong type.
    """
    path = Path(run) / "config.json"
    if Path(run).exists() and not Path(run).is_dir():
        raise ConfigError(f"--resume {run} is a file: give the run's folder (it holds config.json and last.pt)")
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
    return Config.from_dict(data, str(path))


def resume_config(run: str | Path, **changes) -> Config:
    """The config that continues the run in folder `run`, with `changes` (RESUMABLE fields only).

    Raises:
        MissingFile: `run` holds no config.json.
        ConfigError: an unreadable config.json, or a change to a setting a resumed run cannot change (e.g. --lr).
    """
    saved = read_config(run)
    changes.pop("resume", None)
    if changes.get("out") in (str(run), saved.out):
        changes.pop("out")
    refused = [k for k, v in changes.items() if k not in RESUMABLE and v != getattr(saved, k)]
    if refused:
        said = ", ".join(f"--{k.replace('_', '-')} {changes[k]!r} (the run has {getattr(saved, k)!r})" for k in refused)
        raise ConfigError(
            f"--resume {run} continues the run with its own settings and cannot change {said}; "
            f"resumable: {', '.join('--' + k.replace('_', '-') for k in RESUMABLE)} (--shards: the same pack "
            f"in another folder). To train with other settings, start a new run with --out"
        )
    return dataclasses.replace(saved, resume=str(run), out=str(run), **changes)


def check_resumed(cfg: Config) -> None:
    """`cfg` (with resume set) must be its run's config apart from RESUMABLE fields: build it with resume_config."""
    saved = read_config(cfg.resume)
    differ = [
        k
        for k in dataclasses.asdict(cfg)
        if k not in (*RESUMABLE, "resume", "out") and getattr(cfg, k) != getattr(saved, k)
    ]
    if differ:
        raise ConfigError(
            f"resuming {cfg.resume} with settings other than the run's ({', '.join(differ)}): "
            f"build the config with train.resume.resume_config({cfg.resume!r}, epochs=...)"
        )


def resume_point(cfg: Config, out: Path, device: torch.device, pack: dict, rank: int) -> dict | None:
    """The checkpoint --resume continues from (RUN/last.pt, checked to have trained on this pack and to carry a
    run's state), or None when the run stopped before its first epoch finished: it then starts from epoch 0
    with its saved config.

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
    check_same_pack(ckpt.get("pack"), pack, cfg.resume, cfg.shards)
    TrainState.from_checkpoint(ckpt, path)  # checked now, before anything is built or written
    return ckpt
