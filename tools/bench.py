"""Images per second: crackio's loaders against the pipelines a user would pick instead, same machine, cores.

    python tools/bench.py --shards S --src P [--split train] [--batch-size 32] [--seconds S]
    python tools/bench.py --shards s3://BUCKET/PREFIX [...]     crackio's rows on a remote pack (no peers)
                          [--repeats R] [--json OUT.json] [--model] [--quick] [--workers N] [--consumer-rate R]

Rows (train augmentation everywhere except decode-only; peers in tools/bench_peers.py):
    seed-baseline      the original's Dataset (PIL, v2 ColorJitter/flip/rotation/normalize) in a
                       DataLoader over the proposal folder, num_workers = cores, on the files the
                       shards hold (its directory listing is timed apart)
    seed-baseline-w0   the same with num_workers=0, the original's setting
    wds-dataloader     the webdataset library over the same shards in a DataLoader, same transforms
    dali-reader        DALI's fn.readers.webdataset with the .idx files and crackio's operators (and with
                       CUDA dali-reader-gpu: the mixed decoder and GPU operators)
    spdl, torchdata-nodes   SPDL's pipeline / torchdata.nodes (threads) over the proposal folder, PIL + v2
    litdata, mosaic-streaming   the folder converted by the peer's own tool (timed: conversion_s), read by
                       its StreamingDataset with DataLoader workers
                       every peer but the original also as -uint8: the same augmentation, uint8 output;
                       a peer not installed is a skipped row with the command that installs it
    decode-only        torchvision decode_jpeg (libjpeg-turbo) of the same bytes on the
                       same cores, no augmentation: the ceiling of any CPU pipeline
    dali-cpu, torch-cpu, and with CUDA dali-gpu, torch-gpu: crackio.make_loader (normalized float32);
                       the same with -uint8: augmented uint8 output, normalized on the consumer's device
Each row runs in its own process (clean peak RSS); the first batches are warm-up;
the median of the repeats is reported. setup_s is the time to build the row's
loader (the original lists the directory, crackio loads its index); first_batch_s
adds the first batch. For those at scale: make_demo_data.py --large 1000000, pack
that split, and run with --split large. --model adds the classifier's step rate on
synthetic tensors and the data-stall share of each loader feeding it. Each loader
row also feeds simulated accelerators (--consumer-rate, CONSUMERS below) that sleep
len(batch) / R per batch, and reports the share of time they wait for data. Every row reports
its CPU ms per image (all its threads and worker processes) and the cores it got (CPU seconds
per second: on a busy machine, its share of the CPU); the last lines compare crackio's
cheapest CPU row with the cheapest peer per output (float32, uint8) and with decode-only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from crackio.cli import ArgumentParser  # noqa: E402
from tools import bench_peers as peers  # noqa: E402

WARMUP_BATCHES = 3
DECODE_SAMPLE = 8192  # images decode-only cycles through


def decode_only(shards: str | Path, split: str, batch_size: int, workers: int):
    """Yields batch-sized chunks decoded by a pool of `workers` processes (bytes read up front)."""
    import multiprocessing as mp

    import numpy as np

    from crackio.loading.readers import ByteReader
    from crackio.storage.packs import open_pack

    pack = open_pack(shards)
    index = pack.index(split)
    # A fixed sample of the split is enough to measure decoding, and keeps a 1M-row split out of memory.
    rows = np.random.default_rng(0).permutation(len(index))[:DECODE_SAMPLE]
    data = ByteReader(index, pack.files(index)).read(np.sort(rows))
    chunks = [data[i : i + batch_size] for i in range(0, len(data), batch_size)]
    pool = mp.get_context("forkserver").Pool(max(1, workers), initializer=_single_thread)

    def batches():
        while True:
            yield from pool.imap(_decode_chunk, chunks)

    return batches()


def _single_thread():
    import torch

    torch.set_num_threads(1)


def _decode_chunk(chunk: list[bytes]) -> int:
    import torch
    from torchvision.io import decode_jpeg

    decoded = decode_jpeg([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in chunk])
    return len(decoded)


def endless(loader):
    while True:
        yield from loader


def batch_len(batch) -> int:
    return batch if isinstance(batch, int) else len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)


def run_row(args) -> dict:
    """One row, in this process: first batch, then img/s over `seconds` per repeat."""
    import torch
    import torchvision.transforms.v2  # noqa: F401 - imports are not part of any row's setup time
    from PIL import Image  # noqa: F401

    import crackio.loading.loader

    if crackio.loading.loader.dali_available():
        import crackio.loading.dali_backend  # noqa: F401 - importing DALI takes ~0.6 s, once per process

    t0 = time.perf_counter()
    name = args.row
    cores = args.workers
    extra: dict = {}
    base, output = (name.removesuffix("-uint8"), "uint8") if name.endswith("-uint8") else (name, "float32")
    if name.startswith("seed-baseline"):
        folder = Path(args.src) / args.split
        files = index_filenames(args)  # the samples the shards hold: a folder with bad files still gets a baseline
        tick = time.perf_counter()
        listed = peers.listing(folder)  # the original's listing, timed apart
        extra["listing_s"] = time.perf_counter() - tick
        if len(listed) > len(files):
            extra["note"] = (
                f"{len(listed) - len(files)} files of {folder} are not in the shards (bad or skipped "
                f"inputs): the original, reading its own listing, would stop at the first bad one"
            )
        t0 = time.perf_counter()
        it = endless(peers.seed_baseline(folder, files, args.batch_size, 0 if name.endswith("w0") else cores))
    elif base == "wds-dataloader":
        it = endless(peers.wds_dataloader(shard_paths(args), args.batch_size, cores, output=output))
    elif base.startswith("dali-reader"):  # dali-reader (CPU), dali-reader-gpu
        gpu = "gpu" if base.endswith("gpu") else "cpu"
        it = peers.dali_reader(shard_paths(args), args.batch_size, cores, device=gpu, tensors=args.model, output=output)
    elif base in ("spdl", "torchdata-nodes"):  # the proposal folder's files, as the original reads them
        folder, files = Path(args.src) / args.split, index_filenames(args)
        t0 = time.perf_counter()
        make = peers.spdl_loader if base == "spdl" else peers.nodes_loader
        it = endless(make(folder, files, args.batch_size, cores, output))
    elif base in peers.CONVERTED:  # the peer's own format, converted by main() before the rows
        read = peers.litdata_loader if base == "litdata" else peers.mosaic_loader
        it = endless(read(Path(args.peer_dir) / converted_folder(base), args.batch_size, cores, output))
    elif name == "decode-only":
        it = decode_only(args.shards, args.split, args.batch_size, cores)
    else:
        from crackio import make_loader

        backend, device, *rest = name.split("-")  # e.g. dali-cpu, torch-gpu-uint8
        loader = make_loader(
            args.shards,
            args.split,
            batch_size=args.batch_size,
            train=True,
            backend=backend,
            device="cuda" if device == "gpu" else "cpu",
            workers=cores,
            output=output,
        )
        it = endless(loader)
    setup = time.perf_counter() - t0  # the original's directory listing vs crackio's index load
    next(it)
    first = time.perf_counter() - t0
    for _ in range(WARMUP_BATCHES - 1):
        next(it)
    model = step = None
    if args.model and name != "decode-only":
        model, step = make_step(args)
    rates, stalls, cpu, got = [], [], [], []
    for _ in range(args.repeats):
        n, wait, start, used = 0, 0.0, time.perf_counter(), cpu_seconds()
        while time.perf_counter() - start < args.seconds:
            tick = time.perf_counter()
            batch = next(it)
            wait += time.perf_counter() - tick
            if step is not None:
                step(
                    batch
                    if isinstance(batch, torch.Tensor)
                    else batch[0]
                    if isinstance(batch, list | tuple)
                    else batch.images
                )
            n += batch_len(batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        spent = cpu_seconds() - used
        cpu.append(spent / n * 1000)
        got.append(spent / elapsed)
        rates.append(n / elapsed)
        stalls.append(wait / elapsed)
    if step is None and name != "decode-only":
        extra["consumers"] = {f"{rate:g}": consume(it, rate, args.seconds) for rate in args.consumer_rate}
    usage = (resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    rss = max(usage)  # KiB on Linux; the larger of this process and its biggest worker
    row = {
        "name": name,
        "images_per_sec": statistics.median(rates),
        "cpu_ms_per_image": statistics.median(cpu),  # CPU time of every thread and worker process, per image
        "cpu_cores_used": statistics.median(got),  # CPU seconds per wall second: the share of the machine it got
        "cores": cores,
        "setup_s": setup,
        "first_batch_s": first,
        "peak_rss_mb": rss / 1024,
    }
    if step is not None:
        row["data_stall_share"] = statistics.median(stalls)
    return row | extra


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process's threads and of its worker processes, live (psutil reads them)
    and finished: what a row costs the machine, wherever its work runs."""
    import psutil

    me = psutil.Process()
    own = me.cpu_times()
    total = own.user + own.system + own.children_user + own.children_system
    for child in me.children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:  # ended since listed: its time is in children_* once reaped
            continue
        total += times.user + times.system
    return total


