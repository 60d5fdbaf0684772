"""tools/bench.py --quick on CPU: every row runs and the JSON holds the ratios."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import tools.bench
from crackio.loading.loader import dali_available
from tests.conftest import ROOT
from tests.helpers import FakeClock
from tools.bench import consume

pytestmark = pytest.mark.slow  # trains networks or runs subprocesses: `make test` runs these, `make test-fast` not


DALI_ROWS = ("dali-reader", "dali-cpu-uint8")
ROWS = tuple(
    r
    for r in (
        "seed-baseline",
        "wds-dataloader",
        "dali-reader",
        "litdata-uint8",
        "mosaic-streaming",
        "decode-only",
        "torch-cpu",
        "dali-cpu-uint8",
        "torch-cpu-uint8",
    )
    if dali_available() or r not in DALI_ROWS
)  # every kind of row once; seed-baseline-w0 and dali-cpu differ from these by one argument (the suite's budget)


def test_bench_quick_writes_every_row(demo_src, demo_shards, tmp_path):
    out = tmp_path / "bench.json"
    src = tmp_path / "src"
    shutil.copytree(demo_src, src)
    (src / "train" / "broken.1.0_500.1.jpg").write_bytes(b"not a jpeg")  # the normal case: a few bad files
    (src / "train" / "empty.2.0_100.0.jpg").write_bytes(b"")
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "bench.py"),
            "--shards",
            str(demo_shards),
            "--src",
            str(src),
            "--quick",
            "--seconds",
            "0.3",
            "--batch-size",
            "8",
            "--json",
            str(out),
            "--only",  # every kind of row once (the peers' other outputs: tests/test_bench_peers.py)
            ",".join(ROWS),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["name"]: r for r in data["results"]}
    skipped = {r["name"]: r["skipped"] for r in data["skipped"]}
    assert set(rows) == set(ROWS) - set(skipped), run.stderr[-3000:]
    for name, why in skipped.items():  # a peer not installed here: a row that says how to install it
        assert name in ("litdata-uint8", "mosaic-streaming") and "install with: pip install" in why
        assert f"{name}" in run.stdout and "skipped:" in run.stdout
    if "litdata-uint8" in rows:  # converted by LitData's own tool, timed apart
        assert rows["litdata-uint8"]["conversion_s"] > 0 and "converted by its own tool" in run.stdout
    # crackio's cheapest CPU row against the cheapest peer, per output, and its uint8 against decode-only
    summary = data["summary"]
    assert summary["float32"]["crackio"] == "torch-cpu" and summary["float32"]["ratio"] > 0
    if "litdata-uint8" in rows:  # the one uint8 peer row here
        assert summary["uint8"]["crackio"] in ("dali-cpu-uint8", "torch-cpu-uint8")
        assert summary["uint8"]["peer"] == "litdata-uint8" and summary["uint8"]["ratio"] > 0
    assert summary["uint8_vs_decode_only"]["ratio"] > 0 and "per CPU-second" in run.stdout
    peers = ("seed_baseline", "wds_dataloader", "decode_only") + (("dali_reader",) if dali_available() else ())
    for r in rows.values():
        assert r["images_per_sec"] > 0 and r["cores"] >= 1 and 0 < r["setup_s"] < r["first_batch_s"]
        assert all(r[f"vs_{peer}"] > 0 for peer in peers) and r["peak_rss_mb"] > 0
        assert 0 < r["cpu_ms_per_image"] < 1000  # every thread's and worker process's CPU, per image
        assert 0 < r["cpu_cores_used"] <= data["machine"]["cores"] * 1.1  # CPU seconds per second (clock slack)
        if r["name"] != "decode-only":  # every loader row fed the two simulated accelerators
            assert set(r["consumers"]) == {"300", "2250"}
            assert all(0 <= c["stall_share"] <= 1 for c in r["consumers"].values())
    assert rows["seed-baseline"]["vs_seed_baseline"] == 1.0 and rows["wds-dataloader"]["vs_wds_dataloader"] == 1.0
    # The folder holds bad files: the baseline still runs, on the shards' samples, and says so.
    assert "would stop at the first bad one" in rows["seed-baseline"]["note"] and "note: seed-baseline" in run.stdout
    assert data["machine"]["cores"] >= 1
    assert "img/s" in run.stdout and "seed-baseline" in run.stdout and "CPU ms" in run.stdout


def test_large_split_is_hard_links_with_unique_names(tmp_path):
    from crackio.writing.filenames import parse_name
    from tools.make_demo_data import generate, link_large

    generate(tmp_path, images=3, per_image=4, seed=0)
    train = {f.stat().st_ino: parse_name(f.name) for f in (tmp_path / "train").iterdir()}
    assert link_large(tmp_path, "large", 3 * len(train) + 1) == 3 * len(train) + 1
    large = list((tmp_path / "large").iterdir())
    assert len(large) == 3 * len(train) + 1
    for f in large:  # every name is a link to a train crop and keeps its proposal, IoU and label
        source, copy = train[f.stat().st_ino], parse_name(f.name)
        assert copy.stem.startswith(source.stem + "_c")
        assert (copy.proposal, copy.iou, copy.label) == (source.proposal, source.iou, source.label)


def fake_loader(clock: FakeClock, rate: float, batch: int = 10):
    """A loader that makes `rate` img/s in this thread (no read-ahead): each batch takes batch / rate seconds of
    `clock`'s time."""
    while True:
        clock.sleep(batch / rate)
        yield list(range(batch)), None  # (images, labels), as the loaders yield


