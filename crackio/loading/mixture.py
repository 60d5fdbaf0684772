"""Several packs in one loader: how many samples each pack gives to an epoch, and the mixed sequence.

The rule (docs/loader.md, "Mixtures"): an epoch has a fixed size N, the packs' epochs under the sampler together
(or the sampler's `num_samples`), rounded down to whole global batches (training drops a partial last batch: the
packs' shares are of what is trained on); pack p gives exactly its share of N (the mix's proportion, largest-remainder
rounding; without a mix, its own epoch's size); its sampler acts within it, and a pack whose share is larger than
its epoch draws further epochs of its sampler (a fresh seeded order each) until the share is filled, while one with
a smaller share gives the first draws of its epoch (a seeded subset). The packs' contributions are then shuffled
together. The sequence is a pure function of (packs, mix, sampler, seed, epoch): never of ranks or workers, so the
orders (crackio.loading.orders) cut it into the same global batches at every world size.

Like Mosaic Streaming's stream `proportion`, LitData's `CombinedStreamingDataset(weights=...)` and torchdata's
`MultiNodeWeightedSampler`, but the counts are exact per epoch rather than expected, which is what lets a mixture
resume exactly and elastically (a state is the epoch and the samples consumed, as for one pack).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from crackio.errors import ConfigError, is_number
from crackio.loading.samplers import Shuffle, Weighted

_SEED_MIX = 0x313C5  # the interleaving's stream, apart from selection and order


def check_mix(mix: object, packs: int, name: str = "mix") -> tuple[float, ...] | None:
    """`mix` as proportions, one per pack: finite, non-negative, not all 0 (only ratios matter: 0.3,0.7 and 3,7
    mix alike); None (concatenate) stays None.

    Raises:
        ConfigError: not a list of numbers, a count other than the packs', or proportions that are negative,
            infinite or all 0.
    """
    if mix is None:
        return None
    if isinstance(mix, str | bytes) or not hasattr(mix, "__len__"):
        raise ConfigError(f"{name} must be one proportion per pack, e.g. [0.3, 0.7] for two packs, got {mix!r}")
    values = list(mix)  # type: ignore[call-overload]
    if len(values) != packs:
        raise ConfigError(
            f"{name} gives {len(values)} proportion(s) for {packs} pack(s): give one per pack, in the packs' order "
            f"(e.g. {[round(1 / packs, 3)] * packs})"
        )
    if not all(is_number(v, 0) for v in values) or not any(v > 0 for v in values):
        raise ConfigError(
            f"{name} proportions must be finite numbers >= 0, not all 0 (e.g. [0.3, 0.7]), got {values!r}"
        )
    return tuple(float(v) for v in values)


def check_distinct(sources: list, option: str = "shards", more: str = "") -> None:
    """Refuse packs (`crackio.storage.packs.Pack`s) that name one pack twice, by content (its manifest's SHA-256:
    a copy, a link or an upload of it is the same pack): its samples would count twice. `option` names the argument
    in the message, `more` is added to its advice.

    Raises:
        ConfigError: naming both locations.
    """
    seen: dict[str, str] = {}
    for source in sources:
        if source.sha256 in seen:
            raise ConfigError(
                f"{option} names one pack twice ({seen[source.sha256]} and {source.location}, the same manifest): "
                f"give each pack once{more}"
            )
        seen[source.sha256] = source.location


def pack_of(offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Which pack each of a mixture's row ids is from (pack p's rows start at offsets[p]); int64, rows' shape."""
    return np.searchsorted(offsets, np.asarray(rows, np.int64), side="right") - 1


