"""The loader's choices, in one light module (no torch): command lines build their `--help` from these."""

import numpy as np

from crackio.errors import ConfigError

BACKENDS = ("auto", "dali", "torch")
OUTPUTS = ("float32", "uint8")  # normalized float images, or augmented uint8 ones normalized by the consumer
DEVICES = ("auto", "cpu", "cuda")
ORDERS = ("random", "block")  # reading order of training batches (crackio.loading.orders)


def integer(name: str, value, least: int, most: int = 2**40) -> int:
    """`value` as an int if it is an integer (numpy's too, not a bool) within [least, most]: the one integer rule
    of the loading side's arguments.

    Raises:
        ConfigError: naming the argument and what it must be.
    """
    if not (isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_) and least <= value <= most):
        raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
    return int(value)
