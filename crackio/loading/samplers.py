"""Index-level samplers: which samples an epoch holds and how often, one small frozen class each.

Everything here works on the in-memory index arrays (labels, IoUs); no image file is listed or
opened. A sampler is built and validated once, at the edge (`make_sampler` from a name and options,
or the class itself); an option that does not belong to it is not one of its fields.

Selection (fixed for the run, from the seed):
    Shuffle()                      every sample
    HardNegatives(negatives=800)   every positive + the `negatives` negatives with the highest IoU
                                   (the original's `filter_and_sort_images`: 800 train, 200 valid)
    IouStrata(per_bin, bin_width)  every positive + up to `per_bin` random negatives per IoU bin
Draws (per epoch):
    Shuffle, HardNegatives, IouStrata: a permutation of the selection (train) or index order (eval)
    Weighted    `torch.utils.data.WeightedRandomSampler` semantics: `num_samples` draws
                with probability proportional to `class_weights[label]`, with or without
                replacement. NB: without replacement and num_samples = all (the
                original's setting) every sample is drawn exactly once, so only the
                order changes, not the class mix.
    Balanced    no duplicates and a class mix that really follows the weights: the
                largest subset whose class shares are w_c*n_c / sum_k w_k*n_k, i.e. the
                mix `Weighted` with replacement gives in expectation.
    Rcnn        R-CNN's fine-tuning mini-batches: `positive_share` (0.25: 32 of 128) of every
                stretch of draws positive, the rest background, whatever the class counts.
Weighted, Balanced and Rcnn draw from every sample, or from a cut (`selection=HardNegatives(...)` or
`IouStrata(...)`): the original weighted its already filtered list.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from crackio.cli import closest
from crackio.errors import ConfigError, integer, is_number

CLASS_WEIGHTS: dict[int, float] = {0: 1, 1: 2}  # the original's WeightedRandomSampler weights
_SEED_SELECT, _SEED_ORDER = 0x5E1EC7, 0x0D0E5  # separate streams for selection and order


def relabel(ious: np.ndarray, threshold: float) -> np.ndarray:
    """label = IoU > threshold, compared in float32 as the index stores IoUs; int8 (1 byte a sample)."""
    return (ious > np.float32(threshold)).astype(np.int8)


def labels_for(named: np.ndarray, ious: np.ndarray, threshold: float | None) -> np.ndarray:
    """The labels a run trains on: the names' own (threshold None), or IoU > threshold; int8 0/1."""
    if threshold is None:
        return named.astype(np.int8)
    if not 0 <= threshold < 1:
        raise ConfigError(f"iou_threshold must be in [0, 1) or None (the names' labels), got {threshold}")
    return relabel(ious, threshold)


def label_source(threshold: float | None) -> str:
    """How a run's labels were made, in words for reports."""
    return "labels from the file names" if threshold is None else f"labels relabelled as IoU > {threshold:g}"


