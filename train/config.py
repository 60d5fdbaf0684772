"""One flat config: every field with its default and a `#` comment; the CLI is derived from it."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path

from crackio.errors import ConfigError
from crackio.samplers import SAMPLERS, SELECTIONS


@dataclass
class Config:
    shards: str = ""                     # folder written by tools/pack.py (required)
    out: str = ""                        # run folder; "" = runs/<timestamp>
    arch: str = "resnext50_32x4d"        # any torchvision classification model (resnet18 for quick CPU runs)
    weights: str = "imagenet"            # imagenet (torchvision's weights API and cache) | none | PATH to a state dict
    head: str = "seed"                   # seed: ReLU + Linear(1000, 1) on the 1000 outputs | linear: 1-logit last layer
    optimizer: str = "adam"              # adam | adamw | sgd
    lr: float = 1e-3                     # learning rate (the original's Adam lr)
    weight_decay: float = 0.0            # weight decay
    batch_size: int = 32                 # samples per batch on each rank
    epochs: int = 20                     # maximum epochs
    patience: int = 3                    # early stopping: epochs without a lower validation loss
    sampler: str = "shuffle"             # train sampler: shuffle | hard-negatives | iou-strata | weighted | balanced
    negatives: int = 800                 # hard-negatives: negatives kept (highest IoU first)
    per_bin: int = 10                    # iou-strata: negatives per IoU bin
    bin_width: float = 0.05              # iou-strata: IoU bin width
    class_weights: str = "0:1,1:2"       # weighted | balanced: class weights as 0:w0,1:w1
    replacement: bool = True             # weighted: draw with replacement
    num_samples: int = 0                 # weighted: draws per epoch; 0 = the selection's size
    selection: str = "all"               # weighted | balanced: draw from all | hard-negatives | iou-strata cut
    val_sampler: str = "shuffle"         # validation selection: shuffle (= every sample) | hard-negatives | iou-strata
    val_negatives: int = 200             # hard-negatives on validation (the original kept 200)
    iou_threshold: float = 0.5           # label = IoU > threshold, recomputed from the stored IoU
    loss: str = "bce"                    # bce (BCEWithLogitsLoss) | focal (torchvision sigmoid_focal_loss)
    pos_weight: float = 0.0              # bce: weight of the crack class; 0 = none
    focal_alpha: float = 0.25            # focal: alpha; negative = no class weighting (the original's best run)
    focal_gamma: float = 2.0             # focal: gamma
    target_recall: float = 0.0           # also report the threshold reaching this crack recall on validation; 0 = off
    device: str = "auto"                 # auto | cpu | cuda
    backend: str = "auto"                # auto | dali | torch
    workers: int = 0                     # decode threads/processes per rank; 0 = all cores
    compile: bool = False                # torch.compile the model (CUDA)
    seed: int = 0                        # seeds sampling, augmentation, initialisation
    train_split: str = "train"           # split names inside --shards
    val_split: str = "valid"
    test_split: str = "test"             # reported at the end when present
    resume: str = ""                     # run folder to continue from its last.pt

    def validate(self) -> None:
        choices = {"head": ("seed", "linear"), "optimizer": ("adam", "adamw", "sgd"), "sampler": SAMPLERS,
                   "selection": SELECTIONS,
                   "val_sampler": ("shuffle", "hard-negatives", "iou-strata"), "loss": ("bce", "focal"),
                   "device": ("auto", "cpu", "cuda"), "backend": ("auto", "dali", "torch")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        positive = ("lr", "batch_size", "epochs", "patience", "negatives", "per_bin", "bin_width")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.iou_threshold < 1:
            raise ConfigError(f"--iou-threshold must be in [0, 1), got {self.iou_threshold}")
        if not 0 <= self.target_recall <= 1:
            raise ConfigError(f"--target-recall must be in [0, 1], got {self.target_recall}")
        self.parsed_class_weights()
        if not self.shards and not self.resume:
            raise ConfigError("--shards is required (a folder written by tools/pack.py)")

    def parsed_class_weights(self) -> dict[int, float]:
        try:
            pairs = dict(part.split(":") for part in self.class_weights.split(","))
            weights = {int(k): float(v) for k, v in pairs.items()}
        except ValueError:
            weights = {}
        if set(weights) != {0, 1}:
            raise ConfigError(f"--class-weights must look like 0:1,1:2, got {self.class_weights!r}")
        return weights

    def sampler_options(self, sampler: str, negatives: int) -> dict:
        cut = {"selection": self.selection, "negatives": negatives, "per_bin": self.per_bin,
               "bin_width": self.bin_width}
        return {
            "shuffle": {},
            "hard-negatives": {"negatives": negatives},
            "iou-strata": {"per_bin": self.per_bin, "bin_width": self.bin_width},
            "weighted": {"class_weights": self.parsed_class_weights(), "replacement": self.replacement,
                         "num_samples": self.num_samples or None, **cut},
            "balanced": {"class_weights": self.parsed_class_weights(), **cut},
        }[sampler]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}")
        return cls(**d)


# On resume these may change (to extend a run) when given with a non-default value;
# everything else comes from the run's config.json.
RESUMABLE = ("epochs", "patience", "device", "backend", "workers")


def resumed(cfg: Config, saved: Config) -> Config:
    default = Config()
    changes = {k: getattr(cfg, k) for k in RESUMABLE if getattr(cfg, k) != getattr(default, k)}
    return dataclasses.replace(saved, resume=cfg.resume, **changes)


def _help(cls) -> dict[str, str]:
    """Field comments from the source, so `--help` says what each default means."""
    import inspect

    helps = {}
    for line in inspect.getsource(cls).splitlines():
        line = line.strip()
        if ":" in line and "#" in line and not line.startswith(("#", "def", "\"")):
            name = line.split(":", 1)[0].strip()
            helps[name] = line.split("#", 1)[1].strip()
    return helps


def add_config_arguments(ap: argparse.ArgumentParser) -> None:
    helps = _help(Config)
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        kind = type(default)
        text = f"{helps.get(f.name, '')} (default: {default!r})"
        if kind is bool:
            ap.add_argument(flag, type=_bool, metavar="BOOL", default=argparse.SUPPRESS, help=text)
        else:
            ap.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=text)


def _bool(text: str) -> bool:
    value = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value
