"""python -m train --shards shards/ [options]     train the crack classifier
python -m train eval --checkpoint RUN/best.pt --shards shards/ [--split test]
python -m train sweep --shards shards/ [--variants FILE] [--out DIR] [training options shared by the variants]
python -m train svm --checkpoint RUN/best.pt [--shards shards/] [--out DIR]
python -m train detect --checkpoint RUN/best.pt PHOTOS... [--annotations A --format F] [--out DIR]

Only routes: each subcommand's module owns its parser (`cli(argv)`) and its config.
"""

from __future__ import annotations

import importlib
import signal
import sys

from train.errors import USER_ERRORS
from train.runtime import Interrupted, stop_on_signals, world

COMMANDS = {"eval": "train.evaluate", "sweep": "train.sweep", "svm": "train.svm", "detect": "train.detect"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv[:1] and argv[0] in COMMANDS else None
    module = importlib.import_module(COMMANDS[command] if command else "train.loop")
    try:
        with stop_on_signals():  # SIGTERM, like Ctrl-C, unwinds: temporaries removed, loader threads joined
            return module.cli(argv[1:] if command else argv) or 0  # a cli may return an exit code
    except USER_ERRORS as e:  # known bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # one line (from rank 0 under torchrun) and the shell's 128 + signal number
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        note = e.note if isinstance(e, Interrupted) else ""
        if world()[0] == 0:
            print(f"interrupted by {signal.Signals(signum).name}" + (f": {note}" if note else ""), file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
