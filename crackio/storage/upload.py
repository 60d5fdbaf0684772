"""Writing a pack to object storage: `tools/pack.py SRC --out s3://bucket/prefix` (or gs://, az://; and
`tools/propose.py`) pack into a local staging folder, then upload it here.

The rules a reader relies on (the same as a local pack's: `manifest.json` marks a complete pack):
- one writer per prefix: `.crackio.lock` is created with a conditional PUT (If-None-Match: *, which S3,
  S3-compatible stores, GCS and Azure honour) before anything is packed, and deleted at the end, even after an error;
- deletes are checked first, before the lock (a trial DELETE of a key that does not exist: S3 answers it when
  the policy allows deletes there, refuses it when not). Replacing a pack needs them (the old manifest, the lock,
  an earlier pack's files), so a store that allows PUT but not DELETE is refused at once with nothing written:
  no lock is left to block the next upload, and the pack already there stays as it is;
- the old manifest is deleted before the first shard is replaced, so no reader pairs new shards with it: a
  reader sees the previous pack, then no pack while the upload runs, then the new one, never a mix. Shard names
  are fixed by the layout (`train/train-000000.tar`), so the previous pack cannot stay readable while its shards
  are overwritten; what is kept safe is the moment before: when that delete fails, nothing is uploaded and the
  previous pack is untouched and readable;
- the manifest is uploaded last, after every file it names; then the files of the pack layout under the prefix
  that the new manifest does not name (an earlier pack's) are deleted, as a local re-pack removes them. A file
  that cannot be deleted then, or the lock, ends the upload with an error saying so (the new pack is complete and
  readable; what is left and how to delete it), never with "uploaded".

The staging folder is `$TMPDIR/crackio-upload-<uid>/pack-XXXXXXXX/`, beside `pack-XXXXXXXX.lock`, on which the
upload holds a `flock` while it runs (the kernel drops it when the process ends, however it ends). It is removed
at the end; every upload first removes the staging folders whose lock is free, so an upload killed (`kill -9`,
a power cut) leaves its copy of the pack only until the next upload by the same user on that machine.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from crackio.errors import ConfigError, CrackioError, WriteError
from crackio.format.layout import CONVERTED, INDEX, MANIFEST, manifest_files
from crackio.format.manifest import read_manifest
from crackio.fsio import write_error
from crackio.storage.remote import STORES, Missing, Remote, RemoteError, is_remote

T = TypeVar("T")

LOCK = ".crackio.lock"
TRIAL = ".crackio.delete-check"  # never created: only deleted, to learn whether deletes are allowed
# A file of the pack layout (crackio.format.layout): <split>/<split>-NNNNNN.tar or .idx, index.npy, converted.tsv.
PACK_FILE = re.compile(r"([^/]+)/(?:\1-[0-9]{6}\.(?:tar|idx)|index\.npy|converted\.tsv)")
UPLOADERS = 8  # objects in flight


def upload_pack(staging: Path, remote: Remote) -> int:
    """Upload the complete pack in `staging` to `remote`, manifest last; returns the bytes uploaded. The order
    (module docstring): the old manifest deleted, every file, the manifest, then an earlier pack's files deleted.
    Files the manifest names that `staging` lacks (an append's earlier shards, already under the prefix) are
    neither uploaded nor deleted.

    Raises:
        ShardError: `staging` holds no complete pack. RemoteError: the old manifest could not be deleted (nothing
            uploaded: the previous pack is as it was); an upload failed (the manifest is then not uploaded, so
            readers see no pack there); an earlier pack's file could not be deleted (the new pack is complete).
    """
    manifest = read_manifest(staging)
    files = sorted(f for f in manifest_files(manifest) if f != MANIFEST and (staging / f).is_file())
    try:  # no reader may pair the new shards with it
        remote.delete(MANIFEST)
    except Missing:
        pass
    except RemoteError as e:
        raise type(e)(f"{e}; nothing was uploaded, so {remote.url} holds what it held before") from None
    try:
        with ThreadPoolExecutor(UPLOADERS, thread_name_prefix="crackio-upload") as pool:
            list(pool.map(lambda f: remote.put(f, (staging / f).read_bytes()), files))
        remote.put(MANIFEST, (staging / MANIFEST).read_bytes())
    except RemoteError as e:
        raise type(e)(
            f"{e}; {remote.url} holds no complete pack until an upload there finishes: run the same command again"
        ) from None
    # What an earlier pack left under the prefix (listed, so an upload interrupted before its clean-up is
    # cleaned by the next): files of the pack layout that the new manifest does not name. Anything else there
    # is not crackio's and stays, as a local re-pack leaves files it did not write.
    new = manifest_files(manifest)  # an append's earlier shards are named, not staged: they stay
    left: list[tuple[str, RemoteError]] = []
    for stale in sorted(k for k in remote.keys() if PACK_FILE.fullmatch(k) and k not in new):
        try:
            remote.delete(stale)
        except Missing:
            pass
        except RemoteError as e:
            left.append((stale, e))
    if left:
        key, first = left[0]
        them = "it" if len(left) == 1 else "them"
        raise RemoteError(
            f"{first}; the new pack at {remote.url} is complete and readable all the same, but {len(left)} "
            f"file{'s' if len(left) > 1 else ''} of an earlier pack {'is' if len(left) == 1 else 'are'} left there "
            f"(readers ignore {them}): delete {them} with `{remote.remove_command(key)}`"
            + ("" if len(left) == 1 else " and the like")
            + f", or let the next upload to {remote.url} delete {them}"
        )
    return sum((staging / f).stat().st_size for f in [*files, MANIFEST])


def staging_root() -> Path:
    """The folder of this user's upload stagings: `$TMPDIR/crackio-upload-<uid>` (tempfile's temporary folder)."""
    return Path(tempfile.gettempdir()) / f"crackio-upload-{os.getuid()}"


def _is(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (not removed, nor replaced, since it was opened)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def remove_stale_stagings(root: Path) -> None:
    """Remove the staging folders in `root` whose upload is not running: its `<name>.lock` is free (a killed
    upload's), or gone. A running upload's lock is held, so its folder is never touched; a folder that cannot be
    removed keeps its lock file, for a later try."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        path = root / name
        if name.endswith(".lock"):
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _is(fd, path):  # not removed by another upload since it was opened
                    with contextlib.suppress(FileNotFoundError):
                        shutil.rmtree(root / name.removesuffix(".lock"))
                    os.unlink(path)
            except OSError:  # held (BlockingIOError): its upload runs; or it could not be removed
                pass
            finally:
                os.close(fd)
        elif path.is_dir() and not path.is_symlink() and not (root / f"{name}.lock").exists():
            shutil.rmtree(path, ignore_errors=True)  # made after its lock and removed before it: left by hand


STAGING_NOTE = "the staging folder of uploads; set TMPDIR to a folder of yours on a disk with room for the pack"


def own_staging_root() -> Path:
    """`staging_root()`, made (0700) if missing.

    Raises:
        WriteError: it cannot be made (full disk, permissions), naming TMPDIR.
        ConfigError: it is not this user's folder (another user's, or a link).
    """
    root = staging_root()
    try:
        root.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(root)
    except OSError as e:
        raise write_error(root, e, STAGING_NOTE) from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ConfigError(
            f"{root} is not a folder of this user's, and uploads stage their pack there: remove it, or set TMPDIR "
            "to a folder of your own"
        )
    return root


@contextlib.contextmanager
def staging_folder(root: Path) -> Iterator[Path]:
    """A new staging folder in `root` (`own_staging_root()`), its lock held until it is removed (module
    docstring).

    Raises:
        WriteError: the folder cannot be made (full disk, permissions), naming TMPDIR.
    """
    try:
        while True:
            fd, name = tempfile.mkstemp(dir=root, prefix="pack-", suffix=".lock")
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _is(fd, Path(name)):
                break
            os.close(fd)  # another upload took it for a dead one's and removed it before this one locked it
    except OSError as e:
        raise write_error(root, e, STAGING_NOTE) from None
    lock = Path(name)
    folder = root / lock.name.removesuffix(".lock")
    try:
        folder.mkdir()
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)
        raise write_error(folder, e, STAGING_NOTE) from None
    try:
        yield folder
    finally:
        try:
            shutil.rmtree(folder)
            os.unlink(lock)
        except OSError:
            pass  # its lock is freed below: the next upload removes what is left
        os.close(fd)


