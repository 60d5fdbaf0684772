"""crackio: WebDataset shards, DALI and torch loaders, and samplers for R-CNN crack proposals.

Three sides of one seam: `crackio.format` (the on-disk contract), `crackio.writing` (what writes it:
pack, the proposal stage) and `crackio.loading` (what reads it: loader, samplers, backends), with
`crackio.storage` below both (where a pack lives: `open_pack`, `RemoteSettings`). The
public names below are imported on first use, so `import crackio.writing...` never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_PUBLIC = {
    "ConfigError": "crackio.errors",
    "CrackioError": "crackio.errors",
    "MissingFile": "crackio.errors",
    "WriteError": "crackio.errors",
    "ShardError": "crackio.format.layout",
    "read_manifest": "crackio.format.manifest",
    "SplitIndex": "crackio.format.index",
    "load_index": "crackio.format.index",
    "verify": "crackio.format.verify",
    "BadName": "crackio.writing.filenames",
    "Proposal": "crackio.writing.filenames",
    "format_name": "crackio.writing.filenames",
    "parse_name": "crackio.writing.filenames",
    "Batch": "crackio.loading.loader",
    "Loader": "crackio.loading.loader",
    "make_loader": "crackio.loading.loader",
    "Shuffle": "crackio.loading.samplers",
    "HardNegatives": "crackio.loading.samplers",
    "IouStrata": "crackio.loading.samplers",
    "Weighted": "crackio.loading.samplers",
    "Balanced": "crackio.loading.samplers",
    "Rcnn": "crackio.loading.samplers",
    "open_pack": "crackio.storage.packs",
    "RemoteSettings": "crackio.storage.settings",
}
__all__ = [
    "ConfigError",
    "CrackioError",
    "MissingFile",
    "WriteError",
    "ShardError",
    "read_manifest",
    "SplitIndex",
    "load_index",
    "verify",
    "BadName",
    "Proposal",
    "format_name",
    "parse_name",
    "Batch",
    "Loader",
    "make_loader",
    "Shuffle",
    "HardNegatives",
    "IouStrata",
    "Weighted",
    "Balanced",
    "Rcnn",
    "open_pack",
    "RemoteSettings",
]

if TYPE_CHECKING:
    from crackio.errors import ConfigError, CrackioError, MissingFile, WriteError
    from crackio.format.index import SplitIndex, load_index
    from crackio.format.layout import ShardError
    from crackio.format.manifest import read_manifest
    from crackio.format.verify import verify
    from crackio.loading.loader import Batch, Loader, make_loader
    from crackio.loading.samplers import Balanced, HardNegatives, IouStrata, Rcnn, Shuffle, Weighted
    from crackio.storage.packs import open_pack
    from crackio.storage.settings import RemoteSettings
    from crackio.writing.filenames import BadName, Proposal, format_name, parse_name


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'crackio' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
