"""Figures at scale: packing rate against Pillow's decode, cold-cache reading by order, memory of many loaders.

    python tools/bench_scale.py pack SRC [--workers 1 2] [--samples-per-shard N] [--json OUT]
    python tools/bench_scale.py cold SHARDS [--split large] [--seconds S] [--json OUT]
    python tools/bench_scale.py memory SHARDS [--split large] [--processes 8] [--json OUT]
    python tools/bench_scale.py plan [--rows 10000000] [--world 8] [--global-batch 256] [--json OUT]

pack    files/s of tools/pack.py with each worker count (a fresh output folder each; peak RSS of
        the main process and of the largest worker), beside Pillow's full decode
        (`Image.open(path).load()`) of a sample of the same files in as many processes; the
        share of one worker's time in reading, checking/decoding and writing; the projected
        files/s per additional core.
cold    img/s reading a split with the page cache dropped before each row (`echo 3 >
        /proc/sys/vm/drop_caches`, needs root; refused otherwise) and again warm (every tar
        read once first): reading only (io-random, io-block: crackio's reader in each order;
        io-sequential: the tars front to back), then whole pipelines: crackio's torch backend
        in `random` and `block` order (train, uint8 output), DALI's `fn.readers.webdataset`
        (where DALI is installed) and the `webdataset` library reading the same tars
        sequentially, all decoding and augmenting on the same cores.
memory  N processes each holding a train loader on the split (index loaded, first epoch
        planned, one batch read): the sum of their proportional set sizes (PSS, shared pages
        split between the processes that share them) and of their private memory (USS), from
        /proc/PID/smaps_rollup.
plan    what stopping and resuming cost, on a synthetic index of --rows samples (no pack needed: the loader's
        own functions on its arrays): seconds to plan an epoch on one rank (what every epoch start and every
        `Loader.load_state_dict` compute; nothing is read or decoded) per sampler and order, and, for block
        order, the rows each rank reads per row it trains on (the block spans of crackio.loading.readers.
        BlockReader), at one rank and at --world ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


# --- pack -----------------------------------------------------------------------------------------------------


def _pillow_decode(paths: list[str]) -> int:
    from PIL import Image

    for p in paths:
        with Image.open(p) as img:
            img.load()
    return len(paths)


def pillow_rate(paths: list[str], processes: int) -> float:
    """Files/s of Pillow's full decode of `paths` (read from the page cache) in `processes` processes."""
    import multiprocessing

    _pillow_decode(paths[:200])  # warm the page cache and the imports
    chunks = [paths[i : i + 256] for i in range(0, len(paths), 256)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        start = time.perf_counter()
        done = sum(pool.imap_unordered(_pillow_decode, chunks))
        return done / (time.perf_counter() - start)


def shares(paths: list[str]) -> dict:
    """Where one worker's time per file goes: reading, checking/decoding (`prepare` less its read), writing."""
    from crackio.format.tar import TarShard
    from crackio.writing.images import prepare

    t_read = t_prepare = t_write = 0.0
    with tempfile.TemporaryDirectory() as tmp, TarShard(Path(tmp) / "x-000000.tar") as tar:
        for key, p in enumerate(paths):
            t0 = time.perf_counter()
            with open(p, "rb") as f:
                f.read()
            t1 = time.perf_counter()
            result = prepare(p)
            t2 = time.perf_counter()
            if result.data is not None:
                tar.write(key, result.data, {"filename": os.path.basename(p), "label": 0})
            t3 = time.perf_counter()
            t_read, t_prepare, t_write = t_read + t1 - t0, t_prepare + t2 - t1, t_write + t3 - t2
    n = len(paths)
    total = t_prepare + t_write
    return {
        "read_us": 1e6 * t_read / n,
        "check_decode_us": 1e6 * (t_prepare - t_read) / n,
        "write_us": 1e6 * t_write / n,
        "share_read": t_read / total,
        "share_check_decode": (t_prepare - t_read) / total,
        "share_write": t_write / total,
        "files_per_sec_per_core": n / total,
    }


def bench_pack(args) -> dict:
    from crackio.writing.discover import discover

    found = discover(args.src)
    paths = [str(folder / p.filename) for folder, proposals in found.splits.values() for p in proposals]
    if not paths:
        raise SystemExit(f"error: {args.src} holds no proposal files")
    import random

    sample = random.Random(0).sample(paths, min(len(paths), args.sample))
    rows: list[dict] = []
    results = {"inputs": len(paths), "shares": shares(sample[:5000]), "rows": rows}
    for workers in args.workers:
        decode = pillow_rate(sample, workers)
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            code = (
                "import resource, sys, time; sys.path.insert(0, sys.argv[1]);"
                "from crackio.writing.pack import PackSettings, pack;"
                "t = time.perf_counter();"
                "pack(sys.argv[2], sys.argv[3], PackSettings(workers=int(sys.argv[4]),"
                " samples_per_shard=int(sys.argv[5])), progress=False);"
                "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
                " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
            )
            run = subprocess.run(
                [sys.executable, "-c", code, str(ROOT), str(args.src), tmp + "/out", str(workers),
                 str(args.samples_per_shard)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            seconds, main_kib, child_kib = run.stdout.split()
        rate = len(paths) / float(seconds)
        row = {
            "workers": workers,
            "files_per_sec": rate,
            "pillow_decode_files_per_sec": decode,
            "vs_pillow": rate / decode,
            "seconds": float(seconds),
            "main_peak_rss_mb": int(main_kib) / 1024,
            "worker_peak_rss_mb": int(child_kib) / 1024,
        }
        rows.append(row)
        print(
            f"  pack --workers {workers}: {rate:,.0f} files/s = {row['vs_pillow']:.2f}x Pillow's decode "
            f"({decode:,.0f} files/s on {workers} processes)",
            file=sys.stderr,
        )
    return results


# --- cold -----------------------------------------------------------------------------------------------------


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        raise SystemExit(f"error: cannot drop the page cache ({e.strerror}): run `cold` as root") from None


def cold_row(args) -> dict:
    """One reading row in this process: img/s over `seconds` after the first batch."""
    from tools import bench_peers as peers
    from tools.bench import batch_len, endless

    name = args.row
    t0 = time.perf_counter()
    if name.startswith("io-"):
        return io_row(args)
    if name in ("random", "block"):
        from crackio import make_loader

        loader = make_loader(
            args.shards, args.split, batch_size=args.batch_size, train=True, backend="torch", device="cpu",
            output="uint8", order=name, **({"block_size": args.block_size} if name == "block" else {}),
        )  # fmt: skip
        it = endless(loader)  # a small split: epoch after epoch
    else:
        from crackio.format.index import load_index

        tars = [str(p) for p in load_index(args.shards, args.split).shards]
        if name == "dali-reader":
            it = peers.dali_reader(tars, args.batch_size, args.workers, shuffle=False)
        else:
            it = endless(peers.wds_dataloader(tars, args.batch_size, args.workers, buffer=1000, resampled=False))
    first = next(it)
    n, start = 0, time.perf_counter()
    first_s = start - t0
    while time.perf_counter() - start < args.seconds:
        batch = next(it)
        n += batch_len(batch)
    del first
    return {"name": name, "images_per_sec": n / (time.perf_counter() - start), "first_batch_s": first_s}


def io_row(args) -> dict:
    """Reading only, no decoding: samples/s of crackio's reader in `random` or `block` order (the backend's
    `workers` threads reading batch after batch), or of reading the tars front to back in 1 MiB chunks
    (what DALI's and webdataset's readers do), counted as samples by the tars' samples per byte."""
    from concurrent.futures import ThreadPoolExecutor

    from crackio import make_loader
    from crackio.format.index import load_index
    from crackio.loading.readers import BlockReader

    name = args.row
    if name == "io-sequential":
        index = load_index(args.shards, args.split)
        per_byte = len(index) / sum(p.stat().st_size for p in index.shards)
        done, start = 0, time.perf_counter()
        for path in index.shards:
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(1 << 20):
                    done += len(chunk)
                    if time.perf_counter() - start > args.seconds:
                        return {"name": name, "images_per_sec": done * per_byte / (time.perf_counter() - start)}
        return {"name": name, "images_per_sec": done * per_byte / (time.perf_counter() - start)}
    loader = make_loader(
        args.shards, args.split, batch_size=args.batch_size, train=True, backend="torch", device="cpu",
        order=name[3:], **({"block_size": args.block_size} if name[3:] == "block" else {}),
    )  # fmt: skip
    batches = loader.batches(0)
    if isinstance(loader.reader, BlockReader):
        loader.reader.prefetch(batches)
    n, start = 0, time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        for data in pool.map(loader.reader.read, batches):
            n += len(data)
            if time.perf_counter() - start > args.seconds:
                pool.shutdown(wait=False, cancel_futures=True)
                break
        rate = n / (time.perf_counter() - start)
    if isinstance(loader.reader, BlockReader):
        loader.reader.close()
    return {"name": name, "images_per_sec": rate}


def warm_up(shards: Path, split: str) -> None:
    """Read every tar of the split once, so the warm rows find it all in the page cache."""
    from crackio.format.index import load_index

    for path in load_index(shards, split).shards:
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 24):
                pass


def bench_cold(args) -> dict:
    from crackio.loading.loader import dali_available

    rows = ["io-random", "io-block", "io-sequential", "random", "block"]
    rows += [*(["dali-reader"] if dali_available() else []), "webdataset"]
    rows = [r for r in rows if not args.rows or r in args.rows]
    results = []
    for cache in ("cold", "warm"):
        if cache == "warm":
            warm_up(args.shards, args.split)
        for name in rows:
            runs = []
            for _ in range(args.repeats):
                if cache == "cold":
                    drop_caches()
                forward = list(sys.argv[1:])
                if "--json" in forward:  # the rows print their JSON; only the parent writes the file
                    del forward[forward.index("--json") : forward.index("--json") + 2]
                run = subprocess.run(
                    [sys.executable, __file__, *forward, "--row", name], capture_output=True, text=True, timeout=600
                )
                if run.returncode:
                    print(f"{name} ({cache}): failed\n{run.stderr[-2000:]}", file=sys.stderr)
                    continue
                runs.append(json.loads(run.stdout.strip().splitlines()[-1]))
            if not runs:
                continue
            rates = [r["images_per_sec"] for r in runs]
            row = runs[rates.index(statistics.median_low(rates))] | {"cache": cache, "all_images_per_sec": rates}
            results.append(row)
            print(f"  {name} {cache}: {row['images_per_sec']:,.0f} img/s (median of {len(rates)})", file=sys.stderr)
    return {"rows": results}


# --- memory ---------------------------------------------------------------------------------------------------


def hold_loader(shards: str, split: str, ready: str) -> None:
    """Build a train loader, plan its first epoch, read one batch, then wait for the parent to measure."""
    from crackio import make_loader  # from the checkout first on sys.path (bench_memory's --code)

    loader = make_loader(shards, split, batch_size=32, train=True, backend="torch", device="cpu", workers=1)
    loader.batches(0)
    next(iter(loader))
    Path(ready).touch()
    time.sleep(3600)


def smaps(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        fields[key] = int(value.split()[0])  # kB
    return fields


def bench_memory(args) -> dict:
    procs, marks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        # crackio is imported from --code (e.g. a checkout of an earlier commit: the "before" figure).
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); from tools.bench_scale import hold_loader;"
            "sys.path.insert(0, sys.argv[2]); hold_loader(*sys.argv[3:])"
        )
        try:
            for k in range(args.processes):
                marks.append(Path(tmp) / f"ready{k}")
                cmd = [sys.executable, "-c", code, str(ROOT), str(args.code), str(args.shards), args.split]
                procs.append(subprocess.Popen([*cmd, str(marks[-1])]))
            deadline = time.monotonic() + 600
            while not all(m.exists() for m in marks):
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise SystemExit("error: a loader process failed or took over 10 minutes")
                time.sleep(0.2)
            each = [smaps(p.pid) for p in procs]
        finally:
            for p in procs:
                p.kill()
                p.wait()
    total = {k: sum(e[k] for e in each) / 1024 for k in ("Rss", "Pss", "Private_Clean", "Private_Dirty")}
    result = {
        "processes": args.processes,
        "sum_rss_mb": total["Rss"],
        "sum_pss_mb": total["Pss"],
        "sum_private_mb": total["Private_Clean"] + total["Private_Dirty"],
    }
    print(
        f"  {args.processes} loaders: PSS {result['sum_pss_mb']:,.0f} MB, private {result['sum_private_mb']:,.0f} MB, "
        f"RSS {result['sum_rss_mb']:,.0f} MB (shared pages counted in each)",
        file=sys.stderr,
    )
    return result


def block_reads(rows: np.ndarray, block_size: int) -> int:
    """Rows a BlockReader reads for these planned rows: per block, the span from the first to the last needed row
    (crackio.loading.readers.BlockReader._spans, one tar per block as packed)."""
    blocks = rows // block_size
    order = np.lexsort((rows, blocks))
    b, r = blocks[order], rows[order]
    first = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
    last = np.r_[first[1:], len(b)] - 1
    return int((r[last] - r[first] + 1).sum())


def bench_plan(args) -> dict:
    from crackio.loading.orders import BlockOrder, RandomOrder, train_plan
    from crackio.loading.samplers import epoch_draws, make_sampler

    rng = np.random.default_rng(0)
    labels = (rng.random(args.rows) < 0.1).astype(np.int8)  # ~10% cracks, as in the original's proposals
    ious = rng.uniform(0, 1, args.rows).astype(np.float32)
    samplers = {
        "shuffle": {},
        "hard-negatives": {"negatives": args.rows // 10},
        "weighted": {"replacement": True},
        "balanced": {},
    }
    rows = []
    for name, options in samplers.items():
        sampler = make_sampler(name, **options)
        selection = sampler.select(labels, ious, 0)
        for order in (RandomOrder(), BlockOrder(args.block_size, args.window)):
            for world in (1, args.world):
                times = []
                for _ in range(3):  # the least of three: the first pays the page faults of new arrays
                    start = time.perf_counter()
                    draws = epoch_draws(sampler, selection, labels, 0, 3, True)
                    planned, _ = train_plan(draws, args.rows, 0, 3, order, args.global_batch, 0, world)
                    times.append(time.perf_counter() - start)
                seconds = min(times)
                row = {"sampler": name, "order": order.name, "world_size": world, "plan_seconds": seconds}
                if isinstance(order, BlockOrder):
                    reads = [
                        block_reads(train_plan(draws, args.rows, 0, 3, order, args.global_batch, r, world)[0].ravel(),
                                    args.block_size) / planned.size
                        for r in range(world)
                    ]  # fmt: skip
                    row["rows_read_per_row"] = max(reads)
                rows.append(row)
                print(
                    f"  {name:15s} {order.name:6s} W={world}: plan {seconds:.2f} s"
                    + (
                        f", block reads {row['rows_read_per_row']:.2f} rows per row"
                        if "rows_read_per_row" in row
                        else ""
                    ),
                    file=sys.stderr,
                )
    return {
        "rows": args.rows,
        "global_batch": args.global_batch,
        "block_size": args.block_size,
        "window": args.window,
        "results": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("pack", help="packing rate against Pillow's decode")
    p.add_argument("src", type=Path)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--sample", type=int, default=20000, help="files for Pillow's rate and the time shares")
    p.add_argument("--tmp", default=None, help="folder for the output shards (default: the system's)")
    c = sub.add_parser("cold", help="cold- and warm-cache reading by order")
    m = sub.add_parser("memory", help="memory of many processes holding a loader")
    for q in (c, m):
        q.add_argument("shards", type=Path)
        q.add_argument("--split", default="large")
    c.add_argument("--seconds", type=float, default=20.0)
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--block-size", type=int, default=128)
    c.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    c.add_argument("--rows", nargs="+", help="only these rows (default: all)")
    c.add_argument("--repeats", type=int, default=3, help="runs per row, each after dropping the cache; median")
    c.add_argument("--row", help=argparse.SUPPRESS)
    m.add_argument("--processes", type=int, default=8)
    m.add_argument("--code", type=Path, default=ROOT, help="the checkout whose crackio to measure (default: this)")
    n = sub.add_parser("plan", help="what stopping and resuming cost: planning an epoch, block reads per rank")
    n.add_argument("--rows", type=int, default=10_000_000)
    n.add_argument("--world", type=int, default=8)
    n.add_argument("--global-batch", type=int, default=256)
    n.add_argument("--block-size", type=int, default=128)
    n.add_argument("--window", type=int, default=8)
    for q in (p, c, m, n):
        q.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    if args.what == "cold" and args.row:
        print(json.dumps(cold_row(args)))
        return 0
    result = {"pack": bench_pack, "cold": bench_cold, "memory": bench_memory, "plan": bench_plan}[args.what](args)
    result = {"machine": machine(), args.what: result}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
