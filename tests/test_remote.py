"""Packs on S3-compatible storage and HTTP servers (issue 22): the same batches, weights and history as the local
folder; a cache that stays within its limit and downloads once per node; every fault ending as documented.

The servers are real and local (tools/servers.py): moto's S3 server in its own process, nginx, and a fault proxy
in front of them. Without nginx or moto here the tests skip; in CI (CRACKIO_REQUIRE_SERVERS=1) they fail."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from crackio import RemoteSettings, make_loader
from crackio.errors import ConfigError
from crackio.format.layout import ShardError, manifest_files
from crackio.storage import packs, remote
from crackio.storage.cache import Cache
from crackio.storage.packs import open_pack
from crackio.storage.remote import Remote, RemoteError, Unreachable
from crackio.storage.upload import upload_pack
from tests.conftest import BACKENDS, ROOT
from tests.helpers import TINY_ARGS, FakeClock, tiny, without_timing
from tools import servers

REQUIRED = os.environ.get("CRACKIO_REQUIRE_SERVERS") == "1"
BUCKET = "crackio-test"


def started(server):
    """Enter a server's context, skipping (or failing, in CI) when it cannot run here."""
    try:
        return server.__enter__()
    except servers.Unavailable as e:
        if REQUIRED:
            pytest.fail(f"{e} (CRACKIO_REQUIRE_SERVERS=1)")
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server; the AWS_* variables point at it (as a user points them at MinIO or R2)."""
    server = servers.moto_server()
    endpoint = started(server)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
    os.environ.setdefault("AWS_REGION", "us-east-1")
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.__exit__(None, None, None)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """This test's cache folder, as the environment's default (`remote=None` is `RemoteSettings.from_env()`), so
    that no test writes to the user's own cache."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("CRACKIO_CACHE_DIR", str(folder))
    monkeypatch.setenv("CRACKIO_REMOTE_TIMEOUT", "5")
    monkeypatch.delenv("CRACKIO_CACHE_LIMIT", raising=False)
    return folder


def upload(shards: Path, endpoint: str | None = None) -> str:
    """The pack in `shards` uploaded under a fresh prefix (through `endpoint`, e.g. a proxy); its URL."""
    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
    with endpoint_of(endpoint):
        upload_pack(shards, Remote(url))
    return url


@contextlib.contextmanager
def endpoint_of(endpoint: str | None):
    if endpoint is None:
        yield
        return
    saved = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield
    finally:
        os.environ["AWS_ENDPOINT_URL"] = saved


def epoch_of(location, **kw) -> list:
    loader = make_loader(location, "train", train=True, device="cpu", workers=1, **kw)
    return [(b.names, b.images) for b in loader]


def epoch(location, order="random", **kw) -> list:
    loader = make_loader(
        location, "train", batch_size=8, train=True, backend="torch", device="cpu", order=order,
        **({"block_size": 10} if order == "block" else {}), **kw,
    )  # fmt: skip
    return [(b.names, b.images, b.labels) for b in loader]


