"""Pack a proposal directory into shards: discover, shuffle, decode-check, write, index, report."""

from __future__ import annotations

import json
import os
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from crackio.errors import ConfigError, MissingFile
from crackio.images import prepare, strict_pillow
from crackio.names import IMAGE_EXTENSIONS, BadName, Proposal, display_name, is_utf8, parse_name
from crackio.outdir import OutputFolder, manifest_files
from crackio.quality import SPLIT_ORDER, iou_histogram, label_report, leakage_report, split_sort_key
from crackio.shards import (
    FORMAT_VERSION,
    INDEX,
    MANIFEST,
    ShardResult,
    assemble_index,
    atomic_write,
    index_dtype,
    save_index,
    shard_name,
    write_shard,
)
from crackio.workers import check_stop, run_ordered, tick

# Names operating systems and archivers leave in folders; never proposals.
OS_METADATA = {"__MACOSX", "Thumbs.db", "desktop.ini", "ehthumbs.db", "$RECYCLE.BIN", "System Volume Information"}
HIDDEN = "hidden or operating-system metadata (.DS_Store, ._* AppleDouble, __MACOSX, Thumbs.db)"
NOT_IMAGE = "not an image file by its extension (metadata such as README, data.yaml, annotation JSON)"
NO_IMAGES = "folder without image files (not a split)"
CONVERTED = "converted.tsv"  # per split: file name, tab, what was converted


@dataclass(frozen=True)
class PackSettings:
    samples_per_shard: int = 10000  # ~150-250 MB tars for 224x224 crops
    workers: int = 0  # processes writing shards; 0 = all cores (parallel across shards)
    seed: int = 0  # seeds the global shuffle
    size: int = 224  # every stored image is size x size RGB JPEG
    quality: int = 95  # JPEG quality of converted inputs


@dataclass(frozen=True)
class Skipped:
    path: str  # as text; bytes that are not UTF-8 escaped (crackio.names.display_name)
    reason: str


class Found:
    """What discovery saw: splits with their parsed proposals, skipped inputs, ignored names by reason."""

    def __init__(self) -> None:
        self.splits: dict[str, tuple[Path, list[Proposal]]] = {}
        self.skipped: list[Skipped] = []
        self.ignored: Counter[str] = Counter()

    def skip(self, path: str | os.PathLike, reason: str) -> None:
        self.skipped.append(Skipped(display_name(path), reason))


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _ignorable(name: str) -> bool:
    return name.startswith(".") or name in OS_METADATA


def _has_image(folder: str) -> bool:
    with os.scandir(folder) as entries:
        return any(_is_image(e.name) and not _ignorable(e.name) and not _is_dir(e) for e in entries)


def _looks_like_proposal(name: str) -> bool:
    """A proposal name with an extension we do not read (e.g. .gif): skipped, not ignored as metadata."""
    parts = name.rsplit(".", 4)
    return len(parts) == 5 and parts[1].isdigit() and parts[3] in ("0", "1")


def _is_dir(e: os.DirEntry) -> bool:
    try:
        return e.is_dir()
    except OSError:  # a symlink loop (ELOOP) or an entry gone since the listing
        return False


def _is_regular(e: os.DirEntry) -> bool:
    try:
        return e.is_file()  # follows links: a link to a regular file counts, a dangling one does not
    except OSError:
        return False


