"""The errors that mean bad input or settings, not a bug.

Command lines print a `CrackioError` as one line (its message names the file or
option and the fix) and show the traceback of anything else: a DALI, CUDA or
shape error is a bug to report, not a user mistake.
"""

import math
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


MOST = 2**40  # an integer setting's default bound: a count, step or seed beyond any run, within an int64
MOST_THREADS = 4096  # threads or worker processes: more than any machine's cores, within torch's C int
MOST_SECONDS = 2**31  # a timeout (68 years): within what datetime.timedelta and torch's timeouts take
MOST_BYTES = 2**63 - 1  # a byte size: an int64 (the cache's SQLite columns)
MOST_FLOAT32 = 3.4028234663852886e38  # a float setting that reaches a float32 tensor (lr, weight decay, ...)
MOST_LR = MOST_FLOAT32 / 10  # a learning rate: Adam's first step is lr / (1 - 0.9), a float32
# The bounds as messages write them.
WRITTEN: dict[float, str] = {
    MOST: "2**40",
    MOST_SECONDS: "2**31",
    MOST_BYTES: "2**63 - 1",
    MOST_FLOAT32: "3.4e38 (float32's largest)",
    MOST_LR: "3.4e37 (float32's largest / 10: Adam's first step is 10 x lr)",
}


def written(bound: float) -> str:
    """A bound as messages write it: 2**40, not 1099511627776."""
    return WRITTEN.get(bound) or (str(bound) if isinstance(bound, int) else f"{bound:g}")


def is_integer(value: object, least: int, most: int = MOST) -> bool:
    """Whether `value` is an integer (Python's or numpy's, not a bool) within [least, most]: the one integer
    rule of crackio's arguments, settings and manifests."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and least <= int(value) <= most


def _real(value: object) -> float | None:
    """`value` as a float when it is a real number (an int or float, Python's or numpy's; not a bool, whose
    numpy kind is no numbers.Real); inf for an int too large for a float; None otherwise."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond a float's range: 10**400
        return math.inf if value > 0 else -math.inf  # type: ignore[operator]  # a Real compares with 0


def is_number(
    value: object, least: float = -math.inf, most: float = math.inf, *, above: bool = False, under: bool = False
) -> bool:
    """Whether `value` is a finite real number (an int or float, Python's or numpy's, not a bool) within
    [least, most] ((least, ... with `above`, ..., most) with `under`): the one rule of crackio's float arguments
    and settings. NaN, inf and an int too large for a float are not."""
    x = _real(value)
    if x is None or not math.isfinite(x):
        return False
    return (x > least if above else x >= least) and (x < most if under else x <= most)


def number_rule(
    value: object, least: float, most: float | None = None, *, above: bool = False, whole: bool = False
) -> str | None:
    """The rule `value` breaks, in words for "must be ...", or None when it keeps it: the one number rule of
    settings that have a lower bound (the integer rule, `is_integer`, with `whole`; else `is_number`). It names
    what the value lacks: the kind ("an integer >= 0": a float, a bool or text), the bound it is under (">= 0":
    NaN too), finiteness ("a finite number > 0": inf), or the upper bound (">= 0 and at most 2**40"). An integer's
    upper bound is MOST unless `most` is given; a float has none unless given."""
    low = f"> {written(least)}" if above else f">= {written(least)}"
    top = MOST if whole and most is None else most
    high = f" and at most {written(top)}" if top is not None else ""
    if whole:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            return f"an integer {low}"
        whole_value = int(value)
        if not (whole_value > least if above else whole_value >= least):
            return low
        return f"{low}{high}" if top is not None and whole_value > top else None
    x = _real(value)
    if x is None:
        return f"a number {low}"
    if not (x > least if above else x >= least):  # NaN too
        return low
    return f"a finite number {low}{high}" if not is_number(x, least, math.inf if top is None else top) else None


def has_type(value: object, kind: type) -> bool:
    """Whether `value`, read from JSON, TOML or a checkpoint, is of `kind` as a setting is: a bool is no number,
    an int is also a float (JSON writes 1.0 as 1 in some writers, a user writes --lr 1 as 1)."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, kind) or (kind is float and isinstance(value, int))


def integer(name: str, value: object, least: int, most: int = MOST) -> int:
    """`value` as an int when `is_integer(value, least, most)`.

    Raises:
        ConfigError: naming `name` (an argument, `--flag` or field), what it must be, and the value as given.
    """
    if not is_integer(value, least, most):
        if most != MOST:
            bound = f"in [{least}, {written(most)}]"
        else:  # the rule's words: the upper bound said when it is what the value breaks
            bound = (number_rule(value, least, whole=True) or "").removeprefix("an integer ")
        raise ConfigError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)  # type: ignore[call-overload]  # an Integral


def given(name: str, value: object) -> str:
    """A setting as a message names it: `--device cuda` for a command line's flag, `device='cuda'` for an
    argument."""
    return f"{name} {value}" if name.startswith("-") else f"{name}={value!r}"


Broken = tuple[str, object, str]  # a settings field, its value, the rule it breaks (">= 1": "must be" goes before)


def below(field: str, value: object, least: int, most: int | None = None) -> Broken | None:
    """The rule an integer field `>= least` (and at most `most`, else MOST) breaks (the one integer rule,
    `number_rule`), or None."""
    rule = number_rule(value, least, most, whole=True)
    return None if rule is None else (field, value, rule)


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
