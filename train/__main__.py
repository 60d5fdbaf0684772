"""python -m train --shards shards/ [options]     train the crack classifier
python -m train eval --checkpoint RUN/best.pt --shards shards/ [--split test]
python -m train sweep --shards shards/ [--variants FILE] [--out DIR] [training options shared by the variants]
python -m train svm --checkpoint RUN/best.pt [--shards shards/] [--out DIR]
python -m train detect --checkpoint RUN/best.pt PHOTOS... [--annotations A --format F] [--out DIR]

Only routes: each subcommand's module owns its parser (`cli(argv)`) and its config; the error policy is
crackio.cli.run_command's, as for every command. Nothing heavy is imported before the subcommand's module.
"""

from __future__ import annotations

import importlib
import sys

from crackio.cli import run_command

COMMANDS = {"eval": "train.evaluate", "sweep": "train.sweep", "svm": "train.svm", "detect": "train.detect"}


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv[:1] and argv[0] in COMMANDS else None
    args = argv[1:] if command else argv

    def body() -> int | None:
        module = importlib.import_module(COMMANDS[command] if command else "train.loop")
        return module.cli(args)  # a cli may return an exit code

    # SIGTERM, like Ctrl-C, unwinds (temporaries removed, loader threads joined); one line from rank 0 only.
    return run_command(body, lambda: "" if _rank() == 0 else None)


if __name__ == "__main__":
    sys.exit(main())
