"""Pack a proposal folder into shards: discover, shuffle, decode-check, write (crackio.writing.splits), report."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from crackio.cli import progress_bar
from crackio.errors import MOST_THREADS, ConfigError, MissingFile, OutOfRange, below
from crackio.format.layout import MANIFEST, join, manifest_files, shard_name, split_files
from crackio.format.manifest import build_manifest, write_manifest
from crackio.format.schema import index_dtype
from crackio.fsio import display_name
from crackio.writing.append import (
    Existing,
    appended_manifest,
    base_files,
    check_appendable,
    content_keys,
    keep_base,
    pack_before,
    read_existing_pack,
)
from crackio.writing.discover import Found, _has_image, discover
from crackio.writing.filenames import Proposal
from crackio.writing.images import prepare, strict_pillow
from crackio.writing.outdir import OutputFolder, check_replacing, read_existing
from crackio.writing.quality import leakage_report
from crackio.writing.splits import Before, Sample, record_name, shard_slices, split_order, write_split
from crackio.writing.spool import SPOOL, remove_spool
from crackio.writing.workers import check_stop, processes, tick


@dataclass(frozen=True)
class PackSettings:
    samples_per_shard: int = 10000  # samples per tar (~150-250 MB for 224x224 crops)
    workers: int = 0  # processes writing shards; 0 = all cores (parallel across shards)
    seed: int = 0  # seeds the global shuffle
    size: int = 224  # every stored image is size x size RGB JPEG
    quality: int = 95  # JPEG quality of converted inputs

    def __post_init__(self) -> None:
        # Named as this object's arguments; tools/pack.py names them as its flags (OutOfRange.named).
        rules = [below("samples_per_shard", self.samples_per_shard, 1), below("workers", self.workers, 0, MOST_THREADS)]
        OutOfRange.check("PackSettings", [*rules, below("seed", self.seed, 0)])


class PackSource(NamedTuple):
    """One shard's slice of a split's seeded order, read from the proposal folder (in a worker process)."""

    folder: Path
    split: str
    number: int
    first_key: int  # key of proposals[0]: its position in the split's seeded order
    src_dir: Path
    proposals: list[Proposal]
    size: int
    quality: int

    def samples(self) -> Iterator[Sample]:
        for key, p in enumerate(self.proposals, self.first_key):
            check_stop()
            path = os.path.join(self.src_dir, p.filename)
            result = prepare(path, self.size, self.quality)
            tick()
            meta = {"filename": p.filename, "image": p.stem, "proposal": p.proposal, "iou": p.iou, "label": p.label}
            yield Sample(key, result.data, meta, result.digest, result.note, display_name(path))

    def fingerprint(self) -> str:
        """What decides the shard's bytes: its place in the split's order, the settings, and each input's name,
        size and modification time."""
        h = hashlib.sha256(f"pack {self.split} {self.number} {self.first_key} {self.size} {self.quality}".encode())
        for p in self.proposals:
            try:
                st = os.stat(os.path.join(self.src_dir, p.filename))
                h.update(f"{p.filename}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{p.filename}\0missing\n".encode())
        return h.hexdigest()


def index_rows(ordered: list[Proposal]) -> np.ndarray:
    """Every input's index row in the split's seeded order, with the columns its file name gives."""
    flen = max((len(p.filename.encode()) for p in ordered), default=1)
    slen = max((len(p.stem.encode()) for p in ordered), default=1)
    rows = np.zeros(len(ordered), index_dtype(flen, slen))
    rows["label"] = np.fromiter((p.label for p in ordered), np.int8, len(ordered))
    rows["iou"] = np.fromiter((p.iou for p in ordered), np.float32, len(ordered))
    rows["proposal"] = np.fromiter((p.proposal for p in ordered), np.int32, len(ordered))
    rows["filename"] = [p.filename.encode() for p in ordered]
    rows["stem"] = [p.stem.encode() for p in ordered]
    return rows


def _check_out(src: Path, out: Path, found: Found) -> None:
    """Refuse an OUT that a split folder holds, that is a split's own folder, or that is a split of SRC.

    Raises:
        ConfigError: naming OUT, the folder and what to do.
    """
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


def _check_src(src: Path, out: Path) -> None:
    """Refuse a SRC that is not a folder, and an OUT that is SRC itself.

    Raises:
        MissingFile, ConfigError: naming the folder and what to give instead.
    """
    if not src.is_dir():
        if src.exists():
            raise ConfigError(f"{display_name(src)} is a file, not a proposal folder: give the folder that holds it")
        raise MissingFile(f"proposal folder {display_name(src)} does not exist")
    if out.resolve() == src.resolve():
        raise ConfigError(
            f"--out {display_name(out)} is the proposal folder itself: the shards would go beside the crops; "
            f"write them elsewhere (e.g. --out {display_name(src)}/shards or a sibling folder)"
        )


class _Plan(NamedTuple):
    """Each split's inputs in its seeded order, and the shard slices of that order the workers write."""

    ordered: dict[str, list[Proposal]]
    sources: dict[str, list[PackSource]]


