"""Faults and hostile files on the shards side: every failure one clear line, nothing left behind, nothing read
or written outside the folders named, never a folder the loader accepts with wrong samples."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from crackio.errors import ConfigError, WriteError
from crackio.format import tar as shards_module
from crackio.format.index import load_index
from crackio.format.layout import ShardError
from crackio.format.manifest import read_manifest
from crackio.format.verify import verify
from crackio.loading.loader import make_loader
from crackio.writing.outdir import LOCK, WRITTEN, OutputFolder
from crackio.writing.pack import PackSettings, pack
from tests.conftest import BACKENDS, ROOT
from tests.helpers import StopPoint, record_index
from tests.test_pack import shard_files

PACK = [sys.executable, str(ROOT / "tools" / "pack.py")]


def one_line(stderr: str) -> str:
    """The CLI's message: exactly one line, no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture()
def shards(demo_shards, tmp_path) -> Path:
    """A private copy of the demo shards to damage."""
    import shutil

    out = tmp_path / "shards"
    shutil.copytree(demo_shards, out)
    return out


def edit_manifest(out: Path, change) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))


# --- 1. the shards folder is untrusted input ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../../outside.tar", "/etc/passwd", "train/../../x.tar", "valid-000000.tar", "train-1.tar", ""]
)
def test_a_manifest_naming_a_file_outside_the_split_is_refused(shards, tmp_path, name):
    outside = tmp_path / "outside.tar"
    outside.write_bytes((shards / "train" / "train-000000.tar").read_bytes())
    edit_manifest(shards, lambda m: m["splits"]["train"]["shards"][0].update(name=name))
    with pytest.raises(ShardError, match="not a file train-NNNNNN.tar of the split's folder"):
        load_index(shards, "train")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(splits=[]), "no 'splits' object"),
        (lambda m: m["splits"].update({"..": m["splits"]["train"]}), "not a plain folder name"),
        (lambda m: m["splits"]["train"].update(samples="160"), "'samples' \\(an integer"),
        (lambda m: m["splits"]["train"].update(samples=-1), "'samples' \\(an integer"),
        (lambda m: m["splits"]["train"]["shards"][0].update(bytes=None), "'bytes' as integers"),
        (lambda m: m["splits"]["train"]["shards"].append("x"), "has no file name"),
        (lambda m: m["splits"]["train"].update(samples=159), "hold 160 samples, not 159"),
        (lambda m: m["splits"]["train"].pop("index_sha256"), "needs 'index_sha256'"),
        (lambda m: m["splits"]["train"].update(index_sha256="ABC"), "needs 'index_sha256'"),
        (lambda m: m["splits"]["train"]["shards"][0].update(sha256=7), "needs 'sha256' and 'idx_sha256'"),
        (lambda m: m["splits"]["train"].update(converted_sha256="x"), "converted_sha256 is not a SHA-256"),
    ],
)
def test_malformed_manifest_fields_are_one_shard_error(shards, change, message):
    edit_manifest(shards, change)
    with pytest.raises(ShardError, match=message):
        load_index(shards, "train")


def test_a_pack_of_an_earlier_format_is_refused_with_the_command_that_writes_it_again(demo_src, tmp_path):
    """The command in the message works as given: the pack's source and its recorded settings."""
    import shlex

    from crackio.format.manifest import parse_manifest
    from crackio.writing.pack import PackSettings, pack

    shards = tmp_path / "old"
    pack(demo_src, shards, PackSettings(samples_per_shard=30, workers=1, seed=5), progress=False)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["format_version"] = 2
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="format_version 2, this crackio reads 3 \\(which records every") as e:
        load_index(shards, "train")
    command = str(e.value).split("`")[1]
    assert command.startswith(f"python tools/pack.py {demo_src} --out {shards} --samples-per-shard 30 --seed 5")
    done = subprocess.run([sys.executable, *shlex.split(command)[1:], "--quiet"], cwd=ROOT, capture_output=True)
    assert done.returncode == 0, done.stderr
    assert len(load_index(shards, "train")) == 160
    proposed = {"format_version": 2, "source": "/data/photos", "stage": "propose", "annotations": {"format": "coco"}}
    proposed |= {"proposals": {"mode": "quality", "max_proposals": 300, "size": 224}, "settings": {"classes": []}}
    with pytest.raises(
        ShardError,
        match="`python tools/propose.py /data/photos --format coco --out P --mode quality --max-proposals 300`",
    ):
        parse_manifest(json.dumps(proposed).encode(), "P/manifest.json", "P")