@dataclass(frozen=True)
class Shuffle:
    """Every sample; a new permutation each training epoch."""

    name: ClassVar[str] = "shuffle"

    def select(self, labels: np.ndarray, ious: np.ndarray, seed: int) -> np.ndarray:
        """Row ids in the run's selection, sorted."""
        return np.arange(len(labels))

    def draw(self, selection: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One training epoch's draws from the selection, in order."""
        return rng.permutation(selection)

    def check(self, selection: np.ndarray, labels: np.ndarray, threshold: float | None) -> None:
        """Refuse a selection this sampler cannot draw from (ConfigError)."""

    def describe(self) -> str:
        """What an epoch holds, in words (reports and the sweep's tables)."""
        return "every sample"


@dataclass(frozen=True)
class HardNegatives(Shuffle):
    """Every positive and the `negatives` negatives with the highest IoU (ties in index order)."""

    name: ClassVar[str] = "hard-negatives"
    negatives: int = 800

    def __post_init__(self) -> None:
        object.__setattr__(self, "negatives", integer("sampler option negatives", self.negatives, 0))

    def select(self, labels: np.ndarray, ious: np.ndarray, seed: int) -> np.ndarray:
        rows = np.arange(len(labels))
        pos, neg = rows[labels == 1], rows[labels == 0]
        # Stable sort: ties keep index order, as the original's sorted(..., reverse=True) keeps list order.
        hardest = neg[np.argsort(-ious[neg], kind="stable")[: self.negatives]]
        return np.sort(np.concatenate([pos, hardest]))

    def describe(self) -> str:
        return f"every positive + the {self.negatives} negatives with the highest IoU"


@dataclass(frozen=True)
class IouStrata(Shuffle):
    """Every positive and up to `per_bin` random negatives per IoU bin of `bin_width`."""

    name: ClassVar[str] = "iou-strata"
    per_bin: int = 10
    bin_width: float = 0.05

    def __post_init__(self) -> None:
        object.__setattr__(self, "per_bin", integer("sampler option per_bin", self.per_bin, 1))
        if not is_number(self.bin_width, 0, 1, above=True):
            raise ConfigError(f"sampler option bin_width must be a number in (0, 1], got {self.bin_width!r}")

    def select(self, labels: np.ndarray, ious: np.ndarray, seed: int) -> np.ndarray:
        rows = np.arange(len(labels))
        pos, neg = rows[labels == 1], rows[labels == 0]
        rng = np.random.default_rng([seed, _SEED_SELECT])
        bins = np.floor(ious[neg] / self.bin_width).astype(np.int64)
        keep = []
        for b in np.unique(bins):
            members = neg[bins == b]
            keep.append(rng.choice(members, size=min(self.per_bin, len(members)), replace=False))
        return np.sort(np.concatenate([pos, *keep]))

    def describe(self) -> str:
        return f"every positive + up to {self.per_bin} random negatives per IoU bin of {self.bin_width:g}"


Cut = Shuffle | HardNegatives | IouStrata  # what weighting draws from


def _successive(by_class: list[np.ndarray], weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """The first `n` of a successive weighted draw without replacement (each next row with probability
    proportional to its weight among those left: torch.multinomial's, and Efraimidis & Spirakis's: rows in
    decreasing order of log(u) / w, u uniform).

    Per class the keys are i.i.d., so their order is a uniform permutation of the class's rows, and the sorted
    keys come without a sort from Renyi's representation of exponential order statistics: the k-th smallest of m
    Exp(1) values is sum_{j<=k} E_j / (m - j + 1). The classes' sorted keys are then merged.
    """
    keys, rows = [], []
    for members, weight in zip(by_class, weights):
        if weight == 0 or len(members) == 0:
            continue  # never drawn while another class has rows left (n <= rows of non-zero weight)
        m = len(members)
        keys.append(np.cumsum(rng.exponential(size=m) / np.arange(m, 0, -1)) / weight)  # -log(u) / w, ascending
        rows.append(rng.permutation(members))
    if len(keys) == 1:
        return rows[0][:n]
    (a, b), (ra, rb) = keys, rows
    out = np.empty(len(a) + len(b), np.int64)
    out[np.searchsorted(b, a, side="right") + np.arange(len(a))] = ra  # merged by key
    out[np.searchsorted(a, b, side="left") + np.arange(len(b))] = rb
    return out[:n]


SELECTIONS: dict[str, type[Shuffle]] = {"all": Shuffle, "hard-negatives": HardNegatives, "iou-strata": IouStrata}


def _weights(given: object) -> dict[int, float]:
    """Class weights for 0 and 1, finite, non-negative, not both 0, scaled to a maximum of 1 (only ratios
    matter, and 1e308 * n would overflow)."""
    try:
        pairs = dict(given).items()  # type: ignore[call-overload]
        w = {int(k): float(v) + 0.0 if is_number(v) else math.nan for k, v in pairs}  # 10**400, a bool: no weight
    except (TypeError, ValueError):
        raise ConfigError(
            f"class_weights must map classes 0 and 1 to weights, e.g. {{0: 1, 1: 2}}, got {given!r}"
        ) from None
    if set(w) != {0, 1} or not all(v >= 0 for v in w.values()) or max(w.values()) == 0:  # NaN fails
        raise ConfigError(
            f"class_weights must give finite, non-negative weights (not both 0) for classes 0 and 1, got {given!r}"
        )
    top = max(w.values())
    return {c: v / top for c, v in w.items()}


def _ratios(weights: dict[int, float]) -> str:
    """Class weights as the user wrote them, up to scale: the smallest non-zero one is 1 ({0: 1, 1: 2})."""
    low = min(w for w in weights.values() if w > 0)
    return "{" + ", ".join(f"{c}: {w / low:.4g}" for c, w in weights.items()) + "}"


@dataclass(frozen=True)
class Weighted:
    """`num_samples` draws (None: the selection's size), with probability proportional to the class weight."""

    name: ClassVar[str] = "weighted"
    class_weights: dict[int, float] = field(default_factory=lambda: dict(CLASS_WEIGHTS))
    replacement: bool = True
    num_samples: int | None = None
    selection: Cut = Shuffle()

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_weights", _weights(self.class_weights))
        if not isinstance(self.replacement, bool | np.bool_):
            raise ConfigError(f"sampler option replacement must be True or False, got {self.replacement!r}")
        object.__setattr__(self, "replacement", bool(self.replacement))
        if self.num_samples is not None:
            object.__setattr__(self, "num_samples", integer("sampler option num_samples", self.num_samples, 1))
        selection = self.selection
        if isinstance(selection, str) and selection in SELECTIONS:  # the flat options' spelling
            object.__setattr__(self, "selection", SELECTIONS[selection]())
        elif not isinstance(selection, Shuffle):
            raise ConfigError(
                f"selection must be one of {', '.join(SELECTIONS)} or a cut such as HardNegatives(800), "
                f"got {selection!r}"
            )

    def __hash__(self) -> int:  # frozen, but class_weights is a dict: hashed by its items
        return hash((type(self), tuple(sorted(self.class_weights.items())), self.replacement, self.num_samples))

    def describe(self) -> str:
        draws = f"{self.num_samples} draws" if self.num_samples else "as many draws as the cut holds"
        how = "with" if self.replacement else "without"
        return (
            f"{draws} {how} replacement, class weights {_ratios(self.class_weights)}, from {self.selection.describe()}"
        )

    def select(self, labels: np.ndarray, ious: np.ndarray, seed: int) -> np.ndarray:
        return self.selection.select(labels, ious, seed)

    def draw(self, selection: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """`num_samples` draws, each row with probability proportional to its class weight: i.i.d. (with
        replacement) or successively without replacement, as torch's WeightedRandomSampler draws.

        Written per class rather than with `rng.choice(p=...)` (one CDF search per draw: 14 s for 10M rows on 2
        cores, at every epoch start and every resume): all weights of a class are equal, so the same distributions
        come from class counts and uniform draws within each class (0.3 s and ~1 s).
        """
        by_class = [selection[labels[selection] == c] for c in (0, 1)]
        w = np.array([self.class_weights[c] for c in (0, 1)], dtype=np.float64)
        n = self.num_samples or len(selection)
        if self.replacement:
            # i.i.d. draws: the count per class is multinomial over the classes' masses, each draw uniform within.
            mass = w * [len(rows) for rows in by_class]
            counts = rng.multinomial(n, mass / mass.sum())
            drawn = [rows[rng.integers(0, len(rows), k)] for rows, k in zip(by_class, counts) if k]
            return rng.permutation(np.concatenate(drawn))
        nonzero = sum(len(rows) for rows, weight in zip(by_class, w) if weight > 0)
        if n > nonzero:
            raise ConfigError(
                f"weighted sampler without replacement cannot draw {n} of {nonzero} samples with non-zero weight: "
                f"lower num_samples (None: the selection's size) or draw with replacement"
            )
        return _successive(by_class, w, n, rng)

    def check(self, selection: np.ndarray, labels: np.ndarray, threshold: float | None) -> None:
        """Refuse class weights that leave nothing to draw, naming counts, weights and labels."""
        w = self.class_weights
        counts = {c: int((labels[selection] == c).sum()) for c in (0, 1)}
        if sum(w[c] * counts[c] for c in (0, 1)) == 0:
            raise ConfigError(
                f"sampler {self.name!r} has nothing to draw: class weights {w} give zero weight to every sample "
                f"of the selection ({counts[0]} no crack, {counts[1]} crack; {label_source(threshold)}); "
                f"give a present class a positive weight or change the IoU threshold"
            )


@dataclass(frozen=True)
class Balanced(Weighted):
    """No duplicates, and a class mix that follows the weights: the largest such subset, permuted."""

    name: ClassVar[str] = "balanced"
    replacement: bool = field(default=False, init=False, repr=False)  # not an option: never draws twice
    num_samples: int | None = field(default=None, init=False, repr=False)  # not an option: the largest subset

    def draw(self, selection: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        by_class = {c: selection[labels[selection] == c] for c in (0, 1)}
        mass = {c: self.class_weights[c] * len(by_class[c]) for c in (0, 1)}
        share = {c: mass[c] / sum(mass.values()) for c in (0, 1)}
        # The largest epoch in which no class needs more samples than it has.
        size = min(len(by_class[c]) / share[c] for c in (0, 1) if share[c] > 0)
        take = {c: min(len(by_class[c]), round(share[c] * size)) for c in (0, 1)}
        subset = np.concatenate([rng.choice(by_class[c], size=take[c], replace=False) for c in (0, 1)])
        return rng.permutation(subset)

    def describe(self) -> str:
        weights = _ratios(self.class_weights)
        return f"the largest subset with class weights {weights}, no duplicates, from {self.selection.describe()}"

    __hash__ = Weighted.__hash__  # dataclass would generate one over the dict


@dataclass(frozen=True)
class Rcnn(Weighted):
    """R-CNN's fine-tuning mini-batches (Girshick et al. 2014, section 2.3: "we uniformly sample 32 positive windows
    and 96 background windows to construct a mini-batch of size 128"): draw i of the epoch is a positive exactly
    when floor((i + 1) * positive_share) > floor(i * positive_share), so every stretch of B consecutive draws (a
    global batch, and each rank's part of it) holds B * positive_share positives, give or take one. Positives are
    a fresh permutation each time they run out (each one used once before any twice: they are few), background the
    same; `num_samples` draws per epoch (None: the selection's size)."""

    name: ClassVar[str] = "rcnn"
    class_weights: dict[int, float] = field(default_factory=lambda: dict(CLASS_WEIGHTS), init=False, repr=False)
    replacement: bool = field(default=True, init=False, repr=False)  # not an option: positives repeat by design
    positive_share: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        share = self.positive_share
        if not (is_number(share) and 0 < share < 1):
            raise ConfigError(f"sampler option positive_share must be a number in (0, 1), got {share!r}")
        object.__setattr__(self, "positive_share", float(share))
        if self.num_samples is not None:
            self._check_draws(self.num_samples)

    def _check_draws(self, n: int) -> None:
        """Refuse an epoch of `n` draws without a positive one (a share below 1 always leaves background draws)."""
        positives = math.floor(n * self.positive_share)
        if positives < 1:
            raise ConfigError(
                f"sampler option num_samples {n} x positive_share {self.positive_share:g} gives {positives} positive "
                f"and {n - positives} background draws: an epoch needs both; raise num_samples (or give none: the "
                "selection's size) or change positive_share"
            )

    def __hash__(self) -> int:
        return hash((type(self), self.positive_share, self.num_samples, self.selection))

    def draw(self, selection: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n = self.num_samples or len(selection)
        slots = np.arange(n)
        positive = np.floor((slots + 1) * self.positive_share) > np.floor(slots * self.positive_share)
        out = np.empty(n, dtype=np.int64)
        for c, where in ((1, positive), (0, ~positive)):
            rows = selection[labels[selection] == c]
            rounds = -(-int(where.sum()) // len(rows))  # whole permutations, then the first of the last
            out[where] = np.concatenate([rng.permutation(rows) for _ in range(rounds)])[: int(where.sum())]
        return out

    def check(self, selection: np.ndarray, labels: np.ndarray, threshold: float | None) -> None:
        """Refuse a selection without positives or without background: a share of nothing cannot be drawn."""
        self._check_draws(self.num_samples or len(selection))
        counts = {c: int((labels[selection] == c).sum()) for c in (0, 1)}
        if not counts[0] or not counts[1]:
            raise ConfigError(
                f"sampler 'rcnn' draws {self.positive_share:g} positives and the rest background, and the selection "
                f"has {counts[1]} crack and {counts[0]} no-crack samples ({label_source(threshold)}): choose "
                f"another sampler or change the IoU threshold"
            )

    def describe(self) -> str:
        draws = f"{self.num_samples} draws" if self.num_samples else "as many draws as the cut holds"
        return (
            f"R-CNN's mini-batches: {draws}, {self.positive_share:.0%} positive in every batch, "
            f"from {self.selection.describe()}"
        )


Sampler = Shuffle | Weighted
SAMPLERS: dict[str, type[Shuffle] | type[Weighted]] = {
    c.name: c for c in (Shuffle, HardNegatives, IouStrata, Weighted, Balanced, Rcnn)
}
CUT_OPTIONS = ("selection", "negatives", "per_bin", "bin_width")  # how the flat options name a weighting's cut


def own_options(name: str, classes: dict = SAMPLERS) -> tuple[str, ...]:
    """The options a sampler (or a selection, with `classes=SELECTIONS`) has as its own fields."""
    return tuple(f.name for f in dataclasses.fields(classes[name]) if f.init)


def options_of(sampler: str, selection: str = "all") -> tuple[str, ...]:
    """The flat option names (`make_sampler`'s keywords) that `sampler` takes with this `selection`: its own
    fields and, for a weighting, `selection` and the fields of that cut."""
    own = own_options(sampler)
    if "selection" not in own:
        return own
    return (*own, *own_options(selection if selection in SELECTIONS else "all", SELECTIONS))


def every_option() -> tuple[str, ...]:
    """Every keyword some sampler takes through `make_sampler` (its own fields, `selection`, the cuts' fields)."""
    names = [o for name in SAMPLERS for o in own_options(name)] + [
        o for c in SELECTIONS for o in own_options(c, SELECTIONS)
    ]
    return tuple(dict.fromkeys(names))


def _owner(option: str) -> str:
    """Which samplers take `option`, in words ("" for one no sampler takes)."""
    samplers = [repr(name) for name in SAMPLERS if option in own_options(name)]
    cuts = [repr(name) for name in SELECTIONS if option in own_options(name, SELECTIONS)]
    if not samplers:
        return ""
    via = f" (and 'weighted' or 'balanced' with selection={cuts[0]})" if cuts else ""
    return f"{option} is an option of sampler {' or '.join(samplers)}{via}"


def make_sampler(sampler: str, **options) -> Shuffle | Weighted:
    """A sampler from its name and flat options, as the CLI and `make_loader(sampler="weighted", ...)` give
    them: the cut of weighted/balanced as `selection="hard-negatives"` (or "iou-strata", "all") plus that
    cut's own options.

    Raises:
        ConfigError: an unknown sampler or selection, an option the sampler (with that selection) does not
            take, or a value out of range.
    """
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        hint = closest(str(sampler), SAMPLERS) if isinstance(sampler, str) else ""
        raise ConfigError(f"unknown sampler {sampler!r}{hint} (choose one of {', '.join(SAMPLERS)})")
    cls = SAMPLERS[sampler]
    selection = options.get("selection", "all")
    if isinstance(selection, Shuffle) and "selection" in options_of(sampler):  # a cut given as its class
        takes = options_of(sampler, "all")
    elif "selection" in options_of(sampler) and not (isinstance(selection, str) and selection in SELECTIONS):
        hint = closest(selection, SELECTIONS) if isinstance(selection, str) else ""
        raise ConfigError(
            f"selection must be one of {', '.join(SELECTIONS)} or a cut such as HardNegatives(800), got "
            f"{selection!r}{hint}"
        )
    else:
        takes = options_of(sampler, selection)
    unknown = sorted(set(options) - set(takes))
    if unknown:
        where = "".join(f"; {_owner(option)}" for option in unknown)
        raise ConfigError(f"sampler {sampler!r} takes {sorted(takes) or 'no options'}, not {unknown}{where}")
    if "selection" not in takes:
        return cls(**options)
    if isinstance(selection, Shuffle):
        cut = options.pop("selection")
    else:
        cut_names = {f.name for f in dataclasses.fields(SELECTIONS[selection])}
        cut = SELECTIONS[options.pop("selection", "all")](**{k: options.pop(k) for k in cut_names if k in options})
    weighting: type[Weighted] = cls  # type: ignore[assignment]  # the classes with a selection
    return weighting(**options, selection=cut)


def epoch_draws(
    sampler: Shuffle | Weighted,
    selection: np.ndarray,
    labels: np.ndarray,
    seed: int,
    epoch: int,
    train: bool,
    stream: tuple[int, ...] = (),
) -> np.ndarray:
    """The whole epoch's sequence of row ids (train: the sampler's draws; eval: the selection in index order),
    before it is split between ranks: a pure function of the arguments. `stream` keys further draws of the same
    epoch apart (a mixture's pack and round: crackio.loading.mixture)."""
    if not train:
        return selection
    return sampler.draw(selection, labels, np.random.default_rng([seed, _SEED_ORDER, epoch, *stream]))
