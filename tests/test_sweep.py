"""python -m train sweep: the shipped variants, a real two-variant sweep, failures, skipping, resuming."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from tests.helpers import tiny
from tests.test_faults import one_line
from train.__main__ import main as cli
from train.sweep import sweep
from train.sweep.sweep import SHIPPED, load_variants, variant_config

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
    file = load_variants(SHIPPED)
    variants = file.variants
    assert len(variants) == 6
    runs = [variant_config(file.base({"shards": "s"}), v, tmp_path) for v in variants]  # each checked when made
    configs = [run.flat() for run in runs]
    settings = [(c["loss"], c["sampler"], c["selection"], c["replacement"], c["iou_threshold"]) for c in configs]
    # The first two take the names' labels (the original's, IoU > 0.5); two relabel at 0.35.
    assert settings[:4] == [
        ("bce", "hard-negatives", "all", True, None),
        ("bce", "weighted", "hard-negatives", True, None),
        ("bce", "weighted", "hard-negatives", True, 0.35),
        ("bce", "weighted", "hard-negatives", False, 0.35),
    ]
    assert [(c["loss"], c["focal_alpha"], c["focal_gamma"], c["iou_threshold"]) for c in configs[4:]] == [
        ("focal", 0.25, 2.0, None),
        ("focal", -1.0, 2.0, 0.35),
    ]
    assert all(run.sampling.parsed_class_weights() == {0: 1, 1: 2} for run in runs[1:4])
    assert all((c["negatives"], c["val_sampler"], c["val_negatives"]) == (800, "hard-negatives", 200) for c in configs)
    # The write-up's published crack F1 for each run, in order.
    assert [v.reference["crack"]["f1"] for v in variants] == [0.66, 0.66, 0.74, 0.74, 0.42, 0.75]


def filter_and_sort_images(image_names: list[str], validation_set: bool) -> list[str]:
    """The write-up's own selection (../shared/seed/, get_loaders), as it wrote it: the oracle."""
    label_0_images, label_1_images = [], []
    for image_name in image_names:
        parts = image_name.split(".")
        iou_score, label = float(parts[2].replace("_", ".")), int(parts[3])
        if label == 1:
            label_1_images.append(image_name)
        elif label == 0:
            label_0_images.append((image_name, iou_score))
    set_size = 800 if not validation_set else 200
    label_0_images_sorted = [img for img, _ in sorted(label_0_images, key=lambda x: x[1], reverse=True)[:set_size]]
    return label_1_images + label_0_images_sorted


def test_shipped_variants_train_and_validate_on_the_write_ups_cut(tmp_path):
    """Every default variant's train and validation selection is filter_and_sort_images' list, at its labels (the
    0.35 runs on names labelled at 0.35, as the write-up's proposal stage wrote them). Ties in IoU included."""
    rng = np.random.default_rng(3)
    ious = np.round(rng.beta(0.6, 2.0, 4000), 2).astype(np.float32)  # many ties, ~20% above 0.35
    file = load_variants(SHIPPED)
    for variant in file.variants:
        cfg = variant_config(file.base({"shards": "s"}), variant, tmp_path)
        threshold = 0.5 if cfg.data.iou_threshold is None else cfg.data.iou_threshold
        labels = (ious > np.float32(threshold)).astype(np.int8)
        names = [
            f"p{i}.{i}.{str(float(iou)).replace('.', '_')}.{label}.jpg"
            for i, (iou, label) in enumerate(zip(ious, labels))
        ]
        for validation in (False, True):
            rows = cfg.sampling.make(train=not validation).select(labels, ious, cfg.data.seed)
            expected = filter_and_sort_images(names, validation)
            assert sorted(names[i] for i in rows) == sorted(expected), (variant.name, validation)
            assert len(rows) == int(labels.sum()) + (200 if validation else 800)