@contextlib.contextmanager
def remote_output(url: str, timeout: float = 60.0) -> Iterator[tuple[Path, Remote]]:
    """(a staging folder to write the pack into, the remote it goes to) while holding the prefix's writer lock;
    the staging folder is removed afterwards, and the lock deleted.

    Raises:
        ConfigError: another writer holds the prefix (naming the lock and how to clear a stale one), or the URL
            cannot be written (http(s)://).
        RemoteError: deletes are not allowed there (nothing written); the lock could not be deleted at the end
            (said with the error in flight, if any, or alone).
    """
    remote = Remote(url, timeout)
    if remote.scheme not in STORES:
        raise ConfigError(
            f"--out {url}: an http(s):// server cannot be written; give --out s3://BUCKET/PREFIX, gs://BUCKET/PREFIX "
            "or az://CONTAINER/PREFIX"
        )
    root = own_staging_root()
    remove_stale_stagings(root)  # first: even an upload refused below cleans what killed ones left
    try:
        remote.delete(TRIAL, "a trial DELETE (of an object that does not exist) of")
    except Missing:  # a store that says 404 for it: deletes are allowed
        pass
    except RemoteError as e:
        raise type(e)(f"{e}; nothing was written to {url}") from None
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": started}
    try:
        remote.put(LOCK, json.dumps(holder).encode(), create=True)
    except FileExistsError:
        try:
            other = json.loads(remote.get(LOCK)[0])
            who = f" (since {other.get('started')}, host {other.get('host')}, pid {other.get('pid')})"
        except (CrackioError, ValueError, AttributeError):
            who = ""
        raise ConfigError(
            f"another pack is being written to {url}{who}: wait for it to finish; if none is running (it was "
            f"killed), delete {remote.address(LOCK)} (`{remote.remove_command(LOCK)}`) and run again"
        ) from None
    error: BaseException | None = None
    try:
        with staging_folder(root) as staging:
            yield staging, remote
    except BaseException as e:
        error = e
        raise
    finally:
        try:
            remote.delete(LOCK)
        except CrackioError as e:
            left = (
                f"the writer's lock {remote.address(LOCK)} is left, and every upload to {url} is refused until it "
                f"is deleted: `{remote.remove_command(LOCK)}`"
            )
            if error is None:
                raise RemoteError(f"{e}; so {left}") from None
            if isinstance(error, CrackioError):  # one line still: the error in flight, then this
                error.args = (f"{error}; also, {left} ({e})",)


