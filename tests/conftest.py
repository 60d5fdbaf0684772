"""Shared fixtures: tiny generated proposal sets and their shards, the synthetic photos, one tiny trained run.

Session fixtures are read-only: a test that changes one copies it into its tmp_path first (copy_run)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Under pytest-xdist the workers share the cores: each gets its part for torch's intra-op threads and, through
# OMP_NUM_THREADS, for the processes its tests start; else every worker's threads fight over every core (a training
# test ran 10x slower). Set before torch is imported: its thread pool reads the variable once.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from crackio.loading.loader import dali_available  # noqa: E402
from crackio.writing.filenames import format_name  # noqa: E402
from crackio.writing.pack import PackSettings, pack  # noqa: E402
from tools.make_demo_data import generate, write_photos  # noqa: E402

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed (Linux only)")
BACKENDS = [pytest.param("dali", marks=needs_dali), "torch"]  # every backend a loader test runs on
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# Every device a property test runs on: `pytest -m cuda` selects the GPU cases (DALI's mixed decoder and GPU
# operators, nvJPEG through torchvision, the batched augmentation on the device).
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])]


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def add_odd_inputs(folder: Path) -> dict[str, str]:
    """Readable-but-unusual crops (converted) and bad files (skipped); returns {name: kind}."""
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))
    good = jpeg_bytes(rgb, quality=90)
    files = {
        "gray_jpg.rf.aa.1.0_700.1.jpg": (jpeg_bytes(rgb.convert("L")), "converted"),
        "cmyk_jpg.rf.bb.2.0_200.0.jpeg": (jpeg_bytes(rgb.convert("CMYK")), "converted"),
        "as_png.3.0_800.1.png": (None, "converted"),
        "wide_jpg.4.0_300.0.jpg": (jpeg_bytes(rgb.resize((300, 260))), "converted"),
        "truncated.5.0_600.1.jpg": (good[: len(good) // 2], "skipped"),
        "empty.6.0_100.0.jpg": (b"", "skipped"),
        "notes.7.0_100.0.jpg": (b"this is not an image\n", "skipped"),
        "IMG_0001_badname.jpg": (good, "skipped"),
        "bad.label.8.0_500.7.jpg": (good, "skipped"),
    }
    kinds = {}
    for name, (data, kind) in files.items():
        if data is None:
            rgb.save(folder / name, format="PNG")
        else:
            (folder / name).write_bytes(data)
        kinds[name] = kind
    (folder / "stray").mkdir()
    (folder / "stray" / "x.1.0_1.1.jpg").write_bytes(good)
    kinds["stray"] = "skipped"
    return kinds


@pytest.fixture(scope="session")
def demo_src(tmp_path_factory) -> Path:
    """~240 clean synthetic crops in train/valid/test."""
    out = tmp_path_factory.mktemp("proposals")
    generate(out, images=12, per_image=20, seed=3)
    return out


@pytest.fixture(scope="session")
def demo_shards(demo_src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    pack(demo_src, out, PackSettings(samples_per_shard=50, workers=1), progress=False)
    return out


@pytest.fixture()
def messy_src(demo_src, tmp_path) -> tuple[Path, dict[str, str]]:
    """The demo train split plus odd and bad inputs, as a single-split folder."""
    src = tmp_path / "train"
    shutil.copytree(demo_src / "train", src)
    return src, add_odd_inputs(src)


def code_color(i: int) -> tuple[int, int, int]:
    """A flat colour that encodes sample id i (< 144), robust to JPEG and brightness up to 1.5x."""
    return 40 + 10 * (i % 12), 40 + 10 * (i // 12 % 12), 100


def decode_id(rgb) -> int:
    r, g = (float(v) for v in rgb[:2])
    return int(round((r - 40) / 10)) + 12 * int(round((g - 40) / 10))


@pytest.fixture(scope="session")
def coded_shards(tmp_path_factory) -> Path:
    """Shards whose images' pixels encode their id; the id is the proposal number in the name."""
    src = tmp_path_factory.mktemp("coded")
    rng = np.random.default_rng(7)
    for split, count in (("train", 100), ("valid", 37)):
        (src / split).mkdir()
        for i in range(count):
            iou = round(float(rng.uniform(0, 1)), 3)
            img = Image.new("RGB", (224, 224), code_color(i))
            img.save(src / split / format_name(f"img_{i % 9}.rf.x", i, iou, int(iou > 0.5)), quality=95)
    out = tmp_path_factory.mktemp("coded_shards")
    pack(src, out, PackSettings(samples_per_shard=30, workers=1), progress=False)
    return out


@pytest.fixture(scope="session")
def demo_photos(tmp_path_factory) -> Path:
    """12 synthetic photos (192 x 128, seed 4) with their ground truth in every format: ROOT/<format>/<split>/
    (tools/make_demo_data.py write_photos). Selective search takes ~0.1 s on each."""
    root = tmp_path_factory.mktemp("photos")
    write_photos(root, images=12, seed=4, size=(192, 128))
    return root


@pytest.fixture(scope="session")
def tiny_run(demo_shards, tmp_path_factory) -> Path:
    """A finished one-epoch run of the tiny architecture on demo_shards (RUN/best.pt, last.pt, report, ...), with
    --target-recall 0.9 and --patience 5. Read-only: copy it (copy_run) before changing or resuming it."""
    from tests.helpers import tiny
    from train.run.main import main

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    main(tiny(demo_shards, out, epochs=1, target_recall=0.9, patience=5))
    return out


@pytest.fixture(scope="session")
def proposal_run(demo_photos, tmp_path_factory) -> Path:
    """A one-epoch run of timm's tiny test network (timm/test_efficientnet, from scratch) on a pack the proposal stage
    made from demo_photos' COCO set (--max-proposals 40; the pack is RUN/../pack): what detect, bbox, export and
    timm's backbones are tested on. Read-only: copy it (copy_run) before changing it."""
    from crackio.writing.proposal_stage import ProposeSettings, propose_to_shards
    from crackio.writing.regions import ProposalSettings
    from train.run.main import main
    from train.settings.run import RunSettings

    root = tmp_path_factory.mktemp("proposal_run")
    settings = ProposeSettings(workers=1, samples_per_shard=100)
    propose_to_shards(demo_photos / "coco", "coco", root / "pack", ProposalSettings(max_proposals=40), settings, False)
    flat = {"shards": str(root / "pack"), "out": str(root / "run"), "arch": "timm/test_efficientnet", "weights": "none"}
    main(RunSettings.from_flat({**flat, "head": "linear", "epochs": 1, "limit_batches": 3, "device": "cpu"}))
    return root / "run"


def copy_run(run: Path, to: Path) -> Path:
    """A private copy of a session run, to change or resume."""
    shutil.copytree(run, to)
    return to


@pytest.fixture(scope="session")
def two_ranks(demo_shards, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """A one-epoch run of two CPU ranks under torchrun on demo_shards (batch 8 per rank, one loader worker each,
    a progress line every 3 steps): (the finished torchrun, with its output; the run folder)."""
    from tests.helpers import TINY_ARGS, torchrun

    out = tmp_path_factory.mktemp("ddp") / "ddp"
    cmd = [*torchrun(2), "-m", "train"]
    cmd += ["--shards", str(demo_shards), *TINY_ARGS, "--head", "linear", "--epochs", "1", "--batch-size", "8"]
    cmd += ["--workers", "1", "--log-every", "3", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600), out
