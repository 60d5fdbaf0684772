"""The practitioner's trainer options: learning-rate schedules, --limit-batches, the console when output is a file,
--quiet, --log tensorboard,csv (read back with TensorBoard's own reader), and the parsers' messages."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train.run.engine
from tests.helpers import tiny, without_timing
from train.__main__ import main as cli
from train.run.main import main
from train.run.resume import resume_settings
from train.run.schedule import lr_factor


@pytest.mark.parametrize(
    "schedule, step, expected",
    [
        # 10 steps per epoch, 5 epochs, 1 epoch of warm-up: (s + 1) / 10, then the schedule from step 10.
        ("cosine", 0, 0.1),
        ("cosine", 9, 1.0),
        ("cosine", 10, 1.0),
        ("cosine", 30, 0.5),  # halfway through the 40 cosine steps
        ("cosine", 49, 0.5 * (1 + math.cos(math.pi * 39 / 40))),
        ("constant", 4, 0.5),
        ("constant", 49, 1.0),
        ("step", 19, 1.0),  # x 0.1 every 2 epochs: steps 20, 40
        ("step", 20, 0.1),
        ("step", 45, 0.01),
    ],
)
def test_the_rate_at_chosen_steps(schedule, step, expected):
    assert lr_factor(step, schedule, 10, 5, 1.0, 2, 0.1) == pytest.approx(expected)


def test_step_schedule_options_need_the_step_schedule(demo_shards, tmp_path, capsys):
    args = ["--shards", str(demo_shards), "--out", str(tmp_path / "r"), "--lr-gamma", "0.5"]
    assert cli(args) == 2
    assert "--lr-gamma only applies with --lr-schedule step" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's own exit (2), after its usage line
        cli([*args[:4], "--lr-schedule", "cosin"])
    assert "invalid choice: 'cosin'; did you mean 'cosine'?" in capsys.readouterr().err


def steps_csv(out):
    with (out / "steps.csv").open(newline="") as f:
        return without_timing(csv.DictReader(f))


def scalars(out, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events, [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.mark.slow
def test_a_cosine_schedule_with_warm_up_logs_every_step_and_resumes_exactly(demo_shards, tmp_path, monkeypatch):
    """20 steps an epoch (160 train samples, batch 8), 2 epochs, half an epoch of warm-up, then cosine to 0. A run
    stopped after its step-6 checkpoint and resumed gives the uninterrupted run's weights, history, step rows and
    TensorBoard scalars."""
    options = dict(epochs=2, batch_size=8, workers=1, lr_schedule="cosine", warmup_epochs=0.5, log="tensorboard,csv")
    whole = main(tiny(demo_shards, tmp_path / "whole", **options))
    rows = steps_csv(whole)
    assert [int(r["step"]) for r in rows] == list(range(1, 41))  # counted from 1, as the console counts
    for r in rows:
        assert float(r["lr"]) == pytest.approx(1e-3 * lr_factor(int(r["step"]) - 1, "cosine", 20, 2, 0.5, 10, 0.1))
    assert float(rows[0]["lr"]) == pytest.approx(1e-4) and float(rows[10]["lr"]) == pytest.approx(1e-3)
    history = json.loads((whole / "history.json").read_text())
    assert [h["lr"] for h in history] == pytest.approx([float(rows[19]["lr"]), float(rows[39]["lr"])])
    events, lrs = scalars(whole, "step/lr")
    assert [s for s, _ in lrs] == list(range(40)) and [v for _, v in lrs] == pytest.approx(
        [float(r["lr"]) for r in rows]
    )
    _, val = scalars(whole, "epoch/val_loss")
    assert val == [(19, pytest.approx(history[0]["val_loss"])), (39, pytest.approx(history[1]["val_loss"]))]
    for tag in ("step/train_loss", "step/images_per_sec", "step/data_wait_share", "epoch/crack_ap", "epoch/lr"):
        assert events.Scalars(tag), tag
    assert "epoch/val_crack_pr" in events.Tags()["tensors"]  # the PR curve plugin's data
    assert any(t.startswith("epoch/slowest_stage") for t in events.Tags()["tensors"])  # the text plugin's
    with (whole / "epochs.csv").open(newline="") as f:
        assert [float(r["val_loss"]) for r in csv.DictReader(f)] == pytest.approx([h["val_loss"] for h in history])

    calls = []
    original = train.run.engine.save_progress

    def stop_after_first(run, totals):
        original(run, totals)
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(train.run.engine, "save_progress", stop_after_first)
    stopped = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        main(tiny(demo_shards, stopped, checkpoint_every=6, **options))
    monkeypatch.setattr(train.run.engine, "save_progress", original)
    assert len(steps_csv(stopped)) == 6
    main(resume_settings(stopped))
    assert steps_csv(stopped) == steps_csv(whole)
    a, b = torch.load(whole / "last.pt", weights_only=True), torch.load(stopped / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 40
    assert without_timing(a["history"]) == without_timing(b["history"])
    assert scalars(stopped, "step/lr")[1] == lrs  # the resumed run's logs read as one run's


def test_limit_batches_bounds_every_pass_and_a_file_gets_lines(demo_shards, tmp_path, capsys):
    """--limit-batches 3: 3 train steps (of 20) and 3 batches of each evaluated split; stdout (not a terminal under
    pytest) gets a progress line at the first step and every --log-every steps, on stderr, instead of redraws."""
    out = main(tiny(demo_shards, tmp_path / "r", epochs=1, batch_size=8, limit_batches=3, log_every=2, log="csv"))
    captured = capsys.readouterr()
    (row,) = json.loads((out / "history.json").read_text())
    assert row["train_samples"] == 3 * 8 and len(steps_csv(out)) == 3
    # steps.csv counts steps from 1, as the console does.
    said = [int(n) for n in re.findall(r"epoch 1/1 step (\d+)/3:", captured.err)]
    assert said == [1, 2] and [int(r["step"]) for r in steps_csv(out)] == [1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["limit_batches"] == 3
    for split in summary["splits"].values():
        assert split["crack"]["support"] + split["no_crack"]["support"] == 3 * 8
    assert "epoch 1/1 step 1/3: loss" in captured.err and "epoch 1/1 step 2/3: loss" in captured.err
    assert "step 3/3" not in captured.err and "\r" not in captured.out + captured.err
    assert "a smoke run" in captured.out


@pytest.mark.slow  # trains (test_limit_batches_bounds_every_pass... is the fast one): `make test-fast` leaves it out
def test_quiet_prints_the_epoch_lines_only(demo_shards, tmp_path, capsys):
    main(tiny(demo_shards, tmp_path / "r", epochs=2, batch_size=8, limit_batches=2, log_every=1, quiet=True))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2", "run folder"]


@pytest.mark.slow  # the session's tiny run: `make test-fast` leaves it out
def test_a_run_records_its_loaders_stages_and_names_the_slowest_when_it_waits(tiny_run):
    row = json.loads((tiny_run / "history.json").read_text())[0]
    stages = {k: v for k, v in row.items() if k.startswith("stage_")}  # the torch backend's four, or DALI's two
    assert stages and row[f"stage_{row['slowest_stage']}_ms"] == max(stages.values())
    assert row["handover_wait_ms"] >= 0
    if "stage_pipeline_ms" in row:  # DALI: its queue is its own, not counted
        assert "batches_in_flight" not in row
    else:
        assert row["batches_in_flight"] >= 1 and 0 <= row["batches_ready"] <= row["batches_in_flight"]
    metrics = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["slowest_stage"] for m in metrics if "slowest_stage" in m] == [row["slowest_stage"]]  # the log's too
    line = train.run.engine.epoch_line
    waiting = row | {"data_wait_share": 0.2, "slowest_stage": "decode", "stage_decode_ms": 1.234}
    assert "20% waiting for data (slowest loader stage: decode, 1.23 ms per image)" in line(waiting, 0, 3, True)
    assert "slowest" not in line(row | {"data_wait_share": 0.05}, 0, 3, True)  # at most 5%: nothing to say
    dali = row | {"data_wait_share": 0.4, "slowest_stage": "pipeline", "stage_pipeline_ms": 0.51}
    assert (
        "(slowest loader stage: DALI's pipeline (decode, augmentation, normalization), 0.51 ms per image of "
        "waiting for it)" in line(dali, 0, 3, True)
    )


def test_a_log_file_gets_a_line_at_least_every_30_seconds(monkeypatch, capsys):
    from train.run import logs

    clock = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    console = logs.Console("lines", every=50)
    console.wrap([], total=200, first=0, desc="epoch 1/1")
    shown = []
    for step in range(200):
        clock[0] += 4.0  # a slow step: 50 steps would be 200 s of silence
        if console.due(step):
            console.show(step, {"loss": "0.1"})
            shown.append(step)
    assert shown[:3] == [0, 7, 14] and 49 in shown  # the first, then the first step 25 s after the last line
    assert max(b - a for a, b in zip(shown, shown[1:])) * 4.0 <= 32
    assert capsys.readouterr().err.count("epoch 1/1 step") == len(shown)
    for done in range(1, 40):  # validation: no steps of its own, a line when 30 s have gone by
        clock[0] += 2.0
        console.beat("epoch 1 validation", done, 39)
    beats = capsys.readouterr().err.splitlines()
    assert beats[0] == "epoch 1 validation: 13/39 batches" and len(beats) == 3


def test_tensorboard_missing_is_one_line_before_anything_is_written(demo_shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    args = ["--shards", str(demo_shards), "--out", str(tmp_path / "r"), "--weights", "none", "--log", "tensorboard"]
    assert cli(args) == 2
    assert "pip install 'crackio[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert cli([*args[:-1], "tensorbord"]) == 2
    assert "--log 'tensorbord' is not a log; did you mean 'tensorboard'?" in capsys.readouterr().err


COMMANDS = [
    [sys.executable, "-m", "train"],
    *([sys.executable, "-m", "train", sub] for sub in ("eval", "sweep", "svm", "detect", "export")),
    [sys.executable, "tools/pack.py"],
    [sys.executable, "tools/propose.py"],
]


# Each a subprocess: the trainer's own at once, the other commands' with the slow tests.
@pytest.mark.parametrize(
    "command",
    [COMMANDS[0], *(pytest.param(c, marks=pytest.mark.slow) for c in COMMANDS[1:])],
    ids=lambda c: " ".join(c[1:]),
)
def test_every_option_shows_its_default_as_typed(command):
    text = subprocess.run([*command, "--help"], capture_output=True, text=True, check=True).stdout
    options = text.split("options:", 1)[1]
    entries, current = [], ""
    for line in options.splitlines():
        if line.startswith("  -") and current:
            entries.append(current)
            current = ""
        current += " " + line.strip()
    entries.append(current)
    for entry in entries:
        if not entry.strip() or entry.strip().startswith("-h, --help"):
            continue
        assert "(default: " in entry or "required" in entry.lower(), entry
        assert "(default: None)" not in entry and "(default: False)" not in entry and "(default: '')" not in entry


@pytest.mark.slow
def test_a_run_s_config_json_reproduces_the_run(demo_shards, tmp_path):
    first = main(tiny(demo_shards, tmp_path / "a", epochs=1, batch_size=8, limit_batches=4, workers=1))
    again = tmp_path / "b"
    assert cli(["--config", str(first / "config.json"), "--out", str(again)]) == 0
    a, b = torch.load(first / "last.pt", weights_only=True), torch.load(again / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert without_timing(a["history"]) == without_timing(b["history"])
    saved, then = json.loads((again / "config.json").read_text()), json.loads((first / "config.json").read_text())
    assert saved["run_id"] != then["run_id"]  # the same settings, another run
    assert saved == {**then, "out": str(again), "run_id": saved["run_id"]}


@pytest.mark.slow
def test_a_yaml_or_toml_config_with_flags_that_win(demo_shards, tmp_path):
    run = tmp_path / "r"
    path = tmp_path / "run.yaml"
    path.write_text(
        f"shards: {demo_shards}\narch: shufflenet_v2_x0_5\nweights: none\nhead: linear\ndevice: cpu\n"
        "epochs: 1\nbatch_size: 8\nlimit_batches: 1\nlr: 0.01\niou_threshold: none\nquiet: true\n"
    )
    assert cli(["--config", str(path), "--lr", "0.002", "--out", str(run)]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert (saved["lr"], saved["batch_size"], saved["iou_threshold"], saved["quiet"]) == (0.002, 8, None, True)
    toml = tmp_path / "run.toml"
    toml.write_text('iou_threshold = "none"\nsampler = "weighted"\nclass_weights = "0:1,1:3"\n')
    from train.settings.files import read_config_file

    assert read_config_file(str(toml)) == {"iou_threshold": None, "sampler": "weighted", "class_weights": "0:1,1:3"}


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("c.yaml", "bach_size: 8\n", "unknown config keys ['bach_size']; did you mean 'batch_size'?"),
        ("c.yaml", "block_size: 64\n", "--block-size only applies with --order block"),
        ("c.yaml", "epochs: ten\n", "epochs = 'ten' must be of type int"),
        ("c.yaml", "- 1\n- 2\n", "a config must be a table of settings"),
        ("c.yaml", "resume: runs/x\n", "without --config"),
        ("c.yaml", "epochs: 1\n", "without --config"),
        ("c.toml", "epochs = \n", "is not valid TOML"),
        ("c.txt", "epochs: 1\n", "give a .yaml, .yml, .toml or .json file"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_it(demo_shards, tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    args = ["--shards", str(demo_shards), "--out", str(tmp_path / "r"), "--config", str(path)]
    if "epochs: 1" in text or "resume" in text:  # --resume with --config: the run's own settings only
        args = ["--resume", str(tmp_path / "r"), "--config", str(path)]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_messages_point_the_right_way(demo_src, demo_shards, tmp_path, capsys):
    """Each names what is wrong and the flag or command that fixes it."""
    out = str(tmp_path / "r")
    base = ["--weights", "none", "--out", out]
    # --shards at the proposal folder (the likeliest first mistake): the pack command with a sibling --out
    assert cli(["--shards", str(demo_src), *base]) == 2
    sibling = demo_src.resolve().parent / f"{demo_src.resolve().name}-shards"
    err = capsys.readouterr().err
    assert f"{demo_src} holds proposal crops" in err
    assert f"`python tools/pack.py {demo_src} --out {sibling}`, then give --shards {sibling}" in err
    # a split that is not there: the flag, the pack's splits and the closest one
    assert cli(["--shards", str(demo_shards), "--val-split", "val", *base]) == 2
    err = capsys.readouterr().err
    assert "--val-split 'val' is not in" in err and "(its splits: train, valid, test); did you mean 'valid'?" in err
    assert cli(["--shards", str(demo_shards), "--arch", "resnet_18", *base]) == 2
    assert "did you mean 'resnet18'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["--shards", str(demo_shards), "--bach-size", "8", *base])
    assert "unrecognized arguments: --bach-size 8; did you mean '--batch-size'?" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def smoke_run(demo_shards, tmp_path_factory) -> tuple[int, Path]:
    """A one-batch run made through the command line with a bare --quiet: (its exit code, its folder)."""
    run = tmp_path_factory.mktemp("smoke") / "r"
    args = ["--shards", str(demo_shards), "--out", str(run), "--arch", "shufflenet_v2_x0_5", "--weights", "none"]
    args += ["--head", "linear", "--epochs", "1", "--batch-size", "8", "--limit-batches", "1", "--quiet"]  # bare flag
    return cli(args), run


@pytest.mark.slow
def test_eval_names_split_when_the_pack_has_no_such_split(smoke_run, capsys):
    _, run = smoke_run
    assert cli(["eval", "--checkpoint", str(run / "best.pt"), "--split", "tst"]) == 2
    err = capsys.readouterr().err
    assert "--split 'tst' is not in" in err and "did you mean 'test'?" in err


def test_a_log_file_gets_progress_lines_not_redraws(demo_src, tmp_path):
    """tools/pack.py (like propose, svm, detect) into a pipe: whole lines, no carriage returns."""
    done = subprocess.run(
        [sys.executable, "tools/pack.py", str(demo_src), "--out", str(tmp_path / "s"), "--workers", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "\r" not in done.stderr and "pack: 100%" in done.stderr
    assert len(done.stderr.splitlines()) <= 4, done.stderr


def test_pack_help_shows_src_as_required_and_iou_threshold_as_typed():
    pack = subprocess.run([sys.executable, "tools/pack.py", "--help"], capture_output=True, text=True, check=True)
    assert pack.stdout.startswith("usage: pack.py SRC [--out OUT] [options]\n       pack.py --verify OUT")
    train = subprocess.run([sys.executable, "-m", "train", "--help"], capture_output=True, text=True, check=True)
    assert "label = IoU > t (relabel) (default: none)" in " ".join(train.stdout.split())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--warmup-epochs", "inf"], "--warmup-epochs inf must be at most --epochs"),
        (["--lr-schedule", "cosine", "--warmup-epochs", "5", "--epochs", "1"], "the warm-up would not end"),
        (["--lr-schedule", "step", "--lr-gamma", "2"], "--lr-gamma must be in (0, 1]"),
        (["--limit-batches", "99" * 10], f"--limit-batches must be >= 0 and at most 2**40, got {'99' * 10}"),
        (["--sampler", "weightd"], None),  # argparse: the closest choice (below)
    ],
)
def test_new_options_out_of_range_are_one_line(demo_shards, tmp_path, capsys, flags, message):
    args = ["--shards", str(demo_shards), "--out", str(tmp_path / "r"), "--weights", "none", *flags]
    if message is None:
        with pytest.raises(SystemExit):
            cli(args)
        assert "did you mean 'weighted'?" in capsys.readouterr().err
        return
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_commands_flags_and_logs_as_typed(demo_shards, smoke_run, capsys):
    assert cli(["exprt", "--checkpoint", "x.pt"]) == 2
    assert "unknown command 'exprt'; did you mean 'export'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no abbreviations: --lr-s is a typo, not --lr-schedule
        cli(["--shards", str(demo_shards), "--lr-s", "cosine"])
    assert "unrecognized arguments: --lr-s cosine" in capsys.readouterr().err
    from train.settings.run import parse_logs

    assert parse_logs("none") == () and parse_logs(" csv, csv ,tensorboard") == ("csv", "tensorboard")
    code, run = smoke_run  # --quiet given bare
    assert code == 0
    assert json.loads((run / "config.json").read_text())["quiet"] is True


def test_config_file_errors_name_the_file(demo_shards, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("sampler: weightd\n")
    assert cli(["--shards", str(demo_shards), "--out", str(tmp_path / "r"), "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'weighted'?" in err and f"(the settings of --config {path} with the flags given)" in err
    path.write_text("")  # empty: no settings, whatever the format
    json_path = tmp_path / "c.json"
    json_path.write_text("")
    from train.settings.files import read_config_file

    assert read_config_file(str(path)) == {} == read_config_file(str(json_path))
    path.write_text("log: [tensorboard, csv]\n")
    assert read_config_file(str(path)) == {"log": "tensorboard,csv"}


@pytest.mark.slow
def test_extending_a_cosine_run_takes_the_new_curve_from_the_next_step(demo_shards, tmp_path):
    """2 steps an epoch (--limit-batches 2): a 1-epoch cosine run ends at rate 0; resumed with --epochs 2, its next
    step takes the 2-epoch curve's rate at step 2, not the old curve's 0."""
    out = main(tiny(demo_shards, tmp_path / "r", epochs=1, batch_size=8, limit_batches=2, lr_schedule="cosine",
                    log="csv", quiet=True))  # fmt: skip
    main(resume_settings(out, epochs=2))
    rates = [float(r["lr"]) for r in steps_csv(out)]
    assert rates == pytest.approx([1e-3 * lr_factor(s, "cosine", 2, e, 0, 10, 0.1) for s, e in
                                   [(0, 1), (1, 1), (2, 2), (3, 2)]])  # fmt: skip
    assert rates[2] > 0


def test_the_trainer_lets_openmp_threads_sleep_unless_told_otherwise():
    """python -m train sets GOMP_SPINCOUNT before torch loads (docs/performance.md, "CPU threads"); a policy the
    user set is kept."""
    code = "import os, sys; import train.__main__; print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"
    for env, said in (
        ({}, "10000 False"),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "None False"),
        ({"GOMP_SPINCOUNT": "7"}, "7 False"),
    ):
        base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        done = subprocess.run([sys.executable, "-c", code], env=base | env, capture_output=True, text=True, check=True)
        assert done.stdout.split() == said.split(), env
