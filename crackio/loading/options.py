"""The loader's choices, in one light module (no torch): command lines build their `--help` from these."""

from collections.abc import Sequence

from crackio.cli import closest
from crackio.errors import ConfigError

BACKENDS = ("auto", "dali", "torch")
OUTPUTS = ("float32", "uint8")  # normalized float images, or augmented uint8 ones normalized by the consumer
DEVICES = ("auto", "cpu", "cuda")
ORDERS = ("random", "block")  # reading order of training batches (crackio.loading.orders)

# torch DataLoader's arguments that users bring to make_loader, and what they mean here.
TORCH_HABITS = {
    "shuffle": "a training loader (train=True) draws a new seeded order every epoch whatever the sampler "
    "(sampler='shuffle': every sample once); for every sample once in index order use train=False, which also "
    "turns augmentation off and keeps the last partial batch",
    "drop_last": "train=True drops the last partial batch, train=False keeps it",
    "num_workers": "write workers= (decode threads of this process)",
    "pin_memory": "batches come on device= already (device='cuda': on the GPU)",
    "generator": "seed= seeds selection, order and augmentation",
    "collate_fn": "every loader yields crackio.Batch(images, labels, ious, names)",
    "batch_sampler": "give batch_size= and sampler= (a name or a crackio sampler such as crackio.Weighted())",
}


def choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """`value` when it is one of `choices`.

    Raises:
        ConfigError: naming `name`, the choices and the closest one.
    """
    if not (isinstance(value, str) and value in choices):
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}{closest(str(value), choices)}")
    return value


def unknown_keyword(key: str, value: object, arguments: Sequence[str], options: Sequence[str]) -> ConfigError:
    """The refusal of a keyword make_loader does not take: what to write instead of a torch DataLoader habit,
    else the closest of its `arguments` and the samplers' `options`, else all of them."""
    if key in TORCH_HABITS:
        return ConfigError(f"{key}={value!r} is not an argument of make_loader: {TORCH_HABITS[key]}")
    hint = closest(key, [*arguments, *options]) or (
        f"; its arguments are {', '.join(arguments)}, and the samplers' options {', '.join(options)}"
    )
    return ConfigError(f"make_loader got an unknown argument {key}={value!r}{hint}")
