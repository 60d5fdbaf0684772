"""Samples per second from a remote pack: the local folder vs a local S3 server vs the same server behind an
injected round trip, random vs block order, cold and warm cache, reading only and in the train pipeline.

    python tools/bench_remote.py --shards S [--split train] [--samples 4000] [--rtt 0.02] [--json OUT.json]
    python tools/bench_remote.py --shards S --mixture A B ...   # also a mixture of A and B (together the size of S)

Starts its own servers on 127.0.0.1 (tools/servers.py: moto's S3 server in its own process, and a fault proxy
adding `--rtt` seconds to every request), uploads the pack at S to it, then per row:
    reading     the loader's own plan of the epoch's first --samples samples, read and CRC-checked
                (crackio.loading.readers), no decoding: what the storage path can feed
    pipeline    the same through make_loader (torch backend, decode + augmentation on --workers threads)
Sources: local (the folder), s3 (the server through a proxy adding nothing), s3+rtt (through a proxy adding the
round trip). Cache: cold (an empty cache folder, no limit), warm (the folder the last cold row of the same source
and order filled), stream (a cache smaller than the pack: random order then fetches each sample by its own
ranged GET, crackio.storage.packs.FETCHERS in flight). Each row reports samples/s, and the HTTP requests per
second and body bytes per sample the proxy passed (what a bucket would bill and carry).

The servers are Python (moto, the proxy) on the same cores as the reader: their request rate, not the network,
bounds the s3 rows here. docs/performance.md, "Remote shards", says what the figures predict for a real bucket.

With `--mixture A B` (two packs that together hold as many samples as S), the rows marked "mix" read A and B mixed
0.5/0.5 (crackio.loading.mixture) instead of S: the cost of mixing against one pack of the same total.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from crackio.cli import ArgumentParser  # noqa: E402

MIX_ROWS = [  # (mode, source, order, cache) also read as a mixture, after these one-pack rows of ROWS
    ("reading", "local", "random", "-"),
    ("pipeline", "local", "random", "-"),
    ("reading", "s3", "random", "cold"),
    ("pipeline", "s3", "random", "cold"),
]
ROWS = [  # (mode, source, order, cache)
    ("reading", "local", "random", "-"),
    ("reading", "local", "block", "-"),
    ("reading", "s3", "random", "cold"),
    ("reading", "s3", "random", "warm"),
    ("reading", "s3", "random", "stream"),
    ("reading", "s3", "block", "cold"),
    ("reading", "s3", "block", "warm"),
    ("reading", "s3+rtt", "random", "cold"),
    ("reading", "s3+rtt", "random", "stream"),
    ("reading", "s3+rtt", "block", "cold"),
    ("pipeline", "local", "random", "-"),
    ("pipeline", "s3", "random", "cold"),
    ("pipeline", "s3", "random", "warm"),
    ("pipeline", "s3+rtt", "random", "stream"),
    ("pipeline", "s3+rtt", "block", "cold"),
]


def run_row(mode, source, order, cache, args, pack, proxies, folders, mixed=False) -> dict:
    import numpy as np

    from crackio import make_loader
    from crackio.storage import remote
    from crackio.storage.packs import RemoteSettings

    proxy = proxies.get(source)
    os.environ["AWS_ENDPOINT_URL"] = proxy.url if proxy else ""
    location = (
        (args.mixture if source == "local" else pack[1]) if mixed else (args.shards if source == "local" else pack[0])
    )
    if cache == "warm":  # the cache the last cold row of this source and order filled
        folder = folders[(source, order)]
    else:
        folder = folders[(source, order)] = tempfile.mkdtemp()
    limit = 1 << 20 if cache == "stream" else None
    loader = make_loader(
        location,
        args.split,
        batch_size=args.batch_size,
        train=True,
        backend="torch",
        device="cpu",
        workers=args.workers,
        order=order,
        remote=RemoteSettings(Path(folder), limit, 60.0),
        mix=[0.5, 0.5] if mixed else None,
    )
    before = remote.STATS.snapshot()
    seen = (proxy.requests, proxy.sent) if proxy else (0, 0)
    n, start = 0, time.perf_counter()
    steps = max(1, args.samples // args.batch_size)
    if mode == "reading":
        batches, _ = loader.plan(0, 0)
        batches = batches[:steps]
        loader.reader.prefetch(batches)  # as the loader does: block order's read-ahead, a remote pack's requests
        for ids in batches:
            n += len(loader.reader.read(np.asarray(ids)))
        loader.reader.close()
    else:
        for step, batch in enumerate(loader):
            n += len(batch.labels)
            if step + 1 >= steps:
                break
    seconds = time.perf_counter() - start
    after = remote.STATS.snapshot()
    requests, fetched = (proxy.requests - seen[0], proxy.sent - seen[1]) if proxy else (0, 0)
    return {
        "mode": mode,
        "source": source,
        "order": order,
        "cache": cache,
        "packs": 2 if mixed else 1,
        "samples": n,
        "samples_per_sec": n / seconds,
        "requests_per_sec": requests / seconds,
        "bytes_per_sample": fetched / n,
        "requests": requests,
        "retries": after["retries"] - before["retries"],
    }


def table(results: list[dict], machine: dict) -> str:
    lines = [
        f"remote reading, {machine['cpu']}, {machine['cores']} cores, batch {machine['batch_size']}, "
        f"{machine['samples']} samples a row, round trip added: {machine['rtt'] * 1000:.0f} ms",
        "| mode | source | order | cache | packs | samples/s | requests/s | KB fetched/sample |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['source']} | {r['order']} | {r['cache']} | {r.get('packs', 1)} | "
            f"{r['samples_per_sec']:.0f} | "
            f"{r['requests_per_sec']:.0f} | {r['bytes_per_sample'] / 1000:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True, type=Path, help="a local pack (uploaded to the local S3 server)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--samples", type=int, default=4000, help="samples read per row")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="decode threads (pipeline)")
    ap.add_argument("--rtt", type=float, default=0.02, help="seconds the proxy adds to each request")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument(
        "--mixture", nargs=2, type=Path, metavar=("A", "B"), help="also rows reading packs A and B mixed 0.5/0.5"
    )
    ap.add_argument(
        "--only-mix", action="store_true", help="with --mixture: only the mixed rows and their one-pack rows"
    )
    args = ap.parse_args(argv)
    if args.samples < args.batch_size or args.batch_size < 1 or args.rtt < 0:
        ap.error("--samples must be >= --batch-size >= 1, --rtt >= 0")
    import platform

    import boto3

    from crackio.storage.remote import Remote
    from crackio.storage.upload import upload_pack
    from tools.servers import FaultProxy, moto_server

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
    results = []
    with moto_server() as endpoint, FaultProxy(endpoint) as direct, FaultProxy(endpoint) as slow:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        boto3.client("s3").create_bucket(Bucket="bench")
        url = "s3://bench/pack"
        upload_pack(args.shards, Remote(url))
        parts = [f"s3://bench/part{i}" for i in range(len(args.mixture or []))]
        for part, folder in zip(parts, args.mixture or []):
            upload_pack(folder, Remote(part))
        urls = (url, parts)
        slow.delay = args.rtt
        folders: dict = {}
        rows = [(r, False) for r in (MIX_ROWS if args.mixture and args.only_mix else ROWS)]
        if args.mixture:  # each mixed row after the one-pack row it compares with
            rows = [x for r in rows for x in ([r, (r[0], True)] if r[0] in MIX_ROWS else [r])]
        for (mode, source, order, cache), mixed in rows:
            results.append(
                run_row(mode, source, order, cache, args, urls, {"s3": direct, "s3+rtt": slow}, folders, mixed)
            )
            r = results[-1]
            print(
                f"  {mode} {source} {order} {cache}{' mix' if mixed else ''}: {r['samples_per_sec']:.0f} samples/s",
                file=sys.stderr,
            )
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "batch_size": args.batch_size,
        "samples": args.samples,
        "rtt": args.rtt,
    }
    print(table(results, machine))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
