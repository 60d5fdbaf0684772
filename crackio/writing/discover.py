"""Discovery of a proposal folder: which splits, which proposal files (names parsed, nothing opened yet),
what is ignored (metadata, hidden files) and what is skipped, with a reason."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from crackio.format.layout import SPLIT_ORDER, split_sort_key
from crackio.fsio import display_name
from crackio.writing.filenames import IMAGE_EXTENSIONS, BadName, Proposal, is_utf8, parse_name

# Names operating systems and archivers leave in folders; never proposals.
OS_METADATA = {"__MACOSX", "Thumbs.db", "desktop.ini", "ehthumbs.db", "$RECYCLE.BIN", "System Volume Information"}


HIDDEN = "hidden or operating-system metadata (.DS_Store, ._* AppleDouble, __MACOSX, Thumbs.db)"


NOT_IMAGE = "not an image file by its extension (metadata such as README, data.yaml, annotation JSON)"


NO_IMAGES = "folder without image files (not a split)"


@dataclass(frozen=True)
class Skipped:
    path: str  # as text; bytes that are not UTF-8 escaped (crackio.writing.filenames.display_name)
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
