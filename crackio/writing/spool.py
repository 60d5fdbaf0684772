"""The proposal stage's spool: each split's crops in photo order, bytes in a file (OUT/.spool/<crc>.bin) and
rows in memory, so the global shuffle needs no photo decoded twice; then the split's shards are written from it
by crackio.writing.splits, as pack writes its own."""

from __future__ import annotations

import contextlib
import hashlib
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from crackio.fsio import write_error
from crackio.writing.filenames import format_name
from crackio.writing.splits import Sample, WrittenSplit, shard_slices, split_order, write_split
from crackio.writing.workers import check_stop, tick

SPOOL = ".spool"


class Spool:
    """One split's crops in photo order: bytes in a file, rows in memory."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, dtype
        try:
            self.file = open(path, "wb")
        except OSError as e:
            raise write_error(path, e) from None
        self.rows: list[np.ndarray] = []
        self.where: list[tuple[int, int]] = []  # (offset, size) in the spool
        self.digests: list[bytes] = []
        self.offset = 0

    def add(self, result) -> None:
        """A photo's crops (crackio.writing.proposal_stage.PhotoResult), in order."""
        rows = np.zeros(len(result.rows), self.dtype)
        for k, ((number, iou, label, box, gt_box, gt_id), jpeg) in enumerate(zip(result.rows, result.jpegs)):
            name = format_name(result.photo.stem, number, iou, label)
            rows[k] = (
                0,  # shard, offset, size, crc32, key: set when the shards are written
                0,
                0,
                0,
                0,
                label,
                iou,
                number,
                name.encode(),
                result.photo.stem.encode(),
                box,
                gt_box,
                gt_id,
                result.size,
            )
            try:
                self.file.write(jpeg)
            except OSError as e:
                raise write_error(self.path, e) from None
            self.where.append((self.offset, len(jpeg)))
            self.digests.append(hashlib.blake2b(jpeg, digest_size=16).digest())
            self.offset += len(jpeg)
        self.rows.append(rows)


class SpoolSource(NamedTuple):
    """One shard's slice of a split's seeded order, read back from the spool (in a worker process)."""

    folder: Path
    split: str
    number: int
    first_key: int
    spool: Path
    rows: np.ndarray  # the slice of the split's index rows in seeded order
    where: np.ndarray  # (offset, size) of each crop in the spool
    digests: np.ndarray  # S16 BLAKE2b of each crop

    def samples(self) -> Iterator[Sample]:
        with open(self.spool, "rb") as f:
            for key, (row, (offset, size), digest) in enumerate(
                zip(self.rows, self.where, self.digests), self.first_key
            ):
                check_stop()
                yield Sample(key, os.pread(f.fileno(), int(size), int(offset)), _meta(row), bytes(digest), "", "")
                tick()


def _meta(row: np.void) -> dict:
    return {
        "filename": row["filename"].decode(),
        "image": row["stem"].decode(),
        "proposal": int(row["proposal"]),
        "iou": round(float(row["iou"]), 3),
        "label": int(row["label"]),
        "box": [round(float(v), 2) for v in row["box"]],
        "gt_box": [round(float(v), 2) for v in row["gt_box"]],
        "gt_id": int(row["gt_id"]),
        "photo_size": [int(v) for v in row["photo_size"]],
    }


def write_spooled_split(
    spool: Spool, out: Path, split: str, seed: int, per: int, workers: int, **stats
) -> WrittenSplit:
    """Shards, index and manifest entry of one split from its spool (the same writer as pack's)."""
    try:
        spool.file.close()
    except OSError as e:
        raise write_error(spool.path, e) from None
    rows = np.concatenate(spool.rows) if spool.rows else np.zeros(0, spool.dtype)
    order = split_order(split, len(rows), seed)  # the same global shuffle and shard slices as tools/pack.py
    rows, where = rows[order], np.asarray(spool.where, np.int64).reshape(-1, 2)[order]
    digests = np.asarray(spool.digests, "S16")[order] if len(rows) else np.zeros(0, "S16")
    sources = [
        SpoolSource(out / split, split, a // per, a, spool.path, rows[a:b], where[a:b], digests[a:b])
        for a, b in shard_slices(len(rows), per)
    ]
    (out / split).mkdir(exist_ok=True)
    return write_split(out / split, split, rows, sources, workers, **stats)


def spool_name(split: str) -> str:
    return f"{SPOOL}/{zlib.crc32(split.encode()):08x}.bin"


def remove_spool(out: Path, splits: set[str]) -> None:
    for split in splits:
        (out / spool_name(split)).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: holds something crackio did not write
        (out / SPOOL).rmdir()
