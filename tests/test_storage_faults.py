"""The node cache and uploads under disk and permission faults: a full disk anywhere in the cache is one line
naming the folder and the fix (never a traceback, never "damaged"); a cache whose database was lost counts the
files already there; an upload killed with SIGKILL leaves no staging copy after the next one; a store that
allows PUT but not DELETE fails the upload with one line and leaves the previous pack readable; every suggested
fix of a missing object is a command that works.

Full disks are injected: SQLite's own SQLITE_FULL through `PRAGMA max_page_count` on the cache's connections, an
SQLite error raised at BEGIN by a wrapped connection, ENOSPC from the chunk file's write. A denied DELETE is a
FaultProxy in front of moto's S3 server that answers deletes as S3 does when the policy denies them
(DeleteObjects: 200 OK with an AccessDenied error for the key; a single DELETE: 403 AccessDenied)."""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import obstore.exceptions as oe
import pytest

from crackio.errors import ConfigError, CrackioError, WriteError
from crackio.storage import cache as cache_module
from crackio.storage.cache import Cache
from crackio.storage.obstore_errors import classify
from crackio.storage.remote import Remote, RemoteError
from crackio.storage.upload import LOCK, write_pack
from tests.conftest import ROOT
from tests.test_remote import BUCKET, endpoint_of, s3, upload  # noqa: F401  (s3: moto's server, a fixture; F811 below: its uses)
from tools import servers


def is_one_line_about(error: BaseException, folder: Path) -> str:
    """The error's text, checked to be a full disk's one line: the folder and the settings that fix it."""
    text = str(error)
    assert isinstance(error, WriteError) and error.errno == errno.ENOSPC, repr(error)
    assert "\n" not in text and "damaged" not in text and "Traceback" not in text
    assert str(folder) in text and "no space left on device" in text
    assert "--cache-limit" in text and "$CRACKIO_CACHE_DIR" in text and "--cache-dir" in text
    return text


def entry_files(folder: Path) -> dict[str, int]:
    """The entries on disk, by name: every file below the folder but its database, lock files and temporaries."""
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in folder.rglob("*")
        if p.is_file() and p.parent != folder and p.parent.name not in ("locks", "tmp")
    }


def cap_databases(monkeypatch) -> None:
    """From now on, the cache's new SQLite connections cannot grow their database: SQLITE_FULL, as on a full disk."""
    real = sqlite3.connect

    def connect(*args, **kw):
        db = real(*args, **kw)
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        db.execute(f"PRAGMA max_page_count = {max(pages, 1)}")
        return db

    monkeypatch.setattr(cache_module.sqlite3, "connect", connect)


