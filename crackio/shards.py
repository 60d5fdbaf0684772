"""The shard format: WebDataset tars, DALI `wds2idx` indexes, one random-access index per split.

Layout under the shards root (see DESIGN.md):

    manifest.json                       written last: its presence means "complete"
    <split>/<split>-NNNNNN.tar          <key>.jpg, <key>.json, <key>.sid per sample
    <split>/<split>-NNNNNN.idx          DALI wds2idx v1.2 index of that tar
    <split>/index.npy                   structured array, one row per sample (INDEX_FIELDS)

A sample's key is its position in the split's seeded order (before skipped inputs
are left out): shard k holds keys [k * samples_per_shard, (k + 1) * samples_per_shard),
which is what lets worker processes write whole shards independently. `<key>.sid` is
the key as 8 little-endian bytes, so a DALI reader can hand back an int64 and labels,
IoUs and names are looked up in bulk from the index (`key` column, ascending:
`np.searchsorted`) instead of parsing JSON per sample.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from crackio.errors import CrackioError, write_error
from crackio.names import is_path_component

MANIFEST = "manifest.json"
INDEX = "index.npy"
FORMAT_VERSION = 2  # 2: crc32 and key columns in the index; keys are positions in the seeded order
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


LOCATED = np.dtype([("key", "<i8"), ("offset", "<i8"), ("size", "<i8"), ("crc32", "<u4")])  # per stored JPEG


def index_dtype(filename_len: int, stem_len: int, extra: list | None = None) -> np.dtype:
    # Fixed-width byte strings keep the index a plain array: np.load(allow_pickle=False)
    # reads it (or memory-maps it), nothing is ever unpickled, and 1M rows load in a fraction of a second.
    return np.dtype(
        [
            ("shard", "<i4"),  # position of the sample's tar in the manifest's shard list
            ("offset", "<i8"),  # byte offset of the JPEG data inside the tar
            ("size", "<i8"),  # JPEG size in bytes
            ("crc32", "<u4"),  # zlib.crc32 of the JPEG bytes, checked on every read
            ("key", "<i8"),  # the sample's key: its position in the split's seeded order (`<key>.sid`)
            ("label", "i1"),  # label as parsed from the file name
            ("iou", "<f4"),  # IoU with the best-matching ground-truth box
            ("proposal", "<i4"),  # proposal number within its full image
            ("filename", f"S{max(filename_len, 1)}"),  # original proposal file name (UTF-8)
            ("stem", f"S{max(stem_len, 1)}"),  # full image the proposal was cut from
            *(extra or []),
        ]
    )


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
        self.count = 0

    def _member(self, name: str, data: bytes) -> int:
        pad = -len(data) % BLOCK
        try:
            self._file.write(ustar_header(name, len(data)))
            self._file.write(data)
            if pad:
                self._file.write(bytes(pad))
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

    def close(self) -> dict:
        """End the archive, fsync, write its DALI index, rename both; returns the manifest's shard entry."""
        end = self._pos + 2 * BLOCK
        try:
            self._file.write(bytes(2 * BLOCK + (-end % RECORD)))
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        except OSError as e:
            raise write_error(self.tmp, e) from None
        atomic_write(self.final.with_suffix(".idx"), wds2idx_text(self._members).encode())
        os.replace(self.tmp, self.final)
        return {"name": self.final.name, "samples": self.count, "bytes": self.final.stat().st_size}

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
    entry: dict | None  # the manifest's shard entry; None when every input of the slice was skipped (no file)
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


def assemble_index(results: list[ShardResult], dtype: np.dtype) -> tuple[np.ndarray, list[dict]]:
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


# What this module's writers leave when killed mid-write: atomic_write's `<name>.<8 random>.tmp` (mkstemp's
# names) and TarShard's `<name>.tmp`. Re-runs remove them by this pattern, for the names they write.
TEMPORARY = re.compile(r"(?P<target>.+?)(?:\.[a-z0-9_]{8})?\.tmp")


