"""Where an epoch's draws go: which rank, which batch, in which reading order (random or block). Pure
functions of (draws, batch size, rank, world size, seed, epoch); the samplers (crackio.loading.samplers)
decide the draws."""

from __future__ import annotations

import math

import numpy as np

from crackio.errors import ConfigError


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
