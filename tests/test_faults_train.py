"""Training-side faults: unsafe names, refused checkpoints, full disks, Ctrl-C and SIGTERM, moved or re-packed
shards, what a kill -9 leaves, a stopped torchrun rank.

Each case checks the one line the command prints (it names the file, no traceback), the exit code, that no
temporary is left and that the previous complete state is intact.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crackio import fsio
from crackio.errors import WriteError
from crackio.writing.pack import PackSettings, pack
from crackio.writing.regions import ProposalSettings
from tests.conftest import copy_run
from tests.helpers import ARCH, StopPoint, save_untrained, tiny, torchrun, wait_for_line
from train.__main__ import main as cli
from train.run import checkpoint
from train.run.model import build_model
from train.sweep import sweep

TRAIN = [sys.executable, "-m", "train"]
FLAGS = ["--arch", ARCH, "--weights", "none", "--head", "linear", "--batch-size", "16", "--device", "cpu"]
FLAGS += ["--workers", "2"]


def temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.tmp") if p.name != "notes.tmp")


def one_line(err: str, *names) -> str:
    """The command's one message line (error or interruption); no traceback; it names every `names`."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(("error:", "interrupted by"))]
    assert len(lines) == 1, err[-3000:]
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def run1(tiny_run) -> Path:
    """A finished one-epoch run (tests copy it before changing anything)."""
    return tiny_run


