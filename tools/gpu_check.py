"""One command for a machine with an NVIDIA GPU: what it lacks installed, the CUDA tests, the GPU benchmark rows,
ResNeXt50 training fed by each GPU backend, detection on the GPU; one table, written step by step.

    python tools/gpu_check.py [--bundle gpu-bundle] [--out DIR] [--seconds S] [--dry-run]   (or: make gpu-check)

--bundle: the parts `make gpu-bundle` made (tools/gpu_bundle.py), carried to this machine one call each: their tar
is put together, checked (sizes, SHA-256) and the wheels this Python lacks are installed into OUT/site (never over
the machine's own packages); every later step runs with OUT/site and this checkout on PYTHONPATH, so a machine with
its own torch and no network needs no pip index.

Steps (each one's figures go into OUT/gpu_check.json as soon as it ends, so a later failure keeps them):
  0. environment: GPU, driver, torch and CUDA, every module the project imports (what is missing is named);
  1. the CUDA tests (pytest -m cuda): the property suite on the GPU paths;
  2. nvJPEG: whether this GPU's hardware JPEG decoder decodes (nvImageCodec, hardware backend only);
  3. tools/bench.py --quick --model on a synthetic set: dali-gpu and torch-gpu beside the CPU rows, DALI's own
     reader and the peers installed there (a missing one is a skipped row naming its install command),
     ResNeXt50_32x4d's mixed-precision step rate on tensors already on the GPU (the ceiling), each loader's stall
     share and CPU ms per image, and the per-CPU-second summary;
  4. ResNeXt50_32x4d training (bf16/fp16 autocast, channels_last) fed by each GPU backend, then with --compile:
     images/s, the measured share of training time spent waiting for data, and the loader's per-stage figures
     (its slowest stage);
  5. `python -m train detect` on synthetic photos, on the GPU.
Without CUDA it says so, prints what it would run (--dry-run prints it anyway) and exits 0; --rehearse runs every
step here on the CPU with tiny sizes, to check the commands and files before the GPU machine's one go.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.gpu_bundle import MANIFEST, TAR, project  # noqa: E402

# Every module the project imports outside the standard library, by the distribution that provides it.
MODULES = {
    "torch": "torch",
    "torchvision": "torchvision",
    "nvidia.dali": "nvidia-dali",
    "nvidia.nvimgcodec": "nvidia-nvimgcodec",
    "numpy": "numpy",
    "PIL": "pillow",
    "simplejpeg": "simplejpeg",
    "webdataset": "webdataset",
    "cv2": "opencv-contrib-python-headless",
    "cv2.ximgproc": "opencv-contrib-python-headless",
    "pycocotools": "pycocotools",
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "yaml": "pyyaml",
    "pytest": "pytest",
}
# Lets `nvidia.dali` in OUT/site and the machine's own `nvidia.*` (CUDA libraries of its torch) share one package.
NVIDIA_INIT = "from pkgutil import extend_path\n\n__path__ = extend_path(__path__, __name__)\n"


def has_module(name: str) -> bool:
    """Whether `name` can be imported here (False also when a parent package is missing)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def install_bundle(bundle: Path, site: Path) -> list[str]:
    """Put the bundle's tar together from its parts, check it, and install into `site` the wheels whose project
    this Python does not have; returns their file names.

    Raises:
        SystemExit: a part missing, incomplete or damaged (naming it and what to carry), or pip failing.
    """
    manifests = sorted(bundle.glob(f"part-*/{MANIFEST}"))
    if not manifests:
        raise SystemExit(f"{bundle} holds no part-NN/{MANIFEST}: carry the folders `make gpu-bundle` made")
    manifest = json.loads(manifests[0].read_text())
    pieces = [bundle / p["part"] / f"{TAR}.{k:02d}" for k, p in enumerate(manifest["pieces"])]
    for path, piece in zip(pieces, manifest["pieces"]):
        if not path.is_file() or path.stat().st_size != piece["bytes"]:
            raise SystemExit(
                f"{path} is missing or incomplete: carry {bundle / piece['part']} (one call each, back to back so "
                f"the machine stays warm), then run this again"
            )
    site.mkdir(parents=True, exist_ok=True)
    wheels = site.parent / "wheels"
    wheels.mkdir(exist_ok=True)
    tar, digest = site.parent / TAR, hashlib.sha256()
    with open(tar, "wb") as f:
        for path in pieces:
            data = path.read_bytes()
            digest.update(data)
            f.write(data)
    if digest.hexdigest() != manifest["tar_sha256"]:
        raise SystemExit(f"the parts in {bundle} do not make the bundle they were cut from: make and carry them again")
    with tarfile.open(tar) as t:
        t.extractall(wheels, filter="data")
    tar.unlink()
    missing = [w for w in manifest["wheels"] if not installed(project(w))]
    if missing:
        # --upgrade: a second run replaces what an earlier, damaged install left in `site`.
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--upgrade", "--quiet", "--target"]
        cmd.append(str(site))
        done = subprocess.run([*cmd, *(str(wheels / w) for w in missing)], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"installing the bundle failed:\n{done.stderr[-2000:]}")
    if (site / "nvidia").is_dir():
        (site / "nvidia" / "__init__.py").write_text(NVIDIA_INIT)
    return missing


