"""`RemoteSettings`: where a node keeps a remote pack, how much of it, and how long a failing server is waited for.

A value, not process state: each `open_pack(location, remote)` and `make_loader(..., remote=...)` takes its own,
so two loaders of one process may keep two caches with two limits. `None` there means `RemoteSettings.from_env()`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from crackio.errors import MOST_BYTES, MOST_SECONDS, ConfigError, is_integer, is_number

DEFAULT_TIMEOUT = 60.0  # seconds: long enough for a server restart, short enough to end a run that cannot go on

UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20}
UNITS |= {"g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_bytes(text: str | int) -> int:
    """A size in bytes from `123`, `512M`, `20GB`, `1.5GiB` (binary units: a cache limit is disk, not a
    transfer): whole bytes (a fraction rounded down), from 0 to 2**63 - 1 (an int64, what the cache counts in).

    Raises:
        ValueError: naming the text: not a size, negative (-0 too), under one byte but not 0, or too large.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        amount: float = text
    elif isinstance(text, str):
        number = text.strip().lower().rstrip("s")
        digits = number.rstrip("abcdefghijklmnopqrstuvwxyz ")
        unit = number[len(digits) :].strip()
        try:
            amount = (int(digits) if digits.strip().lstrip("+-").isdigit() else float(digits)) * UNITS[unit]
        except (ValueError, KeyError):
            amount = math.nan
        if math.isnan(amount):  # no number, or no unit of ours
            raise ValueError(f"{text!r} is not a size (write bytes, or e.g. 512M, 20G)")
    else:
        raise ValueError(f"{text!r} is not a size (write bytes, or e.g. 512M, 20G)")
    if amount < 0 or (isinstance(text, str) and text.strip().startswith("-")):  # -0 too: not "no cache"
        raise ValueError(f"{text!r}: a size cannot be negative")
    if amount > MOST_BYTES:  # inf (1e400) too
        raise ValueError(f"{text!r} is too large a size (at most 2**63 - 1 bytes)")
    if 0 < amount < 1:
        raise ValueError(f"{text!r} is less than one byte (0 is no cache: samples streamed)")
    return int(amount)


def _seconds(value: object) -> bool:
    """A timeout: a finite number of seconds > 0 and at most 2**31 (crackio.errors.is_number)."""
    return is_number(value, 0, MOST_SECONDS, above=True)


@dataclass(frozen=True)
class RemoteSettings:
    """Where a node keeps a remote pack, how much of it, and how long a failing server is waited for.

    Args:
        cache_dir: the cache folder (str or path; None: `crackio.storage.cache.default_cache_dir()`).
        cache_limit: bytes the cache may hold, an int >= 0 (None: no limit; 0: no cache, every sample streamed).
        timeout: seconds of transient failures before a read gives up (`crackio.storage.remote.Unreachable`),
            finite and > 0.

    Raises:
        ConfigError: a value of the wrong kind or out of range, naming the field and what to give instead.
    """

    cache_dir: Path | None = None
    cache_limit: int | None = None
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        folder, limit, timeout = self.cache_dir, self.cache_limit, self.timeout
        if folder is not None:
            if not isinstance(folder, str | os.PathLike) or str(folder) == "":
                raise ConfigError(
                    f"RemoteSettings(cache_dir={folder!r}): give a folder (a str or pathlib.Path), or None "
                    "for $CRACKIO_CACHE_DIR or ~/.cache/crackio"
                )
            object.__setattr__(self, "cache_dir", Path(folder).expanduser())
        if limit is not None and not is_integer(limit, 0, MOST_BYTES):
            text = " (for a size written as text, RemoteSettings.from_options(cache_limit=...) reads it)"
            raise ConfigError(
                f"RemoteSettings(cache_limit={limit!r}): give a number of bytes >= 0 (0: no cache, samples "
                "streamed), or None for no limit" + (text if isinstance(limit, str) else "")
            )
        if limit is not None:
            object.__setattr__(self, "cache_limit", int(limit))
        if not _seconds(timeout):
            raise ConfigError(
                f"RemoteSettings(timeout={timeout!r}): give a finite number of seconds > 0 (default "
                f"{DEFAULT_TIMEOUT:g}), at most 2**31"
            )
        object.__setattr__(self, "timeout", float(timeout))

    @classmethod
    def from_env(cls) -> RemoteSettings:
        """The environment's settings: `$CRACKIO_CACHE_DIR`, `$CRACKIO_CACHE_LIMIT` (a size such as 20G),
        `$CRACKIO_REMOTE_TIMEOUT` (seconds); the defaults for those not set.

        Raises:
            ConfigError: naming the variable that holds a value that cannot work.
        """
        limit = os.environ.get("CRACKIO_CACHE_LIMIT")
        timeout = os.environ.get("CRACKIO_REMOTE_TIMEOUT")
        folder = os.environ.get("CRACKIO_CACHE_DIR") or None
        try:
            size = parse_bytes(limit) if limit else None
        except ValueError as e:
            raise ConfigError(f"$CRACKIO_CACHE_LIMIT: {e}") from None
        try:
            seconds = float(timeout) if timeout else DEFAULT_TIMEOUT
        except ValueError:
            seconds = math.nan
        if not _seconds(seconds):
            raise ConfigError(
                f"$CRACKIO_REMOTE_TIMEOUT must be a finite number of seconds > 0, at most 2**31, got {timeout!r}"
            )
        return cls(Path(folder) if folder else None, size, seconds)

    @classmethod
    def from_options(
        cls,
        cache_dir: str = "",
        cache_limit: str = "",
        timeout: float = 0.0,
        flag: Callable[[str], str] | None = None,
    ) -> RemoteSettings:
        """The settings from a command line's text values; the environment's (`from_env`) for those not given.

        Args:
            cache_dir: a folder, or "" for the environment's.
            cache_limit: a size ("20G", "512M", "0" for no cache), or "" for the environment's.
            timeout: seconds > 0, or 0 for the environment's.
            flag: a field's name in messages (`cache_dir`, `cache_limit`, `timeout`) -> what the user wrote
                (e.g. "--cache-limit"); default: the argument's name.

        Raises:
            ConfigError: a cache_limit that is not a size, a negative or infinite timeout, naming `flag(field)`.
        """
        name = flag or (lambda field: field)
        default = cls.from_env()
        if not isinstance(cache_dir, str):
            raise ConfigError(f"{name('cache_dir')} must be a folder as text, or '' for the default; got {cache_dir!r}")
        if not isinstance(cache_limit, str):
            raise ConfigError(
                f"{name('cache_limit')} must be a size as text (e.g. 20G, 0 for no cache), or '' for no limit; "
                f"got {cache_limit!r}"
            )
        try:
            limit = parse_bytes(cache_limit) if cache_limit != "" else default.cache_limit
        except ValueError as e:
            raise ConfigError(f"{name('cache_limit')}: {e}") from None
        if not is_number(timeout, 0, MOST_SECONDS):
            raise ConfigError(
                f"{name('timeout')} must be a finite number of seconds >= 0 (0: the environment's default, "
                f"$CRACKIO_REMOTE_TIMEOUT or {DEFAULT_TIMEOUT:g}), at most 2**31, got {timeout}"
            )
        folder = Path(cache_dir) if cache_dir else default.cache_dir
        return cls(folder, limit, timeout or default.timeout)
