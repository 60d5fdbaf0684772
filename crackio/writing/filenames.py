"""Proposal file names: `<stem>.<proposal>.<iou with _ for .>.<label>.<ext>`."""

from __future__ import annotations

from typing import NamedTuple

from crackio.errors import CrackioError
from crackio.fsio import display_name

# Formats Pillow reads; anything but a 224x224 RGB JPEG is converted when packed.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class Proposal(NamedTuple):
    filename: str
    stem: str
    proposal: int
    iou: float
    label: int


class BadName(CrackioError, ValueError):
    """A file name that is not `<stem>.<proposal>.<iou>.<label>.<ext>`."""


def parse_name(filename: str) -> Proposal:
    """Parse a proposal file name right to left, so stems may contain dots.

    Args:
        filename: base name such as `IMG_0042_jpg.rf.9f8e7d.17.0_734.1.jpg`.

    Raises:
        BadName: with the reason the name does not parse.
    """
    if not is_utf8(filename):
        raise BadName(
            f"{display_name(filename)!r}: the name is not valid UTF-8 (an archive unpacked with another "
            f"code page?); rename the file in UTF-8"
        )
    # Right to left: Roboflow-style stems ("IMG_0042_jpg.rf.<hash>") hold dots,
    # so the original's `split(".")[2]` breaks on them.
    parts = filename.rsplit(".", 4)
    if len(parts) != 5:
        raise BadName(
            f"{filename!r}: expected <stem>.<proposal>.<iou>.<label>.<ext> (5 dot-separated parts, found {len(parts)})"
        )
    stem, proposal, iou, label, ext = parts
    if "." + ext.lower() not in IMAGE_EXTENSIONS:
        raise BadName(f"{filename!r}: extension .{ext} is not one of {', '.join(IMAGE_EXTENSIONS)}")
    if not stem:
        raise BadName(f"{filename!r}: empty stem")
    if not _digits(proposal):
        raise BadName(f"{filename!r}: proposal number {proposal!r} is not a non-negative integer in ASCII digits")
    if label not in ("0", "1"):
        raise BadName(f"{filename!r}: label {label!r} is not 0 or 1")
    whole, sep, frac = iou.partition("_")
    if not (_digits(whole) and (not sep or _digits(frac))):
        raise BadName(
            f"{filename!r}: IoU {iou!r} is not a number in ASCII digits written with '_' for '.' (e.g. 0_734)"
        )
    value = float(f"{whole}.{frac}" if sep else whole)
    if not 0.0 <= value <= 1.0:
        raise BadName(f"{filename!r}: IoU {value} is outside [0, 1]")
    return Proposal(filename, stem, int(proposal), value, int(label))


def is_utf8(name: str) -> bool:
    """False for a name read from disk whose bytes are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _digits(text: str) -> bool:
    # str.isdigit() also accepts "²" and Arabic-Indic digits, which int() and float() then refuse or misread.
    return text.isascii() and text.isdigit()


def format_name(stem: str, proposal: int, iou: float, label: int, ext: str = "jpg") -> str:
    """The inverse of `parse_name`, with the IoU written to 3 decimals."""
    iou_text = f"{iou:.3f}".replace(".", "_")
    return f"{stem}.{proposal}.{iou_text}.{label}.{ext}"
