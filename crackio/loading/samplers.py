"""Index-level samplers: which samples an epoch holds, in which order, on which rank.

Everything here works on the in-memory index arrays (labels, IoUs); no image file
is listed or opened. An epoch's batches are a pure function of
(sampler options, seed, epoch, rank, world_size).

Selection (fixed for the run, from the seed):
    shuffle          every sample
    hard-negatives   every positive + the `negatives` negatives with the highest IoU
                     (the original's `filter_and_sort_images`: 800 train, 200 valid)
    iou-strata       every positive + up to `per_bin` random negatives per IoU bin
Order (per epoch):
    shuffle, hard-negatives, iou-strata: a permutation (train) or index order (eval)
    weighted    `torch.utils.data.WeightedRandomSampler` semantics: `num_samples` draws
                with probability proportional to `class_weights[label]`, with or without
                replacement. NB: without replacement and num_samples = all (the
                original's setting) every sample is drawn exactly once, so only the
                order changes, not the class mix.
    balanced    no duplicates and a class mix that really follows the weights: the
                largest subset whose class shares are w_c*n_c / sum_k w_k*n_k, i.e. the
                mix `weighted` with replacement gives in expectation.
weighted and balanced draw from every sample, or with `selection="hard-negatives"` or
"iou-strata" (and that selection's options) from that cut: the original weighted its
already filtered list.
"""

from __future__ import annotations

import math

import numpy as np

from crackio.errors import ConfigError

SAMPLERS = ("shuffle", "hard-negatives", "iou-strata", "weighted", "balanced")
SELECTIONS = ("all", "hard-negatives", "iou-strata")
CLASS_WEIGHTS: dict[int, float] = {0: 1, 1: 2}  # the original's WeightedRandomSampler weights
_CUT: dict[str, object] = {"selection": "all", "negatives": 800, "per_bin": 10, "bin_width": 0.05}  # weighting's cut
DEFAULTS: dict[str, dict[str, object]] = {
    "hard-negatives": {"negatives": 800},
    "iou-strata": {"per_bin": 10, "bin_width": 0.05},
    "weighted": {"class_weights": CLASS_WEIGHTS, "replacement": True, "num_samples": None, **_CUT},
    "balanced": {"class_weights": CLASS_WEIGHTS, **_CUT},
    "shuffle": {},
}
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


def check_drawable(
    selection: np.ndarray, labels: np.ndarray, sampler: str, options: dict, threshold: float | None
) -> None:
    """Refuse class weights that leave nothing to draw, naming counts, weights and labels.

    Raises:
        ConfigError: e.g. class_weights {0: 0, 1: 1} on a selection without a crack sample.
    """
    if "class_weights" not in options:
        return
    w = options["class_weights"]
    counts = {c: int((labels[selection] == c).sum()) for c in (0, 1)}
    if sum(w[c] * counts[c] for c in (0, 1)) == 0:
        raise ConfigError(
            f"sampler {sampler!r} has nothing to draw: class weights {w} give zero weight to every sample "
            f"of the selection ({counts[0]} no crack, {counts[1]} crack; {label_source(threshold)}); "
            f"give a present class a positive weight or change the IoU threshold"
        )


def sampler_options(sampler: str, options: dict) -> dict:
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    allowed = DEFAULTS[sampler]
    unknown = set(options) - set(allowed)
    if unknown:
        raise ConfigError(f"sampler {sampler!r} takes {sorted(allowed) or 'no options'}, not {sorted(unknown)}")
    merged = {**allowed, **options}
    if merged.get("selection", "all") not in SELECTIONS:
        raise ConfigError(f"selection must be one of {', '.join(SELECTIONS)}, got {merged['selection']!r}")
    if "class_weights" in merged:
        given = merged["class_weights"]
        try:
            w = {int(k): float(v) for k, v in dict(given).items()}
        except (TypeError, ValueError):
            raise ConfigError(
                f"class_weights must map classes 0 and 1 to weights, e.g. {{0: 1, 1: 2}}, got {given!r}"
            ) from None
        if set(w) != {0, 1} or not all(math.isfinite(v) and v >= 0 for v in w.values()) or max(w.values()) == 0:
            raise ConfigError(
                f"class_weights must give finite, non-negative weights (not both 0) for classes 0 and 1, got {given!r}"
            )
        top = max(w.values())  # scaled to a maximum of 1: only ratios matter, and 1e308 * n would overflow
        merged["class_weights"] = {c: v / top for c, v in w.items()}
    checks = {
        "negatives": lambda v: _integer(v) and v >= 0,
        "per_bin": lambda v: _integer(v) and v >= 1,
        "bin_width": lambda v: isinstance(v, int | float) and math.isfinite(v) and 0 < v <= 1,
        "num_samples": lambda v: v is None or (_integer(v) and v >= 1),
        "replacement": lambda v: isinstance(v, bool | np.bool_),
    }
    need = {
        "negatives": "an integer >= 0",
        "per_bin": "an integer >= 1",
        "bin_width": "a number in (0, 1]",
        "num_samples": "None or an integer >= 1",
        "replacement": "True or False",
    }
    for name, ok in checks.items():
        if name in merged and not ok(merged[name]):
            raise ConfigError(f"sampler option {name} must be {need[name]}, got {merged[name]!r}")
        if name in merged and _integer(merged[name]):
            merged[name] = int(merged[name])  # numpy integers in, plain ints for every later use
    return merged


def _integer(v) -> bool:
    return bool(isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_) and v < 2**40)


