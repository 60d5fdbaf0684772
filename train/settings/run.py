"""A training run's settings: one owner per concern composed in `RunSettings`, read from and written as the flat
table users know (the flags without `--`, `--config` files, every run's config.json).

Each owner checks its own values when made; `RunSettings.from_flat` is the edge where a flat table becomes owners:
unknown names (with the closest), value types, and options the chosen settings would ignore (given with another
kind chosen: `--focal-gamma` with `--loss bce`) are refused there, once.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from crackio.cli import closest
from crackio.errors import MOST_SECONDS, MOST_THREADS, ConfigError, has_type
from crackio.flags import flag
from crackio.fsio import write_json
from crackio.loading.options import DEVICES
from train.settings.base import Choice, Owner, check_non_negative, check_positive, check_within
from train.settings.data import ORDER, Block, Data, Random, Remote
from train.settings.learning import LOSS, SCHEDULE, Bce, Constant, Focal, Model, Optimisation
from train.settings.sampling import Sampling

LOGS = ("tensorboard", "csv")  # --log's choices


def parse_logs(text: str) -> tuple[str, ...]:
    """--log's value: "" (or none) or a comma list of LOGS (a name given twice counts once).

    Raises:
        ConfigError: an unknown log, with the closest valid name.
    """
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip() not in ("", "none")))
    for name in names:
        if name not in LOGS:
            raise ConfigError(f"--log {name!r} is not a log{closest(name, LOGS)}; choose from {', '.join(LOGS)}")
    return names


def launched_world_size() -> int:
    """The number of ranks torchrun started (WORLD_SIZE), known before the process group is made; 1 without it.

    Raises:
        ConfigError: WORLD_SIZE set to something torchrun never sets.
    """
    text = os.environ.get("WORLD_SIZE", "1")
    size = int(text) if text.strip().isdecimal() else None
    if size is None or not 1 <= size <= MOST_THREADS * 1024:
        raise ConfigError(f"WORLD_SIZE={text!r} must be a number of ranks >= 1 (torchrun sets it): unset it")
    return size


@dataclass(frozen=True)
class Checkpoints(Owner):
    group: ClassVar[str] = "checkpoints"

    out: str = ""  # run folder; "" = runs/<timestamp>
    resume: str = ""  # run folder to continue from its latest checkpoint, or one checkpoint (RUN/last.pt)
    checkpoint_every: int = 1000  # steps between mid-epoch checkpoints (RUN/step.pt); 0 = only when stopped

    def check(self) -> None:
        check_non_negative(self, "checkpoint_every")


@dataclass(frozen=True)
class Logging(Owner):
    group: ClassVar[str] = "logging"

    log: str = ""  # also log to tensorboard (RUN/tensorboard/) and/or csv (RUN/steps.csv, epochs.csv): tensorboard,csv
    log_every: int = 50  # steps between two progress lines when the output is not a terminal (a file, a job log)
    quiet: bool = False  # print the epoch lines only (no progress, no report text)
    target_recall: float = 0.0  # also report the threshold reaching this crack recall on validation; 0 = off

    def check(self) -> None:
        check_positive(self, "log_every")
        check_within(self, "target_recall", 0, 1)
        parse_logs(self.log)

    @property
    def logs(self) -> tuple[str, ...]:
        return parse_logs(self.log)

    @classmethod
    def unmet(cls, values, name: str) -> str | None:
        """--log-every paces the progress lines, which --quiet turns off."""
        return "progress lines (without --quiet)" if name == "log_every" and values.get("quiet") else None


@dataclass(frozen=True)
class Runtime(Owner):
    group: ClassVar[str] = "devices and distributed (torchrun)"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"device": DEVICES}

    device: str = "auto"  # where training runs (auto: CUDA if torch sees one)
    threads: int = 0  # torch CPU threads of training and evaluation; 0 = torch's default (one per core)
    dist_timeout: float = 600.0  # torchrun: seconds a rank waits for the others before the job stops with an error

    def check(self) -> None:
        check_positive(self, "dist_timeout", most=MOST_SECONDS)  # what datetime.timedelta takes
        check_non_negative(self, "threads", most=MOST_THREADS)  # torch.set_num_threads takes a C int


# The concerns of a run, in --help's order: RunSettings' field name -> its owner (a class or a Choice of kinds).
PARTS: dict[str, Any] = {
    "data": Data,
    "order": ORDER,
    "sampling": Sampling,
    "model": Model,
    "optim": Optimisation,
    "schedule": SCHEDULE,
    "loss": LOSS,
    "checkpoints": Checkpoints,
    "remote": Remote,
    "logging": Logging,
    "runtime": Runtime,
}
OWNER = {name: part for part in PARTS.values() for name in part.names()}  # flat option name -> its owner
DEFAULTS: dict[str, Any] = {k: v for part in PARTS.values() for k, v in part.defaults().items()}


@dataclass(frozen=True)
class RunSettings:
    """Everything a training run is told, one owner per concern; made by `from_flat` (or `run_settings`)."""

    data: Data
    order: Random | Block
    sampling: Sampling
    model: Model
    optim: Optimisation
    schedule: Constant
    loss: Bce | Focal
    checkpoints: Checkpoints
    remote: Remote
    logging: Logging
    runtime: Runtime

    def __post_init__(self) -> None:
        warmup = self.schedule.warmup_epochs
        if not warmup <= self.optim.epochs:  # inf and NaN too
            raise ConfigError(
                f"--warmup-epochs {warmup} must be at most --epochs {self.optim.epochs}: the warm-up would not "
                f"end within the run"
            )

    @classmethod
    def from_flat(cls, values: Mapping[str, Any], given: Iterable[str] = (), source: str = "") -> RunSettings:
        """The run of the flat table `values` (missing names take their defaults; a run's config.json's `run_id`,
        its identity and not a setting, is ignored); `given` names the options the user gave, refused when the
        other settings would ignore them.

        Raises:
            ConfigError: an unknown name (with the closest), a value of the wrong type (naming `source`), a value
                no run could use, or a given option that would be ignored (naming the setting it needs).
        """
        check_names(values, source)
        flat = DEFAULTS | {k: v for k, v in values.items() if k != RUN_ID}
        settings = cls(**{name: part.build(flat) for name, part in PARTS.items()})  # values first, each by its owner
        check_applicable(flat, set(given))  # then whether each given option applies
        return settings

    def flat(self) -> dict[str, Any]:
        """The flat table (config.json's): every option, those of kinds not chosen at their defaults."""
        out: dict[str, Any] = {}
        for name, part in PARTS.items():
            value = getattr(self, name)
            out |= part.flat(value) if isinstance(part, Choice) else value.flat()
        return out

    def replace(self, **changes: Any) -> RunSettings:
        """These settings with flat `changes`, checked as given options."""
        return RunSettings.from_flat(self.flat() | changes, changes)

    def for_world(self, world_size: int) -> RunSettings:
        """These settings at `world_size` ranks: global_batch_size set, batch_size = global / ranks.

        Raises:
            ConfigError: a global batch the ranks cannot share equally.
        """
        g = self.optim.global_batch_size or self.optim.batch_size * world_size
        if g % world_size:
            raise ConfigError(
                f"the global batch of {g} cannot be shared equally by {world_size} ranks: run on a number of "
                f"ranks that divides {g}" + (" (it is the resumed run's)" if self.checkpoints.resume else "")
            )
        optim = dataclasses.replace(self.optim, batch_size=g // world_size, global_batch_size=g)
        return dataclasses.replace(self, optim=optim)

    def save(self, path: Path, run_id: str) -> None:
        """A run's config.json, atomically: `run_id` (its identity, in every checkpoint it writes) and the flat
        table (raises WriteError on a full disk or an I/O error)."""
        write_json(path, {RUN_ID: run_id, **self.flat()})


def run_settings(**values: Any) -> RunSettings:
    """A run from flat options as keywords, each counted as given (what the command line makes)."""
    return RunSettings.from_flat(values, values)


RUN_ID = "run_id"  # a run's identity in its config.json (and checkpoints): not a setting, ignored where read


def check_names(values: Mapping[str, Any], source: str) -> None:
    """Every name of `values` is an option and its value has the option's type.

    Raises:
        ConfigError: naming `source`, the key, and the closest option or the type it needs.
    """
    where = source or "settings"
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: a config must be a table of settings, got {type(values).__name__}")
    unknown = sorted(set(values) - set(DEFAULTS) - {RUN_ID})
    if unknown:
        raise ConfigError(f"{where}: unknown config keys {unknown}{closest(unknown[0], list(DEFAULTS))}")
    for key, value in values.items():
        if key != RUN_ID:
            check_type(key, value, where)


def check_type(key: str, value: Any, where: str) -> None:
    """A setting's value must have its option's type (an int is a float; class_weights may be a table,
    iou_threshold None).

    Raises:
        ConfigError: naming `where`, the key and the type it needs.
    """
    default = DEFAULTS[key]
    kind = float if default is None else type(default)
    ok = (
        has_type(value, kind)
        or (kind is tuple and isinstance(value, list | tuple | str))  # its owner checks the values
        or (key == "class_weights" and isinstance(value, dict))
        or (key == "iou_threshold" and value is None)
    )
    if not ok and kind is tuple:
        like = '"shards/", or ["public/", "site/"] for several packs' if key == "shards" else "[0.3, 0.7]"
        raise ConfigError(f"{where}: {key} = {value!r} must be a list (like {like})")
    if not ok:
        raise ConfigError(f"{where}: {key} = {value!r} must be of type {kind.__name__} (like {default!r})")


def unmet(values: Mapping[str, Any], name: str) -> str | None:
    """The setting option `name` needs that the flat `values` lack (e.g. "--loss focal" for --focal-gamma), or
    None when it applies: asked of the option's owner."""
    return OWNER[name].unmet(DEFAULTS | dict(values), name) if name in OWNER else None


def check_applicable(values: Mapping[str, Any], given: Iterable[str]) -> None:
    """Refuse options in `given` (names) that the other settings of `values` would silently ignore.

    Raises:
        ConfigError: naming the option and the setting it needs, e.g. --class-weights with --sampler shuffle.
    """
    ranks = launched_world_size()
    batch, global_batch = values["batch_size"], values["global_batch_size"]
    if "batch_size" in given and global_batch and batch * ranks != global_batch:
        raise ConfigError(
            f"--batch-size {batch} (per rank) x {ranks} rank(s) is not --global-batch-size "
            f"{global_batch}: the run would ignore --batch-size; give one of them"
        )
    for name in sorted(given):
        needs = unmet(values, name)
        if needs:
            raise ConfigError(
                f"{flag(name)} only applies with {needs}; this run would ignore it "
                f"(drop it, or choose the setting it belongs to)"
            )
