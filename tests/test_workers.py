"""Writing-stage workers die with their parent: a `kill -9` of pack or propose (what the OOM killer does)
leaves no worker holding OUT's lock, so the re-run starts at once and writes the same bytes."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crackio.writing.outdir import LOCK, WRITTEN
from tests.conftest import ROOT
from tests.helpers import StopPoint

# A worker of a killed parent dies (prctl: at once; elsewhere: 0.2 s polls); this only guards against a hang.
ALIVE_SECONDS = 60


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            found |= {int(c) for c in Path(path).read_text().split()}
        except OSError:
            pass  # the thread ended meanwhile
    return found


def _start_time(pid: int) -> str | None:
    """The process's start time (tells a reused PID apart); None once it is gone or a zombie (holds no files)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZXx" else fields[19]


def _kill_with_workers(cmd: list[str], out: Path, pattern: str, folder: Path) -> dict[int, str]:
    """Run `cmd` until its workers write a file matching `pattern` under `out` (stopped there, workers and all),
    then SIGKILL the parent alone; returns the workers seen before the kill, {pid: start time}."""
    stop = StopPoint(folder, file=pattern, root=out)
    stop.start(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        children = _children(stop.proc.pid)
        workers = {pid: started for pid in children if (started := _start_time(pid)) is not None}
        assert len(workers) == 2 and not (out / "manifest.json").exists(), workers
    finally:
        os.kill(stop.proc.pid, signal.SIGKILL)
        stop.proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(stop.proc.pid, signal.SIGCONT)  # a surviving worker would sleep on stopped: fail, not hang
    return workers


def _assert_workers_die(workers: dict[int, str]) -> None:
    deadline = time.monotonic() + ALIVE_SECONDS
    alive = set(workers)
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if _start_time(pid) == workers[pid]}
        time.sleep(0.02)
    for pid in alive:  # without the fix: end the orphans this test made, so they release the lock
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"workers {sorted(alive)} outlived their killed parent by {ALIVE_SECONDS} s"


def _digests(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in (LOCK, WRITTEN)
    }


def _rerun_matches_fresh_run(cmd: list[str], out: Path, fresh: Path) -> None:
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # at once: nothing holds OUT
    assert again.returncode == 0, again.stderr
    into_fresh = [str(fresh) if arg == str(out) else arg for arg in cmd]
    ref = subprocess.run(into_fresh, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    assert _digests(out) == _digests(fresh)


@pytest.mark.slow
def test_pack_workers_die_with_a_killed_parent(demo_src, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "tools" / "pack.py"), str(demo_src), "--samples-per-shard", "20", "--workers"]
    cmd += ["2", "--out", str(out), "--quiet"]
    workers = _kill_with_workers(cmd, out, "*/*.tar*", tmp_path / "stop")  # a shard's temporary: workers writing
    _assert_workers_die(workers)
    _rerun_matches_fresh_run(cmd, out, tmp_path / "fresh")


@pytest.mark.slow
def test_propose_workers_die_with_a_killed_parent(demo_photos, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "tools" / "propose.py"), str(demo_photos / "coco"), "--format"]
    cmd += ["coco", "--max-proposals", "40", "--samples-per-shard", "10", "--workers", "2", "--out", str(out)]
    cmd += ["--quiet"]
    workers = _kill_with_workers(cmd, out, "*/*.tar*", tmp_path / "stop")  # the shard-writing workers are running
    _assert_workers_die(workers)
    _rerun_matches_fresh_run(cmd, out, tmp_path / "fresh")
