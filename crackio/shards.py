"""The shard format: WebDataset tars, DALI `wds2idx` indexes, one random-access index per split.

Layout under the shards root (see DESIGN.md):

    manifest.json                       written last: its presence means "complete"
    <split>/<split>-NNNNNN.tar          <key>.jpg, <key>.json, <key>.sid per sample
    <split>/<split>-NNNNNN.idx          DALI wds2idx v1.2 index of that tar
    <split>/index.npy                   structured array, one row per sample (INDEX_FIELDS)

`<key>.sid` is the sample's row in index.npy as 8 little-endian bytes, so a DALI
reader can hand back an int64 and labels, IoUs and names are looked up in bulk
from the index instead of parsing JSON per sample.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import webdataset as wds

from crackio.errors import CrackioError

MANIFEST = "manifest.json"
INDEX = "index.npy"
FORMAT_VERSION = 1
TAR_MTIME = 0  # fixed member times: the same input gives byte-identical tars


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def sample_key(row: int) -> str:
    # Keys hold no dots: WebDataset splits a member name at its first dot.
    return f"{row:010d}"


# Fields the proposal stage (tools/propose.py) adds, for a later box-regression or detection stage.
PROPOSAL_FIELDS = [
    ("box", "<f4", (4,)),  # the proposal in photo pixels: x0, y0, x1, y1 (before context padding)
    ("gt_box", "<f4", (4,)),  # the best-matching ground-truth box (zeros when the photo has none)
    ("gt_id", "<i4"),  # its position in the photo's ground-truth list; -1 when none
    ("photo_size", "<i4", (2,)),  # width, height of the (upright) photo
]


def index_dtype(filename_len: int, stem_len: int, extra: list | None = None) -> np.dtype:
    # Fixed-width byte strings keep the index a plain array: np.load(allow_pickle=False)
    # reads it, nothing is ever unpickled, and 1M rows load in a fraction of a second.
    return np.dtype(
        [
            ("shard", "<i4"),  # shard number within the split
            ("offset", "<i8"),  # byte offset of the JPEG data inside the tar
            ("size", "<i8"),  # JPEG size in bytes
            ("label", "i1"),  # label as parsed from the file name
            ("iou", "<f4"),  # IoU with the best-matching ground-truth box
            ("proposal", "<i4"),  # proposal number within its full image
            ("filename", f"S{max(filename_len, 1)}"),  # original proposal file name (UTF-8)
            ("stem", f"S{max(stem_len, 1)}"),  # full image the proposal was cut from
            *(extra or []),
        ]
    )


class TarShard:
    """Writes one tar to `<final>.tmp` and renames it into place only when complete.

    A context manager: leaving the block normally closes (renames) it, an exception aborts it and
    removes the temporary. (Named apart from `webdataset.ShardWriter`, which splits a stream into
    many tars; this is one tar with its DALI index.)
    """

    def __init__(self, final: Path):
        self.final = final
        self.tmp = final.with_name(final.name + ".tmp")
        self._file = open(self.tmp, "wb")
        self._tar = wds.TarWriter(self._file, user="", group="", mtime=TAR_MTIME, encoder=False)
        self.count = 0

    def write(self, row: int, jpeg: bytes, meta: dict) -> None:
        key = sample_key(row)
        self._tar.write(
            {
                "__key__": key,
                "jpg": jpeg,
                "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
                "sid": np.int64(row).astype("<i8").tobytes(),
            }
        )
        self.count += 1

    def close(self) -> list[tuple[str, int, int]]:
        """Finish the tar, write its DALI index, rename both; returns (member, offset, size)."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        members = scan_tar(self.tmp)
        idx = self.final.with_suffix(".idx")
        atomic_write(idx, wds2idx_text(members).encode())
        os.replace(self.tmp, self.final)
        return members

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> TarShard:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


class SplitWriter:
    """One split's shards: samples in, in order; `<split>-NNNNNN.tar` + `.idx` out, crash-safe.

    `finish()` returns, per written sample, its (shard, offset, size) in the tars, and the
    shards' manifest entries; it also removes shards of this split left by an earlier,
    larger pack. The caller writes the index (it owns the other columns).
    """

    def __init__(self, folder: Path, split: str, samples_per_shard: int):
        self.folder, self.split, self.per_shard = folder, split, samples_per_shard
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.tmp"):  # temporaries of an interrupted run
            stale.unlink()
        self.count = 0
        self.shards: list[dict] = []
        self._where: list[np.ndarray] = []
        self._tar: TarShard | None = None

    def write(self, jpeg: bytes, meta: dict) -> None:
        if self._tar is None:
            self._tar = TarShard(self.folder / shard_name(self.split, len(self.shards)))
        self._tar.write(self.count, jpeg, meta)
        self.count += 1
        if self._tar.count == self.per_shard:
            self._close_tar()

    def _close_tar(self) -> None:
        tar, self._tar = self._tar, None
        assert tar is not None  # called only with a tar open
        members = tar.close()
        jpgs = np.array(
            [(len(self.shards), off, size) for name, off, size in members if name.endswith(".jpg")], dtype=np.int64
        ).reshape(-1, 3)
        self._where.append(jpgs)
        self.shards.append({"name": tar.final.name, "samples": tar.count, "bytes": tar.final.stat().st_size})

    def finish(self) -> tuple[np.ndarray, list[dict]]:
        if self._tar is not None:
            self._close_tar()
        keep = {s["name"] for s in self.shards}
        for old in self.folder.glob(f"{self.split}-*.tar"):
            if old.name not in keep:
                old.unlink()
                old.with_suffix(".idx").unlink(missing_ok=True)
        where = np.concatenate(self._where) if self._where else np.zeros((0, 3), np.int64)
        return where, self.shards

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.abort()
            self._tar = None