def consume(batches, rate: float, seconds: float) -> dict:
    """A simulated accelerator: holds each batch for len(batch) / rate seconds without using the CPU
    (a GPU step leaves the host idle), for `seconds`; returns the share of time it waited for data."""
    n, wait, start = 0, 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tick = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - tick
        k = batch_len(batch)
        n += k
        time.sleep(k / rate)
    elapsed = time.perf_counter() - start
    return {"stall_share": wait / elapsed, "images_per_sec": n / elapsed}


def index_filenames(args) -> list[str]:
    import numpy as np

    from crackio.storage.packs import open_pack

    index = open_pack(args.shards).index(args.split)
    return index.filenames(np.arange(len(index)))


def shard_paths(args) -> list[str]:
    from crackio.format.index import load_index

    return [str(p) for p in load_index(args.shards, args.split).shards]


def make_step(args):
    """A training step of the classifier (AMP + channels_last on CUDA) on whatever images it is given."""
    import torch

    from train.run.losses import make_loss
    from train.run.model import build_model
    from train.run.runtime import amp_dtype
    from train.settings.learning import Bce

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args.arch, "none", "original").to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = make_loss(Bce(), device)
    amp = amp_dtype(device)  # the trainer's choice; fp16 there also scales the loss, a step-rate no-op here

    def step(images):
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(images)
        loss = loss_fn(logits, torch.zeros(len(images), device=device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return model, step


def model_only(args) -> dict:
    import torch

    _, step = make_step(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(args.batch_size, 3, 224, 224, device=device)
    for _ in range(WARMUP_BATCHES):
        step(x)
    rates = []
    for _ in range(args.repeats):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            step(x)
            n += len(x)
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - start))
    return {
        "name": f"model-only ({args.arch}, synthetic)",
        "images_per_sec": statistics.median(rates),
        "cores": args.workers,
        "setup_s": None,
        "first_batch_s": None,
        "peak_rss_mb": None,
    }


# Simulated consumers: img/s of ResNeXt50_32x4d mixed-precision training (estimates for a simulation, not
# measurements). A100: NVIDIA DeepLearningExamples publish 1,211 img/s for ResNeXt101-32x4d (AMP, 1x A100 80GB,
# PyTorch/Classification/ConvNets/resnext101-32x4d/README.md); ResNeXt50_32x4d needs 4.3 of its 8.0 GFLOPs per
# image, so ~2,250. RTX 3060 (the original's GPU): no published figure; it has ~1/8 of an A100's FP16 tensor
# throughput with FP32 accumulation (25 vs 312 TFLOPS) and ~1/5 of its memory bandwidth, so ~300.
CONSUMERS = {"RTX 3060": 300.0, "A100": 2250.0}
PEERS = ("seed-baseline", "wds-dataloader", "dali-reader", "decode-only")


def main(argv=None) -> int:
    from crackio.storage.remote import location

    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--shards",
        required=True,
        type=location,
        help="shards folder from tools/pack.py, or its s3:// or http(s):// URL (then crackio's rows only: the peers "
        "read local files; the cache from $CRACKIO_CACHE_DIR and $CRACKIO_CACHE_LIMIT)",
    )
    ap.add_argument("--src", help="the proposal folder the shards were packed from (required for a local --shards)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=None, help="timed seconds per repeat (default 10; 2 with --quick)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="cores used by every row")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--model", action="store_true", help="add the classifier's step rate and data-stall shares")
    ap.add_argument("--arch", default="resnext50_32x4d", help="classifier for --model")
    ap.add_argument(
        "--consumer-rate",
        type=float,
        action="append",
        metavar="R",
        help="simulate an accelerator consuming R img/s (repeatable; default: "
        + ", ".join(f"{v:.0f} ({k})" for k, v in CONSUMERS.items())
        + ")",
    )
    ap.add_argument("--quick", action="store_true", help="every row briefly (--seconds 2 --repeats 1)")
    ap.add_argument("--only", help="these rows only, comma-separated names (e.g. torch-cpu-uint8,decode-only)")
    ap.add_argument(
        "--peer-dir",
        type=Path,
        help="write the peers' converted data (LitData, Mosaic Streaming) here, in crackio-bench-litdata/ and "
        "crackio-bench-mosaic-streaming/, and keep it (converted again, and timed, each run); default a temporary "
        "folder, removed after",
    )
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    ap.add_argument("--convert", help=argparse.SUPPRESS)  # internal: convert the split for this peer
    args = ap.parse_args(argv)
    args.consumer_rate = args.consumer_rate or list(CONSUMERS.values())
    if any(not rate > 0 for rate in args.consumer_rate):
        ap.error("--consumer-rate must be > 0")
    if min(args.workers, args.batch_size, args.repeats) < 1 or (args.seconds is not None and not args.seconds > 0):
        ap.error("--workers, --batch-size and --repeats must be >= 1 and --seconds > 0")
    if args.peer_dir is not None and args.peer_dir.exists() and not args.peer_dir.is_dir():
        ap.error(f"--peer-dir {args.peer_dir} is a file: give a folder (made if absent)")
    try:
        import psutil  # noqa: F401 - every row's CPU time
    except ImportError:
        ap.error("tools/bench.py measures each row's CPU time with psutil: pip install -e '.[bench]'")
    if args.quick:  # brief rows; an explicit --seconds still counts
        args.repeats = 1
    args.seconds = args.seconds or (2.0 if args.quick else 10.0)
    if args.row:
        print(json.dumps(model_only(args) if args.row == "model-only" else run_row(args)))
        return 0
    if args.convert:
        folder, files = Path(args.src) / args.split, index_filenames(args)
        out = args.peer_dir / converted_folder(args.convert)
        seconds = (
            peers.convert_litdata(folder, files, out, args.workers)
            if args.convert == "litdata"
            else peers.convert_mosaic(folder, files, out)
        )
        print(seconds)
        return 0
    import torch

    from crackio.errors import CrackioError
    from crackio.loading.loader import dali_available
    from crackio.storage.packs import open_pack

    try:  # check the inputs once, here, rather than as one traceback per row
        samples = len(open_pack(args.shards).index(args.split))
    except CrackioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if samples < args.batch_size:
        ap.error(f"split {args.split!r} has {samples} samples, fewer than one batch of {args.batch_size}")
    remote = isinstance(args.shards, str)
    if not remote:
        folder = Path(args.src or "") / args.split
        if not (args.src and folder.is_dir()):
            ap.error(f"--src {args.src} has no folder {args.split}/ (the proposal folder the shards were packed from)")
        listed = set(os.listdir(folder))
        absent = [f for f in index_filenames(args) if f not in listed]
        if absent:
            ap.error(
                f"--src: {folder} lacks {len(absent)} of the {samples} files the shards' split {args.split!r} holds "
                f"(e.g. {absent[0]}): give the proposal folder these shards were packed from"
            )
    if args.peer_dir is not None:
        try:
            args.peer_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            ap.error(f"--peer-dir {args.peer_dir}: cannot make a folder there ({e.strerror or e})")
    rows = candidate_rows(remote, torch.cuda.is_available(), args.model)
    if args.only:
        wanted = [r.strip() for r in args.only.split(",") if r.strip()]
        unknown = [r for r in wanted if r not in rows]
        if unknown:
            gpu = " (rows ending -gpu need CUDA)" if unknown[0].endswith("-gpu") else ""
            ap.error(f"--only {unknown[0]!r} is not a row here{gpu}: rows are {', '.join(rows)}")
        rows = [r for r in rows if r in wanted]
    results: list[dict] = []
    skipped: list[dict] = []
    failed: list[str] = []
    converted: dict[str, float | None] = {}
    work = None
    interrupted = False
    try:
        for row in dict.fromkeys(r.removesuffix("-uint8") for r in rows):  # each peer or backend once
            why = unavailable(row, dali_available())
            if why is None and row in peers.CONVERTED:  # the peer's own format, by its own tool, timed
                if work is None:
                    work = args.peer_dir or Path(tempfile.mkdtemp(prefix="crackio-bench-peers-"))
                why, converted[row] = convert(row, args, work)
            if why is not None:
                skipped += [{"name": r, "skipped": why} for r in rows if r.removesuffix("-uint8") == row]
                print(f"  {row}: skipped ({why})", file=sys.stderr)
        rows = [r for r in rows if r not in {s["name"] for s in skipped}]
        forward = list(argv if argv is not None else sys.argv[1:])
        if work is not None and not args.peer_dir:
            forward += ["--peer-dir", str(work)]
        limit = 120 + args.seconds * (args.repeats + len(args.consumer_rate)) * 3  # a stuck row must not hang the run
        for name in rows:
            try:
                run = subprocess.run(
                    [sys.executable, __file__, *forward, "--row", name], capture_output=True, text=True, timeout=limit
                )
            except subprocess.TimeoutExpired:
                print(f"{name}: no batch for {limit:.0f} s: left out", file=sys.stderr)
                failed.append(name)
                continue
            if run.returncode != 0:
                print(f"{name}: failed\n{run.stderr[-2000:]}", file=sys.stderr)
                failed.append(name)
                continue
            results.append(json.loads(run.stdout.strip().splitlines()[-1]))
            if name.removesuffix("-uint8") in converted:
                results[-1]["conversion_s"] = converted[name.removesuffix("-uint8")]
            print(f"  {name}: {results[-1]['images_per_sec']:.0f} img/s", file=sys.stderr)
    except KeyboardInterrupt:  # the rows finished so far are still worth their table
        interrupted = True
        print("interrupted: the rows finished so far", file=sys.stderr)
    finally:
        if work is not None and not args.peer_dir:
            shutil.rmtree(work, ignore_errors=True)
    rates = {r["name"]: r["images_per_sec"] for r in results}
    for r in results:
        r["images_per_sec_per_core"] = r["images_per_sec"] / r["cores"]
        for peer in PEERS:  # ratios to every peer the user could pick instead
            r["vs_" + peer.replace("-", "_")] = r["images_per_sec"] / rates[peer] if peer in rates else None
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "batch_size": args.batch_size,
        "seconds": args.seconds,
        "repeats": args.repeats,
        "consumers": {
            f"{rate:g}": next((k for k, v in CONSUMERS.items() if v == rate), "given") for rate in args.consumer_rate
        },
    }
    summary = per_cpu_second(results)
    print(table(results, machine, skipped, summary))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": machine, "results": results, "skipped": skipped, "failed": failed, "summary": summary},
                indent=1,
            )
            + "\n"
        )
    if interrupted:
        return 130
    if failed:
        print(f"error: {len(failed)} row(s) failed: {', '.join(failed)} (their errors above)", file=sys.stderr)
        return 1
    return 0


