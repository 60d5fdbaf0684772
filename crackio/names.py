"""Proposal file names: `<stem>.<proposal>.<iou with _ for .>.<label>.<ext>`."""

from __future__ import annotations

from typing import NamedTuple

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class Proposal(NamedTuple):
    filename: str
    stem: str
    proposal: int
    iou: float
    label: int


class BadName(ValueError):
    """A file name that is not `<stem>.<proposal>.<iou>.<label>.<ext>`."""


def parse_name(filename: str) -> Proposal:
    """Parse a proposal file name right to left, so stems may contain dots.

    Args:
        filename: base name such as `IMG_0042_jpg.rf.9f8e7d.17.0_734.1.jpg`.

    Raises:
        BadName: with the reason the name does not parse.
    """
    # Right to left: Roboflow-style stems ("IMG_0042_jpg.rf.<hash>") hold dots,
    # so the original's `split(".")[2]` breaks on them.
    parts = filename.rsplit(".", 4)
    if len(parts) != 5:
        raise BadName(
            f"{filename!r}: expected <stem>.<proposal>.<iou>.<label>.<ext> "
            f"(5 dot-separated parts, found {len(parts)})"
        )
    stem, proposal, iou, label, ext = parts
    if "." + ext.lower() not in IMAGE_EXTENSIONS:
        raise BadName(f"{filename!r}: extension .{ext} is not one of {', '.join(IMAGE_EXTENSIONS)}")
    if not stem:
        raise BadName(f"{filename!r}: empty stem")
    if not proposal.isdigit():
        raise BadName(f"{filename!r}: proposal number {proposal!r} is not a non-negative integer")
    if label not in ("0", "1"):
        raise BadName(f"{filename!r}: label {label!r} is not 0 or 1")
    whole, sep, frac = iou.partition("_")
    if not (whole.isdigit() and (not sep or frac.isdigit())):
        raise BadName(f"{filename!r}: IoU {iou!r} is not a number written with '_' for '.' (e.g. 0_734)")
    value = float(f"{whole}.{frac}" if sep else whole)
    if not 0.0 <= value <= 1.0:
        raise BadName(f"{filename!r}: IoU {value} is outside [0, 1]")
    return Proposal(filename, stem, int(proposal), value, int(label))


def format_name(stem: str, proposal: int, iou: float, label: int, ext: str = "jpg") -> str:
    """The inverse of `parse_name`, with the IoU written to 3 decimals."""
    iou_text = f"{iou:.3f}".replace(".", "_")
    return f"{stem}.{proposal}.{iou_text}.{label}.{ext}"
