"""`python -m train sweep`: train a list of variants, then compare them in one table and two plots.

Each variant is a normal run in OUT/<name>/ (train.run.main.main), so a sweep that is stopped and started
again skips finished variants, resumes interrupted ones from their latest checkpoint (mid-epoch too), and
retries failed ones.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import signal
import tomllib
import traceback
import zipfile
from pathlib import Path

import numpy as np

from crackio.cli import Interrupted, closest
from crackio.errors import ConfigError, CrackioError, MissingFile, WriteError
from crackio.fsio import make_dir, remove_temporaries, write_text
from crackio.loading.samplers import label_source
from train.evaluation.report import CLASS_KEYS, plot_pr, plot_val_losses
from train.run.checkpoint import STEP
from train.run.main import main as train_main
from train.run.resume import RESUMABLE, read_config
from train.run.runtime import init_distributed, world
from train.settings.run import DEFAULTS, RunSettings, check_type, unmet
from train.sweep import SHIPPED

# Set by the sweep, not by a variant (the sweep's one process group has the command line's --dist-timeout).
OWNED = ("shards", "out", "resume", "dist_timeout")
OUTPUTS = ("sweep.csv", "sweep.md", "sweep_pr.png", "sweep_curves.png")
# A variant's name is its folder OUT/<name>: no separator, not "." or "..", not hidden, at most 100 characters.
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")
COLUMNS = [
    "variant",
    "title",
    "source",
    "status",
    "split",
    "labels",
    "train_data",
    "val_data",
    "best_epoch",
    "epochs_run",
    *[f"{c}_{m}" for c in CLASS_KEYS for m in ("precision", "recall", "f1", "support")],
    "accuracy",
    "crack_ap",
    "wall_s",
    "images_per_sec",
    "note",
]


@dataclasses.dataclass
class Variant:
    name: str
    title: str
    options: dict  # training options this variant sets
    reference: dict | None  # the original's published report, if any


@dataclasses.dataclass
class VariantsFile:
    """A variants file read and checked: `shared` ([shared] table) holds the options every variant gets unless
    the command line gives them; a variant's own options win over both."""

    path: Path
    shared: dict
    variants: list[Variant]

    def base(self, given: dict) -> dict:
        """The sweep's shared options (flat): the defaults, then the file's [shared] table, then `given` (the
        command line's flags)."""
        return DEFAULTS | self.shared | given


def check_shared_options(base: dict, file: VariantsFile, given: set[str]) -> None:
    """Refuse a shared option that would not reach every variant: one a variant sets to another value itself,
    or one a variant's other settings would ignore (as a single run refuses it: train.settings.run.check_applicable).
    A value that changes nothing (a default spelled out, as scripts that pass every option do) passes.

    Raises:
        ConfigError: naming the option, the variants it would not reach and why, and the variants file.
    """
    without = file.base({})  # what each shared option would be had it not been given
    for name in sorted(given):
        value = base[name]
        if value == without[name]:
            continue  # changes nothing
        missed = []
        for variant in file.variants:
            if name in variant.options:
                if variant.options[name] != value:
                    missed.append(f"{variant.name} (sets its own {name} = {variant.options[name]!r})")
                continue
            needs = unmet(base | variant.options, name)
            if needs:
                missed.append(f"{variant.name} (it applies only with {needs})")
        if missed:
            raise ConfigError(
                f"--{name.replace('_', '-')} would not reach every variant of {file.path}: "
                f"{'; '.join(missed)}. A sweep compares runs on the same terms: drop the option, or set it "
                f"in the variants that use it (a copy of the file, given with --variants)"
            )
    for name in sorted(set(file.shared) - given):  # [shared] options the command line's settings may leave unused
        missed = [
            f"{variant.name} (it applies only with {needs})"
            for variant in file.variants
            if name not in variant.options and (needs := unmet(base | variant.options, name))
        ]
        if missed:
            raise ConfigError(
                f"[shared] {name} of {file.path} would not reach every variant with the options given: "
                f"{'; '.join(missed)}. Drop the option that makes it unused, or edit the file"
            )


