"""Which files make a pack, and their names: the one place the layout of a shards folder is written down.

    manifest.json                       written last: its presence means "complete"
    <split>/<split>-NNNNNN.tar          <key>.jpg, <key>.json, <key>.sid per sample
    <split>/<split>-NNNNNN.idx          DALI wds2idx v1.2 index of that tar
    <split>/index.npy                   structured array, one row per sample (crackio.format.schema)
    <split>/converted.tsv               inputs the packer converted, and how (only when some were)

A sample's key is its position in the split's seeded order (before skipped inputs are left
out): shard k holds keys [k * samples_per_shard, (k + 1) * samples_per_shard), which is what
lets worker processes write whole shards independently. `<key>.sid` is the key as 8
little-endian bytes, so a DALI reader can hand back an int64 and labels, IoUs and names are
looked up in bulk from the index instead of parsing JSON per sample.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from crackio.errors import CrackioError
from crackio.fsio import is_path_component

MANIFEST = "manifest.json"
INDEX = "index.npy"
CONVERTED = "converted.tsv"  # per split: file name, tab, what was converted
FORMAT_VERSION = 3  # 2: crc32 and key columns in the index, keys are positions in the seeded order; 3: SHA-256s


SPLITS = ("train", "valid", "test")  # the split names a pack is made of when its input names them
SPLIT_ALIASES = {"val": "valid", "validation": "valid"}  # folder names read as `valid` (Ultralytics, VOC, ...)
# Listing order in manifests, reports and the proposal stage's photo order: each split with its aliases.
SPLIT_ORDER = tuple(n for s in SPLITS for n in (s, *(a for a, to in SPLIT_ALIASES.items() if to == s)))


def split_sort_key(name: str) -> tuple[int, str]:
    """train, valid (val, validation), test, then the other splits by name."""
    return (SPLIT_ORDER.index(name) if name in SPLIT_ORDER else len(SPLIT_ORDER), name)


class ShardError(CrackioError, RuntimeError):
    """Shards that are missing, incomplete or inconsistent; the message names file and fix."""


def join(root: str | os.PathLike, *names: str) -> str:
    """A file of a pack as text for messages: a folder's path, or a remote pack's URL (`s3://b/p/manifest.json`)."""
    if isinstance(root, str) and "://" in root:
        return "/".join([root.rstrip("/"), *names])
    return str(Path(root).joinpath(*names))


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def sample_key(row: int) -> str:
    # Keys hold no dots: WebDataset splits a member name at its first dot.
    return f"{row:010d}"


def shard_pattern(split: str) -> re.Pattern:
    """The names the writer gives a split's tars: `<split>-NNNNNN.tar`, nothing else (no folders, no `..`)."""
    return re.compile(re.escape(split) + r"-[0-9]{6}\.tar")


def split_files(split: str, shard_names: list[str]) -> set[str]:
    """Every file (relative to the pack's folder) a split with these tars consists of or may have."""
    files = {f"{split}/{INDEX}", f"{split}/{CONVERTED}"}
    for name in shard_names:
        files |= {f"{split}/{name}", f"{split}/{name[:-4]}.idx"}
    return files


def planned_files(split: str, shard_count: int) -> set[str]:
    """Every file a split of `shard_count` shards may be written as (relative to the pack's folder)."""
    return split_files(split, [shard_name(split, k) for k in range(shard_count)])


def manifest_files(manifest: object) -> set[str]:
    """The files a manifest says its pack consists of (relative to its folder), plain names only; read
    defensively (a damaged manifest names fewer files, never one outside the folder)."""
    files = {MANIFEST}
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    for split, info in splits.items() if isinstance(splits, dict) else ():
        if not (is_path_component(split) and isinstance(info, dict)):
            continue
        names = [s.get("name") if isinstance(s, dict) else None for s in info.get("shards") or []]
        files |= split_files(split, [n for n in names if is_path_component(n) and n.endswith(".tar")])
    return files
