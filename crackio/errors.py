"""The errors that mean bad input or settings, not a bug.

Command lines print a `CrackioError` as one line (its message names the file or
option and the fix) and show the traceback of anything else: a DALI, CUDA or
shape error is a bug to report, not a user mistake.
"""


class CrackioError(Exception):
    """Bad input or settings; the message names the file or option and what to do."""


class ConfigError(CrackioError, ValueError):
    """A setting, or a combination of settings, that cannot work."""


class MissingFile(CrackioError, FileNotFoundError):
    """A file or folder the user named does not exist."""