def load_variants(path: Path) -> VariantsFile:
    """Parse and check a variants file; every problem names the file and the variant (or [shared]).

    Raises:
        MissingFile: no such file.
        ConfigError: not TOML, no variants, a name that is not a safe folder name or not unique, unknown
            options or values of the wrong type.
    """
    if not path.is_file():
        raise MissingFile(f"variants file {path} does not exist (the shipped one is {SHIPPED})")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e
    unknown_tables = sorted(set(data) - {"variant", "shared"})
    if unknown_tables:
        raise ConfigError(
            f"{path}: unknown top-level keys {unknown_tables}; a variants file holds a [shared] table and "
            f"[[variant]] tables"
        )
    shared = data.get("shared", {})
    if not isinstance(shared, dict):
        raise ConfigError(f"{path}: [shared] must be a table of training options")
    shared = _options(dict(shared), f"{path}: [shared]")
    entries = data.get("variant", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{path}: variants must be [[variant]] tables")
    variants, seen = [], set()
    for i, entry in enumerate(entries):
        entry = dict(entry)
        name = entry.pop("name", "")
        where = f"{path}: variant {i + 1} ({name or 'no name'})"
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ConfigError(
                f"{where}: the name {name!r} is refused: it names the folder OUT/<name>, so it must start with "
                f"a letter, digit or '_' and hold only letters, digits, '.', '_' or '-' (at most 100)"
            )
        if name.lower() in seen:  # case-insensitive: one folder on macOS and Windows
            raise ConfigError(f"{where}: needs a unique name (another variant is also called {name!r})")
        seen.add(name.lower())
        title = str(entry.pop("title", name))
        reference = entry.pop("reference", None)
        if reference is not None:
            _check_reference(reference, where)
        variants.append(Variant(name, title, _options(entry, where), reference))
    if not variants:
        raise ConfigError(f"{path} defines no [[variant]] tables")
    for variant in variants:  # [shared] must reach every variant that does not set the option itself
        for name in sorted(set(shared) - set(variant.options)):
            needs = unmet(shared | variant.options, name)
            if needs:
                raise ConfigError(
                    f"{path}: [shared] {name} does not reach variant {variant.name} (it applies only with {needs}): "
                    f"move it into the variants that use it"
                )
    return VariantsFile(path, shared, variants)


def _options(entry: dict, where: str) -> dict:
    """Training options of a variants file, checked: known names, their fields' types; "none" for no IoU
    threshold (TOML has no null)."""
    known = set(DEFAULTS) - set(OWNED)
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown options {unknown}{closest(unknown[0], known)}; use the names of `python -m train "
            f"--help` with underscores ({', '.join(OWNED)} are set by the sweep)"
        )
    if entry.get("iou_threshold") == "none":  # TOML has no null: "none" asks for the names' labels
        entry["iou_threshold"] = None
    for key, value in entry.items():
        check_type(key, value, where)
    return entry


def _check_reference(ref, where: str) -> None:
    if not isinstance(ref, dict):
        raise ConfigError(f"{where}: reference must be a table")
    for key in CLASS_KEYS:
        row = ref.get(key)
        if not isinstance(row, dict) or set(row) - {"precision", "recall", "f1", "support"}:
            raise ConfigError(f"{where}: reference.{key} must be a table of precision, recall, f1, support")


def variant_config(base: dict, variant: Variant, out: Path) -> RunSettings:
    """The variant's run: the shared options, then its own (refused where its other settings ignore them).

    Raises:
        ConfigError: an option the variant's other settings would ignore, or a folder OUT/<name> that is a
            link leading outside OUT (the sweep writes only inside --out).
    """
    folder = out / variant.name
    if not folder.resolve().is_relative_to(out.resolve()):
        raise ConfigError(
            f"{folder} leads to {folder.resolve()}, outside --out {out}: the sweep writes only inside --out "
            f"(remove that link, or choose another --out)"
        )
    return RunSettings.from_flat(base | variant.options | {"out": str(folder), "resume": ""}, variant.options)


def state(cfg: RunSettings) -> str:
    """new | finished | partial, after checking a folder left by an earlier sweep still fits the variant (`cfg` with
    its global batch resolved, as the run saved it: train.settings.run.RunSettings.for_world)."""
    folder = Path(cfg.checkpoints.out)
    if not any((folder / name).is_file() for name in ("last.pt", STEP)):  # nothing saved yet: start over
        return "new"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} holds a checkpoint but no config.json: delete that folder to retrain the variant")
    saved, now = read_config(folder), cfg.flat()
    then = saved.flat()
    changed = [
        f"{k}: {then.get(k)!r} then, {now[k]!r} now"
        for k in now
        if k not in (*OWNED, *RESUMABLE) and then.get(k) != now[k]
    ]
    if changed:
        raise ConfigError(
            f"{folder} was trained with other options ({'; '.join(changed)}); delete that folder "
            f"to retrain it, or give the sweep another --out"
        )
    finished = (folder / "summary.json").is_file() and (then["epochs"], then["patience"]) == (
        now["epochs"],
        now["patience"],
    )
    return "finished" if finished else "partial"