def candidate_rows(remote: bool, cuda: bool, model: bool) -> list[str]:
    """Every row this machine could run, in the table's order (a row whose library is missing is skipped later,
    with the command that installs it). A remote pack: decode-only and crackio's rows (the peers read files)."""
    readers = ["dali-reader", "dali-reader-gpu"] if cuda else ["dali-reader"]
    others = ["wds-dataloader", *readers, *peers.PEER_PACKAGES]  # every peer but the original: float32 and uint8
    rows = (
        ["decode-only"]
        if remote
        else ["seed-baseline", "seed-baseline-w0", *(f"{r}{o}" for r in others for o in ("", "-uint8")), "decode-only"]
    )
    rows += [  # crackio: normalized float32 output, and uint8 output normalized by the consumer's device
        f"{b}-{d}{o}" for d in (["cpu", "gpu"] if cuda else ["cpu"]) for b in ("dali", "torch") for o in ("", "-uint8")
    ]
    return rows + (["model-only"] if model else [])


def unavailable(row: str, dali: bool) -> str | None:
    """Why `row` (without -uint8) cannot run here and the command that installs what it needs; None if it can."""
    if row.startswith("dali-") and not dali:
        return "DALI is not installed here; install with: pip install nvidia-dali-cuda120"
    if row == "wds-dataloader":
        return peers.not_importable("webdataset", "pip install webdataset")
    if row in peers.PEER_PACKAGES:
        return peers.missing(row)
    return None


