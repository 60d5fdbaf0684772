"""Where a run executes and what it leaves: ranks, mixed precision, checkpoints, files that mark completion."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from crackio.errors import MissingFile
from crackio.shards import atomic_write


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA: bf16 where supported (no scaler needed), else fp16; fp32 (None) on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """A checkpoint as data: tensors and plain types only (`weights_only`), never code.

    Raises:
        MissingFile: no such file.
    """
    if not path.is_file():
        raise MissingFile(f"checkpoint {path} does not exist (a run writes best.pt and last.pt)")
    return torch.load(path, map_location=device, weights_only=True)


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, fsync, rename: a crash leaves the previous file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """A text file written atomically (fsync, rename): for files whose presence means "finished"."""
    atomic_write(path, text.encode())


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=1) + "\n")
