"""Where a run executes and what it leaves: ranks, mixed precision, checkpoints, files that mark completion."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from crackio.errors import ConfigError, MissingFile
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
        ConfigError: a file that is not a crackio checkpoint (or needs unpickling beyond tensors): refused.
    """
    if not path.is_file():
        raise MissingFile(f"checkpoint {path} does not exist (a run writes best.pt and last.pt)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{path} is not a crackio checkpoint, or needs more than tensors and plain types to load "
            f"(refused, nothing was run): {first[:200]}"
        ) from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ConfigError(f"{path} is not a crackio checkpoint (no model and config): use RUN/best.pt or RUN/last.pt")
    return ckpt


def atomic_save(obj, path: Path) -> None:
    """torch.save through the one atomic writer: a crash leaves the previous file or the new one."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_npz(path: Path, **arrays) -> None:
    """np.savez (plain arrays, nothing pickled) through the atomic writer."""
    atomic_write(path, lambda f: np.savez(f, allow_pickle=False, **arrays))


def write_text(path: Path, text: str) -> None:
    """A text file written atomically (fsync, rename): for files whose presence means "finished"."""
    atomic_write(path, text.encode())


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=1) + "\n")