def converted_folder(peer: str) -> str:
    """The subfolder of --peer-dir a peer's conversion writes (and replaces on the next run): a name of the
    benchmark's own, so no folder of the user's is ever replaced."""
    return f"crackio-bench-{peer}"


def convert(peer: str, args, work: Path) -> tuple[str | None, float | None]:
    """The split's samples in `peer`'s own format under work/peer, by its own tool, in a process of its own (as a
    user runs it); returns (None, seconds) or (why it failed, None): a failed conversion is a skipped row."""
    run = subprocess.run(
        [
            sys.executable,
            __file__,
            "--shards",
            str(args.shards),
            "--src",
            str(args.src),
            "--split",
            args.split,
            "--workers",
            str(args.workers),
            "--peer-dir",
            str(work),
            "--convert",
            peer,
        ],
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        lines = [line.strip() for line in run.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]  # the exception's line
        return f"its conversion failed: {(errors or lines or [f'exit status {run.returncode}'])[-1]}", None
    seconds = float(run.stdout.strip().splitlines()[-1])
    print(f"  {peer}: converted in {seconds:.1f} s", file=sys.stderr)
    return None, seconds


def is_crackio(name: str) -> bool:
    """crackio's own rows: dali-cpu, torch-gpu-uint8, ... (not dali-reader, DALI's own reader)."""
    backend, _, rest = name.partition("-")
    return backend in ("dali", "torch") and rest.split("-")[0] in ("cpu", "gpu")


def per_cpu_second(results: list[dict]) -> dict:
    """crackio's cheapest row against the cheapest peer, per output, in CPU ms per image (lower is better), and
    crackio's uint8 against decode-only (ratio > 1: ahead). Rows on the GPU are left out: their CPU time is not
    their cost."""
    summary: dict = {}
    cpu = {r["name"]: r["cpu_ms_per_image"] for r in results if r.get("cpu_ms_per_image") and "gpu" not in r["name"]}
    for output in ("float32", "uint8"):
        rows = {n: c for n, c in cpu.items() if n != "decode-only" and n.endswith("-uint8") == (output == "uint8")}
        mine = {n: c for n, c in rows.items() if is_crackio(n)}
        theirs = {n: c for n, c in rows.items() if not is_crackio(n)}
        best = min(mine, key=mine.__getitem__) if mine else None
        if best and theirs:
            peer = min(theirs, key=theirs.__getitem__)
            summary[output] = {
                "crackio": best,
                "crackio_cpu_ms": mine[best],
                "peer": peer,
                "peer_cpu_ms": theirs[peer],
                "ratio": theirs[peer] / mine[best],  # > 1: crackio does more images per CPU-second
            }
        if output == "uint8" and best and "decode-only" in cpu:
            summary["uint8_vs_decode_only"] = {"crackio": best, "ratio": cpu["decode-only"] / mine[best]}
    return summary


def table(results: list[dict], machine: dict, skipped: list[dict] | None = None, summary: dict | None = None) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    consumers = list(machine["consumers"])
    lines = [
        f"machine: {machine['cores']} cores, GPU {machine['gpu'] or 'none'}, batch {machine['batch_size']}; "
        f"stall@R: share of time a simulated accelerator consuming R img/s waits for data ("
        + ", ".join(f"{r} = {name}" for r, name in machine["consumers"].items())
        + ")",
        f"{'row':<28}{'img/s':>7}{'/core':>7}{'CPU ms':>7}{'cores':>6}"
        f"{'x seed':>7}{'x wds':>7}{'x dali-rd':>10}{'x decode':>9}"
        f"{'setup s':>8}{'1st s':>7}{'peak MB':>8}{'stall':>6}" + "".join(f" {'stall@' + c:>11}" for c in consumers),
    ]
    for r in results:
        stalls = r.get("consumers", {})
        lines.append(
            f"{r['name']:<28}{r['images_per_sec']:>7.0f}{r['images_per_sec_per_core']:>7.0f}"
            f"{fmt(r.get('cpu_ms_per_image'), '.3f'):>7}{fmt(r.get('cpu_cores_used'), '.2f'):>6}"
            f"{fmt(r['vs_seed_baseline'], '.2f'):>7}{fmt(r['vs_wds_dataloader'], '.2f'):>7}"
            f"{fmt(r['vs_dali_reader'], '.2f'):>10}{fmt(r['vs_decode_only'], '.2f'):>9}"
            f"{fmt(r['setup_s'], '.2f'):>8}{fmt(r['first_batch_s'], '.2f'):>7}"
            f"{fmt(r['peak_rss_mb'], '.0f'):>8}{fmt(r.get('data_stall_share'), '.0%'):>6}"
            + "".join(f" {fmt(stalls.get(c, {}).get('stall_share'), '.0%'):>11}" for c in consumers)
        )
    notes = [f"note: {r['name']}: {r['note']}" for r in results if r.get("note")]
    notes += [
        f"note: {r['name']}: the original's directory listing took {r['listing_s']:.2f} s (not in setup)"
        for r in results
        if r.get("listing_s") is not None and r["name"] == "seed-baseline"
    ]
    converted = {r["name"].removesuffix("-uint8"): r["conversion_s"] for r in results if r.get("conversion_s")}
    notes += [
        f"note: {peer}: its data converted by its own tool in {seconds:.1f} s (not in setup)"
        for peer, seconds in converted.items()
    ]
    lines += [f"{s['name']:<28}skipped: {s['skipped']}" for s in skipped or []]
    for output, best in (summary or {}).items():
        if output == "uint8_vs_decode_only":
            notes.append(f"per CPU-second: {best['crackio']} does {best['ratio']:.2f}x decode-only's images")
        else:
            notes.append(
                f"per CPU-second, {output}: crackio's {best['crackio']} {best['crackio_cpu_ms']:.3f} ms per image, "
                f"the cheapest peer run, {best['peer']}, {best['peer_cpu_ms']:.3f}: {best['ratio']:.2f}x its images"
            )
    return "\n".join(lines + notes)


if __name__ == "__main__":
    sys.exit(main())
