"""Annotated photos straight to shards: R-CNN's proposal stage without a folder of small files.

    photos + annotations ─ read (crackio.writing.annotations) ─ per photo, in threads here or in Ray tasks:
    decode upright, ground truth, selective search, IoU and label, warp (crackio.writing.regions) ─ spool
    chunks of 16 photos, in photo order ─ per split, seeded global shuffle ─ shards (worker processes or Ray
    tasks), index, manifest, as pack writes them

The spool (OUT/.spool, crackio.writing.spool; removed at the end) holds each split's crops once, so the
global shuffle needs no photo decoded twice and memory stays bounded however many photos there
are (photos in flight: twice the workers; index rows: ~150 bytes per crop). Its chunks and each finished
shard are recorded as they are completed, so the same command after an interruption (Ctrl-C, `kill -9`, a lost
node) redoes only the rest and ends with the same bytes.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image, ImageOps

from crackio.cli import progress_bar
from crackio.errors import MOST_THREADS, ConfigError, OutOfRange, below
from crackio.format.layout import MANIFEST, SPLITS, manifest_files, shard_name, split_files, split_sort_key
from crackio.format.manifest import Manifest, build_manifest, write_manifest
from crackio.format.schema import PROPOSAL_FIELDS, index_dtype
from crackio.fsio import display_name
from crackio.writing.annotations import Annotated, Photo, read_annotations, resolve_boxes
from crackio.writing.append import (
    Existing,
    already_in,
    appended_manifest,
    base_files,
    check_appendable,
    content_keys,
    draw_split,
    keep_base,
    merged_stats,
    pack_before,
    read_existing_pack,
)
from crackio.writing.images import strict_pillow, to_rgb8
from crackio.writing.outdir import OutputFolder, check_replacing, read_existing
from crackio.writing.quality import leakage_report
from crackio.writing.regions import ProposalSettings, encode_jpeg, propose, warp
from crackio.writing.splits import Before, record_name
from crackio.writing.spool import (
    COUNTS,
    SPOOL,
    Chunk,
    ChunkRecord,
    chunk_files,
    fingerprint,
    plan_chunks,
    read_chunk,
    remove_spool,
    write_chunk,
    write_spooled_split,
)
from crackio.writing.workers import Runner, processes

if TYPE_CHECKING:
    from crackio.writing.cluster import RayCluster


@dataclass(frozen=True)
class ProposeSettings:
    split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)  # train, valid, test, by photo, when no folders
    classes: tuple[str, ...] = ()  # positive class names; () = every class
    workers: int = 0  # photos decoded and proposed in parallel (threads); 0 = all cores
    seed: int = 0  # seeds the split assignment, proposal caps, jitter, negatives, shuffle
    samples_per_shard: int = 10000  # samples per tar
    mask_piece: int = 0  # masks: cut each crack into boxes of about N pixels along its skeleton; 0 = one per crack
    mask_crack_label: int | None = None  # masks: the crack's label (pixel value); none = above half the maximum

    def __post_init__(self) -> None:
        # Named as this object's arguments; tools/propose.py names them as its flags (OutOfRange.named).
        rules = [below("workers", self.workers, 0, MOST_THREADS), below("seed", self.seed, 0)]
        rules += [below("mask_piece", self.mask_piece, 0)]
        if self.mask_crack_label is not None:
            rules += [below("mask_crack_label", self.mask_crack_label, 0, 2**32 - 1)]  # a mask's pixel value
        OutOfRange.check("ProposeSettings", [*rules, below("samples_per_shard", self.samples_per_shard, 1)])


@dataclass
class PhotoResult:
    photo: Photo
    split: str
    size: tuple[int, int] = (0, 0)
    gt: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    rows: list[tuple] = field(default_factory=list)  # (proposal, iou, label, box, gt_box, gt_id, ground_truth)
    jpegs: list[bytes] = field(default_factory=list)
    proposals: int = 0  # proposals considered (selective search + ground truth + jitter)
    recall_hits: int = 0
    regions: int = 0  # selective-search regions before the cap
    uncapped_hits: int = 0  # ground-truth boxes those regions cover: recall without the cap
    problems: list[str] = field(default_factory=list)
    failed: bool = False  # the photo could not be used at all
    seconds: dict = field(default_factory=dict)  # search, crops


def load_photo(path: Path) -> np.ndarray:
    """uint8 H x W x 3 RGB of the upright photo: EXIF orientation applied (as labelling tools show it), other
    modes converted with their real dynamic range by the packer's rule (crackio.writing.images.to_rgb8).

    Raises:
        ValueError: a mode whose scale cannot be known (e.g. float pixels outside [0, 1]).
        OSError, SyntaxError: an unreadable file.
    """
    with strict_pillow(), Image.open(path) as img:
        rgb, why = to_rgb8(ImageOps.exif_transpose(img))
        if rgb is None:
            raise ValueError(why)
        return np.asarray(rgb)


def process_photo(photo: Photo, split: str, settings: ProposalSettings, seed: int) -> PhotoResult:
    """Everything for one photo, in a worker thread; never raises for bad data (problems are returned)."""
    result = PhotoResult(photo, split)
    try:
        rgb = load_photo(photo.path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        result.problems.append(f"unreadable photo ({e})")
        result.failed = True
        return result
    height, width = rgb.shape[:2]
    result.size = (width, height)
    result.gt, notes, errors = resolve_boxes(photo, width, height)
    result.problems += notes
    if errors:  # incomplete ground truth: its cracks would be stored as negatives
        result.problems += [f"photo left out, its ground truth is incomplete: {e}" for e in errors]
        result.failed = True
        return result
    t0 = time.perf_counter()
    found = propose(rgb, result.gt, settings, seed, photo.stem, training=split == "train")
    t1 = time.perf_counter()
    fill = rgb.reshape(-1, 3).mean(0)
    for i in found.kept:
        gt_id = int(found.gt_ids[i])
        gt_box = result.gt[gt_id] if gt_id >= 0 else np.zeros(4)
        source = int(i >= found.searched)  # 1: a ground-truth box or a jittered copy, 0: the method's proposal
        result.rows.append((int(i), float(found.ious[i]), int(found.labels[i]), found.boxes[i], gt_box, gt_id, source))
        crop = warp(rgb, found.boxes[i], settings.context, settings.size, fill)
        result.jpegs.append(encode_jpeg(crop, settings.quality))
    result.proposals, result.recall_hits = len(found.boxes), found.recall_hits
    result.regions, result.uncapped_hits = found.regions, found.uncapped_hits
    result.seconds = {"search": t1 - t0, "crops": time.perf_counter() - t1}
    return result


def assign_splits(photos: list[Photo], ratios: tuple[float, ...], seed: int) -> list[str]:
    """Each photo's split: its folder's, else by `ratios` over a seeded permutation of the photos."""
    if len(ratios) != 3 or not all(np.isfinite(r) and r >= 0 for r in ratios) or not 0 < sum(ratios) < np.inf:
        raise ConfigError(f"--split-ratios must be three non-negative numbers (train, valid, test), got {ratios}")
    unassigned = [i for i, p in enumerate(photos) if p.split is None]
    splits = [p.split or "" for p in photos]
    order = np.random.default_rng([seed, 0x5B1]).permutation(len(unassigned))
    bounds = np.round(np.cumsum(ratios) / sum(ratios) * len(unassigned)).astype(int)
    for rank, k in enumerate(order):
        splits[unassigned[k]] = SPLITS[int(np.searchsorted(bounds, rank, side="right"))]
    return splits


def results_in_order(jobs: list[tuple[Photo, str]], settings: ProposalSettings, seed: int, workers: int):
    if workers <= 1:
        yield from (process_photo(p, s, settings, seed) for p, s in jobs)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="crackio-propose") as pool:
        pending: deque = deque()
        try:
            for p, s in jobs:
                pending.append(pool.submit(process_photo, p, s, settings, seed))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def propose_to_shards(
    src: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike,
    proposal: ProposalSettings | None = None,
    run: ProposeSettings = ProposeSettings(),
    crops: str | os.PathLike | None = None,
    progress: bool = True,
    overwrite: bool = False,
    cluster: RayCluster | None = None,
    append: bool = False,
) -> dict:
    """Read annotated photos in `fmt`, propose, warp, and write shards to `out`; returns the manifest.

    The manifest adds, per split, `photos`, `ground_truth_boxes` and `proposal_recall` (the share of
    ground-truth boxes some selective-search proposal covers at IoU >= 0.5), and `proposals`, the
    settings detection reuses. `crops` also writes the original's proposal folder
    (`crops/<split>/<stem>.<proposal>.<iou>.<label>.jpg`). The returned dict adds `seconds` and
    `timing` (selective search, crops, writing) and `reused` (photos and shards an interrupted run had finished,
    found in OUT/.spool: crackio.writing.spool), which the file omits: same input and seed, same bytes, whether run
    here, on a Ray `cluster` (crackio.writing.cluster; OUT must be a folder every node reaches) or resumed. A pack of
    another source or settings already in `out` is replaced only with `overwrite`
    (`crackio.writing.outdir.check_replacing`). `append`: add the photos to the proposal-stage pack in `out`
    instead (crackio.writing.append: its shards untouched, new ones after them; `reused` then also counts
    `already`, the photos the pack held, skipped).

    Raises:
        MissingFile, ConfigError: a missing dataset, a bad setting or format, a class not in the data, another
            pack in `out` (without `overwrite`); with `append`, no proposal-stage pack there or other settings.
    """
    proposal = proposal or ProposalSettings()  # both settings objects checked their own values when made
    t0 = time.perf_counter()
    # SRC absolute: the same manifest however it was typed, and Ray's tasks (in another working folder) find it.
    src, out = Path(src).absolute(), Path(out)
    if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
        raise ConfigError(
            f"--out {display_name(out)} is inside the photo folder {display_name(src)}: the next run would read "
            f"the shards as photos or annotations; write them elsewhere"
        )
    annotated = read_annotations(
        src, fmt, list(run.classes) or None, mask_piece=run.mask_piece, mask_crack_label=run.mask_crack_label
    )
    if run.split_ratios != ProposeSettings().split_ratios and all(p.split for p in annotated.photos):
        raise ConfigError(
            f"--split-ratios applies to photos without a split folder, and every photo in "
            f"{display_name(src)} has one: drop the option, or the split folders"
        )
    identity = {
        "source": display_name(src.resolve()),
        "stage": "propose",
        "proposals": proposal.as_dict(),
        "settings": _settings_of(run),  # the seed is one
    }
    # What a spool chunk's bytes also depend on: the annotations' reading (format, classes taken as crack).
    chunk_identity = {**identity, "format": fmt, "positive": annotated.positive, "read": annotated.settings}
    if append:
        check_appendable(out)
    with OutputFolder(out) as held:
        existing, photos = None, annotated.photos
        if append:
            before = pack_before(out)
            existing = read_existing_pack(before, identity)
            known = {p.stem for p in already_in(existing, photos)}
            photos = [p for p in photos if p.stem not in known]
            splits = [p.split or draw_split(p.stem, run.split_ratios, run.seed) for p in photos]
        else:
            check_replacing(display_name(out), read_existing(out), identity, overwrite)
            splits = assign_splits(photos, run.split_ratios, run.seed)
        jobs = sorted(zip(photos, splits), key=lambda j: (split_sort_key(j[1]), j[0].stem))
        stage = _Stage(
            src, fmt, out, annotated, jobs, proposal, run, Path(crops) if crops else None, chunk_identity, existing
        )
        if existing is not None and not jobs:
            return {**existing.manifest, "seconds": time.perf_counter() - t0, "appended": 0,
                    "reused": {"already": len(annotated.photos)}}  # fmt: skip
        if existing is not None and before == out:
            keep_base(out, existing, held.claim)
        return _propose(held, stage, progress, t0, cluster)


def _settings_of(run: ProposeSettings) -> dict:
    """The settings the manifest records: those that change the bytes (any worker count gives the same)."""
    return {k: v for k, v in asdict(run).items() if k != "workers"}


class _Stage(NamedTuple):
    """One run as `propose_to_shards` resolved it before holding OUT: its inputs, the photos in the order they are
    spooled (split, then stem) with their splits, and its settings."""

    src: Path
    fmt: str
    out: Path
    annotated: Annotated
    jobs: list[tuple[Photo, str]]
    proposal: ProposalSettings
    run: ProposeSettings
    crops: Path | None  # also write the original's proposal folder here
    identity: dict  # what decides a spool chunk's bytes beside its photos (crackio.writing.spool.fingerprint)
    existing: Existing | None  # the pack appended to (--append)


class ChunkTask(NamedTuple):
    """One chunk of photos to propose and spool, as a Ray task gets it (paths absolute: its working folder is not
    the driver's)."""

    out: Path
    chunk: Chunk
    fingerprint: str
    dtype: np.dtype
    proposal: ProposalSettings
    seed: int
    crops: Path | None


def propose_chunk(task: ChunkTask) -> ChunkRecord:
    """One chunk's photos proposed one after another and written to the spool (a Ray task: one CPU each, so
    OpenCV uses one thread)."""
    import cv2

    cv2.setNumThreads(1)
    results = [process_photo(photo, split, task.proposal, task.seed) for photo, split in task.chunk.jobs]
    return write_chunk(task.out, task.chunk, task.fingerprint, task.dtype, results, task.crops)


def _propose(held: OutputFolder, stage: _Stage, progress: bool, t0: float, cluster: RayCluster | None) -> dict:
    """`propose_to_shards` once OUT is held: photos into the spool's chunks (reusing those an interrupted run
    finished), then shards (likewise), manifest, and the spool removed."""
    out, existing = stage.out, stage.existing
    slen = max(len(p.stem.encode()) for p in stage.annotated.photos)
    flen = slen + 24  # <stem>.<proposal>.<iou>.<label>.jpg
    for rows in existing.rows.values() if existing else ():  # appended rows join the pack's in one index
        flen, slen = max(flen, rows.dtype["filename"].itemsize), max(slen, rows.dtype["stem"].itemsize)
    dtype = index_dtype(flen, slen, PROPOSAL_FIELDS)
    chunks = plan_chunks(stage.jobs)
    fps = [fingerprint(stage.identity, dtype, c) for c in chunks]
    spool_files = {name for c in chunks for name in chunk_files(c.number)}
    held.claim({MANIFEST} | spool_files)
    if existing is None:
        (out / MANIFEST).unlink(missing_ok=True)  # written last: marks a complete run
    (out / SPOOL).mkdir(exist_ok=True)
    records: list[ChunkRecord | None] = [read_chunk(out, c, fp, dtype) for c, fp in zip(chunks, fps)]
    reused_photos = sum(len(c.jobs) for c, r in zip(chunks, records) if r is not None)
    workers = stage.run.workers or len(os.sched_getaffinity(0))
    bar = progress_bar(
        total=len(stage.jobs), initial=reused_photos, unit="photo", desc="propose", disable=not progress, smoothing=0.1
    )
    try:
        if cluster is not None:
            todo = [i for i, r in enumerate(records) if r is None]
            crops = stage.crops.resolve() if stage.crops else None
            tasks = [
                ChunkTask(out.resolve(), chunks[i], fps[i], dtype, stage.proposal, stage.run.seed, crops) for i in todo
            ]
            weights = [len(t.chunk.jobs) for t in tasks]
            for i, record in zip(todo, cluster.run(propose_chunk, tasks, bar.update, weights)):
                records[i] = record
        else:
            _propose_here(stage, chunks, fps, dtype, records, workers, bar)
    finally:
        bar.close()
    done = [r for r in records if r is not None]
    # Appending: the pack stays readable while its photos are proposed; from here its indexes change.
    (out / MANIFEST).unlink(missing_ok=True)
    if cluster is not None:  # the tasks run elsewhere: they get OUT as an absolute path
        splits, stored, shard_records, reused_shards = _write_shards(held, stage, done, cluster.run, out.resolve())
    else:
        splits, stored, shard_records, reused_shards = _write_shards(held, stage, done, processes(workers), out)
    manifest = _manifest(stage, done, splits, stored) if existing is None else _appended(stage, done, splits, stored)
    files = manifest_files(manifest)
    spool_files |= base_files(existing.manifest) if existing else set()
    held.finish(files | spool_files | shard_records)  # before the manifest: a failure here leaves no complete run
    write_manifest(out, manifest)
    held.finish(files)  # the spool goes once the pack is complete
    remove_spool(out, spool_files | shard_records)
    returned: dict = dict(manifest)
    returned["seconds"] = time.perf_counter() - t0
    returned["timing"] = {k: sum(r.timing[k] for r in done) for k in ("search", "crops", "write")}
    returned["reused"] = {"photos": reused_photos, "photos_total": len(stage.jobs), "shards": reused_shards}
    if existing is not None:
        returned["reused"]["already"] = len(stage.annotated.photos) - len(stage.jobs)
        returned["appended"] = len(stage.jobs)
    return returned


def _propose_here(
    stage: _Stage, chunks: list[Chunk], fps: list[str], dtype: np.dtype, records: list, workers: int, bar
) -> None:
    """The chunks not yet in the spool, proposed in `workers` threads of this process (OpenCV one thread each when
    there are several), each written as soon as its last photo is done."""
    import cv2

    todo = [i for i, r in enumerate(records) if r is None]
    jobs = [job for i in todo for job in chunks[i].jobs]
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1 if workers > 1 else threads)  # parallel over photos, not inside one
    crops_made = sum(len(r.rows) for r in records if r is not None)
    try:
        with contextlib.closing(results_in_order(jobs, stage.proposal, stage.run.seed, workers)) as results:
            for i in todo:
                got = []
                for _ in chunks[i].jobs:
                    got.append(next(results))
                    bar.update()
                    crops_made += len(got[-1].rows)
                    rate = crops_made / max(bar.format_dict["elapsed"], 1e-9)
                    bar.set_postfix(crops=crops_made, crops_s=f"{rate:.0f}", refresh=False)  # shown at its pace
                records[i] = write_chunk(stage.out, chunks[i], fps[i], dtype, got, stage.crops)
    finally:
        cv2.setNumThreads(threads)


