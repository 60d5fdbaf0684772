"""Pack a proposal directory into shards: discover, shuffle, decode-check, write, index, report."""

from __future__ import annotations

import json
import os
import time
import zlib
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from crackio.errors import ConfigError, MissingFile
from crackio.images import prepare, strict_pillow
from crackio.names import IMAGE_EXTENSIONS, BadName, Proposal, display_name, is_utf8, parse_name
from crackio.quality import SPLIT_ORDER, iou_histogram, label_report, leakage_report, split_sort_key
from crackio.shards import (
    FORMAT_VERSION,
    INDEX,
    MANIFEST,
    SplitWriter,
    atomic_write,
    index_dtype,
    save_index,
)

AHEAD = 2048  # files read and decoded ahead of the writer: memory stays flat however many files there are
# Names operating systems and archivers leave in folders; never proposals.
OS_METADATA = {"__MACOSX", "Thumbs.db", "desktop.ini", "ehthumbs.db", "$RECYCLE.BIN", "System Volume Information"}
HIDDEN = "hidden or operating-system metadata (.DS_Store, ._* AppleDouble, __MACOSX, Thumbs.db)"
NOT_IMAGE = "not an image file by its extension (metadata such as README, data.yaml, annotation JSON)"
NO_IMAGES = "folder without image files (not a split)"
CONVERTED = "converted.tsv"  # per split: file name, tab, what was converted


@dataclass(frozen=True)
class PackSettings:
    samples_per_shard: int = 10000  # ~150-250 MB tars for 224x224 crops
    workers: int = 0  # decoding threads; 0 = all cores
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
        return any(_is_image(e.name) and not _ignorable(e.name) and not e.is_dir() for e in entries)


def _looks_like_proposal(name: str) -> bool:
    """A proposal name with an extension we do not read (e.g. .gif): skipped, not ignored as metadata."""
    parts = name.rsplit(".", 4)
    return len(parts) == 5 and parts[1].isdigit() and parts[3] in ("0", "1")


def discover(src: Path) -> Found:
    """Splits and their parsed proposals, sorted by name; no image is opened yet.

    Layout: SRC/<split>/<name>, or SRC/<name> as one split named after SRC. SRC is one split when
    it holds image files itself and none of its subfolders with images is named train, valid, val,
    validation or test (then those subfolders are strays). Hidden files and folders, OS metadata,
    non-image files and folders without images are ignored (counted, not failures); image files
    that cannot be used, and entries that are not regular files (named pipes, sockets, devices,
    dangling links: never opened), are skipped with a reason.
    """
    found = Found()
    visible = []
    for e in sorted(os.scandir(src), key=lambda e: e.name):
        if _ignorable(e.name):
            found.ignored[HIDDEN] += 1
        else:
            visible.append(e)
    image_dirs = [e for e in visible if e.is_dir() and _has_image(e.path)]
    loose = any(e.is_file() and _is_image(e.name) for e in visible)
    single = loose and not any(e.name.lower() in SPLIT_ORDER for e in image_dirs)
    folders: dict[str, tuple[Path, list[os.DirEntry] | None]]  # None: scanned below
    if single:
        folders = {src.absolute().name: (src, visible)}
    else:
        folders = {e.name: (Path(e.path), None) for e in visible if e.is_dir()}
        for e in visible:
            if e.is_dir():
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
            elif e.is_dir() and _has_image(e.path):
                found.skip(e.path, "stray folder inside a split folder (splits hold files only)")
            elif e.is_dir():
                found.ignored[NO_IMAGES] += 1
            elif _is_image(e.name) and e.is_file():
                try:
                    proposals.append(parse_name(e.name))
                except BadName as err:
                    found.skip(e.path, f"name does not parse: {err}")
            else:
                _classify(e, found)
        if proposals or any(_is_image(e.name) for e in entries if not e.is_dir()):
            found.splits[split] = (folder, proposals)
        else:
            found.ignored[NO_IMAGES] += 1
    found.splits = dict(sorted(found.splits.items(), key=lambda kv: split_sort_key(kv[0])))
    return found


def _classify(e: os.DirEntry, found: Found) -> None:
    """A file that is not a readable image file by its name: skipped or ignored, never opened."""
    if not e.is_file():  # follows links: a FIFO, socket, device or dangling link would block or fail
        found.skip(e.path, "not a regular file (a named pipe, socket, device or broken link): not read")
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


