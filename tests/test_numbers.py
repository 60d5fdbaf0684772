"""Every number checked at the edge: flags, --config files (YAML, TOML, JSON), a run's config.json, the library's
arguments, the environment and an ONNX export's recorded settings. A number is finite, of the kind its setting is
(a bool is no number, a float no integer), within what its consumer takes (torch's C int of threads, timedelta's
seconds, an int64 of bytes, 2**40 for counts and seeds), and a refusal is one line naming the option and the value
as given. The rules are crackio.errors' (`is_integer`, `is_number`, `number_rule`), applied by the settings' owners
(train/settings/base.py) and the library's argument checks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from crackio import ConfigError, make_loader
from crackio.errors import OutOfRange
from crackio.storage.settings import RemoteSettings
from crackio.writing.pack import PackSettings
from crackio.writing.regions import ProposalSettings
from train.__main__ import main as cli
from train.settings.commands import DetectSettings, EvalSettings, ExportSettings, SvmSettings
from train.settings.data import Data
from train.settings.files import read_config_file
from train.settings.learning import Focal, Step
from train.settings.run import Logging, RunSettings, run_settings

ROOT = Path(__file__).resolve().parents[1]
HUGE = 10**400  # an int no float holds: math.isfinite(HUGE) raises OverflowError
LR_MOST = "3.4e37 (float32's largest / 10: Adam's first step is 10 x lr)"
FLAGS = {"cache_dir": "--cache-dir", "cache_limit": "--cache-limit", "timeout": "--remote-timeout"}.__getitem__


@pytest.mark.parametrize(
    "given, message",
    [
        ({"threads": 5000}, "--threads must be >= 0 and at most 4096, got 5000"),  # torch.set_num_threads: a C int
        ({"threads": 2**35}, f"--threads must be >= 0 and at most 4096, got {2**35}"),
        ({"workers": 10**5}, "--workers must be >= 0 and at most 4096, got 100000"),
        ({"dist_timeout": 1e300}, "--dist-timeout must be a finite number > 0 and at most 2**31, got 1e+300"),
        ({"log_every": 2**41}, f"--log-every must be > 0 and at most 2**40, got {2**41}"),  # its own flag and value
        ({"lr": 3e38}, f"--lr must be a finite number > 0 and at most {LR_MOST}, got 3e+38"),  # Adam's step overflowed
        (
            {"lr": HUGE},
            f"--lr must be a finite number > 0 and at most {LR_MOST}, got {HUGE}",
        ),  # a JSON integer: OverflowError before
        ({"order": "block", "block_size": 10**20}, f"--block-size must be > 0 and at most 2**40, got {10**20}"),
    ],
)
def test_a_run_refuses_numbers_its_consumers_cannot_take(given, message):
    with pytest.raises(ConfigError) as e:
        RunSettings.from_flat({"shards": "x", **given}, given, "config.json")
    assert str(e.value).startswith(message)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Data(shards="x", seed=True), "--seed must be an integer >= 0, got True"),  # a bool is no number
        (lambda: Data(shards="x", workers=2.0), "--workers must be an integer >= 0, got 2.0"),  # type: ignore[arg-type]
        (lambda: Data(shards="x", iou_threshold=False), r"--iou-threshold must be in [0, 1) or none"),
        (lambda: Logging(target_recall=True), "--target-recall must be in [0, 1], got True"),
        (lambda: Step(lr_gamma=True), "--lr-gamma must be in (0, 1]"),
        (lambda: Focal(focal_alpha=True), "--focal-alpha must be in [0, 1]"),
        (
            lambda: EvalSettings(checkpoint="c", threads=10**20),
            f"--threads must be >= 0 and at most 4096, got {10**20}",
        ),
        (
            lambda: EvalSettings(checkpoint="c", threshold=True),
            "--threshold must be in [0, 1] (a probability), got True",
        ),
        (lambda: SvmSettings(checkpoint="c", seed=10**23), f"--seed must be >= 0 and at most 2**40, got {10**23}"),
        (lambda: SvmSettings(checkpoint="c", rounds=2**41), f"--rounds must be >= 0 and at most 2**40, got {2**41}"),
        (lambda: SvmSettings(checkpoint="c", pos_iou=math.nan), "--pos-iou must be in [0, 1], got nan"),
        (lambda: DetectSettings(checkpoint="c", max_proposals=10**20), "--max-proposals must be > 0 and at most 2**40"),
        (lambda: DetectSettings(checkpoint="c", context=-5), "--context must be >= 0, got -5"),
        (lambda: DetectSettings(checkpoint="c", score_threshold=HUGE), "--score-threshold must be a finite number or"),
        (lambda: DetectSettings(checkpoint="c", threads=10**20), "--threads must be >= 0 and at most 4096"),
        (lambda: ExportSettings(checkpoint="c", batch_size=10**20), "--batch-size must be > 0 and at most 2**40"),
    ],
)
def test_owners_refuse_the_wrong_kind_of_number_and_numbers_out_of_range(make, message):
    with pytest.raises(ConfigError) as e:
        make()
    assert str(e.value).startswith(message)


def test_negative_zero_is_kept_as_zero():
    optim = run_settings(shards="x", weight_decay=-0.0).optim
    assert math.copysign(1, optim.weight_decay) == 1  # config.json and reports say 0.0, not -0.0


@pytest.mark.parametrize(
    "name, text, key, value",
    [
        ("a.yaml", "lr: 1e-3\n", "lr", 0.001),  # YAML 1.2's float: PyYAML's SafeLoader (1.1) read the text '1e-3'
        ("b.yaml", "lr: 2E-4\nweight_decay: 1e-2\n", "weight_decay", 0.01),
        ("c.yaml", "lr: +5e-1\n", "lr", 0.5),
        ("e.yaml", "seed: 010\n", "seed", 10),  # YAML 1.2's integer: 1.1 read octal 8
        ("f.yaml", "seed: 0x10\n", "seed", 16),
        ("d.yaml", "cache_limit: 1073741824\n", "cache_limit", "1073741824"),  # bytes as a number: --cache-limit's
        ("e.toml", "cache_limit = 1073741824\n", "cache_limit", "1073741824"),
    ],
)
def test_config_files_read_numbers_as_meant(tmp_path, name, text, key, value):
    (tmp_path / name).write_text(text)
    assert read_config_file(str(tmp_path / name))[key] == value


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("a.yaml", "lr: 1e999\n", f"--lr must be a finite number > 0 and at most {LR_MOST}, got inf"),
        ("b.yaml", "threads: 100000\n", "--threads must be >= 0 and at most 4096, got 100000"),
        ("c.toml", "dist_timeout = 1e300\n", "--dist-timeout must be a finite number > 0 and at most 2**31"),
        ("e.json", '{"cache_limit": 1e400, "shards": "s3://b/p"}', "--cache-limit: 'inf' is not a size"),
    ],
)
def test_config_files_refuse_numbers_no_run_can_use(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    flat = read_config_file(str(tmp_path / name))
    with pytest.raises(ConfigError) as e:
        RunSettings.from_flat({"shards": "x"} | flat, flat)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--checkpoint", "x.pt", "--threads", str(10**20)], "--threads must be >= 0 and at most 4096"),
        (["svm", "--checkpoint", "x.pt", "--seed", str(10**23)], "--seed must be >= 0 and at most 2**40"),
        (["detect", "--checkpoint", "x.pt", "p.jpg", "--context", "-5"], "--context must be >= 0, got -5"),
        (["--shards", "x", "--threads", str(10**20)], "--threads must be >= 0 and at most 4096"),
    ],
)
def test_command_lines_refuse_them_in_one_line(capsys, argv, message):
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1, err


def test_a_byte_size_too_large_is_one_line_exit_2():
    """Before: OverflowError (int(float('1e400'))) with a traceback."""
    args = [sys.executable, "-m", "train", "--shards", "s3://bucket/pack", "--cache-limit", "1e400"]
    run = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.splitlines() == ["error: --cache-limit: '1e400' is too large a size (at most 2**63 - 1 bytes)"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("1e400", "'1e400' is too large a size (at most 2**63 - 1 bytes)"),
        ("1e30", "'1e30' is too large a size"),  # was RemoteSettings(cache_limit=...), not the flag
        ("9223372036854775808", "'9223372036854775808' is too large a size"),
        ("-0", "'-0': a size cannot be negative"),  # not "0: no cache"
        ("0.4", "'0.4' is less than one byte"),  # not rounded to 0: no cache
    ],
)
def test_byte_sizes_are_whole_bytes_an_int64_holds(text, message):
    with pytest.raises(ConfigError) as e:
        RemoteSettings.from_options("", text, 0, FLAGS)
    assert str(e.value).startswith(f"--cache-limit: {message}")
    assert RemoteSettings.from_options("", "9223372036854775807", 0).cache_limit == 2**63 - 1


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("CRACKIO_CACHE_LIMIT", "1e400", "$CRACKIO_CACHE_LIMIT: '1e400' is too large a size"),
        ("CRACKIO_REMOTE_TIMEOUT", "1e300", "$CRACKIO_REMOTE_TIMEOUT must be a finite number of seconds > 0, at most"),
    ],
)
def test_the_environment_is_checked_the_same_way(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as e:
        RemoteSettings.from_env()
    assert str(e.value).startswith(message)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"workers": 10**5}, "workers must be an integer in [0, 4096], got 100000"),
        ({"rank": 5, "world_size": 2}, "rank=5 must be below world_size=2"),  # before: said at the first epoch
        ({"seed": 10**23}, f"seed must be an integer >= 0 and at most 2**40, got {10**23}"),
        ({"sampler": "weighted", "class_weights": {0: 1, 1: HUGE}}, "class_weights must give finite"),
        ({"sampler": "weighted", "class_weights": {0: 1, 1: True}}, "class_weights must give finite"),
        ({"sampler": "iou-strata", "bin_width": HUGE}, "sampler option bin_width must be a number in (0, 1]"),
    ],
)
def test_the_library_refuses_them_before_reading_anything(tmp_path, arguments, message):
    with pytest.raises(ConfigError) as e:  # the folder does not exist: arguments are checked first
        make_loader(tmp_path / "none", "train", batch_size=4, train=True, device="cpu", **arguments)
    assert str(e.value).startswith(message)


def test_a_timeout_is_at_most_what_timedelta_takes():
    with pytest.raises(ConfigError, match=r"^RemoteSettings\(timeout=1e\+300\): give a finite number of seconds > 0"):
        RemoteSettings(timeout=1e300)
    with pytest.raises(ConfigError, match="^--remote-timeout must be a finite number of seconds >= 0 .*, at most 2"):
        RemoteSettings.from_options("", "", 1e12, FLAGS)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PackSettings(samples_per_shard=2**41), "samples_per_shard must be >= 1 and at most 2**40"),
        (lambda: ProposalSettings(max_proposals=10**20), "max_proposals must be >= 1 and at most 2**40"),
    ],
)
def test_the_writing_settings_say_the_bound_a_huge_count_breaks(make, message):
    with pytest.raises(OutOfRange) as e:
        make()
    assert message in str(e.value)  # before: "must be >= 1", which the value is


def onnx_with_proposals(path: Path, proposals: object) -> Path:
    """A model with detect --onnx's signature and crackio's metadata, its proposal settings as given."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    h = onnx.helper
    cast = h.make_node("Cast", ["images"], ["x"], to=onnx.TensorProto.FLOAT)
    mean = h.make_node("ReduceMean", ["x"], ["crack_probability"], axes=[1, 2, 3], keepdims=0)
    graph = h.make_graph(
        [cast, mean],
        "m",
        [h.make_tensor_value_info("images", onnx.TensorProto.UINT8, ["n", 3, 224, 224])],
        [h.make_tensor_value_info("crack_probability", onnx.TensorProto.FLOAT, ["n"])],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    model.ir_version = 8
    config = run_settings(shards=str(path.parent)).flat()
    metadata = {"crackio.format": "1", "crackio.config": json.dumps(config), "crackio.proposals": json.dumps(proposals)}
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(
    "change, words",
    [
        ({"search_max_side": "500"}, "ProposalSettings(search_max_side='500'): search_max_side must be an integer"),
        ({"size": "224"}, "ProposalSettings(size='224'): size must be an integer >= 1"),
        ({"quality": None}, "ProposalSettings(quality=None): quality must be an integer >= 1"),
        ({"quality": 500}, "ProposalSettings(quality=500): quality must be >= 1 and at most 100"),
        ({"positive_iou": "0.5"}, "ProposalSettings(positive_iou='0.5'): positive_iou must be in [0, 1)"),
        ({"max_proposals": 10**30}, "max_proposals must be >= 1 and at most 2**40"),
        ({"context": 200}, "ProposalSettings(context=200): context must be in [0, 112)"),
    ],
)
def test_an_onnx_exports_recorded_proposal_settings_are_checked_when_read(tmp_path, change, words):
    """Before: a TypeError (or an encoder's ValueError) once detection made its first crop."""
    from train.detection.export import load_onnx

    path = onnx_with_proposals(tmp_path / "m.onnx", ProposalSettings(max_proposals=20).as_dict() | change)
    with pytest.raises(ConfigError) as e:
        load_onnx(path)
    assert "has crackio metadata this crackio cannot read (its proposal settings are wrong: " in str(e.value)
    assert words in str(e.value)
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("text", ["abc", "0", "-2", "1e3", ""])
def test_a_world_size_torchrun_never_sets_is_one_line(monkeypatch, text):
    from train.settings.run import launched_world_size

    monkeypatch.setenv("WORLD_SIZE", text)
    with pytest.raises(ConfigError, match=f"WORLD_SIZE={text!r} must be a number of ranks >= 1"):
        launched_world_size()
