"""The flags of a run's settings and of each command's, grouped in `--help` by the owner they belong to: built by
crackio.flags (the one mechanism) from train.settings' owners, so a new option is added in one place."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable

from crackio.flags import add_flags, flag
from train.settings.base import Choice, Owner
from train.settings.data import Remote
from train.settings.run import PARTS


def add_run_flags(ap: argparse.ArgumentParser, given_only: bool = True, skip: Iterable[str] = ()) -> None:
    """Every option of a run (train.settings.run.PARTS), one `--help` group per owner's group."""
    skipped = set(skip)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for part in PARTS.values():
        group = groups.get(part.group) or groups.setdefault(part.group, ap.add_argument_group(part.group))
        if isinstance(part, Choice) and part.key not in skipped:
            default = argparse.SUPPRESS if given_only else next(iter(part.kinds))
            text = f"{part.help} (default: {next(iter(part.kinds))})"
            group.add_argument(flag(part.key), choices=list(part.kinds), default=default, help=text)
        owner_choices = {k: v for cls in part.flag_classes() for k, v in getattr(cls, "choices", {}).items()}
        add_flags(group, part.flag_classes(), given_only=given_only, choices=owner_choices, skip=skipped)


def add_command_flags(ap: argparse.ArgumentParser, cls: type[Owner], skip: Iterable[str] = ()) -> None:
    """The flags of a command's settings (`cls`, e.g. EvalSettings) in its group, and the remote pack's in theirs."""
    skipped = {"remote", *skip}
    add_flags(ap.add_argument_group(cls.group), [cls], choices=cls.choices, skip=skipped)
    add_flags(ap.add_argument_group(Remote.group), [Remote])


def command_settings(cls: type, values: dict):
    """`cls` made from parsed flags: its own fields, and `remote` from the remote pack's."""
    remote = Remote(**{name: values.pop(name) for name in Remote.names()})
    own = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in own}, remote=remote)
