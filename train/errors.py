"""The errors that mean bad input, not a bug: the CLI prints them as one line, the sweep as a table note.

Everything else (a DALI, CUDA or shape error, a RuntimeError from a library) keeps its traceback.
"""

from crackio.errors import CrackioError

USER_ERRORS = (CrackioError,)
