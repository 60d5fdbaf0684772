"""python -m train sweep: the shipped variants, a real two-variant sweep, failures, skipping, resuming."""

from __future__ import annotations

import csv
import dataclasses

import pytest

from tests.helpers import tiny
from train import sweep
from train.__main__ import main as cli
from train.sweep import SHIPPED, load_variants, variant_config

VARIANTS = """
[[variant]]
name = "bce"
title = "BCE, shuffle"
[variant.reference]
no_crack = { precision = 0.86, recall = 0.87, f1 = 0.86, support = 37111 }
crack = { precision = 0.67, recall = 0.65, f1 = 0.66, support = 15337 }
accuracy = 0.80

[[variant]]
name = "focal"
title = "focal, alpha -1"
loss = "focal"
sampler = "weighted"
selection = "hard-negatives"
negatives = 50
focal_alpha = -1.0
iou_threshold = 0.35

[[variant]]
name = "impossible"
title = "weighted without replacement, too many draws"
sampler = "weighted"
replacement = false
num_samples = 100000
"""


def test_shipped_variants_are_the_originals_six_runs(tmp_path):
    variants = load_variants(SHIPPED)
    assert len(variants) == 6
    configs = [variant_config(tiny("s", tmp_path), v, tmp_path) for v in variants]
    for cfg in configs:
        cfg.validate()
    settings = [(c.loss, c.sampler, c.replacement, c.iou_threshold, c.focal_alpha) for c in configs]
    # The first two take the names' labels (the original's, IoU > 0.5); two relabel at 0.35.
    assert settings[:4] == [
        ("bce", "shuffle", True, None, 0.25),
        ("bce", "weighted", True, None, 0.25),
        ("bce", "weighted", True, 0.35, 0.25),
        ("bce", "weighted", False, 0.35, 0.25),
    ]
    assert [(c.loss, c.focal_alpha, c.focal_gamma) for c in configs[4:]] == [("focal", 0.25, 2.0), ("focal", -1.0, 2.0)]
    assert all(c.parsed_class_weights() == {0: 1, 1: 2} for c in configs[1:4])
    # The write-up's published crack F1 for each run, in order.
    assert [v.reference["crack"]["f1"] for v in variants] == [0.66, 0.66, 0.74, 0.74, 0.42, 0.75]


def test_bad_variant_files_name_the_file_and_the_fix(tmp_path):
    path = tmp_path / "v.toml"
    for text, message in (
        ('[[variant]]\nname = "a"\nlearning_rate = 1\n', "unknown options ['learning_rate']"),
        ('[[variant]]\nname = "a"\n[[variant]]\nname = "a"\n', "unique name"),
        ('[[variant]]\nname = "a"\nout = "x"\n', "set by the sweep"),
        ("[[variant]\n", "not valid TOML"),
        ("x = 1\n", "defines no [[variant]]"),
    ):
        path.write_text(text)
        with pytest.raises(ValueError, match="v.toml") as e:
            load_variants(path)
        assert message in str(e.value)


