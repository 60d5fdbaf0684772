"""The manifest: its shape (typed), the one builder every writer uses, and the one reader that validates it as
untrusted input (every field a loader uses type-checked)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import TypedDict

from crackio.errors import is_integer
from crackio.format.layout import FORMAT_VERSION, MANIFEST, REPACK, SPLITS, ShardError, join, shard_pattern
from crackio.fsio import atomic_write, is_path_component, read_regular


class ShardEntry(TypedDict):
    name: str  # <split>-NNNNNN.tar, in the split's folder
    samples: int
    bytes: int  # the tar's size: a truncated or replaced tar is refused before reading


class SplitEntry(TypedDict, total=False):
    """A split's entry. Keys in this order in the file (the same input gives the same bytes); the proposal
    stage adds photos, ground_truth_boxes, proposals_considered, proposal_recall, regions_before_cap and
    proposal_recall_uncapped after `classes`."""

    samples: int  # stored samples, == the sum over shards
    classes: dict[str, int]  # "0", "1": samples per label, from the names
    iou_histogram: dict  # crackio.writing.quality.iou_histogram
    labels: dict  # which IoU thresholds the names' labels follow (crackio.writing.quality.label_report)
    converted: dict[str, int]  # inputs converted, per kind of conversion
    converted_list: str | None  # <split>/converted.tsv when any were converted
    shards: list[ShardEntry]


class Manifest(TypedDict, total=False):
    """The pack's manifest.json, written last: its presence marks a complete pack."""

    format_version: int  # FORMAT_VERSION: the one versioning mechanism
    source: str  # the input folder, absolute
    stage: str  # "propose" for the proposal stage; absent for pack
    annotations: dict  # the proposal stage: format, classes, positive classes
    proposals: dict  # the proposal stage: the settings detection reuses (crackio.writing.regions)
    photos: dict  # the proposal stage: {"root": folder, "splits": {split: [photo paths relative to root]}}
    settings: dict  # the producer's settings that change the bytes (not the worker count)
    seed: int
    samples: int
    splits: dict[str, SplitEntry]
    leakage: dict  # crackio.writing.quality.leakage_report
    ignored: dict[str, int]  # names ignored, per reason (hidden files, metadata, ...)
    skipped: list[dict]  # {"path", "reason"} per input left out, sorted


def split_entry(
    *,
    samples: int,
    classes: dict[str, int],
    stats: dict,
    iou_histogram: dict,
    labels: dict,
    converted: dict[str, int],
    converted_list: str | None,
    shards: list[ShardEntry],
) -> SplitEntry:
    """A split's manifest entry, keys in the file's order; `stats` are the producer's own fields."""
    entry = {"samples": samples, "classes": classes, **stats, "iou_histogram": iou_histogram, "labels": labels}
    entry |= {"converted": converted, "converted_list": converted_list, "shards": shards}
    return entry  # type: ignore[return-value]  # a TypedDict with the producer's extra keys


def build_manifest(
    *,
    source: str,
    stage: dict,
    settings: dict,
    seed: int,
    splits: dict[str, SplitEntry],
    leakage: dict,
    ignored: dict[str, int],
    skipped: list[dict],
) -> Manifest:
    """The manifest every producer writes, keys in the file's order; `stage` holds the proposal stage's
    fields (stage, annotations, proposals, photos), empty for pack."""
    return {  # type: ignore[return-value]
        "format_version": FORMAT_VERSION,
        "source": source,
        **stage,
        "settings": settings,
        "seed": seed,
        "samples": sum(s["samples"] for s in splits.values()),
        "splits": splits,
        "leakage": leakage,
        "ignored": ignored,
        "skipped": skipped,
    }


