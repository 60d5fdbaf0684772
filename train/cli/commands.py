"""Every `python -m train` command line: a parser whose flags come from the command's settings (train.settings,
crackio.flags), the settings made from what was given, and the command run with them. Parsers only import the
light settings modules, so `--help` answers without importing torch; each command's module is imported only when
it runs. The error policy is crackio.cli.run_command's (train/__main__.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from crackio.cli import ArgumentParser
from crackio.errors import ConfigError
from crackio.flags import add_flags
from train.cli.flags import add_command_flags, add_run_flags, command_settings
from train.settings.commands import BboxSettings, DetectSettings, EvalSettings, ExportSettings, SvmSettings
from train.settings.files import read_config_file
from train.settings.run import DEFAULTS, RunSettings
from train.sweep import SHIPPED

SWEEP_EPILOG = (
    "--out is the sweep folder (default: runs/sweep); each variant trains in OUT/<name>/. Options given "
    "here are shared by every variant; a variant's own settings win. Run the same command again to "
    "skip finished variants, resume interrupted ones and retry failed ones."
)


def train(argv: list[str]) -> None:
    """`python -m train [options]`: the flags actually given make the settings (or extend a resumed run)."""
    ap = ArgumentParser(
        prog="python -m train",
        usage="%(prog)s --shards SHARDS [options] | --resume RUN [options] | --config FILE [options]",
        description="Train the crack classifier.",
        epilog="Subcommands: python -m train {eval,sweep,svm,bbox,detect,export} --help",
    )
    add_run_flags(ap)
    ap.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="settings from a YAML, TOML or JSON file (keys as the flags, with underscores; a run's config.json "
        "reproduces the run); flags given here win (default: none)",
    )
    given = vars(ap.parse_args(argv))  # only the flags given: their defaults are argparse.SUPPRESS
    path = given.pop("config", None)
    file = read_config_file(path) if path is not None else {}
    if given.get("resume"):
        if path is not None:
            raise ConfigError("--resume continues a run with its own settings: use --resume RUN without --config")
        from train.run.resume import resume_settings

        settings = resume_settings(given.pop("resume"), **given)
    else:
        # A file's value counts as given unless it is the default (config.json holds them all).
        named = set(given) | {k for k, v in file.items() if (tuple(v) if isinstance(v, list) else v) != DEFAULTS[k]}
        try:
            settings = RunSettings.from_flat(file | given, named)
        except ConfigError as e:
            if path is None:
                raise
            raise ConfigError(f"{e} (the settings of --config {path} with the flags given)") from None
    from train.run.main import main

    main(settings)


def evaluate(argv: list[str]) -> None:
    """`python -m train eval --checkpoint RUN/best.pt [--shards S] [--split test]`."""
    ap = ArgumentParser(prog="python -m train eval", description="Evaluate a saved model on a split.")
    add_command_flags(ap, EvalSettings)
    settings = command_settings(EvalSettings, vars(ap.parse_args(argv)))
    from train.run.evaluate import run_eval

    print(run_eval(settings))


def sweep(argv: list[str]) -> int:
    """`python -m train sweep --shards S [--variants FILE] [--out DIR] [training options shared by the variants]`.

    Returns 1 when a variant failed (its row says why), 0 when every variant finished."""
    ap = ArgumentParser(
        prog="python -m train sweep",
        epilog=SWEEP_EPILOG,
        description="Train a list of variants, then compare them in one table and plots.",
    )
    add_run_flags(ap, skip=("out", "resume"))  # a sweep has its own folder, and resumes by re-running
    ap.add_argument("--out", default="runs/sweep", help="the sweep folder; each variant trains in OUT/<name>/")
    ap.add_argument(
        "--variants", default="", help="variants file (default: the original's six runs, train/sweep/variants.toml)"
    )
    options = vars(ap.parse_args(argv))
    variants = Path(options.pop("variants") or SHIPPED)
    out = Path(options.pop("out"))
    if not options.get("shards"):
        raise ConfigError("--shards is required (a folder written by tools/pack.py)")
    from train.sweep.sweep import check_shared_options, load_variants, run_sweep

    file = load_variants(variants)
    base = file.base(options)  # the shared options, checked once, before any variant trains
    check_shared_options(base, file, set(options) - {"shards"})
    rows = run_sweep(base, file, out)
    return 1 if any(row.get("status") == "failed" for row in rows) else 0


def svm(argv: list[str]) -> None:
    """`python -m train svm --checkpoint RUN/best.pt [options]`."""
    ap = ArgumentParser(
        prog="python -m train svm",
        description=(
            "R-CNN's second stage: a linear SVM on the frozen fine-tuned backbone's features, "
            "reported beside the network head."
        ),
    )
    add_command_flags(ap, SvmSettings)
    settings = command_settings(SvmSettings, vars(ap.parse_args(argv)))
    from train.svm.stage import run_svm

    run_svm(settings)


def bbox(argv: list[str]) -> None:
    """`python -m train bbox --checkpoint RUN/best.pt [options]`."""
    ap = ArgumentParser(
        prog="python -m train bbox",
        description=(
            "R-CNN's bounding-box regression: ridge regressors from the frozen backbone's features to the ground "
            "truth of proposals near it, saved with the run for detect."
        ),
    )
    add_command_flags(ap, BboxSettings)
    settings = command_settings(BboxSettings, vars(ap.parse_args(argv)))
    from train.detection.bbox import run_bbox

    run_bbox(settings)


def detect(argv: list[str]) -> None:
    """`python -m train detect --checkpoint RUN/best.pt | --onnx model.onnx PHOTOS... [options]`."""
    ap = ArgumentParser(
        prog="python -m train detect",
        description="Find cracks in whole photos: proposals as in training, scores, NMS, boxes; AP with annotations.",
    )
    ap.add_argument("photos", nargs="*", help="photo files or folders (searched recursively); or --split")
    model = ap.add_mutually_exclusive_group(required=True)  # the usage line shows: one of the two
    add_flags(model, [DetectSettings], skip=[n for n in DetectSettings.names() if n not in ("checkpoint", "onnx")])
    add_command_flags(ap, DetectSettings, skip=("photos", "checkpoint", "onnx"))
    values = vars(ap.parse_args(argv))
    values["photos"] = tuple(values["photos"])
    settings = command_settings(DetectSettings, values)
    from train.detection.detect import run_detect

    run_detect(settings)


def export(argv: list[str]) -> None:
    """`python -m train export --checkpoint RUN/best.pt [--out RUN/model.onnx] [--split test] [--tolerance 1e-4]`."""
    ap = ArgumentParser(
        prog="python -m train export",
        description=(
            "Export a trained classifier to ONNX (uint8 images in, P(crack) out, dynamic batch), checked "
            "against PyTorch with onnxruntime on a split; needs pip install 'crackio[export]'."
        ),
    )
    add_command_flags(ap, ExportSettings)
    settings = command_settings(ExportSettings, vars(ap.parse_args(argv)))
    from train.detection.export import report_text, run_export

    print(report_text(run_export(settings)))


COMMANDS = {"eval": evaluate, "sweep": sweep, "svm": svm, "bbox": bbox, "detect": detect, "export": export}