def same(a, b) -> bool:
    return len(a) == len(b) and all(x[0] == y[0] and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def cached_bytes(folder: Path) -> int:
    """Bytes of the entries on disk (the database and lock files are bookkeeping)."""
    return sum(
        p.stat().st_size
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith("cache.db") and p.parent.name != "locks"
    )


@pytest.mark.parametrize("order", ["random", "block"])
def test_an_epoch_from_s3_is_the_local_epoch(demo_shards, s3, cache, order):
    url = upload(demo_shards)
    assert same(epoch(url, order), epoch(demo_shards, order))
    assert open_pack(url).sha256 == open_pack(demo_shards).sha256  # a run resumes on either copy
    warm = remote.STATS.snapshot()["requests"]
    assert same(epoch(url, order), epoch(demo_shards, order))  # the second epoch: from the cache
    assert remote.STATS.snapshot()["requests"] == warm


def test_an_epoch_over_http_is_the_local_epoch(demo_shards, tmp_path, cache):
    server = servers.nginx(demo_shards, tmp_path / "nginx")
    url = started(server)
    try:
        assert same(epoch(url, "block"), epoch(demo_shards, "block"))
        assert same(epoch(url), epoch(demo_shards))
    finally:
        server.__exit__(None, None, None)


@pytest.mark.slow  # multi-process or end-to-end: `make test-fast` leaves it out
def test_the_cache_never_exceeds_its_limit(demo_shards, s3, tmp_path):
    url = upload(demo_shards)
    pack_bytes = sum(p.stat().st_size for p in demo_shards.rglob("*.tar"))
    limit = pack_bytes // 3
    folder = tmp_path / "small-cache"
    remote = RemoteSettings(folder, limit, 5.0)
    options = dict(batch_size=8, train=True, backend="torch", device="cpu", order="block", block_size=10)
    loader = make_loader(url, "train", **options, remote=remote)
    reference = make_loader(demo_shards, "train", **options)
    peak = 0
    for _ in range(2):  # two epochs: the second finds the cache full of the first's last chunks
        for batch, local in zip(loader, reference):
            assert batch.names == local.names and torch.equal(batch.images, local.images)
            peak = max(peak, cached_bytes(folder))
            assert Cache(folder, limit).usage() <= limit
    assert 0 < peak <= limit
    # Random order with a cache smaller than the pack streams: each sample by ranged GET, nothing kept.
    before = cached_bytes(folder)
    assert same(epoch(url, remote=remote), epoch(demo_shards))
    assert cached_bytes(folder) <= max(before, limit)


def test_two_loaders_of_one_process_keep_two_caches(demo_shards, s3, tmp_path):
    """The settings are each loader's own: one process, one remote pack, two cache folders with two limits, each
    filled by its own loader only (`whole` keeps the train split's chunks; `small`, below one chunk, keeps only
    the valid split's index and streams the rest)."""
    url = upload(demo_shards)
    pack_bytes = sum(p.stat().st_size for p in demo_shards.rglob("*.tar"))
    whole = RemoteSettings(tmp_path / "whole", None, 5.0)
    small = RemoteSettings(tmp_path / "small", pack_bytes // 3, 5.0)
    options = dict(batch_size=8, train=True, backend="torch", device="cpu", order="block", block_size=10)
    a = make_loader(url, "train", **options, remote=whole)
    b = make_loader(url, "valid", **options, remote=small)
    assert a.source is not b.source and a.source.sha256 == b.source.sha256
    assert same(epoch(url, remote=whole), epoch(demo_shards))
    assert [x.names for x in a] and [x.names for x in b]

    def kept(settings: RemoteSettings, split: str) -> list[str]:
        return sorted(p.name for p in settings.cache_dir.glob(f"*/{split}/*"))  # <pack>/<split>/<entry>

    assert "index.npy" in kept(whole, "train") and any(n.startswith("train-000000.tar.") for n in kept(whole, "train"))
    assert kept(small, "valid") == ["index.npy"] and kept(small, "train") == [] and kept(whole, "valid") == []
    assert Cache(tmp_path / "small", small.cache_limit).usage() <= small.cache_limit


def test_two_settings_open_two_caches_without_any_global(demo_shards, s3, tmp_path, monkeypatch):
    """open_pack takes its settings as an argument: two values, two Packs with two caches; the same value, the
    same Pack; and there is no process-wide setting left to ask."""
    assert not hasattr(packs, "settings") and not hasattr(packs, "configure")
    monkeypatch.setenv("CRACKIO_CACHE_DIR", str(tmp_path / "env"))
    url = upload(demo_shards)
    one, two = (RemoteSettings(tmp_path / name, limit, 5.0) for name, limit in (("one", None), ("two", 10 << 20)))
    first, second = open_pack(url, one), open_pack(url, two)
    assert first is not second and first.cache is not None and second.cache is not None
    assert (first.cache.folder, first.cache.limit) == (tmp_path / "one", None)
    assert (second.cache.folder, second.cache.limit) == (tmp_path / "two", 10 << 20)
    assert open_pack(url, RemoteSettings(str(tmp_path / "one"), None, 5)) is first  # equal settings: one Pack
    assert open_pack(url).cache.folder == tmp_path / "env"  # None: the environment's, read when called
    for pack in (first, second):
        pack.index("train")
    assert list((tmp_path / "one").rglob("index.npy")) and list((tmp_path / "two").rglob("index.npy"))


@pytest.mark.slow  # multi-process or end-to-end: `make test-fast` leaves it out
@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_keeps_many_requests_in_flight(demo_shards, s3, cache, backend):
    """A cache smaller than the pack streams one GET per sample; the samples of the next batches are requested
    ahead of the backend (DALI asks for one batch at a time), so far more than a batch of 4 is in flight."""
    with servers.FaultProxy(s3) as proxy:
        url = upload(demo_shards)
        with endpoint_of(proxy.url):
            remote = RemoteSettings(cache, 1, 30.0)
            loader = make_loader(
                url, "train", batch_size=4, train=True, backend=backend, device="cpu", workers=1, remote=remote
            )
            proxy.delay = 0.05
            names = [b.names for b in loader]
    assert names == [b[0] for b in epoch_of(demo_shards, batch_size=4, backend=backend)]
    assert proxy.peak >= 16


@pytest.mark.slow  # multi-process or end-to-end: `make test-fast` leaves it out
def test_the_ranks_of_a_node_download_a_chunk_once(demo_shards, s3, tmp_path):
    """Four processes sharing one cache read the same samples at once: each chunk crosses the network once."""
    with servers.FaultProxy(s3) as proxy:
        url = upload(demo_shards)
        script = (
            "import sys, numpy as np; sys.path.insert(0, sys.argv[1]);"
            "from crackio.storage.packs import open_pack;"
            "from crackio.loading.readers import ByteReader;"
            "p = open_pack(sys.argv[2]); i = p.index('train');"
            "ByteReader(i, p.files(i)).read(np.arange(len(i)))"
        )
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url, "CRACKIO_CACHE_DIR": str(tmp_path / "shared")}
        procs = [
            subprocess.Popen([sys.executable, "-c", script, str(ROOT), url], env=env, stderr=subprocess.PIPE)
            for _ in range(4)
        ]
        for p in procs:
            assert p.wait(120) == 0, p.stderr.read().decode()[-2000:] if p.stderr else ""
        shards = len(json.loads((demo_shards / "manifest.json").read_text())["splits"]["train"]["shards"])
        # per process: its manifest; once per node: the index and each chunk (a tar here is one chunk)
        assert proxy.requests == 4 + 1 + shards


def test_transient_errors_are_retried_and_counted(demo_shards, s3, cache):
    with servers.FaultProxy(s3) as proxy:
        url = upload(demo_shards)
        with endpoint_of(proxy.url):
            pack = open_pack(url, RemoteSettings(cache, 0, 30.0))  # no cache: every read goes to the server
            index = pack.index("train")
            files = pack.files(index)
            before = remote.STATS.snapshot()["retries"]
            proxy.fail, proxy.reset = 2, 2
            from crackio.loading.readers import ByteReader

            data = ByteReader(index, files).read(np.arange(8))
    assert len(data) == 8
    assert remote.STATS.snapshot()["retries"] - before == 4


@pytest.mark.parametrize(
    "status, words",
    [(403, "403 access denied: check AWS_ACCESS_KEY_ID"), (404, "404 not found: check the URL"), (400, "HTTP 400")],
)
def test_a_permanent_error_is_one_line_naming_the_url(demo_shards, s3, cache, status, words):
    with servers.FaultProxy(s3) as proxy:
        url = upload(demo_shards)
        with endpoint_of(proxy.url):
            pack = open_pack(url, RemoteSettings(cache, 0, 30.0))
            index = pack.index("train")
            proxy.status = status
            before, retries = proxy.requests, remote.STATS.snapshot()["retries"]
            with pytest.raises(RemoteError) as e:
                pack.files(index).read_many([(0, 512, 100)])
    # Not retried: the server saw the one request, and no retry was counted.
    assert proxy.requests - before == 1 and remote.STATS.snapshot()["retries"] == retries
    assert "\n" not in str(e.value)
    assert f"{url}/train/train-000000.tar" in str(e.value) and words in str(e.value)


def test_a_changed_object_is_refused(demo_shards, s3, cache, tmp_path):
    url = upload(demo_shards)
    pack = open_pack(url)
    index = pack.index("train")
    tar = (demo_shards / "train" / "train-000000.tar").read_bytes()
    # Another size: the object was replaced since the manifest was written.
    Remote(url).put("train/train-000000.tar", tar + b"\0" * 512)
    with pytest.raises(RemoteError, match="its manifest says .* the object changed"):
        pack.files(index).read(0, 0, 1024)
    # The same size, other bytes: every sample's CRC32 catches it, after one fresh download.
    damaged = bytearray(tar)
    first = int(index.rows["offset"][0])
    damaged[first : first + 64] = bytes(64)
    Remote(url).put("train/train-000000.tar", bytes(damaged))
    from crackio.loading.readers import ByteReader

    pack = open_pack(url, RemoteSettings(tmp_path / "other-cache", None, 5.0))
    with pytest.raises(
        ShardError, match=f"in {url}/train/train-000000.tar does not match its checksum, also when downloaded again"
    ):
        ByteReader(index, pack.files(index)).read(np.array([0]))


def test_an_index_changed_on_the_server_is_refused_and_never_cached(demo_shards, s3, cache):
    import io

    from crackio.storage.packs import verify_pack

    url = upload(demo_shards)
    rows = np.load(demo_shards / "train" / "index.npy")
    rows["label"][5] = 1 - rows["label"][5]  # every size, location and checksum still matches
    data = io.BytesIO()
    np.save(data, rows)
    Remote(url).put("train/index.npy", data.getvalue())
    with pytest.raises(ShardError, match=f"{url}/train/index.npy is not the index {url}/manifest.json records"):
        make_loader(url, "train", batch_size=8, train=True, device="cpu")
    assert not list(cache.rglob("index.npy"))  # a bad download is never kept for later runs
    problems = list(verify_pack(url))
    assert "is not the index" in problems[0] and "row 5" in problems[1] and len(problems) == 2


def test_a_pack_uploaded_again_with_one_crop_changed_is_another_pack_to_the_cache(demo_src, s3, cache, tmp_path):
    """The same URL, the same sizes, one crop's pixels changed: the node cache, keyed by the pack's identity, never
    serves the earlier pack's bytes."""
    import shutil

    from crackio.writing.pack import PackSettings, pack

    settings = PackSettings(samples_per_shard=50, workers=1, seed=0)
    src = tmp_path / "src"
    shutil.copytree(demo_src, src)
    pack(src, tmp_path / "a", settings, progress=False)
    url = upload(tmp_path / "a")
    first = epoch(url)
    assert same(first, epoch(tmp_path / "a"))
    crop = next(p for p in sorted((src / "train").iterdir()) if p.suffix == ".jpg")
    jpeg = bytearray(crop.read_bytes())
    at = jpeg.index(b"\xff\xdb") + 5  # a quantization value: other pixels, the same size
    jpeg[at] = jpeg[at] % 254 + 1
    crop.write_bytes(bytes(jpeg))
    pack(src, tmp_path / "b", settings, progress=False)
    upload_pack(tmp_path / "b", Remote(url))
    packs._opened.clear()  # as a new process finds it
    again = epoch(url)
    assert same(again, epoch(tmp_path / "b")) and not same(again, first)


def test_verify_reads_a_remote_pack_object_by_object(demo_shards, s3, cache):
    from crackio.storage.packs import verify_pack

    url = upload(demo_shards)
    assert list(verify_pack(url)) == []
    tar = bytearray((demo_shards / "valid" / "valid-000000.tar").read_bytes())
    first = int(open_pack(demo_shards).index("valid").rows["offset"][0])
    tar[first + 100] ^= 0xFF
    Remote(url).put("valid/valid-000000.tar", bytes(tar))
    Remote(url).put("valid/valid-000000.idx", b"v1.2 7\n")
    problems = list(verify_pack(url))
    assert any(p.startswith(f"{url}/valid/valid-000000.tar: row 0 ") and "checksum" in p for p in problems)
    assert f"{url}/valid/valid-000000.idx: its header says 'v1.2 7'" in "\n".join(problems)
    assert not list(cache.rglob("*.tar.*"))  # nothing but the indexes went to disk


def test_a_lower_limit_shrinks_the_cache_when_it_is_opened(demo_shards, s3, cache):
    url = upload(demo_shards)
    assert same(epoch(url), epoch(demo_shards))
    assert Cache(cache).usage() > 300_000
    assert Cache(cache, 300_000).usage() <= 300_000
    assert cached_bytes(cache) <= 300_000


@pytest.mark.slow  # multi-process or end-to-end: `make test-fast` leaves it out
def test_a_child_forked_after_a_remote_read_says_so_instead_of_hanging(demo_shards, s3, cache):
    """obstore's runtime threads are not copied by fork, so a forked child's requests would wait forever: the
    child gets one line naming the fix (spawn or forkserver) at once."""
    import multiprocessing

    from crackio.errors import CrackioError

    url = upload(demo_shards)
    assert same(epoch(url)[:1], epoch(demo_shards)[:1])
    remote = RemoteSettings(cache, 0, 10.0)  # streamed in the child: every read is a request

    def child():
        try:
            options = dict(batch_size=8, train=False, backend="torch", device="cpu", workers=1)
            make_loader(url, "valid", **options, remote=remote)
        except CrackioError as e:
            os._exit(3 if "multiprocessing.set_start_method('spawn')" in str(e) else 4)
        os._exit(0)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(60)
    assert process.exitcode == 3


def test_an_interrupted_upload_is_cleaned_by_the_next(demo_shards, demo_src, s3, tmp_path):
    """An upload stopped after deleting the old manifest leaves the old pack's files; the next upload removes
    every file of the pack layout its manifest does not name, and leaves other objects alone."""
    from crackio.writing.pack import PackSettings, pack

    url = upload(demo_shards)
    Remote(url).put("notes/readme.txt", b"not crackio's")
    Remote(url).delete("manifest.json")  # as an interrupted upload leaves it
    other = tmp_path / "other"
    pack(demo_src, other, PackSettings(samples_per_shard=120, workers=1), progress=False)
    upload_pack(other, Remote(url))
    manifest = json.loads(Remote(url).get("manifest.json")[0])
    wanted = {f for f in manifest_files(manifest) if (other / f).is_file()}
    assert set(Remote(url).keys()) == wanted | {"notes/readme.txt"}


def test_a_damaged_cache_file_is_downloaded_again(demo_shards, s3, cache):
    url = upload(demo_shards)
    local = epoch(demo_shards)
    assert same(epoch(url), local)
    chunks = [p for p in cache.rglob("*.tar.*") if not p.name.endswith(".tmp")]
    assert chunks
    for chunk in chunks:  # a power cut: the files exist, their bytes are not the downloaded ones
        chunk.write_bytes(bytes(chunk.stat().st_size))
    (index,) = cache.rglob("train/index.npy")  # no per-sample checksum: checked whole against its download's
    data = bytearray(index.read_bytes())
    data[-3] ^= 1  # a bit of the last row's columns
    index.write_bytes(bytes(data))
    assert same(epoch(url), local)
    assert index.read_bytes() != bytes(data)


def test_a_server_that_disappears_ends_within_the_timeout(demo_shards, s3, cache, monkeypatch):
    proxy = servers.FaultProxy(s3)
    url = upload(demo_shards)
    with endpoint_of(proxy.url):
        pack = open_pack(url, RemoteSettings(cache, 0, 2.0))
        index = pack.index("train")
        proxy.stop()
        clock = FakeClock(monkeypatch, remote)  # the retry loop's clock: its backoff sleeps take no time
        retries = remote.STATS.snapshot()["retries"]
        with pytest.raises(Unreachable) as e:
            pack.files(index).read_many([(0, 512, 100)])
    # Retried (each retry counted, after a backoff) until the 2 s timeout had passed, then given up at once: the
    # backoffs add up to the timeout.
    assert remote.STATS.snapshot()["retries"] - retries == len(clock.slept) >= 2
    assert clock.now == pytest.approx(2.0)
    assert "the server is down, unreachable, overloaded or failing" in str(e.value) and url in str(e.value)


def test_a_server_without_range_requests_is_said_at_once(demo_shards, tmp_path, cache):
    server = servers.nginx(demo_shards, tmp_path / "nginx", ranges=False)
    url = started(server)
    try:
        retries = remote.STATS.snapshot()["retries"]
        with pytest.raises(RemoteError, match="does not answer Range requests: serve the folder with one that does"):
            epoch(url)
        assert remote.STATS.snapshot()["retries"] == retries  # not retried as an outage
    finally:
        server.__exit__(None, None, None)


@pytest.mark.parametrize(
    "given, words",
    [
        ("abfs://bucket/pack", "abfs:// is not read by crackio; give s3://BUCKET/PREFIX .* az://CONTAINER/PREFIX"),
        ("az://", "names no bucket, container or host"),
        ("s3a://bucket/pack", "s3a:// is not read by crackio"),
        ("s3://", "names no bucket"),
        ("s3://bucket//pack", "its path has an empty"),
        ("http://alice:secret@127.0.0.1/pack", "credentials in the URL are neither sent nor safe"),
    ],
)
def test_urls_that_cannot_work_are_refused_before_any_request(given, words):
    with pytest.raises(ConfigError, match=words) as e:
        open_pack(given)
    assert "secret" not in str(e.value)


def test_cache_options_with_a_local_pack_are_refused(demo_shards, tmp_path):
    from train.cli.commands import train

    with pytest.raises(ConfigError, match="--cache-limit only applies with a remote --shards"):
        train(["--shards", str(demo_shards), "--cache-limit", "1G", *TINY_ARGS, "--out", str(tmp_path / "r")])
    with pytest.raises(ConfigError, match="abfs:// is not read by crackio"):
        train(["--shards", "abfs://bucket/pack", *TINY_ARGS, "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_no_pack_at_the_url_names_the_fix(s3, cache):
    with pytest.raises(RemoteError, match="holds no complete pack .* tools/pack.py SRC --out s3://"):
        open_pack(f"s3://{BUCKET}/nothing-here")
    with pytest.raises(RemoteError, match="404 no such bucket"):
        open_pack("s3://no-such-bucket/pack")
    with pytest.raises(ConfigError, match="names no bucket"):
        Remote("s3:///x")


def test_a_split_folder_of_a_remote_pack_names_the_pack(demo_shards, s3, cache):
    url = upload(demo_shards)
    for split in ("train", "valid"):
        with pytest.raises(ShardError) as e:
            open_pack(f"{url}/{split}/")
        assert str(e.value) == (
            f"{url}/{split} is the folder of split {split!r} inside the pack {url}, not a pack: give the pack's "
            f"folder {url} and choose the split {split!r} by name"
        )
    with pytest.raises(RemoteError, match=f"{url}/elsewhere holds no complete pack .* --out {url}/elsewhere"):
        open_pack(f"{url}/elsewhere")  # the folder above is a pack, but names no such split


@pytest.mark.slow  # multi-process or end-to-end: `make test-fast` leaves it out
def test_pack_uploads_manifest_last_and_refuses_a_second_writer(demo_src, s3, tmp_path, cache):
    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
    cli = [sys.executable, str(ROOT / "tools" / "pack.py"), str(demo_src), "--samples-per-shard", "50", "--quiet"]
    # An upload that fails half-way leaves no manifest: readers see no pack, not half of one.
    with servers.FaultProxy(s3) as proxy:
        proxy.status, proxy.after = 403, 5  # the sixth request on is refused
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL": proxy.url,
            "CRACKIO_REMOTE_TIMEOUT": "2",
            "CRACKIO_CACHE_DIR": str(cache),
        }
        failed = subprocess.run([*cli, "--out", url], capture_output=True, text=True, env=env, timeout=120)
    assert failed.returncode == 2 and "access denied" in failed.stderr
    with pytest.raises(RemoteError, match="holds no complete pack"):
        open_pack(url)
    Remote(url).delete(".crackio.lock")  # the refused run could not delete its lock either
    # A second writer while one holds the prefix is refused, naming the lock.
    Remote(url).put(".crackio.lock", b'{"host": "elsewhere", "pid": 1}', create=True)
    env = {**os.environ, "CRACKIO_CACHE_DIR": str(cache)}  # never the user's own cache
    refused = subprocess.run([*cli, "--out", url], capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 2
    assert "another pack is being written" in refused.stderr and f"{url}/.crackio.lock" in refused.stderr
    Remote(url).delete(".crackio.lock")
    done = subprocess.run([*cli, "--out", url], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "uploaded" in done.stderr and not Remote(url).exists(".crackio.lock")
    verified = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "pack.py"), "--verify", url], capture_output=True, text=True, env=env
    )
    assert verified.returncode == 0 and "all 240 samples match" in verified.stdout
    assert open_pack(url).manifest["splits"].keys() == {"train", "valid", "test"}
    # Packed again into the same prefix with other settings: refused as a folder refuses it, with nothing written.
    other = [*cli[:-2], "120", "--quiet", "--out", url]
    refused = subprocess.run(other, capture_output=True, text=True, env=env)
    assert refused.returncode == 2 and f"--out {url} holds another pack (samples_per_shard 50 then, 120 now)" in (
        refused.stderr
    )
    assert not Remote(url).exists(".crackio.lock") and open_pack(url).manifest["settings"]["samples_per_shard"] == 50
    # With --overwrite, and fewer shards: the old pack's extra shards are removed.
    again = subprocess.run([*other, "--overwrite"], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr
    assert f"note: {url} held a pack with other contents, now replaced" in again.stderr
    import boto3

    prefix = url.split("/", 3)[3] + "/"
    listed = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]
    stored = {o["Key"][len(prefix) :] for o in listed}
    manifest = json.loads(Remote(url).get("manifest.json")[0])
    assert stored == {f for f in manifest_files(manifest) if f in stored} and "train/train-000002.tar" not in stored
    assert {s["name"] for s in manifest["splits"]["train"]["shards"]} == {"train-000000.tar", "train-000001.tar"}


@pytest.mark.slow
def test_training_from_s3_and_http_gives_the_local_weights_and_history(demo_shards, s3, tmp_path, monkeypatch):
    """One epoch each from the local folder, s3:// and http://: bit-identical weights and history (CPU)."""
    from train.run.main import main

    monkeypatch.setenv("CRACKIO_CACHE_DIR", str(tmp_path / "cache-env"))  # never the user's own cache

    server = servers.nginx(demo_shards, tmp_path / "nginx")
    http = started(server)
    try:
        runs = {}
        urls = {"s3": upload(demo_shards), "http": http}
        for name, shards in (("local", demo_shards), ("s3", urls["s3"]), ("http", http)):
            out = tmp_path / name
            main(tiny(shards, out, epochs=1, backend="torch", workers=1, cache_dir=str(tmp_path / f"cache-{name}")))
            history = json.loads((out / "history.json").read_text())
            runs[name] = (
                torch.load(out / "last.pt", weights_only=True)["model"],
                without_timing(history),
            )
    finally:
        server.__exit__(None, None, None)
    for name in ("s3", "http"):
        weights, history = runs[name]
        assert history == runs["local"][1], name
        assert all(torch.equal(weights[k], v) for k, v in runs["local"][0].items()), name
    # The subcommands read a remote pack too: eval's report and the SVM stage's feature-cache key are the folder's.
    from train.run.evaluate import run_eval
    from train.run.features import checkpoint_digest
    from train.settings.commands import EvalSettings

    best = tmp_path / "s3" / "best.pt"
    monkeypatch.setenv("CRACKIO_CACHE_DIR", str(tmp_path / "cache-eval"))
    reports = [
        run_eval(EvalSettings(checkpoint=str(best), shards=str(s), batch_size=16, device="cpu", backend="torch"))
        for s in (demo_shards, urls["s3"])
    ]
    assert reports[0] == reports[1]
    assert checkpoint_digest(best, [urls["s3"]]).hexdigest() == checkpoint_digest(best, [str(demo_shards)]).hexdigest()


@pytest.mark.slow
def test_a_server_lost_mid_epoch_leaves_a_resumable_run(demo_shards, s3, tmp_path):
    """The server disappears after some batches: the run ends with one line naming step.pt; resumed once the
    server is back, it ends with the weights of a run that was never stopped."""
    url = upload(demo_shards)
    args = [*TINY_ARGS, "--head", "linear", "--epochs", "1", "--batch-size", "8", "--backend", "torch"]
    args += ["--workers", "1", "--checkpoint-every", "0"]
    whole = tmp_path / "whole"
    local = [sys.executable, "-m", "train", "--shards", str(demo_shards), *args, "--out", str(whole)]
    args += ["--cache-limit", "0", "--remote-timeout", "2"]  # streamed: every batch asks the server
    subprocess.run(local, check=True, cwd=ROOT, capture_output=True)
    with servers.FaultProxy(s3) as proxy:
        proxy.after, proxy.status = 30, -1  # from the 31st request on: connections reset (the server is gone)
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url}
        out = tmp_path / "cut"
        cut = subprocess.run(
            [sys.executable, "-m", "train", "--shards", url, *args, "--out", str(out)],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=300,
        )
    assert cut.returncode == 2, cut.stderr[-2000:]
    last = cut.stderr.strip().splitlines()[-1]
    assert "the server is down" in last and f"continue with `python -m train --resume {out / 'step.pt'}`" in last
    resumed = subprocess.run(
        [sys.executable, "-m", "train", "--resume", str(out / "step.pt")], capture_output=True, text=True, cwd=ROOT
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(whole / "last.pt", weights_only=True)["model"]
    b = torch.load(out / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], v) for k, v in b.items())


