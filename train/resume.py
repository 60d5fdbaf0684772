"""Resuming a run: which settings may change, the run's saved config read back as untrusted input, and the
fingerprint of the pack a run trains on (a resumed run must see the same data)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from crackio.errors import ConfigError, MissingFile
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


def pack_fingerprint(shards: str | Path) -> dict:
    """What identifies the pack in `shards`: the SHA-256 of its manifest.json (the same input and seed give a
    byte-identical manifest, and it moves with the folder), and for people the fields that say what changed:
    format version, seed, source and samples per split (read defensively: other format versions may lack them).

    Raises:
        ConfigError: manifest.json cannot be read.
    """
    path = Path(shards) / "manifest.json"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path} cannot be read ({e}): is {shards} a folder written by tools/pack.py?") from e
    try:
        manifest = json.loads(data)
    except ValueError:
        manifest = {}
    manifest = manifest if isinstance(manifest, dict) else {}
    splits = manifest.get("splits")
    splits = splits if isinstance(splits, dict) else {}
    plain = lambda v: v if isinstance(v, bool | int | float | str) or v is None else repr(v)[:100]
    return {
        "manifest_sha256": hashlib.sha256(data).hexdigest(),
        "format_version": plain(manifest.get("format_version")),
        "seed": plain(manifest.get("seed")),
        "source": plain(manifest.get("source")),
        "samples": {str(k): plain(v.get("samples")) for k, v in splits.items() if isinstance(v, dict)},
    }


def check_same_pack(recorded, current: dict, run: str, shards: str, trained_on) -> str:
    """Refuse to resume `run` on a pack other than the one its checkpoint recorded; returns a warning (or "")
    for a run of an older crackio that recorded none.

    Old runs: resuming on the folder they trained on goes on, with the warning that the pack cannot be
    checked (what they did before); another folder is refused, since nothing says it holds the same pack.

    Raises:
        ConfigError: what changed (samples per split, seed, source, format version, or the manifest itself).
    """
    if recorded is None:
        if shards == trained_on:
            return (
                f"warning: {run} was saved by an older crackio that did not record its pack: resuming on "
                f"{shards} without checking it is the same pack (checked from the next checkpoint on)"
            )
        raise ConfigError(
            f"--resume {run} --shards {shards}: the run was saved by an older crackio that did not record "
            f"its pack, so {shards} cannot be checked against {trained_on}: resume on {trained_on}, or start "
            f"a new run with --out"
        )
    if not isinstance(recorded, dict) or not isinstance(recorded.get("samples", {}), dict):
        raise ConfigError(f"{run}/last.pt records its pack in an unknown form: start a new run with --out")
    if recorded.get("manifest_sha256") == current["manifest_sha256"]:
        return ""
    changed = []
    then, now = recorded.get("samples", {}), current["samples"]
    if then != now:
        per_split = [
            f"{split} {then.get(split, 'none')} then, {now.get(split, 'none')} now"
            for split in sorted(set(then) | set(now), key=str)
            if then.get(split) != now.get(split)
        ]
        changed.append(f"samples per split: {', '.join(per_split)}")
    for key in ("seed", "source", "format_version"):
        if recorded.get(key) != current[key]:
            changed.append(f"{key} {recorded.get(key)!r} then, {current[key]!r} now")
    what = "; ".join(changed) or "its manifest.json differs (same samples per split, seed and source)"
    raise ConfigError(
        f"--resume {run}: {shards} holds another pack than the run trained on ({what}): its validation losses "
        f"would not compare with the run's. Resume with --shards naming the pack it trained on, or start a "
        f"new run with --out"
    )
