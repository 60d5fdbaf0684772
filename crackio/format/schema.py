"""The index's columns: one structured NumPy dtype per split, read by name everywhere."""

from __future__ import annotations

import numpy as np

# Fields the proposal stage (tools/propose.py) adds, for a later box-regression or detection stage.
PROPOSAL_FIELDS = [
    ("box", "<f4", (4,)),  # the proposal in photo pixels: x0, y0, x1, y1 (before context padding)
    ("gt_box", "<f4", (4,)),  # the best-matching ground-truth box (zeros when the photo has none)
    ("gt_id", "<i4"),  # its position in the photo's ground-truth list; -1 when none
    ("photo_size", "<i4", (2,)),  # width, height of the (upright) photo
    ("ground_truth", "i1"),  # 1: a ground-truth box or a jittered copy (training's extra crops); 0: a proposal
]

LOCATED = np.dtype([("key", "<i8"), ("offset", "<i8"), ("size", "<i8"), ("crc32", "<u4")])  # per stored JPEG


def index_dtype(filename_len: int, stem_len: int, extra: list | None = None) -> np.dtype:
    # Fixed-width byte strings keep the index a plain array: np.load(allow_pickle=False)
    # reads it (or memory-maps it), nothing is ever unpickled, and 1M rows load in a fraction of a second.
    return np.dtype(
        [
            ("shard", "<i4"),  # position of the sample's tar in the manifest's shard list
            ("offset", "<i8"),  # byte offset of the JPEG data inside the tar
            ("size", "<i8"),  # JPEG size in bytes
            ("crc32", "<u4"),  # zlib.crc32 of the JPEG bytes, checked on every read
            ("key", "<i8"),  # the sample's key: its position in the split's seeded order (`<key>.sid`)
            ("label", "i1"),  # label as parsed from the file name
            ("iou", "<f4"),  # IoU with the best-matching ground-truth box
            ("proposal", "<i4"),  # proposal number within its full image
            ("filename", f"S{max(filename_len, 1)}"),  # original proposal file name (UTF-8)
            ("stem", f"S{max(stem_len, 1)}"),  # full image the proposal was cut from
            *(extra or []),
        ]
    )


INDEX_COLUMNS = {
    "shard": "i",
    "offset": "i",
    "size": "i",
    "crc32": "u",
    "key": "i",
    "label": "i",
    "iou": "f",
    "proposal": "i",
    "filename": "S",
    "stem": "S",
}  # name: dtype kind every index must have
