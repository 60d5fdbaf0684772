"""Shared fixtures: tiny generated proposal sets and their shards."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from crackio.loading.loader import dali_available  # noqa: E402
from crackio.writing.filenames import format_name  # noqa: E402
from crackio.writing.pack import PackSettings, pack  # noqa: E402
from tools.make_demo_data import generate  # noqa: E402

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
