"""One split into shards, for every producer (pack, the proposal stage): the seeded global order, shard k =
keys [k * S, (k + 1) * S) of it, worker processes writing whole shards, the index and the split's manifest
entry. Producers differ only in where a sample's JPEG bytes come from: a `ShardSource`.

Shard k's contents depend only on its slice of the order, so the bytes do not depend on the worker count,
and a skipped input only makes its shard smaller (keys keep their gaps).

Resume: as each shard is finished, its writer records it (`<records>/shard-<split crc>-NNNNNN.npz`: the source's
fingerprint, the shard's manifest entry and index locations). A re-run whose shard has the same fingerprint, and
whose tar and .idx still have the recorded SHA-256s, reuses it instead of writing it again.
"""

from __future__ import annotations

import hashlib
import io
import json
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from crackio.format.index import file_sha256
from crackio.format.layout import CONVERTED, INDEX, shard_name
from crackio.format.manifest import SplitEntry, split_entry
from crackio.format.tar import ShardResult, assemble_index, save_index, write_shard
from crackio.fsio import atomic_write
from crackio.writing.quality import iou_histogram, label_report
from crackio.writing.workers import Runner


class Sample(NamedTuple):
    """One input of a shard's slice, as its producer read it."""

    key: int  # its position in the split's seeded order
    jpeg: bytes | None  # what is stored; None: the input is skipped (`note` says why)
    meta: dict  # the sample's .json
    digest: bytes  # BLAKE2b-128 of the source bytes (leakage between splits)
    note: str  # skipped: why; stored: what was converted ("" when stored as is)
    path: str  # the input as text, for the skipped list


class ShardSource(Protocol):
    """A picklable task for a worker process: one shard's slice of a split's order."""

    @property
    def folder(self) -> Path: ...  # OUT/<split>
    @property
    def split(self) -> str: ...
    @property
    def number(self) -> int: ...  # k in <split>-k.tar

    def samples(self) -> Iterator[Sample]: ...

    def fingerprint(self) -> str: ...  # SHA-256 (hex) of everything that decides the shard's bytes


class WrittenShard(NamedTuple):
    result: ShardResult
    skipped: list[tuple[str, str]]  # (path, reason)
    converted: list[str]  # converted.tsv lines
    digests: np.ndarray  # S16 per stored sample, in key order
    reused: bool = False  # an interrupted run's shard, found complete and unchanged


def split_order(split: str, count: int, seed: int, first_shard: int = 0) -> np.ndarray:
    """The seeded global shuffle of a split's inputs before writing (DALI's reader only shuffles inside a buffer);
    inputs appended to a pack from shard `first_shard` on are shuffled among themselves by their own stream."""
    key = [seed, zlib.crc32(split.encode())] + ([first_shard] if first_shard else [])
    return np.random.default_rng(key).permutation(count)


def shard_slices(count: int, per_shard: int) -> list[tuple[int, int]]:
    """[start, stop) of each shard's slice of a split's order: shard k holds keys k*per_shard onwards."""
    return [(k, min(k + per_shard, count)) for k in range(0, count, per_shard)]


def tsv_field(text: str) -> str:
    """A name as one TSV field: backslash, tab, newline and carriage return escaped as \\\\, \\t, \\n, \\r."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def widest(a: np.dtype, b: np.dtype) -> np.dtype:
    """The index dtype (fields of `a`, in its order) whose text columns fit the names of either."""
    assert a.names is not None
    return np.dtype([(n, f"S{max(a[n].itemsize, b[n].itemsize)}" if a[n].kind == "S" else a[n]) for n in a.names])


def record_name(split: str, number: int) -> str:
    """The file that records shard `number` of `split` as finished (relative to the records folder)."""
    return f"shard-{zlib.crc32(split.encode()):08x}-{number:06d}.npz"


def _save_record(path: Path, fp: str, written: WrittenShard) -> None:
    meta = {
        "fingerprint": fp,
        "number": written.result.number,
        "entry": written.result.entry,
        "skipped": written.skipped,
        "converted": written.converted,
    }
    buf = io.BytesIO()
    np.savez(buf, located=written.result.located, digests=written.digests,
             meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))  # fmt: skip
    atomic_write(path, buf.getvalue())


def _reusable(source: ShardSource, path: Path, fp: str) -> WrittenShard | None:
    """The recorded shard, when its record matches `fp` and its files still have the recorded digests."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            located, digests = z["located"], z["digests"]
        if meta["fingerprint"] != fp or meta["number"] != source.number:
            return None
        entry = meta["entry"]
        if entry is not None:
            tar = source.folder / shard_name(source.split, source.number)
            if file_sha256(tar) != entry["sha256"] or file_sha256(tar.with_suffix(".idx")) != entry["idx_sha256"]:
                return None
        result = ShardResult(source.number, entry, located)
        skipped = [(str(p), str(r)) for p, r in meta["skipped"]]
        return WrittenShard(result, skipped, list(meta["converted"]), digests, reused=True)
    except (OSError, ValueError, KeyError, TypeError, zlib.error, EOFError):
        return None  # missing or damaged: written again


