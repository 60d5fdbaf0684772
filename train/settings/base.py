"""How a concern owns its settings: a small frozen dataclass that checks its own values when it is made (`Owner`),
or, where one setting chooses between kinds with options of their own (`--loss bce|focal`), one such dataclass per
kind behind a `Choice` (as crackio's sampler classes do for `--sampler`). An option belongs to the kinds that have
it as a field; given with another kind chosen, it would be ignored, so it is refused.

Settings are read as a flat table of option names (the flags without `--`, config.json's keys); each owner takes
its names from that table (`build`) and gives them back (`flat`). Light: no torch, so `--help` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

from crackio.cli import closest
from crackio.errors import MOST_FLOAT32, ConfigError, is_number, number_rule, written
from crackio.flags import field_types, flag


def init_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def defaults_of(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.init}


def check_choice(name: str, value: object, allowed) -> None:
    """Raises ConfigError when `value` is not one of `allowed`, with the closest valid one."""
    if value not in allowed:
        raise ConfigError(
            f"{flag(name)} must be one of {', '.join(allowed)}, got {value!r}" + closest(str(value), allowed)
        )


def check_positive(owner: object, *names: str, most: float | None = None) -> None:
    """Each named field must be > 0 (crackio.errors.number_rule: an int field an integer at most `most`, default
    2**40; a float field a finite number at most `most`, default float32's largest).

    Raises:
        ConfigError: naming the flag, the rule it breaks and the value as given.
    """
    _check_numbers(owner, names, above=True, most=most)


def check_non_negative(owner: object, *names: str, most: float | None = None) -> None:
    """Each named field must be >= 0 (crackio.errors.number_rule: an int field an integer at most `most`, default
    2**40; a float field a finite number at most `most`, default float32's largest); a float's -0.0 is kept as
    0.0.

    Raises:
        ConfigError: naming the flag, the rule it breaks and the value as given.
    """
    _check_numbers(owner, names, above=False, most=most)


def check_within(
    owner: object, name: str, least: float, most: float, *, above: bool = False, under: bool = False, note: str = ""
) -> None:
    """The field `name` must be a finite number in [least, most] (`above`: (least, ...; `under`: ..., most)),
    e.g. a probability (crackio.errors.is_number); a float's -0.0 is kept as 0.0. `note` follows the range in
    the message (" (a probability)").

    Raises:
        ConfigError: "--threshold must be in [0, 1] (a probability), got 2.0".
    """
    value = getattr(owner, name)
    if not is_number(value, least, most, above=above, under=under):
        span = f"{'(' if above else '['}{written(least)}, {written(most)}{')' if under else ']'}"
        raise ConfigError(f"{flag(name)} must be in {span}{note}, got {value}")
    _positive_zero(owner, name)


def _check_numbers(owner: object, names: tuple[str, ...], above: bool, most: float | None) -> None:
    kinds = field_types(type(owner))
    for name in names:
        value = getattr(owner, name)
        whole = kinds[name][0] is int
        # A float setting reaches a float32 tensor (the optimizer's update, a loss weight): at most float32's largest.
        rule = number_rule(value, 0, most if most is not None or whole else MOST_FLOAT32, above=above, whole=whole)
        if rule is not None:
            raise ConfigError(f"{flag(name)} must be {rule}, got {value}")
        _positive_zero(owner, name)


def _positive_zero(owner: object, name: str) -> None:
    """A float field's -0.0 (`--weight-decay -0`) kept as 0.0, so reports and config.json say 0.0."""
    value = getattr(owner, name)
    if isinstance(value, float) and value == 0 and math.copysign(1, value) < 0:
        object.__setattr__(owner, name, 0.0)  # a frozen owner, still being made


class Owner:
    """Base of a concern's frozen settings: `check` runs once, when the object is made."""

    group: ClassVar[str]  # the --help group its flags are listed in
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}  # allowed values per field (flags' `choices=`)

    def __post_init__(self) -> None:
        for name, allowed in self.choices.items():
            if getattr(self, name) is not None:  # None: not given (a command's optional choice)
                check_choice(name, getattr(self, name), allowed)
        self.check()

    def check(self) -> None:
        """Refuse values no run could use (ConfigError naming the flag and the fix)."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return init_names(cls)

    @classmethod
    def build(cls, values: Mapping[str, Any]):
        return cls(**{name: values[name] for name in cls.names()})

    @classmethod
    def unmet(cls, values: Mapping[str, Any], name: str) -> str | None:
        """The setting option `name` needs that `values` lacks (e.g. "a remote --shards"); None when it applies."""
        return None

    @classmethod
    def flag_classes(cls) -> tuple[type, ...]:
        return (cls,)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return defaults_of(cls)

    def flat(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.names()}


class Kind(Owner):
    """One kind of a Choice (e.g. the focal loss): its own options as fields."""

    kind: ClassVar[str]


@dataclasses.dataclass(frozen=True)
class Choice:
    """A setting (`key`, e.g. "loss") that chooses one of `kinds`, each a Kind dataclass with its own options."""

    key: str
    kinds: dict[str, type[Kind]]
    group: str
    help: str  # the choosing flag's help

    def names(self) -> tuple[str, ...]:
        return (self.key, *dict.fromkeys(n for cls in self.kinds.values() for n in init_names(cls)))

    def build(self, values: Mapping[str, Any]) -> Kind:
        chosen = values[self.key]
        check_choice(self.key, chosen, tuple(self.kinds))
        return self.kinds[chosen].build(values)

    def unmet(self, values: Mapping[str, Any], name: str) -> str | None:
        if name == self.key:
            return None
        owners = [kind for kind, cls in self.kinds.items() if name in init_names(cls)]
        return None if values.get(self.key) in owners else " or ".join(f"{flag(self.key)} {k}" for k in owners)

    def flag_classes(self) -> tuple[type, ...]:
        return tuple(self.kinds.values())

    def defaults(self) -> dict[str, Any]:
        first = next(iter(self.kinds))
        out: dict[str, Any] = {self.key: first}
        for cls in self.kinds.values():
            out = defaults_of(cls) | out  # a field several kinds share keeps the first kind's default
        return out

    def flat(self, value: Kind) -> dict[str, Any]:
        return self.defaults() | {self.key: value.kind} | value.flat()
