"""What a run reads: the pack and its splits (`Data`), the training batches' reading order (`Random`, `Block`), and
how a remote pack is fetched (`Remote`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from crackio.cli import closest
from crackio.errors import MOST_THREADS, ConfigError
from crackio.flags import flag
from crackio.format.layout import SPLITS
from crackio.fsio import is_path_component
from crackio.loading.mixture import check_mix, pack_names
from crackio.loading.options import BACKENDS
from crackio.storage.packs import RemoteSettings
from crackio.storage.remote import check_location, is_remote
from train.settings.base import Choice, Kind, Owner, check_non_negative, check_positive, check_within


@dataclass(frozen=True)
class Data(Owner):
    group: ClassVar[str] = "data"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"backend": BACKENDS}

    shards: tuple[str, ...] = ()  # pack folder, or URL: s3://, gs://, az://, http(s):// (required; once per pack)
    mix: tuple[float, ...] = ()  # several --shards: each pack's share of an epoch, e.g. 0.3,0.7 (default: its size)
    pack_name: tuple[
        str, ...
    ] = ()  # several --shards: each pack's name in reports, once per pack (default: its folder's)
    val_pack: str = ""  # several --shards: the pack whose validation loss picks the best epoch (default: all together)
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
        shards = (self.shards,) if isinstance(self.shards, str) else tuple(self.shards or ())  # a str: one pack
        if not shards or shards == ("",):
            raise ConfigError("--shards is required (a folder written by tools/pack.py)")
        for location in shards:
            if not isinstance(location, str):
                raise ConfigError(f"--shards must name packs (folders or URLs), got {location!r}")
            check_location(location, "--shards")
        object.__setattr__(self, "shards", shards)
        given: object = self.mix
        if isinstance(given, str):  # a config file's "0.3,0.7", as on the command line
            try:
                given = tuple(float(p) for p in given.split(","))
            except ValueError:
                raise ConfigError(f"--mix must be comma-separated numbers, e.g. 0.3,0.7, got {self.mix!r}") from None
        if len(shards) == 1 and given:
            raise ConfigError("--mix only applies with two or more --shards (a mixture): give each pack with --shards")
        mix = () if isinstance(given, list | tuple) and not given else check_mix(given, len(shards), "--mix")
        object.__setattr__(self, "mix", mix or ())  # a tuple, however given (a JSON list, a flag)
        named = (self.pack_name,) if isinstance(self.pack_name, str) else tuple(self.pack_name or ())
        if named and (len(named) != len(shards) or len(set(named)) != len(named)):
            raise ConfigError(
                f"--pack-name gives {len(named)} name(s) for {len(shards)} pack(s): give each pack a different "
                f"name, once per --shards and in their order, got {list(named)}"
            )
        for name in named:
            if not isinstance(name, str) or not name.strip() or any(c in name for c in "[]\n"):
                raise ConfigError(f"--pack-name {name!r} is not a name: give a word such as site_a (no [ or ])")
        object.__setattr__(self, "pack_name", named)
        names = self.pack_names
        if self.val_pack and self.val_pack not in names:
            alike = [n for n in names if n.rsplit("/", 1)[-1].split("#")[0] == self.val_pack]
            raise ConfigError(
                f"--val-pack {self.val_pack!r} names {len(alike)} packs: give one of {', '.join(alike)}"
                if len(alike) > 1
                else f"--val-pack {self.val_pack!r} is not one of the packs: give one of {', '.join(names)}"
                + closest(self.val_pack, names)
            )

    @property
    def pack_names(self) -> list[str]:
        """The packs' names in reports, in --shards' order: --pack-name's, else each folder's
        (crackio.loading.mixture.pack_names; a run records them when it starts, so a moved pack keeps its name)."""
        return list(self.pack_name) or pack_names(list(self.shards))

    @classmethod
    def unmet(cls, values, name: str) -> str | None:
        shards = values.get("shards")
        several = isinstance(shards, list | tuple) and len(shards) > 1
        return None if name not in ("mix", "val_pack", "pack_name") or several else "two or more --shards (a mixture)"


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

    group: ClassVar[str] = "remote pack (--shards s3://, gs://, az://, http(s)://)"

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
        shards = values.get("shards")
        locations = [shards] if isinstance(shards, str) else list(shards or ())
        return None if any(is_remote(s) for s in locations) else "a remote --shards (s3://, gs://, az://, http(s)://)"