def write_source(source: ShardSource, records: Path | None = None) -> WrittenShard:
    """Write one shard from its source (runs in a worker process or a Ray task); with `records`, reuse the shard
    an interrupted run finished (same fingerprint, files intact) and record this one when it is finished."""
    if records is not None:
        fp = source.fingerprint()
        path = records / record_name(source.split, source.number)
        found = _reusable(source, path, fp)
        if found is not None:
            return found
        written = _write_source(source)
        _save_record(path, fp, written)
        return written
    return _write_source(source)


def _write_source(source: ShardSource) -> WrittenShard:
    skipped: list[tuple[str, str]] = []
    converted: list[str] = []
    digests: list[bytes] = []

    def samples():
        for s in source.samples():
            if s.jpeg is None:
                skipped.append((s.path, s.note))
                yield s.key, None, {}
                continue
            if s.note:
                converted.append(f"{tsv_field(s.meta['filename'])}\t{s.note}\n")
            digests.append(s.digest)
            yield s.key, s.jpeg, s.meta

    result = write_shard(source.folder / shard_name(source.split, source.number), source.number, samples())
    return WrittenShard(result, skipped, converted, np.array(digests, dtype="S16"))


class Before(NamedTuple):
    """A split of an existing pack that new shards are appended to (crackio.writing.proposal_stage, --append)."""

    rows: np.ndarray  # its index.npy
    shards: list  # its manifest entry's shards
    converted: list[str]  # its converted.tsv lines
    key_base: int  # the first new shard's number x samples per shard: new keys start there


class WrittenSplit(NamedTuple):
    rows: np.ndarray  # the index as written: the stored samples' rows, locations filled, in key order
    entry: SplitEntry  # the manifest's entry for the split
    digests: np.ndarray  # S16 per row written now (not those of `before`)
    skipped: list[tuple[str, str]]  # (path, reason)
    reused: int  # shards an interrupted run had finished, reused


def write_split(
    folder: Path,
    split: str,
    rows: np.ndarray,
    sources: Sequence[ShardSource],
    run: Runner,
    progress: Callable[[int], None] | None = None,
    records: Path | None = None,
    before: Before | None = None,
    **stats,
) -> WrittenSplit:
    """Write a split's shards (from `sources`, shard by shard, through `run`: worker processes or a Ray cluster),
    then its index and converted list.

    `rows`: every input's index row in the split's seeded order (row k has key k, or key `before.key_base` + k),
    with the producer's columns filled; the location columns are filled here for the stored ones. `records`: the
    folder of the shards' resume records (module docstring); None writes every shard. `before`: the split as an
    earlier pack holds it, when these shards are appended to it (its index rows and shards come first, unchanged).
    `stats`: producer-specific fields of the manifest entry (the proposal stage's photos, ground-truth boxes,
    recall), over the whole split.
    """
    task = write_source if records is None else partial(write_source, records=records)
    written = list(run(task, sources, progress))
    located, shards = assemble_index([w.result for w in written], rows.dtype)
    kept = rows[located["key"] - (before.key_base if before else 0)]
    for column in ("shard", "offset", "size", "crc32", "key"):
        kept[column] = located[column]
    converted_lines = sorted(line for w in written for line in w.converted)
    if before is not None:
        kept["shard"] += len(before.shards)
        common = widest(before.rows.dtype, kept.dtype)  # the longer names of either fit
        kept = np.concatenate([before.rows.astype(common), kept.astype(common)])
        shards = [*before.shards, *shards]
        converted_lines = sorted([*before.converted, *converted_lines])
    index_sha256 = save_index(folder / INDEX, kept)
    # Every converted input with what was done to it; a file, not the manifest, which every loader reads.
    listed = folder / CONVERTED
    converted_sha256 = None
    if converted_lines:
        text = "".join(converted_lines).encode()
        atomic_write(listed, text)
        converted_sha256 = hashlib.sha256(text).hexdigest()
    else:
        listed.unlink(missing_ok=True)
    labels = kept["label"].astype(np.int64)
    entry = split_entry(
        samples=len(kept),
        classes={"0": int((labels == 0).sum()), "1": int((labels == 1).sum())},
        stats=stats,
        iou_histogram=iou_histogram(kept["iou"], labels),
        labels=label_report(kept["iou"], labels, kept["filename"]),
        converted=dict(sorted(Counter(line.rstrip("\n").rsplit("\t", 1)[1] for line in converted_lines).items())),
        converted_list=f"{split}/{CONVERTED}" if converted_lines else None,
        converted_sha256=converted_sha256,
        index_sha256=index_sha256,
        shards=shards,
    )
    digests = np.concatenate([w.digests for w in written]) if written else np.zeros(0, "S16")
    skipped = [s for w in written for s in w.skipped]
    return WrittenSplit(kept, entry, digests, skipped, sum(w.reused for w in written))