def environment(env: dict) -> dict:
    """What this Python can import (in a fresh process with `env`), and the GPU it sees."""
    probe = (
        "import importlib, json, sys\n"
        f"mods = {list(MODULES)!r}\n"
        "found = {}\n"
        "for m in mods:\n"
        "    try:\n"
        "        importlib.import_module(m); found[m] = True\n"
        "    except Exception as e:\n"
        "        found[m] = f'{type(e).__name__}: {e}'[:200]\n"
        "import torch\n"
        "gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None\n"
        "print(json.dumps({'python': sys.version.split()[0], 'torch': torch.__version__, 'cuda': torch.version.cuda,"
        " 'gpu': gpu, 'modules': found}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        return {"failed": done.stderr[-1500:]}
    return json.loads(done.stdout.splitlines()[-1])


def step(title: str, cmd: list[str], timeout: float, env: dict) -> tuple[bool, float, str]:
    print(f"== {title}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    try:
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return False, time.perf_counter() - start, f"timed out after {timeout:.0f} s"
    return run.returncode == 0, time.perf_counter() - start, run.stdout + run.stderr


def probe_nvjpeg() -> dict:
    """Whether this GPU's hardware JPEG decoder decodes a 224x224 crop (nvImageCodec with only its hardware
    backend; DALI's mixed decoder uses the same engine where there is one)."""
    import numpy as np
    import simplejpeg
    from nvidia import nvimgcodec  # type: ignore[attr-defined]

    jpeg = simplejpeg.encode_jpeg(np.full((224, 224, 3), 128, np.uint8), quality=90)
    try:
        decoder = nvimgcodec.Decoder(backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)])
        return {"hardware_decoder": decoder.decode(jpeg) is not None}
    except Exception as e:  # noqa: BLE001 - any failure means: no hardware decoding here; its text says why
        return {"hardware_decoder": False, "why": f"{type(e).__name__}: {e}"[:300]}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What the steps run on: the GPU machine's figures, or a rehearsal's on this machine's CPU (--rehearse)."""

    device: str = "cuda"
    arch: str = "resnext50_32x4d"
    images: int = 60  # synthetic photos (and proposal crops per photo), as make demo
    proposals: int = 40
    batch_size: int = 128
    seconds: float = 2.0  # timed seconds per benchmark row (about 14 rows with CUDA)
    compile: bool = True
    bench_rows: str = ""  # the benchmark's rows (bench.py --only); "" = every row
    limit_batches: int = 0  # training's --limit-batches; 0 = whole epochs


# Every command with tiny sizes: one row of each kind the check reads (a peer's, crackio's, the model's), 4 steps.
REHEARSAL = Sizes(device="cpu", arch="shufflenet_v2_x0_5", images=8, proposals=12, batch_size=16, seconds=0.3,
                  compile=False, bench_rows="dali-reader,torch-cpu-uint8,model-only", limit_batches=4)  # fmt: skip


def bench_rows(sizes: Sizes) -> str:
    """The benchmark rows `sizes` asks for that this machine has (DALI's rows need DALI)."""
    dali = has_module("nvidia.dali")
    return ",".join(r for r in sizes.bench_rows.split(",") if dali or not r.startswith("dali"))


