"""The proposal stage's spool: the photos' crops in chunks of `CHUNK` photos (in the stage's photo order, one split
per chunk), each chunk two files in OUT/.spool:

    chunk-NNNNNN.bin    the crops' JPEG bytes, one after another
    chunk-NNNNNN.npz    its record: index rows, (offset, size) in the .bin, BLAKE2b digests, counts, problems,
                        the .bin's SHA-256 and the chunk's fingerprint; written last, atomically

A chunk whose record exists, whose fingerprint matches (the run's settings and its photos: path, annotation, size
and modification time of every file read) and whose .bin still has its SHA-256 is complete: an interrupted run
(Ctrl-C, SIGTERM, `kill -9`, a lost Ray node) re-run with the same command reuses it instead of proposing its photos
again. Each split's shards are then written from the chunks by crackio.writing.splits, as pack writes its own: the
global shuffle needs no photo decoded twice, and memory stays bounded (index rows only, ~150 bytes per crop).

A chunk is written by whoever proposed its photos: this process's thread pool, or a Ray task on any node of a
cluster that shares OUT (crackio.writing.cluster). Where the spool is written never changes the pack's bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from crackio.format.index import file_sha256
from crackio.fsio import atomic_write, display_name, write_error
from crackio.writing.filenames import format_name
from crackio.writing.splits import Before, Sample, WrittenSplit, shard_slices, split_order, write_split
from crackio.writing.workers import Runner, check_stop, tick

SPOOL = ".spool"
CHUNK = 16  # photos per chunk: the unit of resume and of a Ray task (~16 s of selective search on one core)
COUNTS = ("photos", "ground_truth_boxes", "recall_hits", "proposals", "regions", "uncapped_hits")


def chunk_files(number: int) -> tuple[str, str]:
    """(bytes, record) of chunk `number`, relative to OUT."""
    return f"{SPOOL}/chunk-{number:06d}.bin", f"{SPOOL}/chunk-{number:06d}.npz"


class Chunk(NamedTuple):
    """Consecutive photos of one split, in the stage's photo order (split, then stem)."""

    number: int
    split: str
    jobs: list  # [(crackio.writing.annotations.Photo, split)]


def plan_chunks(jobs: Sequence[tuple]) -> list[Chunk]:
    """The stage's photos (sorted by split, then stem) cut into chunks of at most CHUNK photos of one split."""
    chunks: list[Chunk] = []
    for photo, split in jobs:
        if not chunks or chunks[-1].split != split or len(chunks[-1].jobs) == CHUNK:
            chunks.append(Chunk(len(chunks), split, []))
        chunks[-1].jobs.append((photo, split))
    return chunks


def _stat(path: Path | None) -> list | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None  # unreadable now: the photo's problem, found when it is proposed
    return [st.st_size, st.st_mtime_ns]