class Payload:
    """Unpickling this opens `path` for writing: what a malicious checkpoint does, and must never happen."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def full_disk(monkeypatch, name: str, room: int = 64) -> None:
    """Writes of the file called `name` through the atomic writer fail as on a full disk: the first `room`
    bytes reach the temporary, then OSError(ENOSPC). Torch, numpy, matplotlib and PIL write through it."""
    real = fsio.atomic_write

    class Full:
        def __init__(self, f):
            self.f, self.left = f, room

        def write(self, data) -> int:
            data = bytes(data)
            if len(data) > self.left:
                self.f.write(data[: self.left])
                self.left = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.left -= len(data)
            return self.f.write(data)

        def __getattr__(self, attr):  # flush, tell, seek: the real file's
            return getattr(self.f, attr)

    def failing(path: Path, data) -> None:
        if path.name != name:
            return real(path, data)
        return real(path, lambda f: data(Full(f)) if callable(data) else Full(f).write(data))

    monkeypatch.setattr(fsio, "atomic_write", failing)


# ---- names that become paths


@pytest.mark.parametrize("name", ["..", ".", "../escape", "a/b", ".hidden", "-x", "a\\b", ""])
def test_unsafe_variant_names_are_refused_and_nothing_is_written(demo_shards, tmp_path, capsys, name):
    variants = tmp_path / "variants.toml"
    variants.write_text(f'[[variant]]\nname = "{name.replace(chr(92), chr(92) * 2)}"\nepochs = 1\n')
    out = tmp_path / "sweeps" / "out"
    assert cli(["sweep", "--shards", str(demo_shards), "--variants", str(variants), "--out", str(out)]) == 2
    line = one_line(capsys.readouterr().err, variants, f"variant 1 ({name or 'no name'})")
    assert "is refused" in line and "OUT/<name>" in line
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["variants.toml"]  # not even --out was made


def test_a_variant_folder_linked_outside_out_is_refused(demo_shards, tmp_path, monkeypatch, capsys):
    variants = tmp_path / "variants.toml"
    variants.write_text('[[variant]]\nname = "inside"\n[[variant]]\nname = "linked"\n')
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "linked").symlink_to(elsewhere)
    trained = []
    monkeypatch.setattr(sweep, "train_main", lambda cfg: trained.append(cfg.checkpoints.out))
    args = ["sweep", "--shards", str(demo_shards), "--variants", str(variants), "--out", str(out)]
    assert cli(args) == 2  # refused before any variant trains
    assert trained == []
    err = capsys.readouterr().err
    assert "variant linked: " in err and "outside --out" in err and "nothing was trained" in err
    assert not list(elsewhere.iterdir())


def test_variant_names_are_unique_whatever_their_case(tmp_path):
    path = tmp_path / "v.toml"
    path.write_text('[[variant]]\nname = "BCE"\n[[variant]]\nname = "bce"\n')
    with pytest.raises(ValueError, match="unique name"):
        sweep.load_variants(path)


def test_split_names_that_climb_out_are_refused(demo_shards, tmp_path, capsys):
    assert cli(["--shards", str(demo_shards), "--val-split", "../valid", "--out", str(tmp_path / "r")]) == 2
    assert "--val-split '../valid' is not a split name" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "is unreadable"),
        ('{"shards": 5}', 'shards = 5 must be a list (like "shards/", or ["public/", "site/"] for several packs)'),
        ('{"shards": "s", "lr_max": 1}', "unknown config keys ['lr_max']"),
        ('["shards"]', "a config must be a table"),
    ],
)
def test_a_damaged_config_json_is_one_line_naming_it(tmp_path, capsys, text, message):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(text)
    assert cli(["--resume", str(tmp_path / "run")]) == 2
    assert message in one_line(capsys.readouterr().err, tmp_path / "run" / "config.json")


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_dist_timeout_must_be_positive(demo_shards, capsys, value):
    assert cli(["--shards", str(demo_shards), "--dist-timeout", value]) == 2
    assert f"--dist-timeout must be > 0, got {float(value)}" in one_line(capsys.readouterr().err)


# ---- checkpoints: refused in one line, never unpickled


def bad_file(kind: str, path: Path, marker: Path) -> Path:
    """A file given as a checkpoint: a payload that would create `marker` if unpickled, or not a checkpoint."""
    cfg = tiny("shards", "out").flat()
    if kind == "torch payload":
        torch.save({"model": {}, "config": cfg, "epoch": 1, "x": Payload(marker)}, path)
    elif kind == "pickle payload":
        path.write_bytes(pickle.dumps({"model": Payload(marker)}))
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "truncated":
        torch.save({"model": build_model(ARCH, "none", "linear").state_dict(), "config": cfg}, path)
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "no config":
        torch.save({"weights": torch.zeros(3)}, path)
    return path


COMMANDS = {  # command line, with {ckpt}, {shards}, {tmp} filled in
    "resume": ["--resume", "{tmp}/run"],
    "weights": ["--shards", "{shards}", *FLAGS, "--weights", "{ckpt}", "--epochs", "1", "--out", "{tmp}/w"],
    "eval": ["eval", "--checkpoint", "{ckpt}", "--device", "cpu"],
    "svm": ["svm", "--checkpoint", "{ckpt}", "--device", "cpu", "--out", "{tmp}/svm"],
    "detect": ["detect", "--checkpoint", "{ckpt}", "{tmp}", "--out", "{tmp}/detect", "--device", "cpu"],
}


@pytest.mark.parametrize("kind", ["torch payload", "pickle payload", "text", "truncated", "no config"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_refused_checkpoints_are_one_line_and_never_run(demo_shards, tmp_path, capsys, command, kind):
    marker = tmp_path / "created-by-unpickling"
    if command == "resume":
        (tmp_path / "run").mkdir()
        tiny(demo_shards, tmp_path / "run", epochs=1).save(tmp_path / "run" / "config.json", checkpoint.new_run_id())
        ckpt = bad_file(kind, tmp_path / "run" / "last.pt", marker)
    else:
        ckpt = bad_file(kind, tmp_path / "given.pt", marker)
    before = snapshot(tmp_path)
    args = [a.format(ckpt=ckpt, shards=demo_shards, tmp=tmp_path) for a in COMMANDS[command]]
    with warnings.catch_warnings(record=True) as warned:  # what the command line would print before the line
        warnings.simplefilter("always")
        assert cli(args) == 2
    assert not [w for w in warned if "pickle" in str(w.message)]
    err = capsys.readouterr().err
    line = one_line(err, ckpt)
    assert err.strip().splitlines()[-1] == line
    if "payload" in kind:
        assert "refused" in line and "nothing in it was run" in line
    assert not marker.exists()
    assert not temporaries(tmp_path)
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing there before was changed
    assert set(after) - set(before) <= {"w/config.json"}  # --weights: the new run's settings, no checkpoint


# ---- full disk, I/O errors


def test_a_write_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        calls.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    checkpoint.atomic_save({"w": torch.zeros(2)}, tmp_path / "last.pt")
    assert calls == ["fsync file", "rename", "fsync folder"]


def test_torch_save_on_a_full_disk_says_so(tmp_path, monkeypatch):
    (tmp_path / "last.pt").write_bytes(b"the previous checkpoint")
    full_disk(monkeypatch, "last.pt")
    with pytest.raises(WriteError) as e:
        checkpoint.atomic_save({"w": torch.zeros(10_000)}, tmp_path / "last.pt")
    assert str(e.value) == (
        f"no space left on device while writing {tmp_path / 'last.pt'} (the previous last.pt is unchanged): "
        f"free space or write elsewhere, then re-run"
    )
    assert "enforce fail" not in str(e.value)
    assert (tmp_path / "last.pt").read_bytes() == b"the previous checkpoint" and not temporaries(tmp_path)


@pytest.mark.slow
def test_a_full_disk_at_checkpoint_time_keeps_the_last_good_state(run1, tmp_path, monkeypatch, capsys):
    run = copy_run(run1, tmp_path / "run")
    before = snapshot(run)
    full_disk(monkeypatch, "last.pt")
    assert cli(["--resume", str(run), "--epochs", "2"]) == 2
    line = one_line(capsys.readouterr().err, run / "last.pt")
    assert line.startswith(f"error: no space left on device while writing {run / 'last.pt'}")
    assert f"{run / 'last.pt'} holds epoch 1: continue with `python -m train --resume {run}`" in line
    assert not temporaries(run)
    assert snapshot(run)["last.pt"] == before["last.pt"] and snapshot(run)["summary.json"] == before["summary.json"]
    monkeypatch.undo()  # space again: the run goes on from its last good state
    assert cli(["--resume", str(run), "--epochs", "2"]) == 0
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [1, 2]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_a_full_disk_while_plotting_the_report_keeps_the_previous_report(run1, tmp_path, monkeypatch, capsys):
    run = copy_run(run1, tmp_path / "run")
    (run / "summary.json").unlink()  # a run stopped before its report's end: --resume writes only the report
    before = snapshot(run)
    full_disk(monkeypatch, "curves.png")
    assert cli(["--resume", str(run)]) == 2  # every epoch done: only the final report runs again
    one_line(capsys.readouterr().err, run / "curves.png", "no space left on device")
    assert not temporaries(run)
    assert snapshot(run)["curves.png"] == before["curves.png"]
    assert not (run / "summary.json").exists()  # the mark of a finished run comes last


def test_a_full_disk_while_writing_the_sweep_tables(demo_shards, tmp_path, monkeypatch, capsys):
    variants = tmp_path / "variants.toml"
    variants.write_text('[[variant]]\nname = "a"\n')
    out = tmp_path / "out"
    monkeypatch.setattr(sweep, "train_main", lambda cfg: None)  # nothing trains: the row says "not finished"
    args = ["sweep", "--shards", str(demo_shards), "--variants", str(variants), "--out", str(out)]
    assert cli(args) == 1
    before = snapshot(out)
    full_disk(monkeypatch, "sweep.md")
    assert cli(args) == 2
    one_line(capsys.readouterr().err, out / "sweep.md", "no space left on device")
    assert snapshot(out)["sweep.md"] == before["sweep.md"] and not temporaries(out)


@pytest.mark.slow
def test_a_full_disk_during_the_svm_stage_keeps_the_previous_model(run1, tmp_path, monkeypatch, capsys):
    out = tmp_path / "svm"
    out.mkdir()
    (out / "svm_model.npz").write_bytes(b"the previous SVM")
    full_disk(monkeypatch, "svm_model.npz")
    args = ["svm", "--checkpoint", str(run1 / "best.pt"), "--device", "cpu", "--out", str(out), "--negatives", "30"]
    assert cli(args) == 2
    one_line(capsys.readouterr().err, out / "svm_model.npz", "no space left on device")
    assert (out / "svm_model.npz").read_bytes() == b"the previous SVM" and not temporaries(out)


@pytest.fixture()
def detect_checkpoint(tmp_path) -> Path:
    """An untrained tiny classifier whose 'shards' record proposal settings, and one photo."""
    shards = tmp_path / "shards"
    shards.mkdir()
    settings = ProposalSettings(max_proposals=20)
    (shards / "manifest.json").write_text(json.dumps({"format_version": 1, "splits": {}}))
    path = save_untrained(tmp_path / "best.pt", shards, seed=None, proposals=settings.as_dict())
    (tmp_path / "photos").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "photos" / "p.jpg")
    return path


@pytest.mark.parametrize("name, where", [("summary.json", "summary.json"), ("p.jpg", "images/p.jpg")])
def test_a_full_disk_during_detection_keeps_the_previous_outputs(
    detect_checkpoint, tmp_path, monkeypatch, capsys, name, where
):
    out = tmp_path / "detect"
    args = ["detect", "--checkpoint", str(detect_checkpoint), str(tmp_path / "photos"), "--out", str(out)]
    assert cli([*args, "--device", "cpu"]) == 0
    before = snapshot(out)
    full_disk(monkeypatch, name)
    assert cli([*args, "--device", "cpu"]) == 2
    one_line(capsys.readouterr().err, out / where, "no space left on device while writing")
    assert snapshot(out)[where] == before[where] and set(snapshot(out)) == set(before) and not temporaries(out)


@pytest.fixture()
def small_disk(tmp_path):
    """A 24 MB tmpfs (root only): a real full disk. Skips where mounting is not permitted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_a_really_full_disk_is_reported_as_such(run1, small_disk, monkeypatch, capsys):
    run = copy_run(run1, small_disk / "run")
    before = snapshot(run)
    free = os.statvfs(small_disk)
    room = 512 * 1024  # enough for config.json, not for a 4 MB checkpoint
    (small_disk / "filler").write_bytes(b"\0" * (free.f_bavail * free.f_frsize - room))
    assert cli(["--resume", str(run), "--epochs", "2"]) == 2
    line = one_line(capsys.readouterr().err, run)
    assert "error: no space left on device while writing" in line and "enforce fail" not in line
    assert "holds epoch 1" in line
    assert not temporaries(small_disk)
    assert snapshot(run)["last.pt"] == before["last.pt"] and snapshot(run)["best.pt"] == before["best.pt"]


