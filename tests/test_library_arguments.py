"""The library takes its settings as arguments and speaks in them: make_loader's keywords, RemoteSettings' own
checks, the one integer rule, a split folder given where a pack is wanted, and the public names."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import crackio
from crackio import ConfigError, RemoteSettings, ShardError, make_loader, open_pack
from crackio.errors import integer, is_integer
from tests.conftest import ROOT

CPU = dict(batch_size=8, device="cpu", backend="torch", workers=1)


@pytest.mark.parametrize(
    "keywords, words",
    [
        ({"sampler": "weigthed"}, "unknown sampler 'weigthed'; did you mean 'weighted'?"),
        ({"sampler": "weighted", "selection": "hard-negative"}, "did you mean 'hard-negatives'?"),
        ({"shuffle": True}, "shuffle=True is not an argument of make_loader: a training loader (train=True) draws"),
        ({"shuffle": False}, "for every sample once in index order use train=False"),
        ({"num_workers": 2}, "num_workers=2 is not an argument of make_loader: write workers="),
        ({"drop_last": True}, "train=True drops the last partial batch"),
        ({"batchsize": 8}, "unknown argument batchsize=8; did you mean 'batch_size'?"),
        ({"iou_treshold": 0.5}, "did you mean 'iou_threshold'?"),
        ({"negativs": 80}, "did you mean 'negatives'?"),
        ({"class_weight": {0: 1, 1: 2}, "sampler": "weighted"}, "did you mean 'class_weights'?"),
        ({"xyzzy": 1}, "its arguments are shards, split, batch_size"),
        ({"negatives": 80}, "negatives is an option of sampler 'hard-negatives' (and 'weighted' or 'balanced' with"),
        ({"output": "unit8"}, "output must be one of ('float32', 'uint8'), got 'unit8'; did you mean 'uint8'?"),
        ({"order": "blocks"}, "did you mean 'block'?"),
        ({"backend": "troch"}, "did you mean 'torch'?"),
        ({"device": "cdua"}, "device='cdua' is not a device"),
    ],
)
def test_a_wrong_keyword_is_named_with_what_to_write(demo_shards, keywords, words):
    kw = {**CPU, **keywords}
    with pytest.raises(ConfigError) as e:
        make_loader(demo_shards, "train", train=True, **kw)
    assert words in str(e.value)
    assert "--" not in str(e.value)  # the library's words, not a command line's flags


def test_a_mistyped_argument_is_said_before_any_read(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'weighted'"):
        make_loader(tmp_path / "no-pack-here", "train", train=True, sampler="weigthed", **CPU)


def test_an_opened_pack_is_read_as_given(demo_shards):
    pack = open_pack(demo_shards)
    loader = make_loader(pack, "valid", train=False, **CPU)
    assert loader.source is pack
    assert [b.names for b in loader] == [b.names for b in make_loader(demo_shards, "valid", train=False, **CPU)]
    with pytest.raises(ConfigError, match="remote= applies when shards is a location"):
        make_loader(pack, "valid", train=False, remote=RemoteSettings(), **CPU)


def test_a_url_crackio_does_not_read_names_the_argument():
    with pytest.raises(ConfigError, match=r"^shards='abfs://bucket/pack': abfs:// is not read by crackio"):
        make_loader("abfs://bucket/pack", "train", train=True, **CPU)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("cache_limit", -1, "RemoteSettings(cache_limit=-1): give a number of bytes >= 0"),
        ("cache_limit", "20G", "RemoteSettings(cache_limit='20G'): give a number of bytes >= 0 (0: no cache, "),
        ("cache_limit", True, "RemoteSettings(cache_limit=True)"),
        ("cache_limit", 1.5, "RemoteSettings(cache_limit=1.5)"),
        ("timeout", 0, "RemoteSettings(timeout=0): give a finite number of seconds > 0 (default 60)"),
        ("timeout", -3.0, "RemoteSettings(timeout=-3.0)"),
        ("timeout", math.inf, "RemoteSettings(timeout=inf)"),
        ("timeout", math.nan, "RemoteSettings(timeout=nan)"),
        ("timeout", "5", "RemoteSettings(timeout='5')"),
        ("cache_dir", 5, "RemoteSettings(cache_dir=5): give a folder (a str or pathlib.Path), or None"),
        ("cache_dir", "", "RemoteSettings(cache_dir='')"),
    ],
)
def test_remote_settings_refuse_values_that_cannot_work(field, value, words):
    with pytest.raises(ConfigError) as e:
        RemoteSettings(**{field: value})
    assert str(e.value).startswith(words)
    if value == "20G":
        assert "RemoteSettings.from_options(cache_limit=...)" in str(e.value)


def test_remote_settings_keep_values_as_one_type():
    a = RemoteSettings("~/c", np.int64(5), 7)
    assert a == RemoteSettings(Path.home() / "c", 5, 7.0) and hash(a) == hash(RemoteSettings(Path.home() / "c", 5, 7.0))
    assert type(a.cache_limit) is int and type(a.timeout) is float


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("CRACKIO_CACHE_DIR", str(tmp_path / "env-cache"))
    monkeypatch.setenv("CRACKIO_CACHE_LIMIT", "1G")
    monkeypatch.setenv("CRACKIO_REMOTE_TIMEOUT", "9")
    return tmp_path / "env-cache"


def test_options_not_given_are_the_environments(env, tmp_path):
    assert RemoteSettings.from_options("", "", 0) == RemoteSettings(env, 1 << 30, 9.0) == RemoteSettings.from_env()
    given = RemoteSettings.from_options(str(tmp_path / "mine"), "20G", 5)
    assert given == RemoteSettings(tmp_path / "mine", 20 << 30, 5.0)
    assert RemoteSettings.from_options("", "0", 0).cache_limit == 0  # 0: no cache, not "the default"


def flags(field: str) -> str:
    return {"timeout": "--remote-timeout"}.get(field, "--" + field.replace("_", "-"))


@pytest.mark.parametrize(
    "options, default_words, flag_words",
    [
        (("", "20X", 0), "cache_limit: '20X' is not a size (write bytes, or e.g. 512M, 20G)", "--cache-limit: '20X'"),
        (("", "-1G", 0), "cache_limit: '-1G': a size cannot be negative", "--cache-limit: '-1G'"),
        (
            ("", "", -1.0),
            "timeout must be a finite number of seconds >= 0 (0: the environment's",
            "--remote-timeout must",
        ),
        (("", "", math.inf), "timeout must be a finite number of seconds >= 0", "--remote-timeout must"),
        (("", "", math.nan), "timeout must be a finite number", "--remote-timeout must"),
        ((5, "", 0), "cache_dir must be a folder as text", "--cache-dir must be a folder as text"),
    ],
)
def test_options_name_the_field_as_the_caller_writes_it(env, options, default_words, flag_words):
    with pytest.raises(ConfigError) as plain:
        RemoteSettings.from_options(*options)
    assert str(plain.value).startswith(default_words)
    with pytest.raises(ConfigError) as named:
        RemoteSettings.from_options(*options, flag=flags)
    assert str(named.value).startswith(flag_words)


@pytest.mark.parametrize(
    "variable, value, words",
    [
        ("CRACKIO_CACHE_LIMIT", "lots", "$CRACKIO_CACHE_LIMIT: 'lots' is not a size"),
        ("CRACKIO_REMOTE_TIMEOUT", "inf", "$CRACKIO_REMOTE_TIMEOUT must be a finite number of seconds > 0"),
        ("CRACKIO_REMOTE_TIMEOUT", "soon", "$CRACKIO_REMOTE_TIMEOUT must be a finite number of seconds > 0"),
    ],
)
def test_the_environment_is_checked_naming_the_variable(monkeypatch, variable, value, words):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=words.replace("$", r"\$")):
        RemoteSettings.from_env()


@pytest.mark.parametrize(
    "value, ok",
    [(3, True), (np.int64(3), True), (np.uint8(0), True), (True, False), (np.bool_(True), False), (3.0, False)]
    + [("3", False), (-1, False), (2**40, True), (2**40 + 1, False), (None, False)],
)
def test_the_integer_rule(value, ok):
    assert is_integer(value, 0) is ok
    if ok:
        assert integer("n", value, 0) == value and type(integer("n", value, 0)) is int
    else:
        with pytest.raises(ConfigError, match=r"^n must be an integer >= 0( and at most 2\*\*40)?, got "):
            integer("n", value, 0)
    with pytest.raises(ConfigError, match=r"n must be an integer in \[1, 5\], got 6"):
        integer("n", 6, 1, 5)


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_a_split_folder_names_its_pack(demo_shards, split):
    with pytest.raises(ShardError) as e:
        open_pack(demo_shards / split)
    assert str(e.value) == (
        f"{demo_shards / split} is the folder of split {split!r} inside the pack {demo_shards}, not a pack: give the "
        f"pack's folder {demo_shards} and choose the split {split!r} by name"
    )
    with pytest.raises(ShardError, match=f"give the pack's folder {demo_shards} and"):
        make_loader(demo_shards / split, split, train=False, **CPU)


def test_a_custom_split_folder_and_a_relative_one_name_their_pack(demo_shards, tmp_path, monkeypatch):
    import json
    import shutil

    pack = tmp_path / "pack"
    shutil.copytree(demo_shards, pack)
    manifest = json.loads((pack / "manifest.json").read_text())
    manifest["splits"]["holdout"] = manifest["splits"].pop("test")  # a split by any name the manifest gives
    (pack / "manifest.json").write_text(json.dumps(manifest))
    (pack / "test").rename(pack / "holdout")
    with pytest.raises(
        ShardError, match=f"^{pack / 'holdout'} is the folder of split 'holdout' inside the pack {pack}"
    ):
        open_pack(pack / "holdout")
    (pack / "notes").mkdir()  # a folder the manifest does not name: no pack to point at
    with pytest.raises(ShardError, match="manifest.json is missing"):
        open_pack(pack / "notes")
    monkeypatch.chdir(pack)
    with pytest.raises(ShardError, match=f"give the pack's folder {pack} and choose the split 'train'"):
        open_pack("train")  # "." would name nothing: the pack's absolute folder
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ShardError, match="give the pack's folder pack and choose the split 'valid'"):
        open_pack("pack/valid")  # as the user wrote it


def test_the_public_names_import_without_torch():
    code = (
        "import sys, crackio\n"
        "names = [crackio.open_pack, crackio.RemoteSettings, crackio.Shuffle, crackio.HardNegatives,\n"
        "         crackio.IouStrata, crackio.Weighted, crackio.Balanced]\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert {"open_pack", "RemoteSettings", "Shuffle", "HardNegatives", "IouStrata", "Weighted", "Balanced"} <= set(
        crackio.__all__
    )
