"""File safety for every command, crackio's and the trainer's: the one durability rule, bounded reads of
regular files, the temporaries an interrupted write leaves, and OS errors as one line.

The durability rule: a file that marks completion (a manifest, an index, a checkpoint, a report) is
written to a unique temporary beside it, fsynced, renamed into place, and its folder fsynced, so a
crash, a kill -9 or a power cut leaves the previous file or the new one, never a torn one.
"""

from __future__ import annotations

import errno as codes
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable
from fnmatch import fnmatch
from pathlib import Path
from typing import BinaryIO, TypeGuard

from crackio.errors import WriteError


def write_error(path: object, error: OSError, note: str = "") -> WriteError:
    """One line for an OSError met while writing `path`: what happened, where, (`note`,) what to do."""
    what = (os.strerror(error.errno) if error.errno else str(error) or type(error).__name__).lower()
    fix = {
        codes.ENOSPC: "free space or write elsewhere",
        codes.EDQUOT: "free space within your quota or write elsewhere",
        codes.EROFS: "write to a writable folder",
        codes.EACCES: "fix the folder's permissions or write elsewhere",
    }.get(error.errno or 0, "check the disk and the folder")
    return WriteError(f"{what} while writing {path}{f' ({note})' if note else ''}: {fix}, then re-run", error.errno)


def is_path_component(name: object) -> TypeGuard[str]:
    """One folder or file name: joined to a folder, it never climbs out of it (not "", "." or "..", no "/",
    "\\" or NUL). Every name read from a file that becomes a path is checked with this."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in ("/", "\\", "\0"))


def display_name(name: str | os.PathLike) -> str:
    """A file name or path as text: valid UTF-8 as is, other bytes escaped (`caf\\xe9.1.0_5.1.jpg`)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


# What this module's writers leave when killed mid-write: atomic_write's `<name>.<8 random>.tmp` (mkstemp's
# names) and TarShard's `<name>.tmp`. Re-runs remove them by this pattern, for the names they write.
TEMPORARY = re.compile(r"(?P<target>.+?)(?:\.[a-z0-9_]{8})?\.tmp")


def _umask() -> int:
    """This process's umask, read without changing it (os.umask can only set it, racing other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022  # no /proc (not Linux): the common default


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Write `data` (bytes, or a function that writes to the open file) to `path` atomically: a unique
    temporary beside it, fsync, rename, fsync of the folder (the durability rule above). A crash or an error
    leaves the previous file (the temporary is removed on error). Every file that marks completion goes
    through here. The file gets the permissions a
    plain `open()` would give it (0666 less the umask; mkstemp's own are 0600), so a shared folder stays readable.
    """
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    except OSError as e:
        raise write_error(path, e) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        kept = f"the previous {path.name} is unchanged" if path.is_file() else f"no {path.name} was written"
        raise write_error(path, e, kept) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class NotRegular(ValueError):
    """A path that is a named pipe, a device, a socket or a folder, where a regular file was expected."""


class TooLarge(ValueError):
    """A file larger than it can plausibly be; `size` in bytes."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"{size} bytes, larger than the {limit >> 20} MiB this file can be")
        self.size = size


def read_regular(path: str | os.PathLike, limit: int | None) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `limit` bytes: opened without blocking (a
    named pipe), sized before reading (a device, a file larger than `limit`), and read in a buffer of its own
    size (`read(limit)` would reserve `limit` bytes up front). `limit` None: only check it is a regular file
    (returns b""). Used for every file crackio reads whole: inputs of a pack, manifests, indexes.

    Raises:
        OSError: unreadable; NotRegular; TooLarge.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with open(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegular("not a regular file (a named pipe, a device or a folder)")
        if limit is None:
            return b""
        if info.st_size > limit:
            raise TooLarge(info.st_size, limit)
        data = f.read(info.st_size + 1)  # a byte more: a file that grew since the fstat is caught
        if len(data) > limit:
            raise TooLarge(len(data), limit)
        return data


def fsync_dir(folder: Path) -> None:
    """fsync a folder so that a rename into it survives a power cut (POSIX; Windows cannot open folders)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    """A text file through `atomic_write` (raises WriteError)."""
    atomic_write(path, text.encode())


def write_json(path: Path, data) -> None:
    """JSON through `atomic_write` (raises WriteError)."""
    write_text(path, json.dumps(data, indent=1) + "\n")


def make_dir(path: Path) -> Path:
    """mkdir -p, a failure (read-only disk, permissions) as one line.

    Raises:
        WriteError: naming the folder and the OS error.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(f"the folder {path}", e) from None
    return path


def remove_temporaries(folder: Path, names: Iterable[str]) -> list[Path]:
    """Remove what interrupted atomic writes left in `folder` (a kill -9 or a power cut leaves
    `<name>.XXXXXXXX.tmp`, a tar writer `<name>.tmp`), for the given names or patterns ("last.pt", "*.jpg")
    only; returns them.

    Raises:
        WriteError: a temporary that cannot be removed.
    """
    if not folder.is_dir():
        return []
    patterns = tuple(names)
    removed = []
    for path in sorted(folder.iterdir()):
        found = TEMPORARY.fullmatch(path.name)
        if found and path.is_file() and any(fnmatch(found["target"], p) for p in patterns):
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                raise write_error(f"the stale temporary {path}", e) from None
            removed.append(path)
    return removed


def save_npz(path: Path, **arrays) -> None:
    """np.savez (plain arrays, nothing pickled) through `atomic_write` (raises WriteError)."""
    import numpy as np

    atomic_write(path, lambda f: np.savez(f, allow_pickle=False, **arrays))
