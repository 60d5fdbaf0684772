"""Pack a proposal directory into shards: discover, shuffle, test-decode, write, index."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from crackio.names import IMAGE_EXTENSIONS, BadName, Proposal, parse_name
from crackio.shards import (
    FORMAT_VERSION,
    INDEX,
    MANIFEST,
    ShardWriter,
    atomic_write,
    index_dtype,
    save_index,
    shard_name,
)

IOU_BIN = 0.05  # manifest histogram bin width, the original's IoU strata
WINDOW = 2048   # files in flight at once: memory stays flat however many files there are


@dataclass(frozen=True)
class PackSettings:
    samples_per_shard: int = 10000  # ~150-250 MB tars for 224x224 crops
    workers: int = 0                # 0 = all cores
    seed: int = 0                   # seeds the global shuffle
    size: int = 224                 # every stored image is size x size RGB JPEG
    quality: int = 95               # JPEG quality of converted inputs


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


def discover(src: Path) -> tuple[dict[str, tuple[Path, list[Proposal]]], list[Skipped]]:
    """Splits and their parsed proposals, sorted by name; nothing is opened yet."""
    entries = sorted(os.scandir(src), key=lambda e: e.name)
    skipped: list[Skipped] = []
    holds_images = any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries)
    if holds_images:  # SRC itself is one split; any subfolder in it is stray (reported below)
        splits = {src.resolve().name: src}
    else:  # SRC/<split>/...; files beside the split folders belong to no split
        splits = {e.name: Path(e.path) for e in entries if e.is_dir()}
        skipped += [Skipped(e.path, "file outside any split folder") for e in entries if not e.is_dir()]
    found: dict[str, tuple[Path, list[Proposal]]] = {}
    for split, folder in splits.items():
        found[split] = (folder, [])
        for e in sorted(os.scandir(folder), key=lambda e: e.name):
            if e.is_dir():
                skipped.append(Skipped(e.path, "stray folder inside a split folder (splits hold files only)"))
                continue
            try:
                found[split][1].append(parse_name(e.name))
            except BadName as err:
                skipped.append(Skipped(e.path, f"name does not parse: {err}"))
    return found, skipped


def split_order(split: str, count: int, seed: int) -> np.ndarray:
    # Global shuffle before writing: DALI's reader only shuffles inside a buffer.
    return np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(count)


def check_image(job: tuple[str, int, int]) -> tuple[bytes | None, str]:
    """Fully decode one file; return (RGB JPEG bytes, conversion note) or (None, reason)."""
    path, size, quality = job
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return None, f"unreadable: {e.strerror}"
    if not data:
        return None, "empty file"
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode, dims = img.format, img.mode, img.size
            img.load()  # a full decode: raises on truncated data
            if fmt == "JPEG" and mode == "RGB" and dims == (size, size):
                return data, ""  # the common case: bytes copied unchanged
            rgb = img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return None, f"not a decodable image: {e}"
    note = f"{fmt} {mode}"
    if dims != (size, size):
        rgb = rgb.resize((size, size), Image.BILINEAR)
        note += f" {dims[0]}x{dims[1]} resized"
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue(), note


def _clean(folder: Path) -> None:
    """Drop temporaries of an interrupted run."""
    for p in folder.glob("*.tmp"):
        p.unlink()


def pack_split(src_split: list[Proposal], src_dir: Path, out: Path, split: str,
               settings: PackSettings, imap, progress: tqdm) -> tuple[dict, list[Skipped]]:
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    _clean(folder)
    order = split_order(split, len(src_split), settings.seed)
    proposals = [src_split[i] for i in order]
    flen = max((len(p.filename.encode()) for p in proposals), default=1)
    slen = max((len(p.stem.encode()) for p in proposals), default=1)
    rows = np.zeros(len(proposals), dtype=index_dtype(flen, slen))
    skipped: list[Skipped] = []
    converted: Counter[str] = Counter()
    shards: list[dict] = []
    writer: ShardWriter | None = None
    n = 0

    def finish(w: ShardWriter) -> None:
        members = w.close()
        jpgs = [(off, size) for name, off, size in members if name.endswith(".jpg")]
        first = n - w.count
        rows["offset"][first:n] = [o for o, _ in jpgs]
        rows["size"][first:n] = [s for _, s in jpgs]
        shards.append({"name": w.final.name, "samples": w.count, "bytes": w.final.stat().st_size})

    try:
        for start in range(0, len(proposals), WINDOW):
            window = proposals[start:start + WINDOW]
            jobs = [(str(src_dir / p.filename), settings.size, settings.quality) for p in window]
            for p, (data, note) in zip(window, imap(check_image, jobs)):
                progress.update()
                if data is None:
                    skipped.append(Skipped(str(src_dir / p.filename), note))
                    continue
                if note:
                    converted[note] += 1
                if writer is None:
                    writer = ShardWriter(folder / shard_name(split, len(shards)))
                rows[n] = (len(shards), 0, 0, p.label, p.iou, p.proposal,
                           p.filename.encode(), p.stem.encode())
                meta = {"filename": p.filename, "image": p.stem, "proposal": p.proposal,
                        "iou": p.iou, "label": p.label}
                writer.write(n, data, meta)
                n += 1
                if writer.count == settings.samples_per_shard:
                    finish(writer)
                    writer = None
        if writer is not None:
            finish(writer)
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    rows = rows[:n]
    # Shards left by an earlier, larger pack of this split would be read by nobody: remove them.
    keep = {s["name"] for s in shards}
    for old in folder.glob(f"{split}-*.tar"):
        if old.name not in keep:
            old.unlink()
            old.with_suffix(".idx").unlink(missing_ok=True)
    save_index(folder / INDEX, rows)
    edges = np.linspace(0.0, 1.0, round(1 / IOU_BIN) + 1)
    labels = rows["label"]
    info = {
        "samples": int(n),
        "classes": {"0": int((labels == 0).sum()), "1": int((labels == 1).sum())},
        "iou_histogram": {
            "bin_edges": [round(float(e), 4) for e in edges],
            "0": np.histogram(rows["iou"][labels == 0], edges)[0].tolist(),
            "1": np.histogram(rows["iou"][labels == 1], edges)[0].tolist(),
        },
        "converted": dict(sorted(converted.items())),
        "shards": shards,
    }
    return info, skipped


def pack(src: str | os.PathLike, out: str | os.PathLike, settings: PackSettings = PackSettings(),
         progress: bool = True) -> dict:
    """Pack `src` into `out`; returns the manifest (also written to out/manifest.json)."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"proposal folder {src} does not exist")
    if settings.samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    # The manifest marks a complete pack: remove it first so an interrupted run is never mistaken for one.
    (out / MANIFEST).unlink(missing_ok=True)
    found, skipped = discover(src)
    total = sum(len(v) for _, v in found.values())
    workers = settings.workers or os.cpu_count() or 1
    # Fork server, not fork: a forked child inherits the caller's objects, and a DALI pipeline the caller
    # holds (a test session, a notebook) segfaults when the child garbage-collects it, hanging the pool.
    pool = mp.get_context("forkserver").Pool(workers) if workers > 1 else None
    imap = (lambda f, jobs: pool.imap(f, jobs, chunksize=16)) if pool else map
    splits: dict[str, dict] = {}
    try:
        with tqdm(total=total, unit="file", desc="pack", disable=not progress, smoothing=0.1) as bar:
            for split, (src_dir, proposals) in found.items():
                info, bad = pack_split(proposals, src_dir, out, split, settings, imap, bar)
                splits[split] = info
                skipped += bad
    finally:
        if pool:
            pool.close()
            pool.join()
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": str(src.resolve()),
        "settings": asdict(settings) | {"workers": workers},
        "seed": settings.seed,
        "samples": sum(s["samples"] for s in splits.values()),
        "splits": splits,
        "skipped": [asdict(s) for s in sorted(skipped, key=lambda s: s.path)],
    }
    atomic_write(out / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    manifest["seconds"] = time.perf_counter() - t0
    return manifest


def summary(manifest: dict, out: Path) -> str:
    parts = [f"{name} {s['samples']} ({s['classes']['1']} crack / {s['classes']['0']} no crack)"
             for name, s in manifest["splits"].items()]
    shards = [sh for s in manifest["splits"].values() for sh in s["shards"]]
    mb = sum(sh["bytes"] for sh in shards) / 1e6
    converted = sum(sum(s["converted"].values()) for s in manifest["splits"].values())
    secs = manifest.get("seconds", 0.0)
    return (f"packed {'; '.join(parts)} into {len(shards)} shards, {mb:.1f} MB in {out}; "
            f"{converted} converted, {len(manifest['skipped'])} skipped; {secs:.1f} s")