def plan(py: str, out: Path, sizes: Sizes) -> list[tuple[str, list[str], float]]:
    """Every step after the environment: (title, command, timeout in seconds), in order."""
    data, shards, photos = out / "proposals", out / "shards", out / "photos"
    # Training runs on the proposal stage's shards of the photos, so that detection can use its checkpoint.
    regions = out / "shards-photos"
    train = [py, "-m", "train", "--shards", str(regions), "--arch", sizes.arch, "--weights", "none", "--epochs", "1"]
    train += ["--batch-size", str(sizes.batch_size), "--device", sizes.device, "--checkpoint-every", "0"]
    train += ["--limit-batches", str(sizes.limit_batches)] if sizes.limit_batches else []
    steps = [
        ("CUDA tests", [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"], 300.0),
        ("nvJPEG hardware decoder", [py, "tools/gpu_check.py", "--probe-nvjpeg"], 60.0),
        (
            "demo data",
            [
                py,
                "tools/make_demo_data.py",
                str(data),
                "--images",
                str(sizes.images),
                "--proposals-per-image",
                str(sizes.proposals),
                "--photos",
                str(photos),
                "--formats",
                "coco",
            ],
            300.0,
        ),  # fmt: skip
        ("pack", [py, "tools/pack.py", str(data), "--out", str(shards), "--quiet"], 300.0),
        (
            "propose",
            [
                py,
                "tools/propose.py",
                str(photos / "coco"),
                "--format",
                "coco",
                "--out",
                str(regions),
                "--max-proposals",
                "300",
                "--negatives-per-image",
                "40",
                "--quiet",
            ],
            300.0,
        ),  # fmt: skip
        (
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
                str(sizes.seconds),
                "--batch-size",
                str(min(sizes.batch_size, 32)),
                "--model",
                "--arch",
                sizes.arch,
                "--json",
                str(out / "bench.json"),
                *(["--only", bench_rows(sizes)] if sizes.bench_rows else []),
            ],
            420.0,
        ),  # fmt: skip
    ]
    backend = ["dali", "torch"] if has_module("nvidia.dali") or sizes.device == "cuda" else ["torch"]
    for name in backend:
        steps.append((f"train {name}", [*train, "--backend", name, "--out", str(out / f"train-{name}")], 300.0))
    if sizes.compile:
        steps.append(("train dali compiled", [*train, "--backend", "dali", "--compile", "true", "--out",
                                              str(out / "train-compiled")], 420.0))  # fmt: skip
    detect = [py, "-m", "train", "detect", "--checkpoint", str(out / f"train-{backend[0]}" / "best.pt")]
    detect += [str(photos / "coco" / "test"), "--annotations", str(photos / "coco" / "test"), "--format", "coco"]
    steps.append(("detect", [*detect, "--device", sizes.device, "--out", str(out / "detect")], 300.0))
    return steps


STAGE_KEYS = ("handover_wait_ms", "batches_in_flight", "batches_ready", "slowest_stage")


def figures_of(title: str, ok: bool, secs: float, text: str, out: Path, device: str) -> dict:
    """What a step measured, from its output and files; an unexpected output is this step's failure only."""
    try:
        return _figures_of(title, ok, secs, text, out, device)
    except (OSError, ValueError, KeyError, IndexError) as e:
        return {"passed": False, "seconds": round(secs, 1), "output": f"{type(e).__name__}: {e}\n{text[-1500:]}"}


def _figures_of(title: str, ok: bool, secs: float, text: str, out: Path, device: str) -> dict:
    result: dict = {"passed": ok, "seconds": round(secs, 1)}
    if title == "CUDA tests":
        result["tail"] = text.strip().splitlines()[-1:]
        if device == "cuda" and "skipped" in " ".join(result["tail"]):  # on the GPU every case must run
            result["passed"] = False
    elif title == "nvJPEG hardware decoder" and ok:
        result |= json.loads(text.strip().splitlines()[-1])
    elif title == "benchmark" and (out / "bench.json").exists():
        # tools/bench.py exits 1 when a row fails or hangs (named in "failed"): that fails this step, and the rows
        # that ran, the skipped ones (with their install commands) and the per-CPU-second summary still count.
        bench = json.loads((out / "bench.json").read_text())
        result |= {k: bench.get(k) for k in ("skipped", "summary")}
        result |= {"rows": bench["results"], "rows_failed": bench.get("failed", []), "passed": ok}
    elif title.startswith("train") and ok:
        folder = out / ("train-compiled" if "compiled" in title else f"train-{title.split()[1]}")
        row = json.loads((folder / "history.json").read_text())[0]
        keys = ("images_per_sec", "data_wait_share", "gpu_busy_share", "train_seconds", "train_samples")
        result |= {k: row[k] for k in keys if k in row}
        # the loader's per-stage figures of that epoch (crackio.loading.stages): which stage starves the GPU
        result |= {k: v for k, v in row.items() if k.startswith("stage_") or k in STAGE_KEYS}
    elif title == "detect" and ok:
        result["summary"] = json.loads((out / "detect" / "summary.json").read_text())
    if not result["passed"]:
        result["output"] = text[-1500:]
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/gpu-check"), help="working folder (default runs/gpu-check)")
    ap.add_argument("--bundle", type=Path, help="the parts of `make gpu-bundle`, to install first")
    ap.add_argument("--seconds", type=float, default=Sizes.seconds, help="timed seconds per benchmark row")
    ap.add_argument("--dry-run", action="store_true", help="print the steps and exit")
    ap.add_argument("--json", type=Path, help="also write the figures here, step by step (e.g. $OUT/gpu_check.json)")
    ap.add_argument(
        "--budget",
        type=float,
        default=480,
        help="seconds for all steps (default 480): a step gets at most what is left, none starts with < 20 s",
    )
    ap.add_argument(
        "--rehearse",
        action="store_true",
        help="run every step here on the CPU with tiny sizes (the commands, files and figures, not the GPU)",
    )
    ap.add_argument("--probe-nvjpeg", action="store_true", help=argparse.SUPPRESS)  # step 2, in its own process
    args = ap.parse_args(argv)
    if args.probe_nvjpeg:
        print(json.dumps(probe_nvjpeg()))
        return 0
    out = args.out.resolve()
    env = dict(os.environ)
    if args.bundle and not args.dry_run:
        site = out / "site"
        start = time.perf_counter()
        added = install_bundle(args.bundle, site)
        print(f"installed {len(added)} wheel(s) into {site} in {time.perf_counter() - start:.0f} s", flush=True)
        env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    sizes = REHEARSAL if args.rehearse else dataclasses.replace(Sizes(), seconds=args.seconds)
    steps = plan(sys.executable, out, sizes)
    cuda = args.rehearse or (has_module("torch") and _cuda_available())
    if args.dry_run or not cuda:
        if not cuda:
            print("no CUDA: torch sees no NVIDIA GPU on this machine, so there is nothing to check here; on one:")
        for title, cmd, timeout in steps:
            print(f"  {title} (at most {timeout:.0f} s): {shlex.join(cmd)}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    reports = [out / "gpu_check.json", *([args.json] if args.json else [])]

    def save(figures: dict) -> None:  # step by step: a later failure, or the call's time limit, keeps these
        for path in reports:
            path.write_text(json.dumps(figures, indent=1) + "\n")

    figures: dict = {"environment": environment(env)}
    save(figures)
    lacking = [m for m, found in figures["environment"].get("modules", {}).items() if found is not True]
    if lacking:
        print(f"cannot import: {', '.join(lacking)} (see {reports[0]}); the steps that need them will fail", flush=True)
    deadline = time.monotonic() + args.budget
    for title, cmd, timeout in steps:
        left = deadline - time.monotonic()
        if left < 20:
            figures[title] = {"passed": False, "seconds": 0, "output": f"skipped: --budget {args.budget:g} s spent"}
            save(figures)
            continue
        ok, secs, text = step(title, cmd, min(timeout, left), env)
        figures[title] = figures_of(title, ok, secs, text, out, sizes.device)
        save(figures)
        print(f"   {'ok' if figures[title]['passed'] else 'FAILED'} in {secs:.0f} s", flush=True)
    print_table(figures)
    print(f"all figures: {', '.join(map(str, reports))}")
    return 0 if all(v.get("passed", True) for v in figures.values() if isinstance(v, dict)) else 1


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def print_table(figures: dict) -> None:
    env = figures["environment"]
    gpu = env.get("gpu") or "no GPU (a rehearsal)"
    print(f"\n{gpu}, torch {env.get('torch')} (CUDA {env.get('cuda')}), Python {env.get('python')}")
    for title, result in figures.items():
        if title == "environment":
            continue
        said = {True: "hardware decoder used", False: "no hardware decoder"}.get(result.get("hardware_decoder"), "")
        print(f"{title:<28}{'ok' if result['passed'] else 'FAILED':>8}{result['seconds']:>8.0f} s  {said}")
    for row in figures.get("benchmark", {}).get("rows", []):
        stall = row.get("data_stall_share")
        print(
            f"  {row['name']:<36}{row['images_per_sec']:>8.0f} img/s  stall {'-' if stall is None else f'{stall:.0%}'}"
        )
    for title, result in figures.items():
        if title.startswith("train") and "images_per_sec" in result:
            busy = result.get("gpu_busy_share")
            print(
                f"  {title:<44}{result['images_per_sec']:>8.0f} img/s  waiting for data {result['data_wait_share']:.0%}"
                + (f", GPU busy {busy:.0%}" if busy is not None else "")
                + (f", slowest loader stage {result['slowest_stage']}" if result.get("slowest_stage") else "")
            )


if __name__ == "__main__":
    sys.exit(main())