def test_unreadable_or_hostile_json_is_a_shard_error(shards):
    for text in ["[" * 100_000, "not json", "[1, 2]", '{"format_version": 2}']:
        (shards / "manifest.json").write_text(text)
        with pytest.raises(ShardError, match=r"manifest.json"):
            load_index(shards, "train")


def rewrite_index(out: Path, change) -> None:
    rows = np.load(out / "train" / "index.npy")
    change(rows)
    np.save(out / "train" / "index.npy", rows)
    record_index(out)  # a pack whose manifest agrees: the row checks behind the digest


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r["shard"].__setitem__(3, 99), "shard numbers outside"),
        (lambda r: r["shard"].__setitem__(3, -1), "shard numbers outside"),
        (lambda r: r["offset"].__setitem__(3, -5), "row 3 points outside its tar"),
        (lambda r: r["size"].__setitem__(3, 10**12), "row 3 points outside its tar"),
        (lambda r: r["key"].__setitem__(3, 0), "keys that are not strictly ascending"),
        (lambda r: r["label"].__setitem__(3, 7), "row 3 has label 7"),
        (lambda r: r["iou"].__setitem__(3, np.nan), "row 3 has label .* and IoU nan"),
        (lambda r: r["iou"].__setitem__(3, 1.5), "labels are 0 or 1, IoUs within"),
    ],
)
def test_index_rows_are_checked_before_use(shards, change, message):
    rewrite_index(shards, change)
    with pytest.raises(ShardError, match=message):
        load_index(shards, "train")


def test_malformed_index_files_are_shard_errors(shards):
    path = shards / "train" / "index.npy"
    good = path.read_bytes()
    header_end = good.index(b"\n") + 1
    bigger = good[:header_end].replace(b"(160,)", b"(99999999,)")  # claims far more rows than the file holds
    for data, message in [
        (bigger + good[header_end:], "cannot be read"),
        (b"\x93NUMPY garbage", "cannot be read"),
        (b"", "cannot be read"),
    ]:
        path.write_bytes(data)
        with pytest.raises(ShardError, match=message):
            load_index(shards, "train")
    np.save(path, np.arange(160), allow_pickle=False)
    with pytest.raises(ShardError, match="not a crackio index"):
        load_index(shards, "train")
    np.save(path, np.array([{"a": 1}] * 160, dtype=object), allow_pickle=True)  # a pickle inside the .npy
    with pytest.raises(ShardError, match="cannot be read"):
        load_index(shards, "train")


def test_validation_reads_no_tar(shards, monkeypatch):
    """load_index checks sizes and locations only (its cost is measured in docs/performance.md, not here):
    opening a split must not read a byte of its tars, whatever their size."""
    opened = []
    real_open, real_os_open = open, os.open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    monkeypatch.setattr(os, "open", lambda f, *a, **k: opened.append(str(f)) or real_os_open(f, *a, **k))
    index = load_index(shards, "train")
    assert len(index) > 0 and opened and not [f for f in opened if f.endswith(".tar")]


# --- 6. integrity of stored samples ------------------------------------------------------------------------------


