"""What is learned and how: the network (`Model`), the optimizer and the run's length (`Optimisation`), the
learning-rate schedule (`Constant`, `Cosine`, `Step`) and the loss (`Bce`, `Focal`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from crackio.errors import MOST_FLOAT32, MOST_LR, ConfigError, is_number, written
from train.settings.base import Choice, Kind, Owner, check_non_negative, check_positive, check_within

HEADS = ("original", "linear")  # train.run.model.CrackClassifier
OPTIMIZERS = ("adam", "adamw", "sgd")  # train.run.model.make_optimizer


@dataclass(frozen=True)
class Model(Owner):
    group: ClassVar[str] = "model"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"head": HEADS}

    arch: str = "resnext50_32x4d"  # a torchvision classification model, or timm/NAME (resnet18: quick CPU runs)
    weights: str = "imagenet"  # imagenet (the library's own loading and cache) | none | PATH to a state dict
    head: str = "original"  # original: ReLU + Linear(1000, 1) on the 1000 outputs; linear: a 1-logit last layer
    compile: bool = False  # torch.compile the model (CUDA)


@dataclass(frozen=True)
class Optimisation(Owner):
    group: ClassVar[str] = "optimisation"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"optimizer": OPTIMIZERS}

    optimizer: str = "adam"  # the optimizer (sgd: momentum 0.9)
    lr: float = 1e-3  # learning rate (the original's Adam lr)
    weight_decay: float = 0.0  # weight decay
    batch_size: int = 32  # samples per batch on each rank
    global_batch_size: int = 0  # samples per step over all ranks, kept on --resume; 0 = batch-size x ranks
    epochs: int = 20  # maximum epochs
    patience: int = 3  # early stopping: epochs without a lower validation loss

    def check(self) -> None:
        # The rate reaches float32 tensors in the optimizer's update: Adam's first step is lr / (1 - 0.9), and
        # weight decay multiplies it (AdamW: 1 - lr x weight decay). Above those, torch fails mid-step.
        check_positive(self, "lr", most=MOST_LR)
        check_positive(self, "batch_size", "epochs", "patience")
        check_non_negative(self, "global_batch_size", "weight_decay")
        if self.lr * self.weight_decay > MOST_FLOAT32:
            raise ConfigError(
                f"--lr {self.lr:g} x --weight-decay {self.weight_decay:g} must be at most {written(MOST_FLOAT32)} "
                f"(the optimizer's decay step is a float32): lower either"
            )


@dataclass(frozen=True)
class Constant(Kind):
    """The original's: the same rate throughout (after the warm-up)."""

    kind: ClassVar[str] = "constant"
    group: ClassVar[str] = "schedule"

    warmup_epochs: float = 0.0  # linear warm-up of the rate over this many epochs, per step (0.5 allowed); 0 = none

    def check(self) -> None:
        warmup = self.warmup_epochs
        if not (is_number(warmup, 0) or warmup == math.inf):  # NaN fails too; inf is refused against --epochs
            raise ConfigError(f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")


@dataclass(frozen=True)
class Cosine(Constant):
    """Cosine to 0 at the last step of --epochs (SGDR without restarts)."""

    kind: ClassVar[str] = "cosine"


@dataclass(frozen=True)
class Step(Constant):
    """The rate times --lr-gamma every --lr-step-epochs epochs (torchvision's StepLR)."""

    kind: ClassVar[str] = "step"

    lr_step_epochs: int = 10  # step schedule: epochs between two decays of the rate
    lr_gamma: float = 0.1  # step schedule: the rate is multiplied by this every --lr-step-epochs epochs

    def check(self) -> None:
        super().check()
        check_positive(self, "lr_step_epochs")
        check_within(self, "lr_gamma", 0, 1, above=True, note=" (the step schedule lowers the rate)")


SCHEDULE = Choice(
    "lr_schedule",
    {c.kind: c for c in (Constant, Cosine, Step)},
    "schedule",
    "constant (the original's) | cosine (to 0 at --epochs) | step (see --lr-gamma)",
)


@dataclass(frozen=True)
class Bce(Kind):
    """BCEWithLogitsLoss: the original's Sigmoid + BCELoss, stable."""

    kind: ClassVar[str] = "bce"
    group: ClassVar[str] = "loss"

    pos_weight: float = 0.0  # bce: weight of the crack class; 0 = none

    def check(self) -> None:
        check_non_negative(self, "pos_weight")


@dataclass(frozen=True)
class Focal(Kind):
    """torchvision's sigmoid_focal_loss (Lin et al. 2017)."""

    kind: ClassVar[str] = "focal"
    group: ClassVar[str] = "loss"

    focal_alpha: float = 0.25  # focal: alpha, the crack class's weight in [0, 1]; -1 = none (the original's best run)
    focal_gamma: float = 2.0  # focal: gamma

    def check(self) -> None:
        check_non_negative(self, "focal_gamma")
        if not (is_number(self.focal_alpha, 0, 1) or (is_number(self.focal_alpha) and self.focal_alpha == -1)):
            raise ConfigError(  # torchvision's rule
                f"--focal-alpha must be in [0, 1] (the crack class's weight) or -1 (no class weighting, the "
                f"original's best run), got {self.focal_alpha}"
            )


LOSS = Choice(
    "loss",
    {c.kind: c for c in (Bce, Focal)},
    "loss",
    "bce (BCEWithLogitsLoss) or focal (torchvision sigmoid_focal_loss)",
)
