"""Writing one shard: ustar members written by hand, the DALI `wds2idx` index beside it, atomic and checked."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from crackio.format.layout import sample_key
from crackio.format.manifest import ShardEntry
from crackio.format.schema import LOCATED
from crackio.fsio import atomic_write, fsync_dir, write_error

TAR_MTIME = 0  # fixed member times: the same input gives byte-identical tars

BLOCK = 512  # tar block size

RECORD = 20 * BLOCK  # tar record size: GNU tar and Python's tarfile pad an archive to whole records


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte POSIX ustar header of a regular file as this format stores it (mode 0444, uid and gid 0,
    no owner names, mtime 0): byte for byte what `tarfile.TarInfo.tobuf()` gives for those fields.

    Written by hand because `tobuf` costs ~18 us a member and a sample has three: a quarter of the
    per-sample cost of packing (tests/test_pack.py checks equality with tarfile for many names and sizes).

    Raises:
        ValueError: `name` is not ASCII or longer than 100 bytes, or `size` does not fit 11 octal digits.
    """
    raw = name.encode("ascii")
    if len(raw) > 100 or not 0 <= size < 8**11:
        raise ValueError(f"tar member {name!r} of {size} bytes does not fit a ustar header")
    head = b"".join(
        (
            raw.ljust(100, b"\0"),
            b"0000444\0",  # mode
            b"0000000\0",  # uid
            b"0000000\0",  # gid
            b"%011o\0" % size,
            b"%011o\0" % TAR_MTIME,
            b" " * 8,  # checksum, computed over the header with this field as spaces
            b"0",  # regular file
            b"\0" * 100,  # link name
            b"ustar\x0000",  # POSIX magic and version
            b"\0" * 80,  # owner and group names, device major and minor (empty for a regular file)
            b"\0" * 167,  # prefix, padding
        )
    )
    checksum = b"%06o\0 " % sum(head)
    return head[:148] + checksum + head[156:]


class TarShard:
    """Writes one tar to `<final>.tmp` and renames it, with its DALI index, into place only when complete.

    Members per sample: `<key>.jpg`, `<key>.json`, `<key>.sid` (sorted by extension, as
    webdataset's TarWriter orders them); offsets are known as the bytes are written, so no
    archive is read back. A context manager: leaving the block normally closes it, an exception
    aborts it and removes the temporary.
    """

    def __init__(self, final: Path):
        self.final = final
        self.tmp = final.with_name(final.name + ".tmp")
        try:
            self._file = open(self.tmp, "wb", buffering=1 << 20)
        except OSError as e:
            raise write_error(self.tmp, e) from None
        self._pos = 0
        self._members: list[tuple[str, int, int]] = []
        self._sha256 = hashlib.sha256()  # of every byte as written: the tar's identity in the manifest
        self.count = 0

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._sha256.update(data)

    def _member(self, name: str, data: bytes) -> int:
        pad = -len(data) % BLOCK
        try:
            self._write(ustar_header(name, len(data)))
            self._write(data)
            if pad:
                self._write(bytes(pad))
        except OSError as e:
            raise write_error(self.tmp, e) from None
        offset = self._pos + BLOCK
        self._members.append((name, offset, len(data)))
        self._pos = offset + len(data) + pad
        return offset

    def write(self, key: int, jpeg: bytes, meta: dict) -> tuple[int, int, int]:
        """Append one sample; returns the JPEG's (offset in the tar, size, crc32)."""
        name = sample_key(key)
        offset = self._member(name + ".jpg", jpeg)
        self._member(name + ".json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
        self._member(name + ".sid", np.int64(key).astype("<i8").tobytes())
        self.count += 1
        return offset, len(jpeg), zlib.crc32(jpeg)

    def close(self) -> ShardEntry:
        """End the archive, fsync, write its DALI index, rename both; returns the manifest's shard entry (sizes
        and SHA-256 digests of both files, computed as they were written)."""
        end = self._pos + 2 * BLOCK
        try:
            self._write(bytes(2 * BLOCK + (-end % RECORD)))
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        except OSError as e:
            raise write_error(self.tmp, e) from None
        idx = wds2idx_text(self._members).encode()
        atomic_write(self.final.with_suffix(".idx"), idx)
        os.replace(self.tmp, self.final)
        fsync_dir(self.final.parent)
        return {
            "name": self.final.name,
            "samples": self.count,
            "bytes": self.final.stat().st_size,
            "sha256": self._sha256.hexdigest(),
            "idx_sha256": hashlib.sha256(idx).hexdigest(),
        }

    def abort(self) -> None:
        try:
            self._file.close()  # flushes the buffer: fails again on a full disk; the file goes anyway
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> TarShard:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


class ShardResult(NamedTuple):
    """What writing one shard gives back to the process that writes the index."""

    number: int  # k in <split>-k.tar: the slice [k * samples_per_shard, (k + 1) * samples_per_shard) of the order
    entry: ShardEntry | None  # the manifest's shard entry; None when every input of the slice was skipped (no file)
    located: np.ndarray  # LOCATED per stored sample, in key order


def write_shard(final: Path, number: int, samples: Iterable[tuple[int, bytes | None, dict]]) -> ShardResult:
    """Write the samples (key, JPEG or None for a skipped input, JSON metadata) as tar `final`.

    Nothing is written when every JPEG is None; an exception removes the temporary.
    """
    located = []
    tar: TarShard | None = None
    try:
        for key, jpeg, meta in samples:
            if jpeg is None:
                continue
            if tar is None:
                tar = TarShard(final)
            located.append((key, *tar.write(key, jpeg, meta)))
        entry = tar.close() if tar is not None else None
    except BaseException:
        if tar is not None:
            tar.abort()
        raise
    if entry is None:  # an earlier pack's shard of this number would otherwise be listed by nobody
        final.unlink(missing_ok=True)
        final.with_suffix(".idx").unlink(missing_ok=True)
    return ShardResult(number, entry, np.array(located, dtype=LOCATED))


def assemble_index(results: list[ShardResult], dtype: np.dtype) -> tuple[np.ndarray, list[ShardEntry]]:
    """A split's index rows (location columns filled, in key order) and its manifest shard list, from
    its shards' results in shard-number order; empty shards take no place in the list."""
    written = [r for r in results if r.entry is not None]
    located = np.concatenate([r.located for r in written]) if written else np.zeros(0, LOCATED)
    rows = np.zeros(len(located), dtype)
    rows["shard"] = np.repeat(np.arange(len(written), dtype=np.int32), [len(r.located) for r in written])
    for field in ("key", "offset", "size", "crc32"):
        rows[field] = located[field]
    return rows, [r.entry for r in written if r.entry is not None]


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


def save_index(path: Path, rows: np.ndarray) -> str:
    """A split's index.npy through the atomic writer; returns its SHA-256 (hex), which the manifest records."""
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    atomic_write(path, buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()
