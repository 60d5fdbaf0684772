"""python -m train on CPU with a tiny architecture: outputs, resume, early stopping, losses, errors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from torchvision import models

from crackio import ConfigError
from tests.conftest import copy_run
from tests.helpers import ARCH, TINY_ARGS, config, tiny, without_timing
from train.__main__ import main as cli
from train.run.main import main
from train.run.model import WeightsError, build_model
from train.run.resume import resume_settings
from train.settings.run import RunSettings, run_settings


@pytest.fixture(scope="module")
def two_epochs(demo_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    main(tiny(demo_shards, out, target_recall=0.9, patience=5))
    return out


@pytest.mark.slow
def test_a_run_writes_every_output(two_epochs):
    for name in (
        "config.json",
        "history.json",
        "metrics.jsonl",
        "best.pt",
        "last.pt",
        "report.txt",
        "curves.png",
        "pr_curve.png",
        "summary.json",
        "predictions.npz",
    ):
        assert (two_epochs / name).is_file(), name
    summary = json.loads((two_epochs / "summary.json").read_text())
    with np.load(two_epochs / "predictions.npz", allow_pickle=False) as pred:
        for split in ("valid", "test"):
            labels = pred[f"{split}_labels"]
            assert len(labels) == len(pred[f"{split}_probs"]) == len(pred[f"{split}_names"])
            # the summary's class table is the report of exactly these predictions
            assert summary["splits"][split]["crack"]["support"] == int(labels.sum())
            assert summary["splits"][split]["no_crack"]["support"] == int((labels == 0).sum())
    history = json.loads((two_epochs / "history.json").read_text())
    assert len(history) == 2
    for key in (
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "crack_precision",
        "crack_recall",
        "crack_f1",
        "crack_ap",
        "images_per_sec",
        "data_wait_share",
        "train_seconds",
        "val_seconds",
    ):
        assert all(isinstance(h[key], float) for h in history), key
    assert all(0 <= h["crack_ap"] <= 1 for h in history)  # the threshold-free trend, every epoch
    assert all(h["train_seconds"] + h["val_seconds"] <= h["epoch_seconds"] for h in history)
    assert summary["train_seconds"] == pytest.approx(sum(h["train_seconds"] for h in history))
    assert summary["val_seconds"] == pytest.approx(sum(h["val_seconds"] for h in history))
    assert summary["labels"] == "labels from the file names" and summary["iou_threshold"] is None
    assert len((two_epochs / "metrics.jsonl").read_text().splitlines()) == 2
    report = (two_epochs / "report.txt").read_text()
    assert "== valid" in report and "== test" in report
    assert "    No crack" in report and "       Crack" in report and "macro avg" in report
    assert "confusion matrix" in report
    assert "labels from the file names" in report.splitlines()[0]
    assert RunSettings.from_flat(json.loads((two_epochs / "config.json").read_text())).model.arch == ARCH


@pytest.mark.slow
def test_target_recall_threshold_reaches_it_on_validation(two_epochs):
    summary = json.loads((two_epochs / "summary.json").read_text())["target_recall"]
    assert summary["recall"] >= 0.9 and 0 <= summary["threshold"] <= 1
    assert "target crack recall 0.90" in (two_epochs / "report.txt").read_text()


@pytest.mark.slow
def test_resume_reproduces_an_uninterrupted_run(tiny_run, two_epochs, tmp_path):
    out = copy_run(tiny_run, tmp_path / "resumed")  # two_epochs' settings, stopped after its first epoch
    main(resume_settings(out, epochs=2))
    full = without_timing(json.loads((two_epochs / "history.json").read_text()))
    resumed = without_timing(json.loads((out / "history.json").read_text()))
    assert len(resumed) == len(full) == 2
    for a, b in zip(full, resumed):
        assert a.pop("train_digest") == b.pop("train_digest")  # the same samples in every step
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_early_stopping_stops_at_the_first_stall(demo_shards, tmp_path):
    out = tmp_path / "early"
    main(tiny(demo_shards, out, epochs=4, patience=1, lr=0.05, optimizer="sgd"))
    history = json.loads((out / "history.json").read_text())
    losses = [h["val_loss"] for h in history]
    stalls = [i for i in range(1, len(losses)) if losses[i] >= min(losses[:i])]
    assert len(history) == (stalls[0] + 1 if stalls else 4)


@pytest.mark.slow
def test_focal_loss_without_alpha_trains(demo_shards, tmp_path):
    out = tmp_path / "focal"
    main(tiny(demo_shards, out, epochs=1, loss="focal", focal_alpha=-1, sampler="balanced", backend="torch"))
    assert json.loads((out / "history.json").read_text())[0]["train_loss"] > 0


@pytest.mark.slow
def test_block_order_trains_and_block_size_needs_it(demo_shards, tiny_run, tmp_path, capsys):
    out = tmp_path / "block"
    main(tiny(demo_shards, out, epochs=1, order="block", block_size=16, backend="torch"))
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and history[0]["train_loss"] > 0
    assert json.loads((out / "config.json").read_text())["order"] == "block"
    code = cli(["--shards", str(demo_shards), "--out", str(tmp_path / "x"), "--block-size", "64", "--weights", "none"])
    assert code == 2 and "--block-size only applies with --order block" in capsys.readouterr().err
    random = copy_run(tiny_run, tmp_path / "random")  # a run in the random order
    assert cli(["--resume", str(random), "--epochs", "2", "--block-size", "64"]) == 2
    assert "--block-size only applies with --order block" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_subcommand_and_wrong_architecture(two_epochs, demo_shards, tmp_path, capsys):
    assert (
        cli(
            [
                "eval",
                "--checkpoint",
                str(two_epochs / "best.pt"),
                "--shards",
                str(demo_shards),
                "--split",
                "valid",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "No crack" in capsys.readouterr().out
    ckpt = torch.load(two_epochs / "best.pt", weights_only=True)
    ckpt["config"]["arch"] = "resnet18"
    torch.save(ckpt, tmp_path / "other.pt")
    assert cli(["eval", "--checkpoint", str(tmp_path / "other.pt"), "--device", "cpu"]) == 2
    assert "does not fit" in capsys.readouterr().err
    with pytest.raises(WeightsError, match="was trained as --arch .* --head linear, not --arch resnet18 --head linear"):
        build_model("resnet18", str(two_epochs / "best.pt"), "linear")
    torch.save(ckpt["model"], tmp_path / "bare.pt")  # a bare state dict says nothing of its architecture
    with pytest.raises(WeightsError, match="another architecture"):
        build_model("resnet18", str(tmp_path / "bare.pt"), "linear")


BAD_INPUTS = {  # name: (arguments, with {shards} and {tmp} filled in; the message it must print)
    "missing shards": (["--shards", "{tmp}/none", "--device", "cpu"], "does not exist"),
    "no manifest": (["--shards", "{tmp}", "--device", "cpu"], "manifest.json is missing"),
    "unknown split": (
        [
            "--shards",
            "{shards}",
            "--val-split",
            "nope",
            *TINY_ARGS,
            "--out",
            "{tmp}/r",
        ],
        "split 'nope'",
    ),
    "bad class weights": (["--shards", "{shards}", "--class-weights", "1,2"], "--class-weights"),
    "weights offline": (
        ["--shards", "{shards}", "--arch", ARCH, "--device", "cpu", "--out", "{tmp}/w"],
        "--weights none",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_one_clear_line(demo_shards, tmp_path, capsys, case, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-cache"))  # nothing cached: the offline message
    args, message = BAD_INPUTS[case]
    assert cli([a.format(shards=demo_shards, tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("flag, value", [("--loss", "hinge"), ("--selection", "hardest"), ("--backend", "tf")])
def test_unknown_choices_are_refused_by_the_parser_with_the_choices(demo_shards, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_:
        cli(["--shards", str(demo_shards), flag, value])
    assert exit_.value.code == 2 and f"invalid choice: '{value}'" in capsys.readouterr().err


def test_unknown_flag_is_argparse_usage(demo_shards):
    with pytest.raises(SystemExit):
        cli(["--shards", str(demo_shards), "--no-such-flag", "1"])


@pytest.mark.slow
def test_a_nan_loss_stops_without_a_checkpoint(demo_shards, tmp_path, capsys):
    assert (
        cli(
            [
                "--shards",
                str(demo_shards),
                *TINY_ARGS,
                "--lr",
                "1e30",
                "--epochs",
                "1",
                "--out",
                str(tmp_path / "nan"),
                "--batch-size",
                "16",
                "--limit-batches",
                "2",  # the loss is checked at the pass's last step: the one after the first update
            ]
        )
        == 2
    )
    assert "NaN" in capsys.readouterr().err
    assert not (tmp_path / "nan" / "last.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch", [ARCH, "resnext50_32x4d"])
def test_imagenet_weights_load_from_the_torch_cache(arch, tmp_path, monkeypatch):
    weights = models.get_model_weights(arch).DEFAULT
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    reference = models.get_model(arch, weights=None).state_dict()
    torch.save(reference, cache / os.path.basename(weights.url))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = build_model(arch, "imagenet", "original")
    got = model.backbone.state_dict()
    assert all(torch.equal(got[k], v) for k, v in reference.items())
    assert model(torch.zeros(2, 3, 224, 224)).shape == (2,)


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_train_and_write_once(two_ranks):
    run, out = two_ranks  # --log-every 3: rank 0 alone prints a line at steps 2, 5, 8; the ranks still sync
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step 3/" in run.stderr  # rank 0's progress lines (its output is not a terminal)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert run.stdout.count("run folder:") == 1
    history = json.loads((out / "history.json").read_text())
    assert history[0]["train_loss"] > 0


def test_config_round_trip():
    cfg = run_settings(shards="x", sampler="weighted", class_weights="0:1,1:3")
    assert cfg.sampling.make(train=True).class_weights == {0: 1 / 3, 1: 1.0}
    assert RunSettings.from_flat(cfg.flat()) == cfg
    with pytest.raises(ValueError, match="unknown config keys"):
        RunSettings.from_flat({"shards": "x", "lr_max": 1})


def test_bugs_keep_their_traceback_bad_input_is_one_line(demo_shards, monkeypatch, capsys):
    import train.run.main

    def boom(cfg):
        raise RuntimeError("a DALI or CUDA bug")

    monkeypatch.setattr(train.run.main, "main", boom)
    with pytest.raises(RuntimeError, match="a DALI or CUDA bug"):  # not turned into "error: ..." and exit 2
        cli(["--shards", str(demo_shards)])


IGNORED = {  # flags another setting would silently ignore: refused, naming what they need
    "class weights without weighting": (
        ["--class-weights", "0:1,1:3"],
        "--class-weights only applies with --sampler weighted or --sampler balanced",
    ),
    "negatives without a hard-negatives cut": (
        ["--sampler", "weighted", "--negatives", "5"],
        "--negatives only applies",
    ),
    "focal gamma with bce": (["--focal-gamma", "3"], "--focal-gamma only applies with --loss focal"),
    "pos weight with focal": (["--loss", "focal", "--pos-weight", "2"], "--pos-weight only applies with --loss bce"),
    "val negatives without the cut": (["--val-negatives", "50"], "--val-negatives only applies"),
}


@pytest.mark.parametrize("case", list(IGNORED))
def test_flags_that_would_be_ignored_are_refused(demo_shards, capsys, case):
    args, message = IGNORED[case]
    assert cli(["--shards", str(demo_shards), *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_resume_uses_the_flags_given_and_refuses_the_rest(tiny_run, tmp_path, monkeypatch, capsys):
    import train.run.main

    out = copy_run(tiny_run, tmp_path / "one")
    got = []
    monkeypatch.setattr(train.run.main, "main", got.append)
    assert cli(["--resume", str(out), "--epochs", "20"]) == 0  # 20 is also the default: given, so it counts
    assert got[0].optim.epochs == 20 and got[0].checkpoints.resume == str(out) and got[0].model.arch == ARCH
    assert cli(["--resume", str(out), "--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "cannot change --lr 0.1 (the run has 0.001)" in err and "--out" in err
    assert cli(["--resume", str(out), "--lr", "0.001", "--out", str(out)]) == 0  # the run's own values: fine
    with pytest.raises(ConfigError, match="settings other than the run's"):
        train.run.resume.check_resumed(config(resume=str(out)))  # a default config is not that run's


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--seed", "-1"),
        ("--num-samples", "-5"),
        ("--workers", "-3"),
        ("--val-negatives", "-1"),
        ("--pos-weight", "nan"),
    ],
)
def test_negative_settings_are_one_line_errors(demo_shards, capsys, flag, value):
    assert cli(["--shards", str(demo_shards), flag, value]) == 2
    assert f"{flag} must be >= 0" in capsys.readouterr().err


def test_a_head_outside_the_choices_is_refused(demo_shards):
    with pytest.raises(ConfigError, match="--head must be one of original, linear, got 'seed'"):
        config(shards=str(demo_shards), head="seed")


def test_a_mistakes_caption_keeps_the_proposal_iou_and_label_of_any_stem():
    import matplotlib

    from train.evaluation.mistakes import CAPTION, caption, worst_figure

    tail = ".17.0_734.1.jpg"
    roboflow = "IMG_0042_jpg.rf.9f8e7d6c5b4a39281706f5e4d3c2b1a0" + tail
    shown = caption(roboflow)
    assert shown.endswith(tail) and shown.startswith("IMG_00") and "\u2026" in shown and len(shown) == CAPTION
    assert caption("crack_7.3.0_5.0.png") == "crack_7.3.0_5.0.png"  # short: whole
    for stem in ("s" * 300, "a.b.c" * 40, "IMG_1_jpg.rf.0123456789abcdef0123456789abcdef"):
        assert caption(stem + ".123.0_984375.0.jpeg").endswith(".123.0_984375.0.jpeg")
    tile = np.zeros((8, 8, 3), np.uint8)
    fig = worst_figure({"false_positives": [(0.93, tile, roboflow)], "false_negatives": []}, 3)
    assert fig.axes[0].get_title() == f"P=0.93\n{shown}"
    matplotlib.pyplot.close(fig)


@pytest.mark.parametrize(
    "typed, hint",
    [
        ("resnext50", "did you mean 'resnext50_32x4d'?"),
        ("regnet_y_400", "did you mean 'regnet_y_400mf'?"),
        ("wide_resnet50", "did you mean 'wide_resnet50_2'?"),
        ("ResNeXt101_64", "did you mean 'resnext101_64x4d'?"),
        ("efficientnet_b", "did you mean one of " + ", ".join(f"'efficientnet_b{k}'" for k in range(8)) + "?"),
        ("resnet", "did you mean one of 'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152'?"),
        ("resnet_18", "did you mean 'resnet18'?"),  # no name begins so: the closest
        ("resnxt50_32x4d", "did you mean 'resnext50_32x4d'?"),
    ],
)
def test_an_unknown_arch_suggests_the_names_it_begins_then_the_closest(typed, hint):
    with pytest.raises(ConfigError) as e:
        build_model(typed, "none", "linear")
    assert f"--arch {typed!r} is not a torchvision classification model; {hint} (e.g." in str(e.value)


def test_steps_csv_counts_steps_from_1_and_a_resume_cuts_it(tmp_path):
    """(A run's steps.csv counting from 1 as the console does: test_trainer_options's --limit-batches run.)"""
    import csv

    from train.run.logs import CsvLog

    def steps(folder):
        with (folder / "steps.csv").open(newline="") as f:
            return [int(row["step"]) for row in csv.DictReader(f)]

    out = tmp_path / "r"
    out.mkdir()
    row = {"epoch": 1, "train_loss": 0.5, "lr": 0.1, "images_per_sec": 1.0, "data_wait_share": 0.0}
    CsvLog(out, 0).steps([row | {"step": s} for s in range(3)])  # the loop counts from 0
    assert steps(out) == [1, 2, 3]
    # A run resumed after step 2 keeps steps 1 and 2 and logs the next as 3; an older steps.csv from 0 is renumbered.
    CsvLog(out, 2).steps([row | {"step": 2}])
    assert steps(out) == [1, 2, 3]
    old = tmp_path / "old"
    old.mkdir()
    (old / "steps.csv").write_text("step,epoch,train_loss,lr,images_per_sec,data_wait_share\n"
                                   + "".join(f"{k},1,0.5,0.1,1.0,0.0\n" for k in range(5)))  # fmt: skip
    CsvLog(old, 3)
    assert steps(old) == [1, 2, 3]


@pytest.mark.slow
def test_resuming_a_finished_run_says_so_and_writes_nothing(two_epochs, tmp_path, capsys):
    run = tmp_path / "finished"
    shutil.copytree(two_epochs, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert cli(["--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{run} is a finished run: it trained all 2 epochs of --epochs 2" in out
    assert f"To train more: python -m train --resume {run} --epochs 3" in out
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing rewritten


def test_a_run_stopped_early_is_finished_until_its_patience_grows(tmp_path):
    from train.run.checkpoint import TrainState
    from train.run.setup import RunFinished, check_unfinished

    cfg = config(epochs=20, patience=3)
    with pytest.raises(RunFinished, match="stopped early, 3 epochs without a lower validation loss .--patience 3."):
        check_unfinished(cfg, TrainState(epoch=7, bad_epochs=3), tmp_path)
    assert check_unfinished(cfg.replace(patience=4), TrainState(epoch=7, bad_epochs=3), tmp_path) is None
    assert check_unfinished(cfg, TrainState(epoch=7, bad_epochs=2), tmp_path) is None  # more epochs to train
