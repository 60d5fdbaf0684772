"""Annotated photos to shards: R-CNN's proposal stage (selective search, IoU and label, warp), no crop folder.

    python tools/propose.py SRC --format {coco,yolo,voc,mask} --out SHARDS|s3://BUCKET/PREFIX
        [--method selective-search]
        [--mode fast|quality] [--max-proposals N] [--search-max-side PX] [--context 16] [--positive-iou 0.5]
        [--negatives-per-image N] [--gt-jitter K] [--split-ratios 0.7,0.15,0.15] [--classes NAMES]
        [--mask-piece N] [--mask-crack-label N] [--workers N] [--seed S] [--crops DIR] [--strict]
        [--ray auto|local|HOST:PORT]

The shards are read by `python -m train --shards SHARDS` like those of tools/pack.py. Photos or
annotations that cannot be used are listed with their reasons in SHARDS/manifest.json; --strict
turns any of them, and any warning (leakage, labels no threshold explains), into exit code 1.

An interrupted run (Ctrl-C, kill -9, a lost node) run again with the same command reuses the photos and shards it
finished (OUT/.spool) and ends with the same bytes. --ray runs the photos and shards as tasks on a Ray cluster
(crackio.writing.cluster): the same bytes as without it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from crackio.cli import ArgumentParser, incomplete, run_command  # noqa: E402
from crackio.errors import ConfigError, OutOfRange  # noqa: E402
from crackio.flags import add_flags, flag  # noqa: E402
from crackio.storage.remote import is_remote, location  # noqa: E402
from crackio.storage.upload import write_pack  # noqa: E402
from crackio.writing.annotations import FORMATS  # noqa: E402
from crackio.writing.cluster import RayCluster, check_address  # noqa: E402
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
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="the annotated dataset (a folder, or a COCO JSON file)")
    ap.add_argument("--format", required=True, choices=FORMATS, help="annotation format")
    ap.add_argument(
        "--out",
        type=location,
        default=Path("shards"),
        help="shards folder, or s3://BUCKET/PREFIX, gs://... or az://CONTAINER/PREFIX (packed locally, then uploaded)",
    )
    ap.add_argument("--crops", type=Path, help="also write the original's proposal folder here")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any photo or annotation had a problem")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument(
        "--overwrite", action="store_true", help="replace a pack of another source or settings already in --out"
    )
    ap.add_argument(
        "--append",
        action="store_true",
        help="add SRC's photos to the pack in --out (made by this tool with the same settings): its shards stay as "
        "they are, new shards follow; photos it holds already are skipped",
    )
    ap.add_argument(
        "--ray",
        metavar="ADDRESS",
        type=_ray_address,
        help="run on a Ray cluster: auto (RAY_ADDRESS's, or one running here), local (start one here) or HOST:PORT "
        "of its head; every node must reach SRC and --out at the same paths (one CPU per task; --workers unused)",
    )
    # Every other flag is a settings field (crackio.flags). The smallest proposal, the crop's size and its JPEG
    # quality are fixed (no flag); --search-max-side, --split-ratios and --classes parse their text themselves.
    group = ap.add_argument_group("proposals")
    skip = ("min_size", "size", "quality", "search_max_side")
    proposal_fields = add_flags(group, [ProposalSettings], choices={"method": METHODS, "mode": MODES}, skip=skip)
    group.add_argument(
        "--search-max-side",
        type=_search_max_side,
        default=ProposalSettings().search_max_side,
        help="proposals found on the photo downscaled to this longer side, boxes scaled back "
        "(R-CNN's code: 500; faster; recall in docs/performance.md); 0 = full size",
    )
    group = ap.add_argument_group("splits, classes and shards")
    run_fields = add_flags(group, [ProposeSettings], skip=("split_ratios", "classes"))
    ratios = ProposeSettings().split_ratios
    group.add_argument(
        "--split-ratios",
        type=_ratios,
        default=ratios,
        help="train,valid,test shares by photo when the dataset has no split folders (default: "
        + ",".join(f"{x:g}" for x in ratios)
        + ")",
    )
    group.add_argument("--classes", default="", help="positive class names, comma-separated (default: every class)")
    args = ap.parse_args(argv)
    given = vars(args)
    try:
        proposal = ProposalSettings(
            **{name: given[name] for name in proposal_fields}, search_max_side=args.search_max_side
        )
        run = ProposeSettings(
            **{name: given[name] for name in run_fields},
            split_ratios=args.split_ratios,
            classes=tuple(c.strip() for c in args.classes.split(",") if c.strip()),
        )
    except OutOfRange as e:  # the settings' own checks, said in this command's flags: --max-proposals must be >= 1
        ap.error(e.named(flag))

    def propose(out: Path) -> dict:
        def here(cluster: RayCluster | None) -> dict:
            return propose_to_shards(
                args.src, args.format, out, proposal, run, args.crops, not args.quiet, args.overwrite, cluster,
                args.append,
            )  # fmt: skip

        if args.ray is None:
            return here(None)
        with RayCluster(args.ray) as cluster:
            return here(cluster)

    if args.ray and is_remote(args.out):
        ap.error(
            f"--ray with --out {args.out}: Ray's tasks write the shards into a folder every node reaches; give --out a "
            "shared folder (NFS, a mounted bucket)"
        )
    if args.append and args.overwrite:
        ap.error("--append adds to the pack in --out and --overwrite replaces it: give one of them")
    return run_command(lambda: report(write_pack(args.out, propose, appending=args.append), args), incomplete(args.out))


def _ray_address(text: str) -> str:
    try:
        return check_address(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


def report(manifest: dict, args: argparse.Namespace) -> int:
    if manifest.get("appended") == 0:
        print(f"appended nothing: every photo of {args.src} is in {args.out} already ({manifest['reused']['already']})")
        return 0
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