# ---- Ctrl-C and SIGTERM


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, name, epochs",
    [(signal.SIGINT, "last.pt", "2"), (signal.SIGTERM, "report.txt", "1")],  # epoch 2's checkpoint; the report
)
def test_a_signal_during_a_write_keeps_the_previous_file(run1, tmp_path, monkeypatch, capsys, signum, name, epochs):
    run = copy_run(run1, tmp_path / "run")
    if name == "report.txt":  # a run stopped before its report's end (no summary.json): --resume writes the report
        (run / "summary.json").unlink()
    before = snapshot(run)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    real = fsio.atomic_write

    def interrupted(path: Path, data) -> None:
        def write(f):
            data(f) if callable(data) else f.write(data)
            os.kill(os.getpid(), signum)  # arrives with the temporary written, before the rename
            threading.Event().wait(120)  # the handler raises here, at once; the wait only guards against a hang
            raise AssertionError(f"{signal.Signals(signum).name} did not interrupt the write of {path}")

        return real(path, write if path.name == name else data)

    monkeypatch.setattr(fsio, "atomic_write", interrupted)
    assert cli(["--resume", str(run), "--epochs", epochs]) == 128 + signum
    line = one_line(capsys.readouterr().err, run / "last.pt", f"--resume {run}")
    assert line.startswith(f"interrupted by {signal.Signals(signum).name}: {run / 'last.pt'} holds epoch 1")
    assert not temporaries(run) and snapshot(run)[name] == before[name]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back


