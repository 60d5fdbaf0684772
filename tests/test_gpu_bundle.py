"""The bundle for the GPU machine (tools/gpu_bundle.py) and its install step (tools/gpu_check.py --bundle),
rehearsed without a network on wheels made here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tools.gpu_bundle import MACHINE_HAS, NEEDED, main, project
from tools.gpu_check import install_bundle
from tools.gpu_check import main as gpu_check

ROOT = Path(__file__).resolve().parent.parent


def make_wheel(folder: Path, name: str, module: str, size: int = 0) -> Path:
    """A pure-Python wheel of `name` holding `module` (with `size` bytes of ballast)."""
    dist = f"{name.replace('-', '_')}-1.0"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}/__init__.py", f"VALUE = {name!r}\n")
        z.writestr(f"{module}/ballast.bin", os.urandom(size))
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(
            f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def test_every_dependency_is_bundled_or_on_the_gpu_machine():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=;\[ ]", d, maxsplit=1)[0].lower() for d in deps}
    bundled = {n.format(cuda=12) for n in NEEDED}
    assert names - bundled - set(MACHINE_HAS) == set()
    assert project("opencv_contrib_python_headless-5.1.0.95-cp37-abi3-manylinux_2_28_x86_64.whl") == (
        "opencv-contrib-python-headless"
    )


def test_the_bundle_splits_into_parts_and_installs_what_is_missing(tmp_path, capsys):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "crackio-fake-dep", "crackio_fake_dep", size=300_000)
    make_wheel(wheels, "pytest", "pytest_shadow")  # installed here already: never put over the machine's own
    make_wheel(wheels, "numpy", "numpy_shadow")  # MACHINE_HAS: never bundled
    out = tmp_path / "gpu-bundle"
    assert main(["--wheels", str(wheels), "--out", str(out), "--part-mib", "0.1"]) == 0
    parts = sorted(out.glob("part-*"))
    assert len(parts) == 3 and all(sum(f.stat().st_size for f in p.iterdir()) < 0.11 * 2**20 for p in parts)
    assert "3 parts" in capsys.readouterr().out

    site = tmp_path / "check" / "site"
    assert install_bundle(out, site) == ["crackio_fake_dep-1.0-py3-none-any.whl"]
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = "import crackio_fake_dep, importlib.util as u; print(crackio_fake_dep.VALUE, u.find_spec('pytest_shadow'))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert done.stdout.split() == ["crackio-fake-dep", "None"], done.stderr

    (site / "crackio_fake_dep" / "__init__.py").unlink()  # a damaged install: a second run repairs it
    install_bundle(out, site)
    assert (site / "crackio_fake_dep" / "__init__.py").is_file()

    (parts[1] / "bundle.tar.01").write_bytes(b"x" * (parts[1] / "bundle.tar.01").stat().st_size)  # damaged
    with pytest.raises(SystemExit, match="do not make the bundle"):
        install_bundle(out, tmp_path / "again" / "site")
    (parts[2] / "bundle.tar.02").unlink()  # not carried yet
    with pytest.raises(SystemExit, match=f"carry {out / 'part-02'}"):
        install_bundle(out, tmp_path / "again" / "site")


def test_bad_bundle_options_are_refused_before_anything_is_deleted(tmp_path):
    keep = tmp_path / "work"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    for args, message in (
        (["--out", str(keep), "--wheels", str(tmp_path)], "exists and is not a bundle"),
        (["--out", str(tmp_path / "b"), "--part-mib", "0"], r"--part-mib must be in \(0, 62\]"),
        (["--out", str(tmp_path / "b"), "--part-mib", "100"], r"--part-mib must be in \(0, 62\]"),
        (["--out", str(tmp_path / "b"), "--wheels", str(tmp_path / "none")], "is not a folder of wheels"),
        (["--out", str(tmp_path / "b"), "--wheels", str(keep)], "no wheel to bundle in"),
    ):
        with pytest.raises(SystemExit, match=message):
            main(args)
    assert (keep / "notes.txt").read_text() == "mine"


def test_the_gpu_check_without_cuda_says_what_it_would_run(capsys):
    assert gpu_check(["--dry-run"]) == 0
    said = capsys.readouterr().out
    for title in ("CUDA tests", "nvJPEG hardware decoder", "benchmark", "train dali", "train torch", "detect"):
        assert f"  {title} (at most" in said


@pytest.mark.slow
def test_the_gpu_check_rehearsed_on_the_cpu_passes_every_step(tmp_path):
    """Every command of the GPU machine's one go, run here with tiny sizes: the flags, files and figures."""
    import json

    done = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--rehearse", "--out", str(tmp_path / "check")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    steps = {k: v for k, v in figures.items() if k != "environment"}
    assert {"CUDA tests", "benchmark", "train torch", "detect"} <= set(steps)
    assert all(v["passed"] for v in steps.values()), {
        k: v.get("output", v) for k, v in steps.items() if not v["passed"]
    }
    assert all(found is True for found in figures["environment"]["modules"].values())
    assert steps["train torch"]["train_samples"] > 0 and 0 <= steps["train torch"]["data_wait_share"] < 1
    train = steps["train torch"]  # the loader's stages of the run, as the epoch line and --log have them
    assert train["slowest_stage"] in ("read", "decode", "augment", "normalize") and train["stage_decode_ms"] > 0
    assert steps["benchmark"]["rows_failed"] == [] and "summary" in steps["benchmark"]
    assert (
        "dali-reader" in {r["name"] for r in steps["benchmark"]["rows"]}
        or "nvidia.dali" not in figures["environment"]["modules"]
    )
