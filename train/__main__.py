"""python -m train --shards shards/ [options]     train the crack classifier
python -m train eval --checkpoint RUN/best.pt --shards shards/ [--split test]"""

from __future__ import annotations

import argparse
import sys

from crackio import ShardError
from train.config import Config, add_config_arguments
from train.model import WeightsError


def parse(argv: list[str]) -> tuple[str, argparse.Namespace]:
    if argv[:1] == ["eval"]:
        ap = argparse.ArgumentParser(prog="python -m train eval", description="Evaluate a saved model on a split.")
        ap.add_argument("--checkpoint", required=True, help="RUN/best.pt or RUN/last.pt")
        ap.add_argument("--shards", default="", help="shards folder (default: the one the run trained on)")
        ap.add_argument("--split", default="test", help="split to evaluate (default: test)")
        ap.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
        ap.add_argument("--threshold", type=float, default=0.5, help="decision threshold on P(crack)")
        ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
        ap.add_argument("--backend", default="auto", choices=("auto", "dali", "torch"))
        return "eval", ap.parse_args(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m train", description=__doc__.splitlines()[0],
                                 epilog="Subcommand: python -m train eval --help")
    add_config_arguments(ap)
    return "train", ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    command, args = parse(sys.argv[1:] if argv is None else argv)
    try:
        if command == "eval":
            from train.evaluate import run_eval

            print(run_eval(args.checkpoint, args.shards, args.split, args.batch_size, args.device,
                           args.backend, args.threshold))
            return 0
        from train.loop import main as train_main

        train_main(Config(**vars(args)))
        return 0
    except (ValueError, FileNotFoundError, FileExistsError, ShardError, WeightsError, RuntimeError) as e:
        # Known bad input: one clear line, no traceback. (NonFiniteLoss is a RuntimeError.)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
