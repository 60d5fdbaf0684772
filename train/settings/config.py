"""One flat config: every field with its default and a `#` comment; the CLI is derived from it."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path

from crackio.cli import check_limits, closest, typed
from crackio.errors import ConfigError
from crackio.format.layout import SPLITS
from crackio.fsio import is_path_component, write_json
from crackio.loading.options import BACKENDS, DEVICES, ORDERS
from crackio.loading.samplers import (
    CLASS_WEIGHTS,
    SAMPLERS,
    SELECTIONS,
    HardNegatives,
    IouStrata,
    Shuffle,
    Weighted,
    make_sampler,
    options_of,
    own_options,
)
from crackio.storage.packs import RemoteSettings, parse_bytes
from crackio.storage.remote import check_location, is_remote
from train.run.logs import parse_logs
from train.run.schedule import SCHEDULES

# Validation draws every sample or a fixed cut, never weighted: the samplers that are selections.
VAL_SAMPLERS = tuple(name for name, cls in SAMPLERS.items() if issubclass(cls, Shuffle))
_WEIGHTS = ",".join(f"{c}:{w:g}" for c, w in CLASS_WEIGHTS.items())


SHIPPED = Path(__file__).with_name("variants.toml")  # the original's six runs, `python -m train sweep`'s default
HEADS = ("original", "linear")  # train.run.model.CrackClassifier
OPTIMIZERS = ("adam", "adamw", "sgd")  # train.run.model.make_optimizer
LOSSES = ("bce", "focal")  # train.run.losses.make_loss

# Every choice from the module that owns it: a new sampler, backend or loss is added in one place, and the CLI's
# `choices=` and --help follow.
CHOICES = {
    "head": HEADS,
    "optimizer": OPTIMIZERS,
    "sampler": SAMPLERS,
    "selection": SELECTIONS,
    "val_sampler": VAL_SAMPLERS,
    "loss": LOSSES,
    "device": DEVICES,
    "backend": BACKENDS,
    "order": ORDERS,
    "lr_schedule": SCHEDULES,
}


def launched_world_size() -> int:
    """The number of ranks torchrun started (WORLD_SIZE), known before the process group is made; 1 without it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def remote_settings(cache_dir: str, cache_limit: str, timeout: float) -> RemoteSettings:
    """Where and how a remote --shards is read (crackio.storage.packs.RemoteSettings) from the flags --cache-dir,
    --cache-limit, --remote-timeout; the environment's defaults ($CRACKIO_CACHE_DIR, ...) for those not given
    ("" or 0).

    Raises:
        ConfigError: a --cache-limit that is not a size, a negative --remote-timeout.
    """
    default = RemoteSettings.from_env()
    try:
        limit = parse_bytes(cache_limit) if cache_limit != "" else default.cache_limit
    except ValueError as e:
        raise ConfigError(f"--cache-limit: {e}") from None
    if not timeout >= 0:
        raise ConfigError(f"--remote-timeout must be >= 0 seconds, got {timeout}")
    folder = Path(cache_dir).expanduser() if cache_dir else default.cache_dir
    return RemoteSettings(folder, limit, timeout or default.timeout)


