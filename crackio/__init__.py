"""crackio: WebDataset shards, DALI and torch loaders, and samplers for R-CNN crack proposals."""

from crackio.errors import ConfigError, CrackioError, MissingFile, WriteError
from crackio.loader import Batch, Loader, make_loader
from crackio.names import BadName, Proposal, format_name, parse_name
from crackio.shards import ShardError, SplitIndex, load_index, read_manifest, verify

__all__ = [
    "ConfigError",
    "CrackioError",
    "MissingFile",
    "WriteError",
    "Batch",
    "Loader",
    "make_loader",
    "BadName",
    "Proposal",
    "format_name",
    "parse_name",
    "ShardError",
    "SplitIndex",
    "load_index",
    "read_manifest",
    "verify",
]
