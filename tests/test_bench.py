"""tools/bench.py --quick on CPU: every row runs and the JSON holds the ratios."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # trains networks or runs subprocesses: `make test` runs these, `make test-fast` not


def test_bench_quick_writes_every_row(demo_src, demo_shards, tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "bench.py"),
            "--shards",
            str(demo_shards),
            "--src",
            str(demo_src),
            "--quick",
            "--seconds",
            "1",
            "--batch-size",
            "8",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["name"]: r for r in data["results"]}
    assert {"seed-baseline", "seed-baseline-w0", "decode-only", "dali-cpu", "torch-cpu"} <= set(rows)
    for r in rows.values():
        assert r["images_per_sec"] > 0 and r["cores"] >= 1 and 0 < r["setup_s"] < r["first_batch_s"]
        assert r["vs_seed_baseline"] > 0 and r["vs_decode_only"] > 0 and r["peak_rss_mb"] > 0
    assert rows["seed-baseline"]["vs_seed_baseline"] == 1.0
    assert data["machine"]["cores"] >= 1
    assert "img/s" in run.stdout and "seed-baseline" in run.stdout


def test_large_split_is_hard_links_with_unique_names(tmp_path):
    from crackio.names import parse_name
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