@pytest.mark.slow
def test_sweep_tables_plots_failure_skip_and_resume(demo_shards, tmp_path, monkeypatch, capsys):
    variants = tmp_path / "variants.toml"
    variants.write_text(VARIANTS)
    out = tmp_path / "sweep"
    base = tiny(demo_shards, "", epochs=1)
    args = ["sweep", "--variants", str(variants), "--out", str(out)]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in dataclasses.asdict(base).items() if k not in ("out", "resume")]
    assert cli(args) == 1  # the impossible variant failed: the sweep says so in its exit code
    assert "variant impossible failed: weighted sampler without replacement cannot draw" in capsys.readouterr().out
    for name in ("sweep.md", "sweep.csv", "sweep_pr.png", "sweep_curves.png"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["variant"], r["source"], r["status"]) for r in rows] == [
        ("bce", "crackio", "finished"),
        ("bce", "original", "reference"),
        ("focal", "crackio", "finished"),
        ("impossible", "crackio", "failed"),
    ]
    assert "cannot draw 100000" in rows[3]["note"]
    assert rows[1]["crack_f1"] == "0.66" and rows[1]["no_crack_support"] == "37111"
    n_test = {"bce": 0, "focal": 0}
    for row in (rows[0], rows[2]):
        assert row["split"] == "test" and row["best_epoch"] == "1"
        n_test[row["variant"]] = int(row["crack_support"]) + int(row["no_crack_support"])
        assert 0 <= float(row["crack_f1"]) <= 1 and float(row["wall_s"]) > 0 and float(row["images_per_sec"]) > 0
    assert n_test["bce"] == n_test["focal"] > 0
    assert int(rows[2]["crack_support"]) >= int(rows[0]["crack_support"])  # IoU 0.35 labels more cracks
    table = (out / "sweep.md").read_text()
    assert "| BCE, shuffle | crackio | test | labels from the file names |" in table
    assert "| test | labels relabelled as IoU > 0.35 |" in table and "↳ the original, as published" in table
    assert rows[0]["labels"] == "labels from the file names"
    assert "**failed**" in table

    # Again: finished variants are skipped, the failed one is retried.
    calls = []
    monkeypatch.setattr(sweep, "train_main", lambda cfg: calls.append(cfg))
    assert cli(args) == 1  # the impossible variant failed: the sweep says so in its exit code
    assert [c.out for c in calls] == [str(out / "impossible")]

    # An interrupted variant (no summary.json yet) is resumed from its folder.
    calls.clear()
    (out / "focal" / "summary.json").unlink()
    assert cli(args) == 1  # the impossible variant failed: the sweep says so in its exit code
    assert [(c.out, c.resume) for c in calls[:1]] == [(str(out / "focal"), str(out / "focal"))]

    # ...and so is one stopped within its first epoch (only a mid-epoch checkpoint, step.pt).
    calls.clear()
    (out / "focal" / "last.pt").rename(out / "focal" / "step.pt")
    assert cli(args) == 1
    assert [(c.out, c.resume) for c in calls[:1]] == [(str(out / "focal"), str(out / "focal"))]
    (out / "focal" / "step.pt").rename(out / "focal" / "last.pt")

    # A finished folder trained with other options is reported, not silently reused or overwritten.
    calls.clear()
    capsys.readouterr()
    assert cli([*args, "--lr", "0.5"]) == 1
    assert [c.out for c in calls] == [str(out / "impossible")]
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert rows[0]["status"] == "failed" and "lr: 0.001 then, 0.5 now" in rows[0]["note"]
    assert (out / "bce" / "summary.json").is_file()


def test_sweep_without_shards_is_a_clear_error(tmp_path, capsys):
    assert cli(["sweep", "--out", str(tmp_path)]) == 2
    assert "--shards is required" in capsys.readouterr().err
    assert cli(["sweep", "--shards", str(tmp_path), "--variants", str(tmp_path / "none.toml")]) == 2
    assert "none.toml does not exist" in capsys.readouterr().err


def test_variant_option_types_are_checked_and_a_weights_table_works(tmp_path):
    path = tmp_path / "v.toml"
    path.write_text(
        '[[variant]]\nname = "a"\nsampler = "weighted"\nclass_weights = {0 = 1, 1 = 3}\niou_threshold = "none"\n'
    )
    (variant,) = load_variants(path)
    cfg = variant_config(tiny("s", tmp_path), variant, tmp_path)
    assert cfg.parsed_class_weights() == {0: 1.0, 1: 3.0} and cfg.iou_threshold is None
    path.write_text('[[variant]]\nname = "b"\nepochs = "ten"\n')
    with pytest.raises(ValueError, match="epochs = 'ten' must be of type int"):
        load_variants(path)


def test_a_shared_option_no_variant_uses_is_refused(demo_shards, tmp_path, capsys):
    path = tmp_path / "v.toml"
    path.write_text('[[variant]]\nname = "a"\n\n[[variant]]\nname = "w"\nsampler = "weighted"\n')
    base = ["sweep", "--shards", str(demo_shards), "--variants", str(path), "--out", str(tmp_path / "s")]
    assert cli([*base, "--block-size", "64"]) == 2
    assert "--block-size applies to none of the variants" in capsys.readouterr().err
    assert cli([*base, "--focal-gamma", "3"]) == 2
    assert not (tmp_path / "s").exists()  # refused before any variant trains
    # One variant using a shared option is enough: the weighted one reads --class-weights.
    assert sweep.check_shared_options(sweep.Config(shards="x"), load_variants(path), {"class_weights"}, path) is None
