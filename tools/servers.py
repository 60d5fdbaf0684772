"""Real servers for the remote-shard tests and tools/bench_remote.py, on 127.0.0.1 only, started and stopped by
their users: moto's S3 server
(a subprocess: S3's REST API over HTTP, no mock inside the test process), Azurite (Microsoft's Azure Storage
emulator, from the npm registry: Azure Blob Storage's REST API), nginx (Debian's package; Range requests
as a production HTTP server answers them) and `FaultProxy`, a small HTTP proxy in front of either that adds
latency, answers 503 or resets connections on demand, or disappears.

A server that cannot start here raises `Unavailable` (the tests skip on it, or fail in CI: tests/conftest.py)."""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NoReturn


class Unavailable(RuntimeError):
    """A server that is not installed here; the message says how to install it."""


def missing(what: str) -> NoReturn:
    raise Unavailable(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {seconds} s")


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """An S3-compatible server (moto in server mode) in its own process; yields its endpoint URL."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        missing("moto[server] is not installed (pip install -e '.[dev]')")
    port = free_port()
    log = open(os.devnull, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    try:
        wait_for_port(port, process, "moto server")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)
        log.close()


AZURITE_ACCOUNT = "devstoreaccount1"  # Azurite's well-known account and key (its documentation's, not a secret)
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_HERE = Path(__file__).resolve().parent.parent / ".ci" / "azurite" / "node_modules" / ".bin" / "azurite-blob"


def azurite_binary() -> str | None:
    """Azurite's blob server: $CRACKIO_AZURITE, on PATH, or where .ci/run installs it (.ci/azurite)."""
    found = os.environ.get("CRACKIO_AZURITE") or shutil.which("azurite-blob")
    return found or (str(AZURITE_HERE) if AZURITE_HERE.exists() else None)


@contextlib.contextmanager
def azurite(workdir: Path) -> Iterator[str]:
    """Azurite's blob service on a free port of 127.0.0.1, its data in `workdir`; yields its blob endpoint
    (http://127.0.0.1:PORT/devstoreaccount1). Clients reach it as obstore does with AZURE_STORAGE_USE_EMULATOR=true
    and AZURITE_BLOB_STORAGE_URL=http://127.0.0.1:PORT."""
    binary = azurite_binary()
    if binary is None:
        missing("Azurite is not installed (npm install --prefix .ci/azurite azurite@3; or put azurite-blob on PATH)")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(workdir), "--silent",
         "--skipApiVersionCheck", "--loose"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port, process, "azurite")
        yield f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)


@contextlib.contextmanager
def nginx(root: Path, workdir: Path, ranges: bool = True) -> Iterator[str]:
    """nginx serving `root` read-only on a free port (Range requests answered by nginx itself, or refused with
    `ranges=False`: whole files only); yields its URL."""
    binary = nginx_binary()
    if binary is None:
        missing("nginx is not installed (apt-get install nginx)")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    user = "user root;" if os.geteuid() == 0 else ""  # as root, workers would otherwise drop to nobody
    (workdir / "nginx.conf").write_text(
        f"""{user}
daemon off;
worker_processes 2;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body; proxy_temp_path {workdir}/proxy; fastcgi_temp_path {workdir}/fcgi;
    uwsgi_temp_path {workdir}/uwsgi; scgi_temp_path {workdir}/scgi;
    server {{ listen 127.0.0.1:{port}; root {root}; {"" if ranges else "max_ranges 0;"} location / {{ }} }}
}}
"""
    )
    process = subprocess.Popen(
        [binary, "-p", str(workdir), "-c", str(workdir / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process, "nginx")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of `target` (http://host:port), forwarding every request as it came
    (S3 signatures stay valid: the Host header is passed through). Faults, set on the object while it runs:
    `delay` seconds before each request is forwarded (a round trip); `fail` next requests answered 503 SlowDown;
    `reset` next requests answered by a TCP reset; `status` every request after the first `after` answered with
    that HTTP status (-1: a reset); `stop()`: every open connection reset, new ones refused. `requests` and `sent`
    (body bytes) count what went through it, `peak` the most requests it held at once.
    """

    def __init__(self, target: str):
        self.target = target.removeprefix("http://").rstrip("/")
        self.delay = 0.0
        self.fail = 0
        self.reset = 0
        self.requests = 0
        self.sent = 0  # body bytes answered
        self.inflight = 0
        self.peak = 0  # the most requests it held at once
        self.status = 0  # answer every request with this HTTP status (-1: a reset) once `after` have passed
        self.after = 0
        self.down = False
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _take(self, what: str) -> bool:
                with proxy.lock:
                    if getattr(proxy, what) > 0:
                        setattr(proxy, what, getattr(proxy, what) - 1)
                        return True
                return False

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy.lock:
                    proxy.requests += 1
                    status = proxy.status if proxy.requests > proxy.after else 0
                if self._take("reset") or proxy.down or status == -1:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                if self._take("fail") or status > 0:
                    code = status or 503
                    text = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    if code != 503:
                        text = b"<Error><Code>Refused</Code><Message>Injected by FaultProxy.</Message></Error>"
                    self.send_response(code)
                    self.send_header("Content-Length", str(len(text)))
                    self.end_headers()
                    self.wfile.write(text)
                    return
                with proxy.lock:
                    proxy.inflight += 1
                    proxy.peak = max(proxy.peak, proxy.inflight)
                upstream = http.client.HTTPConnection(proxy.target, timeout=60)
                try:
                    if proxy.delay:
                        time.sleep(proxy.delay)
                    upstream.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                    with proxy.lock:
                        proxy.inflight -= 1
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                    with proxy.lock:
                        proxy.sent += len(data)

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """The server disappears: open connections are reset, new ones refused."""
        self.down = True
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(OSError):
            self.stop()
