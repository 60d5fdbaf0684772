"""Settings as command-line flags: the one mechanism every command and tool uses to turn a frozen settings
dataclass into argparse options (`python -m train` and its subcommands, tools/pack.py, tools/propose.py).

A field becomes `--field-name`, typed by its annotation (`int`, `float`, `str`, `bool`, or one of them `| None`,
where `none` on the command line gives None; `tuple[str, ...]` a flag given once per value, `--shards A --shards B`;
`tuple[float, ...]` comma-separated numbers, `--mix 0.3,0.7`), helped by the `#` comment after it in the class's
source, its
default shown as typed (crackio.cli.HelpFormatter). The flags of one settings class go into one `--help` group.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import types
import typing
from collections.abc import Iterable, Mapping

from crackio.cli import typed

BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def flag(name: str) -> str:
    """The flag of a field: `block_size` -> `--block-size`."""
    return "--" + name.replace("_", "-")


def field_help(cls: type) -> dict[str, str]:
    """Each field's `#` comment in the source of `cls` and of its dataclass bases (a subclass's comment wins)."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        for line in inspect.getsource(klass).splitlines():
            line = line.strip()
            if ":" in line and "#" in line and not line.startswith(("#", "def", '"', "@")):
                helps[line.split(":", 1)[0].strip()] = line.split("#", 1)[1].strip()
    return helps


_FIELD_TYPES: dict[type, dict[str, tuple[type, bool]]] = {}


def field_types(cls: type) -> dict[str, tuple[type, bool]]:
    """(base type, accepts None) per field of `cls`, from its resolved annotations (once per class: settings
    owners read it whenever one is made, to check a number by its field's type). Read it, never change it."""
    if cls in _FIELD_TYPES:
        return _FIELD_TYPES[cls]
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = (
            typing.get_args(hint)
            if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
            else ()
        )
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        out[name] = (typing.get_origin(base) or base, optional)
    _FIELD_TYPES[cls] = out
    return out


def parse_bool(text: str) -> bool:
    value = BOOLS.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def optional(kind: type):
    """An argparse type for `kind | None`: `none` (or an empty value) gives None."""

    def parse(text: str):
        if text.lower() in ("none", ""):
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} or none, got {text!r}") from None

    parse.__name__ = f"{kind.__name__}_or_none"
    return parse


def numbers(kind: type):
    """An argparse type for `tuple[kind, ...]` written as comma-separated values ("0.3,0.7")."""

    def parse(text: str) -> tuple:
        try:
            return tuple(kind(part) for part in text.split(","))  # "" and "0.3,,0.7" are no numbers
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__}s, e.g. 0.3,0.7, got {text!r}"
            ) from None

    parse.__name__ = f"{kind.__name__}s"
    return parse


def element_type(cls: type, name: str) -> type:
    """The element type of a `tuple[X, ...]` field."""
    return typing.get_args(typing.get_type_hints(cls)[name])[0]


def add_flags(
    container: argparse._ActionsContainer,
    classes: Iterable[type],
    *,
    given_only: bool = False,
    choices: Mapping[str, Iterable[str]] | None = None,
    skip: Iterable[str] = (),
    defaults: Mapping[str, object] | None = None,
) -> list[str]:
    """One flag per init field of the dataclasses `classes` (a field several classes share is added once, with
    the first class's default); returns the field names added.

    given_only: flags not given stay out of the parsed namespace (argparse.SUPPRESS), so the caller knows which
        were given (a resumed run's changes, options that would be ignored); else they hold their defaults.
    choices: allowed values per field name (argparse `choices=`, "did you mean" on a typo).
    defaults: a default per field name shown instead of the class's (e.g. a choice's first kind).
    """
    choices, defaults, skipped = dict(choices or {}), dict(defaults or {}), set(skip)
    added: list[str] = []
    for cls in classes:
        helps, kinds = field_help(cls), field_types(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.name in skipped or f.name in added:
                continue
            default = defaults.get(f.name, f.default)
            if default is dataclasses.MISSING:
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            kind, accepts_none = kinds[f.name]
            text = helps.get(f.name, "")
            if "(default" not in text and "(required" not in text:
                text = f"{text} (default: {typed(default)})".strip()
            value = argparse.SUPPRESS if given_only else default
            name = flag(f.name)
            if f.name in choices:
                shown = [c for c in choices[f.name] if c not in ("", None)]  # "" or None: not given, not a choice
                container.add_argument(name, choices=shown, default=value, help=text)
            elif kind is bool:  # `--quiet` alone, or `--quiet true|false` (what config.json's values read back as)
                container.add_argument(
                    name, type=parse_bool, nargs="?", const=True, metavar="BOOL", default=value, help=text
                )
            elif kind is tuple and element_type(cls, f.name) is str:  # given once per value, in order
                value = argparse.SUPPRESS if given_only else None  # argparse appends to a list of its own
                container.add_argument(name, action="append", metavar=f.name.upper(), default=value, help=text)
            elif kind is tuple:
                element = element_type(cls, f.name)
                metavar = f"{element.__name__.upper()},..."
                container.add_argument(name, type=numbers(element), metavar=metavar, default=value, help=text)
            elif accepts_none:
                metavar = f"{kind.__name__.upper()}|none"
                container.add_argument(name, type=optional(kind), metavar=metavar, default=value, help=text)
            else:
                container.add_argument(name, type=kind, default=value, help=text)
            added.append(f.name)
    return added
