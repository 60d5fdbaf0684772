"""`--config FILE`: a run's settings from YAML, TOML or JSON (a run's config.json reproduces the run)."""

from __future__ import annotations

from pathlib import Path

from crackio.errors import ConfigError, MissingFile
from train.settings.run import check_names


def read_config_file(path: str) -> dict:
    """The settings of `--config FILE`: YAML (.yaml, .yml), TOML (.toml) or JSON (.json, e.g. a run's config.json),
    a table of option names (underscores) to values of their types; `iou_threshold` may be "none".

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
    check_names(data, f"--config {file}")  # keys and types, with the closest name for a typo
    if data.get("resume"):
        raise ConfigError(
            f"--config {file} sets resume: a resumed run keeps its own settings; use --resume RUN without --config"
        )
    return {k: v for k, v in data.items() if k != "resume"}


def _unique(pairs: list[tuple[str, object]]) -> dict:
    """A table from JSON's key-value pairs, refusing a key given twice (json keeps the last one silently; TOML
    refuses it itself)."""
    table: dict = {}
    for key, value in pairs:
        if key in table:
            raise ValueError(f"{key!r} is given twice")
        table[key] = value
    return table


def _yaml(text: str):
    """YAML as plain data (yaml.SafeLoader: nothing constructed), a key given twice in a table refused."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
            twice = sorted({str(k) for k in keys if keys.count(k) > 1})
            if twice:
                raise yaml.constructor.ConstructorError(None, None, f"{twice[0]!r} is given twice", node.start_mark)
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