def scan_tar(path: Path) -> list[tuple[str, int, int]]:
    """(member name, data offset, size) of every regular file, read from the headers."""
    with tarfile.open(path, "r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isreg()]


def wds2idx_text(members: list[tuple[str, int, int]]) -> str:
    """DALI's `wds2idx` v1.2 index: one line per sample, `ext offset size name` per component.

    Written here rather than by running DALI's tools/wds2idx.py, which is not part of
    the pip wheel and shells out to GNU tar; the offsets come from the same headers.
    """
    samples: list[list[str]] = []
    last = None
    for name, offset, size in members:
        base, ext = name.split(".", 1)
        if base != last:
            samples.append([])
            last = base
        samples[-1].append(f"{ext} {offset} {size} {name}")
    return f"v1.2 {len(samples)}\n" + "".join(" ".join(parts) + "\n" for parts in samples)


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Write `data` (bytes, or a function that writes to the open file) to `path` atomically: a unique
    temporary beside it, fsync, rename. A crash or an error leaves the previous file (the temporary is
    removed on error). Every file that marks completion goes through here."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_index(path: Path, rows: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    atomic_write(path, buf.getvalue())


@dataclass(frozen=True)
class SplitIndex:
    """A split's random-access index: where each sample's JPEG lives, its label and IoU."""

    root: Path
    split: str
    rows: np.ndarray  # structured array of index_dtype
    shards: list[Path]  # tar paths, position = shard number

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def labels(self) -> np.ndarray:
        return self.rows["label"].astype(np.int64)

    @property
    def ious(self) -> np.ndarray:
        return self.rows["iou"]

    def filenames(self, ids: np.ndarray) -> list[str]:
        return [b.decode() for b in self.rows["filename"][ids]]


class ShardError(CrackioError, RuntimeError):
    """Shards that are missing, incomplete or inconsistent; the message names file and fix."""


REPACK = "re-run `python tools/pack.py SRC --out {root}`"


def read_manifest(root: str | os.PathLike) -> dict:
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ShardError(
            f"shards folder {root} does not exist: pack a proposal folder first with "
            f"`python tools/pack.py SRC --out {root}`"
        )
    if not path.is_file():
        raise ShardError(
            f"{path} is missing, so {root} holds no complete pack (an interrupted run?): " + REPACK.format(root=root)
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ShardError(f"{path} is unreadable ({e}): " + REPACK.format(root=root)) from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(
            f"{path} has format_version {manifest.get('format_version')!r}, this crackio "
            f"reads {FORMAT_VERSION}: " + REPACK.format(root=root)
        )
    return manifest


def load_index(root: str | os.PathLike, split: str) -> SplitIndex:
    """Load and check a split's index against its manifest and tars (sizes, not contents).

    Raises:
        ShardError: naming the missing or inconsistent file and how to fix it.
    """
    root = Path(root)
    manifest = read_manifest(root)
    splits = manifest["splits"]
    if split not in splits:
        have = ", ".join(sorted(splits)) or "none"
        raise ShardError(
            f"split {split!r} is not in {root / MANIFEST} (it has: {have}); "
            f"pack a folder {split}/ or choose another split"
        )
    info = splits[split]
    if info["samples"] == 0:
        raise ShardError(
            f"split {split!r} in {root} is empty: every input was skipped (see 'skipped' in {root / MANIFEST})"
        )
    index_path = root / split / INDEX
    try:
        rows = np.load(index_path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ShardError(f"{index_path} cannot be read ({e}): " + REPACK.format(root=root)) from e
    if len(rows) != info["samples"]:
        raise ShardError(
            f"{index_path} has {len(rows)} rows but the manifest says {info['samples']}: " + REPACK.format(root=root)
        )
    shards = [root / split / s["name"] for s in info["shards"]]
    for path, s in zip(shards, info["shards"]):
        if not path.is_file():
            raise ShardError(f"shard {path} is missing: " + REPACK.format(root=root))
        actual = path.stat().st_size
        if actual != s["bytes"]:
            raise ShardError(
                f"shard {path} is {actual} bytes, the manifest says {s['bytes']} "
                f"(truncated or replaced): " + REPACK.format(root=root)
            )
    return SplitIndex(root, split, rows, shards)
