"""Appending photos to a proposal-stage pack (`tools/propose.py SRC --append --out PACK`): the pack's shards stay
byte for byte; new shards follow the last of each split; index and manifest are rewritten (manifest last).

The rules, each stated once here:
- **Same settings.** The proposal settings and the stage's settings (seed, split ratios, samples per shard, ...)
  must be the pack's: crops of one pack are made one way.
- **A photo's split is its own.** A new photo goes to its split folder's split, or else to the split its own seeded
  draw gives (`draw_split`: the stem hashed with the seed, against the split ratios), so it never depends on what
  else is appended (a fresh pack deals its photos out exactly by the ratios instead: `assign_splits`).
- **Each photo once.** A photo whose stem names crops in the pack already is skipped, and counted.
- **A new identity.** The manifest changes, so runs trained on the pack before refuse to `--resume` on it
  (train.run.checkpoint) and a fresh run trains on all of it.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from crackio.errors import ConfigError
from crackio.format.index import index_digest_problem, open_index
from crackio.format.layout import CONVERTED, INDEX, MANIFEST, SPLITS, split_sort_key
from crackio.format.manifest import read_manifest, recorded_photos, repack
from crackio.fsio import atomic_write, display_name
from crackio.writing.outdir import APPEND_BASE
from crackio.writing.quality import leakage_report


class Existing(NamedTuple):
    """The pack appended to: its manifest, and per split its index rows, shard entries and converted lines."""

    manifest: dict
    rows: dict[str, np.ndarray]
    converted: dict[str, list[str]]
    stems: set[str]  # the photos whose crops it holds
    filenames: set[bytes]  # the crops' names it holds (tools/pack.py's inputs)

    def next_shard(self, split: str) -> int:
        """The number the split's first new shard gets: after its last shard (0 for a split the pack lacks)."""
        names = [s["name"] for s in self.manifest["splits"].get(split, {}).get("shards", [])]
        return max((int(n[len(split) + 1 : -4]) for n in names), default=-1) + 1


BASE = APPEND_BASE  # the pack as it was before the append: its manifest, indexes and converted lists


# How a source's annotations are read, not how crops are made: each appended set records its own (`appended`).
READING = ("classes", "mask_piece", "mask_crack_label")


def base_files(manifest: dict) -> set[str]:
    """The files of BASE (relative to OUT) for a pack of this manifest."""
    files = {f"{BASE}/{MANIFEST}"}
    for split, entry in manifest["splits"].items():
        files |= {f"{BASE}/{split}/{INDEX}"} | (
            {f"{BASE}/{split}/{CONVERTED}"} if entry.get("converted_list") else set()
        )
    return files


def check_appendable(out: Path) -> None:
    """Refuse --append where no pack is (before OUT is created or locked).

    Raises:
        ConfigError: naming OUT and what to do first.
    """
    if not (out / MANIFEST).is_file() and not (out / BASE / MANIFEST).is_file():
        raise ConfigError(
            f"--append: {display_name(out)} holds no complete pack (no {MANIFEST}): write it first, without --append"
        )


def pack_before(out: Path) -> Path:
    """Where the pack before this append is read from: OUT itself, or OUT/.spool/base when an interrupted append
    left its copy there (OUT's indexes may then be the new ones already, and its manifest gone), so that a re-run
    appends to the same pack."""
    base = out / BASE
    held = (base / MANIFEST).read_bytes() if (base / MANIFEST).is_file() else None
    now = (out / MANIFEST).read_bytes() if (out / MANIFEST).is_file() else None
    return base if held is not None and (now is None or now == held) else out


def keep_base(out: Path, existing: Existing, claim) -> None:
    """Copy the pack's manifest, indexes and converted lists to OUT/.spool/base before the append changes them
    (`pack_before` reads them there after an interruption). `claim(files)` records the copies as the run's
    before they are written (crackio.writing.outdir.OutputFolder.claim)."""
    files = base_files(existing.manifest)
    claim(files)
    for name in sorted(files):
        source = out / name[len(BASE) + 1 :]
        target = out / name
        if source.is_file() and not (target.is_file() and target.read_bytes() == source.read_bytes()):
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, source.read_bytes())


def read_existing_pack(out: Path, identity: dict, tool: str = "tools/propose.py") -> Existing:
    """The complete pack in `out` (a pack's folder, or the BASE copy of one) that `tool` made, checked to be one
    these settings (`identity`: settings, and proposals for the proposal stage) can append to.

    Raises:
        ConfigError: no complete pack there, one made by tools/pack.py, or other settings (each named, then and
            now); ShardError: a damaged manifest or index (naming the file and the fix).
    """
    if not (out / MANIFEST).is_file():
        raise ConfigError(
            f"--append: {display_name(out)} holds no complete pack (no {MANIFEST}): write it first, without --append"
        )
    manifest = read_manifest(out, "--out")
    made_by = "tools/propose.py" if manifest.get("stage") == "propose" else "tools/pack.py"
    if made_by != tool:
        what = "from annotated photos" if made_by == "tools/propose.py" else "from a crop folder"
        raise ConfigError(
            f"--append: {display_name(out)} was made {what} by {made_by}; {tool} appends only to a pack it made"
        )
    now = json.loads(json.dumps(identity))  # as the manifest holds it (tuples as lists)
    changed = [
        f"{k} {then.get(k)!r} then, {value.get(k)!r} now"
        for key in ("proposals", "settings")
        if key in now
        for then, value in [(manifest.get(key) or {}, now[key])]
        for k in sorted(set(then) | set(value))
        if then.get(k) != value.get(k) and k not in READING
    ]
    if changed:
        raise ConfigError(
            f"--append: {display_name(out)} was made with other settings ({'; '.join(changed[:4])}): crops of one "
            "pack are made one way; give the pack's settings, or write a new pack"
        )
    rows, converted, stems, filenames = {}, {}, set(), set()
    for split, entry in manifest["splits"].items():
        path = out / split / INDEX
        rows[split] = np.array(open_index(path, path, out))
        problem = index_digest_problem(path, entry, path, out)
        if problem:
            raise ConfigError(f"--append: {problem}: {repack(out)}")
        listed = out / split / CONVERTED
        converted[split] = listed.read_text().splitlines(keepends=True) if entry.get("converted_list") else []
        stems |= {bytes(s).decode("utf-8", "surrogateescape") for s in np.unique(rows[split]["stem"])}
        filenames |= {bytes(f) for f in rows[split]["filename"]}
    return Existing(manifest, rows, converted, stems, filenames)


