"""One command for a machine with an NVIDIA GPU: the CUDA tests, the GPU benchmark rows, one ResNeXt50 epoch.

    python tools/gpu_check.py [--out DIR] [--seconds S]      (or: make gpu-check)

On a machine without CUDA it says so and exits 0. With CUDA, in about 5 minutes:
  1. the CUDA-only tests (pytest -m cuda);
  2. tools/bench.py --quick --model on a small synthetic set: the dali-gpu and torch-gpu rows beside the CPU
     ones, ResNeXt50_32x4d's mixed-precision step rate on synthetic tensors, and each loader's stall share;
  3. one short ResNeXt50_32x4d epoch on that set (bf16/fp16 autocast, channels_last; then with --compile);
and prints one table of the figures, also written to OUT/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def step(title: str, cmd: list[str], timeout: float) -> tuple[bool, float, str]:
    print(f"== {title}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    try:
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.perf_counter() - start, f"timed out after {timeout:.0f} s"
    output = run.stdout + run.stderr
    return run.returncode == 0, time.perf_counter() - start, output


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/gpu-check"), help="working folder (default runs/gpu-check)")
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per benchmark row")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            f"no CUDA: torch {torch.__version__} sees no NVIDIA GPU on this machine, so there is nothing to check "
            f"here; run `make gpu-check` on a machine with one"
        )
        return 0
    py = sys.executable
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    figures: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    ok, secs, text = step("CUDA tests", [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"], 300)
    ok = ok or "no tests ran" in text  # pytest exits 5 when no test is selected: nothing failed
    figures["cuda_tests"] = {"passed": ok, "seconds": round(secs, 1), "tail": text.strip().splitlines()[-1:]}
    data, shards = out / "proposals", out / "shards"
    if not (shards / "manifest.json").is_file():
        step(
            "demo data",
            [py, "tools/make_demo_data.py", str(data), "--images", "40", "--proposals-per-image", "40"],
            300,
        )
        step("pack", [py, "tools/pack.py", str(data), "--out", str(shards), "--quiet"], 300)
    bench_json = out / "bench.json"
    ok, secs, text = step(
        "benchmark",
        [
            py,
            "tools/bench.py",
            "--shards",
            str(shards),
            "--src",
            str(data),
            "--quick",
            "--seconds",
            str(args.seconds),
            "--model",
            "--json",
            str(bench_json),
        ],
        600,
    )
    figures["bench"] = json.loads(bench_json.read_text())["results"] if ok else text[-2000:]
    for compiled in (False, True):
        run = out / f"epoch{'-compile' if compiled else ''}"
        cmd = [
            py,
            "-m",
            "train",
            "--shards",
            str(shards),
            "--arch",
            "resnext50_32x4d",
            "--weights",
            "none",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--device",
            "cuda",
            "--out",
            str(run),
            "--compile",
            str(compiled).lower(),
        ]
        subprocess.run(["rm", "-rf", str(run)])
        ok, secs, text = step(f"one ResNeXt50 epoch{' (compiled)' if compiled else ''}", cmd, 600)
        history = json.loads((run / "history.json").read_text()) if ok else []
        figures[f"epoch{'_compile' if compiled else ''}"] = (
            {
                "seconds": round(secs, 1),
                "images_per_sec": history[0]["images_per_sec"],
                "data_wait_share": history[0]["data_wait_share"],
            }
            if history
            else {"failed": text[-1500:]}
        )
    (out / "gpu_check.json").write_text(json.dumps(figures, indent=1) + "\n")
    verdict = "passed" if figures["cuda_tests"]["passed"] else "FAILED"
    print(f"\n{figures['gpu']}, torch {figures['torch']}: CUDA tests {verdict}")
    if isinstance(figures["bench"], list):
        print(f"{'row':<36}{'img/s':>8}{'stall':>8}")
        for r in figures["bench"]:
            stall = r.get("data_stall_share")
            print(f"{r['name']:<36}{r['images_per_sec']:>8.0f}{'-' if stall is None else format(stall, '.0%'):>8}")
    for key in ("epoch", "epoch_compile"):
        e = figures[key]
        if "failed" in e:
            print(f"{key}: failed: {e['failed'][-300:]}")
        else:
            print(
                f"{key}: {e['images_per_sec']:.0f} img/s, {e['data_wait_share']:.0%} waiting for data, "
                f"{e['seconds']:.0f} s with start-up"
            )
    print(f"all figures: {out / 'gpu_check.json'}")
    return 0 if figures["cuda_tests"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