def _plan(found: Found, out: Path, settings: PackSettings, existing: Existing | None = None) -> _Plan:
    """Each split's inputs in seeded order and their shard slices; appending to `existing`, only the inputs whose
    names it lacks, in shards after its last (an empty split is left out)."""
    per = settings.samples_per_shard
    sources: dict[str, list[PackSource]] = {}
    ordered: dict[str, list[Proposal]] = {}
    for split, (src_dir, proposals) in found.splits.items():
        first = 0
        if existing is not None:
            first = existing.next_shard(split)
            proposals = [p for p in proposals if p.filename.encode() not in existing.filenames]
            if not proposals:
                continue
        ordered[split] = [proposals[i] for i in split_order(split, len(proposals), settings.seed, first)]
        sources[split] = [
            PackSource(
                out / split, split, first + a // per, first * per + a, src_dir, ordered[split][a:b], settings.size,
                settings.quality,
            )
            for a, b in shard_slices(len(proposals), per)
        ]  # fmt: skip
    return _Plan(ordered, sources)


def _write_splits(
    out: Path, plan: _Plan, workers: int, progress: bool, existing: Existing | None = None, per: int = 0
) -> tuple[dict, dict, list[tuple[str, str]], int]:
    """Every split's shards and index: (manifest entry, what the leakage report reads, skipped inputs) per split,
    and how many shards an interrupted run had finished (reused). Appending to `existing`, after its shards
    (`per`: samples per shard)."""
    splits, stored, skipped, reused = {}, {}, [], 0
    total = sum(len(o) for o in plan.ordered.values())
    with (
        strict_pillow(),
        progress_bar(total=total, unit="file", desc="pack", disable=not progress, smoothing=0.1) as bar,
    ):
        for split, shard_sources in plan.sources.items():
            shown = bar.n  # each split's workers count from 0

            def advance(done: int, shown: int = shown) -> None:
                bar.update(shown + done - bar.n)

            rows = index_rows(plan.ordered[split])
            before = None
            if existing is not None and split in existing.rows:
                old = existing.manifest["splits"][split]
                first = shard_sources[0].number
                before = Before(existing.rows[split], old["shards"], existing.converted[split], first * per)
            written = write_split(
                out / split, split, rows, shard_sources, processes(workers), advance, out / SPOOL, before
            )
            splits[split] = written.entry
            keys = written.digests if existing is None else content_keys(written.rows)
            stored[split] = (written.rows["filename"], written.rows["stem"], keys)
            skipped += written.skipped
            reused += written.reused
    return splits, stored, skipped, reused


