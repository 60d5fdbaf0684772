"""Pack a proposal directory into WebDataset shards with DALI and random-access indexes.

    python tools/pack.py SRC [--out shards/] [--samples-per-shard N] [--workers N] [--seed S] [--strict]
    python tools/pack.py SRC --out s3://BUCKET/PREFIX   pack locally, then upload (manifest last)
    python tools/pack.py NEW --out OUT --append   add NEW's crops to the pack OUT: its shards untouched
    python tools/pack.py --verify OUT      read every stored sample of OUT (a folder or URL), check its checksum

Each subfolder of SRC is a split (train, valid, test, ...); a SRC holding images
directly is one split named after the folder. Bad inputs are skipped and listed
with their reasons in OUT/manifest.json; --strict turns any skip, and any warning (leakage between
splits, labels no threshold explains), into exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from crackio.cli import ArgumentParser, incomplete, run_command  # noqa: E402
from crackio.errors import OutOfRange  # noqa: E402
from crackio.flags import add_flags, flag  # noqa: E402
from crackio.format.layout import join  # noqa: E402
from crackio.format.manifest import repack  # noqa: E402
from crackio.storage.packs import open_pack, verify_pack  # noqa: E402
from crackio.storage.remote import location  # noqa: E402
from crackio.storage.upload import write_pack  # noqa: E402
from crackio.writing.pack import PackSettings, pack, print_skipped, summary, warnings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s SRC [--out OUT] [options]\n       %(prog)s --verify OUT",
    )
    ap.add_argument(  # optional to argparse only: --verify OUT takes no SRC
        "src", type=Path, nargs="?", help="proposal folder: SRC/<split>/<stem>.<proposal>.<iou>.<label>.jpg (required)"
    )
    ap.add_argument(
        "--verify",
        type=location,
        metavar="OUT",
        help="instead of packing: read every sample of OUT (a folder or URL) and check it",
    )
    ap.add_argument(
        "--out",
        type=location,
        default=Path("shards"),
        help="shards folder, or s3://BUCKET/PREFIX, gs://... or az://CONTAINER/PREFIX (packed locally, then uploaded)",
    )
    ap.add_argument("--strict", action="store_true", help="exit 1 if any input was skipped or any warning printed")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument(
        "--overwrite", action="store_true", help="replace a pack of another source or settings already in --out"
    )
    ap.add_argument(
        "--append",
        action="store_true",
        help="add SRC's crops to the pack in --out (made by this tool with the same settings): its shards stay as "
        "they are, new shards follow; crops of names it holds already are skipped",
    )
    # Every other flag is a PackSettings field (crackio.flags); the stored image's size and quality are fixed.
    fields = add_flags(ap.add_argument_group("packing"), [PackSettings], skip=("size", "quality"))
    args = ap.parse_args(argv)
    if args.verify is not None:
        return run_command(lambda: check(args.verify), incomplete(args.verify))
    if args.src is None:
        ap.error("give a proposal folder SRC, or --verify OUT")
    try:
        settings = PackSettings(**{name: getattr(args, name) for name in fields})
    except OutOfRange as e:  # its own checks, said in this command's flags: --samples-per-shard must be >= 1, got 0
        ap.error(e.named(flag))
    if not args.src.is_dir():
        ap.error(f"proposal folder {args.src} does not exist (expected SRC/<split>/*.jpg)")
    if args.append and args.overwrite:
        ap.error("--append adds to the pack in --out and --overwrite replaces it: give one of them")

    def write(out: Path) -> dict:
        return pack(args.src, out, settings, progress=not args.quiet, overwrite=args.overwrite, append=args.append)

    return run_command(lambda: report(write_pack(args.out, write, appending=args.append), args), incomplete(args.out))


def check(out: str | Path) -> int:
    problems = 0
    for line in verify_pack(out):
        problems += 1
        print(f"damaged: {line}", file=sys.stderr)
    samples = open_pack(out).manifest["samples"]
    if problems:
        print(f"{problems} problems in {out} ({samples} samples): {repack(out)}")
        return 1
    print(f"{out}: all {samples} samples match their checksums and their index rows")
    return 0


def report(manifest: dict, args: argparse.Namespace) -> int:
    if manifest.get("appended") == 0:
        print(f"appended nothing: every crop of {args.src} is in {args.out} already ({manifest['already']})")
        return 0
    print_skipped(manifest, args.out)
    for split, info in manifest["splits"].items():
        if info["converted_list"]:
            print(
                f"converted {sum(info['converted'].values())} {split} inputs, each listed with what was done "
                f"in {join(args.out, info['converted_list'])}",
                file=sys.stderr,
            )
    print(summary(manifest, args.out))
    problems = warnings(manifest)
    if args.strict and (manifest["skipped"] or problems):
        print(f"--strict: {len(manifest['skipped'])} inputs were skipped, {len(problems)} warnings", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