def test_a_slow_consumer_never_waits_and_a_fast_one_waits_for_the_rest(monkeypatch):
    clock = FakeClock(monkeypatch, tools.bench)  # the consumer's clock and sleeps: the loader's time, not the CPU's
    slow = consume(fake_loader(clock, 5000), rate=100, seconds=0.5)  # the accelerator is 50x slower than the loader
    assert slow["stall_share"] < 0.05 and slow["images_per_sec"] == pytest.approx(100, rel=0.1)
    fast = consume(fake_loader(clock, 200), rate=20000, seconds=0.5)  # 100x faster: it waits ~1 - 200/20000 of the time
    assert fast["stall_share"] == pytest.approx(1 - 200 / 20000, abs=0.03)
    assert fast["images_per_sec"] == pytest.approx(200, rel=0.1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_check_says_no_cuda_and_exits_0(capsys):
    from tools.gpu_check import main

    assert main([]) == 0
    assert "no CUDA" in capsys.readouterr().out


def test_bad_bench_inputs_are_one_line(demo_src, demo_shards, capsys, tmp_path):
    from tools.bench import main

    assert main(["--shards", str(demo_shards), "--src", str(demo_src), "--split", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "split 'nosuch' is not in" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["--shards", str(demo_shards), "--src", str(demo_src), "--batch-size", "100000"])
    assert "fewer than one batch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--shards", str(demo_shards), "--src", str(demo_src), "--repeats", "0"])
    assert "--repeats must be >= 1" in capsys.readouterr().err.replace(" and --repeats", " --repeats")
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(SystemExit):
        main(["--shards", str(demo_shards), "--src", str(demo_src), "--peer-dir", str(afile)])
    assert f"--peer-dir {afile} is a file" in capsys.readouterr().err
    # a --src that is not the folder the shards were packed from: one line before any row runs
    other = tmp_path / "other"
    (other / "train").mkdir(parents=True)
    names = sorted(os.listdir(demo_src / "train"))
    for name in names[:5]:
        shutil.copy(demo_src / "train" / name, other / "train" / name)
    with pytest.raises(SystemExit):
        main(["--shards", str(demo_shards), "--src", str(other)])
    err = capsys.readouterr().err
    assert f"lacks {len(names) - 5} of the {len(names)} files" in err and "packed from" in err


def test_a_failed_row_fails_the_run_and_a_missing_library_is_a_skipped_row(
    demo_src, demo_shards, tmp_path, monkeypatch
):
    import tools.bench as bench

    assert "pip install nvidia-dali-cuda120" in bench.unavailable("dali-reader", dali=False)
    assert "pip install nvidia-dali-cuda120" in bench.unavailable("dali-cpu", dali=False)
    assert bench.unavailable("torch-cpu", dali=False) is None and bench.unavailable("decode-only", dali=True) is None
    assert bench.converted_folder("litdata") == "crackio-bench-litdata"  # never a folder of the user's own

    def run(command, **kw):  # every row's process fails
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="RuntimeError: boom")

    monkeypatch.setattr(bench.subprocess, "run", run)
    out = tmp_path / "b.json"
    code = bench.main(
        ["--shards", str(demo_shards), "--src", str(demo_src), "--only", "torch-cpu", "--quick", "--json", str(out)]
    )
    data = json.loads(out.read_text())
    assert code == 1 and data["failed"] == ["torch-cpu"] and data["results"] == []


def test_bench_scale_pack_and_memory(demo_src, demo_shards, tmp_path):
    scale = [sys.executable, str(ROOT / "tools" / "bench_scale.py")]
    out = tmp_path / "pack.json"
    run = subprocess.run(
        [*scale, "pack", str(demo_src), "--workers", "1", "2", "--samples-per-shard", "50", "--json", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())["pack"]
    assert result["inputs"] == 240 and [r["workers"] for r in result["rows"]] == [1, 2]
    assert all(r["files_per_sec"] > 0 and r["vs_pillow"] > 0 for r in result["rows"])
    shares = result["shares"]
    assert abs(shares["share_read"] + shares["share_check_decode"] + shares["share_write"] - 1) < 0.5
    out = tmp_path / "memory.json"
    run = subprocess.run(
        [*scale, "memory", str(demo_shards), "--split", "train", "--processes", "2", "--json", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    memory = json.loads(out.read_text())["memory"]
    assert memory["processes"] == 2 and 0 < memory["sum_pss_mb"] <= memory["sum_rss_mb"]


@pytest.mark.parametrize("row", ["random", "block", "webdataset"])
def test_bench_scale_cold_rows_read(demo_shards, row):
    scale = [sys.executable, str(ROOT / "tools" / "bench_scale.py")]
    args = ["cold", str(demo_shards), "--split", "train", "--seconds", "0.5", "--batch-size", "8", "--block-size", "16"]
    run = subprocess.run([*scale, *args, "--row", row], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1])["images_per_sec"] > 0


def test_bench_scale_plan_times_an_epoch_plan_and_block_reads(tmp_path):
    from tools.bench_scale import block_reads

    assert block_reads(np.array([9, 0, 131, 3, 130, 5]), 128) == 10 + 2  # spans: rows 0..9 of block 0, 130..131
    out = tmp_path / "plan.json"
    scale = [sys.executable, str(ROOT / "tools" / "bench_scale.py")]
    args = ["plan", "--rows", "20000", "--world", "2", "--global-batch", "32", "--json", str(out)]
    run = subprocess.run([*scale, *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())["plan"]["results"]
    assert len(rows) == 4 * 2 * 2 and all(r["plan_seconds"] > 0 for r in rows)
    block = {(r["sampler"], r["world_size"]): r["rows_read_per_row"] for r in rows if r["order"] == "block"}
    assert block[("shuffle", 1)] == pytest.approx(1.0, abs=0.01) and block[("shuffle", 2)] >= 1.0