def prepared_in_order(paths: list[str], settings: PackSettings, pool: ThreadPoolExecutor | None):
    """`prepare` of every path, yielded in order, at most AHEAD in flight."""
    if pool is None:
        yield from (prepare(p, settings.size, settings.quality) for p in paths)
        return
    pending: deque = deque()
    it = iter(paths)
    for p in it:
        pending.append(pool.submit(prepare, p, settings.size, settings.quality))
        if len(pending) >= AHEAD:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def pack_split(
    src_split: list[Proposal],
    src_dir: Path,
    out: Path,
    split: str,
    settings: PackSettings,
    pool: ThreadPoolExecutor | None,
    progress: tqdm,
) -> tuple[dict, list[Skipped], tuple]:
    """Write one split; returns its manifest entry, its skipped inputs and (filenames, stems, source digests)
    of the stored rows, for the leakage report."""
    folder = out / split
    order = split_order(split, len(src_split), settings.seed)
    proposals = [src_split[i] for i in order]
    flen = max((len(p.filename.encode()) for p in proposals), default=1)
    slen = max((len(p.stem.encode()) for p in proposals), default=1)
    rows = np.zeros(len(proposals), dtype=index_dtype(flen, slen))
    digests = np.zeros(len(proposals), dtype="S16")
    skipped: list[Skipped] = []
    converted: Counter[str] = Counter()
    converted_files: list[str] = []
    writer = SplitWriter(folder, split, settings.samples_per_shard)
    paths = [str(src_dir / p.filename) for p in proposals]
    try:
        for p, path, result in zip(proposals, paths, prepared_in_order(paths, settings, pool)):
            progress.update()
            if result.data is None:
                skipped.append(Skipped(display_name(path), result.note))
                continue
            if result.note:
                converted[result.note] += 1
                converted_files.append(f"{tsv_field(p.filename)}\t{result.note}\n")
            n = writer.count
            rows[n] = (0, 0, 0, p.label, p.iou, p.proposal, p.filename.encode(), p.stem.encode())
            digests[n] = result.digest
            meta = {"filename": p.filename, "image": p.stem, "proposal": p.proposal, "iou": p.iou, "label": p.label}
            writer.write(result.data, meta)
        where, shards = writer.finish()
    except BaseException:
        writer.abort()
        raise
    n = writer.count
    rows = rows[:n]
    rows["shard"], rows["offset"], rows["size"] = where.T
    save_index(folder / INDEX, rows)
    # Every converted input with what was done to it; a file, not the manifest, which every loader reads.
    listed = folder / CONVERTED
    if converted_files:
        atomic_write(listed, "".join(sorted(converted_files)).encode())
    else:
        listed.unlink(missing_ok=True)
    labels = rows["label"].astype(np.int64)
    info = {
        "samples": int(n),
        "classes": {"0": int((labels == 0).sum()), "1": int((labels == 1).sum())},
        "iou_histogram": iou_histogram(rows["iou"], labels),
        "labels": label_report(rows["iou"], labels, rows["filename"]),
        "converted": dict(sorted(converted.items())),
        "converted_list": f"{split}/{CONVERTED}" if converted_files else None,
        "shards": shards,
    }
    return info, skipped, (rows["filename"], rows["stem"], digests[:n])


def pack(
    src: str | os.PathLike, out: str | os.PathLike, settings: PackSettings = PackSettings(), progress: bool = True
) -> dict:
    """Pack `src` into `out`; returns the manifest (also written to out/manifest.json).

    Decoding runs in `settings.workers` threads of this process (Pillow and libjpeg-turbo
    release the GIL), so it works the same in a script without a `__main__` guard, in a
    notebook and under `python -c`. The returned dict adds `seconds`, which the file omits:
    the same input and seed give a byte-identical manifest.

    Raises:
        MissingFile: `src` is not a folder.
        ConfigError: `samples_per_shard` < 1 or `workers` < 0.
    """
    src, out = Path(src).absolute(), Path(out)  # absolute: the manifest is the same however SRC was typed
    if not src.is_dir():
        raise MissingFile(f"proposal folder {display_name(src)} does not exist")
    if settings.samples_per_shard < 1 or settings.workers < 0:
        raise ConfigError("samples_per_shard must be >= 1 and workers >= 0")
    t0 = time.perf_counter()
    found = discover(src)
    if not found.splits:
        raise ConfigError(
            f"{display_name(src)} holds no image files: expected SRC/<split>/<stem>.<proposal>.<iou>."
            f"<label>.jpg (or such files in SRC itself)"
        )
    for folder, _ in found.splits.values():
        if out.resolve().is_relative_to(folder.resolve()):
            raise ConfigError(
                f"--out {display_name(out)} is inside the split folder {display_name(folder)}: the "
                f"next pack would read the shards as a stray folder; write them elsewhere"
            )
    out.mkdir(parents=True, exist_ok=True)
    # The manifest marks a complete pack: remove it first so an interrupted run is never mistaken for one.
    (out / MANIFEST).unlink(missing_ok=True)
    total = sum(len(v) for _, v in found.splits.values())
    workers = settings.workers or len(os.sched_getaffinity(0))
    splits: dict[str, dict] = {}
    stored: dict[str, tuple] = {}
    skipped = list(found.skipped)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="crackio-pack") if workers > 1 else None
    try:
        with strict_pillow(), tqdm(total=total, unit="file", desc="pack", disable=not progress, smoothing=0.1) as bar:
            for split, (src_dir, proposals) in found.splits.items():
                splits[split], bad, stored[split] = pack_split(proposals, src_dir, out, split, settings, pool, bar)
                skipped += bad
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
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