def flip_byte_in_a_stored_jpeg(out: Path) -> tuple[int, str]:
    index = load_index(out, "train")
    row = 5
    offset, size = int(index.rows["offset"][row]), int(index.rows["size"][row])
    tar = index.shards[int(index.rows["shard"][row])]
    with open(tar, "r+b") as f:
        f.seek(offset + size // 2)
        byte = f.read(1)
        f.seek(offset + size // 2)
        f.write(bytes([byte[0] ^ 0x10]))
    return row, index.filenames(np.array([row]))[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_flipped_byte_is_refused_before_decoding_by_both_backends(shards, backend):
    row, name = flip_byte_in_a_stored_jpeg(shards)
    loader = make_loader(shards, "train", batch_size=160, train=False, backend=backend, device="cpu")
    with pytest.raises(ShardError, match=rf"sample {row} \({name}\) in .*train-000000.tar does not match its checksum"):
        next(iter(loader))


def test_swapped_samples_are_found_by_the_loader_and_by_verify(shards):
    rows = np.load(shards / "train" / "index.npy")
    rows[["offset", "size", "crc32"]][[1, 2]] = rows[["offset", "size", "crc32"]][[2, 1]]  # labels now mismatched
    np.save(shards / "train" / "index.npy", rows)
    record_index(shards)  # even with the manifest agreeing (a writer's bug), each row's own checks find it
    problems = list(verify(shards))
    assert len(problems) == 2 and all("points at member" in p for p in problems)
    loader = make_loader(shards, "train", batch_size=160, train=False, backend="torch", device="cpu")
    with pytest.raises(ShardError, match=r"sample 1 \(.*\) in .* is not stored as its key 0+\d+ says"):
        next(iter(loader))


def test_an_index_with_one_label_flipped_is_refused_at_open_and_found_by_verify(shards):
    rows = np.load(shards / "train" / "index.npy")
    rows["label"][5] = 1 - rows["label"][5]  # sizes, locations and checksums all still match
    np.save(shards / "train" / "index.npy", rows)
    with pytest.raises(ShardError, match=r"train/index.npy is not the index .*manifest.json records \(SHA-256 "):
        make_loader(shards, "train", batch_size=4, train=True, device="cpu")
    problems = list(verify(shards))
    assert len(problems) == 2 and "train/index.npy is not the index" in problems[0]
    assert "row 5" in problems[1] and "disagree with the index" in problems[1]
    record_index(shards)  # a manifest that agrees (a writer's bug): the tar's .json still tells
    assert [p for p in verify(shards) if "disagree with the index" in p] == problems[1:]


def pack_under_umask(src: Path, out: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        pack(src, out, PackSettings(workers=1), progress=False)
    finally:
        os.umask(old)


def test_shared_folders_stay_readable_and_links_out_of_a_split_are_refused(demo_src, tmp_path):
    pack_under_umask(demo_src, tmp_path / "out", 0o022)
    for name in ["manifest.json", "train/index.npy", "train/train-000000.idx", ".crackio-written.json"]:
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644, name
    elsewhere = tmp_path / "elsewhere.tar"
    tar = tmp_path / "out" / "train" / "train-000000.tar"
    tar.rename(elsewhere)
    tar.symlink_to(elsewhere)
    with pytest.raises(ShardError, match="is a link to .*elsewhere.tar, outside"):
        load_index(tmp_path / "out", "train")


@pytest.mark.slow
def test_verify_command(shards):
    ok = subprocess.run([*PACK, "--verify", str(shards)], capture_output=True, text=True)
    assert ok.returncode == 0 and "all 240 samples match their checksums and their index rows" in ok.stdout
    _, name = flip_byte_in_a_stored_jpeg(shards)
    bad = subprocess.run([*PACK, "--verify", str(shards)], capture_output=True, text=True)
    assert bad.returncode == 1 and name in one_line(bad.stderr) and "1 problems in" in bad.stdout


# --- 3. out of space -------------------------------------------------------------------------------------------


class FillsUp:
    """A file whose disk fills after 100 KB: every later write raises ENOSPC, as a real full disk does."""

    def __init__(self, f):
        self.f, self.left = f, 100_000

    @classmethod
    def open(cls, path, mode="r", buffering=-1):
        if "w" not in mode:
            return open(path, mode, buffering)
        return cls(open(path, mode, buffering=0))

    def write(self, data):
        self.left -= len(data)
        if self.left < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_full_disk_during_pack_is_one_line_and_leaves_no_temporaries(demo_src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(shards_module, "open", FillsUp.open, raising=False)  # the tar writer's open()
    with pytest.raises(WriteError, match=r"no space left on device while writing .*train-000000.tar.tmp: free space"):
        pack(demo_src, out, PackSettings(samples_per_shard=50, workers=1), progress=False)
    assert not temporaries(out) and not (out / "manifest.json").exists()
    with pytest.raises(ShardError, match="is missing"):
        load_index(out, "train")


@pytest.mark.slow
def test_a_real_full_disk_during_pack_keeps_the_previous_state_out_of_the_loader(demo_src, tmp_path):
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (not root?)")
    try:
        out = disk / "shards"
        run = subprocess.run([*PACK, str(demo_src), "--out", str(out), "--quiet"], capture_output=True, text=True)
        assert run.returncode == 2
        assert "no space left on device while writing" in one_line(run.stderr) and str(out) in run.stderr
        assert not temporaries(out) and not (out / "manifest.json").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# --- 4. signals -------------------------------------------------------------------------------------------------


def interrupt(cmd: list[str], out: Path, pattern: str, sig: int, group: bool, folder: Path) -> tuple[int, str, int]:
    """Run `cmd` until it writes a file matching `pattern` under `out` (stopped there, with its workers: it cannot
    finish first), send `sig` (to its process group, as a terminal's Ctrl-C does, or to the process alone) and let
    it go on; (exit code, stderr, the shards complete when the signal came). Asserts that no process of the group
    is left."""
    stop = StopPoint(folder, file=pattern, root=out)
    proc = stop.start(cmd, stderr=subprocess.PIPE, text=True)
    shards = len(list(out.glob("*/*.tar")))
    stop.signal(sig, group)
    stop.resume()
    try:
        stderr = proc.communicate(timeout=300)[1]  # a hang guard only
    finally:
        stop.kill()
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no worker left behind
    return proc.returncode, stderr, shards


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_with_workers_exits_cleanly_and_the_rerun_finishes(demo_src, tmp_path, sig, code):
    out = tmp_path / "out"
    cmd = [*PACK, str(demo_src), "--out", str(out), "--workers", "2", "--samples-per-shard", "20", "--quiet"]
    # Ctrl-C in a terminal reaches the whole process group; `kill PID` only the main process.
    returncode, stderr, before = interrupt(cmd, out, "train/*.tar*", sig, sig == signal.SIGINT, tmp_path / "stop")
    assert returncode == code and one_line(stderr).startswith("interrupted by SIG")
    assert not temporaries(out) and not (out / "manifest.json").exists()
    # Stopped promptly: a worker finishes at most the shard it was writing, none starts another (12 in all).
    assert len(list(out.glob("*/*.tar"))) <= before + 2
    subprocess.run(cmd, check=True, capture_output=True)
    clean = tmp_path / "clean"
    subprocess.run(cmd[:4] + [str(clean)] + cmd[5:], check=True, capture_output=True)
    assert shard_files(out) == shard_files(clean)


# --- 5. one writer per folder; only crackio's own files ------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_into_a_held_folder_exits_at_once_naming_the_holder(demo_src, tmp_path):
    out = tmp_path / "out"
    with OutputFolder(out):
        with pytest.raises(ConfigError, match=rf"being written by another crackio run \(PID {os.getpid()}\)"):
            pack(demo_src, out, PackSettings(workers=1), progress=False)
        run = subprocess.run([*PACK, str(demo_src), "--out", str(out), "--quiet"], capture_output=True, text=True)
        assert run.returncode == 2 and f"PID {os.getpid()}" in one_line(run.stderr)
    # The lock file of a finished (or killed) holder stays behind and blocks nobody.
    assert (out / LOCK).exists()
    pack(demo_src, out, PackSettings(workers=1), progress=False)


@pytest.mark.slow
def test_two_concurrent_packs_into_one_folder_never_leave_wrong_samples(demo_src, tmp_path):
    out = tmp_path / "out"
    cmds = [
        [*PACK, str(demo_src), "--out", str(out), "--workers", "1", "--seed", str(seed), "--quiet"] for seed in (1, 2)
    ]
    # The first pack is stopped mid-way (its train shard written) while the second one runs.
    first = StopPoint(tmp_path / "stop", file="train/*.tar", root=out)
    proc = first.start(cmds[0], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.run(cmds[1], capture_output=True, text=True, timeout=300)
    first.resume()
    try:
        results = [(proc.wait(timeout=300), proc.stderr.read()), (second.returncode, second.stderr)]
    finally:
        first.kill()
    assert sorted(code for code, _ in results) == [0, 2]
    refused = next(err for code, err in results if code == 2)
    assert "being written by another crackio run" in one_line(refused)
    assert list(verify(out)) == []
    seed = read_manifest(out)["seed"]
    assert results[seed - 1][0] == 0  # the folder holds the pack of the run that succeeded


def test_files_crackio_did_not_write_are_never_overwritten(demo_src, tmp_path):
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "train-000000.tar").write_bytes(b"a user's file with a shard's name")
    with pytest.raises(ConfigError, match=r"train-000000.tar exists and was not written by crackio"):
        pack(demo_src, out, PackSettings(workers=1), progress=False)
    assert (out / "train" / "train-000000.tar").read_bytes() == b"a user's file with a shard's name"


def test_a_split_gone_from_the_source_loses_its_old_folder(demo_src, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(demo_src, src)
    out = tmp_path / "out"
    pack(src, out, PackSettings(workers=1), progress=False)
    (out / "test" / "mine.txt").write_text("a user's note")
    (out / "valid" / "README").write_text("kept")
    shutil.rmtree(src / "valid")
    shutil.rmtree(src / "test")
    pack(src, out, PackSettings(workers=1), progress=False)
    assert not (out / "test" / "index.npy").exists() and not list((out / "test").glob("*.tar"))
    assert (out / "test" / "mine.txt").read_text() == "a user's note"  # so its folder stays
    assert sorted(p.name for p in (out / "valid").iterdir()) == ["README"]
    assert "valid" not in json.loads((out / WRITTEN).read_text())["files"]


def test_out_inside_src_is_not_read_back_as_a_split(demo_src, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(demo_src, src)
    first = pack(src, src / "shards", PackSettings(workers=1), progress=False)
    manifest = (src / "shards" / "manifest.json").read_bytes()
    again = pack(src, src / "shards", PackSettings(workers=1), progress=False)
    assert list(again["splits"]) == ["train", "valid", "test"] == list(first["splits"])
    assert again["samples"] == first["samples"] == 240 and not again["skipped"]
    assert (src / "shards" / "manifest.json").read_bytes() == manifest  # the same input, the same manifest
    with pytest.raises(ConfigError, match="is the proposal folder itself"):
        pack(src, src, PackSettings(workers=1), progress=False)


# --- 7. source folders as file systems really are -------------------------------------------------------------------


def test_links_pipes_sockets_and_devices_named_like_proposals(demo_src, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(demo_src / "train", src / "train")
    t = src / "train"
    good = sorted(t.iterdir())[0]
    (t / "loop.1.0_000.0.jpg").symlink_to(t / "loop.1.0_000.0.jpg")
    (t / "dangling.1.0_000.0.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (t / "zero.1.0_000.0.jpg").symlink_to("/dev/zero")
    (t / "linked.1.0_000.0.jpg").symlink_to(good)
    os.mkfifo(t / "pipe.1.0_000.0.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(t / "sock.1.0_000.0.jpg"))
    try:
        manifest = pack(src, tmp_path / "out", PackSettings(workers=2), progress=False)
    finally:
        sock.close()
    skipped = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {f"{n}.1.0_000.0.jpg" for n in ("loop", "dangling", "zero", "pipe", "sock")}
    assert all("not a regular file" in r for r in skipped.values())
    index = load_index(tmp_path / "out", "train")
    assert "linked.1.0_000.0.jpg" in index.filenames(np.arange(len(index)))  # a link to a regular file is followed


def test_a_file_larger_than_any_crop_is_skipped_before_it_is_read(tmp_path, monkeypatch):
    from crackio.writing import images

    path = tmp_path / "huge.jpg"
    with open(path, "wb") as f:
        f.truncate(images.MAX_FILE_BYTES + 1)  # sparse: nothing to read, and it must not be read
    reads = []
    monkeypatch.setattr(images.io, "BytesIO", lambda *a: reads.append(a) or pytest.fail("read"))
    result = images.prepare(str(path))
    assert result.data is None and "larger than any plausible crop" in result.note and not reads


def test_a_name_the_packer_writes_crc_for_is_the_bytes_it_stored(demo_shards):
    index = load_index(demo_shards, "valid")
    tar = index.shards[0].read_bytes()
    for row in index.rows[:20]:
        data = tar[row["offset"] : row["offset"] + row["size"]]
        assert zlib.crc32(data) == row["crc32"]


# --- the proposal stage ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco_photos(demo_photos) -> Path:
    return demo_photos / "coco"


@pytest.mark.slow
def test_a_full_disk_during_propose_is_one_line_and_the_rerun_reuses_the_photos(coco_photos, tmp_path, monkeypatch):
    from crackio.writing.proposal_stage import ProposeSettings, propose_to_shards
    from crackio.writing.regions import ProposalSettings

    out = tmp_path / "out"
    settings, proposals = ProposeSettings(workers=1, samples_per_shard=20), ProposalSettings(max_proposals=40)
    with monkeypatch.context() as patched:
        patched.setattr(shards_module, "open", FillsUp.open, raising=False)
        with pytest.raises(WriteError, match=r"no space left on device while writing .*\.tar\.tmp"):
            propose_to_shards(coco_photos, "coco", out, proposals, settings, progress=False)
    # No temporary and no manifest; the photos proposed are kept in the spool for the re-run.
    assert not temporaries(out) and not (out / "manifest.json").exists() and list((out / ".spool").glob("*.npz"))
    done = propose_to_shards(coco_photos, "coco", out, proposals, settings, progress=False)
    assert done["reused"]["photos"] == done["reused"]["photos_total"] > 0 and not (out / ".spool").exists()
    assert list(verify(out)) == []


@pytest.mark.slow
def test_ctrl_c_during_propose_exits_cleanly_and_the_rerun_finishes(coco_photos, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "tools" / "propose.py"), str(coco_photos), "--format", "coco", "--out", str(out)]
    cmd += ["--max-proposals", "40", "--workers", "2", "--quiet"]
    returncode, stderr, _ = interrupt(cmd, out, ".spool/*.npz", signal.SIGINT, True, tmp_path / "stop")
    assert returncode == 130 and one_line(stderr).startswith("interrupted by SIG")
    assert not temporaries(out) and not (out / "manifest.json").exists()
    assert not list(out.glob("*/*.tar"))  # stopped while proposing, before any shard: it did not run on
    assert list((out / ".spool").glob("*.npz"))  # the chunks it finished, for the re-run
    rerun = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert "reused from an interrupted run:" in rerun.stdout and not (out / ".spool").exists()
    assert list(verify(out)) == []


def test_a_failure_recording_the_files_leaves_no_manifest(demo_src, tmp_path, monkeypatch):
    from crackio.fsio import write_error

    def full(self, keep):
        raise write_error(tmp_path / "out" / WRITTEN, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    monkeypatch.setattr(OutputFolder, "finish", full)
    with pytest.raises(WriteError, match="no space left on device while writing .*crackio-written.json"):
        pack(demo_src, tmp_path / "out", PackSettings(workers=1), progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists() and not temporaries(tmp_path / "out")


def test_out_that_is_a_split_folder_or_would_write_into_one_is_refused(demo_src, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(demo_src, src)
    with pytest.raises(ConfigError, match="is a split folder of"):
        pack(src, src / "train", PackSettings(workers=1), progress=False)
    with pytest.raises(ConfigError, match="would put split train's shards into its own source folder"):
        pack(src / "train", src, PackSettings(workers=1), progress=False)
    assert not list(src.rglob("*.tar"))


def test_propose_refuses_out_inside_the_photo_folder(coco_photos, tmp_path):
    from crackio.writing.proposal_stage import propose_to_shards

    for out in (coco_photos, coco_photos / "train", coco_photos / "shards"):
        with pytest.raises(ConfigError, match="inside the photo folder"):
            propose_to_shards(coco_photos, "coco", out, progress=False)


def test_special_files_in_a_shards_folder_never_block_or_fill_memory(shards):
    index = shards / "train" / "index.npy"
    index.unlink()
    os.mkfifo(index)
    with pytest.raises(ShardError, match="index.npy cannot be read .*not a regular file"):
        load_index(shards, "train")  # would block for ever in np.load


def test_verify_reads_idx_files_safely(shards):
    idx = shards / "train" / "train-000000.idx"
    idx.unlink()
    idx.symlink_to("/dev/zero")
    problems = list(verify(shards))
    assert any("train-000000.idx: unreadable" in p for p in problems)


def test_lock_file_follows_the_umask(demo_src, tmp_path):
    pack_under_umask(demo_src, tmp_path / "out", 0o002)
    assert (tmp_path / "out" / LOCK).stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "out" / "manifest.json").stat().st_mode & 0o777 == 0o664


@pytest.mark.parametrize("blocked", ["train", ".spool"])
def test_a_file_where_a_folder_goes_is_one_line(demo_src, demo_photos, tmp_path, blocked):
    out = tmp_path / "out"
    out.mkdir()
    (out / blocked).write_text("the user's file\n")
    with pytest.raises(ConfigError, match=f"{blocked} is a file where crackio writes a folder"):
        if blocked == "train":
            pack(demo_src, out, PackSettings(workers=1), progress=False)
        else:
            from crackio.writing.proposal_stage import propose_to_shards

            propose_to_shards(demo_photos / "coco", "coco", out, progress=False)
    assert (out / blocked).read_text() == "the user's file\n"
    assert not (out / WRITTEN).exists() and not (out / "manifest.json").exists()