def write_pack(out: str | os.PathLike, write: Callable[[Path], T], timeout: float = 60.0, appending: bool = False) -> T:
    """`write(folder)` packs into `out` when it is a folder; for an s3:// URL, into a staging folder under the
    prefix's writer lock, then uploaded (manifest last). The staging folder starts with the manifest of the pack
    already under the prefix, so the writer refuses to replace another pack there as it would in a folder
    (`crackio.writing.outdir.check_replacing`); `appending` (tools/propose.py --append) also fetches its indexes
    and converted lists, not its shards, so only the new shards, indexes and manifest are uploaded. Returns what
    `write` returned.

    Raises:
        WriteError: as `write`; for a full staging folder, naming $TMPDIR.
        RemoteError, ConfigError: as `remote_output` and `upload_pack`.
    """
    if not is_remote(out):
        before = _manifest_of(Path(out))
        result = write(Path(out))
        _say_replaced(before, _manifest_of(Path(out)), str(out), appending)
        return result
    with remote_output(str(out), timeout) as (staging, remote):
        before = None
        with contextlib.suppress(Missing):  # the pack there, for the writer's check against replacing another
            before = remote.get(MANIFEST)[0]
            (staging / MANIFEST).write_bytes(before)
        if appending and before is not None:
            _fetch_indexes(remote, staging, json.loads(before))
        try:
            result = write(staging)
        except ConfigError as e:  # the writer names its folder: here that is the staging copy of `out`
            raise type(e)(str(e).replace(str(staging), remote.url)) from None
        except WriteError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) or str(staging) not in str(e):
                raise
            raise WriteError(
                f"{e} (an upload stages the whole pack in {staging.parent} first: set TMPDIR to a folder on a "
                "disk with room for it)",
                e.errno,
            ) from None
        after = _manifest_of(staging)
        sent = upload_pack(staging, remote)
    print(f"uploaded {sent / 1e6:.1f} MB to {remote.url}", file=sys.stderr)  # and the lock deleted
    _say_replaced(before, after, remote.url, appending)
    return result


def _fetch_indexes(remote: Remote, staging: Path, manifest: object) -> None:
    """Each split's index.npy and converted.tsv of the pack under the prefix, into `staging` (what an append
    rewrites; the shards stay where they are). A damaged manifest fetches nothing: the writer names the problem."""
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    for split, entry in splits.items() if isinstance(splits, dict) else ():
        names = [INDEX] + ([CONVERTED] if isinstance(entry, dict) and entry.get("converted_list") else [])
        for name in names:
            key = f"{split}/{name}"
            if PACK_FILE.fullmatch(key):
                (staging / split).mkdir(exist_ok=True)
                with contextlib.suppress(Missing):
                    (staging / key).write_bytes(remote.get(key)[0])


def _manifest_of(folder: Path) -> bytes | None:
    """The bytes of the manifest in `folder`, None when there is none (or it cannot be read)."""
    try:
        return (folder / MANIFEST).read_bytes()
    except OSError:
        return None


def _say_replaced(before: bytes | None, after: bytes | None, out: str, appending: bool = False) -> None:
    """A note when the pack written to `out` replaced a pack of other contents (the same source and settings, say,
    over changed files), or grew (`appending`): its identity changed, and runs trained on the earlier pack cannot
    resume on it."""
    if appending and before is not None and after is not None and before != after:
        print(
            f"note: {out} has a new identity with what was appended: runs trained on it before will not --resume "
            "on it; a new run trains on all of it",
            file=sys.stderr,
        )
        return
    if before is not None and after is not None and before != after:
        print(
            f"note: {out} held a pack with other contents, now replaced (its identity changed: runs trained on the "
            "earlier pack will not --resume on this one)",
            file=sys.stderr,
        )
