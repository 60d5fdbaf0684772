"""Where a run executes: ranks (torchrun), the device of this rank, mixed precision."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from crackio.errors import CrackioError
from crackio.loading.loader import resolve_device
from train.settings.run import launched_world_size


class RankFailure(CrackioError, RuntimeError):
    """Under torchrun, waiting for the other ranks failed: one stopped, hung past --dist-timeout or died."""


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def init_distributed(timeout: float) -> None:
    """torchrun sets WORLD_SIZE; nccl on GPU, gloo on CPU. No home-made cluster code. Every collective gives
    up after `timeout` seconds (--dist-timeout), so a stopped or hung rank ends the job instead of blocking it."""
    if launched_world_size() > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))


def rank0s(text: str) -> str:
    """Rank 0's `text` on every rank (a value drawn at random, such as a new run's identity); `text` itself outside
    torchrun."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)  # a str between this job's own ranks
    return box[0]


def pick_device(device: str) -> torch.device:
    """The loaders' device rule (crackio.loading.loader.resolve_device), on this rank's GPU under torchrun."""
    resolved = resolve_device(device, "--device")
    if resolved.type != "cuda":
        return resolved
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA: bf16 where supported (no scaler needed), else fp16; fp32 (None) on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def use_threads(threads: int) -> None:
    """torch's intra-op CPU threads (`--threads`; 0 keeps torch's default, one per core). On a machine other jobs
    share, fewer threads than cores can be much faster: docs/performance.md, "CPU threads".

    Raises:
        ConfigError: a negative count.
    """
    from crackio.errors import ConfigError

    if threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0 = torch's default), got {threads}")
    if threads:
        torch.set_num_threads(threads)
