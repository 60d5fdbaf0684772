"""The local cache of a remote pack: downloaded files and byte ranges, bounded, least recently used first out.

One folder, shared by every process of a node (the ranks of a torchrun, a sweep's runs, the next run): entries
are files under it, their sizes and last use are rows of one SQLite table (`cache.db`; SQLite's own file locking
makes its transactions safe across processes, which is why it is used instead of a hand-made index). Rules:

- One download per entry: a process holds an exclusive `flock` on the entry's lock stripe while it downloads, so
  the other ranks wait for that download and then read the file.
- The limit holds at every moment: an entry is admitted, older entries evicted and its file renamed into place
  inside one write transaction, so no two processes can both count on the same free space. An entry larger than
  what eviction can free is handed back without being kept (streaming).
- No torn file: a temporary in `tmp/`, then a rename. Not fsynced (unlike the durability rule of
  `crackio.fsio`): every sample read from an entry is checked against its CRC32 before a decoder sees it, and a
  damaged entry is dropped and downloaded again (`drop`), so a power cut costs a download, not a wrong sample.
  Writes are serialized by the write transaction, so a temporary found while holding it is a killed process's:
  every open of the cache removes them.
- No file uncounted: a database created anew (never made, deleted, or lost with its folder's other files kept)
  counts the entry files already in the folder, in the transaction that creates its table (under a `flock`
  that every process opening the database takes, so exactly one process does it); a process whose database was
  deleted under it reconnects at its next write. The limit then holds from that open on.
- Faults are one line (`WriteError`, `ConfigError` for a damaged database), never a traceback: a full disk or
  quota (ENOSPC, EDQUOT, SQLite's SQLITE_FULL, or its I/O error while growing its shared memory on a full disk)
  names the folder, its free space and limit, and what to lower or move (`--cache-limit`, `--cache-dir`,
  `$CRACKIO_CACHE_DIR`); a folder this user may not write names its permissions.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import getpass
import hashlib
import os
import sqlite3
import stat
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from crackio.errors import ConfigError, CrackioError, WriteError
from crackio.fsio import write_error

DATABASE = "cache.db"
LOCKS = "locks"
TEMPORARIES = "tmp"  # downloads being written: renamed into place, or a killed process's (removed at open)
OPENING = "open"  # the lock file (in LOCKS) held while a process opens the database: one creates it at a time
FULL = (errno.ENOSPC, errno.EDQUOT)
DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
TABLE_EXISTS = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'entries'"
NEARLY_FULL = 1 << 20  # bytes free: an SQLite I/O error with less room than this is the disk being full
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


def _size(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n // 2**10} KiB"


class Cache:
    """A bounded LRU cache of files in `folder`, at most `limit` bytes of entries (None: no limit).

    Entry names are relative paths of plain components (`<pack>/<split>/<shard>.<chunk>`). Thread- and
    process-safe; cheap to pickle (a worker opens its own database connection).

    Raises:
        WriteError: the folder or its database cannot be made or written (full disk, quota, permissions), naming
            the folder and the fix; from every method too.
        ConfigError: the database is damaged or not a crackio cache's.
    """

    def __init__(self, folder: str | os.PathLike, limit: int | None = None):
        self.folder = Path(folder)
        if limit is not None and limit < 0:
            raise ConfigError(f"cache limit must be a number of bytes >= 0, got {limit}")
        self.limit = limit
        self._local = threading.local()
        self._touched: dict[str, float] = {}
        try:
            (self.folder / LOCKS).mkdir(parents=True, exist_ok=True)
            (self.folder / TEMPORARIES).mkdir(exist_ok=True)
        except OSError as e:
            raise self._fault(e, self.folder) from None
        with self._transaction() as db:  # no write is under way: every temporary is a killed process's
            for leftover in os.listdir(self.folder / TEMPORARIES):
                (self.folder / TEMPORARIES / leftover).unlink(missing_ok=True)
            if limit is not None:  # a lower limit than the last run's holds from the start, not the next download
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

    def _fault(self, error: OSError | sqlite3.Error, path: Path | None = None, doing: str = "writing") -> CrackioError:
        """One line for an error of the file system or of SQLite met at `path` (None: the OSError's file, else the
        database): a full disk or quota, a folder this user may not write, a damaged database, or another I/O
        error, each with what to do."""
        database = self.folder / DATABASE
        if path is None:
            path = Path(error.filename) if isinstance(error, OSError) and error.filename else database
        where = f"{doing} {path}" + ("" if path == self.folder else f" in the cache {self.folder}")
        if isinstance(error, OSError):
            what, number = (os.strerror(error.errno) if error.errno else str(error)).lower(), error.errno
        else:
            number = None
            code = getattr(error, "sqlite_errorcode", None)
            primary, name = (code & 0xFF if code is not None else None), getattr(error, "sqlite_errorname", "")
            what = f"the cache database: {error}"
            if primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                return ConfigError(
                    f"the cache database {database} is damaged ({error}): delete the folder {self.folder} (it holds "
                    "only downloads) or choose another (--cache-dir, $CRACKIO_CACHE_DIR; RemoteSettings(cache_dir=...))"
                )
            free, no_inode = self._free()
            full = primary == sqlite3.SQLITE_FULL or name == "SQLITE_IOERR_SHMSIZE" or "disk is full" in str(error)
            failed = primary in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN)  # full, or not: the room tells
            if full or (failed and (free < NEARLY_FULL or no_inode)):
                number, what = errno.ENOSPC, f"no space left on device (SQLite: {error})"
            elif primary in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM, sqlite3.SQLITE_CANTOPEN):
                number = errno.EACCES
        if number in FULL:
            free, no_inode = self._free()
            limit = "no --cache-limit" if self.limit is None else f"--cache-limit {_size(self.limit)}"
            room = f"{_size(free)} free there" + (" but no inode left" if no_inode else "")
            return WriteError(
                f"{what} while {where} ({room}, {limit}): set a --cache-limit the disk can hold "
                "(or $CRACKIO_CACHE_LIMIT; RemoteSettings(cache_limit=...)), free space on that disk (the cache "
                "holds only downloads: deleting its folder is safe when no run uses it), or put the cache on a disk "
                "with room (--cache-dir, $CRACKIO_CACHE_DIR; RemoteSettings(cache_dir=...)), then re-run",
                number,
            )
        if number in DENIED:
            return WriteError(
                f"{what} while {where}: make {self.folder} and everything in it writable for this user "
                f"({_user()}), or use a cache folder of your own (--cache-dir, $CRACKIO_CACHE_DIR; "
                "RemoteSettings(cache_dir=...)), then re-run",
                number,
            )
        if isinstance(error, OSError):
            return write_error(path, error, f"the cache {self.folder}; --cache-dir or $CRACKIO_CACHE_DIR moves it")
        return WriteError(
            f"{what} while {where}: check that disk, or put the cache elsewhere (--cache-dir, $CRACKIO_CACHE_DIR; "
            "RemoteSettings(cache_dir=...)), then re-run"
        )

    def _free(self) -> tuple[int, bool]:
        """(bytes free to this user on the cache's disk, whether it has no inode left); (0, False) when unknown."""
        try:
            fs = os.statvfs(self.folder)
        except OSError:
            return 0, False
        return fs.f_bavail * fs.f_frsize, fs.f_files > 0 and fs.f_favail == 0

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None or self._local.pid != os.getpid():  # a connection never crosses a fork (SQLite's rule)
            self._local.db, self._local.identity = self._connect()
            self._local.pid = os.getpid()
            db = self._local.db
        return db

    def _connect(self) -> tuple[sqlite3.Connection, tuple[int, int]]:
        """A new connection to the database, and the database file's identity (device, inode) when it was made.
        The database is created here when missing, under the `OPENING` lock: stale journal files of a deleted
        database are removed first, and the table is created with the entry files already in the folder."""
        path = self.folder / DATABASE
        with self._locked_file(OPENING):
            try:
                if not path.exists():  # never made, or deleted: its -wal and -shm are no journal of a new one
                    for journal in ("-wal", "-shm"):
                        (self.folder / (DATABASE + journal)).unlink(missing_ok=True)
                db = sqlite3.connect(path, timeout=600, isolation_level=None, check_same_thread=True)
                try:
                    db.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer
                    db.execute("PRAGMA synchronous=NORMAL")
                    info = os.stat(path)
                    if not db.execute(TABLE_EXISTS).fetchone():
                        self._create(db)
                    columns = [row[1] for row in db.execute("PRAGMA table_info(entries)")]
                except BaseException:
                    db.close()
                    raise
            except (OSError, sqlite3.Error) as e:
                raise self._fault(e, path if isinstance(e, sqlite3.Error) else None) from None
        if columns != ["name", "size", "used", "sha256"]:
            db.close()
            raise ConfigError(
                f"{path} is not a crackio cache database (its entries have columns {columns}): delete the folder "
                f"{self.folder} (it holds only downloads) or choose another (--cache-dir, $CRACKIO_CACHE_DIR; "
                "RemoteSettings(cache_dir=...))"
            )
        return db, (info.st_dev, info.st_ino)

    def _create(self, db: sqlite3.Connection) -> None:
        """The table, created with a row for every entry file already in the folder (an earlier database's, lost):
        its size, its modification time as its last use, no SHA-256 (so `keep` downloads it again), all in one
        transaction: another process sees no table, or the table with every file counted."""
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "CREATE TABLE IF NOT EXISTS entries (name TEXT PRIMARY KEY, size INTEGER, used REAL, sha256 TEXT)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS by_use ON entries (used)")
            db.executemany("INSERT OR IGNORE INTO entries VALUES (?, ?, ?, NULL)", self._entry_files())
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def _entry_files(self) -> Iterator[tuple[str, int, float]]:
        """(name, size, modification time) of every regular file below the folder's subfolders, except the lock
        files and temporaries, which are removed (files directly in the folder are the database's)."""
        for top, folders, files in os.walk(self.folder):
            if top == str(self.folder):
                folders[:] = [f for f in folders if f not in (LOCKS, TEMPORARIES)]
                continue
            for name in files:
                full = os.path.join(top, name)
                try:
                    info = os.lstat(full)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(info.st_mode):
                    continue
                if name.endswith(".tmp"):  # an earlier crackio's temporary, written beside its entry: no entry
                    with contextlib.suppress(OSError):
                        os.unlink(full)
                    continue
                yield os.path.relpath(full, self.folder), info.st_size, info.st_mtime

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: SQLite takes its write lock at BEGIN IMMEDIATE, so the sizes read inside it stay
        true until COMMIT in every process. A file-system or SQLite error inside it rolls it back and is raised
        as one line (`_fault`)."""
        path = self.folder / DATABASE
        db = self._db()
        if not self._current():  # deleted (and perhaps made anew by another process) since this connection opened
            # it: what is written to the lost one would count for nobody, so the one at the path is opened (or made)
            db.close()
            self._local.db = None
            db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise self._fault(e, path) from None
        try:
            yield db
            db.execute("COMMIT")
        except BaseException as e:
            with contextlib.suppress(sqlite3.Error):  # a failed COMMIT may have rolled back already
                db.execute("ROLLBACK")
            if isinstance(e, OSError | sqlite3.Error):
                raise self._fault(e, path if isinstance(e, sqlite3.Error) else None) from None
            raise

    def _current(self) -> bool:
        """Whether this thread's connection is to the database file now at its path (not one deleted since)."""
        try:
            info = os.stat(self.folder / DATABASE)
        except OSError:
            return False
        return (info.st_dev, info.st_ino) == self._local.identity

    @contextlib.contextmanager
    def _locked_file(self, name: str) -> Iterator[None]:
        """Lock file `name` (in LOCKS), exclusive: across processes (flock) and threads (each holds its own open
        file description, and flock locks conflict between descriptions)."""
        try:
            fd = os.open(self.folder / LOCKS / name, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise self._fault(e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _locked(self, name: str) -> contextlib.AbstractContextManager[None]:
        """The entry's lock stripe (`_locked_file`)."""
        return self._locked_file(f"{zlib.crc32(name.encode()) % STRIPES:02d}")

    def read(self, name: str, start: int = 0, length: int = -1) -> bytes | None:
        """`length` bytes (-1: to the end) from `start` of entry `name`, or None when it is not cached."""
        try:
            fd = os.open(self.folder / name, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._fault(e, doing="reading") from None
        try:
            data = os.pread(fd, length if length >= 0 else os.fstat(fd).st_size - start, start)
        except OSError as e:
            raise self._fault(e, self.folder / name, "reading") from None
        finally:
            os.close(fd)
        now = time.time()
        if now - self._touched.get(name, 0.0) > TOUCH_EVERY:
            self._touched[name] = now
            try:
                with self._transaction() as db:
                    db.execute("UPDATE entries SET used = ? WHERE name = ?", (now, name))
            except WriteError as e:  # a full disk: a hit needs no room, only its LRU order is a little older
                if e.errno not in FULL:
                    raise
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
                try:
                    row = self._db().execute("SELECT sha256 FROM entries WHERE name = ?", (name,)).fetchone()
                    same = row is not None and row[0] == hashlib.sha256(path.read_bytes()).hexdigest()
                except (OSError, sqlite3.Error) as e:
                    raise self._fault(e, path if isinstance(e, OSError) else None, "reading") from None
                if same:
                    self.read(name, 0, 0)  # marks it used
                    return path
                self.drop(name)  # damaged since its download, or counted without its SHA-256: downloaded again
            data = download()
            return path if self.put(name, data, digest=True) else data

    def put(self, name: str, data: bytes, digest: bool = False) -> bool:
        """Keep `data` as entry `name`, evicting the least recently used entries to stay within the limit (with
        its SHA-256 when `digest`, for `keep`); False when it cannot fit even in an empty cache (then nothing is
        kept). A write that fails (a full disk) keeps nothing: the file is counted in the same transaction that
        renames it into place, and removed when that transaction cannot commit."""
        if self.limit is not None and len(data) > self.limit:
            return False
        path = self.folder / name
        for attempt in range(3):
            placed = False
            try:
                with self._transaction() as db:
                    if self.limit is not None:
                        self._evict(db, len(data), name)
                    self._write(path, data)
                    placed = True
                    # The database deleted since this transaction began: the file is counted by the new one only if
                    # it was renamed before that one's creation scanned the folder, so it is written again there.
                    if attempt < 2 and not self._current():
                        raise _Lost
                    sha = hashlib.sha256(data).hexdigest() if digest else None
                    row = (name, len(data), time.time(), sha)
                    db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?)", row)
                return True
            except BaseException as e:
                if placed:
                    with contextlib.suppress(OSError):
                        path.unlink()
                if not isinstance(e, _Lost):
                    raise
        return True  # not reached: the last attempt does not check

    def _write(self, path: Path, data: bytes) -> None:
        """`data` as `path`: written in TEMPORARIES, then renamed into place (never a torn file)."""
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            (self.folder / TEMPORARIES).mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder / TEMPORARIES, prefix=path.name + ".", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise self._fault(e, path) from None

    def drop(self, name: str) -> None:
        """Forget entry `name` (found damaged): the next `fetch` downloads it again."""
        with self._transaction() as db:
            (self.folder / name).unlink(missing_ok=True)
            db.execute("DELETE FROM entries WHERE name = ?", (name,))

    def usage(self) -> int:
        """Bytes of the cached entries."""
        try:
            (used,) = self._db().execute("SELECT COALESCE(SUM(size), 0) FROM entries").fetchone()
        except sqlite3.Error as e:
            raise self._fault(e, doing="reading") from None
        return int(used)


class _Lost(Exception):
    """The database was deleted under a write transaction: written again to the one at the path."""


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"