@pytest.mark.slow
def test_two_nodes_read_one_s3_pack_as_one_node(demo_shards, two_ranks, s3, tmp_path):
    """`torchrun --nnodes 2` on 127.0.0.1, each node with its own cache, reading one s3:// pack: the history and
    weights of one node with two ranks reading the local folder (the same global batch)."""
    url = upload(demo_shards)
    train = ["-m", "train", *TINY_ARGS, "--head", "linear", "--epochs", "1", "--batch-size", "8", "--workers", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done, one = two_ranks  # one node, two ranks: the same run on the local folder
    assert done.returncode == 0, done.stderr[-3000:]
    port = servers.free_port()
    two = tmp_path / "two-nodes"
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
            + ["--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]
            + ["--rdzv-id", "crackio-test", *train, "--shards", url, "--out", str(two)],
            env={**env, "CRACKIO_CACHE_DIR": str(tmp_path / f"cache-node{rank}")},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    assert without_timing(json.loads((two / "history.json").read_text())) == without_timing(
        json.loads((one / "history.json").read_text())
    )
    a = torch.load(one / "last.pt", weights_only=True)["model"]
    b = torch.load(two / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], v) for k, v in b.items())
    assert all((tmp_path / f"cache-node{rank}").is_dir() for rank in range(2))  # each node its own cache


