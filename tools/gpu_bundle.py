"""The wheels the GPU machine lacks, for its Python and CUDA, in parts that each fit one call of the device tool.

    python tools/gpu_bundle.py [--out gpu-bundle] [--python 3.12] [--cuda 13] [--part-mib 60]   (or: make gpu-bundle)

The GPU machine this project is checked on (one NVIDIA H200; Python 3.12 with its own torch 2.11 for CUDA 13; no
network; at most 64 MiB carried per call) has torch but none of DALI, nvImageCodec, simplejpeg, webdataset,
opencv-contrib or pycocotools. This downloads their wheels for that Python and CUDA with `pip download` (binary
wheels only, dependencies included), leaves out what a machine with torch has (`MACHINE_HAS`: numpy, Pillow,
torch, ...; their builds must match its torch), packs the rest into one tar and cuts it into parts of
`--part-mib` MiB (default 56): OUT/part-00/, OUT/part-01/, ..., each a folder with its piece and `bundle.json`
(every piece's size, the tar's size and SHA-256, the wheels). OUT is ignored by git; `python3 tools/gpu_check.py
--bundle OUT` on the GPU machine puts the tar together once every part has arrived, checks it, and installs the
wheels it does not have already into a temporary folder. docs/gpu.md gives the calls.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The project's dependencies (pyproject.toml) for a machine that lacks them, with the DALI and nvImageCodec builds
# of its CUDA major version ({cuda}); pytest for the CUDA tests. tests/test_gpu_bundle.py checks that every
# dependency in pyproject.toml is here or in MACHINE_HAS.
NEEDED = (
    "nvidia-dali-cuda{cuda}0",
    "nvidia-nvimgcodec-cu{cuda}",
    "simplejpeg",
    "webdataset",
    "opencv-contrib-python-headless",
    "pycocotools",
    "pyyaml",
    "obstore",
    "tqdm",
    "scikit-learn",  # these three are installed only where missing (tools/gpu_check.py), never over the machine's
    "scipy",
    "matplotlib",
    "pytest",
)
# What a machine with its own torch has, and must keep: binary builds tied to its torch and numpy ABI. A package
# of this list that the machine lacks is named by tools/gpu_check.py's first step.
MACHINE_HAS = ("torch", "torchvision", "numpy", "pillow")
MANIFEST = "bundle.json"
TAR = "bundle.tar"


def project(wheel: str) -> str:
    """A wheel file's project name, normalized (PEP 503): `opencv_contrib_python_headless-5.1...whl` ->
    `opencv-contrib-python-headless`."""
    return wheel.split("-")[0].lower().replace("_", "-").replace(".", "-")


def download(python: str, cuda: int, into: Path) -> list[Path]:
    """`pip download` of NEEDED and their dependencies for CPython `python` on manylinux x86-64; returns the
    wheels kept (MACHINE_HAS left out).

    Raises:
        SystemExit: pip failed (its last lines are printed).
    """
    platforms = [f"--platform={p}" for p in ("manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux2014_x86_64")]
    cmd = [
        sys.executable, "-m", "pip", "download", "--only-binary=:all:", f"--python-version={python}",
        "--implementation=cp", *platforms, "--dest", str(into), "--quiet",
        *(name.format(cuda=cuda) for name in NEEDED),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"pip download failed:\n{done.stderr[-2000:]}")
    return sorted(w for w in into.glob("*.whl") if project(w.name) not in MACHINE_HAS)


def split(wheels: list[Path], out: Path, part_bytes: int) -> dict:
    """One tar of `wheels` cut into OUT/part-NN/bundle.tar.NN pieces of at most `part_bytes`, with the manifest in
    every part; returns the manifest."""
    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / TAR
        with tarfile.open(tar, "w") as t:
            for wheel in wheels:
                t.add(wheel, arcname=wheel.name)
        data = tar.read_bytes()
    pieces = [data[i : i + part_bytes] for i in range(0, len(data), part_bytes)]
    manifest = {
        "tar_bytes": len(data),
        "tar_sha256": hashlib.sha256(data).hexdigest(),
        "pieces": [{"part": f"part-{k:02d}", "bytes": len(p)} for k, p in enumerate(pieces)],
        "wheels": [w.name for w in wheels],
    }
    for k, piece in enumerate(pieces):
        folder = out / f"part-{k:02d}"
        folder.mkdir()
        (folder / f"{TAR}.{k:02d}").write_bytes(piece)
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "gpu-bundle", help="bundle folder (default: gpu-bundle)")
    ap.add_argument("--python", default="3.12", help="the GPU machine's Python, major.minor (default: 3.12)")
    ap.add_argument("--cuda", type=int, default=13, help="the GPU machine's CUDA major version (default: 13)")
    ap.add_argument(
        "--part-mib", type=float, default=56, help="largest part, MiB (default: 56: a call carries 64 in all)"
    )
    ap.add_argument("--wheels", type=Path, help="bundle these wheels (a folder) instead of downloading")
    args = ap.parse_args(argv)
    if not 0 < args.part_mib <= 62:
        raise SystemExit(
            f"--part-mib must be in (0, 62] (a call carries 64 MiB with the checkout), got {args.part_mib}"
        )
    if args.wheels and not args.wheels.is_dir():
        raise SystemExit(f"--wheels {args.wheels} is not a folder of wheels")
    if args.out.exists() and not (args.out.is_dir() and all(p.name.startswith("part-") for p in args.out.iterdir())):
        raise SystemExit(f"--out {args.out} exists and is not a bundle (only part-NN folders): choose another --out")
    with tempfile.TemporaryDirectory() as tmp:
        if args.wheels:
            wheels = sorted(w for w in args.wheels.glob("*.whl") if project(w.name) not in MACHINE_HAS)
        else:
            wheels = download(args.python, args.cuda, Path(tmp))
        if not wheels:
            raise SystemExit(f"no wheel to bundle in {args.wheels}")
        if args.out.exists():
            shutil.rmtree(args.out)  # an earlier bundle: replaced only once the new wheels are here
        args.out.mkdir(parents=True)
        manifest = split(wheels, args.out, int(args.part_mib * 2**20))
    for piece in manifest["pieces"]:
        print(f"{args.out / piece['part']}: {piece['bytes'] / 2**20:.1f} MiB")
    print(
        f"{len(manifest['wheels'])} wheels, {manifest['tar_bytes'] / 2**20:.0f} MiB in {len(manifest['pieces'])} "
        f"parts; carry each part-NN folder, then on the GPU machine: python3 tools/gpu_check.py --bundle "
        f"{args.out.name} (docs/gpu.md)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