@pytest.mark.slow
def test_sigterm_in_the_first_epoch_stops_cleanly_and_resume_starts_it_again(demo_shards, tmp_path, capsys):
    run = tmp_path / "run"
    cmd = [*TRAIN, "--shards", str(demo_shards), *FLAGS, "--epochs", "1", "--out", str(run)]
    # Stopped in its second step (of 10), before any checkpoint; SIGTERM arrives there.
    stop = StopPoint(tmp_path / "stop", call="train.run.engine:step_digest", nth=2)
    proc = stop.start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert not (run / "last.pt").exists() and not (run / "step.pt").exists()
        stop.signal(signal.SIGTERM)
        stop.resume()
        _, err = proc.communicate(timeout=300)  # a hang guard only
    finally:
        stop.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    line = one_line(err.decode(), run)
    # Promptly: at the end of the step it was in (2 steps of 16 samples), not at the epoch's end.
    assert line.startswith(f"interrupted by SIGTERM: {run / 'step.pt'} holds epoch 1 after 32 samples")
    assert line.endswith(f"samples: continue with `python -m train --resume {run / 'step.pt'}`")
    # As if a kill -9 had come before the first checkpoint:
    (run / "step.pt").unlink()
    with pytest.raises(ProcessLookupError):  # nothing of its session is left running: no orphans
        os.killpg(proc.pid, 0)
    assert not temporaries(run) and not (run / "last.pt").exists()
    # What a kill -9 during a write would have left (the atomic writer's own temporary names), and a user's file:
    # --resume continues as after a kill -9.
    for name in ("last.pt", "best.pt", "history.json"):
        fd, _ = tempfile.mkstemp(dir=run, prefix=name + ".", suffix=".tmp")
        os.write(fd, b"half a file")
        os.close(fd)
    (run / "notes.tmp").write_text("mine")
    assert len(temporaries(run)) == 3
    assert cli(["--resume", str(run)]) == 0
    assert "has no checkpoint (stopped before its first one): starting at epoch 1" in capsys.readouterr().out
    assert not temporaries(run) and (run / "notes.tmp").read_text() == "mine"
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [1]


