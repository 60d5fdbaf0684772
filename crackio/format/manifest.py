"""The manifest: its shape (typed), the one builder every writer uses, and the one reader that validates it as
untrusted input (every field a loader uses type-checked)."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shlex
from pathlib import Path
from typing import TypedDict

from crackio.errors import given, is_integer
from crackio.format.layout import (
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    ShardError,
    join,
    shard_pattern,
    split_sort_key,
)
from crackio.fsio import atomic_write, is_path_component, read_regular


class ShardEntry(TypedDict):
    name: str  # <split>-NNNNNN.tar, in the split's folder
    samples: int
    bytes: int  # the tar's size: a truncated or replaced tar is refused before reading
    sha256: str  # the tar's SHA-256 (hex), computed as it was written: `verify` checks every byte against it
    idx_sha256: str  # its DALI .idx's SHA-256


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
    converted_sha256: str | None  # its SHA-256
    index_sha256: str  # index.npy's SHA-256: checked whenever a loader opens the index
    shards: list[ShardEntry]


class Manifest(TypedDict, total=False):
    """The pack's manifest.json, written last: its presence marks a complete pack. It records the SHA-256 of every
    other file of the pack, so its own SHA-256 (`manifest_sha256`) identifies every byte of the pack."""

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
    converted_sha256: str | None,
    index_sha256: str,
    shards: list[ShardEntry],
) -> SplitEntry:
    """A split's manifest entry, keys in the file's order; `stats` are the producer's own fields."""
    entry = {"samples": samples, "classes": classes, **stats, "iou_histogram": iou_histogram, "labels": labels}
    entry |= {"converted": converted, "converted_list": converted_list, "converted_sha256": converted_sha256}
    entry |= {"index_sha256": index_sha256, "shards": shards}
    return entry  # type: ignore[return-value]  # a TypedDict with the producer's extra keys


def photo_sets(manifest: dict) -> list[dict]:
    """The photo sets a tools/propose.py pack records, as written: {"source", "annotations", "photos": {"root",
    "splits"}} for the photos it was made from, then one per `--append` (the manifest's `appended`); those with
    malformed fields left out (read leniently: detection and append use them, loaders never do)."""
    sets = [{k: manifest.get(k) for k in ("source", "annotations", "photos")}, *(manifest.get("appended") or [])]
    return [
        s
        for s in sets
        if isinstance(s, dict)
        and isinstance(s.get("source"), str)
        and isinstance(s.get("annotations"), dict)
        and isinstance(s.get("photos"), dict)
        and isinstance(s["photos"].get("root"), str)
        and isinstance(s["photos"].get("splits"), dict)
    ]


def recorded_photos(manifest: dict) -> dict[str, Path]:
    """The photos a tools/propose.py pack records, by stem (their files where it read them); {} for other packs."""
    found = {}
    for s in photo_sets(manifest):
        for names in s["photos"]["splits"].values():
            for n in names if isinstance(names, list) else []:
                found[Path(str(n)).stem] = Path(s["photos"]["root"]) / str(n)
    return found


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
    return ShardError(f"{path} {what}: " + repack(root))


def _count(value) -> bool:
    return is_integer(value, 0, 2**63 - 1)  # a JSON integer that fits the index's int64 columns