def by_pack(offsets: np.ndarray, rows: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(pack, positions in `rows`, that pack's own row ids) for each pack `rows` touches, packs in order."""
    rows = np.asarray(rows, np.int64)
    pack = pack_of(offsets, rows)
    return [(int(p), np.flatnonzero(pack == p), rows[pack == p] - offsets[p]) for p in np.unique(pack)]


def pack_names(locations: list[str]) -> list[str]:
    """Short names for a mixture's packs, for reports and `--val-pack`: each location's last part ("site_a" for
    /data/site_a or s3://bucket/site_a), with its parent's when two would be alike ("a/shards", "b/shards"), and
    a number after that ("shards#2")."""
    parts = [str(loc).replace("\\", "/").rstrip("/").split("/") for loc in locations]
    for depth in (1, 2):
        names = ["/".join(p[-depth:]) or str(loc) for p, loc in zip(parts, locations)]
        if len(set(names)) == len(names):
            return names
    return [f"{name}#{i + 1}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def largest_remainder(weights: list[float], total: int) -> list[int]:
    """`total` split in proportion to `weights` in integers that add up to it exactly: each gets the floor of its
    quota, and what is left goes one each to the largest remainders (the first pack first on a tie)."""
    top = max(weights)
    scaled = [w / top for w in weights]  # 1e308 twice would overflow the sum
    quotas = [total * w / sum(scaled) for w in scaled]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda p: (-(quotas[p] - counts[p]), p))
    for p in order[: total - sum(counts)]:
        counts[p] += 1
    return counts


def per_pack_sampler(sampler: Shuffle | Weighted) -> Shuffle | Weighted:
    """The sampler each pack of a mixture draws with: the run's, except that a weighting's `num_samples` sizes the
    mixture's epoch rather than each pack's (each pack's epoch is then its cut's size)."""
    if isinstance(sampler, Weighted) and sampler.num_samples is not None:  # weighted, rcnn (balanced has none)
        return dataclasses.replace(sampler, num_samples=None)
    return sampler


@dataclass(frozen=True)
class Share:
    """What one pack gives to one epoch: `share` samples, against its own epoch of `epoch` draws."""

    share: int
    epoch: int

    def describe(self) -> str:
        if self.share > self.epoch:
            return f"{self.share} (its {self.epoch} repeated {self.share / self.epoch:.2f}x, fresh orders)"
        if self.share < self.epoch:
            return f"{self.share} (a seeded subset of its {self.epoch})"
        return str(self.share)


def shares(
    mix: tuple[float, ...] | None,
    epochs: list[int],
    selections: list[int],
    num_samples: int | None,
    batch: int = 1,
    where: list[str] | None = None,
) -> list[Share]:
    """Each pack's share of an epoch. `epochs`: each pack's draws under its sampler; `selections`: each pack's
    selected samples; `num_samples`: the run's sampler's, when set (the epoch's size).

    Without a mix, each pack gives its own epoch (or, with num_samples, a part in proportion to its selection)."""
    total = num_samples if num_samples is not None else sum(epochs)
    total -= total % batch  # whole global batches: the shares are what an epoch trains on
    if mix is None:
        weights = [float(n) for n in (selections if num_samples is not None else epochs)]
    else:
        weights = list(mix)
    counts = largest_remainder(weights, total) if sum(weights) > 0 else [0] * len(epochs)
    for share, n, p in zip(counts, epochs, range(len(epochs))):
        if share and not n:
            named = f" ({where[p]})" if where else ""
            raise ConfigError(
                f"pack {p + 1} of the mixture{named} has no samples to draw in this split under the sampler but its "
                f"share is {share}: give it proportion 0 in the mix, or leave it out"
            )
    return [Share(s, n) for s, n in zip(counts, epochs)]


def mixed_sequence(
    draw, mix: tuple[float, ...] | None, sizes: list[int], selections: list[int], num_samples: int | None,
    offsets: np.ndarray, seed: int, epoch: int, batch: int = 1, where: list[str] | None = None,
) -> tuple[np.ndarray, list[Share]]:  # fmt: skip
    """The epoch's global sequence of row ids over the packs (pack p's rows from offsets[p]), and the shares.

    `draw(p, round)` is pack p's `round`-th epoch of draws under its sampler (round 0: this epoch's; further rounds
    fill a share larger than one epoch, each in a fresh seeded order); `sizes` are those epochs' lengths; `batch`
    the global batch (the epoch is whole global batches); `where` names the packs in messages."""
    plan = shares(mix, sizes, selections, num_samples, batch, where)
    parts = []
    for p, share in enumerate(plan):
        taken: list[np.ndarray] = []
        count = 0
        while count < share.share:
            taken.append(draw(p, len(taken)))
            count += len(taken[-1])
        rows = np.concatenate(taken)[: share.share] if taken else np.zeros(0, np.int64)
        parts.append(rows.astype(np.int64) + offsets[p])
    rng = np.random.default_rng([seed, _SEED_MIX, epoch])
    return rng.permutation(np.concatenate(parts)), plan
