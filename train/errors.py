"""The errors that mean bad input, not a bug: the CLI prints them as one line, the sweep as a table note."""

from crackio import ShardError
from train.model import WeightsError

# NonFiniteLoss (train.loop) is a RuntimeError.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ShardError, WeightsError, RuntimeError)
