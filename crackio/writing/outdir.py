"""The output folder of a pack or proposal run: one writer at a time, and what crackio wrote there.

- **One writer.** A run holds an exclusive `flock` on `OUT/.crackio.lock` for its whole
  length; a second run into the same folder fails at once naming the holder's PID. The
  kernel drops the lock when its process ends, so a killed run never blocks the next one.
- **Only its own files.** `OUT/.crackio-written.json` lists every file a run may write,
  recorded before any is written. A re-run deletes only listed files it no longer needs
  (and folders that end up empty), refuses to overwrite a file it did not write, and
  removes the temporaries of listed files. A pack written before the list existed is
  known from its `manifest.json`.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from crackio.errors import ConfigError
from crackio.format.layout import MANIFEST, manifest_files
from crackio.fsio import TEMPORARY, atomic_write, display_name, is_path_component, write_error

LOCK = ".crackio.lock"
WRITTEN = ".crackio-written.json"


def plain_relative(path: str) -> bool:
    """A path crackio may name inside OUT: relative, every part a plain name (so no `..`, no backslash)."""
    return isinstance(path, str) and all(is_path_component(part) for part in path.split("/"))


class OutputFolder:
    """Hold OUT for one run: `with OutputFolder(out) as folder: folder.claim(paths); ...; folder.finish(keep)`.

    Raises (on entry):
        ConfigError: another run holds the folder (its PID named), or OUT is not a folder.
    """

    def __init__(self, out: Path):
        self.out = out
        self._fd: int | None = None
        self.written: set[str] = set()

    def __enter__(self) -> OutputFolder:
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {display_name(self.out)} exists and is not a folder: choose a folder")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(self.out, e) from None
        try:
            fd = os.open(self.out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask, like every file
        except OSError as e:
            raise write_error(self.out / LOCK, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"{display_name(self.out)} is being written by another crackio run (PID {holder}): wait for it "
                f"to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        self.written = self._previously_written()
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:  # interrupted or failed: workers killed by a signal could not remove theirs
            self.remove_temporaries()
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays (unlinking a lock file races)
            self._fd = None

    def _previously_written(self) -> set[str]:
        written: set[str] = set()
        for name, read in ((WRITTEN, lambda d: d.get("files", [])), (MANIFEST, manifest_files)):
            try:
                data = json.loads((self.out / name).read_text())
                files = read(data)
            except (OSError, ValueError, AttributeError, TypeError):
                continue  # missing or damaged: then nothing is known to be ours from it
            written |= {f for f in files if isinstance(f, str) and plain_relative(f)}
        return written

    def _record(self) -> None:
        text = json.dumps({"files": sorted(self.written)}, indent=0) + "\n"
        atomic_write(self.out / WRITTEN, text.encode())

    def claim(self, paths: set[str]) -> None:
        """Record `paths` (relative to OUT) as crackio's before writing any, and remove their temporaries.

        Raises:
            ConfigError: one of them exists and crackio did not write it (never overwritten), or a folder they
                go in is a file.
        """
        parents = {parent for p in paths for parent in Path(p).parents if parent != Path(".")}
        blocked = sorted(str(f) for f in parents if (self.out / f).exists() and not (self.out / f).is_dir())
        if blocked:
            raise ConfigError(
                f"{display_name(self.out / blocked[0])} is a file where crackio writes a folder: move it away or "
                f"choose another --out"
            )
        foreign = sorted(p for p in paths - self.written if (self.out / p).exists() and not (self.out / p).is_dir())
        if foreign:
            more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
            raise ConfigError(
                f"{display_name(self.out / foreign[0])}{more} exists and was not written by crackio: move it "
                f"away or choose another --out (crackio never overwrites files it did not write)"
            )
        self.written |= paths
        self._record()
        self.remove_temporaries()

    def remove_temporaries(self) -> None:
        """Remove the temporaries of every recorded file (an interrupted run's; crackio.fsio.TEMPORARY)."""
        for p in sorted(self.written):
            target = self.out / p
            if target.parent.is_dir():
                for tmp in target.parent.glob(f"{_glob_escape(target.name)}.*"):
                    found = TEMPORARY.fullmatch(tmp.name)
                    if tmp.name == f"{target.name}.tmp" or (found and found["target"] == target.name):
                        tmp.unlink(missing_ok=True)

    def finish(self, keep: set[str]) -> None:
        """After a complete run: delete the files crackio wrote earlier that `keep` lacks, then folders left
        empty by that (an earlier pack's split), and record `keep` as what OUT holds."""
        for p in sorted(self.written - keep):
            (self.out / p).unlink(missing_ok=True)
            parent = (self.out / p).parent
            while parent != self.out and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
        self.written = set(keep)
        self._record()


APPEND_BASE = ".spool/base"  # an append's copy of the pack it adds to (crackio.writing.append)


def read_existing(out: Path) -> dict | None:
    """The manifest of the complete pack in `out` read leniently (for `check_replacing`, never for reading the pack);
    None when there is none or it cannot be read as a JSON object. Where an append was interrupted (its manifest
    gone), the pack it was adding to, from the copy it kept, marked `"interrupted_append": True`."""
    for path, interrupted in ((out / MANIFEST, False), (out / APPEND_BASE / MANIFEST, True)):
        try:
            manifest = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(manifest, dict):
            return {**manifest, "interrupted_append": True} if interrupted else manifest
    return None


def check_replacing(out: str, old: dict | None, new: dict, overwrite: bool) -> None:
    """Refuse to write over the complete pack at `out` (its manifest `old`; None: no pack there) a pack that is not
    the same run's: another source, stage, settings (the seed is one) or proposal settings (`new`: those of the pack
    to be written, keyed as a manifest keys them), unless `overwrite`. Runs trained on the old pack could no longer
    resume, and nothing would say it had been replaced. The same command again (after an interruption, or to
    write the current format) goes ahead.

    Raises:
        ConfigError: naming the pack there, what differs, and the two ways on.
    """
    if old is None or overwrite:
        return
    if old.get("interrupted_append"):
        raise ConfigError(
            f"--out {out} holds a pack (of {old.get('source')}) that an append was adding to when it was interrupted: "
            "run that same command (with --append) again to finish it; writing this one there would replace the "
            "pack; give --overwrite to replace it"
        )
    if old.get("appended"):
        sources = ", ".join(str(a.get("source")) for a in old["appended"] if isinstance(a, dict))
        raise ConfigError(
            f"--out {out} holds a pack that had more added with --append (from {sources}): writing it again from "
            "one source would drop them; give --append to add to it, or --overwrite to replace it"
        )
    new = json.loads(json.dumps(new))  # as the manifest holds it (tuples as lists)
    changed = []
    for key, value in new.items():
        then = old.get(key)
        if then == value:
            continue
        if isinstance(then, dict) and isinstance(value, dict):
            changed += [
                f"{k} {then.get(k)!r} then, {value.get(k)!r} now"
                for k in sorted(set(then) | set(value))
                if then.get(k) != value.get(k)
            ]
        else:
            changed.append(f"{key} {then!r} then, {value!r} now")
    if changed:
        raise ConfigError(
            f"--out {out} holds another pack ({'; '.join(changed[:4])}): writing this one there would replace it, "
            f"and runs trained on it could no longer resume; choose another --out, or give --overwrite to replace it"
        )


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)
