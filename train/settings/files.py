"""`--config FILE`: a run's settings from YAML, TOML or JSON (a run's config.json reproduces the run)."""

from __future__ import annotations

import re
from pathlib import Path

from crackio.errors import ConfigError, MissingFile
from train.settings.run import RUN_ID, check_names


def read_config_file(path: str) -> dict:
    """The settings of `--config FILE`: YAML (.yaml, .yml), TOML (.toml) or JSON (.json, e.g. a run's config.json),
    a table of option names (underscores) to values of their types; `iou_threshold` may be "none", `cache_limit` a
    number of bytes. YAML's floats are YAML 1.2's: `lr: 1e-3` is a number, as in TOML and JSON.

    Raises:
        MissingFile: no such file.
        ConfigError: another suffix, unparsable text, not a table, unknown keys (with the closest name), a value
            of the wrong type, or `resume` (a resumed run keeps its own config); each naming the file.
    """
    file = Path(path)
    if not file.is_file():
        raise MissingFile(f"--config {file} does not exist" + (" (it is a folder)" if file.is_dir() else ""))
    suffix = file.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ConfigError(f"--config {file}: give a .yaml, .yml, .toml or .json file (a run's config.json works)")
    try:
        text = file.read_text()
        if not text.strip():
            data = {}  # an empty file of any of the three: no settings
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix == ".json":
            import json

            data = json.loads(text, object_pairs_hook=_unique)
        else:
            data = _yaml(text)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {file} cannot be read ({e})") from e
    except Exception as e:  # noqa: BLE001 - tomllib, json and yaml each raise their own parse error
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"--config {file} is not valid {suffix[1:].upper()}: {first}") from e
    if data is None:
        data = {}  # an empty YAML file
    if isinstance(data, dict) and isinstance(data.get("log"), list):  # log: [tensorboard, csv]
        data["log"] = ",".join(map(str, data["log"]))
    if isinstance(data, dict) and data.get("iou_threshold") == "none":
        data["iou_threshold"] = None
    limit = data.get("cache_limit") if isinstance(data, dict) else None
    if isinstance(limit, int | float) and not isinstance(limit, bool):  # cache_limit: 1073741824 (bytes)
        data["cache_limit"] = str(limit)  # read as --cache-limit's text is, and refused in its words
    check_names(data, f"--config {file}")  # keys and types, with the closest name for a typo
    if RUN_ID in data:  # a run's own config.json: `resume` is how it was last started, not a setting of it
        data = {k: v for k, v in data.items() if k != "resume"}
    if data.get("resume"):
        raise ConfigError(
            f"--config {file} sets resume: a resumed run keeps its own settings; use --resume RUN without --config"
        )
    return {k: v for k, v in data.items() if k not in ("resume", RUN_ID)}  # a run's identity is not a setting


def _unique(pairs: list[tuple[str, object]]) -> dict:
    """A table from JSON's key-value pairs, refusing a key given twice (json keeps the last one silently; TOML
    refuses it itself)."""
    table: dict = {}
    for key, value in pairs:
        if key in table:
            raise ValueError(f"{key!r} is given twice")
        table[key] = value
    return table


# YAML 1.2's numbers (its core schema), not 1.1's: 1.1's floats need a dot (PyYAML's SafeLoader reads `lr: 1e-3` as
# the text "1e-3"), and its integers read `seed: 010` as octal 8 and `1:30` as 90 (base 60).
INT_1_2 = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
FLOAT_1_2 = re.compile(
    r"""^(?:[-+]?[0-9]+\.[0-9]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.[0-9]+(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9]+[eE][-+]?[0-9]+
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


def _int_1_2(loader, node) -> int:
    """A YAML 1.2 integer: decimal (`010` is ten), `0o` octal, `0x` hexadecimal."""
    text = loader.construct_scalar(node)
    base = {"0o": 8, "0x": 16}.get(text[:2].lower(), 10)
    return int(text[2:] if base != 10 else text, base)


def _yaml(text: str):
    """YAML as plain data (yaml.SafeLoader: nothing constructed), numbers as YAML 1.2 reads them (`1e-3` is a
    number, `010` ten), a key given twice in a table refused."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
            twice = sorted({str(k) for k in keys if keys.count(k) > 1})
            if twice:
                raise yaml.constructor.ConstructorError(None, None, f"{twice[0]!r} is given twice", node.start_mark)
            return super().construct_mapping(node, deep=deep)

    float_tag, int_tag = "tag:yaml.org,2002:float", "tag:yaml.org,2002:int"
    Loader.yaml_implicit_resolvers = {  # the class's own copy, without YAML 1.1's number resolvers
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in (float_tag, int_tag)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(int_tag, INT_1_2, list("-+0123456789"))
    Loader.add_implicit_resolver(float_tag, FLOAT_1_2, list("-+0123456789."))
    Loader.add_constructor(int_tag, _int_1_2)
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
