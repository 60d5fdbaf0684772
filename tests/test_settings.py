"""The trainer's settings: one owner per concern, made from the flat options users know (flags, --config files,
config.json), each checking its own values when made; an option the chosen settings would ignore is refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from crackio.errors import ConfigError
from train.__main__ import main as cli
from train.settings.data import Block, Data, Remote
from train.settings.learning import Bce, Focal, Step
from train.settings.run import DEFAULTS, PARTS, RunSettings, run_settings, unmet

OLD = Path(__file__).parent / "data" / "config-0.1.0.json"  # a config.json written by the release before owners


def test_a_config_json_written_before_the_owners_reads_back_whole():
    old = json.loads(OLD.read_text())
    assert set(DEFAULTS) - set(old) == {"mix", "val_pack", "pack_name", "positive_share"}  # added since; none lost
    settings = RunSettings.from_flat(old, source=str(OLD))
    flat = settings.flat()
    assert flat["shards"] == (old["shards"],)  # its one pack: --shards is given once per pack now
    assert {k: flat[k] for k in old if k != "shards"} == {k: v for k, v in old.items() if k != "shards"}
    assert (flat["mix"], flat["val_pack"]) == ((), "")  # every value, those of kinds not chosen included
    assert (settings.loss.kind, settings.order.kind, settings.schedule.kind) == ("bce", "random", "constant")


def test_every_option_belongs_to_exactly_one_owner():
    names = [name for part in PARTS.values() for name in part.names()]
    assert len(names) == len(set(names)) == len(DEFAULTS)


@pytest.mark.parametrize(
    "given, needs",
    [
        ({"focal_gamma": 1.0}, "--loss focal"),
        ({"pos_weight": 2.0, "loss": "focal"}, "--loss bce"),
        ({"block_size": 64}, "--order block"),
        ({"lr_gamma": 0.5}, "--lr-schedule step"),
        ({"lr_step_epochs": 2, "lr_schedule": "cosine"}, "--lr-schedule step"),
        ({"cache_limit": "1G"}, "a remote --shards"),
        ({"val_negatives": 10}, "--val-sampler hard-negatives"),
        ({"negatives": 10}, "--sampler hard-negatives"),
        ({"class_weights": "0:1,1:3"}, "--sampler weighted or --sampler balanced"),
    ],
)
def test_an_option_its_kind_does_not_own_is_refused(given, needs):
    with pytest.raises(ConfigError, match=f"only applies with {needs}"):
        run_settings(shards="x", **given)
    assert unmet({"shards": "x", **given}, next(k for k in given if k not in ("loss", "lr_schedule"))) is not None


def test_the_owning_kind_takes_its_options():
    s = run_settings(shards="x", loss="focal", focal_gamma=1.0, order="block", block_size=64, lr_schedule="step")
    assert s.loss == Focal(focal_gamma=1.0) and s.order == Block(64) and isinstance(s.schedule, Step)
    assert s.flat()["pos_weight"] == DEFAULTS["pos_weight"]  # bce's option kept at its default in config.json
    assert run_settings(shards="s3://bucket/pack", cache_limit="1G").remote == Remote(cache_limit="1G")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Bce(pos_weight=-1.0), "--pos-weight must be >= 0"),
        (lambda: Step(lr_gamma=2.0), r"--lr-gamma must be in \(0, 1\]"),
        (lambda: Data(shards=""), "--shards is required"),
        (lambda: Data(shards="x", train_split="../up"), "is not a split name"),
        (lambda: Remote(cache_limit="lots"), "--cache-limit"),
        (lambda: run_settings(shards="x", warmup_epochs=30.0), "must be at most --epochs 20"),
    ],
)
def test_each_owner_checks_its_values_when_made(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_settings_are_frozen():
    s = run_settings(shards="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.optim.lr = 1.0  # type: ignore[misc]
    assert s.replace(lr=0.5).optim.lr == 0.5 and s.optim.lr == DEFAULTS["lr"]


def test_help_lists_the_options_in_groups_with_their_defaults(capsys):
    with pytest.raises(SystemExit):
        cli(["--help"])
    text = capsys.readouterr().out
    titles = [part.group for part in PARTS.values()]
    positions = [text.index(f"\n{title}:\n") for title in dict.fromkeys(titles)]
    assert positions == sorted(positions)  # data, sampler, model, optimisation, schedule, loss, ...
    words = " ".join(text.split())  # argparse wraps lines at the terminal's width
    for name in DEFAULTS:
        assert f"--{name.replace('_', '-')} " in words, name
    for flag, default in (("--lr LR", "0.001"), ("--loss {bce,focal}", "bce"), ("--iou-threshold FLOAT|none", "none")):
        assert f"{flag} " in words and f"(default: {default})" in words.split(flag, 1)[1].split(" --", 1)[0]


@pytest.mark.parametrize("command", ["eval", "svm", "detect", "export"])
def test_every_command_takes_its_settings_the_same_way(command, capsys):
    with pytest.raises(SystemExit):
        cli([command, "--help"])
    text = capsys.readouterr().out
    assert "remote pack (--shards s3://, gs://, az://, http(s)://):" in text and "--cache-limit" in text


@pytest.mark.parametrize(
    "given, message",
    [
        ({"lr": float("inf")}, "--lr must be a finite number > 0"),
        ({"weight_decay": float("inf")}, "--weight-decay must be a finite number >= 0"),
        ({"loss": "focal", "focal_alpha": -0.5}, r"--focal-alpha must be in \[0, 1\] .* or -1"),
        ({"loss": "focal", "focal_alpha": float("nan")}, "--focal-alpha must be in"),
        ({"batch_size": 10**20}, "--batch-size must be > 0 and at most 2\\*\\*40"),
        ({"quiet": True, "log_every": 5}, r"--log-every only applies with progress lines \(without --quiet\)"),
        ({"sampler": "weighted", "class_weights": "0:-1,1:2"}, "^--class-weights must give finite, non-negative"),
        ({"sampler": "iou-strata", "bin_width": 2.0}, r"^--bin-width must be a number in \(0, 1\]"),
    ],
)
def test_values_no_run_could_use_are_refused_before_it_starts(given, message):
    with pytest.raises(ConfigError, match=message):
        run_settings(shards="x", **given)
    assert run_settings(shards="x", loss="focal", focal_alpha=-1.0).loss == Focal(focal_alpha=-1.0)  # the original's


@pytest.mark.parametrize("suffix, text", [(".yaml", "epochs: 1\nepochs: 2\n"), (".json", '{"epochs": 1, "epochs": 2}')])
def test_a_config_file_giving_a_key_twice_is_refused(tmp_path, suffix, text):
    from train.settings.files import read_config_file

    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"--config {path} is not valid .*'epochs' is given twice"):
        read_config_file(str(path))


def test_commands_refuse_what_they_would_ignore(tmp_path):
    from train.settings.commands import DetectSettings, EvalSettings
    from train.settings.data import Remote

    with pytest.raises(ConfigError, match="only apply with a remote --shards"):
        EvalSettings(checkpoint="best.pt", shards=str(tmp_path), remote=Remote(cache_limit="1G"))
    assert EvalSettings(checkpoint="best.pt", shards="s3://b/p", remote=Remote(cache_limit="1G")).remote.cache_limit
    with pytest.raises(ConfigError, match="--format only applies with --annotations"):
        DetectSettings(checkpoint="best.pt", photos=("a.jpg",), format="coco")
    with pytest.raises(ConfigError, match="is not read by crackio"):
        EvalSettings(checkpoint="best.pt", shards="abfs://bucket/pack")


def test_a_named_test_split_the_pack_lacks_is_a_typo(demo_shards, tmp_path, capsys):
    args = ["--shards", str(demo_shards), "--out", str(tmp_path / "r"), "--arch", "shufflenet_v2_x0_5"]
    assert cli([*args, "--weights", "none", "--test-split", "tets"]) == 2
    assert "--test-split 'tets' is not in" in capsys.readouterr().err and not (tmp_path / "r").exists()
