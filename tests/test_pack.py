"""tools/pack.py: round trips through webdataset and DALI, bad inputs, determinism, crash safety."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from crackio.format.index import load_index
from crackio.format.layout import ShardError
from crackio.writing.filenames import parse_name
from crackio.writing.outdir import LOCK
from crackio.writing.pack import PackSettings, pack
from tests.conftest import ROOT, needs_dali
from tests.helpers import kill_when


def shard_files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in ("manifest.json", LOCK)  # the lock file holds the last writer's PID
    }


def read_with_webdataset(out: Path, split: str) -> dict[str, dict]:
    urls = [str(p) for p in sorted((out / split).glob("*.tar"))]
    samples = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(s["json"])
        assert meta["filename"] not in samples, "a sample was stored twice"
        samples[meta["filename"]] = {"jpg": s["jpg"], "meta": meta, "sid": int.from_bytes(s["sid"], "little")}
    return samples


def read_with_dali(out: Path, split: str) -> list[tuple[bytes, int]]:
    from nvidia.dali import fn, pipeline_def, types

    tars = [str(p) for p in sorted((out / split).glob("*.tar"))]

    @pipeline_def(batch_size=16, num_threads=1, device_id=None)
    def pipe():
        jpg, sid = fn.readers.webdataset(
            paths=tars,
            index_paths=[t[:-4] + ".idx" for t in tars],
            ext=["jpg", "sid"],
            dtypes=[types.UINT8, types.INT64],
            missing_component_behavior="error",
            pad_last_batch=True,
            name="r",
        )
        return jpg, sid

    p = pipe()
    p.build()
    total = p.epoch_size("r")
    got = []
    while len(got) < total:
        jpg, sid = p.run()
        for i in range(len(jpg)):
            got.append((np.array(jpg[i]).tobytes(), int(np.array(sid[i])[0])))
    return got[:total]


def test_round_trip_messy_folder(messy_src, tmp_path):
    src, kinds = messy_src
    out = tmp_path / "shards"
    manifest = pack(src, out, PackSettings(samples_per_shard=40, workers=2), progress=False)

    good = sorted(p.name for p in src.iterdir() if kinds.get(p.name) != "skipped")
    skipped = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {n for n, k in kinds.items() if k == "skipped"}
    assert "empty file" in skipped["empty.6.0_100.0.jpg"]
    assert "JPEG data is corrupt" in skipped["truncated.5.0_600.1.jpg"]
    assert "name does not parse" in skipped["IMG_0001_badname.jpg"]
    assert "stray folder" in skipped["stray"]

    # A single-split folder is named after itself.
    assert list(manifest["splits"]) == ["train"]
    split = manifest["splits"]["train"]
    assert split["samples"] == len(good)
    assert sum(split["converted"].values()) == 4

    samples = read_with_webdataset(out, "train")
    assert sorted(samples) == good
    for name, s in samples.items():
        p = parse_name(name)
        assert s["meta"] == {"filename": name, "image": p.stem, "proposal": p.proposal, "iou": p.iou, "label": p.label}
        with Image.open(io.BytesIO(s["jpg"])) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (224, 224))
        if kinds.get(name) != "converted":  # RGB JPEG inputs are stored byte for byte
            assert s["jpg"] == (src / name).read_bytes()

    index = load_index(out, "train")
    by_sid = {s["sid"]: s for s in samples.values()}
    keys = index.rows["key"]
    assert sorted(by_sid) == list(keys) and (np.diff(keys) > 0).all()  # rows in key order
    assert keys[-1] == len(index) + 3 - 1  # 3 of the slots were inputs that could not be stored
    for sid, s in by_sid.items():
        row = index.rows[np.searchsorted(keys, sid)]
        assert row["crc32"] == zlib.crc32(s["jpg"])
        assert row["filename"].decode() == s["meta"]["filename"]
        assert row["label"] == s["meta"]["label"] and row["iou"] == np.float32(s["meta"]["iou"])
        tar = index.shards[row["shard"]]
        with open(tar, "rb") as f:
            f.seek(row["offset"])
            assert f.read(row["size"]) == s["jpg"]


@needs_dali
def test_dali_reads_the_packed_tars_with_their_idx(messy_src, tmp_path):
    src, _ = messy_src
    out = tmp_path / "shards"
    pack(src, out, PackSettings(samples_per_shard=40, workers=2), progress=False)
    by_sid = {s["sid"]: s for s in read_with_webdataset(out, "train").values()}
    dali = read_with_dali(out, "train")
    assert sorted(sid for _, sid in dali) == sorted(by_sid)
    for jpg, sid in dali:
        assert jpg == by_sid[sid]["jpg"]


def test_samples_are_shuffled_and_keys_have_no_dots(demo_shards):
    index = load_index(demo_shards, "train")
    names = index.filenames(np.arange(len(index)))
    assert names != sorted(names)
    out = subprocess.run(["tar", "-tf", str(index.shards[0])], capture_output=True, text=True, check=True)
    keys = {m.split(".", 1)[0] for m in out.stdout.split()}
    assert all("." not in k for k in keys) and len(keys) == 50


def test_same_input_same_seed_gives_identical_shards(demo_src, demo_shards, tmp_path):
    again = tmp_path / "again"
    pack(demo_src, again, PackSettings(samples_per_shard=50, workers=2), progress=False)
    assert shard_files(again) == shard_files(demo_shards)
    other = tmp_path / "other"
    pack(demo_src, other, PackSettings(samples_per_shard=50, workers=1, seed=1), progress=False)
    assert shard_files(other) != shard_files(demo_shards)


@pytest.mark.slow
def test_rerun_after_kill_gives_identical_shards(demo_src, demo_shards, tmp_path):
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "pack.py"),
        str(demo_src),
        "--out",
        str(out),
        "--samples-per-shard",
        "50",
        "--workers",
        "1",
        "--quiet",
    ]
    kill_when(cmd, out, "**/*.tar", tmp_path / "stop")  # killed with its first shard written
    with pytest.raises(ShardError, match="re-run"):
        load_index(out, "train")
    subprocess.run(cmd, check=True)
    assert shard_files(out) == shard_files(demo_shards)
    assert not list(out.rglob("*.tmp"))


def test_rerun_repairs_partial_state_and_keeps_what_crackio_did_not_write(demo_src, demo_shards, tmp_path):
    out = tmp_path / "partial"
    pack(demo_src, out, PackSettings(samples_per_shard=10, workers=1), progress=False)  # 16 train shards
    assert (out / "train" / "train-000015.tar").is_file()
    (out / "manifest.json").unlink()
    (out / "train" / "train-000000.tar.tmp").write_bytes(b"half a shard")
    tar = out / "train" / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[:1000])
    mine = {"train/train-2023.tar": b"a user's own tar", "valid/valid-backup.tar": b"backup", "notes.txt": b"x"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    pack(demo_src, out, PackSettings(samples_per_shard=50, workers=1), progress=False)  # 4 train shards
    got = shard_files(out)
    for name, data in mine.items():
        assert got.pop(name) == data  # never deleted: crackio did not write them
    assert got == shard_files(demo_shards)  # the earlier pack's shards 4..15 and the temporary are gone


@pytest.mark.slow
def test_cli_strict_and_summary(messy_src, tmp_path):
    src, _ = messy_src
    cmd = [sys.executable, str(ROOT / "tools" / "pack.py"), str(src), "--out", str(tmp_path / "o"), "--quiet"]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "skipped" in ok.stdout and "converted" in ok.stdout and "MB" in ok.stdout
    assert "empty.6.0_100.0.jpg: empty file" in ok.stderr
    strict = subprocess.run(cmd + ["--strict"], capture_output=True, text=True)
    assert strict.returncode == 1 and "--strict" in strict.stderr
    missing = subprocess.run(cmd[:2] + [str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_load_index_errors_name_the_file(demo_shards, tmp_path):
    with pytest.raises(ShardError, match="does not exist"):
        load_index(tmp_path / "nothing", "train")
    with pytest.raises(ShardError, match="split 'nope' is not in"):
        load_index(demo_shards, "nope")
    broken = tmp_path / "broken"
    shutil.copytree(demo_shards, broken)
    tar = broken / "train" / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[:4096])
    with pytest.raises(
        ShardError, match=r"train-000001.tar is 4096 bytes.*write the pack again with `python tools/pack.py"
    ):
        load_index(broken, "train")


def test_empty_split_is_an_error(tmp_path):
    src = tmp_path / "src" / "train"
    src.mkdir(parents=True)
    (src / "a.1.0_5.1.jpg").write_bytes(b"")
    manifest = pack(tmp_path / "src", tmp_path / "out", progress=False)
    assert manifest["splits"]["train"]["samples"] == 0
    with pytest.raises(ShardError, match="'train' in .* is empty"):
        load_index(tmp_path / "out", "train")


def test_any_worker_count_writes_the_same_bytes(demo_src, tmp_path):
    """Shard k holds keys [k*S, (k+1)*S) whatever process writes it: 1, 2 and 3 workers, 12 shards."""
    outs = []
    for workers in (1, 2, 3):
        outs.append(tmp_path / f"w{workers}")
        pack(demo_src, outs[-1], PackSettings(samples_per_shard=20, workers=workers), progress=False)
    assert len(list(outs[0].glob("*/*.tar"))) == 12
    assert shard_files(outs[0]) == shard_files(outs[1]) == shard_files(outs[2])
    assert len({(o / "manifest.json").read_bytes() for o in outs}) == 1


def test_pack_flags_are_the_settings_fields(tmp_path, monkeypatch, capsys):
    """tools/pack.py's settings flags come from PackSettings (crackio.flags): each field's `#` comment is its help,
    the parsed flags make the settings pack() receives, and PackSettings alone checks them."""
    import dataclasses

    import tools.pack as tool
    from crackio.errors import ConfigError
    from crackio.flags import field_help, flag

    monkeypatch.setenv("COLUMNS", "400")  # no wrapped help lines
    with pytest.raises(SystemExit):
        tool.main(["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(PackSettings):
        if f.name in ("size", "quality"):  # fixed: every stored image is 224 x 224, JPEG quality 95
            assert flag(f.name) not in text
        else:
            assert f"{field_help(PackSettings)[f.name]} (default: {f.default})" in text

    got = {}

    class Stop(Exception):
        pass

    def fake(src, out, settings, progress, overwrite, append):
        got["settings"] = settings
        raise Stop

    monkeypatch.setattr(tool, "pack", fake)
    with pytest.raises(Stop):
        tool.main([str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"])
    assert got["settings"] == PackSettings()
    flags = ["--samples-per-shard", "7", "--workers", "3", "--seed", "9"]
    with pytest.raises(Stop):
        tool.main([str(tmp_path), "--out", str(tmp_path / "o"), *flags, "--quiet"])
    assert got["settings"] == PackSettings(samples_per_shard=7, workers=3, seed=9)

    message = r"PackSettings\(samples_per_shard=0, workers=-1\): samples_per_shard must be >= 1 and workers >= 0"
    with pytest.raises(ConfigError, match=message):
        PackSettings(samples_per_shard=0, workers=-1)
    with pytest.raises(SystemExit) as stop:
        tool.main([str(tmp_path), "--samples-per-shard", "0", "--workers", "-1"])
    tool_message = "--samples-per-shard must be >= 1 and --workers >= 0, got 0 and -1"  # the tool speaks its flags
    assert stop.value.code == 2 and tool_message in capsys.readouterr().err


def test_another_pack_in_out_is_replaced_only_with_overwrite(demo_src, tmp_path, capsys):
    """Packing another source (or the same with other settings) into an --out holding a pack would silently replace
    a pack runs trained on: refused in one line naming what differs; --overwrite replaces it; the same command
    again goes ahead."""
    out = tmp_path / "out"
    settings = PackSettings(samples_per_shard=50, workers=1)
    pack(demo_src, out, settings, progress=False)
    other = tmp_path / "other"
    shutil.copytree(demo_src / "train", other / "train")
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match=f"--out {out} holds another pack \\(source '.*' then, '{other}' now\\)"):
        pack(other, out, settings, progress=False)
    with pytest.raises(ValueError, match="holds another pack \\(seed 0 then, 1 now\\): .* give --overwrite"):
        pack(demo_src, out, PackSettings(samples_per_shard=50, workers=1, seed=1), progress=False)
    assert (out / "manifest.json").read_bytes() == before  # refused before anything was written
    pack(demo_src, out, settings, progress=False)  # the same command again
    assert (out / "manifest.json").read_bytes() == before
    tool = [sys.executable, str(ROOT / "tools" / "pack.py"), str(other), "--out", str(out), "--quiet"]
    refused = subprocess.run(tool, capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "--overwrite" in refused.stderr
    replaced = subprocess.run([*tool, "--overwrite"], capture_output=True, text=True)
    assert replaced.returncode == 0, replaced.stderr
    assert f"note: {out} held a pack with other contents, now replaced" in replaced.stderr
    again = subprocess.run(tool, capture_output=True, text=True)  # the same command: the same bytes, no note
    assert again.returncode == 0 and "note:" not in again.stderr
    assert json.loads((out / "manifest.json").read_text())["source"] == str(other)
    assert not (out / "valid").exists()  # the earlier pack's splits are gone with it


def test_a_missing_split_names_one_the_pack_has():
    from crackio.format.manifest import check_split

    manifest = {"splits": {"train": {}, "valid": {}}}
    with pytest.raises(ShardError, match="its splits: train, valid\\); give --split valid, or pack a folder test/"):
        check_split(manifest, "p", "test", "--split")
    with pytest.raises(ShardError, match="give split='valid'"):
        check_split(manifest, "p", "test")


def test_verify_checks_the_converted_list_against_the_manifest(messy_src, tmp_path):
    from crackio.format.verify import verify

    src, _ = messy_src
    out = tmp_path / "out"
    pack(src, out, PackSettings(samples_per_shard=50, workers=1), progress=False)
    listed = out / "train" / "converted.tsv"
    assert listed.is_file() and list(verify(out)) == []
    listed.write_text(listed.read_text() + "x.png\tinvented\n")
    problems = list(verify(out))
    assert len(problems) == 1 and problems[0].startswith(f"{listed}: its SHA-256 is ")
    listed.unlink()
    assert list(verify(out)) == [f"{listed}: missing, the manifest records one (the split's converted inputs)"]
