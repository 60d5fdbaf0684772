"""python -m train --shards shards/ [options]     train the crack classifier
python -m train eval --checkpoint RUN/best.pt --shards shards/ [--split test]
python -m train sweep --shards shards/ [--variants FILE] [--out DIR] [training options shared by the variants]
python -m train svm --checkpoint RUN/best.pt [--shards shards/] [--out DIR]
python -m train detect --checkpoint RUN/best.pt PHOTOS... [--annotations A --format F] [--out DIR]
python -m train detect --onnx RUN/model.onnx PHOTOS... [options]
python -m train export --checkpoint RUN/best.pt [--out RUN/model.onnx] [--split test] [--tolerance 1e-4]

Only routes: the parsers are in train/cli/ (light: `--help` imports no torch), the error policy is
crackio.cli.run_command's, as for every command.
"""

from __future__ import annotations

import sys

from crackio.cli import closest, openmp_for_shared_cores, run_command

openmp_for_shared_cores()  # before anything imports torch

from crackio.errors import ConfigError  # noqa: E402
from train.cli.commands import COMMANDS, train  # noqa: E402


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise), without importing torch: a signal may come while torch is
    still being imported, and importing it again from here would fail."""
    dist = sys.modules.get("torch.distributed")
    try:
        return dist.get_rank() if dist is not None and dist.is_available() and dist.is_initialized() else 0
    except AttributeError:  # torch.distributed half imported: no process group yet
        return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv[:1] and argv[0] in COMMANDS else None
    args = argv[1:] if command else argv

    def body() -> int | None:
        if command is None and argv[:1] and not argv[0].startswith("-"):  # training takes flags only
            hint = closest(argv[0], COMMANDS) or f"; the commands are {', '.join(COMMANDS)}"
            raise ConfigError(
                f"unknown command {argv[0]!r}{hint} (training itself takes flags only: python -m train --help)"
            )
        return (COMMANDS[command] if command else train)(args)  # a command may return an exit code

    # SIGTERM, like Ctrl-C, unwinds (temporaries removed, loader threads joined); one line from rank 0 only.
    return run_command(body, lambda: "" if _rank() == 0 else None)


if __name__ == "__main__":
    sys.exit(main())
