"""python -m train --shards shards/ [options]     train the crack classifier
python -m train eval --checkpoint RUN/best.pt --shards shards/ [--split test]
python -m train sweep --shards shards/ [--variants FILE] [--out DIR] [training options shared by the variants]
python -m train svm --checkpoint RUN/best.pt [--shards shards/] [--out DIR]
python -m train detect --checkpoint RUN/best.pt PHOTOS... [--annotations A --format F] [--out DIR]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crackio.errors import ConfigError
from crackio.loader import BACKENDS, DEVICES
from train.config import Config, add_config_arguments
from train.errors import USER_ERRORS

SWEEP_EPILOG = ("--out is the sweep folder (default: runs/sweep); each variant trains in OUT/<name>/. Options given "
                "here are shared by every variant; a variant's own settings win. Run the same command again to "
                "skip finished variants, resume interrupted ones and retry failed ones.")


def _loader_arguments(ap: argparse.ArgumentParser, batch_size: int) -> None:
    ap.add_argument("--batch-size", type=int, default=batch_size, help=f"batch size (default: {batch_size})")
    ap.add_argument("--device", default="auto", choices=DEVICES)
    ap.add_argument("--backend", default="auto", choices=BACKENDS)


def parse(argv: list[str]) -> tuple[str, argparse.Namespace]:
    command = argv[0] if argv[:1] and argv[0] in ("eval", "sweep", "svm", "detect") else "train"
    if command == "eval":
        ap = argparse.ArgumentParser(prog="python -m train eval", description="Evaluate a saved model on a split.")
        ap.add_argument("--checkpoint", required=True, help="RUN/best.pt or RUN/last.pt")
        ap.add_argument("--shards", default="", help="shards folder (default: the one the run trained on)")
        ap.add_argument("--split", default="test", help="split to evaluate (default: test)")
        ap.add_argument("--threshold", type=float, default=0.5, help="decision threshold on P(crack)")
        _loader_arguments(ap, 64)
    elif command == "detect":
        ap = argparse.ArgumentParser(prog="python -m train detect", description=(
            "Find cracks in whole photos: proposals as in training, scores, NMS, boxes; AP with annotations."))
        ap.add_argument("--checkpoint", required=True, help="RUN/best.pt of a run trained on tools/propose.py shards")
        ap.add_argument("photos", nargs="+", help="photo files or folders (searched recursively)")
        ap.add_argument("--annotations", default="", help="ground truth (a dataset folder or COCO file) for AP")
        ap.add_argument("--format", default="", choices=("", "coco", "yolo", "voc", "mask"),
                        help="format of --annotations")
        ap.add_argument("--classes", default="", help="positive class names in the annotations (default: all)")
        ap.add_argument("--svm", default="", help="score with RUN/svm/svm_model.npz instead of the network head")
        ap.add_argument("--score-threshold", type=float, default=None,
                        help="keep boxes scoring at least this (default: 0.5, or the SVM's chosen threshold)")
        ap.add_argument("--nms-iou", type=float, default=0.3, help="NMS IoU (default: 0.3, R-CNN's)")
        ap.add_argument("--out", default="", help="output folder (default: RUN/detect)")
        ap.add_argument("--batch-size", type=int, default=64, help="crops per forward pass (default: 64)")
        ap.add_argument("--device", default="auto", choices=DEVICES)
    elif command == "svm":
        ap = argparse.ArgumentParser(prog="python -m train svm", description=(
            "R-CNN's second stage: a linear SVM on the frozen fine-tuned backbone's features, "
            "reported beside the network head."))
        ap.add_argument("--checkpoint", required=True, help="RUN/best.pt of a finished run")
        ap.add_argument("--shards", default="", help="shards folder (default: the one the run trained on)")
        ap.add_argument("--out", default="", help="output folder (default: RUN/svm)")
        ap.add_argument("--pos-iou", type=float, default=0.7, help="positives: IoU >= this (default: 0.7)")
        ap.add_argument("--neg-iou", type=float, default=0.3, help="negatives: IoU < this (default: 0.3, R-CNN's)")
        ap.add_argument("--rounds", type=int, default=3, help="hard-negative mining rounds (default: 3)")
        ap.add_argument("--negatives", type=int, default=5000,
                        help="initial random negatives, and the most hard negatives added per round (default: 5000)")
        ap.add_argument("--C", type=float, default=1e-3, help="LinearSVC C on standardized features (default: 0.001)")
        ap.add_argument("--target-recall", type=float, default=0.0,
                        help="choose thresholds for this crack recall on validation; 0 = highest F1 (default)")
        ap.add_argument("--seed", type=int, default=0, help="seeds the initial negative cache (default: 0)")
        _loader_arguments(ap, 64)
    else:
        prog = "python -m train" + (" sweep" if command == "sweep" else "")
        ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0 if command == "train" else 2],
                                     epilog=SWEEP_EPILOG if command == "sweep" else
                                     "Subcommands: python -m train {eval,sweep,svm,detect} --help")
        add_config_arguments(ap)
        if command == "sweep":
            ap.add_argument("--variants", default="", help="variants file (default: the original's six runs, "
                                                             "train/variants.toml)")
    args = ap.parse_args(argv[1:] if command != "train" else argv)
    return command, args


def check_svm(args: argparse.Namespace) -> None:
    if not 0 <= args.neg_iou <= args.pos_iou <= 1:
        raise ConfigError(f"need 0 <= --neg-iou <= --pos-iou <= 1, got {args.neg_iou} and {args.pos_iou}")
    if args.rounds < 0 or args.negatives < 1 or args.C <= 0 or args.batch_size < 1:
        raise ConfigError("--rounds must be >= 0, --negatives and --batch-size >= 1, --C > 0")


def main(argv: list[str] | None = None) -> int:
    command, args = parse(sys.argv[1:] if argv is None else argv)
    try:
        if command == "eval":
            from train.evaluate import run_eval

            print(run_eval(args.checkpoint, args.shards, args.split, args.batch_size, args.device,
                           args.backend, args.threshold))
        elif command == "svm":
            from train.svm import run_svm

            check_svm(args)
            run_svm(args)
        elif command == "detect":
            from train.detect import run_detect

            run_detect(args.checkpoint, args.photos, args.out, annotations=args.annotations, fmt=args.format,
                       classes=[c for c in args.classes.split(",") if c] or None, svm=args.svm,
                       score_threshold=args.score_threshold, nms_iou=args.nms_iou, batch_size=args.batch_size,
                       device=args.device)
        elif command == "sweep":
            from train.sweep import SHIPPED, run_sweep

            options = vars(args)
            variants = Path(options.pop("variants") or SHIPPED)
            out = Path(options.pop("out", "") or "runs/sweep")
            if options.get("resume"):
                raise ConfigError("--resume does not apply to a sweep: run the same sweep command again to "
                                 "continue it")
            base = Config(**options)
            if not base.shards:
                raise ConfigError("--shards is required (a folder written by tools/pack.py)")
            run_sweep(base, variants, out)
        else:
            from train.config import check_applicable, resume_config
            from train.loop import main as train_main

            given = vars(args)  # only the flags actually given: their defaults are argparse.SUPPRESS
            if given.get("resume"):
                cfg = resume_config(given.pop("resume"), **given)
            else:
                cfg = Config(**given)
                cfg.validate()  # values first, then whether each option applies
                check_applicable(cfg, given)
            train_main(cfg)
        return 0
    except USER_ERRORS as e:  # known bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
