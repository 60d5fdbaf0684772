"""Which samples each epoch draws: the training sampler with its options and the validation selection, as flat
options; the samplers themselves (crackio.loading.samplers, one class each) own which options they take."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from crackio.errors import ConfigError
from crackio.flags import flag
from crackio.loading.samplers import (
    CLASS_WEIGHTS,
    SAMPLERS,
    SELECTIONS,
    HardNegatives,
    IouStrata,
    Rcnn,
    Shuffle,
    Weighted,
    make_sampler,
    options_of,
    own_options,
)
from train.settings.base import Owner, check_non_negative, check_positive

# Validation draws every sample or a fixed cut, never weighted: the samplers that are selections.
VAL_SAMPLERS = tuple(name for name, cls in SAMPLERS.items() if issubclass(cls, Shuffle))
_WEIGHTS = ",".join(f"{c}:{w:g}" for c, w in CLASS_WEIGHTS.items())
# Every option some sampler (with some selection) takes: the ones whose use depends on --sampler and --selection.
_OPTIONS = {name for sampler in SAMPLERS for selection in SELECTIONS for name in options_of(sampler, selection)}


@dataclass(frozen=True)
class Sampling(Owner):
    group: ClassVar[str] = "sampler"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {
        "sampler": tuple(SAMPLERS),
        "selection": tuple(SELECTIONS),
        "val_sampler": VAL_SAMPLERS,
    }

    sampler: str = "shuffle"  # train sampler (crackio.loading.samplers)
    negatives: int = HardNegatives.negatives  # hard-negatives: negatives kept (highest IoU first)
    per_bin: int = IouStrata.per_bin  # iou-strata: negatives per IoU bin
    bin_width: float = IouStrata.bin_width  # iou-strata: IoU bin width
    class_weights: str = _WEIGHTS  # weighted, balanced: class weights as 0:w0,1:w1
    replacement: bool = Weighted.replacement  # weighted: draw with replacement
    num_samples: int = 0  # weighted, rcnn: draws per epoch; 0 = the selection's size
    positive_share: float = Rcnn.positive_share  # rcnn: positives in every mini-batch (R-CNN: 32 of 128)
    selection: str = "all"  # weighted, balanced, rcnn: draw from all samples or from a cut
    val_sampler: str = "shuffle"  # validation selection (shuffle = every sample)
    val_negatives: int = 200  # hard-negatives on validation (the original kept 200)

    def check(self) -> None:
        check_positive(self, "per_bin", "bin_width")
        check_non_negative(self, "num_samples", "negatives", "val_negatives")
        self.parsed_class_weights()
        try:  # the samplers check their own values; said here in the command line's words
            self.make(train=True), self.make(train=False)
        except ConfigError as e:
            text = re.sub(r"\bsampler option (\w+)", r"\1", str(e))
            for name in self.names():
                text = re.sub(rf"(?<![\w-]){name}(?![\w(])", flag(name), text) if "_" in name else text
            raise ConfigError(text) from None

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

    def make(self, train: bool) -> Shuffle | Weighted:
        """The training sampler (`train`) or the validation selection, built from these options.

        Raises:
            ConfigError: a value the sampler refuses.
        """
        sampler, negatives = (self.sampler, self.negatives) if train else (self.val_sampler, self.val_negatives)
        given = {
            "negatives": negatives,
            "class_weights": self.parsed_class_weights(),
            "num_samples": self.num_samples or None,
        }  # the three that are not a field's value as is
        names = options_of(sampler, self.selection)
        return make_sampler(sampler, **{name: given[name] if name in given else getattr(self, name) for name in names})

    @classmethod
    def unmet(cls, values, name: str) -> str | None:
        """Sampler options apply when they are fields of the chosen sampler or of its --selection cut, read off the
        sampler classes' fields; --val-negatives when the validation selection takes negatives."""
        if name == "val_negatives":
            return None if "negatives" in own_options(values["val_sampler"]) else "--val-sampler hard-negatives"
        if name not in _OPTIONS or name in options_of(values["sampler"], values["selection"]):
            return None
        direct = [s for s in SAMPLERS if name in own_options(s)]
        cuts = [c for c in SELECTIONS if name in own_options(c, SELECTIONS)]
        return " or ".join([f"--sampler {s}" for s in direct] + [f"--selection {c}" for c in cuts])