# ---- the pack a run trains on


def moved_run(run1: Path, demo_shards: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of run1 whose shards are a copy of demo_shards at tmp_path/old (the same pack)."""
    old = tmp_path / "old"
    shutil.copytree(demo_shards, old)
    run = copy_run(run1, tmp_path / "run")
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(saved | {"shards": str(old)}))
    return run, old


@pytest.mark.slow
def test_resume_follows_moved_shards_given_with_shards(run1, demo_shards, tmp_path, capsys):
    run, old = moved_run(run1, demo_shards, tmp_path)
    new = tmp_path / "new"
    old.rename(new)
    assert cli(["--resume", str(run), "--epochs", "2"]) == 2  # the old path is gone: said in one line
    one_line(capsys.readouterr().err, old, "does not exist")
    assert cli(["--resume", str(run), "--epochs", "2", "--shards", str(new)]) == 0
    assert json.loads((run / "config.json").read_text())["shards"] == [str(new)]
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["config"]["shards"] == (str(new),)
    assert ckpt["pack"] == torch.load(run1 / "last.pt", weights_only=True)["pack"]


@pytest.mark.slow
def test_resume_refuses_a_repacked_folder_saying_what_changed(run1, demo_shards, demo_src, tmp_path, capsys):
    run, old = moved_run(run1, demo_shards, tmp_path)
    before = snapshot(run)
    src = tmp_path / "src"
    shutil.copytree(demo_src, src)
    for p in sorted((src / "train").iterdir())[:10]:
        p.unlink()
    pack(src, old, PackSettings(samples_per_shard=50, workers=1, seed=1), progress=False, overwrite=True)  # in place
    assert cli(["--resume", str(run), "--epochs", "2"]) == 2
    line = one_line(capsys.readouterr().err, old, f"--resume {run}")
    assert "train 160 then, 150 now" in line and "seed 0 then, 1 now" in line
    assert snapshot(run) == before and not temporaries(run)


@pytest.mark.slow
def test_resume_refuses_an_edited_manifest_and_another_pack_given_with_shards(run1, demo_shards, tmp_path, capsys):
    run, old = moved_run(run1, demo_shards, tmp_path)
    before = snapshot(run)
    manifest = old / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"samples_per_shard": 50', '"samples_per_shard": 51'))
    assert cli(["--resume", str(run), "--epochs", "2"]) == 2
    assert "its manifest.json differs" in one_line(capsys.readouterr().err, old)
    assert cli(["--resume", str(run), "--epochs", "2", "--shards", str(old)]) == 2  # the same, given
    assert "its manifest.json differs" in one_line(capsys.readouterr().err, old)
    assert snapshot(run) == before


def damage_in_place(pack: Path, split: str, row: int) -> bytes:
    """Flip a byte of one stored crop of `pack` (the same size, every manifest and index unchanged); returns the tar's
    bytes before, to put back."""
    rows = np.load(pack / split / "index.npy")
    tar = pack / split / f"{split}-{int(rows['shard'][row]):06d}.tar"
    before = tar.read_bytes()
    data = bytearray(before)
    data[int(rows["offset"][row]) + 100] ^= 0xFF
    tar.write_bytes(bytes(data))
    return before


@pytest.mark.slow
def test_resume_refuses_a_pack_rewritten_with_one_crop_changed(run1, demo_src, tmp_path, capsys):
    """The same source with one crop's pixels changed (same size) packed in place: every count and size is the
    same, the pack's identity is not."""
    from crackio import make_loader

    src = tmp_path / "src"
    shutil.copytree(demo_src, src)
    old = tmp_path / "old"
    saved = json.loads((run1 / "config.json").read_text())
    settings = PackSettings(samples_per_shard=50, workers=1, seed=0)
    pack(src, old, settings, progress=False)
    loader = make_loader(old, "train", batch_size=8, train=True, device="cpu")
    state = loader.state_dict()
    run = copy_run(run1, tmp_path / "run")
    (run / "config.json").write_text(json.dumps(saved | {"shards": str(old)}))
    ckpt = torch.load(run / "last.pt", weights_only=True)
    ckpt["pack"] = checkpoint.pack_fingerprint(*pack_identity(old))  # the run trained on `old` as first packed
    torch.save(ckpt, run / "last.pt")
    crop = next(p for p in sorted((src / "train").iterdir()) if p.suffix == ".jpg")
    jpeg = bytearray(crop.read_bytes())
    first = jpeg.index(b"\xff\xdb") + 5  # the first value of its quantization table: other pixels, the same size
    jpeg[first] = jpeg[first] % 254 + 1
    crop.write_bytes(bytes(jpeg))
    pack(src, old, settings, progress=False)
    before = snapshot(run)
    assert cli(["--resume", str(run), "--epochs", "2"]) == 2
    line = one_line(capsys.readouterr().err, old, f"--resume {run}")
    assert "the samples of split(s) train differ (same counts" in line
    assert snapshot(run) == before
    with pytest.raises(ValueError, match="the loader state is for .*pack"):
        make_loader(old, "train", batch_size=8, train=True, device="cpu").load_state_dict(state)


def pack_identity(pack_folder: Path) -> tuple[str, dict]:
    from crackio import open_pack

    opened = open_pack(pack_folder)
    return opened.sha256, opened.manifest


@pytest.mark.slow
def test_resume_refuses_another_runs_checkpoint(run1, demo_shards, tmp_path, capsys):
    """Another run's last.pt (trained with another --lr) copied into a run: refused, naming what differs and how to
    start from its weights instead."""
    run = copy_run(run1, tmp_path / "run")
    other = torch.load(run / "last.pt", weights_only=True)
    other["run_id"] = checkpoint.new_run_id()
    other["config"] = other["config"] | {"lr": 0.05}
    torch.save(other, run / "last.pt")
    before = snapshot(run)
    assert cli(["--resume", str(run), "--epochs", "2"]) == 2
    line = one_line(capsys.readouterr().err, run / "last.pt", "was written by another run")
    assert "lr 0.05 there" in line and f"--weights {run / 'last.pt'}" in line
    assert snapshot(run) == before
    del other["run_id"]  # a checkpoint that names no run at all
    torch.save(other, run / "last.pt")
    assert cli(["--resume", str(run), "--epochs", "2"]) == 2
    one_line(capsys.readouterr().err, run / "last.pt", "a run that recorded no identity")
    assert json.loads((run / "config.json").read_text())["run_id"] == torch.load(run1 / "last.pt")["run_id"]
    # The way on it names, without the architecture: the checkpoint says which one it was trained as.
    new = ["--shards", str(demo_shards), "--weights", str(run / "last.pt"), "--out", str(tmp_path / "new")]
    assert cli([*new, "--device", "cpu", "--head", "linear"]) == 2
    assert f"was trained as --arch {ARCH} --head linear" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_a_sample_changed_mid_epoch_saves_the_steps_done(demo_shards, tmp_path, capsys, backend):
    """A crop whose bytes change under a running epoch (same size: only its CRC32 tells) ends the run in one line,
    like a network fault: step.pt holds the whole steps before it, and once the pack is sound again the resumed run
    ends with the weights of a run never stopped."""
    from train.run.resume import read_config
    from train.run.setup import split_loader

    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    args = ["--shards", str(shards), *FLAGS[:-2], "--batch-size", "8", "--epochs", "1", "--workers", "1"]
    args += ["--backend", backend, "--checkpoint-every", "0"]
    assert cli([*args, "--out", str(tmp_path / "whole")]) == 0
    cfg = read_config(tmp_path / "whole").for_world(1)
    sixth = int(split_loader(cfg, "train", True, torch.device("cpu")).batches(0)[5][0])
    tar_before = damage_in_place(shards, "train", sixth)
    out = tmp_path / "cut"
    assert cli([*args, "--out", str(out)]) == 2
    line = one_line(capsys.readouterr().err, "does not match its checksum")
    done = re.search(f"{out / 'step.pt'} holds epoch 1 after (\\d+) samples", line)
    assert done and 0 < int(done[1]) <= 40  # the steps before the damaged batch (DALI reads a batch or two ahead)
    tar = shards / "train" / f"train-{int(np.load(shards / 'train' / 'index.npy')['shard'][sixth]):06d}.tar"
    tar.write_bytes(tar_before)
    assert cli(["--resume", str(out / "step.pt")]) == 0
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["model"]
    b = torch.load(out / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], v) for k, v in b.items())


