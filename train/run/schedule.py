"""Learning-rate schedules, per optimizer step: `--lr-schedule constant|cosine|step` with `--warmup-epochs`.

The rate at step s (0-based, counted over the whole run) is `lr x lr_factor(s)`, a pure function of the step, so a
run stopped anywhere and resumed (mid-epoch, at another world size: the global batch and so the steps per epoch are
the run's) goes on with the rate an uninterrupted run would have used. torch's LambdaLR applies it; its state (the
step reached) is saved in every checkpoint with the optimizer's.

As in timm's and torchvision's reference scripts: a linear warm-up from lr / warm-up steps, then constant (the
write-up's Adam 1e-3), cosine to 0 at the last step of `--epochs` (Loshchilov & Hutter 2017, SGDR, without
restarts), or a decay by `--lr-gamma` every `--lr-step-epochs` epochs (torchvision's StepLR).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from train.settings.learning import Constant, Step

if TYPE_CHECKING:  # torch is imported where the scheduler is made
    import torch


def lr_factor(
    step: int, schedule: str, steps_per_epoch: int, epochs: int, warmup_epochs: float, step_epochs: int, gamma: float
) -> float:
    """The factor on the base learning rate at optimizer step `step` (0-based, over the run).

    Warm-up covers round(warmup_epochs x steps_per_epoch) steps: step s of it has (s + 1) / warm-up steps; the
    schedule then runs from the end of the warm-up (cosine: to 0 at epochs x steps_per_epoch; step: by whole
    epochs of the run, warm-up included).
    """
    warmup = round(warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        total = max(epochs * steps_per_epoch - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total) / total))
    if schedule == "step":
        return gamma ** (step // (step_epochs * steps_per_epoch))
    return 1.0


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: Constant, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping `lr_factor` once per optimizer step. Build it before restoring the optimizer's state (the
    scheduler sets the rate of step 0 when made; the restored optimizer then carries the rate it stopped at).

    A plain function, not a callable object: LambdaLR saves an object's attributes in its state and would restore
    a resumed run's old --epochs into the cosine's length.
    """

    kind, warmup = schedule.kind, schedule.warmup_epochs
    step_epochs, gamma = (schedule.lr_step_epochs, schedule.lr_gamma) if isinstance(schedule, Step) else (1, 1.0)

    def factor(step: int) -> float:
        return lr_factor(step, kind, steps_per_epoch, epochs, warmup, step_epochs, gamma)

    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
