"""Annotated photos to shards: R-CNN's proposal stage (selective search, IoU and label, warp), no crop folder.

    python tools/propose.py SRC --format {coco,yolo,voc,mask} --out SHARDS|s3://BUCKET/PREFIX
        [--method selective-search]
        [--mode fast|quality] [--max-proposals N] [--search-max-side PX] [--context 16] [--positive-iou 0.5]
        [--negatives-per-image N] [--gt-jitter K] [--split-ratios 0.7,0.15,0.15] [--classes NAMES]
        [--mask-piece N] [--mask-crack-label N] [--workers N] [--seed S] [--crops DIR] [--strict]

The shards are read by `python -m train --shards SHARDS` like those of tools/pack.py. Photos or
annotations that cannot be used are listed with their reasons in SHARDS/manifest.json; --strict
turns any of them, and any warning (leakage, labels no threshold explains), into exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from crackio.cli import ArgumentParser, incomplete, run_command  # noqa: E402
from crackio.storage.remote import location  # noqa: E402
from crackio.storage.upload import write_pack  # noqa: E402
from crackio.writing.annotations import FORMATS  # noqa: E402
from crackio.writing.pack import print_skipped, warnings  # noqa: E402
from crackio.writing.proposal_stage import ProposeSettings, propose_to_shards, summary  # noqa: E402
from crackio.writing.regions import METHODS, MODES, ProposalSettings  # noqa: E402


def _ratios(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers like 0.7,0.15,0.15, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers (train, valid, test), got {text!r}")
    return values[0], values[1], values[2]


def _search_max_side(text: str) -> int:
    if not text.strip().lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels, got {text!r}")
    try:
        return ProposalSettings(search_max_side=int(text)).search_max_side  # its rule, stated once
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    p, r = ProposalSettings(), ProposeSettings()
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="the annotated dataset (a folder, or a COCO JSON file)")
    ap.add_argument("--format", required=True, choices=FORMATS, help="annotation format")
    ap.add_argument(
        "--out",
        type=location,
        default=Path("shards"),
        help="shards folder, or s3://BUCKET/PREFIX (packed locally, then uploaded)",
    )
    ap.add_argument("--method", default=p.method, choices=METHODS, help="proposal method")
    ap.add_argument("--mode", default=p.mode, choices=MODES, help="selective search mode")
    ap.add_argument("--max-proposals", type=int, default=p.max_proposals, help="cap per photo (R-CNN: ~2000)")
    ap.add_argument(
        "--search-max-side",
        type=_search_max_side,
        default=p.search_max_side,
        help="selective search on the photo downscaled to this longer side, boxes scaled back "
        "(R-CNN's code: 500; faster, recall measured in the README); 0 = full size",
    )
    ap.add_argument("--context", type=int, default=p.context, help="context pixels at the warped size (R-CNN: 16)")
    ap.add_argument("--positive-iou", type=float, default=p.positive_iou, help="label = IoU > this")
    ap.add_argument(
        "--negatives-per-image",
        type=int,
        default=p.negatives_per_image,
        help="keep an IoU-stratified sample of N negatives per photo ; 0 = all",
    )
    ap.add_argument("--gt-jitter", type=int, default=p.gt_jitter, help="jittered copies of each ground-truth box")
    ap.add_argument(
        "--split-ratios",
        type=_ratios,
        default=r.split_ratios,
        help="train,valid,test shares by photo when the dataset has no split folders (default: "
        + ",".join(f"{x:g}" for x in r.split_ratios)
        + ")",
    )
    ap.add_argument("--classes", default="", help="positive class names, comma-separated (default: every class)")
    ap.add_argument(
        "--mask-piece",
        type=int,
        default=0,
        help="masks: cut each crack into boxes of about N pixels along its skeleton (0 = one box per crack)",
    )
    ap.add_argument(
        "--mask-crack-label",
        type=int,
        help="masks: the label (pixel value, .mat Segmentation label) that is crack (default: above half the maximum)",
    )
    ap.add_argument("--workers", type=int, default=r.workers, help="photos in parallel (threads; 0 = all cores)")
    ap.add_argument("--seed", type=int, default=r.seed, help="seed of splits, caps, jitter, negatives, shuffle")
    ap.add_argument("--samples-per-shard", type=int, default=r.samples_per_shard, help="samples per tar")
    ap.add_argument("--crops", type=Path, help="also write the original's proposal folder here")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any photo or annotation had a problem")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    proposal = ProposalSettings(
        method=args.method,
        mode=args.mode,
        max_proposals=args.max_proposals,
        search_max_side=args.search_max_side,
        context=args.context,
        positive_iou=args.positive_iou,
        negatives_per_image=args.negatives_per_image,
        gt_jitter=args.gt_jitter,
    )
    run = ProposeSettings(
        split_ratios=args.split_ratios,
        classes=tuple(c.strip() for c in args.classes.split(",") if c.strip()),
        workers=args.workers,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        mask_piece=args.mask_piece,
        mask_crack_label=args.mask_crack_label,
    )
    return run_command(
        lambda: report(
            write_pack(
                args.out,
                lambda out: propose_to_shards(
                    args.src, args.format, out, proposal, run, args.crops, progress=not args.quiet
                ),
            ),
            args,
        ),
        incomplete(args.out),
    )


def report(manifest: dict, args: argparse.Namespace) -> int:
    print_skipped(manifest, args.out, word="problem")
    print(summary(manifest, args.out))
    problems = warnings(manifest)  # leakage between splits, labels no threshold explains
    for line in problems:
        print(f"warning: {line}")
    if args.strict and (manifest["skipped"] or problems):
        print(
            f"--strict: {len(manifest['skipped'])} photo or annotation problems, {len(problems)} warnings",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
