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
