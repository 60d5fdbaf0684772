"""Where a run executes and what it leaves: ranks, mixed precision, checkpoints read as data only, every file a
command writes (atomic, fsynced, a full disk reported as such), stale temporaries, and Ctrl-C / SIGTERM."""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import warnings
from collections.abc import Callable, Iterable
from fnmatch import fnmatch
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.distributed as dist

from crackio.errors import ConfigError, CrackioError, MissingFile, WriteError
from crackio.shards import TEMPORARY, atomic_write
from crackio.workers import Interrupted, stop_on_signals  # noqa: F401 - the trainer's names for them


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA: bf16 where supported (no scaler needed), else fp16; fp32 (None) on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class RankFailure(CrackioError, RuntimeError):
    """Under torchrun, waiting for the other ranks failed: one stopped, hung past --dist-timeout or died."""


# ---- checkpoints: read as data, never as code


class CheckpointError(ConfigError):
    """A file given as a checkpoint or weights that crackio refuses: unreadable, not a checkpoint, or one that
    needs unpickling beyond tensors and plain types (nothing in it is run)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


# What torch.load raises on bytes that are not a torch file: the legacy pickle path fails with KeyError,
# IndexError or struct.error, the zip reader with RuntimeError, an empty file with EOFError.
_NOT_TORCH = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError, struct.error)


def load_data(path: Path, device: torch.device, what: str = "checkpoint"):
    """The objects in a torch file, loaded as data only (`weights_only`: tensors and plain types, never code).

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
    try:
        with warnings.catch_warnings():
            # torch warns about a foreign pickle protocol before refusing it: the refusal below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=device, weights_only=True)
    except OSError as e:
        raise CheckpointError(f"{what} {path} cannot be read ({_reason(e)})") from e
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{path} is not a crackio {what} (not a torch file: {_first_line(e)})") from e
        # torch's message is a page of advice to load it unsafely; keep only what the file asked for
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed| Please|\n\n|$)", str(e), re.S)
        asks = found.group(1).strip() if found else "objects other than tensors and plain types"
        raise CheckpointError(
            f"{path} is refused: a {what} must hold only tensors and plain types, this one needs unpickling "
            f"code ({asks[:120]}); nothing in it was run. Use {use}"
        ) from e
    except _NOT_TORCH as e:
        raise CheckpointError(f"{path} is not a crackio {what} (not a torch file: {_first_line(e)})") from e


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


# ---- files a command writes


def _reason(e: OSError) -> str:
    """ "no space left on device", "permission denied", ...: the OS's words, as a clause."""
    text = e.strerror or str(e) or type(e).__name__
    return text[:1].lower() + text[1:]


def fsync_dir(folder: Path) -> None:
    """fsync a folder so that a rename into it survives a power cut (POSIX; Windows cannot open folders)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes | Callable[[BinaryIO], object]) -> None:
    """`data` (bytes, or a function that writes to the open file) to `path` through the one atomic writer
    (crackio.shards.atomic_write: a unique temporary beside it, fsync, rename), then the folder fsynced.

    Raises:
        WriteError: a full disk, an I/O or permission error, in one line naming `path`; the temporary is
            removed and the previous file, if any, is unchanged.
    """
    atomic_write(path, data)  # raises WriteError naming the path and what is left of the previous file
    try:
        fsync_dir(path.parent)
    except OSError as e:
        raise WriteError(f"{_reason(e)} while syncing the folder of {path}") from e


def make_dir(path: Path) -> Path:
    """mkdir -p, a failure (read-only disk, permissions) as one line.

    Raises:
        WriteError: naming the folder and the OS error.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{_reason(e)} while creating the folder {path}") from e
    return path


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

    write_file(path, save)


def save_npz(path: Path, **arrays) -> None:
    """np.savez (plain arrays, nothing pickled) through write_file (raises WriteError)."""
    write_file(path, lambda f: np.savez(f, allow_pickle=False, **arrays))


def write_text(path: Path, text: str) -> None:
    """A text file through write_file (raises WriteError): for files whose presence means "finished"."""
    write_file(path, text.encode())


def write_json(path: Path, data) -> None:
    """JSON through write_file (raises WriteError)."""
    write_text(path, json.dumps(data, indent=1) + "\n")


def remove_temporaries(folder: Path, names: Iterable[str]) -> list[Path]:
    """Remove what interrupted atomic writes left in `folder` (a kill -9 or a power cut leaves
    `<name>.XXXXXXXX.tmp`), for the given names or patterns ("last.pt", "*.jpg") only; returns them.

    Raises:
        WriteError: a temporary that cannot be removed.
    """
    if not folder.is_dir():
        return []
    patterns = tuple(names)
    removed = []
    for path in sorted(folder.iterdir()):
        found = TEMPORARY.fullmatch(path.name)
        if found and path.is_file() and any(fnmatch(found["target"], p) for p in patterns):
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                raise WriteError(f"{_reason(e)} while removing the stale temporary {path}") from e
            removed.append(path)
    return removed


# ---- Ctrl-C and SIGTERM