def discover(src: Path, exclude: Path | None = None) -> Found:
    """Splits and their parsed proposals, sorted by name; no image is opened yet.

    Layout: SRC/<split>/<name>, or SRC/<name> as one split named after SRC. SRC is one split when
    it holds image files itself and none of its subfolders with images is named train, valid, val,
    validation or test (then those subfolders are strays). Hidden files and folders, OS metadata,
    non-image files and folders without images are ignored (counted, not failures); image files
    that cannot be used, and entries that are not regular files (named pipes, sockets, devices,
    dangling links, symlink loops: never opened), are skipped with a reason. `exclude` (the output
    folder, when it is inside SRC) is ignored.
    """
    found = Found()
    visible = []
    skip_dir = exclude.resolve() if exclude is not None else None
    for e in sorted(os.scandir(src), key=lambda e: e.name):
        if _ignorable(e.name):
            found.ignored[HIDDEN] += 1
        elif skip_dir is not None and _is_dir(e) and Path(e.path).resolve() == skip_dir:
            continue  # not counted: the first pack, before the folder existed, must write the same manifest
        else:
            visible.append(e)
    image_dirs = [e for e in visible if _is_dir(e) and _has_image(e.path)]
    loose = any(_is_regular(e) and _is_image(e.name) for e in visible)
    single = loose and not any(e.name.lower() in SPLIT_ORDER for e in image_dirs)
    folders: dict[str, tuple[Path, list[os.DirEntry] | None]]  # None: scanned below
    if single:
        folders = {src.absolute().name: (src, visible)}
    else:
        folders = {e.name: (Path(e.path), None) for e in visible if _is_dir(e)}
        for e in visible:
            if _is_dir(e):
                continue
            if _is_image(e.name):
                found.skip(e.path, "image file outside any split folder: move it into train/, valid/ or test/")
            else:
                _classify(e, found)
    for split, (folder, entries) in folders.items():
        if not is_utf8(split):
            found.skip(folder, "split folder name is not valid UTF-8: rename it (e.g. train, valid, test)")
            continue
        entries = entries if entries is not None else sorted(os.scandir(folder), key=lambda e: e.name)
        proposals = []
        for e in entries:
            if _ignorable(e.name):
                found.ignored[HIDDEN] += 1
            elif _is_dir(e) and _has_image(e.path):
                found.skip(e.path, "stray folder inside a split folder (splits hold files only)")
            elif _is_dir(e):
                found.ignored[NO_IMAGES] += 1
            elif _is_image(e.name) and _is_regular(e):
                try:
                    proposals.append(parse_name(e.name))
                except BadName as err:
                    found.skip(e.path, f"name does not parse: {err}")
            else:
                _classify(e, found)
        if proposals or any(_is_image(e.name) for e in entries if not _is_dir(e)):
            found.splits[split] = (folder, proposals)
        else:
            found.ignored[NO_IMAGES] += 1
    found.splits = dict(sorted(found.splits.items(), key=lambda kv: split_sort_key(kv[0])))
    return found


def _classify(e: os.DirEntry, found: Found) -> None:
    """A file that is not a readable image file by its name: skipped or ignored, never opened."""
    if not _is_regular(e):  # a FIFO would block a read, a device never end, a dangling link or loop fail
        found.skip(e.path, "not a regular file (a named pipe, socket, device, broken link or symlink loop): not read")
    elif _looks_like_proposal(e.name):
        found.skip(
            e.path,
            f"extension .{e.name.rsplit('.', 1)[1]} is not one of {', '.join(IMAGE_EXTENSIONS)}: "
            f"convert the file to JPEG",
        )
    else:
        found.ignored[NOT_IMAGE] += 1


