"""Checkpoints: what a run saves after each epoch and how it is read back (as data only, never code), the
pack a run trained on, and the state a resumed run continues from."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pickle
import uuid
import warnings
import zipfile
from pathlib import Path
from typing import BinaryIO

import torch

from crackio import fsio
from crackio.errors import ConfigError, MissingFile, has_type
from crackio.fsio import write_json, write_text
from train.settings.run import RUN_ID, RunSettings


class CheckpointError(ConfigError):
    """A file given as a checkpoint or weights that crackio refuses: unreadable, not a checkpoint, or one that
    needs unpickling beyond tensors and plain types (nothing in it is run)."""


def load_data(path: Path, device: torch.device, what: str = "checkpoint"):
    """The objects in a torch file, loaded as data only (`weights_only`: tensors and plain types, never code). A
    weights file may be in torch.save's older (pre-1.6, non-zip) format, read by the same data-only unpickler; a
    checkpoint is crackio's, always a zip.

    Raises:
        MissingFile: no such file.
        CheckpointError: the file cannot be read, is no torch file, or would need unpickling beyond tensors
            and plain types (refused before anything in it runs). One line, naming the file.
    """
    use = "RUN/best.pt or RUN/last.pt" if what == "checkpoint" else "a file of torch.save(model.state_dict())"
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder, not a file: use {use}")
    if not path.is_file():
        raise MissingFile(f"{what} {path} does not exist (a run writes RUN/best.pt and RUN/last.pt)")
    if path.suffix.lower() == ".onnx":
        raise CheckpointError(
            f"{path} is an ONNX model, not a {what}: `python -m train detect` takes it as --onnx {path}"
        )
    legacy = not zipfile.is_zipfile(path)  # torch.save's format since 1.6 is a zip
    if legacy and what == "checkpoint":  # crackio writes zips; weights from elsewhere may be older torch.save files
        raise CheckpointError(
            f"{path} is refused: it is not a file of torch.save (a raw pickle or another format is never "
            f"unpickled); nothing in it was run. Use {use}"
        )
    if legacy:  # the older format is a pickle stream (protocol 2: it starts with PROTO, 0x80); text is not one
        with open(path, "rb") as f:
            if f.read(1) != b"\x80":
                raise CheckpointError(
                    f"{path} is not a file of torch.save (zip or the older format) and was not read: use {use}"
                )
    try:
        with warnings.catch_warnings():
            # torch warns about a foreign pickle protocol before refusing it: the refusal below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=device, weights_only=True)
    except OSError as e:
        raise CheckpointError(f"{what} {path} cannot be read ({e.strerror or e})") from e
    except pickle.UnpicklingError as e:  # the weights-only unpickler met something that is not data
        if legacy and ("invalid load key" in str(e) or "magic number" in str(e).lower()):
            raise CheckpointError(
                f"{path} is refused: it is not a file of torch.save (zip or the older format); nothing in it was "
                f"run. Use {use}"
            ) from e
        raise CheckpointError(
            f"{path} is refused: a {what} must hold only tensors and plain types, this one needs unpickling "
            f"other objects; nothing in it was run. Use {use}"
        ) from e
    except (RuntimeError, EOFError, ValueError, KeyError) as e:  # a damaged archive
        if legacy:
            raise CheckpointError(
                f"{path} is not a file of torch.save (zip or the older format) and was not read: use {use}"
            ) from e
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{path} is not a crackio {what} (a damaged torch file: {first})") from e


def is_state_dict(obj) -> bool:
    """A mapping of parameter names to tensors (what `Module.state_dict()` returns)."""
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """A crackio checkpoint as data: a dict with the model's state dict and its run's config.

    Raises:
        MissingFile: no such file.
        CheckpointError: not a crackio checkpoint, or needs unpickling beyond tensors: refused in one line.
    """
    ckpt = load_data(path, device)
    if not (isinstance(ckpt, dict) and is_state_dict(ckpt.get("model")) and isinstance(ckpt.get("config"), dict)):
        raise CheckpointError(
            f"{path} is not a crackio checkpoint (no model weights and config in it): use RUN/best.pt or RUN/last.pt"
        )
    return ckpt


class _KeepOSError:
    """A file for torch.save that keeps the OSError of a failed write: torch's zip writer reports one as
    `RuntimeError: [enforce fail at inline_container.cc] ... unexpected pos`, hiding "no space left on device"."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_save(obj, path: Path) -> None:
    """torch.save through write_file: a crash, a kill or a full disk leaves the previous file or the new one.

    Raises:
        WriteError: see write_file.
    """

    def save(f: BinaryIO) -> None:
        out = _KeepOSError(f)
        try:
            torch.save(obj, out)  # type: ignore[arg-type]  # a file-like object: torch calls write and flush
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None

    fsio.atomic_write(path, save)


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
            if not has_type(value, kind) or (isinstance(value, int) and value < 0):
                raise CheckpointError(
                    f"{path} is not a checkpoint a run can continue from ({name} = {value!r}): "
                    f"it was not written by python -m train"
                )
        if not all(isinstance(row, dict) for row in ckpt["history"]) or len(ckpt["history"]) != ckpt["epoch"]:
            raise CheckpointError(f"{path} holds a history that does not match its epoch {ckpt['epoch']}")
        return cls(**{f.name: ckpt[f.name] for f in dataclasses.fields(cls)})


