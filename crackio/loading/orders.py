"""Where an epoch's draws go: one global sequence per epoch, cut into global batches, and each global batch
dealt to the ranks. The sequence is a pure function of (draws, seed, epoch) and the order's settings, never of
the number of ranks, so a run can stop at one world size and resume at another with the same global batches
(the samplers, crackio.loading.samplers, decide the draws). One small class per training order, as ffcv's
traversal orders; evaluation is cut by `eval_batches`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from crackio.errors import ConfigError, integer

_SEED_BLOCK = 0xB10C


def check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world_size {world_size}")


@dataclass(frozen=True)
class RandomOrder:
    """The sampler's draws as drawn: every batch from the whole split, one random read per sample.

    Rank r of W takes positions [r*b, (r+1)*b) of each global batch of G = b*W samples.
    """

    name: ClassVar[str] = "random"

    def sequence(self, draws: np.ndarray, num_rows: int, seed: int, epoch: int) -> np.ndarray:
        """The epoch's global sequence of row ids (every rank computes the same)."""
        return draws

    def deal(self, grid: np.ndarray, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Rank `rank`'s part of every global batch: (row ids, steps x b; their positions within the global
        batch, steps x b int64). `grid` is the epoch's row ids as steps x G."""
        b = grid.shape[1] // world_size
        return grid[:, rank * b : (rank + 1) * b], np.broadcast_to(np.arange(rank * b, (rank + 1) * b), (len(grid), b))