def select(labels: np.ndarray, ious: np.ndarray, sampler: str, options: dict, seed: int) -> np.ndarray:
    """Row ids in the run's selection (sorted), after relabeling."""
    rows = np.arange(len(labels))
    pos, neg = rows[labels == 1], rows[labels == 0]
    cut = options.get("selection", sampler)  # weighted / balanced name their cut; the others are one
    if cut == "hard-negatives":
        # Stable sort: ties keep index order, as the original's sorted(..., reverse=True) keeps list order.
        hardest = neg[np.argsort(-ious[neg], kind="stable")[: options["negatives"]]]
        return np.sort(np.concatenate([pos, hardest]))
    if cut == "iou-strata":
        rng = np.random.default_rng([seed, _SEED_SELECT])
        bins = np.floor(ious[neg] / options["bin_width"]).astype(np.int64)
        keep = []
        for b in np.unique(bins):
            members = neg[bins == b]
            keep.append(rng.choice(members, size=min(options["per_bin"], len(members)), replace=False))
        return np.sort(np.concatenate([pos, *keep]))
    return rows


def epoch_order(
    selection: np.ndarray, labels: np.ndarray, sampler: str, options: dict, seed: int, epoch: int, train: bool
) -> np.ndarray:
    """The whole epoch's sequence of row ids, before it is split between ranks."""
    if not train:
        return selection
    rng = np.random.default_rng([seed, _SEED_ORDER, epoch])
    if sampler == "weighted":
        w = np.array([options["class_weights"][int(c)] for c in (0, 1)])[labels[selection]]
        n = options["num_samples"] or len(selection)
        if not options["replacement"] and n > np.count_nonzero(w):
            raise ConfigError(
                f"weighted sampler without replacement cannot draw {n} of "
                f"{np.count_nonzero(w)} samples with non-zero weight"
            )
        return rng.choice(selection, size=n, replace=options["replacement"], p=w / w.sum())
    if sampler == "balanced":
        return rng.permutation(balanced_subset(selection, labels, options["class_weights"], rng))
    return rng.permutation(selection)


def balanced_subset(selection: np.ndarray, labels: np.ndarray, weights: dict, rng) -> np.ndarray:
    by_class = {c: selection[labels[selection] == c] for c in (0, 1)}
    mass = {c: weights[c] * len(by_class[c]) for c in (0, 1)}
    share = {c: mass[c] / sum(mass.values()) for c in (0, 1)}
    # The largest epoch in which no class needs more samples than it has.
    size = min(len(by_class[c]) / share[c] for c in (0, 1) if share[c] > 0)
    take = {c: min(len(by_class[c]), round(share[c] * size)) for c in (0, 1)}
    return np.concatenate([rng.choice(by_class[c], size=take[c], replace=False) for c in (0, 1)])


def rank_batches(order: np.ndarray, batch_size: int, rank: int, world_size: int, train: bool) -> list[np.ndarray]:
    """This rank's batches; every rank gets the same number of batches.

    Train drops the tail that does not fill a batch on every rank. Eval keeps every
    sample exactly once and pads nothing: the order is cut into world_size * B
    near-equal batches (each <= batch_size) dealt round-robin to the ranks.
    """
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world_size {world_size}")
    if train:
        per_step = batch_size * world_size
        steps = len(order) // per_step
        if steps == 0:
            raise ConfigError(
                f"{len(order)} samples cannot fill one batch of {batch_size} on "
                f"{world_size} rank(s); lower the batch size"
            )
        grid = order[: steps * per_step].reshape(steps, world_size, batch_size)
        return list(grid[:, rank])
    per_rank = math.ceil(math.ceil(len(order) / world_size) / batch_size)
    if per_rank * world_size > len(order):  # some batch would be empty: impossible without padding
        raise ConfigError(
            f"{len(order)} eval samples cannot give {world_size} rank(s) {per_rank} non-empty "
            f"batch(es) each; raise the batch size or use fewer ranks"
        )
    parts = np.array_split(order, per_rank * world_size)
    return parts[rank::world_size]


_SEED_BLOCK = 0xB10C


def block_order(
    draws: np.ndarray, num_rows: int, block_size: int, window: int, seed: int, epoch: int, rank: int, world_size: int
) -> np.ndarray:
    """This rank's sequence of row ids for an epoch in block order (train only).

    `draws` is the epoch's sampler output (`epoch_order`): which rows, how many times each.
    Blocks are runs of `block_size` consecutive index rows, i.e. consecutive bytes of a tar whose
    rows the packer already shuffled globally. Every drawn row is kept with its count and grouped
    by block; the blocks are visited in a seeded random order; the sequence is cut into `world_size`
    equal contiguous parts (the remainder, < world_size rows, dropped), so each rank reads its own
    blocks; within each rank's part, every run of `window * block_size` rows is shuffled (the shuffle
    buffer). Like MosaicML Streaming's block shuffles and FFCV's quasi-random order; a pure function
    of the arguments. Each rank gets the same length, so `rank_batches`-style cutting into batches
    gives every rank the same number of steps as `random` order would.
    """
    if block_size < 1 or window < 1:
        raise ConfigError(f"block_size and window must be >= 1, got {block_size} and {window}")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world_size {world_size}")
    counts = np.bincount(draws, minlength=num_rows)
    rows = np.repeat(np.arange(num_rows), counts)  # every draw, in row order
    blocks = -(-num_rows // block_size)
    place = np.empty(blocks, np.int64)
    place[np.random.default_rng([seed, _SEED_BLOCK, epoch]).permutation(blocks)] = np.arange(blocks)
    sequence = rows[np.argsort(place[rows // block_size], kind="stable")]  # blocks in the seeded order
    part = len(sequence) // world_size
    mine = sequence[rank * part : (rank + 1) * part].copy()
    rng = np.random.default_rng([seed, _SEED_BLOCK, epoch, rank, world_size])
    span = window * block_size
    for start in range(0, len(mine), span):
        mine[start : start + span] = rng.permutation(mine[start : start + span])
    return mine