def _umask() -> int:
    """This process's umask, read without changing it (os.umask can only set it, racing other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022  # no /proc (not Linux): the common default


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Write `data` (bytes, or a function that writes to the open file) to `path` atomically: a unique
    temporary beside it, fsync, rename. A crash or an error leaves the previous file (the temporary is
    removed on error). Every file that marks completion goes through here. The file gets the permissions a
    plain `open()` would give it (0666 less the umask; mkstemp's own are 0600), so a shared folder stays readable.
    """
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    except OSError as e:
        raise write_error(path, e) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        kept = f"the previous {path.name} is unchanged" if path.is_file() else f"no {path.name} was written"
        raise write_error(path, e, kept) from None
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
        # Written as UTF-8; a damaged byte shows escaped rather than failing the epoch.
        return [b.decode(errors="backslashreplace") for b in self.rows["filename"][ids]]


class ShardError(CrackioError, RuntimeError):
    """Shards that are missing, incomplete or inconsistent; the message names file and fix."""


REPACK = "re-run `python tools/pack.py SRC --out {root}`"
INDEX_COLUMNS = {
    "shard": "i",
    "offset": "i",
    "size": "i",
    "crc32": "u",
    "key": "i",
    "label": "i",
    "iou": "f",
    "proposal": "i",
    "filename": "S",
    "stem": "S",
}  # name: dtype kind every index must have


def shard_pattern(split: str) -> re.Pattern:
    """The names the writer gives a split's tars: `<split>-NNNNNN.tar`, nothing else (no folders, no `..`)."""
    return re.compile(re.escape(split) + r"-[0-9]{6}\.tar")


def _bad(path: Path, what: str, root: Path) -> ShardError:
    return ShardError(f"{path} {what}: " + REPACK.format(root=root))


def read_manifest(root: str | os.PathLike) -> dict:
    """The manifest of a complete pack, every field a loader uses type-checked.

    Raises:
        ShardError: no complete pack, an unreadable or malformed manifest, another format version, a split or
            shard name that is not a plain name of the writer's pattern (so no path can point outside `root`).
    """
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
        manifest = json.loads(read_regular(path, MAX_MANIFEST_BYTES))
    except (OSError, ValueError, RecursionError) as e:
        raise _bad(path, f"is unreadable ({type(e).__name__}: {str(e)[:200]})", root) from None
    if not isinstance(manifest, dict):
        raise _bad(path, "is not a JSON object", root)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise _bad(
            path, f"has format_version {manifest.get('format_version')!r}, this crackio reads {FORMAT_VERSION}", root
        )
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        raise _bad(path, "has no 'splits' object", root)
    for split, info in splits.items():
        where = f"splits[{split!r}]"
        if not is_path_component(split):
            raise _bad(path, f"names a split {split!r} that is not a plain folder name", root)
        if not isinstance(info, dict) or not _count(info.get("samples")) or not isinstance(info.get("shards"), list):
            raise _bad(path, f"{where} needs 'samples' (an integer >= 0) and a 'shards' list", root)
        pattern = shard_pattern(split)
        for k, shard in enumerate(info["shards"]):
            if not (isinstance(shard, dict) and isinstance(shard.get("name"), str)):
                raise _bad(path, f"{where}.shards[{k}] has no file name (a string)", root)
            if not pattern.fullmatch(shard["name"]):
                raise _bad(
                    path,
                    f"{where}.shards[{k}] names {shard['name']!r}, not a file {split}-NNNNNN.tar of the split's folder",
                    root,
                )
            if not (_count(shard.get("samples")) and _count(shard.get("bytes"))):
                raise _bad(path, f"{where}.shards[{k}] needs 'samples' and 'bytes' as integers >= 0", root)
        if sum(s["samples"] for s in info["shards"]) != info["samples"]:
            raise _bad(
                path,
                f"{where}: its shards hold {sum(s['samples'] for s in info['shards'])} samples, not {info['samples']}",
                root,
            )
    return manifest


MAX_MANIFEST_BYTES = 1 << 30  # a manifest lists skipped files: large for a huge messy folder, never this large
MAX_IDX_BYTES = 1 << 30  # ~100 bytes a sample


class NotRegular(ValueError):
    """A path that is a named pipe, a device, a socket or a folder, where a regular file was expected."""