def is_sha256(value) -> bool:
    """A SHA-256 as the manifest records it: 64 lowercase hexadecimal digits."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


# Recorded settings that are no command line flag (fixed, or the manifest's own notes).
NOT_FLAGS = {"workers", "size", "quality", "min_size", "warp", "fill", "label_rule"}


def _flags(recorded: object) -> str:
    """Recorded settings as the tools' flags (` --samples-per-shard 50 --seed 5`): a list comma-joined (an empty one
    left out), None as `none`."""
    if not isinstance(recorded, dict):
        return ""
    words = []
    for key, value in recorded.items():
        if key in NOT_FLAGS or value == []:
            continue
        if isinstance(value, list):
            value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        words.append(f"--{key.replace('_', '-')} {shlex.quote('none' if value is None else str(value))}")
    return "".join(" " + w for w in words)


def rewrite_text(manifest: dict, root: str | os.PathLike) -> str:
    """How to write the pack at `root` again from its source with the settings it records: tools/propose.py for
    the proposal stage's packs, tools/pack.py for proposal folders (SRC where the source is not recorded); for an
    http(s) server, into a folder then served there. Read leniently: the manifest may be damaged or of another
    format version."""
    recorded = manifest.get("source")
    source = recorded if isinstance(recorded, str) else "SRC"
    served = str(root).startswith(("http://", "https://"))
    out = "FOLDER" if served else shlex.quote(str(root))
    settings = _flags(manifest.get("settings"))
    if manifest.get("stage") == "propose":
        annotations = manifest.get("annotations")
        fmt = annotations.get("format") if isinstance(annotations, dict) else None
        option = f" --format {fmt}" if isinstance(fmt, str) else ""
        proposals = _flags(manifest.get("proposals"))
        text = f"`python tools/propose.py {shlex.quote(source)}{option} --out {out}{proposals}{settings}`"
    else:
        text = f"`python tools/pack.py {shlex.quote(source)} --out {out}{settings}`"
    appended = manifest.get("appended")
    sources = [str(a.get("source")) for a in appended if isinstance(a, dict)] if isinstance(appended, list) else []
    if sources:  # what --append added after it: the first command replaces the pack, then each is appended again
        text = text[:-1] + " --overwrite`, then append " + ", ".join(shlex.quote(s) for s in sources) + " again"
    return f"write the pack again with {text}" + (f", then serve FOLDER at {root}" if served else "")


def repack(root: str | os.PathLike) -> str:
    """The fix for a damaged or incomplete pack at `root`: the command that writes it again with its recorded
    source and settings (its manifest read leniently), or, with no readable manifest, `tools/pack.py SRC`; for an
    http(s) server crackio only reads from, copying the pack folder there again."""
    text = str(root)
    if text.startswith(("http://", "https://")):
        return f"copy the whole pack folder, as tools/pack.py wrote it, to the server at {text} again"
    manifest = None
    if "://" not in text:
        with contextlib.suppress(OSError, ValueError, RecursionError):
            manifest = json.loads(read_regular(Path(root) / MANIFEST, MAX_MANIFEST_BYTES))
        if manifest is None and (Path(root) / ".spool" / "base" / MANIFEST).is_file():  # crackio.writing.append
            return (
                "an append to it was interrupted: run that same command (tools/propose.py or tools/pack.py with "
                f"--append --out {text}) again to finish it"
            )
    if isinstance(manifest, dict) and isinstance(manifest.get("source"), str):
        return rewrite_text(manifest, root)
    return f"re-run `python tools/pack.py SRC --out {text}`"


def manifest_sha256(root: str | os.PathLike) -> str:
    """The SHA-256 of a pack's manifest.json: what identifies the pack, every byte of it (the manifest records
    every other file's SHA-256; the same input and seed give a byte-identical manifest, and it moves with the
    folder). Read after `read_manifest` validated it.

    Raises:
        OSError: the manifest cannot be read.
    """
    return hashlib.sha256(read_regular(Path(root) / MANIFEST, MAX_MANIFEST_BYTES)).hexdigest()


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


RUN_FILES = ("best.pt", "last.pt", "step.pt", "curves.png")  # with config.json: a training run's folder
# Names that show a folder of annotated photos (tools/propose.py's input): (format, rank), a file's outranking a
# folder's; an "annotations" folder is VOC's unless COCO's instances_*.json in it says otherwise.
FORMAT_FOLDERS = {"labels": "yolo", "annotations": "voc", "masks": "mask", "mask": "mask", "groundtruth": "mask"}


def _entries(root: Path, limit: int = 2000) -> list[tuple[Path, bool]]:
    """(path, is a folder) of what `root` holds and then its first 15 subfolders (a split's) hold, by name, at
    most `limit` entries per folder (a proposal folder may hold millions)."""

    def listing(folder: Path) -> list[tuple[Path, bool]]:
        try:
            with os.scandir(folder) as entries:
                return sorted((Path(e.path), e.is_dir()) for e in itertools.islice(entries, limit))
        except OSError:
            return []

    top = listing(root)
    return top + [e for folder in [p for p, is_dir in top if is_dir][:15] for e in listing(folder)]


def _annotation_format(entries: list[tuple[Path, bool]]) -> tuple[str, Path] | None:
    """The annotation format a folder's names show, and the file or folder that shows it; None: none does."""
    signs = []
    for path, is_dir in entries:
        name = path.name.lower()
        if is_dir and name in FORMAT_FOLDERS:
            signs.append((2, FORMAT_FOLDERS[name], path))
        elif not is_dir and (name.endswith(".coco.json") or (name.startswith("instances") and name.endswith(".json"))):
            signs.append((0, "coco", path))
        elif not is_dir and name in ("data.yaml", "dataset.yaml"):
            signs.append((0, "yolo", path))
        elif not is_dir and name.endswith((".xml", "_mask.png")):
            signs.append((1, "voc" if name.endswith(".xml") else "mask", path))
    return min(signs, key=lambda s: (s[0], len(s[2].parts)))[1:] if signs else None


def _run_folder(root: Path, entries: list[tuple[Path, bool]]) -> str | None:
    """Why `root` is a training run's folder (config.json and a checkpoint or curves.png), with the pack it
    trained on from its config.json when readable; None when it is not one."""
    names = {p.name for p, is_dir in entries if not is_dir and p.parent == root}
    if "config.json" not in names or not names & set(RUN_FILES):
        return None
    try:
        shards = json.loads(read_regular(root / "config.json", 1 << 20)).get("shards")
    except (OSError, ValueError, RecursionError, AttributeError):
        shards = None
    held = ", ".join(["config.json", *(n for n in RUN_FILES if n in names)])
    where = f': "shards": {shards!r}' if isinstance(shards, str) and shards else ' as "shards"'
    return (
        f"{root} is a training run's folder (it holds {held}), not a pack: the pack it trained on is named in its "
        f"config.json{where}"
    )


def splits_named(data: bytes) -> set[str] | None:
    """The split names of a manifest's bytes, read leniently (for a message, never for reading the pack); None
    when they are not a manifest's."""
    try:
        splits = json.loads(data).get("splits")
    except (ValueError, RecursionError, AttributeError):
        return None
    return {s for s in splits if isinstance(s, str)} if isinstance(splits, dict) else None


def split_folder_error(folder: str, pack: str, split: str, verifying: bool = False) -> ShardError:
    """The refusal of a split's folder given where a pack is wanted: name the pack's folder instead (`verifying`:
    the caller checks whole packs, so no split is chosen)."""
    fix = "verify the pack's folder {} (every split is checked)" if verifying else "give the pack's folder {}"
    return ShardError(
        f"{folder} is the folder of split {split!r} inside the pack {pack}, not a pack: {fix.format(pack)}"
        + ("" if verifying else f" and choose the split {split!r} by name")
    )


def pack_file_text(path: str, pack: str) -> str:
    """The refusal of a file of a pack (its manifest, a split's index or tar) where the pack is wanted: the same
    words for a folder and a URL."""
    what = "the manifest" if path.rstrip("/").rpartition("/")[2] == MANIFEST else "a file"
    return f"{path} names {what} of the pack {pack}, not the pack: give the pack's folder, {pack}"


def _up(path: Path, levels: int) -> Path:
    """`path`'s folder `levels` up, as written where it can be (`pack/train/index.npy` -> `pack`), else resolved."""
    return path.parents[levels - 1] if len(path.parts) > levels else path.resolve().parents[levels - 1]


def _pack_holding(path: Path) -> Path | None:
    """The pack `path` is a file of: the folder of a `manifest.json`, or the nearest of the parent and grandparent
    of another file holding a manifest.json (a split's index, tars, ...); None otherwise."""
    if path.name == MANIFEST and _up(path, 1).is_dir():
        return _up(path, 1)
    if not path.exists() or path.is_dir():
        return None
    return next((_up(path, k) for k in (1, 2) if (_up(path, k) / MANIFEST).is_file()), None)


def _then(out: Path, option: str, verifying: bool) -> str:
    """What to do with the pack a message tells to make: verify it, or give it as `option` (a command's flag,
    "--shards", or an argument, "shards"; "": no name)."""
    if verifying:
        return f"then verify {out}"
    return f"then give {given(option, str(out))}" if option else f"then give {out} in its place"


def not_a_pack(root: Path, option: str = "", verifying: bool = False) -> ShardError:
    """Why `root`, which holds no manifest.json, is no pack, and what to give instead: a file of a pack, a split's
    folder, a training run's folder, annotated photos, proposal crops, or a pack not finished. Looked up by names
    only (reading no file but a run's config.json), on at most a few thousand entries.

    `option` and `verifying` as `read_manifest`'s.
    """
    if not root.is_dir():
        pack = _pack_holding(root)
        if pack is not None:
            return ShardError(pack_file_text(str(root), str(pack)))
        if root.exists():
            return ShardError(
                f"{root} is a file, not a pack: give the pack's folder (the one holding {MANIFEST}, which "
                "tools/pack.py and tools/propose.py write)"
            )
        return ShardError(
            f"shards folder {root} does not exist: pack a proposal folder first with "
            f"`python tools/pack.py SRC --out {root}`"
        )
    pack = _pack_around(root)
    if pack is not None:
        return split_folder_error(str(root), str(pack), root.resolve().name, verifying)
    entries = _entries(root)
    run = _run_folder(root, entries)
    if run is not None:
        return ShardError(run)
    out = root.resolve().parent / f"{root.resolve().name}-shards"
    annotated = _annotation_format(entries)
    if annotated is not None:
        fmt, sign = annotated
        return ShardError(
            f"{root} looks like annotated photos ({sign.relative_to(root)}: --format {fmt}), not a pack: make a "
            f"pack of their proposals with `python tools/propose.py {root} --format {fmt} --out {out}`, "
            + _then(out, option, verifying)
        )
    crop = next((p for p, is_dir in entries if not is_dir and p.name.lower().endswith(IMAGE_SUFFIXES)), None)
    if crop is not None:  # the likeliest first mistake: the proposal folder itself
        return ShardError(
            f"{root} holds proposal crops (e.g. {crop.relative_to(root)}), not shards: pack them first with "
            f"`python tools/pack.py {root} --out {out}`, " + _then(out, option, verifying)
        )
    return ShardError(
        f"{root / MANIFEST} is missing, so {root} holds no complete pack (an interrupted run?): " + repack(root)
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
        have = ", ".join(sorted(splits, key=split_sort_key)) or "none"
        held = [s for s in sorted(splits, key=split_sort_key) if s != "train"] or sorted(splits, key=split_sort_key)
        instead = f"; give {given(option, held[0])}, or" if held else ";"
        raise ShardError(
            f"{option} {split!r} is not in {join(root, MANIFEST)} (its splits: {have})"
            + (closest(split, splits) or f"{instead} pack a folder {split}/")
        )


def read_manifest(root: str | os.PathLike, option: str = "", verifying: bool = False) -> dict:
    """The manifest of a complete pack, every field a loader uses type-checked.

    Args:
        root: the pack's folder.
        option: how the caller names `root` (an argument, "shards", or a command's flag, "--shards"), for a
            message that tells what to give instead ("": no name).
        verifying: the caller checks the whole pack (crackio.verify): messages say to verify, not to read.

    Raises:
        ShardError: no complete pack (saying what `root` is instead: `not_a_pack`), an unreadable or malformed
            manifest, another format version, a split or shard name that is not a plain name of the writer's
            pattern (so no path can point outside `root`).
    """
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise not_a_pack(root, option, verifying)
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
    version = manifest.get("format_version")
    if not is_integer(version, FORMAT_VERSION, FORMAT_VERSION):  # 3.0 and True are no format version
        older = is_integer(version, 1, FORMAT_VERSION - 1)
        raise ShardError(
            f"{path} has format_version {version!r}, this crackio reads {FORMAT_VERSION}"
            + (" (which records every file's SHA-256)" if older else "")
            + f": {rewrite_text(manifest, root)}"
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
        if not is_sha256(info.get("index_sha256")):
            raise _bad(path, f"{where} needs 'index_sha256' (its index.npy's SHA-256, 64 hex digits)", root)
        if info.get("converted_sha256") is not None and not is_sha256(info["converted_sha256"]):
            raise _bad(path, f"{where}.converted_sha256 is not a SHA-256 (64 hex digits)", root)
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
            if not (is_sha256(shard.get("sha256")) and is_sha256(shard.get("idx_sha256"))):
                raise _bad(path, f"{where}.shards[{k}] needs 'sha256' and 'idx_sha256' (64 hex digits each)", root)
        if sum(s["samples"] for s in info["shards"]) != info["samples"]:
            raise _bad(
                path,
                f"{where}: its shards hold {sum(s['samples'] for s in info['shards'])} samples, not {info['samples']}",
                root,
            )
    return manifest
