"""What a run reads: the pack and its splits (`Data`), the training batches' reading order (`Random`, `Block`), and
how a remote pack is fetched (`Remote`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from crackio.errors import MOST_THREADS, ConfigError
from crackio.flags import flag
from crackio.format.layout import SPLITS
from crackio.fsio import is_path_component
from crackio.loading.options import BACKENDS
from crackio.storage.packs import RemoteSettings
from crackio.storage.remote import check_location, is_remote
from train.settings.base import Choice, Kind, Owner, check_non_negative, check_positive, check_within


@dataclass(frozen=True)
class Data(Owner):
    group: ClassVar[str] = "data"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"backend": BACKENDS}

    shards: str = ""  # folder written by tools/pack.py, or its s3:// or http(s):// URL (required)
    train_split: str = SPLITS[0]  # the split trained on (a folder name inside --shards)
    val_split: str = SPLITS[1]  # the split validated on after each epoch (early stopping, best.pt)
    test_split: str = SPLITS[2]  # the split reported at the end, when the pack has it
    iou_threshold: float | None = None  # none: the file names' labels; a number t: label = IoU > t (relabel)
    limit_batches: int = 0  # smoke runs: at most this many batches per epoch and per evaluated split; 0 = all
    backend: str = "auto"  # the loader's decoder (auto: DALI where installed)
    workers: int = 0  # decode threads per rank; 0 = all cores
    seed: int = 0  # seeds sampling, augmentation, initialisation

    def check(self) -> None:
        check_non_negative(self, "seed", "limit_batches")  # at most 2**40: a seed torch and numpy take
        check_non_negative(self, "workers", most=MOST_THREADS)
        if self.iou_threshold is not None:
            check_within(self, "iou_threshold", 0, 1, under=True, note=" or none (the names' labels)")
        for name in ("train_split", "val_split", "test_split"):
            split = getattr(self, name)
            if not is_path_component(split):
                raise ConfigError(
                    f"{flag(name)} {split!r} is not a split name: it names the folder "
                    f"SHARDS/<split>/, so it cannot be empty, '.', '..' or hold '/', '\\' or NUL"
                )
        if not self.shards:
            raise ConfigError("--shards is required (a folder written by tools/pack.py)")
        check_location(self.shards, "--shards")


@dataclass(frozen=True)
class Random(Kind):
    """Any sample any time (page cache or NVMe)."""

    kind: ClassVar[str] = "random"
    group: ClassVar[str] = "data"


@dataclass(frozen=True)
class Block(Kind):
    """Runs of consecutive index rows in a seeded order: sequential reads for data not in memory."""

    kind: ClassVar[str] = "block"
    group: ClassVar[str] = "data"

    block_size: int = 128  # block order: consecutive index rows per block (~1 MB of crops)

    def check(self) -> None:
        check_positive(self, "block_size")


ORDER = Choice(
    "order",
    {c.kind: c for c in (Random, Block)},
    "data",
    "train reading order: random | block (runs of consecutive rows, for data not in memory)",
)


@dataclass(frozen=True)
class Remote(Owner):
    """A remote --shards' cache and fault settings, as given (config.json keeps them as typed); `settings()` is
    what crackio reads them as."""

    group: ClassVar[str] = "remote pack (--shards s3://... or http(s)://...)"

    cache_dir: str = ""  # remote --shards: this node's cache folder; "" = $CRACKIO_CACHE_DIR or ~/.cache/crackio
    cache_limit: str = ""  # remote --shards: bytes the cache may hold (e.g. 20G, LRU); "" = no limit; 0 = stream
    remote_timeout: float = 0.0  # remote --shards: seconds a failing server is retried; 0 = 60 or the env's

    def check(self) -> None:
        self.settings()

    def settings(self) -> RemoteSettings:
        """crackio's RemoteSettings: the environment's defaults ($CRACKIO_CACHE_DIR, ...) for those not given.

        Raises:
            ConfigError: a --cache-limit that is not a size, a negative --remote-timeout.
        """
        names = {"cache_dir": "--cache-dir", "cache_limit": "--cache-limit", "timeout": "--remote-timeout"}
        return RemoteSettings.from_options(self.cache_dir, self.cache_limit, self.remote_timeout, names.__getitem__)

    @classmethod
    def unmet(cls, values, name: str) -> str | None:
        return None if is_remote(values.get("shards")) else "a remote --shards (s3://, http(s)://)"