def fingerprint(identity: dict, dtype: np.dtype, chunk: Chunk) -> str:
    """SHA-256 (hex) of what decides a chunk's bytes: the run's settings (`identity`: source, proposal settings,
    seed, ...), the index row layout and, per photo, its split, its annotation (boxes, mask and its rules) and
    the size and modification time of the photo and mask files."""

    def plain(value):
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, Path):
            return display_name(value)
        return str(value)

    photos = [
        {**vars(photo), "split": split, "files": [_stat(photo.path), _stat(photo.mask)]} for photo, split in chunk.jobs
    ]
    text = json.dumps([identity, str(dtype.descr), chunk.split, photos], default=plain, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class ChunkRecord(NamedTuple):
    """A chunk as written: its crops' index rows (locations not yet set), where each crop lies in its .bin, their
    digests, the split's counts over its photos, the problems found, and the seconds spent."""

    number: int
    split: str
    rows: np.ndarray  # index dtype, one per crop, in photo order
    where: np.ndarray  # int64 (N, 2): offset and size in chunk-NNNNNN.bin
    digests: np.ndarray  # S16 BLAKE2b-128 of each crop
    counts: dict  # COUNTS over the chunk's usable photos
    problems: list  # [(path, reason)]
    timing: dict  # search, crops, write (seconds)


def _index_rows(result, dtype: np.dtype) -> np.ndarray:
    rows = np.zeros(len(result.rows), dtype)
    for k, (number, iou, label, box, gt_box, gt_id, ground_truth) in enumerate(result.rows):
        name = format_name(result.photo.stem, number, iou, label)
        # shard, offset, size, crc32 and key are set when the shards are written
        rows[k] = (0, 0, 0, 0, 0, label, iou, number, name.encode(), result.photo.stem.encode(), box, gt_box, gt_id,
                   result.size, ground_truth)  # fmt: skip
    return rows


def write_chunk(out: Path, chunk: Chunk, fp: str, dtype: np.dtype, results: list, crops: Path | None) -> ChunkRecord:
    """Write chunk `chunk.number` from its photos' results (crackio.writing.proposal_stage.PhotoResult, in order):
    the .bin, the original's crop files under `crops` when given, then the record, last.

    Raises:
        WriteError: a file could not be written (naming it).
    """
    import time

    w0 = time.perf_counter()
    counts = dict.fromkeys(COUNTS, 0)
    problems: list[tuple[str, str]] = []
    timing = {"search": 0.0, "crops": 0.0, "write": 0.0}
    rows, where, digests = [], [], []
    offset = 0
    data_name, record_name = chunk_files(chunk.number)
    sha = hashlib.sha256()

    def write_bytes(f) -> None:
        nonlocal offset
        for result in results:
            problems.extend((display_name(result.photo.path), why) for why in result.problems)
            if result.failed:
                continue
            counts["photos"] += 1
            counts["ground_truth_boxes"] += len(result.gt)
            for key in ("recall_hits", "proposals", "regions", "uncapped_hits"):
                counts[key] += getattr(result, key)
            for key in ("search", "crops"):
                timing[key] += result.seconds[key]
            rows.append(_index_rows(result, dtype))
            for jpeg in result.jpegs:
                f.write(jpeg)
                sha.update(jpeg)
                where.append((offset, len(jpeg)))
                digests.append(hashlib.blake2b(jpeg, digest_size=16).digest())
                offset += len(jpeg)
            if crops is not None:  # the original's proposal folder too (--crops)
                _write_crops(crops / result.split, result)

    atomic_write(out / data_name, write_bytes)
    record = ChunkRecord(
        chunk.number,
        chunk.split,
        np.concatenate(rows) if rows else np.zeros(0, dtype),
        np.asarray(where, np.int64).reshape(-1, 2),
        np.asarray(digests, "S16") if digests else np.zeros(0, "S16"),
        counts,
        problems,
        {**timing, "write": timing["write"] + time.perf_counter() - w0},
    )
    meta = {"fingerprint": fp, "sha256": sha.hexdigest(), "split": chunk.split, "counts": counts,
            "problems": problems, "timing": record.timing}  # fmt: skip
    buf = io.BytesIO()
    np.savez(buf, rows=record.rows, where=record.where, digests=record.digests,
             meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))  # fmt: skip
    atomic_write(out / record_name, buf.getvalue())
    return record


def _write_crops(folder: Path, result) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for (number, iou, label, *_), jpeg in zip(result.rows, result.jpegs):
        crop = folder / format_name(result.photo.stem, number, iou, label)
        try:
            crop.write_bytes(jpeg)
        except OSError as e:
            raise write_error(crop, e) from None