def write_manifest(root: Path, manifest: Manifest) -> None:
    """manifest.json through the atomic writer: written last, it marks a complete pack."""
    atomic_write(root / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


MAX_MANIFEST_BYTES = 1 << 30  # a manifest lists skipped files: large for a huge messy folder, never this large


def _bad(path: str | os.PathLike, what: str, root: str | os.PathLike) -> ShardError:
    return ShardError(f"{path} {what}: " + REPACK.format(root=root))


def _count(value) -> bool:
    return is_integer(value, 0, 2**63 - 1)  # a JSON integer that fits the index's int64 columns


def manifest_sha256(root: str | os.PathLike) -> str:
    """The SHA-256 of a pack's manifest.json: what identifies the pack (the same input and seed give a
    byte-identical manifest, and it moves with the folder). Read after `read_manifest` validated it.

    Raises:
        OSError: the manifest cannot be read.
    """
    return hashlib.sha256(read_regular(Path(root) / MANIFEST, MAX_MANIFEST_BYTES)).hexdigest()


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _a_crop_in(root: Path, limit: int = 2000) -> Path | None:
    """An image file directly in `root` or in one of its subfolders (a proposal folder's splits), looking at no more
    than `limit` entries per folder (a proposal folder may hold millions)."""
    folders = [root]
    with os.scandir(root) as entries:
        for entry in itertools.islice(entries, limit):
            if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES):
                return Path(entry.path)
            if entry.is_dir() and len(folders) < 16:
                folders.append(Path(entry.path))
    for folder in folders[1:]:
        with os.scandir(folder) as entries:
            for entry in itertools.islice(entries, limit):
                if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES):
                    return Path(entry.path)
    return None


def splits_named(data: bytes) -> set[str] | None:
    """The split names of a manifest's bytes, read leniently (for a message, never for reading the pack); None
    when they are not a manifest's."""
    try:
        splits = json.loads(data).get("splits")
    except (ValueError, RecursionError, AttributeError):
        return None
    return {s for s in splits if isinstance(s, str)} if isinstance(splits, dict) else None


def split_folder_error(folder: str, pack: str, split: str) -> ShardError:
    """The refusal of a split's folder given where a pack is wanted: name the pack's folder instead."""
    return ShardError(
        f"{folder} is the folder of split {split!r} inside the pack {pack}, not a pack: give the pack's folder "
        f"{pack} and choose the split {split!r} by name"
    )


def _pack_around(root: Path) -> Path | None:
    """The pack `root` is a split folder of: its parent holds a manifest.json that names the split (or, when that
    manifest cannot be read, the split is one of the standard names); None otherwise."""
    parent = root.resolve().parent
    try:
        names = splits_named(read_regular(parent / MANIFEST, MAX_MANIFEST_BYTES))
    except (OSError, ValueError):
        return None
    if root.resolve().name not in (names if names is not None else SPLITS):
        return None
    return root.parent if str(root.parent) not in ("", ".") and root.name not in ("", ".", "..") else parent


def check_split(manifest: dict, root: str | os.PathLike, split: str, option: str = "split") -> None:
    """Refuse a split the pack does not hold, naming `option` (the flag that chose it), the pack's splits and the
    closest of them.

    Raises:
        ShardError: one line.
    """
    from crackio.cli import closest

    splits = manifest["splits"]
    if split not in splits:
        have = ", ".join(sorted(splits)) or "none"
        raise ShardError(
            f"{option} {split!r} is not in {join(root, MANIFEST)} (its splits: {have})"
            + (closest(split, splits) or f"; choose one of those, or pack a folder {split}/")
        )


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
        pack = _pack_around(root)
        if pack is not None:
            raise split_folder_error(str(root), str(pack), root.resolve().name)
        crop = _a_crop_in(root)
        if crop is not None:  # the likeliest first mistake: the proposal folder itself
            out = root.resolve().parent / f"{root.resolve().name}-shards"
            raise ShardError(
                f"{root} holds proposal crops (e.g. {crop.relative_to(root)}), not shards: pack them first with "
                f"`python tools/pack.py {root} --out {out}`, then give --shards {out}"
            )
        raise ShardError(
            f"{path} is missing, so {root} holds no complete pack (an interrupted run?): " + REPACK.format(root=root)
        )
    try:
        data = read_regular(path, MAX_MANIFEST_BYTES)
    except (OSError, ValueError) as e:
        raise _bad(path, f"is unreadable ({type(e).__name__}: {str(e)[:200]})", root) from None
    return parse_manifest(data, path, root)


def parse_manifest(data: bytes, path: str | os.PathLike, root: str | os.PathLike) -> dict:
    """A manifest's bytes (read from `path` of the pack at `root`: a folder or a URL, named in messages) as a
    dict, every field a loader uses type-checked (the checks of `read_manifest`).

    Raises:
        ShardError: not JSON, another format version, malformed fields.
    """
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as e:
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