def run_sweep(base: dict, file: VariantsFile, out: Path) -> list[dict]:
    """Train every variant not finished yet, then write sweep.csv, sweep.md, sweep_pr.png, sweep_curves.png.

    Every variant's settings are checked first (a bad one refuses the sweep before anything trains); a variant
    whose data fails (a sampler that cannot draw on the pack, a damaged pack) fails that variant only (its row
    says why); a file that cannot be written (WriteError) or Ctrl-C / SIGTERM (Interrupted) stop the sweep, since
    every later variant would meet them.

    Raises:
        ConfigError: a variant's settings (naming the file and the variant).
        WriteError: a full disk or an I/O error, naming the file.
        Interrupted: SIGINT or SIGTERM, with what to run to continue.
    """
    variants = file.variants
    init_distributed(base["dist_timeout"])
    rank = world()[0]
    if rank == 0:
        remove_temporaries(out, OUTPUTS)  # what a kill -9 during a write left
    errors: dict[str, str] = {}
    refused = []
    configs: list[RunSettings] = []
    for variant in variants:  # every variant's settings checked before any trains: a bad file is said at once
        try:
            configs.append(variant_config(base, variant, out))
        except ConfigError as e:
            refused.append(f"variant {variant.name}: {e}")
    if refused:
        more = f" (and {len(refused) - 1} more variant(s))" if len(refused) > 1 else ""
        raise ConfigError(f"--variants {file.path}: {refused[0]}{more}; nothing was trained")
    for i, (variant, cfg) in enumerate(zip(variants, configs)):
        try:
            cfg = cfg.for_world(world()[1])  # as a run saves it, so that a resume compares equal
            status = state(cfg)
            if rank == 0:
                print(f"== variant {i + 1}/{len(variants)}: {variant.name} ({variant.title}): {status}")
            if status != "finished":
                train_main(cfg.replace(resume=cfg.checkpoints.out) if status == "partial" else cfg)
        except KeyboardInterrupt as e:
            note = f"variant {variant.name} stopped; run the same sweep command again to go on (it resumes there)"
            raise Interrupted(getattr(e, "signum", signal.SIGINT), note) from None
        except WriteError as e:
            raise WriteError(f"variant {variant.name}: {e}") from e
        except Exception as e:  # noqa: BLE001 - one failed variant must not stop the others
            errors[variant.name] = str(e) if isinstance(e, CrackioError) else f"{type(e).__name__}: {e}"
            if rank == 0:
                if not isinstance(e, CrackioError):
                    traceback.print_exc()  # a bug, not bad input: show where
                print(f"variant {variant.name} failed: {errors[variant.name]}; going on with the others")
    if rank != 0:
        return []
    rows, curves, histories, marks = [], {}, {}, []
    for variant, cfg in zip(variants, configs):
        row, run = collect(variant, cfg, out / variant.name, errors.get(variant.name))
        rows.append(row)
        if run is not None:
            curves[variant.title], histories[variant.title] = run
        if variant.reference:
            rows.append(reference_row(variant))
            crack = variant.reference["crack"]
            marks.append((f"published: {variant.title}", crack["recall"], crack["precision"], variant.title))
    write_tables(rows, out, base, file.path)
    if curves:
        plot_pr(curves, out / "sweep_pr.png", marks, title="Crack precision-recall per variant")
        plot_val_losses(histories, out / "sweep_curves.png")
    print((out / "sweep.md").read_text())
    return rows


def collect(variant: Variant, cfg: RunSettings, folder: Path, error: str | None):
    """The variant's table row, and (labels, probs), history for the plots when it finished (`error`: why it
    failed)."""
    row = {"variant": variant.name, "title": variant.title, "source": "crackio"}
    row |= data_selection(cfg)
    if error is not None or not (folder / "summary.json").is_file():
        return row | {"status": "failed", "note": error or "not finished"}, None
    try:
        return _finished(row, cfg, folder)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError, zipfile.BadZipFile) as e:
        # files read back are untrusted: a damaged one fails this row, in words, not the sweep
        note = f"{folder} holds damaged results ({type(e).__name__}: {e}); delete that folder to retrain it"
        return row | {"status": "failed", "note": note}, None


