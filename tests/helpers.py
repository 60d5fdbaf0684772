"""Small shared builders for the trainer tests."""

from __future__ import annotations

from train.settings.config import Config

ARCH = "shufflenet_v2_x0_5"  # ~10x cheaper than resnet18 on CPU
TINY_ARGS = ["--arch", ARCH, "--weights", "none", "--device", "cpu"]  # the CLI's flags for the same


def tiny(shards, out, **kw) -> Config:
    """A CPU run of the tiny architecture from scratch; keywords override."""
    base = dict(
        shards=str(shards),
        out=str(out),
        arch=ARCH,
        weights="none",
        head="linear",
        epochs=2,
        batch_size=16,
        device="cpu",
        backend="auto",
        workers=2,
        lr=1e-3,
    )
    return Config(**{**base, **kw})


def kill_when(cmd: list[str], out, pattern: str, seconds: float = 120) -> bool:
    """Run `cmd`, SIGKILL it as soon as `out` holds a file matching `pattern`; False if it finished first
    (its manifest exists), so the caller can skip."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + seconds
    while not list(out.glob(pattern)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return not (out / "manifest.json").exists()
