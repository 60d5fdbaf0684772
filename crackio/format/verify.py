"""`verify`: read every stored sample of a pack and compare it with its index (`tools/pack.py --verify`)."""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from crackio.format.index import index_digest_problem, load_index
from crackio.format.layout import CONVERTED, INDEX, sample_key
from crackio.format.manifest import read_manifest
from crackio.format.tar import BLOCK
from crackio.fsio import read_regular

MAX_IDX_BYTES = 1 << 30  # ~100 bytes a sample


def verify(root: str | os.PathLike) -> Iterator[str]:
    """Read every byte of a pack and check it: yields one line per problem (none: the folder is sound). Checks
    each index's, tar's and `.idx`'s SHA-256 against the manifest, and, to say which sample differs, each JPEG's
    CRC32, that the tar member at its offset is `<key>.jpg`, and that each tar's DALI `.idx` lists the tar's
    samples. Sequential reads, one tar at a time.

    Raises:
        ShardError: the manifest or an index is malformed (nothing sample-level can be checked then).
    """
    root = Path(root)
    for split, info in read_manifest(root, verifying=True)["splits"].items():
        if info["samples"] == 0:
            continue
        index = load_index(root, split, digest=False)
        problem = index_digest_problem(root / split / INDEX, info, root / split / INDEX, root)
        if problem:
            yield problem
        listed = root / split / CONVERTED
        try:
            data = read_regular(listed, MAX_IDX_BYTES) if listed.exists() else None
        except (OSError, ValueError) as e:
            yield f"{listed}: unreadable ({e})"
        else:
            yield from converted_problems(data, info, str(listed))
        for number, (path, shard) in enumerate(zip(index.shards, info["shards"])):
            idx = path.with_suffix(".idx")
            try:
                if idx.resolve().parent != path.resolve().parent:
                    raise ValueError(f"a link to {idx.resolve()}, outside the split's folder")
                data = read_regular(idx, MAX_IDX_BYTES)
                yield from digest_problem(hashlib.sha256(data).hexdigest(), shard["idx_sha256"], str(idx))
                yield from verify_idx(data, index.rows, number, str(idx))
            except (OSError, ValueError) as e:
                yield f"{idx}: unreadable ({e})"
            with open(path, "rb") as f:
                got = hashlib.file_digest(f, "sha256").hexdigest()
                yield from tar_problems(f.fileno(), index.rows, number, str(path), got, shard["sha256"])


def tar_problems(fd: int, rows: np.ndarray, number: int, name: str, got: str, recorded: str) -> list[str]:
    """The problems of tar `number` (open as `fd`, its SHA-256 `got`, the manifest's `recorded`): its samples' (which
    say which sample differs), or, when every sample is sound but some other byte changed (a header, the padding),
    the digest's."""
    problems = list(verify_tar(fd, rows, number, name))
    return problems or list(digest_problem(got, recorded, name))


def converted_problems(data: bytes | None, info: dict, name: str) -> Iterator[str]:
    """A split's converted list (its bytes, None when there is no such file, named `name`) against its manifest
    entry `info`: there exactly when the manifest records one, with the recorded SHA-256."""
    recorded = info.get("converted_sha256")
    if data is None:
        if recorded is not None:
            yield f"{name}: missing, the manifest records one (the split's converted inputs)"
    elif recorded is None:
        yield f"{name}: the manifest records no converted list for this split"
    else:
        yield from digest_problem(hashlib.sha256(data).hexdigest(), recorded, name)


def digest_problem(got: str, recorded: str, name: str) -> Iterator[str]:
    """One problem line when a file's SHA-256 `got` is not the one its manifest `recorded`."""
    if got != recorded:
        yield f"{name}: its SHA-256 is {got[:16]}..., the manifest records {recorded[:16]}... (changed after packing)"


def verify_idx(data: bytes, rows: np.ndarray, number: int, name: str) -> Iterator[str]:
    """A tar's DALI `.idx` (its bytes, read from `name`) against the index: its header counts the tar's samples.

    Raises:
        ValueError: not UTF-8 text.
    """
    count = int((np.asarray(rows["shard"]) == number).sum())
    head = data.decode().split("\n", 1)[0].split()
    if head[:1] != ["v1.2"] or head[1:] != [str(count)]:
        yield f"{name}: its header says {' '.join(head)!r}, the tar holds {count} samples"


def verify_tar(fd: int, rows: np.ndarray, number: int, name: str) -> Iterator[str]:
    """Every sample the index places in tar `number` (open as `fd`, named `name` in problems) against its row,
    in the order they are stored: one problem line each."""
    ids = np.flatnonzero(np.asarray(rows["shard"]) == number)
    ids = ids[np.argsort(np.asarray(rows["offset"])[ids], kind="stable")]
    for i in ids:
        yield from _verify_sample(fd, rows[i], int(i), name)


def _member(data: bytes, at: int) -> tuple[str, int, int]:
    """(name, data offset, size) of the ustar header at `at` in `data`; ("", ...) when it is not one."""
    head = data[at : at + BLOCK]
    try:
        return head[:100].rstrip(b"\0").decode("ascii"), at + BLOCK, int(head[124:136].strip(b" \0") or b"0", 8)
    except (UnicodeDecodeError, ValueError):
        return "", at + BLOCK, 0


def _verify_sample(fd: int, row: np.void, i: int, path: str) -> Iterator[str]:
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
