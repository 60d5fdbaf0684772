"""Inputs from the field, one of each kind, written beside good crops (tests/test_field_inputs.py)."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def quadrants(size: int = 224) -> Image.Image:
    """An RGB picture whose every flip and rotation looks different: four flat quadrants, a marker."""
    a = np.zeros((size, size, 3), np.uint8)
    h = size // 2
    a[:h, :h] = (200, 40, 40)
    a[:h, h:] = (40, 200, 40)
    a[h:, :h] = (40, 40, 200)
    a[h:, h:] = (220, 220, 60)
    a[10:40, 10:100] = (255, 255, 255)  # a bar near the top-left: tells a transpose from a rotation
    return Image.fromarray(a)


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return jpeg(img, exif=exif.tobytes())


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def corrupt_jpeg() -> bytes:
    """A JPEG cut short with an end-of-image marker appended: opens everywhere, decodes with warnings."""
    rng = np.random.default_rng(2)
    data = jpeg(Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)))
    return data[: len(data) // 3] + b"\xff\xd9"


def twelve_bit_jpeg() -> bytes:
    data = bytearray(jpeg(quadrants()))
    sof = data.find(b"\xff\xc0")
    data[sof + 4] = 12  # the frame header's sample precision
    return bytes(data)


# name -> (bytes, expected outcome, text the reason or conversion note must hold)
def field_files() -> dict[str, tuple[bytes, str, str]]:
    ramp16 = Image.fromarray(np.tile(np.linspace(0, 65535, 224).astype(np.uint16), (224, 1)))
    float01 = Image.fromarray(np.full((224, 224), 0.5, np.float32))
    float_big = Image.fromarray(np.full((224, 224), 300.0, np.float32))
    palette = Image.new("P", (224, 224), 1)
    palette.putpalette([255, 255, 255, 10, 200, 10] + [0] * 762)
    palette.paste(0, (0, 0, 112, 224))  # left half: index 0, white but transparent
    palette.info["transparency"] = 0
    la = Image.merge("LA", (Image.new("L", (224, 224), 200), Image.new("L", (224, 224), 128)))
    return {
        "beton_\u00e9_\u00fc.2.0_600.1.jpg": (jpeg(quadrants()), "stored", ""),
        "digits.\u0661\u0662.0_500.1.jpg": (jpeg(quadrants()), "skipped", "ASCII digits"),
        "rotated_jpg.rf.1.3.0_700.1.jpg": (with_orientation(quadrants(), 6), "converted", "EXIF orientation 6 applied"),
        "depth16.4.0_800.1.png": (encoded(ramp16, "PNG"), "converted", "16-bit range scaled to 8 bits"),
        "float01.5.0_200.0.tif": (encoded(float01, "TIFF"), "converted", "float [0, 1] scaled to 8 bits"),
        "float_big.6.0_200.0.tif": (encoded(float_big, "TIFF"), "skipped", "only [0, 1] has a known scale"),
        "palette_alpha.7.0_100.0.png": (encoded(palette, "PNG"), "converted", "transparency composited over black"),
        "gray_alpha.8.0_100.0.png": (encoded(la, "PNG"), "converted", "transparency composited over black"),
        "warned.9.0_900.1.jpg": (corrupt_jpeg(), "skipped", "JPEG data is corrupt: decoder warning"),
        "deep.10.0_900.1.jpg": (twelve_bit_jpeg(), "skipped", "12-bit JPEG: not supported by Pillow/DALI"),
        "noise.11.0_100.0.jpg": (
            bytes(np.random.default_rng(3).integers(0, 256, 3000, dtype=np.uint8)),
            "skipped",
            "not an image format Pillow can read",
        ),
        "page.12.0_100.0.jpg": (b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", "skipped", "HTML page"),
        "lfs.13.0_100.0.jpg": (
            b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n",
            "skipped",
            "git lfs pull",
        ),
        "at_zero.14.0_000.1.jpg": (jpeg(quadrants()), "stored", ""),  # a crack label at IoU 0: no threshold gives it
        # A camera JPEG with an embedded preview opens as MPO: its first image is the photo.
        "camera_mpo.16.0_700.1.jpg": (mpo(), "converted", "MPO RGB, the first of its 2 images kept"),
        "animated.17.0_100.0.gif": (animated_gif(), "skipped", "GIF with 2 frames (animated or multi-page)"),
    }


def mpo() -> bytes:
    buf = io.BytesIO()
    quadrants().save(buf, format="MPO", quality=95, save_all=True, append_images=[Image.new("RGB", (64, 48))])
    return buf.getvalue()


def animated_gif() -> bytes:
    buf = io.BytesIO()
    frames = [quadrants().convert("P"), quadrants().transpose(Image.Transpose.ROTATE_90).convert("P")]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


NON_UTF8 = b"caf\xe9_jpg.15.0_500.0.jpg"  # a Latin-1 byte, as old Windows zips write names


def build(src_demo: Path, dst: Path) -> dict:
    """dst = the demo proposal set + one input of each field kind; returns what each should become."""
    shutil.copytree(src_demo, dst)
    train = dst / "train"
    files = field_files()
    for name, (data, _, _) in files.items():
        (train / name).write_bytes(data)
    fd = os.open(os.fsencode(train) + b"/" + NON_UTF8, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, jpeg(quadrants()))
    os.close(fd)
    # Operating-system debris and dataset metadata.
    (dst / "__MACOSX" / "train").mkdir(parents=True)
    (dst / "__MACOSX" / "train" / "._a.1.0_500.1.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (train / "._IMG_1.1.0_500.1.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (dst / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (dst / "README.md").write_text("# dataset\n")
    (dst / "data.yaml").write_text("names: [crack]\n")
    (train / "_annotations.coco.json").write_text("{}")
    # Leakage: a train crop's bytes again in test, and a train photo's proposal in valid.
    first = sorted(train.glob("IMG_*.jpg"))[0]
    (dst / "test" / "copied_jpg.rf.z.1.0_900.1.jpg").write_bytes(first.read_bytes())
    stem = first.name.rsplit(".", 4)[0]
    (dst / "valid" / f"{stem}.999.0_100.0.jpg").write_bytes(jpeg(quadrants().transpose(Image.Transpose.ROTATE_90)))
    return {"files": files, "duplicate": first.name, "stem": stem}