def test_a_full_disk_while_the_database_is_created_is_one_line(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    cap_databases(monkeypatch)
    with pytest.raises(CrackioError) as e:
        Cache(folder, 10 << 20)
    assert "SQLite: database or disk is full" in is_one_line_about(e.value, folder)
    assert "--cache-limit 10.0 MiB" in str(e.value)


def test_a_full_database_keeps_nothing_it_cannot_count(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    Cache(folder).put("p/train/x.0", b"a" * 100)
    cap_databases(monkeypatch)
    cache = Cache(folder)
    with pytest.raises(CrackioError) as e:
        for i in range(500):  # rows until the database needs a page more than it may have
            cache.put(f"p/train/train-000000.tar.{i}", b"b" * 100)
    is_one_line_about(e.value, folder)
    monkeypatch.undo()
    counted = Cache(folder)._db().execute("SELECT name, size FROM entries").fetchall()
    assert dict(counted) == entry_files(folder)  # the entry whose row could not be written is not on disk


class FailingAtBegin:
    """A connection whose next BEGIN IMMEDIATE raises `error` (what SQLite raised on a full disk)."""

    def __init__(self, db: sqlite3.Connection, error: sqlite3.Error):
        self.db, self.error = db, error

    def execute(self, sql: str, *args):
        if sql == "BEGIN IMMEDIATE" and self.error is not None:
            error, self.error = self.error, None
            raise error
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


def sqlite_error(text: str, name: str, code: int) -> sqlite3.OperationalError:
    error = sqlite3.OperationalError(text)
    error.sqlite_errorname, error.sqlite_errorcode = name, code  # as SQLite sets them
    return error


@pytest.mark.parametrize(
    "error",
    [
        # Measured on a 2 MiB tmpfs with a few KB left: SQLite's shared memory cannot grow (an "I/O error").
        sqlite_error("disk I/O error", "SQLITE_IOERR_SHMSIZE", 4874),
        sqlite_error("database or disk is full", "SQLITE_FULL", 13),
    ],
    ids=["shm", "full"],
)
def test_a_full_disk_at_a_transaction_is_never_called_damaged(tmp_path, monkeypatch, error):
    folder = tmp_path / "cache"
    Cache(folder)
    real = sqlite3.connect
    monkeypatch.setattr(cache_module.sqlite3, "connect", lambda *a, **kw: FailingAtBegin(real(*a, **kw), error))
    with pytest.raises(CrackioError) as e:
        Cache(folder).put("p/train/x.0", b"a")
    is_one_line_about(e.value, folder)
    assert f"(SQLite: {error})" in str(e.value)


def test_a_damaged_database_is_still_said_so(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "cache.db").write_bytes(b"not a database at all, but long enough to be read as one" * 100)
    with pytest.raises(ConfigError, match="cache database .* is damaged .* delete the folder"):
        Cache(folder)


def test_no_room_for_a_chunk_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    cache = Cache(folder, 1 << 30)
    real = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(cache_module.os, "fdopen", lambda *a, **kw: Full(real(*a, **kw)))
    with pytest.raises(CrackioError) as e:
        cache.put("p/train/train-000000.tar.0", b"x" * 1000)
    text = is_one_line_about(e.value, folder)
    assert "--cache-limit 1.0 GiB" in text
    monkeypatch.undo()
    assert entry_files(folder) == {} and not list((folder / "tmp").iterdir()) and cache.usage() == 0


@pytest.mark.parametrize("how", ["deleted", "deleted with its journal", "recreated empty"])
def test_a_lost_database_counts_the_files_already_there(tmp_path, how):
    folder = tmp_path / "cache"
    cache = Cache(folder)
    for i in range(5):
        cache.put(f"p/train/train-000000.tar.{i}", bytes(100_000))
    cache.put("p/train/index.npy", b"index", digest=True)
    del cache
    for name in ("cache.db", "cache.db-wal", "cache.db-shm") if how != "deleted" else ("cache.db",):
        (folder / name).unlink(missing_ok=True)
    if how == "recreated empty":
        sqlite3.connect(folder / "cache.db").close()
    (folder / "tmp" / "x.0.abcd1234.tmp").write_bytes(bytes(1000))  # a killed process's download
    limit = 250_000
    reopened = Cache(folder, limit)
    on_disk = entry_files(folder)
    assert reopened.usage() == sum(on_disk.values()) <= limit  # counted, and the limit holds at once
    assert not list((folder / "tmp").iterdir())
    assert "p/train/index.npy" in on_disk  # the most recently used stay
    # An entry counted without its SHA-256 (the lost database had it) is downloaded again before use.
    calls = []
    assert reopened.keep("p/train/index.npy", lambda: calls.append(1) or b"index") == folder / "p/train/index.npy"
    assert calls == [1]


def test_a_database_deleted_under_a_running_process_is_followed(tmp_path):
    folder = tmp_path / "cache"
    running = Cache(folder)
    running.put("p/train/a.0", bytes(1000))
    for name in ("cache.db", "cache.db-wal", "cache.db-shm"):
        (folder / name).unlink(missing_ok=True)
    other = Cache(folder)  # creates the database anew, counting a.0
    running.put("p/train/b.0", bytes(2000))  # the running process writes to the new database, not the lost one
    assert other.usage() == 3000 == sum(entry_files(folder).values())


def test_a_database_deleted_during_a_write_still_counts_it(tmp_path, monkeypatch):
    """The race: another process deletes the database and creates it anew (counting the folder's files) after this
    one began its write transaction on the old one, but before its file is renamed into place."""
    folder = tmp_path / "cache"
    running = Cache(folder)
    others = []
    real = running._write

    def write(path, data):
        if not others:
            for name in ("cache.db", "cache.db-wal", "cache.db-shm"):
                (folder / name).unlink(missing_ok=True)
            others.append(Cache(folder))
        real(path, data)

    monkeypatch.setattr(running, "_write", write)
    running.put("p/train/a.0", bytes(1000))
    assert others[0].usage() == 1000 == sum(entry_files(folder).values())


def test_each_obstore_delete_refusal_is_classified():
    text = (
        "Generic S3 error: DeleteObjects request failed for key p/x: Access Denied (code: AccessDenied)\n\nDebug "
        'source:\nGeneric {\n    store: "S3",\n    source: DeleteFailed {\n        path: "p/x",\n        code: '
        '"AccessDenied",\n        message: "Access Denied",\n    },\n}'
    )  # obstore 0.12.1, against moto through a proxy answering as S3 does
    failure = classify(oe.GenericError(text))
    assert (failure.transient, failure.status, failure.kind) == (False, 403, "denied")
    assert failure.text == "403 access denied"
    busy = classify(oe.GenericError(text.replace("Access Denied (code: AccessDenied)", "Busy (code: SlowDown)")))
    assert busy.transient


def test_every_fix_for_a_missing_or_short_object_is_a_command_that_works():
    def fail(error: BaseException):
        def request():
            raise error

        return request

    store = Remote("s3://bucket/pack")
    with pytest.raises(RemoteError) as e:
        store.call("train/index.npy", "reading", fail(FileNotFoundError("Object at location x not found")))
    assert "`python tools/pack.py SRC --out s3://bucket/pack`" in str(e.value)
    no_bucket = "Object at location x not found: ... 404 Not Found: <Error><Code>NoSuchBucket</Code></Error>"
    with pytest.raises(RemoteError) as e:  # no upload creates a bucket: no command is suggested
        store.call("manifest.json", "reading", fail(FileNotFoundError(no_bucket)))
    assert "--out" not in str(e.value) and str(e.value).endswith("for a store other than AWS)")
    http = Remote("http://127.0.0.1:9/pack")
    for error in (
        FileNotFoundError("Object at location x not found"),
        oe.GenericError("Server returned non-2xx status code: 416 Range Not Satisfiable"),
    ):
        with pytest.raises(RemoteError) as e:
            http.call("train/train-000000.tar", "reading", fail(error))
        assert "upload" not in str(e.value) and "--out" not in str(e.value)  # an http(s):// pack is not written to
        assert "copy the whole pack folder" in str(e.value)
    with pytest.raises(ConfigError, match="read-only"):
        http.delete("manifest.json")


# Uploads


class DenyingProxy(servers.FaultProxy):
    """A FaultProxy that refuses deletes of the keys `denied` matches (a regular expression on the key), as S3
    does when the policy denies them; every other request is forwarded. `puts` counts the PUTs forwarded."""

    def __init__(self, target: str, denied: str):
        super().__init__(target)
        self.denied, self.puts = re.compile(denied), 0
        base = self.server.RequestHandlerClass
        proxy = self

        class Handler(base):  # type: ignore[valid-type,misc]
            def _answer(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):  # DeleteObjects (obstore's delete): 200 OK, an error per refused key
                if "delete" in self.path.partition("?")[2]:
                    body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                    keys = re.findall(rb"<Key>(.*?)</Key>", body)
                    if any(proxy.denied.search(k.decode()) for k in keys):
                        refused = (
                            b"<Error><Key>%s</Key><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
                        )
                        errors = b"".join(refused % k for k in keys)
                        self._answer(200, b"<?xml version='1.0'?><DeleteResult>%s</DeleteResult>" % errors)
                        return
                    self.headers.replace_header("Content-Length", str(len(body)))
                    self.rfile = io.BytesIO(body)
                base.do_POST(self)

            def do_DELETE(self):  # a single DELETE: 403
                if proxy.denied.search(self.path.partition("?")[0]):
                    self._answer(403, b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>")
                    return
                base.do_DELETE(self)

            def do_PUT(self):
                proxy.puts += 1
                base.do_PUT(self)

        self.server.RequestHandlerClass = Handler


@pytest.fixture
def staging_tmp(tmp_path, monkeypatch) -> Path:
    """This test's $TMPDIR, where uploads stage their packs."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(folder))
    return folder


def files_in(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if not p.is_dir()]


def copier(shards: Path):
    """A `write` for write_pack: the pack in `shards`, copied into the staging folder."""
    return lambda staging: shutil.copytree(shards, staging, dirs_exist_ok=True)


def test_a_killed_upload_leaves_no_staging_after_the_next(demo_shards, s3, staging_tmp):  # noqa: F811
    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
    script = (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from crackio.storage.upload import write_pack;"
        "write_pack(sys.argv[2], lambda s: ((s / 'train').mkdir(), (s / 'train' / 'x.tar').write_bytes(bytes(9999)),"
        " print(s, flush=True), time.sleep(120)))"
    )
    env = {**os.environ, "TMPDIR": str(staging_tmp)}
    cmd = [sys.executable, "-c", script, str(ROOT), url]
    killed = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    try:
        staging = Path(killed.stdout.readline().strip())  # type: ignore[union-attr]
        assert (staging / "train" / "x.tar").is_file()
        # Another upload while that one runs leaves its staging alone.
        write_pack(f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}", copier(demo_shards), timeout=5)
        assert (staging / "train" / "x.tar").is_file()
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
    assert staging.is_dir()
    # The next upload, even one refused for the killed one's lock, removes it.
    with pytest.raises(ConfigError, match="another pack is being written"):
        write_pack(url, copier(demo_shards), timeout=5)
    assert files_in(staging_tmp) == []
    Remote(url).delete(LOCK)
    write_pack(url, copier(demo_shards), timeout=5)
    assert files_in(staging_tmp) == [] and not Remote(url).exists(LOCK)


def test_an_upload_where_delete_is_denied_is_refused_before_anything_changes(demo_shards, s3, staging_tmp):  # noqa: F811
    url = upload(demo_shards)
    before = Remote(url).get("manifest.json")[0]
    with DenyingProxy(s3, ".") as proxy:
        with endpoint_of(proxy.url):
            with pytest.raises(RemoteError) as e:
                write_pack(url, copier(demo_shards), timeout=5)
    text = str(e.value)
    assert "\n" not in text and "403 access denied" in text and "may not delete objects under" in text
    assert "s3:DeleteObject" in text and f"nothing was written to {url}" in text
    assert proxy.puts == 0  # no lock, no shard
    assert Remote(url).get("manifest.json")[0] == before and not Remote(url).exists(LOCK)
    assert files_in(staging_tmp) == []


def test_pack_with_delete_denied_exits_2_with_one_line(demo_src, s3, staging_tmp, capsys):  # noqa: F811
    from tools.pack import main

    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
    with DenyingProxy(s3, ".") as proxy:
        with endpoint_of(proxy.url):
            code = main([str(demo_src), "--out", url, "--quiet"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: a trial DELETE"), err
    assert "uploaded" not in err and proxy.puts == 0


@pytest.mark.parametrize(
    "denied, words",
    [
        (r"manifest\.json$", "nothing was uploaded, so {url} holds what it held before"),
        (r"-000099\.tar$", "the new pack at {url} is complete and readable all the same, but 1 file of an earlier"),
        (r"\.crackio\.lock$", "so the writer's lock {url}/.crackio.lock is left"),
    ],
    ids=["old-manifest", "stale-tar", "lock"],
)
def test_a_delete_refused_mid_upload_fails_it_and_says_what_holds(demo_shards, s3, staging_tmp, denied, words, capsys):  # noqa: F811
    url = upload(demo_shards)
    Remote(url).put("train/train-000099.tar", b"an earlier pack's shard")
    before = Remote(url).get("manifest.json")[0]
    with DenyingProxy(s3, denied) as proxy:
        with endpoint_of(proxy.url):
            with pytest.raises(RemoteError) as e:
                write_pack(url, copier(demo_shards), timeout=5)
    text = str(e.value)
    assert "\n" not in text and words.format(url=url) in text and "403 access denied" in text
    assert "uploaded" not in capsys.readouterr().err
    assert Remote(url).get("manifest.json")[0] == before  # the previous pack, or the same pack uploaded again
    assert files_in(staging_tmp) == []
    if denied.startswith("manifest"):
        assert proxy.puts == 1 and not Remote(url).exists(LOCK)  # the lock only: not one shard replaced
    if "lock" in denied:
        assert "`aws s3 rm " + url + "/.crackio.lock`" in text
        Remote(url).delete(LOCK)