def _finished(row: dict, cfg: RunSettings, folder: Path):
    summary = json.loads((folder / "summary.json").read_text())
    split = cfg.data.test_split if cfg.data.test_split in summary["splits"] else cfg.data.val_split
    metrics = summary["splits"][split]
    row |= {
        "status": "finished",
        "split": split,
        "labels": label_source(cfg.data.iou_threshold),
        "best_epoch": summary["best_epoch"],
        "epochs_run": summary["epochs_run"],
        "accuracy": metrics["accuracy"],
        "crack_ap": metrics["average_precision"],
        "wall_s": summary["train_seconds"] + summary.get("val_seconds", 0.0),
        "images_per_sec": summary["images_per_sec"],
    }
    if summary.get("limit_batches"):  # a smoke run: its figures are of the first batches only
        row["note"] = f"smoke run (--limit-batches {summary['limit_batches']}): figures of the first batches only"
    row |= {f"{c}_{m}": metrics[c][m] for c in CLASS_KEYS for m in ("precision", "recall", "f1", "support")}
    with np.load(folder / "predictions.npz", allow_pickle=False) as pred:
        curve = (pred[f"{split}_labels"], pred[f"{split}_probs"])
    history = json.loads((folder / "history.json").read_text())
    return row, (curve, history)


def data_selection(cfg: RunSettings) -> dict:
    """What a variant trains and validates on, in words (crackio.loading.samplers' describe())."""
    try:
        train = cfg.sampling.make(True).describe()
        val = cfg.sampling.make(False).describe()
    except CrackioError:
        return {}  # settings the variant's failure already names
    return {"train_data": f"{cfg.data.train_split}: {train}", "val_data": f"{cfg.data.val_split}: {val}"}


def reference_row(variant: Variant) -> dict:
    ref = variant.reference or {}
    row = {
        "variant": variant.name,
        "title": variant.title,
        "source": "original",
        "status": "reference",
        "split": "test",
        "accuracy": ref.get("accuracy", ""),
        "note": "the write-up's data and ResNeXt50; accuracy where published",
    }
    return row | {f"{c}_{m}": ref[c].get(m, "") for c in CLASS_KEYS for m in ("precision", "recall", "f1", "support")}


def write_tables(rows: list[dict], out: Path, base: dict, variants_path: Path) -> None:
    """sweep.csv and sweep.md (raises WriteError on a full disk or an I/O error)."""
    make_dir(out)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows({k: _csv(row.get(k, "")) for k in COLUMNS} for row in rows)
    write_text(out / "sweep.csv", table.getvalue())
    lines = [
        f"# Sweep: {variants_path}",
        "",
        f"Shards `{base['shards']}`, {base['arch']} ({base['weights']}), at most {base['epochs']} epochs, patience "
        f"{base['patience']}, batch {base['batch_size']}, lr {base['lr']} unless a variant sets them. Figures on the "
        f"test split (validation where there is none) at threshold 0.5; the original's published rows "
        f"are on its own data."
        + (
            f" **Smoke runs (--limit-batches {base['limit_batches']}): every figure is of the first batches only.**"
            if base["limit_batches"]
            else ""
        ),
        "",
        "| variant | source | split | labels | train data | validation data | no crack P / R / F1 (support) "
        "| crack P / R / F1 (support) | accuracy | crack AP | best epoch | wall s | img/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        data = f"{row.get('train_data', '')} | {row.get('val_data', '')}"
        if row["status"] == "failed":
            note = row["note"].replace("|", "\\|")
            lines.append(f"| {row['title']} | crackio | | | {data} | **failed**: {note} | | | | | | |")
            continue
        label = row["title"] if row["source"] == "crackio" else "↳ the original, as published"
        lines.append(
            f"| {label} | {row['source']} | {row['split']} | {row.get('labels', '')} | {data} "
            f"| {_prf(row, 'no_crack')} | {_prf(row, 'crack')} "
            f"| {_num(row.get('accuracy'))} | {_num(row.get('crack_ap'))} | {row.get('best_epoch', '')} "
            f"| {_num(row.get('wall_s'), 0)} | {_num(row.get('images_per_sec'), 0)} |"
        )
    write_text(out / "sweep.md", "\n".join(lines) + "\n")


def _prf(row: dict, cls: str) -> str:
    return (
        f"{_num(row[f'{cls}_precision'])} / {_num(row[f'{cls}_recall'])} / {_num(row[f'{cls}_f1'])} "
        f"({row[f'{cls}_support']})"
    )


def _num(value, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float | int) and not isinstance(value, bool) else ""


def _csv(value):
    return round(value, 4) if isinstance(value, float) else value