@dataclass
class Config:
    shards: str = ""  # folder written by tools/pack.py, or its s3:// or http(s):// URL (required)
    out: str = ""  # run folder; "" = runs/<timestamp>
    arch: str = "resnext50_32x4d"  # any torchvision classification model (resnet18 for quick CPU runs)
    weights: str = "imagenet"  # imagenet (torchvision's weights API and cache) | none | PATH to a state dict
    head: str = "original"  # original: ReLU + Linear(1000, 1) on the 1000 outputs; linear: a 1-logit last layer
    optimizer: str = "adam"  # the optimizer (sgd: momentum 0.9)
    lr: float = 1e-3  # learning rate (the original's Adam lr)
    weight_decay: float = 0.0  # weight decay
    lr_schedule: str = "constant"  # constant (the original's) | cosine (to 0 at --epochs) | step (see --lr-gamma)
    warmup_epochs: float = 0.0  # linear warm-up of the rate over this many epochs, per step (0.5 allowed); 0 = none
    lr_step_epochs: int = 10  # step schedule: epochs between two decays of the rate
    lr_gamma: float = 0.1  # step schedule: the rate is multiplied by this every --lr-step-epochs epochs
    batch_size: int = 32  # samples per batch on each rank
    global_batch_size: int = 0  # samples per step over all ranks, kept on --resume; 0 = batch-size x ranks
    epochs: int = 20  # maximum epochs
    patience: int = 3  # early stopping: epochs without a lower validation loss
    sampler: str = "shuffle"  # train sampler (crackio.loading.samplers)
    negatives: int = HardNegatives.negatives  # hard-negatives: negatives kept (highest IoU first)
    per_bin: int = IouStrata.per_bin  # iou-strata: negatives per IoU bin
    bin_width: float = IouStrata.bin_width  # iou-strata: IoU bin width
    class_weights: str = _WEIGHTS  # weighted, balanced: class weights as 0:w0,1:w1
    replacement: bool = Weighted.replacement  # weighted: draw with replacement
    num_samples: int = 0  # weighted: draws per epoch; 0 = the selection's size
    selection: str = "all"  # weighted, balanced: draw from all samples or from a cut
    val_sampler: str = "shuffle"  # validation selection (shuffle = every sample)
    val_negatives: int = 200  # hard-negatives on validation (the original kept 200)
    iou_threshold: float | None = None  # none: the file names' labels; a number t: label = IoU > t (relabel)
    loss: str = "bce"  # bce (BCEWithLogitsLoss) or focal (torchvision sigmoid_focal_loss)
    pos_weight: float = 0.0  # bce: weight of the crack class; 0 = none
    focal_alpha: float = 0.25  # focal: alpha; negative = no class weighting (the original's best run)
    focal_gamma: float = 2.0  # focal: gamma
    target_recall: float = 0.0  # also report the threshold reaching this crack recall on validation; 0 = off
    device: str = "auto"  # where training runs (auto: CUDA if torch sees one)
    backend: str = "auto"  # the loader's decoder (auto: DALI where installed)
    workers: int = 0  # decode threads per rank; 0 = all cores
    threads: int = 0  # torch CPU threads of training and evaluation; 0 = torch's default (one per core)
    order: str = "random"  # train reading order: random | block (runs of consecutive rows, for data not in memory)
    block_size: int = 128  # block order: consecutive index rows per block (~1 MB of crops)
    compile: bool = False  # torch.compile the model (CUDA)
    seed: int = 0  # seeds sampling, augmentation, initialisation
    train_split: str = SPLITS[0]  # the split trained on (a folder name inside --shards)
    val_split: str = SPLITS[1]  # the split validated on after each epoch (early stopping, best.pt)
    test_split: str = SPLITS[2]  # the split reported at the end, when the pack has it
    resume: str = ""  # run folder to continue from its latest checkpoint, or one checkpoint (RUN/last.pt)
    checkpoint_every: int = 1000  # steps between mid-epoch checkpoints (RUN/step.pt); 0 = only when stopped
    dist_timeout: float = 600.0  # torchrun: seconds a rank waits for the others before the job stops with an error
    limit_batches: int = 0  # smoke runs: at most this many batches per epoch and per evaluated split; 0 = all
    log: str = ""  # also log to tensorboard (RUN/tensorboard/) and/or csv (RUN/steps.csv, epochs.csv): tensorboard,csv
    log_every: int = 50  # steps between two progress lines when the output is not a terminal (a file, a job log)
    quiet: bool = False  # print the epoch lines only (no progress, no report text)
    cache_dir: str = ""  # remote --shards: this node's cache folder; "" = $CRACKIO_CACHE_DIR or ~/.cache/crackio
    cache_limit: str = ""  # remote --shards: bytes the cache may hold (e.g. 20G, LRU); "" = no limit; 0 = stream
    remote_timeout: float = 0.0  # remote --shards: seconds a failing server is retried; 0 = 60 or the env's

    def validate(self) -> None:
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {value!r}"
                    + closest(str(value), allowed)
                )
        positive = (
            "lr",
            "batch_size",
            "epochs",
            "patience",
            "per_bin",
            "bin_width",
            "dist_timeout",
            "block_size",
            "lr_step_epochs",
            "lr_gamma",
            "log_every",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        non_negative = (
            "remote_timeout",
            "seed",
            "workers",
            "threads",
            "global_batch_size",
            "checkpoint_every",
            "num_samples",
            "negatives",
            "val_negatives",
            "pos_weight",
            "weight_decay",
            "focal_gamma",
            "warmup_epochs",
            "limit_batches",
        )
        for name in non_negative:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value >= 0):  # NaN fails too
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if self.iou_threshold is not None and not 0 <= self.iou_threshold < 1:
            raise ConfigError(
                f"--iou-threshold must be in [0, 1) or none (the names' labels), got {self.iou_threshold}"
            )
        if self.limit_batches > 2**40 or self.log_every > 2**40:
            raise ConfigError(f"--limit-batches and --log-every must be at most 2**40, got {self.limit_batches}")
        if not self.warmup_epochs <= self.epochs:  # inf and NaN too
            raise ConfigError(
                f"--warmup-epochs {self.warmup_epochs} must be at most --epochs {self.epochs}: the warm-up would not "
                f"end within the run"
            )
        if not self.lr_gamma <= 1:
            raise ConfigError(f"--lr-gamma must be in (0, 1] (the step schedule lowers the rate), got {self.lr_gamma}")
        if not 0 <= self.target_recall <= 1:
            raise ConfigError(f"--target-recall must be in [0, 1], got {self.target_recall}")
        self.parsed_class_weights()
        parse_logs(self.log)
        for name in ("train_split", "val_split", "test_split"):
            split = getattr(self, name)
            if not is_path_component(split):
                raise ConfigError(
                    f"--{name.replace('_', '-')} {split!r} is not a split name: it names the folder "
                    f"SHARDS/<split>/, so it cannot be empty, '.', '..' or hold '/', '\\' or NUL"
                )
        if not self.shards and not self.resume:
            raise ConfigError("--shards is required (a folder written by tools/pack.py)")
        check_location(self.shards, "--shards")
        self.remote_settings()

    def remote_settings(self) -> RemoteSettings:
        return remote_settings(self.cache_dir, self.cache_limit, self.remote_timeout)

    def for_world(self, world_size: int) -> Config:
        """This config at `world_size` ranks: global_batch_size set, batch_size = global / ranks.

        Raises:
            ConfigError: a global batch the ranks cannot share equally.
        """
        g = self.global_batch_size or self.batch_size * world_size
        if g % world_size:
            raise ConfigError(
                f"the global batch of {g} cannot be shared equally by {world_size} ranks: run on a number of "
                f"ranks that divides {g}" + (" (it is the resumed run's)" if self.resume else "")
            )
        return dataclasses.replace(self, batch_size=g // world_size, global_batch_size=g)

    def parsed_class_weights(self) -> dict[int, float]:
        try:
            given = self.class_weights  # "0:1,1:2"; a variants file may also give a table {0 = 1, 1 = 2}
            pairs = dict(given) if isinstance(given, dict) else dict(part.split(":") for part in given.split(","))
            weights = {int(k): float(v) for k, v in pairs.items()}
        except (ValueError, TypeError, AttributeError):
            weights = {}
        if set(weights) != {0, 1}:
            raise ConfigError(f"--class-weights must look like 0:1,1:2, got {self.class_weights!r}")
        return weights

    def make_sampler(self, sampler: str, negatives: int) -> Shuffle | Weighted:
        """The sampler `sampler` (crackio.loading.samplers) built from this config's flat options of the same
        names; `negatives` is the split's (--negatives for training, --val-negatives for validation).

        Raises:
            ConfigError: a value the sampler refuses.
        """
        given = {
            "negatives": negatives,
            "class_weights": self.parsed_class_weights(),
            "num_samples": self.num_samples or None,
        }  # the three that are not a field's value as is
        names = options_of(sampler, self.selection)
        return make_sampler(sampler, **{name: given[name] if name in given else getattr(self, name) for name in names})

    def save(self, path: Path) -> None:
        """config.json, atomically (raises WriteError on a full disk or an I/O error)."""
        write_json(path, dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d, source: str = "config") -> Config:
        """A config read back (config.json, a checkpoint's): keys and value types checked, as untrusted input.

        Raises:
            ConfigError: naming `source` and the key.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: a config must be a table of settings, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"{source}: unknown config keys {unknown}{closest(unknown[0], names)}")
        for key, value in d.items():
            check_type(key, value, source)
        return cls(**d)


def read_config_file(path: str) -> dict:
    """The settings of `--config FILE`: YAML (.yaml, .yml), TOML (.toml) or JSON (.json, e.g. a run's config.json),
    a table of Config's field names (underscores) to values of their types; `iou_threshold` may be "none".

    Raises:
        MissingFile: no such file.
        ConfigError: another suffix, unparsable text, not a table, unknown keys (with the closest name), a value
            of the wrong type, or `resume` (a resumed run keeps its own config); each naming the file.
    """
    from crackio.errors import MissingFile

    file = Path(path)
    if not file.is_file():
        raise MissingFile(f"--config {file} does not exist" + (" (it is a folder)" if file.is_dir() else ""))
    suffix = file.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ConfigError(f"--config {file}: give a .yaml, .yml, .toml or .json file (a run's config.json works)")
    try:
        text = file.read_text()
        if not text.strip():
            data = {}  # an empty file of any of the three: no settings
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix == ".json":
            import json

            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)  # safe_load: plain data only, nothing constructed
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {file} cannot be read ({e})") from e
    except Exception as e:  # noqa: BLE001 - tomllib, json and yaml each raise their own parse error
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"--config {file} is not valid {suffix[1:].upper()}: {first}") from e
    if data is None:
        data = {}  # an empty YAML file
    if isinstance(data, dict) and isinstance(data.get("log"), list):  # log: [tensorboard, csv]
        data["log"] = ",".join(map(str, data["log"]))
    if isinstance(data, dict) and data.get("iou_threshold") == "none":
        data["iou_threshold"] = None
    Config.from_dict(data, f"--config {file}")  # keys and types, with the closest name for a typo
    if data.get("resume"):
        raise ConfigError(
            f"--config {file} sets resume: a resumed run keeps its own settings; use --resume RUN without --config"
        )
    return {k: v for k, v in data.items() if k != "resume"}


def check_type(key: str, value, where: str) -> None:
    """A setting's value must have its field's type (an int is a float; class_weights may be a table,
    iou_threshold None).

    Raises:
        ConfigError: naming `where`, the key and the type it needs.
    """
    default = Config.__dataclass_fields__[key].default
    kind = float if default is None else type(default)
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    ok = ok or (kind is float and isinstance(value, int) and not isinstance(value, bool))
    ok = ok or (key == "class_weights" and isinstance(value, dict)) or (key == "iou_threshold" and value is None)
    if not ok:
        raise ConfigError(f"{where}: {key} = {value!r} must be of type {kind.__name__} (like {default!r})")


# Options that only mean something with another setting: given without it, they are refused, not ignored.
# Sampler options apply when they are fields of the chosen sampler or of its --selection cut (samplers' classes);
# the rest:
APPLIES_TO = {
    "val_negatives": ("--val-sampler hard-negatives", lambda c: c.val_sampler == "hard-negatives"),
    "pos_weight": ("--loss bce", lambda c: c.loss == "bce"),
    "focal_alpha": ("--loss focal", lambda c: c.loss == "focal"),
    "focal_gamma": ("--loss focal", lambda c: c.loss == "focal"),
    "block_size": ("--order block", lambda c: c.order == "block"),
    "lr_step_epochs": ("--lr-schedule step", lambda c: c.lr_schedule == "step"),
    "lr_gamma": ("--lr-schedule step", lambda c: c.lr_schedule == "step"),
    "cache_dir": ("a remote --shards (s3://, http(s)://)", lambda c: is_remote(c.shards)),
    "cache_limit": ("a remote --shards (s3://, http(s)://)", lambda c: is_remote(c.shards)),
    "remote_timeout": ("a remote --shards (s3://, http(s)://)", lambda c: is_remote(c.shards)),
}
_OPTIONS = {name for sampler in SAMPLERS for selection in SELECTIONS for name in options_of(sampler, selection)}


def unmet(cfg: Config, name: str) -> str | None:
    """The setting option `name` needs that `cfg` lacks (e.g. "--loss focal" for --focal-gamma), or None when it
    applies. Sampler options apply when they are fields of the chosen sampler or of its --selection cut, read off
    the sampler classes' fields."""
    if name in APPLIES_TO:
        needs, rule = APPLIES_TO[name]
        return None if rule(cfg) else needs
    if name not in _OPTIONS or name in options_of(cfg.sampler, cfg.selection):
        return None
    direct = [s for s in SAMPLERS if name in own_options(s)]
    cuts = [c for c in SELECTIONS if name in own_options(c, SELECTIONS)]
    return " or ".join([f"--sampler {s}" for s in direct] + [f"--selection {c}" for c in cuts])


def check_applicable(cfg: Config, given) -> None:
    """Refuse options in `given` (names) that `cfg`'s other settings would silently ignore.

    Raises:
        ConfigError: naming the option and the setting it needs, e.g. --class-weights with --sampler shuffle.
    """
    ranks = launched_world_size()
    if "batch_size" in given and cfg.global_batch_size and cfg.batch_size * ranks != cfg.global_batch_size:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} (per rank) x {ranks} rank(s) is not --global-batch-size "
            f"{cfg.global_batch_size}: the run would ignore --batch-size; give one of them"
        )
    for name in sorted(given):
        needs = unmet(cfg, name)
        if needs:
            raise ConfigError(
                f"--{name.replace('_', '-')} only applies with {needs}; this run would ignore it "
                f"(drop it, or choose the setting it belongs to)"
            )


