"""Every `python -m train` command line: parsers only, built from train.settings.config and the light option modules, so
`--help` answers without importing torch. Each parser hands its values to the module that runs the command,
imported only then. The error policy is crackio.cli.run_command's (train/__main__.py)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from crackio.cli import ArgumentParser, check_limits
from crackio.errors import ConfigError
from crackio.loading.options import BACKENDS, DEVICES
from crackio.writing.annotations import FORMATS
from crackio.writing.regions import MODES
from train.settings.config import (
    SHIPPED,
    Config,
    SvmConfig,
    add_config_arguments,
    check_applicable,
    read_config_file,
    remote_settings,
)

SWEEP_EPILOG = (
    "--out is the sweep folder (default: runs/sweep); each variant trains in OUT/<name>/. Options given "
    "here are shared by every variant; a variant's own settings win. Run the same command again to "
    "skip finished variants, resume interrupted ones and retry failed ones."
)


def add_remote_arguments(ap: argparse.ArgumentParser) -> None:
    """--cache-dir, --cache-limit, --remote-timeout: how a remote --shards is read (the trainer's own are Config
    fields, saved with the run)."""
    group = ap.add_argument_group("a remote pack (--shards s3://... or http(s)://...)")
    remote = ("cache_dir", "cache_limit", "remote_timeout")
    add_config_arguments(group, given_only=False, skip=[f.name for f in fields(Config) if f.name not in remote])


def configure_remote(values: dict) -> None:
    """Take the remote flags out of `values` and set them for this process (crackio.storage.packs.configure)."""
    from crackio.storage.packs import configure

    configure(remote_settings(values.pop("cache_dir"), values.pop("cache_limit"), values.pop("remote_timeout")))


def train(argv: list[str]) -> None:
    """`python -m train [options]`: the flags actually given make the config (or extend a resumed run)."""
    ap = ArgumentParser(
        prog="python -m train",
        description="Train the crack classifier.",
        epilog="Subcommands: python -m train {eval,sweep,svm,detect,export} --help",
    )
    add_config_arguments(ap)
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
        from train.run.resume import resume_config

        cfg = resume_config(given.pop("resume"), **given)
        check_applicable(cfg, given)
    else:
        cfg = Config(**(file | given))
        default = Config()  # a file's value counts as given unless it is the default (config.json holds them all)
        try:
            cfg.validate()  # values first, then whether each option applies (e.g. --block-size in random order)
            check_applicable(cfg, set(given) | {k for k, v in file.items() if v != getattr(default, k)})
        except ConfigError as e:
            if path is None:
                raise
            raise ConfigError(f"{e} (the settings of --config {path} with the flags given)") from None
    import train.run.main

    train.run.main.main(cfg)


def evaluate(argv: list[str]) -> None:
    """`python -m train eval --checkpoint RUN/best.pt [--shards S] [--split test]`."""
    ap = ArgumentParser(prog="python -m train eval", description="Evaluate a saved model on a split.")
    ap.add_argument("--checkpoint", required=True, help="RUN/best.pt or RUN/last.pt")
    ap.add_argument("--shards", default="", help="shards folder (default: the one the run trained on)")
    ap.add_argument("--split", default="test", help="split to evaluate (default: test)")
    ap.add_argument("--threshold", type=float, default=0.5, help="decision threshold on P(crack) (default: 0.5)")
    ap.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    ap.add_argument("--device", default="auto", choices=DEVICES, help="where the model runs (auto: CUDA if present)")
    ap.add_argument("--backend", default="auto", choices=BACKENDS, help="the loader decoder (auto: DALI if installed)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default (all cores)")
    add_remote_arguments(ap)
    a = ap.parse_args(argv)
    configure_remote(vars(a))
    check_limits(
        {
            "--threshold": (0 <= a.threshold <= 1, "in [0, 1] (a probability)", a.threshold),
            "--batch-size": (a.batch_size >= 1, ">= 1", a.batch_size),
        }
    )
    from train.run.evaluate import run_eval
    from train.run.runtime import use_threads

    use_threads(a.threads)

    print(run_eval(a.checkpoint, a.shards, a.split, a.batch_size, a.device, a.backend, a.threshold))


def sweep(argv: list[str]) -> int:
    """`python -m train sweep --shards S [--variants FILE] [--out DIR] [training options shared by the variants]`.

    Returns 1 when a variant failed (its row says why), 0 when every variant finished."""
    ap = ArgumentParser(
        prog="python -m train sweep",
        epilog=SWEEP_EPILOG,
        description="Train a list of variants, then compare them in one table and plots.",
    )
    add_config_arguments(ap, skip=("out", "resume"))  # a sweep has its own folder, and resumes by re-running
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
    base = file.base(options)
    base.validate()  # the shared options, once, before any variant trains
    check_shared_options(base, file, set(options) - {"shards"})
    rows = run_sweep(base, file, out)
    return 1 if any(row.get("status") == "failed" for row in rows) else 0


def svm(argv: list[str]) -> None:
    """`python -m train svm --checkpoint RUN/best.pt [options]`: flags derived from SvmConfig."""
    ap = ArgumentParser(
        prog="python -m train svm",
        description=(
            "R-CNN's second stage: a linear SVM on the frozen fine-tuned backbone's features, "
            "reported beside the network head."
        ),
    )
    add_config_arguments(ap, SvmConfig, given_only=False)
    add_remote_arguments(ap)
    values = vars(ap.parse_args(argv))
    configure_remote(values)
    cfg = SvmConfig(**values)
    cfg.validate()
    from train.svm.stage import run_svm

    run_svm(cfg)


def detect(argv: list[str]) -> None:
    """`python -m train detect --checkpoint RUN/best.pt | --onnx model.onnx PHOTOS... [options]`."""
    ap = ArgumentParser(
        prog="python -m train detect",
        description="Find cracks in whole photos: proposals as in training, scores, NMS, boxes; AP with annotations.",
    )
    model = ap.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", default="", help="RUN/best.pt (or last.pt) of a run")
    model.add_argument(
        "--onnx", default="", help="score with onnxruntime (CPU) a model written by `python -m train export`"
    )
    ap.add_argument("photos", nargs="*", help="photo files or folders (searched recursively); or --split")
    ap.add_argument(
        "--split",
        default="",
        help="instead of photos: the photos tools/propose.py put in this split of --shards (e.g. test), with their "
        "ground truth",
    )
    ap.add_argument("--shards", default="", help="the pack --split reads (default: the run's own)")
    ap.add_argument(
        "--strict", action="store_true", help="refuse photos the run trained or validated on (default: a warning)"
    )
    ap.add_argument("--annotations", default="", help="ground truth (a dataset folder or COCO file) for AP")
    ap.add_argument("--format", default="", choices=FORMATS, help="format of --annotations")
    ap.add_argument("--classes", default="", help="positive class names in the annotations (default: all)")
    ap.add_argument("--svm", default="", help="score with RUN/svm/svm_model.npz instead of the network head")
    ap.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="keep boxes scoring at least this (default: 0.5, or the SVM's chosen threshold)",
    )
    ap.add_argument("--nms-iou", type=float, default=0.3, help="NMS IoU (default: 0.3, R-CNN's)")
    ap.add_argument("--out", default="", help="output folder (default: RUN/detect)")
    ap.add_argument("--batch-size", type=int, default=64, help="crops per forward pass (default: 64)")
    ap.add_argument("--device", default="auto", choices=DEVICES, help="where the model runs (auto: CUDA if present)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default (all cores)")
    crops = ap.add_argument_group(
        "proposals of a run trained on packed crop folders (runs on tools/propose.py shards use theirs)"
    )
    crops.add_argument("--mode", choices=MODES, default=None, help="selective search mode (default: fast, R-CNN's)")
    crops.add_argument("--max-proposals", type=int, default=None, help="proposals per photo (default: 2000, R-CNN's)")
    crops.add_argument("--context", type=int, default=None, help="context pixels at 224 (default: 16, R-CNN's)")
    add_remote_arguments(ap)
    a = ap.parse_args(argv)
    configure_remote(vars(a))
    from train.detection.detect import run_detect
    from train.run.runtime import use_threads

    use_threads(a.threads)
    given = {k: getattr(a, k) for k in ("mode", "max_proposals", "context") if getattr(a, k) is not None}
    run_detect(
        a.checkpoint,
        a.photos,
        a.out,
        annotations=a.annotations,
        fmt=a.format,
        classes=[c for c in a.classes.split(",") if c] or None,
        svm=a.svm,
        score_threshold=a.score_threshold,
        nms_iou=a.nms_iou,
        batch_size=a.batch_size,
        device=a.device,
        onnx=a.onnx,
        shards=a.shards,
        split=a.split,
        strict=a.strict,
        proposals=given,
    )


def export(argv: list[str]) -> None:
    """`python -m train export --checkpoint RUN/best.pt [--out RUN/model.onnx] [--split test] [--tolerance 1e-4]`."""
    ap = ArgumentParser(
        prog="python -m train export",
        description=(
            "Export a trained classifier to ONNX (uint8 images in, P(crack) out, dynamic batch), checked "
            "against PyTorch with onnxruntime on a split; needs pip install 'crackio[export]'."
        ),
    )
    ap.add_argument("--checkpoint", required=True, help="RUN/best.pt or RUN/last.pt")
    ap.add_argument("--out", default="", help="the .onnx file to write (default: RUN/model.onnx)")
    ap.add_argument("--shards", default="", help="shards folder of the check (default: the one the run trained on)")
    ap.add_argument("--split", default="test", help="split the export is checked on (default: test)")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="largest |P_onnx - P_torch| accepted (default: 1e-4)")
    ap.add_argument("--batch-size", type=int, default=64, help="batch size of the check and throughput (default: 64)")
    ap.add_argument("--backend", default="auto", choices=BACKENDS, help="loader backend of the check (default: auto)")
    add_remote_arguments(ap)
    a = ap.parse_args(argv)
    configure_remote(vars(a))
    from train.detection.export import report_text, run_export

    report = run_export(
        a.checkpoint,
        a.out,
        shards=a.shards,
        split=a.split,
        batch_size=a.batch_size,
        tolerance=a.tolerance,
        backend=a.backend,
    )
    print(report_text(report))


COMMANDS = {"eval": evaluate, "sweep": sweep, "svm": svm, "detect": detect, "export": export}