class TooLarge(ValueError):
    """A file larger than it can plausibly be; `size` in bytes."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"{size} bytes, larger than the {limit >> 20} MiB this file can be")
        self.size = size


def read_regular(path: str | os.PathLike, limit: int | None) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `limit` bytes: opened without blocking (a
    named pipe), sized before reading (a device, a file larger than `limit`), and read in a buffer of its own
    size (`read(limit)` would reserve `limit` bytes up front). `limit` None: only check it is a regular file
    (returns b""). Used for every file crackio reads whole: inputs of a pack, manifests, indexes.

    Raises:
        OSError: unreadable; NotRegular; TooLarge.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with open(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegular("not a regular file (a named pipe, a device or a folder)")
        if limit is None:
            return b""
        if info.st_size > limit:
            raise TooLarge(info.st_size, limit)
        data = f.read(info.st_size + 1)  # a byte more: a file that grew since the fstat is caught
        if len(data) > limit:
            raise TooLarge(len(data), limit)
        return data


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_index(root: str | os.PathLike, split: str) -> SplitIndex:
    """Load a split's index, memory-mapped read-only, and check it against its manifest and tars (sizes and
    locations, not contents: `verify` reads every byte).

    Memory-mapped: the processes of a node (ranks, workers) share one copy in the page cache,
    and a process touches only the pages of the columns it reads.

    Raises:
        ShardError: naming the missing, malformed or inconsistent file and how to fix it.
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
    if index_path.exists() and index_path.resolve().parent != (root / split).resolve():
        raise _bad(index_path, f"is a link to {index_path.resolve()}, outside {(root / split).resolve()}", root)
    try:
        read_regular(index_path, None)  # a named pipe or a device would block or never end np.load
        rows = np.load(index_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, MemoryError, EOFError) as e:  # e.g. a header claiming more rows than the file
        raise _bad(index_path, f"cannot be read ({type(e).__name__}: {str(e)[:200]})", root) from None
    names = rows.dtype.names or ()
    wrong = [c for c, kind in INDEX_COLUMNS.items() if c not in names or rows.dtype[c].kind != kind]
    if rows.ndim != 1 or wrong:
        raise _bad(index_path, f"is not a crackio index (columns {wrong or 'shape'} missing or mistyped)", root)
    if len(rows) != info["samples"]:
        raise _bad(index_path, f"has {len(rows)} rows but the manifest says {info['samples']}", root)
    shards = [root / split / s["name"] for s in info["shards"]]
    folder = (root / split).resolve()
    for path in shards:
        if path.exists() and path.resolve().parent != folder:  # a link out of the split's folder
            raise _bad(path, f"is a link to {path.resolve()}, outside {folder}", root)
    for path, s in zip(shards, info["shards"]):
        if not path.is_file():
            raise ShardError(f"shard {path} is missing: " + REPACK.format(root=root))
        actual = path.stat().st_size
        if actual != s["bytes"]:
            raise _bad(path, f"is {actual} bytes, the manifest says {s['bytes']} (truncated or replaced)", root)
    _check_rows(rows, np.array([s["bytes"] for s in info["shards"]], np.int64), index_path, root)
    return SplitIndex(root, split, rows, shards)


def _check_rows(rows: np.ndarray, shard_bytes: np.ndarray, path: Path, root: Path) -> None:
    """Every row points inside its tar: shard number in range, offset and size non-negative, end within the file;
    keys strictly ascending; labels 0 or 1, IoUs within [0, 1]. Vectorized: ~40 ms per million rows."""
    shard = np.asarray(rows["shard"])
    if len(shard) and (shard.min() < 0 or shard.max() >= len(shard_bytes)):
        raise _bad(path, f"has shard numbers outside 0..{len(shard_bytes) - 1}", root)
    offset, size = np.asarray(rows["offset"]), np.asarray(rows["size"])
    bad = (offset < 512) | (size <= 0) | (offset + size > shard_bytes[shard])
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise _bad(path, f"row {row} points outside its tar (offset {int(offset[row])}, size {int(size[row])})", root)
    if (np.diff(np.asarray(rows["key"])) <= 0).any():
        raise _bad(path, "has keys that are not strictly ascending", root)
    label, iou = np.asarray(rows["label"]), np.asarray(rows["iou"])
    bad = ((label != 0) & (label != 1)) | ~((iou >= 0) & (iou <= 1))  # NaN fails the second test
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise _bad(
            path,
            f"row {row} has label {int(label[row])} and IoU {float(iou[row])}: labels are 0 or 1, IoUs within [0, 1]",
            root,
        )