def test_bad_variant_files_name_the_file_and_the_fix(tmp_path):
    path = tmp_path / "v.toml"
    for text, message in (
        ('[[variant]]\nname = "a"\nlearning_rate = 1\n', "unknown options ['learning_rate']"),
        ('[[variant]]\nname = "a"\n[[variant]]\nname = "a"\n', "unique name"),
        ('[[variant]]\nname = "a"\nout = "x"\n', "set by the sweep"),
        ("[[variant]\n", "not valid TOML"),
        ("x = 1\n", "unknown top-level keys ['x']"),
        ("[shared]\nlr = 0.1\n", "defines no [[variant]]"),
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
    for k, v in base.flat().items():
        if k in ("out", "resume"):
            continue
        if k == "shards":  # a flag given once per pack
            args += [f"--shards={s}" for s in v]
        elif isinstance(v, tuple):  # comma-separated numbers
            args += [f"--{k.replace('_', '-')}={','.join(map(str, v))}"] if v else []
        else:
            args.append(f"--{k.replace('_', '-')}={v}")
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
    assert [c.checkpoints.out for c in calls] == [str(out / "impossible")]

    # An interrupted variant (no summary.json yet) is resumed from its folder.
    calls.clear()
    (out / "focal" / "summary.json").unlink()
    assert cli(args) == 1  # the impossible variant failed: the sweep says so in its exit code
    assert [(c.checkpoints.out, c.checkpoints.resume) for c in calls[:1]] == [(str(out / "focal"), str(out / "focal"))]

    # ...and so is one stopped within its first epoch (only a mid-epoch checkpoint, step.pt).
    calls.clear()
    (out / "focal" / "last.pt").rename(out / "focal" / "step.pt")
    assert cli(args) == 1
    assert [(c.checkpoints.out, c.checkpoints.resume) for c in calls[:1]] == [(str(out / "focal"), str(out / "focal"))]
    (out / "focal" / "step.pt").rename(out / "focal" / "last.pt")

    # A finished folder trained with other options is reported, not silently reused or overwritten.
    calls.clear()
    capsys.readouterr()
    assert cli([*args, "--lr", "0.5"]) == 1
    assert [c.checkpoints.out for c in calls] == [str(out / "impossible")]
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
    (variant,) = load_variants(path).variants
    cfg = variant_config(tiny("s", tmp_path).flat(), variant, tmp_path)
    assert cfg.sampling.parsed_class_weights() == {0: 1.0, 1: 3.0} and cfg.data.iou_threshold is None
    path.write_text('[[variant]]\nname = "b"\nepochs = "ten"\n')
    with pytest.raises(ValueError, match="epochs = 'ten' must be of type int"):
        load_variants(path)


def test_a_shared_option_that_misses_a_variant_is_refused_naming_it(demo_shards, tmp_path, capsys):
    path = tmp_path / "v.toml"
    path.write_text('[[variant]]\nname = "a"\n\n[[variant]]\nname = "w"\nsampler = "weighted"\n')
    base = ["sweep", "--shards", str(demo_shards), "--variants", str(path), "--out", str(tmp_path / "s")]
    assert cli([*base, "--block-size", "64"]) == 2
    err = one_line(capsys.readouterr().err)
    assert "--block-size would not reach every variant" in err and "a (it applies only with --order block)" in err
    assert cli([*base, "--focal-gamma", "3"]) == 2
    capsys.readouterr()
    assert not (tmp_path / "s").exists()  # refused before any variant trains
    # Used by one variant only: the other would silently train without it.
    assert cli([*base, "--class-weights", "0:1,1:3"]) == 2
    err = one_line(capsys.readouterr().err)
    assert "a (it applies only with --sampler weighted or --sampler balanced)" in err and "w (" not in err
    # A value a variant sets to another value itself does not reach it either; its own value passes.
    path.write_text('[[variant]]\nname = "a"\nlr = 0.01\n\n[[variant]]\nname = "b"\n')
    file = load_variants(path)
    with pytest.raises(ValueError, match=r"--lr would not reach every variant .*: a \(sets its own lr = 0.01\)"):
        sweep.check_shared_options(file.base({"shards": "x", "lr": 0.1}), file, {"lr"})
    assert sweep.check_shared_options(file.base({"shards": "x", "lr": 0.01}), file, {"lr"}) is None
    # A default spelled out changes nothing: scripts that pass every option keep working.
    assert sweep.check_shared_options(file.base({"shards": "x", "block_size": 128}), file, {"block_size"}) is None


def test_the_reported_mixed_sweep_is_refused_and_the_shipped_file_needs_no_options(tmp_path):
    """The report: --selection hard-negatives --negatives 800 --val-sampler hard-negatives reached only the weighted
    variants. Now refused, naming the three it misses; --negatives 400 reaches all six (all cut)."""
    file = load_variants(SHIPPED)
    given = {"shards": "x", "selection": "hard-negatives", "negatives": 800, "val_sampler": "hard-negatives"}
    with pytest.raises(ValueError) as e:
        sweep.check_shared_options(file.base(given), file, set(given) - {"shards"})
    assert "--selection would not reach every variant" in str(e.value)
    for name in ("bce-shuffle (it applies", "focal-a025 (it applies", "focal-a-1-iou035 (it applies"):
        assert name in str(e.value)
    given = {"shards": "x", "negatives": 400, "val_negatives": 100}
    assert sweep.check_shared_options(file.base(given), file, set(given) - {"shards"}) is None
    cfgs = [variant_config(file.base(given), v, tmp_path) for v in file.variants]
    assert {(c.sampling.negatives, c.sampling.val_negatives) for c in cfgs} == {(400, 100)}


def test_a_shared_table_that_misses_a_variant_is_refused(tmp_path):
    path = tmp_path / "v.toml"
    path.write_text(
        '[shared]\nnegatives = 10\n[[variant]]\nname = "a"\nsampler = "hard-negatives"\n[[variant]]\nname = "b"\n'
    )
    with pytest.raises(ValueError, match=r"\[shared\] negatives does not reach variant b"):
        load_variants(path)
    path.write_text('[shared]\nnegatives = 10\n[bogus]\n[[variant]]\nname = "a"\n')
    with pytest.raises(ValueError, match="unknown top-level keys"):
        load_variants(path)


@pytest.mark.slow
def test_a_smoke_sweep_says_so_and_is_not_reused_by_a_full_one(demo_shards, tmp_path, capsys):
    path = tmp_path / "v.toml"
    path.write_text('[[variant]]\nname = "a"\n')
    out = tmp_path / "s"
    args = ["sweep", "--shards", str(demo_shards), "--variants", str(path), "--out", str(out)]
    args += ["--arch", "shufflenet_v2_x0_5", "--weights", "none", "--head", "linear", "--batch-size", "8"]
    args += ["--epochs", "1", "--quiet"]
    assert cli([*args, "--limit-batches", "1"]) == 0
    assert "Smoke runs (--limit-batches 1)" in (out / "sweep.md").read_text()
    (row,) = list(csv.DictReader((out / "sweep.csv").open()))
    assert row["note"].startswith("smoke run (--limit-batches 1)")
    capsys.readouterr()
    assert cli([*args, "--limit-batches", "2"]) == 1  # not reused: the folder is reported as another run's
    assert "was trained with other options (limit_batches: 1 then, 2 now)" in capsys.readouterr().out


def test_a_shared_table_option_the_command_line_makes_unused_is_refused(tmp_path):
    path = tmp_path / "v.toml"
    path.write_text('[shared]\nval_sampler = "hard-negatives"\nval_negatives = 100\n[[variant]]\nname = "a"\n')
    file = load_variants(path)
    given = {"shards": "x", "val_sampler": "shuffle"}
    with pytest.raises(ValueError, match=r"\[shared\] val_negatives of .* would not reach every variant"):
        sweep.check_shared_options(file.base(given), file, {"val_sampler"})


def test_a_variant_whose_settings_break_a_rule_refuses_the_sweep_before_anything_trains(
    demo_shards, tmp_path, monkeypatch, capsys
):
    variants = tmp_path / "v.toml"
    variants.write_text('[[variant]]\nname = "ok"\n[[variant]]\nname = "bad"\nthreads = 100000\n')
    monkeypatch.setattr(sweep, "train_main", lambda cfg: pytest.fail("a variant trained"))
    assert cli(["sweep", "--variants", str(variants), "--shards", str(demo_shards), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.count("\n") == 0 and f"--variants {variants}: variant bad: --threads must be >= 0 and at most 4096" in err
    )
    assert err.endswith("nothing was trained")
