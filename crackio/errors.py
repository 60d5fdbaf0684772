"""The errors that mean bad input or settings, not a bug.

Command lines print a `CrackioError` as one line (its message names the file or
option and the fix) and show the traceback of anything else: a DALI, CUDA or
shape error is a bug to report, not a user mistake.
"""

import numbers
from collections.abc import Callable, Iterable


class CrackioError(Exception):
    """Bad input or settings; the message names the file or option and what to do."""


class ConfigError(CrackioError, ValueError):
    """A setting, or a combination of settings, that cannot work."""


class MissingFile(CrackioError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class WriteError(CrackioError):
    """Writing an output failed: no space left, over quota, a read-only file system, an I/O error.

    Bad input in the sense that the user fixes it (frees space, picks another folder), so the
    command lines print it as one line; `errno` keeps the OS error number.
    """

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno

    def __reduce__(self):  # crosses from a worker process to its parent intact
        return type(self), (str(self), self.errno)


def is_integer(value: object, least: int, most: int = 2**40) -> bool:
    """Whether `value` is an integer (Python's or numpy's, not a bool) within [least, most]: the one integer
    rule of crackio's arguments, settings and manifests."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and least <= int(value) <= most


def has_type(value: object, kind: type) -> bool:
    """Whether `value`, read from JSON, TOML or a checkpoint, is of `kind` as a setting is: a bool is no number,
    an int is also a float (JSON writes 1.0 as 1 in some writers, a user writes --lr 1 as 1)."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, kind) or (kind is float and isinstance(value, int))


def integer(name: str, value: object, least: int, most: int = 2**40) -> int:
    """`value` as an int when `is_integer(value, least, most)`.

    Raises:
        ConfigError: naming `name` (an argument, `--flag` or field) and what it must be.
    """
    if not is_integer(value, least, most):
        bound = f">= {least}" if most == 2**40 else f"in [{least}, {most}]"
        raise ConfigError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)  # type: ignore[call-overload]  # an Integral


def given(name: str, value: object) -> str:
    """A setting as a message names it: `--device cuda` for a command line's flag, `device='cuda'` for an
    argument."""
    return f"{name} {value}" if name.startswith("-") else f"{name}={value!r}"


Broken = tuple[str, object, str]  # a settings field, its value, the rule it breaks (">= 1": "must be" goes before)


def below(field: str, value: object, least: int) -> Broken | None:
    """The rule an integer field `>= least` breaks (the one integer rule, `is_integer`), or None."""
    if is_integer(value, least):
        return None
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    return field, value, f">= {least}" if whole else f"an integer >= {least}"


class OutOfRange(ConfigError):
    """Settings fields outside their ranges, only the failing ones: named as the settings object's arguments
    (`PackSettings(workers=-1): workers must be >= 0`), or as a command line's flags by `named(flag)`
    (`--workers must be >= 0, got -1`), so a tool that built the settings from its flags speaks in them."""

    def __init__(self, owner: str, failing: list[Broken]):
        self.owner, self.failing = owner, failing
        super().__init__(self.named())

    def __reduce__(self):  # crosses from a worker process to its parent intact
        return type(self), (self.owner, self.failing)

    @classmethod
    def check(cls, owner: str, rules: Iterable[Broken | None]) -> None:
        """Raise for the broken ones of `rules` (None: kept), if any."""
        failing = [r for r in rules if r is not None]
        if failing:
            raise cls(owner, failing)

    def named(self, name: Callable[[str], str] | None = None) -> str:
        """The message with each field as `name` writes it (None: the settings object's argument)."""
        rules = " and ".join(
            f"{name(field) if name else field} {'' if k else 'must be '}{rule}"
            for k, (field, _, rule) in enumerate(self.failing)
        )
        if name is None:
            return f"{self.owner}({', '.join(f'{f}={v!r}' for f, v, _ in self.failing)}): {rules}"
        return f"{rules}, got {' and '.join(str(v) for _, v, _ in self.failing)}"