def verify(root: str | os.PathLike) -> Iterator[str]:
    """Read every stored sample of every split and check it against the index: yields one line per problem
    (none: the folder is sound). Checks each JPEG's CRC32, that the tar member at its offset is `<key>.jpg`,
    and that each tar's DALI `.idx` lists the tar's samples. Sequential reads, one tar at a time.

    Raises:
        ShardError: the manifest or an index is malformed (nothing sample-level can be checked then).
    """
    root = Path(root)
    for split, info in read_manifest(root)["splits"].items():
        if info["samples"] == 0:
            continue
        index = load_index(root, split)
        rows = index.rows
        for number, path in enumerate(index.shards):
            ids = np.flatnonzero(np.asarray(rows["shard"]) == number)
            ids = ids[np.argsort(np.asarray(rows["offset"])[ids], kind="stable")]
            idx = path.with_suffix(".idx")
            try:
                if idx.resolve().parent != path.resolve().parent:
                    raise ValueError(f"a link to {idx.resolve()}, outside the split's folder")
                head = read_regular(idx, MAX_IDX_BYTES).decode().split("\n", 1)[0].split()
                if head[:1] != ["v1.2"] or head[1:] != [str(len(ids))]:
                    yield f"{idx}: its header says {' '.join(head)!r}, the tar holds {len(ids)} samples"
            except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
                yield f"{idx}: unreadable ({e})"
            with open(path, "rb") as f:
                for i in ids:
                    yield from _verify_sample(f.fileno(), rows[i], int(i), path)


def _member(data: bytes, at: int) -> tuple[str, int, int]:
    """(name, data offset, size) of the ustar header at `at` in `data`; ("", ...) when it is not one."""
    head = data[at : at + BLOCK]
    try:
        return head[:100].rstrip(b"\0").decode("ascii"), at + BLOCK, int(head[124:136].strip(b" \0") or b"0", 8)
    except (UnicodeDecodeError, ValueError):
        return "", at + BLOCK, 0


def _verify_sample(fd: int, row: np.void, i: int, path: Path) -> Iterator[str]:
    """The sample's three members read in one go and compared with its index row: the JPEG's member name and
    CRC32, the JSON's file name, label and IoU (to its 3 decimals), the `.sid`'s key."""
    offset, size, key = int(row["offset"]), int(row["size"]), sample_key(int(row["key"]))
    name = bytes(row["filename"]).decode(errors="backslashreplace")
    data = os.pread(fd, size + 4 * BLOCK + 4096, offset - BLOCK)  # jpg header+data, json, sid (json < 4 KB)
    member, start, _ = _member(data, 0)
    if member != f"{key}.jpg":
        yield f"{path}: row {i} ({name}) points at member {member[:40]!r}, not its own ({key}.jpg)"
        return
    if zlib.crc32(data[start : start + size]) != int(row["crc32"]):
        yield f"{path}: row {i} ({name}) does not match its checksum"
        return
    json_member, json_start, json_size = _member(data, start + size + (-size % BLOCK))
    sid_member, sid_start, _ = _member(data, json_start + json_size + (-json_size % BLOCK))
    try:
        meta = json.loads(data[json_start : json_start + json_size])
        sid = int.from_bytes(data[sid_start : sid_start + 8], "little")
        same = (
            json_member == f"{key}.json"
            and sid_member == f"{key}.sid"
            and sid == int(row["key"])
            and meta["filename"] == name
            and meta["label"] == int(row["label"])
            and abs(meta["iou"] - float(row["iou"])) <= 5e-4
        )
    except (ValueError, KeyError, TypeError):
        same = False
    if not same:
        yield f"{path}: row {i} ({name}): the sample's .json/.sid in the tar disagree with the index (name, label, IoU)"
