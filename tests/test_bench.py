"""tools/bench.py --quick on CPU: every row runs and the JSON holds the ratios."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_bench_quick_writes_every_row(demo_src, demo_shards, tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--shards", str(demo_shards),
                          "--src", str(demo_src), "--quick", "--seconds", "1", "--batch-size", "8",
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["name"]: r for r in data["results"]}
    assert {"seed-baseline", "seed-baseline-w0", "decode-only", "dali-cpu", "torch-cpu"} <= set(rows)
    for r in rows.values():
        assert r["images_per_sec"] > 0 and r["cores"] >= 1 and r["first_batch_s"] > 0
        assert r["vs_seed_baseline"] > 0 and r["vs_decode_only"] > 0 and r["peak_rss_mb"] > 0
    assert rows["seed-baseline"]["vs_seed_baseline"] == 1.0
    assert data["machine"]["cores"] >= 1
    assert "img/s" in run.stdout and "seed-baseline" in run.stdout