def appended_manifest(existing: Existing, splits: dict, stored: dict, skipped: list[dict], record: dict) -> dict:
    """The manifest of the pack with the new shards: the pack's, with the splits written now (`splits`: entries
    over each whole split) replaced, the leakage report over every split (`stored`: filenames, stems and
    `content_keys` of the splits written; those of the others are read from their indexes), `skipped` added, and
    `record` (what was appended) added to `appended`."""
    manifest = json.loads(json.dumps(existing.manifest))
    for split, rows in existing.rows.items():
        if split not in splits:  # untouched: its index as it is
            stored[split] = (rows["filename"], rows["stem"], content_keys(rows))
    merged = {**manifest["splits"], **splits}
    manifest["splits"] = {k: merged[k] for k in sorted(merged, key=split_sort_key)}
    manifest["samples"] = sum(e["samples"] for e in manifest["splits"].values())
    manifest["leakage"] = leakage_report({k: stored[k] for k in manifest["splits"]})
    manifest["skipped"] = sorted([*manifest["skipped"], *skipped], key=lambda s: (s["path"], s["reason"]))
    manifest["appended"] = [*manifest.get("appended", []), record]
    return manifest


def same_photo(file: Path, recorded: Path | None) -> bool:
    """Whether `file` is the photo a pack recorded under its stem: the same bytes, or (the pack's photo not on this
    machine, or no photo recorded) assumed so."""
    if recorded is None or not recorded.is_file():
        return True
    try:
        return file.resolve() == recorded.resolve() or file.read_bytes() == recorded.read_bytes()
    except OSError:
        return True


def already_in(existing: Existing, photos: list) -> list:
    """The photos (crackio.writing.annotations.Photo) whose stem names crops in the pack: skipped by an append.

    Raises:
        ConfigError: one of them is another photo than the pack's of that name (other bytes): its crops' names
            would collide; naming both files.
    """
    recorded = recorded_photos(existing.manifest)
    known = [p for p in photos if p.stem in existing.stems]
    clash = [p for p in known if not same_photo(p.path, recorded.get(p.stem))]
    if clash:
        more = f" (and {len(clash) - 1} more)" if len(clash) > 1 else ""
        raise ConfigError(
            f"--append: {display_name(clash[0].path)}{more} is not the photo the pack holds under the name "
            f"{clash[0].stem!r} ({display_name(recorded[clash[0].stem])}): the crops' names would collide; rename it "
            "(its file name names its crops) or leave it out"
        )
    return known


def draw_split(stem: str, ratios: tuple[float, ...], seed: int) -> str:
    """The split of an appended photo without a split folder: a uniform draw seeded by (seed, the stem's CRC-32)
    against the cumulative `ratios` (train, valid, test), so it depends on that photo alone."""
    u = np.random.default_rng([seed, 0xA99E, zlib.crc32(stem.encode())]).random()
    bounds = np.cumsum(ratios) / sum(ratios)
    return SPLITS[min(int(np.searchsorted(bounds, u, side="right")), len(SPLITS) - 1)]


def merged_stats(old: dict | None, new: dict) -> dict:
    """A split's proposal-stage fields over its earlier and its appended photos (recall recomputed from counts)."""
    if not old:
        return new
    out = {k: old.get(k, 0) + new[k] for k in ("photos", "ground_truth_boxes", "proposals_considered")}
    out["regions_before_cap"] = old.get("regions_before_cap", 0) + new["regions_before_cap"]
    gt_old, gt = old.get("ground_truth_boxes", 0), out["ground_truth_boxes"]
    for key in ("proposal_recall", "proposal_recall_uncapped"):
        hits = round((old.get(key) or 0) * gt_old) + round((new[key] or 0) * new["ground_truth_boxes"])
        out[key] = round(hits / gt, 4) if gt else None
    return {k: out[k] for k in new}  # the fields in the writer's order


def content_keys(rows: np.ndarray) -> np.ndarray:
    """S16 per index row: (size, CRC-32) of its stored JPEG, which the index holds. An appended pack's leakage
    check keys crops by these rather than re-reading every earlier shard (two different crops of equal size and
    CRC-32 are a 1 in 2^32 chance)."""
    keys = np.zeros(len(rows), "S16")
    if len(rows):
        packed = np.zeros((len(rows), 16), np.uint8)
        packed[:, :8] = np.ascontiguousarray(rows["size"], "<i8").view(np.uint8).reshape(-1, 8)
        packed[:, 8:12] = np.ascontiguousarray(rows["crc32"], "<u4").view(np.uint8).reshape(-1, 4)
        packed[:, 12:] = 1  # never all zero: numpy's S16 would strip trailing NULs of equal keys alike anyway
        keys = packed.view("S16").reshape(-1)
    return keys