def _split_stats(records: list[ChunkRecord], split: str) -> dict:
    """The proposal stage's own fields of the split's manifest entry: recall at the cap, and the regions
    selective search returned before it with their recall, which tell whether the cap or the method bounds it."""
    s = {k: sum(r.counts[k] for r in records if r.split == split) for k in COUNTS}
    gt = s["ground_truth_boxes"]
    return {
        "photos": s["photos"],
        "ground_truth_boxes": gt,
        "proposals_considered": s["proposals"],
        "proposal_recall": round(s["recall_hits"] / gt, 4) if gt else None,
        "regions_before_cap": s["regions"],
        "proposal_recall_uncapped": round(s["uncapped_hits"] / gt, 4) if gt else None,
    }


def _write_shards(
    held: OutputFolder, stage: _Stage, records: list[ChunkRecord], run: Runner, out: Path
) -> tuple[dict, dict, set[str], int]:
    """Each split with a usable photo shuffled from its chunks into shards (after the pack's own when appending):
    (manifest entry, what the leakage report reads) per split written, the shards' resume records, how many shards
    were reused."""
    splits, stored, shard_records, reused = {}, {}, set(), 0
    per, existing = stage.run.samples_per_shard, stage.existing
    for split in sorted({r.split for r in records if r.counts["photos"]}, key=split_sort_key):
        mine = [r for r in records if r.split == split]
        first = existing.next_shard(split) if existing else 0
        numbers = range(first, first + -(-sum(len(r.rows) for r in mine) // per))
        names = {f"{SPOOL}/{record_name(split, k)}" for k in numbers}
        held.claim(split_files(split, [shard_name(split, k) for k in numbers]) | names)
        shard_records |= names
        before, stats, old = None, _split_stats(mine, split), None
        if existing is not None and split in existing.rows:
            old = existing.manifest["splits"][split]
            before = Before(existing.rows[split], old["shards"], existing.converted[split], first * per)
        if existing is not None:
            stats = merged_stats(old, stats)
        written = write_spooled_split(mine, out, split, stage.run.seed, per, run, before, **stats)
        splits[split] = written.entry
        keys = written.digests if existing is None else content_keys(written.rows)
        stored[split] = (written.rows["filename"], written.rows["stem"], keys)
        reused += written.reused
    return splits, stored, shard_records, reused


def _appended(stage: _Stage, records: list[ChunkRecord], splits: dict, stored: dict) -> Manifest:
    """The manifest of the pack with the photos appended (crackio.writing.append.appended_manifest), the appended
    photos recorded under `appended` (where detect --split finds them)."""
    assert stage.existing is not None
    problems = [
        {"path": p, "reason": r} for p, r in [*stage.annotated.problems, *(q for r in records for q in r.problems)]
    ]
    record = {
        "source": display_name(stage.src.resolve()),
        "annotations": {
            "format": stage.fmt,
            "classes": stage.annotated.classes,
            "positive": stage.annotated.positive,
            **stage.annotated.settings,
        },  # fmt: skip
        "photos": split_photos(stage.src, stage.jobs),
    }
    return appended_manifest(stage.existing, splits, stored, problems, record)  # type: ignore[return-value]


def _manifest(stage: _Stage, records: list[ChunkRecord], splits: dict, stored: dict) -> Manifest:
    annotated = stage.annotated
    return build_manifest(
        source=display_name(stage.src.resolve()),
        stage={
            "stage": "propose",
            "annotations": {
                "format": stage.fmt,
                "classes": annotated.classes,
                "positive": annotated.positive,
                **annotated.settings,  # e.g. mask_piece, or the YOLO class ids taken as crack
            },
            "proposals": stage.proposal.as_dict(),
            "photos": split_photos(stage.src, stage.jobs),
        },
        settings=_settings_of(stage.run),
        seed=stage.run.seed,
        splits=splits,
        leakage=leakage_report(stored),
        ignored={},
        skipped=sorted(
            (
                {"path": path, "reason": why}
                for path, why in [*annotated.problems, *(p for r in records for p in r.problems)]
            ),
            key=lambda s: (s["path"], s["reason"]),
        ),
    )


def split_photos(src: Path, jobs: list[tuple[Photo, str]]) -> dict:
    """Which photos each split holds, so that `python -m train detect --split test` can run on exactly the held-out
    ones: `root` (the folder the paths are relative to: SRC, or a COCO file's folder) and per split the sorted
    paths, POSIX-style."""
    root = src.resolve() if src.is_dir() else src.resolve().parent
    per: dict[str, list[str]] = {}
    for photo, split in jobs:
        path = photo.path.resolve()
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
        per.setdefault(split, []).append(rel)
    return {"root": display_name(root), "splits": {k: sorted(v) for k, v in per.items()}}


def summary(manifest: dict, out: str | Path) -> str:
    """What was written, proposal recall per split (at the cap, and of every region before it), and where the
    time went."""
    parts = []
    cap = manifest.get("proposals", {}).get("max_proposals")
    for name, s in manifest["splits"].items():
        recall, uncapped = (
            "n/a" if s[k] is None else f"{s[k]:.2f}" for k in ("proposal_recall", "proposal_recall_uncapped")
        )
        per_photo = s["regions_before_cap"] / max(s["photos"], 1)
        parts.append(
            f"{name} {s['photos']} photos -> {s['samples']} crops ({s['classes']['1']} crack / "
            f"{s['classes']['0']} no crack), proposal recall {recall} at --max-proposals {cap} "
            f"({uncapped} from all {per_photo:.0f} regions per photo)"
        )
    t = manifest.get("timing", {})
    busy = sum(t.values()) or 1.0
    timing = ", ".join(f"{k} {100 * v / busy:.0f}%" for k, v in t.items())
    reused = manifest.get("reused", {})
    verb = "proposed"
    if "appended" in manifest:
        verb = f"appended {manifest['appended']} photos ({reused['already']} in the pack already, skipped); the pack:"
    again = (
        f"; reused from an interrupted run: {reused['photos']} of {reused['photos_total']} photos, "
        f"{reused['shards']} shards"
        if reused.get("photos") or reused.get("shards")
        else ""
    )
    return (
        f"{verb} {'; '.join(parts)} in {out}; {len(manifest['skipped'])} problems{again}; "
        f"{manifest.get('seconds', 0.0):.1f} s ({timing} of worker+writer time)"
    )
