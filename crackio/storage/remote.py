"""A pack's objects on object storage (S3 and S3-compatible, Google Cloud Storage, Azure Blob Storage) or an HTTP(S)
server: ranged GETs, uploads, and the fault policy.

The protocol is obstore's (the Rust `object_store` crate behind it), each store configured by its ecosystem's
standard variables: S3 (`s3://bucket/prefix`) by `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
`AWS_REGION`, `AWS_ENDPOINT_URL`, ..., so MinIO, R2 and Ceph work unchanged; GCS (`gs://bucket/prefix`) by
`GOOGLE_APPLICATION_CREDENTIALS`, `GOOGLE_SERVICE_ACCOUNT`, `GOOGLE_SERVICE_ACCOUNT_KEY`, ...; Azure
(`az://container/prefix`) by `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_SAS_KEY`,
`AZURE_CLIENT_ID`, ... (`AZURE_STORAGE_USE_EMULATOR=true` with `AZURITE_BLOB_STORAGE_URL` for Azurite); HTTP(S)
with Range requests (read only). Measured against
fsspec + s3fs on the same local S3 server (docs/performance.md, "Remote shards"): obstore's ranged reads were faster.

Fault policy (one place, here): obstore's own retries are off so that every retry is counted (`Stats`). A
transient error (connection refused or reset, a timeout, 5xx, 429 throttling) is retried with exponential backoff
and jitter until `timeout` seconds have passed since the first try; then `Unreachable`. A permanent one (401, 403,
404, another 4xx) raises `RemoteError` at once. Both are one line naming the URL, what happened and what to do.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from crackio.errors import ConfigError, CrackioError, given
from crackio.format.layout import ShardError
from crackio.format.manifest import pack_file_text
from crackio.storage.obstore_errors import already_exists, classify

STORES = ("s3", "gs", "az")  # object stores crackio reads and writes (tools/pack.py --out)
SCHEMES = (*STORES, "http", "https")
URL_FORMS = "s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, az://CONTAINER/PREFIX, http(s)://HOST/PATH"
T = TypeVar("T")


def is_remote(location: object) -> bool:
    """Whether `location` (a --shards or --out value) names object storage or an HTTP(S) server."""
    return isinstance(location, str) and urlsplit(location).scheme.lower() in SCHEMES and "://" in location


def check_location(text: object, option: str = "shards") -> None:
    """Refuse a URL of a scheme crackio does not read (s3a://, abfs://, ...), which would otherwise become a local
    folder named `s3a:`; `option` names the argument (or a command line's flag, "--shards") in the message.

    Raises:
        ConfigError: naming the schemes that work.
    """
    if isinstance(text, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text) and not is_remote(text):
        scheme = text.split("://", 1)[0]
        named = given(option, text) if option else text
        raise ConfigError(
            f"{named}: {scheme}:// is not read by crackio; give s3://BUCKET/PREFIX (S3 and S3-compatible stores: "
            "MinIO, R2, Ceph), gs://BUCKET/PREFIX (Google Cloud Storage), az://CONTAINER/PREFIX (Azure Blob "
            "Storage), http(s)://HOST/PATH, or a folder"
        )


def location(text: str) -> str | Path:
    """A --shards or --out value: a URL as given, anything else a local path (argparse's `type=`).

    Raises:
        argparse.ArgumentTypeError: a URL of a scheme crackio does not read.
    """
    import argparse

    try:
        check_location(text, "")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).strip()) from None
    return text if is_remote(text) else Path(text)


class RemoteError(ShardError):
    """A permanent remote failure (access denied, a missing or changed object): retrying cannot help."""


class Missing(RemoteError):
    """No object under that key (a 404 for the object, not for the bucket)."""


class Unreachable(RemoteError):
    """The server did not answer within the retry deadline (down, unreachable, or failing every request)."""


_used_in = 0  # the process that started obstore's runtime (its threads live there only)
_forked_after_use = False


def _after_fork() -> None:
    global _forked_after_use
    STATS.lock = threading.Lock()  # a lock another thread held at fork time would never be released in the child
    _forked_after_use = _used_in != 0


def _check_not_forked() -> None:
    """obstore's runtime (tokio) runs on threads that fork does not copy: in a child forked after the parent read
    a remote pack, every request would wait forever (measured with obstore 0.12.1). Said instead.

    Raises:
        ConfigError: naming the fix.
    """
    if _forked_after_use:
        raise ConfigError(
            "this process was forked from one that had already read a remote pack, and the S3/HTTP client "
            "(obstore) cannot run after a fork: start the workers with multiprocessing's 'spawn' or 'forkserver' "
            "method (multiprocessing.set_start_method('spawn')), or fork before the first remote read"
        )


@dataclass
class Stats:
    """Requests, bytes and retries of this process's remote reads (thread-safe counters)."""

    requests: int = 0
    bytes: int = 0
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, requests: int = 0, nbytes: int = 0, retries: int = 0) -> None:
        with self.lock:
            self.requests += requests
            self.bytes += nbytes
            self.retries += retries

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {"requests": self.requests, "bytes": self.bytes, "retries": self.retries}


STATS = Stats()  # per process: what the bench and the trainer's epoch line report
os.register_at_fork(after_in_child=_after_fork)


FIXES = {  # by scheme and status: what to do about a permanent error ({url}: the pack's URL). Object stores are
    # written by crackio (tools/pack.py --out): an http(s):// pack is a folder copied to a web server.
    ("s3", 401): "the server wants credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)",
    ("s3", 403): "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL and the bucket's policy",
    ("gs", 401): "GCS wants credentials: set GOOGLE_APPLICATION_CREDENTIALS (or GOOGLE_SERVICE_ACCOUNT_KEY)",
    ("gs", 403): "check the credentials (GOOGLE_APPLICATION_CREDENTIALS) and the bucket's IAM permissions",
    ("az", 401): "Azure wants credentials: set AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY (or a SAS)",
    ("az", 403): (
        "check AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_SAS_KEY) and the container's "
        "access policy"
    ),
    **{
        (s, 404): "check the URL, or upload the whole pack again with `python tools/pack.py SRC --out {url}`"
        for s in STORES
    },
    ("http", 401): "the server wants a login, which crackio does not send: serve the pack folder without one",
    ("http", 403): "the server refuses the file: make the pack folder readable to it, or check the URL",
    ("http", 404): (
        "check the URL (it must name the folder that holds manifest.json), or copy the whole pack folder that "
        "tools/pack.py wrote to the server again"
    ),
    **{
        (s, 416): (
            "the object is shorter than its manifest says: it changed since the pack was written; upload the whole "
            "pack again with `python tools/pack.py SRC --out {url}`"
        )
        for s in STORES
    },
    ("http", 416): (
        "the file is shorter than its manifest says: it changed since the pack was written; copy the whole pack "
        "folder to the server again"
    ),
}
# A DELETE refused where PUT is allowed: an upload cannot replace a pack without deleting (its old manifest first).
ENDPOINTS = {  # where each store's address comes from: what to check when it does not answer
    "s3": "AWS_ENDPOINT_URL, and whether its scheme is the server's: http or https",
    "gs": "the endpoint GOOGLE_SERVICE_ACCOUNT's gcs_base_url names, if any",
    "az": "AZURE_STORAGE_ACCOUNT_NAME, or AZURITE_BLOB_STORAGE_URL with AZURE_STORAGE_USE_EMULATOR",
    "http": "whether the URL's scheme is the server's: http or https",
    "https": "whether the URL's scheme is the server's: http or https",
}
CONTAINER = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}$")  # Azure's rule for container names
CONFIGURE = {  # how each store is configured: its ecosystem's variables
    "s3": "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_REGION and (for a store other than AWS) AWS_ENDPOINT_URL",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS (or GOOGLE_SERVICE_ACCOUNT / GOOGLE_SERVICE_ACCOUNT_KEY)",
    "az": (
        "set AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_SAS_KEY, or "
        "AZURE_STORAGE_USE_EMULATOR=true for Azurite)"
    ),
    "http": "check the URL",
    "https": "check the URL",
}
DELETE_DENIED = (
    "these credentials (if any were found: {configure}) may not delete objects under {url}, which replacing a "
    "pack there needs (its old manifest, the writer's lock, an earlier pack's files): allow deleting on that "
    "prefix (S3: s3:DeleteObject; GCS: storage.objects.delete; Azure: the Delete permission), or upload to a "
    "prefix where it is allowed"
)


class Remote:
    """The objects under one URL (`s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix` or
    `http(s)://host/path`), read and written by key (`train/train-000000.tar`); an http(s) server is read only.
    Picklable: each process opens its own client on first use.

    `timeout`: seconds a request may keep failing transiently before `Unreachable` (the bound on how long a
    vanished server can hold a run).
    """

    def __init__(self, url: str, timeout: float = 60.0):
        if not is_remote(url):
            raise ConfigError(f"{url!r} is not a URL crackio reads: {URL_FORMS}")
        parts = urlsplit(url)
        if not parts.hostname:
            raise ConfigError(f"{url} names no bucket, container or host: write {URL_FORMS}")
        if parts.scheme.lower() == "az" and not CONTAINER.match(parts.netloc):
            raise ConfigError(
                f"{url}: {parts.netloc!r} is not an Azure container name (3-63 lowercase letters, digits and single "
                "hyphens, starting and ending with a letter or digit): write az://CONTAINER/PREFIX"
            )
        if parts.query or parts.fragment:
            raise ConfigError(f"{url} has a query or fragment: give the pack's folder URL without ?... or #...")
        if parts.username or parts.password:
            host = f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname
            raise ConfigError(
                f"{parts.scheme}://{host}/...: credentials in the URL are neither sent nor safe (the URL is "
                "saved in config.json and checkpoints and printed in messages); serve the pack without them, or "
                "put it in an object store and give its credentials in its variables (AWS_*, GOOGLE_*, AZURE_*)"
            )
        if parts.path.rstrip("/").endswith("/manifest.json"):
            raise ConfigError(pack_file_text(url, url.rstrip("/").rsplit("/", 1)[0]))
        if "//" in parts.path or parts.path.rstrip("/").endswith(("/.", "/..")) or "/../" in parts.path:
            raise ConfigError(f"{url}: its path has an empty, '.' or '..' part; write the prefix as it is stored")
        self.url = url.rstrip("/")
        self.scheme = parts.scheme.lower()
        self.timeout = float(timeout)
        self._store: Any = None
        self._pid = os.getpid()

    def __getstate__(self):
        return {"url": self.url, "scheme": self.scheme, "timeout": self.timeout, "_store": None, "_pid": 0}

    def __repr__(self) -> str:
        return f"Remote({self.url!r})"

    def address(self, key: str) -> str:
        return f"{self.url}/{key}"

    @property
    def store(self) -> Any:
        global _used_in
        _check_not_forked()
        if self._store is None or self._pid != os.getpid():  # a child of a fork before any use opens its own
            self._pid = _used_in = os.getpid()
            from obstore.store import AzureStore, GCSStore, HTTPStore, S3Store

            request = max(5.0, min(30.0, self.timeout / 2))
            client: Any = {"allow_http": True, "timeout": timedelta(seconds=request), "connect_timeout": "5s"}
            retry: Any = {"max_retries": 0, "retry_timeout": timedelta(seconds=request)}  # retries are ours: counted
            kind: Any = {"s3": S3Store, "gs": GCSStore, "az": AzureStore}.get(self.scheme, HTTPStore)
            try:  # each reads its ecosystem's variables (AWS_*, GOOGLE_*, AZURE_*) itself
                self._store = kind.from_url(self.url, client_options=client, retry_config=retry)
            except Exception as e:  # noqa: BLE001 - obstore's configuration errors: one line, with the variables
                raise ConfigError(f"{self.url}: {str(e).splitlines()[0][:300]}: {CONFIGURE[self.scheme]}") from None
        return self._store

    def call(self, key: str, what: str, request: Callable[[], T], fixes: dict[int, str] | None = None) -> T:
        """`request()` under the fault policy (module docstring); `what` names the operation in messages, `fixes`
        (by HTTP status) replace the scheme's (FIXES) for it.

        Raises:
            RemoteError: a permanent failure, naming the object's URL and the fix.
            Unreachable: transient failures for `timeout` seconds.
        """
        _check_not_forked()
        first = time.monotonic()
        delay = 0.2
        tries = 0
        while True:
            tries += 1
            try:
                result = request()
                STATS.add(requests=1)
                return result
            except FileExistsError:  # a conditional PUT that lost: the caller's answer, not a fault
                STATS.add(requests=1)
                raise
            except CrackioError:  # crackio's own verdict from inside the request: not the network's
                raise
            except Exception as e:
                STATS.add(requests=1)
                failure = classify(e)
                text, url = failure.text, self.address(key)
                if not failure.transient:
                    scheme = self.scheme if self.scheme in STORES else "http"
                    fix = (fixes or {}).get(failure.status or 0) or FIXES.get(
                        (scheme, failure.status or 0), "check the URL and the server"
                    )
                    # Their text says what to do: a server without ranges, a bucket that does not exist (which no
                    # upload creates)
                    configure = CONFIGURE.get(self.scheme, "")
                    fix = (
                        ""
                        if failure.kind in ("no-ranges", "no-bucket")
                        else fix.format(url=self.url, configure=configure)
                    )
                    error = Missing if failure.kind == "missing" else RemoteError
                    raise error(f"{what} {url} failed: {text}" + (f": {fix}" if fix else "")) from None
                left = self.timeout - (time.monotonic() - first)
                if left <= 0:
                    raise Unreachable(
                        f"{what} {url} failed {tries} times over {time.monotonic() - first:.0f} s (last: {text}): "
                        f"the server is down, unreachable, overloaded or failing; check it (and "
                        f"{ENDPOINTS[self.scheme]}), then run again"
                    ) from None
                STATS.add(retries=1)
                time.sleep(min(delay * random.uniform(0.5, 1.5), left))  # full jitter, as AWS's guidance
                delay = min(delay * 2, 10.0)

    def remove_command(self, key: str) -> str:
        """The store's own command line that deletes object `key` (for messages that ask a person to)."""
        if self.scheme == "az":
            parts = urlsplit(self.url)
            name = "/".join(p for p in (parts.path.strip("/"), key) if p)
            return f"az storage blob delete --container-name {parts.hostname} --name {name}"
        return f"{'gcloud storage rm' if self.scheme == 'gs' else 'aws s3 rm'} {self.address(key)}"

    def check_writable(self) -> None:
        """Raises ConfigError for an http(s):// URL: a web server is read only here."""
        if self.scheme not in STORES:
            raise ConfigError(
                f"{self.url}: an http(s):// server is read-only here; upload to s3://, gs:// or az:// instead"
            )

    def get(self, key: str, start: int | None = None, length: int | None = None) -> tuple[bytes, int]:
        """(bytes, the object's whole size): the object, or `length` bytes from `start` (one ranged GET)."""
        import obstore

        def request() -> tuple[bytes, int]:
            options = {} if start is None else {"range": (start, start + (length or 0))}
            result = obstore.get(self.store, key, options=options)  # type: ignore[arg-type]
            return bytes(result.bytes()), int(result.meta["size"])

        data, size = self.call(key, "reading", request)
        STATS.add(nbytes=len(data))
        if start is not None and len(data) != length:
            raise RemoteError(
                f"reading {self.address(key)} bytes {start}..{start + (length or 0)} returned {len(data)}: the "
                "object changed since its manifest was written; upload the pack again, then run again"
            )
        return data, size

    def exists(self, key: str) -> bool:
        import obstore

        def request() -> bool:
            try:
                obstore.head(self.store, key)
                return True
            except FileNotFoundError:
                return False

        return self.call(key, "looking for", request)

    def put(self, key: str, data: bytes | Any, create: bool = False) -> None:
        """Upload `data` (bytes or a local path) as `key`; `create`: only if no object has that key (a
        conditional PUT, If-None-Match: *), else `FileExistsError`."""
        import obstore

        self.check_writable()

        def request() -> None:
            try:
                obstore.put(self.store, key, data, mode="create" if create else "overwrite")
            except Exception as e:
                if already_exists(e):
                    raise FileExistsError(self.address(key)) from None
                raise

        self.call(key, "uploading to", request)

    def keys(self) -> list[str]:
        """Every object key under this URL (S3's listing; relative to the prefix)."""
        import obstore

        return self.call("", "listing", lambda: [m["path"] for batch in obstore.list(self.store) for m in batch])

    def delete(self, key: str, what: str = "deleting") -> None:
        """Delete object `key` (S3 answers a key that does not exist as deleted; a store that says 404 raises
        `Missing`); `what` names the operation in messages.

        Raises:
            RemoteError: as `call`; a refused DELETE names the permission it needs (DELETE_DENIED).
        """
        import obstore

        self.check_writable()
        self.call(key, what, lambda: obstore.delete(self.store, key), {403: DELETE_DENIED})