@pytest.mark.slow
def test_append_to_an_s3_pack_uploads_only_the_new_files(demo_photos, s3, cache, tmp_path):
    """tools/propose.py --append --out s3://...: the same pack as appending to a folder; the earlier shards are
    neither downloaded nor uploaded again (their objects are the ones first written)."""
    import boto3

    from tests.test_append import renamed
    from tools import propose
    from tools.make_demo_data import write_photos

    new = tmp_path / "new"
    write_photos(new, images=6, seed=9, size=(192, 128), formats=("yolo",))
    renamed(new / "yolo", "m2_")
    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
    prefix = url.split("/", 3)[3]
    flags = ["--max-proposals", "40", "--workers", "1", "--samples-per-shard", "60", "--quiet"]
    local = tmp_path / "local"
    for out in (url, str(local)):
        assert propose.main([str(demo_photos / "coco"), "--format", "coco", "--out", out, *flags]) == 0
    client = boto3.client("s3")

    def objects() -> dict[str, str]:
        listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]
        return {o["Key"][len(prefix) + 1 :]: o["LastModified"] for o in listed}

    before = objects()
    for out in (url, str(local)):
        assert propose.main([str(new / "yolo"), "--format", "yolo", "--out", out, "--append", *flags]) == 0
    after = objects()
    tars = [k for k in before if k.endswith(".tar")]
    assert tars and all(after[k] == before[k] for k in tars)  # not uploaded again
    assert len([k for k in after if k.endswith(".tar")]) > len(tars)
    manifest = client.get_object(Bucket=BUCKET, Key=f"{prefix}/manifest.json")["Body"].read()
    assert manifest == (local / "manifest.json").read_bytes()

    def names(pack: str) -> list:
        return [n for b in make_loader(pack, "train", batch_size=1000, train=False, device="cpu") for n in b.names]

    assert sorted(names(url)) == sorted(names(str(local)))
