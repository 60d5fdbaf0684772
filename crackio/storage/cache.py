"""The local cache of a remote pack: downloaded files and byte ranges, bounded, least recently used first out.

One folder, shared by every process of a node (the ranks of a torchrun, a sweep's runs, the next run): entries
are files under it, their sizes and last use are rows of one SQLite table (`cache.db`; SQLite's own file locking
makes its transactions safe across processes, which is why it is used instead of a hand-made index). Rules:

- One download per entry: a process holds an exclusive `flock` on the entry's lock stripe while it downloads, so
  the other ranks wait for that download and then read the file.
- The limit holds at every moment: an entry is admitted, older entries evicted and its file renamed into place
  inside one write transaction, so no two processes can both count on the same free space. An entry larger than
  what eviction can free is handed back without being kept (streaming).
- No torn file: a temporary beside it, then a rename. Not fsynced (unlike the durability rule of
  `crackio.fsio`): every sample read from an entry is checked against its CRC32 before a decoder sees it, and a
  damaged entry is dropped and downloaded again (`drop`), so a power cut costs a download, not a wrong sample.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sqlite3
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from crackio.errors import ConfigError
from crackio.fsio import write_error

DATABASE = "cache.db"
LOCKS = "locks"
STRIPES = 64  # lock files: two entries share one with probability 1/64 (a wait, never a wrong result)
TOUCH_EVERY = 5.0  # seconds: a hit updates its entry's last use at most this often (a write per hit would
# serialize the readers of a node on SQLite's lock)


def default_cache_dir() -> Path:
    """`$CRACKIO_CACHE_DIR`, else `$XDG_CACHE_HOME/crackio`, else `~/.cache/crackio` (the XDG base directory
    rule, as pip and torch hub use it)."""
    if os.environ.get("CRACKIO_CACHE_DIR"):
        return Path(os.environ["CRACKIO_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "crackio"


class Cache:
    """A bounded LRU cache of files in `folder`, at most `limit` bytes of entries (None: no limit).

    Entry names are relative paths of plain components (`<pack>/<split>/<shard>.<chunk>`). Thread- and
    process-safe; cheap to pickle (a worker opens its own database connection).

    Raises:
        WriteError: the folder cannot be made or written (full disk, permissions), naming it.
    """

    def __init__(self, folder: str | os.PathLike, limit: int | None = None):
        self.folder = Path(folder)
        if limit is not None and limit < 0:
            raise ConfigError(f"cache limit must be a number of bytes >= 0, got {limit}")
        self.limit = limit
        try:
            (self.folder / LOCKS).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(
                self.folder, e, "the cache folder; choose another (RemoteSettings(cache_dir=...))"
            ) from None
        self._local = threading.local()
        self._touched: dict[str, float] = {}
        with self._transaction() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS entries (name TEXT PRIMARY KEY, size INTEGER, used REAL, sha256 TEXT)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS by_use ON entries (used)")
            columns = [row[1] for row in db.execute("PRAGMA table_info(entries)")]
        if columns != ["name", "size", "used", "sha256"]:
            raise ConfigError(
                f"{self.folder / DATABASE} is not a crackio cache database (its entries have columns {columns}): "
                f"delete the folder {self.folder} (it holds only downloads) or choose another "
                "(RemoteSettings(cache_dir=...))"
            )
        if limit is not None:  # a lower limit than the last run's holds from the start, not from the next download
            with self._transaction() as db:
                self._evict(db, 0, "")

    def _evict(self, db: sqlite3.Connection, room: int, keep: str) -> None:
        """Inside a write transaction: remove least recently used entries (never `keep`) until `room` more bytes
        fit within the limit."""
        assert self.limit is not None
        (used,) = db.execute("SELECT COALESCE(SUM(size), 0) FROM entries WHERE name != ?", (keep,)).fetchone()
        excess = used + room - self.limit
        if excess <= 0:
            return
        evicted, freed = [], 0
        for old, size in db.execute("SELECT name, size FROM entries ORDER BY used"):
            if old == keep:
                continue
            evicted.append(old)
            freed += size
            if freed >= excess:
                break
        for old in evicted:
            (self.folder / old).unlink(missing_ok=True)  # a reader that opened it keeps its bytes
        db.executemany("DELETE FROM entries WHERE name = ?", [(old,) for old in evicted])

    def __getstate__(self):
        return {"folder": self.folder, "limit": self.limit}

    def __setstate__(self, state):
        self.folder, self.limit = state["folder"], state["limit"]
        self._local = threading.local()
        self._touched = {}

    def __repr__(self) -> str:
        return f"Cache({str(self.folder)!r}, limit={self.limit})"

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None or self._local.pid != os.getpid():  # a connection never crosses a fork (SQLite's rule)
            path = self.folder / DATABASE
            try:
                db = sqlite3.connect(path, timeout=600, isolation_level=None, check_same_thread=True)
                db.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer
                db.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.Error as e:
                raise ConfigError(
                    f"the cache database {path} cannot be opened ({e}): delete the folder {self.folder} "
                    "(it holds only downloads) or choose another (RemoteSettings(cache_dir=...))"
                ) from None
            self._local.db, self._local.pid = db, os.getpid()
        return db

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: SQLite takes its write lock at BEGIN IMMEDIATE, so the sizes read inside it stay
        true until COMMIT in every process."""
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as e:
            raise ConfigError(
                f"the cache database {self.folder / DATABASE} is damaged ({e}): delete the folder {self.folder} "
                "(it holds only downloads) or choose another (RemoteSettings(cache_dir=...))"
            ) from None
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """The entry's lock stripe, exclusive: across processes (flock) and threads (each holds its own open file
        description, and flock locks conflict between descriptions)."""
        stripe = zlib.crc32(name.encode()) % STRIPES
        fd = os.open(self.folder / LOCKS / f"{stripe:02d}", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read(self, name: str, start: int = 0, length: int = -1) -> bytes | None:
        """`length` bytes (-1: to the end) from `start` of entry `name`, or None when it is not cached."""
        try:
            fd = os.open(self.folder / name, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            data = os.pread(fd, length if length >= 0 else os.fstat(fd).st_size - start, start)
        finally:
            os.close(fd)
        now = time.time()
        if now - self._touched.get(name, 0.0) > TOUCH_EVERY:
            self._touched[name] = now
            with self._transaction() as db:
                db.execute("UPDATE entries SET used = ? WHERE name = ?", (now, name))
        return data

    def fetch(self, name: str, download: Callable[[], bytes], start: int = 0, length: int = -1) -> bytes:
        """Entry `name`'s bytes [start, start + length) (length -1: to the end), downloaded with `download()` (the
        whole entry) when no process of this node has it cached. `download`'s errors propagate; nothing is kept
        then."""
        data = self.read(name, start, length)
        if data is not None:
            return data
        with self._locked(name):
            data = self.read(name, start, length)  # another process downloaded it while this one waited
            if data is not None:
                return data
            whole = download()
            self.put(name, whole)
        return whole[start:] if length < 0 else whole[start : start + length]

    def keep(self, name: str, download: Callable[[], bytes]) -> Path | bytes:
        """Entry `name`'s file, downloaded with `download()` when this node has none, or has one whose SHA-256 is
        not the one recorded when it was downloaded (a file with no per-sample checksum, such as an index, is
        checked whole); the bytes themselves when they are larger than the whole cache (nothing kept)."""
        with self._locked(name):
            path = self.folder / name
            if path.is_file():
                row = self._db().execute("SELECT sha256 FROM entries WHERE name = ?", (name,)).fetchone()
                if row is not None and row[0] == hashlib.sha256(path.read_bytes()).hexdigest():
                    self.read(name, 0, 0)  # marks it used
                    return path
                self.drop(name)  # damaged since its download: downloaded again
            data = download()
            return path if self.put(name, data, digest=True) else data

    def put(self, name: str, data: bytes, digest: bool = False) -> bool:
        """Keep `data` as entry `name`, evicting the least recently used entries to stay within the limit (with
        its SHA-256 when `digest`, for `keep`); False when it cannot fit even in an empty cache (then nothing is
        kept)."""
        if self.limit is not None and len(data) > self.limit:
            return False
        path = self.folder / name
        with self._transaction() as db:
            if self.limit is not None:
                self._evict(db, len(data), name)
            tmp = None
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except OSError as e:
                if tmp is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                raise write_error(path, e, "the cache; choose another folder (RemoteSettings(cache_dir=...))") from None
            sha = hashlib.sha256(data).hexdigest() if digest else None
            db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?)", (name, len(data), time.time(), sha))
        return True

    def drop(self, name: str) -> None:
        """Forget entry `name` (found damaged): the next `fetch` downloads it again."""
        with self._transaction() as db:
            (self.folder / name).unlink(missing_ok=True)
            db.execute("DELETE FROM entries WHERE name = ?", (name,))

    def usage(self) -> int:
        """Bytes of the cached entries."""
        (used,) = self._db().execute("SELECT COALESCE(SUM(size), 0) FROM entries").fetchone()
        return int(used)