def _help(cls) -> dict[str, str]:
    """Field comments from the source, so `--help` says what each default means."""
    import inspect

    helps = {}
    for line in inspect.getsource(cls).splitlines():
        line = line.strip()
        if ":" in line and "#" in line and not line.startswith(("#", "def", '"')):
            name = line.split(":", 1)[0].strip()
            helps[name] = line.split("#", 1)[1].strip()
    return helps


def add_config_arguments(ap: argparse._ActionsContainer, cls=Config, given_only: bool = True, skip=()) -> None:
    """One flag per field of the dataclass `cls`, typed by its default, helped by its `#` comment.

    given_only: flags not given are left out of the namespace (argparse.SUPPRESS), so the caller
    knows which were given (resume and option checks); else they hold the field's default.
    """
    helps = _help(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        kind = type(default)
        text = f"{helps.get(f.name, '')} (default: {typed(default)})"
        value = argparse.SUPPRESS if given_only else default
        if cls is Config and f.name in CHOICES:
            ap.add_argument(flag, choices=CHOICES[f.name], default=value, help=text)
        elif default is None:  # the only optional field is a float: `--iou-threshold 0.35`, or `none`
            ap.add_argument(flag, type=_optional_float, metavar="FLOAT|none", default=value, help=text)
        elif kind is bool:  # `--quiet` alone, or `--quiet true|false` (what config.json's values read back as)
            ap.add_argument(flag, type=_bool, nargs="?", const=True, metavar="BOOL", default=value, help=text)
        else:
            ap.add_argument(flag, type=kind, default=value, help=text)


def _optional_float(text: str) -> float | None:
    if text.lower() in ("none", "names", ""):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or none, got {text!r}") from None


def _bool(text: str) -> bool:
    value = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


@dataclass
class SvmConfig:
    checkpoint: str = ""  # RUN/best.pt of a finished run (required)
    shards: str = ""  # shards folder; "" = the one the run trained on
    out: str = ""  # output folder; "" = RUN/svm
    pos_iou: float = 0.7  # positives: IoU >= this (R-CNN)
    neg_iou: float = 0.3  # negatives: IoU < this (R-CNN); the band between is ignored
    rounds: int = 3  # hard-negative mining rounds
    negatives: int = 5000  # initial random negatives, and the most hard negatives added per round
    C: float = 1e-3  # LinearSVC C on standardized features
    target_recall: float = 0.0  # choose thresholds for this crack recall on validation; 0 = the highest F1
    seed: int = 0  # seeds the initial negative cache
    batch_size: int = 64  # batch size of the feature pass
    device: str = "auto"  # auto | cpu | cuda
    backend: str = "auto"  # auto | dali | torch

    def validate(self) -> None:
        if not self.checkpoint:
            raise ConfigError("--checkpoint is required (RUN/best.pt of a finished run)")
        if not 0 <= self.neg_iou <= self.pos_iou <= 1:
            raise ConfigError(f"need 0 <= --neg-iou <= --pos-iou <= 1, got {self.neg_iou} and {self.pos_iou}")
        check_limits(
            {
                "--rounds": (self.rounds >= 0, ">= 0", self.rounds),
                "--negatives": (self.negatives >= 1, ">= 1", self.negatives),
                "--C": (self.C > 0, "> 0", self.C),
                "--batch-size": (self.batch_size >= 1, ">= 1", self.batch_size),
                "--seed": (self.seed >= 0, ">= 0", self.seed),
                "--target-recall": (0 <= self.target_recall <= 1, "in [0, 1]", self.target_recall),
            }
        )
        for name, allowed in {"device": DEVICES, "backend": BACKENDS}.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