def pack(
    src: str | os.PathLike,
    out: str | os.PathLike,
    settings: PackSettings = PackSettings(),
    progress: bool = True,
    overwrite: bool = False,
    append: bool = False,
) -> dict:
    """Pack `src` into `out`; returns the manifest (also written to out/manifest.json).

    Shard k of a split holds the slice [k * samples_per_shard, (k + 1) * samples_per_shard) of
    the split's seeded order (a skipped input only makes its shard smaller), so `settings.workers`
    processes each write whole shards (crackio.writing.workers: forked, so scripts without a
    `__main__` guard and notebooks work) and the output is byte-identical for any worker count.
    This process only writes the index and the manifest. Memory: the parsed names and index rows
    here (~0.9 KB per input measured, beside ~50 MB of imports: no torch), one sample per worker, at most
    2 x workers shards' results in flight.
    The returned dict adds `seconds` and `reused` (shards an interrupted run had finished), which the file omits. A
    pack of another source or settings already in `out` is replaced only with `overwrite`
    (`crackio.writing.outdir.check_replacing`). `append`: add to the pack `tools/pack.py` made in `out` the inputs
    whose file names it lacks, in shards after its own (crackio.writing.append: its shards untouched; the same
    settings; the returned dict adds `appended`, the inputs added, and `already`, those it held).

    Raises:
        MissingFile: `src` is not a folder.
        ConfigError: `out` is held by another run, holds another pack (without `overwrite`), or holds a file
            crackio did not write where a shard goes
            (PackSettings itself refuses `samples_per_shard` < 1 or `workers` < 0).
        KeyboardInterrupt: Ctrl-C (or SIGTERM under `crackio.cli.stop_on_signals`); workers and
            temporaries are gone.
    """
    src, out = Path(src).absolute(), Path(out)  # absolute: the manifest is the same however SRC was typed
    _check_src(src, out)
    t0 = time.perf_counter()
    found = discover(src, exclude=out)
    if not found.splits:
        raise ConfigError(
            f"{display_name(src)} holds no image files: expected SRC/<split>/<stem>.<proposal>.<iou>."
            f"<label>.jpg (or such files in SRC itself)"
        )
    _check_out(src, out, found)
    per = settings.samples_per_shard
    kept = {k: v for k, v in asdict(settings).items() if k != "workers"}  # any worker count, same bytes
    if append:
        check_appendable(out)
    with OutputFolder(out) as held:
        identity = {"source": display_name(src), "stage": None, "settings": kept}  # the seed is a setting
        existing = None
        if append:
            before = pack_before(out)
            existing = read_existing_pack(before, identity, "tools/pack.py")
        else:
            check_replacing(display_name(out), read_existing(out), identity, overwrite)
        plan = _plan(found, out, settings, existing)
        inputs = sum(len(p) for _, p in found.splits.values())
        if existing is not None and not plan.ordered:
            return {**existing.manifest, "seconds": time.perf_counter() - t0, "appended": 0, "already": inputs}
        if existing is not None and before == out:
            keep_base(out, existing, held.claim)
        planned = {MANIFEST} | {
            name
            for s, sources in plan.sources.items()
            for name in split_files(s, [shard_name(s, src.number) for src in sources])
        }
        records = {f"{SPOOL}/{record_name(s, src.number)}" for s, sources in plan.sources.items() for src in sources}
        held.claim(planned | records)
        # The manifest marks a complete pack: remove it first so an interrupted run is never mistaken for one.
        (out / MANIFEST).unlink(missing_ok=True)
        for split in plan.ordered:
            (out / split).mkdir(exist_ok=True)
        (out / SPOOL).mkdir(exist_ok=True)
        workers = settings.workers or len(os.sched_getaffinity(0))
        splits, stored, skipped, reused = _write_splits(out, plan, workers, progress, existing, per)
        skipped = sorted([(s.path, s.reason) for s in found.skipped] + skipped)
        skips = [{"path": p, "reason": r} for p, r in skipped]
        if existing is None:
            manifest = build_manifest(
                source=display_name(src),
                stage={},
                settings=kept,
                seed=settings.seed,
                splits=splits,
                leakage=leakage_report(stored),
                ignored=dict(sorted(found.ignored.items())),
                skipped=skips,
            )
        else:
            added = sum(len(o) for o in plan.ordered.values())
            record = {"source": display_name(src), "inputs": added}
            manifest = appended_manifest(existing, splits, stored, skips, record)  # type: ignore[assignment]
        files = manifest_files(manifest)
        spool = records | (base_files(existing.manifest) if existing is not None else set())
        held.finish(files | spool)  # before the manifest: a failure here leaves no complete pack
        write_manifest(out, manifest)
        held.finish(files)  # the resume records go once the pack is complete
        remove_spool(out, spool)
    result: dict = dict(manifest)
    result["seconds"] = time.perf_counter() - t0
    result["reused"] = {"shards": reused}
    if existing is not None:
        added = sum(len(o) for o in plan.ordered.values())
        result.update(appended=added, already=inputs - added)
    return result


def summary(manifest: dict, out: str | Path) -> str:
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
    reused = manifest.get("reused", {}).get("shards", 0)
    again = f" ({reused} reused from an interrupted run)" if reused else ""
    verb = "packed"
    if "appended" in manifest:
        verb = f"appended {manifest['appended']} crops ({manifest['already']} in the pack already, skipped); the pack:"
    lines = [
        f"{verb} {'; '.join(parts) or 'nothing'} into {len(shards)} shards{again}, {mb:.1f} MB in {out}; "
        f"{converted} converted, {len(manifest['skipped'])} skipped, {ignored} ignored; {secs:.1f} s"
    ]
    lines += [f"warning: {w}" for w in warnings(manifest)]
    return "\n".join(lines)


def print_skipped(manifest: dict, out: str | Path, word: str = "skipped", limit: int = 20) -> None:
    """The first `limit` skipped inputs on stderr, and where the whole list is (the CLIs' shared output)."""
    import sys

    for s in manifest["skipped"][:limit]:
        print(f"{word} {s['path']}: {s['reason']}", file=sys.stderr)
    if len(manifest["skipped"]) > limit:
        print(f"... and {len(manifest['skipped']) - limit} more, all listed in {join(out, MANIFEST)}", file=sys.stderr)


def warnings(manifest: dict) -> list[str]:
    """Problems that do not stop a pack but that --strict refuses: leakage between splits, labels that
    contradict every IoU threshold, a proposal stage that found no crack at all."""
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
    splits = manifest["splits"].values()
    if manifest.get("stage") == "propose" and splits and not sum(s.get("ground_truth_boxes", 0) for s in splits):
        settings = manifest.get("annotations", {})
        found.append(
            f"no photo has a crack box (format {settings.get('format')}, classes {settings.get('positive')}"
            + (f", mask label {settings['mask_crack_label']}" if settings.get("mask_crack_label") is not None else "")
            + "): every crop is a negative; check --format, --classes and --mask-crack-label against the dataset"
        )
    for name, s in manifest["splits"].items():
        impossible = s.get("labels", {}).get("impossible", {}).get("count", 0)
        if impossible:
            found.append(
                f"{name}: {impossible} names carry a label no IoU threshold gives (crack at IoU 0 or "
                f"no crack at IoU 1); see splits.{name}.labels in manifest.json"
            )
    return found
