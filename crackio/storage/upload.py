"""Writing a pack to object storage: `tools/pack.py SRC --out s3://bucket/prefix` (and `tools/propose.py`) pack
into a local staging folder, then upload it here.

The rules a reader relies on (the same as a local pack's: `manifest.json` marks a complete pack):
- one writer per prefix: `.crackio.lock` is created with a conditional PUT (If-None-Match: *, which S3 and
  S3-compatible stores honour) before anything is packed, and deleted at the end, even after an error;
- the old manifest is deleted before the first shard is replaced, so no reader pairs new shards with it;
- the manifest is uploaded last, after every file it names; then the files of the pack layout under the prefix
  that the new manifest does not name (an earlier pack's) are deleted, as a local re-pack removes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from crackio.errors import ConfigError, CrackioError
from crackio.format.layout import MANIFEST, manifest_files
from crackio.format.manifest import read_manifest
from crackio.storage.remote import Remote, RemoteError, is_remote

T = TypeVar("T")

LOCK = ".crackio.lock"
# A file of the pack layout (crackio.format.layout): <split>/<split>-NNNNNN.tar or .idx, index.npy, converted.tsv.
PACK_FILE = re.compile(r"([^/]+)/(?:\1-[0-9]{6}\.(?:tar|idx)|index\.npy|converted\.tsv)")
UPLOADERS = 8  # objects in flight


def upload_pack(staging: Path, remote: Remote) -> int:
    """Upload the complete pack in `staging` to `remote`, manifest last; returns the bytes uploaded.

    Raises:
        ShardError: `staging` holds no complete pack; RemoteError: an upload failed (the manifest is then not
        uploaded, so readers see no pack there).
    """
    manifest = read_manifest(staging)
    files = sorted(f for f in manifest_files(manifest) if f != MANIFEST and (staging / f).is_file())
    with contextlib.suppress(FileNotFoundError, RemoteError):  # no reader may pair the new shards with it
        remote.delete(MANIFEST)
    with ThreadPoolExecutor(UPLOADERS, thread_name_prefix="crackio-upload") as pool:
        list(pool.map(lambda f: remote.put(f, (staging / f).read_bytes()), files))
    remote.put(MANIFEST, (staging / MANIFEST).read_bytes())
    # What an earlier pack left under the prefix (listed, so an upload interrupted before its clean-up is
    # cleaned by the next): files of the pack layout that the new manifest does not name. Anything else there
    # is not crackio's and stays, as a local re-pack leaves files it did not write.
    new = set(files) | {MANIFEST}
    for stale in sorted(k for k in remote.keys() if PACK_FILE.fullmatch(k) and k not in new):
        with contextlib.suppress(RemoteError):
            remote.delete(stale)
    return sum((staging / f).stat().st_size for f in [*files, MANIFEST])


@contextlib.contextmanager
def remote_output(url: str, timeout: float = 60.0) -> Iterator[tuple[Path, Remote]]:
    """(a staging folder to write the pack into, the remote it goes to) while holding the prefix's writer lock;
    the staging folder is removed afterwards.

    Raises:
        ConfigError: another writer holds the prefix (naming the lock and how to clear a stale one), or the URL
            cannot be written (http(s)://).
    """
    remote = Remote(url, timeout)
    if remote.scheme != "s3":
        raise ConfigError(f"--out {url}: an http(s):// server cannot be written; give --out s3://BUCKET/PREFIX")
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
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
            f"killed), delete {remote.address(LOCK)} (e.g. `aws s3 rm {remote.address(LOCK)}`) and run again"
        ) from None
    staging = Path(tempfile.mkdtemp(prefix="crackio-upload-"))
    try:
        yield staging, remote
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(CrackioError):
            remote.delete(LOCK)


def write_pack(out: str | os.PathLike, write: Callable[[Path], T], timeout: float = 60.0) -> T:
    """`write(folder)` packs into `out` when it is a folder; for an s3:// URL, into a staging folder under the
    prefix's writer lock, then uploaded (manifest last). Returns what `write` returned."""
    if not is_remote(out):
        return write(Path(out))
    with remote_output(str(out), timeout) as (staging, remote):
        result = write(staging)
        sent = upload_pack(staging, remote)
        print(f"uploaded {sent / 1e6:.1f} MB to {remote.url}", file=sys.stderr)
        return result
