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

            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)  # safe_load: plain data only, nothing constructed
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