@dataclass(frozen=True)
class BlockOrder:
    """Runs of consecutive index rows (blocks: consecutive bytes of a tar whose rows the packer already
    shuffled globally) in a seeded random order, shuffled within windows of `window` blocks (MosaicML
    Streaming's block shuffles, FFCV's quasi-random order): sequential reads for shards on a network file
    system, a spinning disk or a split larger than memory.

    The sequence is global (the same at every world size). Each global batch is dealt by row id: rank r takes
    the r-th run of its rows sorted by position on disk, so a rank reads about `window / W` blocks of each
    window instead of all of them. The cost against the per-rank order this replaced (each rank its own
    contiguous part of the blocks): where two ranks' runs meet, a block is read by both, and the meeting point
    moves from batch to batch. Measured with `tools/bench_scale.py plan` (10M rows, global batch 256, 8 ranks):
    each rank reads 1.44 rows per row it trains on (1.00 at one rank); a larger window does not help (1.82 at
    64 blocks).
    """

    name: ClassVar[str] = "block"
    block_size: int = 128
    window: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_size", integer("block_size", self.block_size, 1))
        object.__setattr__(self, "window", integer("window", self.window, 1))

    def sequence(self, draws: np.ndarray, num_rows: int, seed: int, epoch: int) -> np.ndarray:
        """Every draw with its count, grouped by block, blocks in a seeded order, each run of `window` blocks'
        rows shuffled: a pure function of the arguments."""
        counts = np.bincount(draws, minlength=num_rows)
        rows = np.repeat(np.arange(num_rows), counts)  # every draw, in row order: each block's draws are a segment
        blocks = -(-num_rows // self.block_size)
        per_block = np.bincount(rows // self.block_size, minlength=blocks)
        visit = np.random.default_rng([seed, _SEED_BLOCK, epoch]).permutation(blocks)  # blocks in a seeded order
        # The segments in that order, gathered in one pass (an argsort by block took 3x as long on 10M rows).
        lengths = per_block[visit]
        starts = (np.cumsum(per_block) - per_block)[visit]
        sequence = rows[np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(len(rows))]
        rng = np.random.default_rng([seed, _SEED_BLOCK, epoch, 1])
        span = self.window * self.block_size
        for start in range(0, len(sequence), span):
            sequence[start : start + span] = rng.permutation(sequence[start : start + span])
        return sequence

    def deal(self, grid: np.ndarray, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
        if world_size == 1:
            return RandomOrder().deal(grid, rank, world_size)  # one rank reads the whole global batch
        b = grid.shape[1] // world_size
        # The positions holding the rank*b-th to ((rank+1)*b-1)-th smallest (row id, position): a partial sort (half
        # the time of an argsort) of keys made unique, so that the ranks' parts never overlap where a row is drawn
        # twice. Then in position order.
        keys = grid * grid.shape[1] + np.arange(grid.shape[1])
        within = np.argpartition(keys, [rank * b, (rank + 1) * b - 1], axis=1)[:, rank * b : (rank + 1) * b]
        within.sort(axis=1)
        return np.take_along_axis(grid, within, axis=1), within


Order = RandomOrder | BlockOrder


def global_batches(sequence: np.ndarray, global_batch: int, rank: int, world_size: int) -> np.ndarray:
    """The epoch's `sequence` as steps x global_batch: global batch s is sequence[s*G : (s+1)*G] at every world
    size; the tail that does not fill one is dropped (the original's DataLoader kept it; equal full batches keep
    every rank in step and the sequence independent of W).

    Raises:
        ConfigError: a global batch the ranks cannot share equally, or a split that cannot fill one.
    """
    check_rank(rank, world_size)
    if global_batch % world_size:
        raise ConfigError(f"a global batch of {global_batch} cannot be shared equally by {world_size} ranks")
    steps = len(sequence) // global_batch
    if steps == 0:
        raise ConfigError(
            f"{len(sequence)} samples cannot fill one batch of {global_batch // world_size} on "
            f"{world_size} rank(s); lower batch_size"
        )
    return sequence[: steps * global_batch].reshape(steps, global_batch)


def epoch_grid(
    draws: np.ndarray, num_rows: int, seed: int, epoch: int, order: Order, global_batch: int, rank: int, world_size: int
) -> np.ndarray:
    """A training epoch's global batches (steps x global_batch row ids): the same at every world size."""
    return global_batches(order.sequence(draws, num_rows, seed, epoch), global_batch, rank, world_size)


def train_plan(
    draws: np.ndarray, num_rows: int, seed: int, epoch: int, order: Order, global_batch: int, rank: int, world_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """A training epoch on one rank: (row ids, steps x b; each one's position within its global batch, the key of
    its augmentation: crackio.loading.augment.draw_params). What every epoch start and every
    `Loader.load_state_dict` compute; nothing is read."""
    grid = epoch_grid(draws, num_rows, seed, epoch, order, global_batch, rank, world_size)
    return order.deal(grid, rank, world_size)


def eval_batches(order: np.ndarray, batch_size: int, rank: int, world_size: int) -> list[np.ndarray]:
    """This rank's evaluation batches: every sample exactly once, nothing padded, every rank the same number of
    batches. The order is cut into world_size * B near-equal batches (each <= batch_size) dealt round-robin."""
    check_rank(rank, world_size)
    per_rank = math.ceil(math.ceil(len(order) / world_size) / batch_size)
    if per_rank * world_size > len(order):  # some batch would be empty: impossible without padding
        raise ConfigError(
            f"{len(order)} eval samples cannot give {world_size} rank(s) {per_rank} non-empty "
            f"batch(es) each; raise the batch size or use fewer ranks"
        )
    parts = np.array_split(order, per_rank * world_size)
    return parts[rank::world_size]


def eval_consumed(samples: int, batch_size: int, world_size: int) -> np.ndarray:
    """Samples all ranks have evaluated after each step of `eval_batches` (0 first, then one per step)."""
    per_rank = math.ceil(math.ceil(samples / world_size) / batch_size)
    parts = per_rank * world_size
    sizes = np.full(parts, samples // parts, np.int64)
    sizes[: samples % parts] += 1  # np.array_split's sizes
    return np.concatenate([[0], np.cumsum(sizes.reshape(per_rank, world_size).sum(1))])