def tsv_field(text: str) -> str:
    """A name as one TSV field: backslash, tab, newline and carriage return escaped as \\\\, \\t, \\n, \\r."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def split_order(split: str, count: int, seed: int) -> np.ndarray:
    # Global shuffle before writing: DALI's reader only shuffles inside a buffer.
    return np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(count)


class _ShardTask(NamedTuple):
    folder: Path
    split: str
    number: int
    first_key: int  # key of proposals[0]: its position in the split's seeded order
    src_dir: Path
    proposals: list[Proposal]
    size: int
    quality: int


class _PackedShard(NamedTuple):
    result: ShardResult
    skipped: list[Skipped]
    converted: list[str]  # converted.tsv lines
    digests: np.ndarray  # S16 BLAKE2b of each stored sample's source bytes, in key order


def _pack_shard(task: _ShardTask) -> _PackedShard:
    """Read, check and store one shard's slice of the seeded order (runs in a worker process)."""
    skipped: list[Skipped] = []
    converted: list[str] = []
    digests: list[bytes] = []

    def samples():
        for key, p in enumerate(task.proposals, task.first_key):
            check_stop()
            path = os.path.join(task.src_dir, p.filename)
            result = prepare(path, task.size, task.quality)
            tick()
            if result.data is None:
                skipped.append(Skipped(display_name(path), result.note))
                yield key, None, {}
                continue
            if result.note:
                converted.append(f"{tsv_field(p.filename)}\t{result.note}\n")
            digests.append(result.digest)
            yield (
                key,
                result.data,
                {"filename": p.filename, "image": p.stem, "proposal": p.proposal, "iou": p.iou, "label": p.label},
            )

    result = write_shard(task.folder / shard_name(task.split, task.number), task.number, samples())
    return _PackedShard(result, skipped, converted, np.array(digests, dtype="S16"))


def shard_slices(count: int, per_shard: int) -> list[tuple[int, int]]:
    """[start, stop) of each shard's slice of a split's order: shard k holds keys k*per_shard onwards."""
    return [(k, min(k + per_shard, count)) for k in range(0, count, per_shard)]


def _index_rows(ordered: list[Proposal], packed: list[_PackedShard]) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """The split's index (every column), its shard list and the stored samples' digests, in key order."""
    flen = max((len(p.filename.encode()) for p in ordered), default=1)
    slen = max((len(p.stem.encode()) for p in ordered), default=1)
    rows, shards = assemble_index([p.result for p in packed], index_dtype(flen, slen))
    keys = rows["key"]
    kept = [ordered[k] for k in keys]
    rows["label"] = np.fromiter((p.label for p in kept), np.int8, len(kept))
    rows["iou"] = np.fromiter((p.iou for p in kept), np.float32, len(kept))
    rows["proposal"] = np.fromiter((p.proposal for p in kept), np.int32, len(kept))
    rows["filename"] = [p.filename.encode() for p in kept]
    rows["stem"] = [p.stem.encode() for p in kept]
    digests = np.concatenate([p.digests for p in packed]) if packed else np.zeros(0, "S16")
    return rows, shards, digests


def _split_info(folder: Path, split: str, rows: np.ndarray, shards: list[dict], packed: list[_PackedShard]) -> dict:
    """Write the split's index and converted list; returns its manifest entry."""
    save_index(folder / INDEX, rows)
    converted_lines = sorted(line for p in packed for line in p.converted)
    # Every converted input with what was done to it; a file, not the manifest, which every loader reads.
    listed = folder / CONVERTED
    if converted_lines:
        atomic_write(listed, "".join(converted_lines).encode())
    else:
        listed.unlink(missing_ok=True)
    converted = Counter(line.rstrip("\n").rsplit("\t", 1)[1] for line in converted_lines)
    labels = rows["label"].astype(np.int64)
    return {
        "samples": len(rows),
        "classes": {"0": int((labels == 0).sum()), "1": int((labels == 1).sum())},
        "iou_histogram": iou_histogram(rows["iou"], labels),
        "labels": label_report(rows["iou"], labels, rows["filename"]),
        "converted": dict(sorted(converted.items())),
        "converted_list": f"{split}/{CONVERTED}" if converted_lines else None,
        "shards": shards,
    }


def planned_files(split: str, shard_count: int) -> set[str]:
    """Every file a split of `shard_count` shards may be written as (relative to OUT)."""
    files = {f"{split}/{INDEX}", f"{split}/{CONVERTED}"}
    for k in range(shard_count):
        name = shard_name(split, k)
        files |= {f"{split}/{name}", f"{split}/{name[:-4]}.idx"}
    return files