def read_chunk(out: Path, chunk: Chunk, fp: str, dtype: np.dtype) -> ChunkRecord | None:
    """The record of a complete chunk an earlier run wrote for the same photos and settings; None when there is
    none, or it is for other photos or settings, damaged, or its .bin has changed (then the chunk is redone)."""
    data_name, record_name = chunk_files(chunk.number)
    try:
        with np.load(out / record_name, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            rows, where, digests = z["rows"], z["where"], z["digests"]
        if meta.get("fingerprint") != fp or rows.dtype != dtype:
            return None
        if file_sha256(out / data_name) != meta["sha256"]:
            return None
        problems = [tuple(p) for p in meta["problems"]]
        return ChunkRecord(chunk.number, chunk.split, rows, where, digests, meta["counts"], problems, meta["timing"])
    except (OSError, ValueError, KeyError, TypeError, zlib.error, EOFError):
        return None  # missing or damaged: redone


class SpoolSource(NamedTuple):
    """One shard's slice of a split's seeded order, read back from the spool's chunks (in a worker process or a
    Ray task)."""

    folder: Path
    split: str
    number: int
    first_key: int
    spool: Path  # OUT/.spool
    rows: np.ndarray  # the slice of the split's index rows in seeded order
    chunks: np.ndarray  # int64: the chunk each crop is in
    where: np.ndarray  # (offset, size) of each crop in its chunk's .bin
    digests: np.ndarray  # S16 BLAKE2b of each crop

    def fingerprint(self) -> str:
        """What decides the shard's bytes: its place in the split's order and every crop's row and digest."""
        h = hashlib.sha256(f"spool {self.split} {self.number} {self.first_key}".encode())
        h.update(self.rows.tobytes())
        h.update(self.digests.tobytes())
        return h.hexdigest()

    def samples(self) -> Iterator[Sample]:
        files: dict[int, int] = {}
        try:
            for key, (row, chunk, (offset, size), digest) in enumerate(
                zip(self.rows, self.chunks, self.where, self.digests), self.first_key
            ):
                check_stop()
                if int(chunk) not in files:
                    files[int(chunk)] = os.open(self.spool.parent / chunk_files(int(chunk))[0], os.O_RDONLY)
                jpeg = os.pread(files[int(chunk)], int(size), int(offset))
                yield Sample(key, jpeg, _meta(row), bytes(digest), "", "")
                tick()
        finally:
            for fd in files.values():
                os.close(fd)


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
        "ground_truth": int(row["ground_truth"]),
    }


def write_spooled_split(
    records: list[ChunkRecord],
    out: Path,
    split: str,
    seed: int,
    per: int,
    run: Runner,
    before: Before | None = None,
    **stats,
) -> WrittenSplit:
    """Shards, index and manifest entry of one split from its chunks (in photo order; the same writer as pack's).
    Shards an interrupted run completed are reused (crackio.writing.splits.write_split). `before`: the split of the
    pack these crops are appended to; their shards are numbered after its last."""
    dtype = records[0].rows.dtype
    rows = np.concatenate([r.rows for r in records]) if records else np.zeros(0, dtype)
    chunks = np.concatenate([np.full(len(r.rows), r.number, np.int64) for r in records])
    where = np.concatenate([r.where for r in records])
    digests = np.concatenate([r.digests for r in records])
    first = before.key_base // per if before else 0
    order = split_order(split, len(rows), seed, first)  # the same global shuffle and shard slices as tools/pack.py
    rows, chunks, where, digests = rows[order], chunks[order], where[order], digests[order]
    spool = out.resolve() / SPOOL
    sources = [
        SpoolSource(
            out / split, split, first + a // per, first * per + a, spool, rows[a:b], chunks[a:b], where[a:b],
            digests[a:b],
        )
        for a, b in shard_slices(len(rows), per)
    ]  # fmt: skip
    (out / split).mkdir(exist_ok=True)
    return write_split(out / split, split, rows, sources, run, records=spool, before=before, **stats)


def remove_spool(out: Path, names: set[str]) -> None:
    """Delete the spool's files (`names`, relative to OUT) and its folder once empty."""
    for name in names:
        (out / name).unlink(missing_ok=True)
    folders = {(out / name).parent for name in names} | {out / SPOOL}
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):  # innermost first
        while folder != out and folder.is_relative_to(out / SPOOL):
            with contextlib.suppress(OSError):  # not empty: holds something crackio did not write
                folder.rmdir()
            folder = folder.parent