def restore(ckpt: dict, path: Path, model, optimizer, scaler, scheduler) -> None:
    """Weights, optimizer, scaler and learning-rate schedule state from a resumed checkpoint (the scheduler made
    before the optimizer's state is loaded: train.run.schedule.make_scheduler).

    Raises:
        CheckpointError: a state that does not fit this run's model or optimizer.
    """
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if "scheduler" in ckpt:  # a run from before schedules trained at a constant rate: nothing to restore
            scheduler.load_state_dict(ckpt["scheduler"])
        # The next step's rate under this run's settings (an extended --epochs stretches a cosine from here on;
        # unchanged settings give the saved rate bit for bit: the same product LambdaLR computes).
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} does not fit this run's model and optimizer: {first}") from e


def checkpoint(
    model,
    optimizer,
    scaler,
    scheduler,
    state: TrainState,
    proposals: dict | None,
    pack: dict,
    cfg: RunSettings,
    run_id: str,
) -> dict:
    """What every checkpoint holds: weights, optimizer, scaler and schedule state (the steps taken), the run's
    config and identity (`run_id`, its config.json's: what --resume checks the checkpoint against), the proposal
    settings detection needs, the pack's fingerprint (what --resume checks the shards against) and the run's
    state."""
    unwrapped = getattr(model, "module", model)  # under DDP, the classifier it wraps
    return {
        RUN_ID: run_id,
        "model": model.state_dict(),
        # the input normalization the backbone expects (the model applies it; recorded for whoever reads the file)
        "normalization": unwrapped.normalization(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "scheduler": scheduler.state_dict(),
        "config": cfg.flat(),
        "proposals": proposals,
        "pack": pack,
        **dataclasses.asdict(state),
    }


def save_epoch(out: Path, ckpt: dict, history: list[dict], improved: bool) -> None:
    """After a validated epoch: best.pt (when `improved`), last.pt, history.json, metrics.jsonl; then step.pt,
    older now, is removed."""
    # best.pt before last.pt: whatever fails or is killed in between, last.pt's best_val_loss is never
    # lower than best.pt's, and a resume repeats the epoch (same seed) and rewrites best.pt.
    if improved:
        atomic_save(ckpt, out / "best.pt")
    atomic_save(ckpt, out / "last.pt")
    write_json(out / "history.json", history)
    # Rewritten whole from the history last.pt holds (not appended): no half line after a full disk, and no
    # line twice or missing after a resume.
    write_text(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
    # A step.pt left by a failed unlink is older than last.pt: train.run.resume.resume_point then takes last.pt.
    (out / STEP).unlink(missing_ok=True)


STEP = "step.pt"  # the latest mid-epoch checkpoint of a run


@dataclasses.dataclass
class EpochProgress:
    """Where a run stopped within an epoch: what step.pt holds besides a checkpoint's fields. Restored, the
    epoch goes on as if it had never stopped (train.run.engine.train_epoch)."""

    loader: dict  # the train loader's state_dict(): epoch, global samples consumed, global batch size, ...
    sums: list[float]  # [loss sum, correct predictions] over all ranks so far (float64, exact)
    seen: int  # samples trained on so far, all ranks
    wait: float  # seconds spent waiting for data so far (rank 0)
    seconds: float  # seconds of training so far (rank 0)
    rng: torch.Tensor  # torch's CPU generator state (uint8)
    cuda_rng: list[torch.Tensor] | None = None  # the CUDA generators' states, on a GPU run
    digest: int = 0  # which samples each step so far trained on, all ranks (train.run.engine.step_digest)
    gpu: float = 0.0  # seconds the device spent in training steps so far (rank 0; CUDA only)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, path: Path) -> EpochProgress:
        """The progress step.pt carries, its types checked (the file is untrusted input).

        Raises:
            CheckpointError: a field missing or of the wrong type, naming the file.
        """
        progress = ckpt.get("progress")
        if not isinstance(progress, dict):
            progress = {}
        kinds = {
            "loader": dict,
            "sums": list,
            "seen": int,
            "wait": float,
            "seconds": float,
            "rng": torch.Tensor,
            "digest": int,
            "gpu": float,
        }
        bad = [k for k, kind in kinds.items() if not isinstance(progress.get(k), kind)]
        sums = progress.get("sums")
        if isinstance(sums, list) and not (len(sums) == 2 and all(isinstance(x, float) for x in sums)):
            bad.append("sums")
        cuda_rng = progress.get("cuda_rng")
        if not (
            cuda_rng is None or (isinstance(cuda_rng, list) and all(isinstance(t, torch.Tensor) for t in cuda_rng))
        ):
            bad.append("cuda_rng")
        if bad:
            raise CheckpointError(
                f"{path} is not a mid-epoch checkpoint a run can continue from ({', '.join(bad)} missing or "
                f"mistyped): it was not written by python -m train; resume from RUN/last.pt"
            )
        p = progress
        return cls(
            p["loader"],
            p["sums"],
            p["seen"],
            p["wait"],
            p["seconds"],
            p["rng"],
            p.get("cuda_rng"),
            p["digest"],
            p["gpu"],
        )


def trained(ckpt: dict) -> str:
    """How far the checkpoint's weights trained, for reports: "epoch 3", or "epoch 3 after 4096 samples" for a
    mid-epoch checkpoint (step.pt)."""
    progress = ckpt.get("progress")
    loader = progress.get("loader") if isinstance(progress, dict) else None
    if isinstance(loader, dict) and isinstance(loader.get("epoch"), int) and isinstance(loader.get("samples"), int):
        if loader["samples"]:
            return f"epoch {loader['epoch'] + 1} after {loader['samples']} samples"
    return f"epoch {ckpt.get('epoch', '?')}"


def save_step(out: Path, ckpt: dict, progress: EpochProgress) -> None:
    """A mid-epoch checkpoint, atomically: step.pt, the weights and state after the last whole step."""
    atomic_save({**ckpt, "progress": dataclasses.asdict(progress)}, out / STEP)


def pack_fingerprint(sha256: str, manifest: dict) -> dict:
    """What identifies a pack: `sha256`, its manifest.json's (the same input and seed give a byte-identical
    manifest, which records every file's SHA-256; it moves with the folder and is the same for a remote copy:
    crackio.storage.packs.Pack), and for people the fields that say what changed: format version, seed, source,
    samples and each split's index SHA-256 (its samples' checksums, labels and IoUs), from `manifest` as
    `read_manifest` validated it.
    """
    return {
        "manifest_sha256": sha256,
        "format_version": manifest["format_version"],
        "seed": manifest.get("seed"),
        "source": manifest.get("source"),
        "samples": {split: info["samples"] for split, info in manifest["splits"].items()},
        "contents": {split: info["index_sha256"] for split, info in manifest["splits"].items()},
        "appended": len(manifest.get("appended") or []),  # times photos (or crops) were appended (--append)
    }


def mixture_fingerprint(prints: list[dict], names: list[str]) -> dict:
    """A mixture's fingerprint: each pack's (`pack_fingerprint`) with its name, in --shards' order, and the
    samples per split over all packs (what the run's reports count)."""
    samples: dict[str, int] = {}
    for fingerprint in prints:
        for split, n in fingerprint["samples"].items():
            samples[split] = samples.get(split, 0) + n
    return {"packs": [p | {"name": name} for p, name in zip(prints, names)], "samples": samples}


def new_run_id() -> str:
    """A new run's identity: 32 random hex digits (uuid4), in its config.json and every checkpoint it writes."""
    return uuid.uuid4().hex


def check_same_run(ckpt: dict, run_id: str | None, path: Path, run: str, settings: dict) -> None:
    """Refuse to continue, in the run `run` (identity `run_id`, from its config.json; `settings`: its flat
    settings), a checkpoint `ckpt` read from `path` that another run wrote: it would go on under this run's
    settings as if it had trained under them.

    Raises:
        ConfigError: naming the checkpoint, the settings it was trained with that differ, and how to start from
            its weights instead.
    """
    recorded = ckpt.get(RUN_ID)
    if isinstance(recorded, str) and recorded == run_id:
        return
    config = ckpt.get("config")
    theirs: dict = config if isinstance(config, dict) else {}
    differ = [f"{k} {theirs[k]!r} there, {v!r} here" for k, v in settings.items() if k in theirs and theirs[k] != v]
    what = f"run {recorded[:8]}" if isinstance(recorded, str) else "a run that recorded no identity"
    mine = f"run {run_id[:8]}" if run_id else "a run that recorded no identity"
    raise ConfigError(
        f"--resume {run}: {path} was written by another run ({what}"
        + (f", trained with {'; '.join(differ[:4])}" if differ else "")
        + f") than {Path(run) if Path(run).is_dir() else Path(run).parent}'s ({mine}), so it is not continued "
        f"under this run's settings. To start from its weights instead: python -m train --weights {path} --out "
        f"NEW_RUN (with the settings you want)"
    )


def check_same_pack(recorded, current: dict, run: str, shards: tuple[str, ...]) -> None:
    """Refuse to resume `run` on packs other than the ones its checkpoint recorded (`current`: a pack's or a
    mixture's fingerprint, of the packs `shards` names).

    Raises:
        ConfigError: what changed (the number of packs; for a pack, samples per split, seed, source, format
            version, or the manifest itself).
    """
    if not isinstance(recorded, dict) or not isinstance(recorded.get("samples"), dict):
        raise ConfigError(f"{run}/last.pt records its pack in an unknown form: start a new run with --out")
    packs = recorded.get("packs")
    then: list = packs if isinstance(packs, list) else [recorded]
    now: list = current.get("packs", [current])
    if len(then) != len(now):
        raise ConfigError(
            f"--resume {run}: the run trained on {len(then)} pack(s) and --shards names {len(now)}: resume with "
            f"--shards naming the packs it trained on, in their order, or start a new run with --out"
        )
    order = [p.get("manifest_sha256") if isinstance(p, dict) else None for p in then]
    if order != [p["manifest_sha256"] for p in now] and sorted(map(str, order)) == sorted(
        p["manifest_sha256"] for p in now
    ):
        names = [str(p.get("name", i + 1)) for i, p in enumerate(then)]
        raise ConfigError(
            f"--resume {run}: --shards gives the run's packs in another order: give them in the run's, "
            f"{', '.join(names)}"
        )
    for p, (was, pack, location) in enumerate(zip(then, now, shards)):
        if not isinstance(was, dict) or not isinstance(was.get("samples"), dict):
            raise ConfigError(f"{run}/last.pt records its packs in an unknown form: start a new run with --out")
        which = location if len(now) == 1 else f"{location} (pack {p + 1} of {len(now)})"
        _check_one_pack(was, pack, run, which)


def _check_one_pack(recorded: dict, current: dict, run: str, shards: str) -> None:
    """check_same_pack for one pack: `recorded` and `current` are `pack_fingerprint`s."""
    if recorded.get("manifest_sha256") == current["manifest_sha256"]:
        return
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
    if current.get("appended", 0) > recorded.get("appended", 0):
        changed.append("more was added to it with --append since")
    recorded_contents = recorded.get("contents")
    contents: dict = recorded_contents if isinstance(recorded_contents, dict) else {}
    differ = [
        s
        for s in sorted(current["contents"])
        if s in then and then[s] == now[s] and contents.get(s) != current["contents"][s]
    ]
    if differ:
        changed.append(f"the samples of split(s) {', '.join(differ)} differ (same counts; other bytes, labels or IoUs)")
    what = "; ".join(changed) or "its manifest.json differs (the same samples in every split)"
    raise ConfigError(
        f"--resume {run}: {shards} holds another pack than the run trained on ({what}): its validation losses "
        f"would not compare with the run's. Resume with --shards naming the pack it trained on, or start a "
        f"new run with --out"
    )


def file_sha256(path: Path):
    """A file's SHA-256 (a hashlib object, read in blocks by hashlib.file_digest): what the SVM stage and an ONNX
    export record of their checkpoint, and detection checks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256")