def pack(
    src: str | os.PathLike, out: str | os.PathLike, settings: PackSettings = PackSettings(), progress: bool = True
) -> dict:
    """Pack `src` into `out`; returns the manifest (also written to out/manifest.json).

    Shard k of a split holds the slice [k * samples_per_shard, (k + 1) * samples_per_shard) of
    the split's seeded order (a skipped input only makes its shard smaller), so `settings.workers`
    processes each write whole shards (crackio.workers: forked, so scripts without a
    `__main__` guard and notebooks work) and the output is byte-identical for any worker count.
    This process only writes the index and the manifest. Memory: the parsed names and index rows
    here (~0.9 KB per input measured, beside ~450 MB of imports), one sample per worker, at most
    2 x workers shards' results in flight.
    The returned dict adds `seconds`, which the file omits.

    Raises:
        MissingFile: `src` is not a folder.
        ConfigError: `samples_per_shard` < 1 or `workers` < 0; `out` is held by another run or holds a
            file crackio did not write where a shard goes.
        KeyboardInterrupt: Ctrl-C (or SIGTERM under `crackio.workers.stop_on_signals`); workers and
            temporaries are gone.
    """
    src, out = Path(src).absolute(), Path(out)  # absolute: the manifest is the same however SRC was typed
    if not src.is_dir():
        raise MissingFile(f"proposal folder {display_name(src)} does not exist")
    if settings.samples_per_shard < 1 or settings.workers < 0:
        raise ConfigError("samples_per_shard must be >= 1 and workers >= 0")
    t0 = time.perf_counter()
    if out.resolve() == src.resolve():
        raise ConfigError(
            f"--out {display_name(out)} is the proposal folder itself: the shards would go beside the crops; "
            f"write them elsewhere (e.g. --out {display_name(src)}/shards or a sibling folder)"
        )
    found = discover(src, exclude=out)
    if not found.splits:
        raise ConfigError(
            f"{display_name(src)} holds no image files: expected SRC/<split>/<stem>.<proposal>.<iou>."
            f"<label>.jpg (or such files in SRC itself)"
        )
    for split, (folder, _) in found.splits.items():
        if out.resolve().is_relative_to(folder.resolve()):
            raise ConfigError(
                f"--out {display_name(out)} is inside the split folder {display_name(folder)}: the "
                f"next pack would read the shards as a stray folder; write them elsewhere"
            )
        if (out / split).resolve() == folder.resolve():
            raise ConfigError(
                f"--out {display_name(out)} would put split {split}'s shards into its own source folder "
                f"{display_name(folder)}; write them elsewhere"
            )
    if out.resolve().parent == src.resolve() and out.is_dir() and _has_image(str(out)):
        raise ConfigError(
            f"--out {display_name(out)} is a split folder of {display_name(src)} (it holds images): the split "
            f"would be left out of the pack; write the shards elsewhere"
        )
    per = settings.samples_per_shard
    tasks: list[_ShardTask] = []
    ordered: dict[str, list[Proposal]] = {}
    for split, (src_dir, proposals) in found.splits.items():
        ordered[split] = [proposals[i] for i in split_order(split, len(proposals), settings.seed)]
        for start, stop in shard_slices(len(proposals), per):
            task = _ShardTask(
                out / split,
                split,
                start // per,
                start,
                src_dir,
                ordered[split][start:stop],
                settings.size,
                settings.quality,
            )
            tasks.append(task)
    workers = settings.workers or len(os.sched_getaffinity(0))
    total = sum(len(t.proposals) for t in tasks)
    with OutputFolder(out) as held:
        planned = {MANIFEST} | set().union(*(planned_files(s, -(-len(o) // per)) for s, o in ordered.items()))
        held.claim(planned)
        # The manifest marks a complete pack: remove it first so an interrupted run is never mistaken for one.
        (out / MANIFEST).unlink(missing_ok=True)
        for split in ordered:
            (out / split).mkdir(exist_ok=True)
        packed: dict[str, list[_PackedShard]] = {split: [] for split in ordered}
        with strict_pillow(), tqdm(total=total, unit="file", desc="pack", disable=not progress, smoothing=0.1) as bar:

            def advance(done: int) -> None:
                bar.update(done - bar.n)

            for task, result in zip(tasks, run_ordered(_pack_shard, tasks, workers, advance)):
                packed[task.split].append(result)
        splits: dict[str, dict] = {}
        stored: dict[str, tuple] = {}
        skipped = list(found.skipped)
        for split, shards in packed.items():
            rows, entries, digests = _index_rows(ordered[split], shards)
            splits[split] = _split_info(out / split, split, rows, entries, shards)
            stored[split] = (rows["filename"], rows["stem"], digests)
            skipped += [s for p in shards for s in p.skipped]
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": display_name(src),
            "settings": {k: v for k, v in asdict(settings).items() if k != "workers"},  # any worker count, same bytes
            "seed": settings.seed,
            "samples": sum(s["samples"] for s in splits.values()),
            "splits": splits,
            "leakage": leakage_report(stored),
            "ignored": dict(sorted(found.ignored.items())),
            "skipped": [asdict(s) for s in sorted(skipped, key=lambda s: s.path)],
        }
        held.finish(manifest_files(manifest))  # before the manifest: a failure here leaves no complete pack
        atomic_write(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    manifest["seconds"] = time.perf_counter() - t0
    return manifest


def summary(manifest: dict, out: Path) -> str:
    """One line of what was written, and a warning line per problem a researcher must know of."""
    parts = [
        f"{name} {s['samples']} ({s['classes']['1']} crack / {s['classes']['0']} no crack)"
        for name, s in manifest["splits"].items()
    ]
    shards = [sh for s in manifest["splits"].values() for sh in s["shards"]]
    mb = sum(sh["bytes"] for sh in shards) / 1e6
    converted = sum(sum(s["converted"].values()) for s in manifest["splits"].values())
    ignored = sum(manifest.get("ignored", {}).values())
    secs = manifest.get("seconds", 0.0)
    lines = [
        f"packed {'; '.join(parts) or 'nothing'} into {len(shards)} shards, {mb:.1f} MB in {out}; "
        f"{converted} converted, {len(manifest['skipped'])} skipped, {ignored} ignored; {secs:.1f} s"
    ]
    lines += [f"warning: {w}" for w in warnings(manifest)]
    return "\n".join(lines)


def print_skipped(manifest: dict, out: Path, word: str = "skipped", limit: int = 20) -> None:
    """The first `limit` skipped inputs on stderr, and where the whole list is (the CLIs' shared output)."""
    import sys

    for s in manifest["skipped"][:limit]:
        print(f"{word} {s['path']}: {s['reason']}", file=sys.stderr)
    if len(manifest["skipped"]) > limit:
        print(f"... and {len(manifest['skipped']) - limit} more, all listed in {out / MANIFEST}", file=sys.stderr)


def warnings(manifest: dict) -> list[str]:
    """Problems that do not stop a pack but that --strict refuses: leakage between splits, labels that
    contradict every IoU threshold."""
    found = []
    leak = manifest.get("leakage", {})
    dup, shared = leak.get("duplicate_contents", {}), leak.get("shared_stems", {})
    if dup.get("count"):
        found.append(
            f"{dup['count']} crops have the same bytes in more than one split (leakage); see 'leakage' in manifest.json"
        )
    if shared.get("count"):
        found.append(
            f"{shared['count']} full images (stems) have proposals in more than one split (leakage); "
            f"see 'leakage' in manifest.json"
        )
    for name, s in manifest["splits"].items():
        impossible = s.get("labels", {}).get("impossible", {}).get("count", 0)
        if impossible:
            found.append(
                f"{name}: {impossible} names carry a label no IoU threshold gives (crack at IoU 0 or "
                f"no crack at IoU 1); see splits.{name}.labels in manifest.json"
            )
    return found