@pytest.mark.slow
def test_a_checkpoint_without_a_pack_fingerprint_is_refused(run1, tmp_path, capsys):
    run = copy_run(run1, tmp_path / "run")
    ckpt = torch.load(run / "last.pt", weights_only=True)
    del ckpt["pack"]  # no crackio release ever wrote one without it
    torch.save(ckpt, run / "last.pt")
    before = snapshot(run)
    assert cli(["--resume", str(run)]) == 2
    one_line(capsys.readouterr().err, run / "last.pt", "records its pack in an unknown form")
    assert snapshot(run) == before


# ---- torchrun: a stopped rank


def child_with_rank(parent: int, rank: int) -> int | None:
    for task in Path(f"/proc/{parent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(pid)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks through /proc (Linux)")
def test_a_stopped_rank_ends_the_job_with_a_message(demo_shards, tmp_path):
    run, log = tmp_path / "ddp", tmp_path / "log.txt"
    cmd = [*torchrun(2), "-m", "train"]
    cmd += ["--shards", str(demo_shards), *FLAGS, "--epochs", "1", "--workers", "1", "--out", str(run)]
    cmd += ["--dist-timeout", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Rank 1 stops itself (SIGSTOP: it neither answers nor dies) in its second step; rank 0 goes on to wait for it.
    stop = StopPoint(tmp_path / "stop", call="train.run.engine:step_digest", nth=2, rank=1, tree=False)
    with open(log, "w") as f:
        proc = stop.start(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        assert child_with_rank(proc.pid, 1) == stop.pid, log.read_text()[-3000:]
        wait_for_line(log, "waiting for the other ranks failed", proc)
        stop.resume()  # torchrun's SIGTERM can now end it (torchrun would SIGKILL it in 30 s)
        proc.wait(timeout=300)  # a hang guard only
    finally:
        stop.kill()
    text = log.read_text()
    assert proc.returncode != 0
    errors = [line for line in text.splitlines() if "waiting for the other ranks failed" in line]
    assert errors and errors[0].startswith("error: rank 0: waiting for the other ranks failed"), text[-3000:]
    why = errors[0].split("failed (", 1)[1].split("):", 1)[0].lower()  # gloo's words, which depend on the collective
    # Rank 0 gave up after --dist-timeout, not gloo's default of 30 minutes: the error names the timeout.
    assert "--dist-timeout 5 s" in errors[0] and ("timed out" in why or "timeout" in why), errors[0]
    assert "[rank0]: Traceback" not in text


# ---- a start that fails leaves nothing behind


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--arch", "resnet-18"], "is not a torchvision classification model"),
        (["--batch-size", "4096"], "cannot fill one batch of 4096"),
        (["--weights", "{tmp}/missing.pt"], "no such file"),
        (["--val-split", "nowhere"], "--val-split 'nowhere' is not in"),
        (["--out", "{shards}/run"], "is inside the shards folder"),
        (["--negatives", "-1"], "--negatives must be >= 0"),
    ],
)
def test_a_failed_start_leaves_no_run_folder(demo_shards, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    args = ["--shards", str(demo_shards), *FLAGS, "--epochs", "1", "--out", str(out)]
    args += [f.format(tmp=tmp_path, shards=demo_shards) for f in flags]  # the later flag wins
    assert cli(args) == 2
    one_line(capsys.readouterr().err, message)
    assert not out.exists() and not (demo_shards / "run").exists()
