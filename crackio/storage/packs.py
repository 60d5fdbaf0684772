"""A pack wherever it is: a local folder, or a URL (`s3://bucket/prefix`, `gs://...`, `az://...`,
`http(s)://host/path`) read through the
node's cache. `open_pack(location, remote)` is the one place a location becomes something to read; everything
downstream (the loader, eval, svm, detect, bench, verify) reads through the `Pack` it returns. Its cache and
timeout are its `RemoteSettings` argument's (crackio.storage.settings), never a process-wide setting.

A remote pack's manifest is fetched once per process and validated like a local one; its SHA-256 is the same as
the local copy's, so a run resumes on either. Each split's index is fetched once per node into the cache (the
other ranks wait for that download), validated as a local index is, and memory-mapped from there. Shard bytes:

- `read` (block order's runs of consecutive samples) goes through the cache in aligned chunks of `CHUNK` bytes;
- `read_many` (random order's samples, a batch at a time) goes through the same chunks when the cache can hold
  the whole pack; otherwise it streams: each sample's bytes by its own ranged GET, `FETCHERS` in flight, nothing
  kept, since an LRU cache smaller than the pack would only evict what a random order needs next. (obstore's
  `get_ranges` coalesces ranges less than 1 MiB apart into one request: measured, it moved ~40x the bytes of
  the samples for random crops, so each sample is its own request.)

Every sample read is CRC32-checked by the reader above (`crackio.loading.readers`); a damaged cached chunk is
dropped and fetched again once (`reread`); an object whose size is not its manifest's is a changed object and
ends the run (`RemoteError`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from crackio.errors import ConfigError, CrackioError
from crackio.format.index import SplitIndex, check_index, index_digest_problem, load_index, open_index, split_entry_of
from crackio.format.layout import CONVERTED, INDEX, MANIFEST, SPLITS, ShardError, join
from crackio.format.manifest import (
    manifest_sha256,
    pack_file_text,
    parse_manifest,
    read_manifest,
    split_folder_error,
    splits_named,
)
from crackio.format.verify import converted_problems, digest_problem, tar_problems, verify, verify_idx
from crackio.storage.cache import Cache, default_cache_dir
from crackio.storage.remote import STORES, Missing, Remote, RemoteError, check_location, is_remote
from crackio.storage.settings import RemoteSettings, parse_bytes  # noqa: F401  (parse_bytes: train imports it here)

CHUNK = 1 << 20  # bytes: the cache's unit of a tar; ~100 crops of ~10 KB, one request each
FETCHERS = 32  # requests in flight per loader: ~1,600 samples/s at a 20 ms round trip


class LocalShards:
    """The tars of a local split: bytes by `os.pread`, one descriptor per tar and process."""

    def __init__(self, paths: list[Path], location: str):
        self.names = [str(p) for p in paths]
        self.location = location
        self._fds: dict[int, int] = {}

    def __getstate__(self):
        return {"names": self.names, "location": self.location, "_fds": {}}

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def read(self, shard: int, start: int, length: int) -> bytes:
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.names[shard], os.O_RDONLY)
        return os.pread(fd, length, start)

    def read_many(self, requests: list[tuple[int, int, int]]) -> list[bytes]:
        """(shard, start, length) each, in order."""
        return [self.read(*r) for r in requests]

    def reread(self, shard: int, start: int, length: int) -> bytes | None:
        """None: a local file read again gives the same bytes (nothing to retry)."""
        return None


class RemoteShards:
    """The tars of a remote split, read through the node's cache (module docstring). Thread-safe; picklable."""

    def __init__(
        self, remote: Remote, split: str, entries: list[dict], cache: Cache | None, pack_key: str, stream: bool
    ):
        self.remote, self.cache, self.stream = remote, cache, stream
        self.keys = [f"{split}/{e['name']}" for e in entries]
        self.sizes = [int(e["bytes"]) for e in entries]
        self.names = [remote.address(k) for k in self.keys]
        self.location = remote.url
        self.pack_key = pack_key
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_pool=None, _lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _chunk_name(self, shard: int, chunk: int) -> str:
        return f"{self.pack_key}/{self.keys[shard]}.{chunk}"

    def _get(self, shard: int, start: int, length: int) -> bytes:
        """One ranged GET of tar `shard`; its answer's object size must be the manifest's (else the object changed)."""
        data, size = self.remote.get(self.keys[shard], start, length)
        if size != self.sizes[shard]:
            raise RemoteError(
                f"{self.names[shard]} is {size} bytes, its manifest says {self.sizes[shard]}: the object changed "
                "since the pack was written (a re-upload under way?); upload the whole pack again, then run again"
            )
        return data

    def _download(self, shard: int, chunk: int) -> bytes:
        start = chunk * CHUNK
        return self._get(shard, start, min(CHUNK, self.sizes[shard] - start))

    def _piece(self, shard: int, chunk: int, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of a chunk, read from the cache's file (the chunk downloaded first when
        this node has none)."""
        if self.cache is None or (self.cache.limit is not None and self.cache.limit < CHUNK):
            return self._get(shard, chunk * CHUNK + start, length)  # nothing would be kept: just these bytes
        download = lambda: self._download(shard, chunk)  # noqa: E731
        return self.cache.fetch(self._chunk_name(shard, chunk), download, start, length)

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._pool_pid != os.getpid():  # a forked child has none of the threads
                self._pool = ThreadPoolExecutor(FETCHERS, thread_name_prefix="crackio-fetch")
                self._pool_pid = os.getpid()
            return self._pool

    def read(self, shard: int, start: int, length: int, parallel: bool = True) -> bytes:
        """`length` bytes from `start` of tar `shard`, through the cache's chunks (each piece read from its chunk's
        file, never the whole chunk); the chunks of a span downloaded together unless `parallel` is False (a
        task already on this reader's pool, which must not wait on the pool)."""
        pieces = []
        end = start + length
        while start < end:
            chunk, offset = divmod(start, CHUNK)
            size = min(CHUNK - offset, end - start)
            pieces.append((chunk, offset, size))
            start += size
        if len(pieces) == 1 or not parallel:
            return b"".join(self._piece(shard, *p) for p in pieces)
        return b"".join(self._executor().map(lambda p: self._piece(shard, *p), pieces))

    def _one(self, request: tuple[int, int, int]) -> bytes:
        """One sample's bytes: through the cache's chunks, or its own ranged GET when streaming."""
        shard, start, length = request
        return self._get(shard, start, length) if self.stream else self.read(shard, start, length, parallel=False)

    def submit(self, requests: list[tuple[int, int, int]]) -> list[Future[bytes]]:
        """(shard, start, length) each, fetched on this reader's pool (`FETCHERS` in flight): a read-ahead's."""
        pool = self._executor()
        return [pool.submit(self._one, r) for r in requests]

    def read_many(self, requests: list[tuple[int, int, int]]) -> list[bytes]:
        """(shard, start, length) each, in order: chunks through the cache, or streamed (module docstring)."""
        return [f.result() for f in self.submit(requests)]

    def reread(self, shard: int, start: int, length: int) -> bytes | None:
        """The bytes again after a failed checksum, with the cached chunks dropped and downloaded anew (a damaged
        cache file); what a fresh download gives is what the server holds."""
        if self.cache is not None:
            for chunk in range(start // CHUNK, (start + length - 1) // CHUNK + 1):
                self.cache.drop(self._chunk_name(shard, chunk))
        if self.stream or self.cache is None:
            return self._get(shard, start, length)
        return self.read(shard, start, length)


@dataclass
class Pack:
    """A complete pack, local or remote, its manifest read and validated once.

    `location`: as given (folder or URL); `manifest`: the validated dict; `sha256`: the manifest's, which records
    every other file's SHA-256 (the pack's identity over every byte, in checkpoints, loader states, the SVM
    feature cache and the node cache; the same for a local copy).
    """

    location: str
    manifest: dict
    sha256: str
    root: Path | None = None  # a local pack's folder
    remote: Remote | None = None
    cache: Cache | None = None

    @property
    def key(self) -> str:
        """The pack's folder in the cache: its manifest's SHA-256 (a re-uploaded pack is another pack)."""
        return self.sha256[:24]

    def index(self, split: str) -> SplitIndex:
        """The split's index, checked (`crackio.format.index`); a remote one fetched once per node into the cache.

        Raises:
            ShardError: a missing split, a malformed index, an unreachable server (naming the URL).
        """
        if self.remote is None:
            assert self.root is not None
            return load_index(self.root, split)
        info = split_entry_of(self.manifest, self.location, split)
        key = f"{split}/{INDEX}"
        name = self.remote.address(key)
        fix = f": write the pack at {self.location} again"

        def download() -> bytes:  # checked before the cache keeps it: a bad download is never kept
            data = self.remote.get(key)[0]  # type: ignore[union-attr]
            problem = index_digest_problem(data, info, name, self.location)
            if problem:
                raise ShardError(problem + fix)
            return data

        if self.cache is None:  # cache_limit 0
            rows = _in_memory(download(), name, self.location)
        else:
            entry = f"{self.key}/{key}"
            for _ in range(3):  # evicted by another process between download and opening: fetch it again
                kept = self.cache.keep(entry, download)
                if isinstance(kept, bytes):  # larger than the whole cache
                    rows = _in_memory(kept, name, self.location)
                    break
                try:
                    damaged = kept.is_file() and index_digest_problem(kept, info, name, self.location)
                except OSError:  # evicted while hashed
                    continue
                if damaged:  # the cached file changed on disk since it was checked: drop it, download again
                    self.cache.drop(entry)
                    continue
                if kept.is_file():
                    rows = open_index(kept, name, self.location)
                    break
            else:
                rows = _in_memory(download(), name, self.location)
        check_index(rows, info, name, self.location)
        return SplitIndex(Path(self.location), split, rows, [])

    def files(self, index: SplitIndex) -> LocalShards | RemoteShards:
        """What reads the split's tars: local files, or the remote objects through the cache."""
        if self.remote is None:
            return LocalShards(index.shards, str(self.location))
        entries = self.manifest["splits"][index.split]["shards"]
        total = sum(s["bytes"] for info in self.manifest["splits"].values() for s in info["shards"])
        stream = self.cache is None or (self.cache.limit is not None and self.cache.limit < total)
        return RemoteShards(self.remote, index.split, entries, self.cache, self.key, stream)


def _in_memory(data: bytes, name: str, root: str) -> np.ndarray:
    """An index that a cache too small to hold it cannot keep: read from memory (`allow_pickle=False`)."""
    import io

    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ShardError(
            f"{name} cannot be read ({type(e).__name__}: {str(e)[:200]}): upload the pack again to {root}"
        ) from None


_opened: dict[tuple[str, RemoteSettings], Pack] = {}
_opened_lock = threading.Lock()


def _after_fork() -> None:
    """A forked child opens its packs anew: its parent's clients, thread pools and database connections do not
    work in it (obstore's runtime and the pools' threads are not copied by fork)."""
    global _opened_lock
    _opened.clear()
    _opened_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def open_pack(location: str | os.PathLike, remote: RemoteSettings | None = None, option: str = "") -> Pack:
    """The pack at `location`, its manifest validated.

    Args:
        location: a folder (str or path), or an s3://, gs://, az:// or http(s):// URL.
        remote: a remote pack's cache and timeout (None: `RemoteSettings.from_env()`); unused for a folder, but
            checked for either. A remote pack is opened once per process and settings (its manifest fetched
            once): two settings, two `Pack`s, each with its own cache.
        option: how the caller names `location` in messages (an argument, "shards", or a command's flag,
            "--shards"; "": "location", and no name where a message says what to give instead).

    Raises:
        ConfigError: a location that is no folder or URL, a URL of a scheme crackio does not read or one that
            cannot work, `remote` not a RemoteSettings.
        ShardError: no complete pack there (saying what is there instead: a split's folder names its pack, a
            file of a pack its folder, ...), a malformed manifest.
        RemoteError: naming the URL and the fix.
    """
    return _open(location, remote, option, verifying=False)


def check_remote(remote: object) -> None:
    """Refuse a `remote` argument that is not a RemoteSettings or None, whether the pack is local or remote."""
    if remote is not None and not isinstance(remote, RemoteSettings):
        raise ConfigError(
            f"remote must be crackio.RemoteSettings(...) or None (the environment's: $CRACKIO_CACHE_DIR, ...), "
            f"got {remote!r}"
        )


def _open(location: str | os.PathLike, remote: RemoteSettings | None, option: str, verifying: bool) -> Pack:
    """`open_pack`'s; `verifying`: the caller checks the whole pack (messages say to verify, not to read)."""
    check_remote(remote)
    if not isinstance(location, str | os.PathLike):
        raise ConfigError(
            f"{option or 'location'} must be a pack's folder (a str or path) or its URL (s3://, gs://, az://, "
            f"http(s)://), got {location!r}"
        )
    if not is_remote(location):
        check_location(location, option or "location")
        root = Path(location)
        manifest = read_manifest(root, option, verifying)
        return Pack(str(location), manifest, manifest_sha256(root), root=root)
    remote = remote if remote is not None else RemoteSettings.from_env()
    server = Remote(str(location), remote.timeout)  # the URL checked before any request
    url = server.url
    with _opened_lock:
        if (url, remote) in _opened:
            return _opened[(url, remote)]
    try:  # the first contact waits at most 15 s: a wrong URL or a server not started is said soon
        data, _ = Remote(url, min(remote.timeout, 15.0)).get(MANIFEST)
    except Missing:
        raise _no_pack_at(server, min(remote.timeout, 15.0), verifying) from None
    manifest = parse_manifest(data, join(url, MANIFEST), url)
    cache = None
    if remote.cache_limit != 0:
        cache = Cache(remote.cache_dir or default_cache_dir(), remote.cache_limit)
    pack = Pack(url, manifest, hashlib.sha256(data).hexdigest(), remote=server, cache=cache)
    with _opened_lock:
        _opened[(url, remote)] = pack
    return pack


def _no_pack_at(server: Remote, timeout: float, verifying: bool) -> ShardError:
    """The refusal of a URL without a manifest: a split's folder of the pack one level up, or a split's file of
    the pack two levels up, names that pack; else where a pack comes from."""
    url = server.url
    parent, _, name = url.rpartition("/")
    with contextlib.suppress(CrackioError):  # no pack above either: the general message
        if urlsplit(url).path.strip("/"):  # a folder below the bucket or host: the pack may be one level up
            names = splits_named(Remote(parent, timeout).get(MANIFEST)[0])
            if name in (names if names is not None else SPLITS):
                return split_folder_error(url, parent, name, verifying)
    with contextlib.suppress(CrackioError):
        if urlsplit(parent).path.strip("/") and (name in (INDEX, CONVERTED) or name.endswith((".tar", ".idx"))):
            pack = parent.rpartition("/")[0]
            Remote(pack, timeout).get(MANIFEST)  # there: `url` is one of its split's files
            return ShardError(pack_file_text(url, pack))
    fix = (
        f"upload one with `python tools/pack.py SRC --out {url}`"
        if server.scheme in STORES
        else "serve a pack folder there (the folder tools/pack.py --out wrote, as it is)"
    )
    return RemoteError(
        f"{join(url, MANIFEST)} is missing, so {url} holds no complete pack (an upload not finished, or the wrong "
        f"prefix): {fix}"
    )


def verify_pack(location: str | os.PathLike, remote: RemoteSettings | None = None) -> Iterator[str]:
    """`crackio.format.verify.verify` of a folder; of a remote pack, the same checks on each object downloaded
    one at a time into memory (a tar at most: nothing written to disk but the cached indexes). Problems name the
    URL.

    Args:
        location: as `open_pack`'s; remote: its settings (None: `RemoteSettings.from_env()`).

    Raises:
        ShardError: a malformed manifest or index; RemoteError: a download failed.
    """
    if not is_remote(location):
        check_remote(remote)
        yield from verify(location)
        return
    pack = _open(location, remote, "", verifying=True)
    assert pack.remote is not None
    for split, info in pack.manifest["splits"].items():
        if info["samples"] == 0:
            continue
        key = f"{split}/{INDEX}"
        data = pack.remote.get(key)[0]  # as the server holds it, not as a cache kept it
        problem = index_digest_problem(data, info, pack.remote.address(key), pack.location)
        if problem:
            yield problem
        rows = _in_memory(data, pack.remote.address(key), pack.location)
        check_index(rows, info, pack.remote.address(key), pack.location)
        listed = f"{split}/{CONVERTED}"
        try:
            text: bytes | None = pack.remote.get(listed)[0]
        except Missing:
            text = None
        yield from converted_problems(text, info, pack.remote.address(listed))
        for number, shard in enumerate(info["shards"]):
            key = f"{split}/{shard['name']}"
            name = pack.remote.address(key)
            idx = key[: -len(".tar")] + ".idx"
            try:
                text, where = pack.remote.get(idx)[0], pack.remote.address(idx)
                yield from digest_problem(hashlib.sha256(text).hexdigest(), shard["idx_sha256"], where)
                yield from verify_idx(text, rows, number, where)
            except (RemoteError, ValueError) as e:  # UnicodeDecodeError is a ValueError
                yield f"{pack.remote.address(idx)}: unreadable ({e})"
            data, size = pack.remote.get(key)
            if size != shard["bytes"]:
                yield f"{name}: {size} bytes, its manifest says {shard['bytes']} (truncated or replaced)"
                continue
            fd = os.memfd_create("crackio-verify")  # the tar in memory, read by the same pread-based checks
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                yield from tar_problems(fd, rows, number, name, hashlib.sha256(data).hexdigest(), shard["sha256"])
            finally:
                os.close(fd)
