"""Small shared builders for the trainer tests."""

from __future__ import annotations

from train.config import Config

ARCH = "shufflenet_v2_x0_5"  # ~10x cheaper than resnet18 on CPU


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
