"""Small shared builders for the trainer tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train.settings.run import RunSettings

ARCH = "shufflenet_v2_x0_5"  # ~10x cheaper than resnet18 on CPU
TINY_ARGS = ["--arch", ARCH, "--weights", "none", "--device", "cpu"]  # the CLI's flags for the same


def record_index(pack: Path, split: str = "train") -> None:
    """Record a split's index.npy, changed by a test, in the pack's manifest (its SHA-256), as a writer with a bug
    would: a pack consistent in its digests, for tests of the checks that come after them (rows, CRC32s)."""
    import hashlib

    manifest = json.loads((pack / "manifest.json").read_text())
    data = (pack / split / "index.npy").read_bytes()
    manifest["splits"][split]["index_sha256"] = hashlib.sha256(data).hexdigest()
    (pack / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def torchrun(ranks: int = 2) -> list[str]:
    """torchrun with `ranks` ranks on this machine, its rendezvous on a free port (two at once, as pytest-xdist's
    workers may start them, would otherwise both take 29500)."""
    from tools.servers import free_port

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--master-port",
        str(free_port()),
        "--nproc_per_node",
        str(ranks),
    ]


# History and log fields the clock decides (rates, waits, the loader's stage times, crackio.loading.stages): they
# differ between runs that are otherwise bit-identical.
TIMING = (
    "images_per_sec",
    "data_wait_share",
    "epoch_seconds",
    "train_seconds",
    "val_seconds",
    "batches_in_flight",
    "batches_ready",
    "handover_wait_ms",
    "slowest_stage",
)


def without_timing(rows) -> list[dict]:
    """History (or log) rows without the fields the clock decides (TIMING, and each loader stage's `stage_*`)."""
    return [{k: v for k, v in row.items() if k not in TIMING and not k.startswith("stage_")} for row in rows]


def tiny(shards, out, **kw) -> RunSettings:
    """A CPU run of the tiny architecture from scratch; keywords override."""
    base = dict(
        shards=str(shards),
        out=str(out),
        arch=ARCH,
        weights="none",
        head="linear",
        epochs=2,
        batch_size=16,
        device="cpu",
        backend="auto",
        workers=2,
        lr=1e-3,
    )
    return RunSettings.from_flat({**base, **kw})


def config(**kw) -> RunSettings:
    """A run's settings at their own defaults (on a pack named "x"), with keywords: what a test of the defaults
    builds."""
    return RunSettings.from_flat({"shards": "x", **kw})


def checkpoint_config(shards, **kw) -> RunSettings:
    """The settings an untrained tiny classifier's checkpoint records: its run 'trained' on `shards`."""
    return RunSettings.from_flat({"shards": str(shards), "arch": ARCH, "weights": "none", "head": "linear", **kw})


def save_untrained(path: Path, shards, model=None, seed: int | None = 0, **extra) -> Path:
    """RUN/best.pt of an untrained tiny classifier (or `model`) whose run trained on `shards`; `extra` keys added
    to the checkpoint (epoch, proposals). `seed`: torch's seed for the initial weights (None: left as it is)."""
    import torch

    from train.run.model import build_model

    if model is None:
        if seed is not None:
            torch.manual_seed(seed)
        model = build_model(ARCH, "none", "linear")
    cfg = checkpoint_config(shards).flat()
    torch.save({"model": model.state_dict(), "config": cfg, **extra}, path)
    return path


# ---- stop points: a child stopped at a known point, never a race against its progress

# Run in every Python process of the child (sitecustomize, through PYTHONPATH): once the point in stop.json is
# reached (a file matching a pattern written or renamed into place, or the nth call of a function), it records its
# PID in `stopped` (one process only, across forks and ranks) and stops itself (SIGSTOP), or every process of the
# child's tree (its workers, torchrun and its ranks). The library is not changed: the hook wraps builtins and
# module attributes from outside.
_HOOK = r"""
import builtins, fnmatch, io, json, os, signal, sys
from pathlib import Path

_here = Path(__file__).resolve().parent
_spec = json.loads((_here / "stop.json").read_text())


def _parent_of(pid):
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _tree(root):
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _stop():
    if _spec.get("rank") is not None and os.environ.get("RANK") != str(_spec["rank"]):
        return
    try:
        fd = os.open(_here / "stopped", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # another process (or an earlier call) stopped already
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    me = os.getpid()
    if _spec["tree"]:
        root = me  # the test's child: the ancestor the test started
        while _parent_of(root) not in (_spec["test"], 0, 1):
            root = _parent_of(root)
        for pid in _tree(root):
            if pid != me:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
    os.kill(me, signal.SIGSTOP)


if _spec.get("file"):
    _root, _pattern = _spec["root"], _spec["file"]

    def _written(path):
        try:
            rel = os.path.relpath(os.path.abspath(os.fsdecode(path)), _root)
        except (TypeError, ValueError):
            return
        if fnmatch.fnmatch(rel, _pattern):
            _stop()

    def _opener(real):
        def open_(file, mode="r", *args, **kw):
            f = real(file, mode, *args, **kw)
            if not isinstance(file, int) and any(c in mode for c in "wax+"):
                _written(file)
            return f
        return open_

    def _mover(real):
        def move(src, dst, *args, **kw):
            real(src, dst, *args, **kw)
            _written(dst)
        return move

    builtins.open = io.open = _opener(io.open)
    os.replace, os.rename = _mover(os.replace), _mover(os.rename)

if _spec.get("call"):
    _module, _name = _spec["call"].split(":")
    _calls = [0]

    def _patch(module):
        real = getattr(module, _name)

        def counted(*args, **kw):
            _calls[0] += 1
            if _calls[0] == _spec["nth"]:
                _stop()
            return real(*args, **kw)

        setattr(module, _name, counted)

    class _Finder:
        def find_spec(self, name, path=None, target=None):
            if name != _module:
                return None
            for finder in sys.meta_path:
                if finder is not self and hasattr(finder, "find_spec"):
                    found = finder.find_spec(name, path, target)
                    if found is not None:
                        break
            else:
                return None
            real_exec = found.loader.exec_module

            def exec_module(module):
                real_exec(module)
                _patch(module)

            found.loader.exec_module = exec_module
            return found

    sys.meta_path.insert(0, _Finder())
"""


class StopPoint:
    """A child command (a Python program, and every Python process it starts) that stops itself at a known point:
    after it writes or renames into place a file matching `file` (a pattern relative to `root`), or at the `nth`
    call of `call` ("module:function"); only in the process of torchrun rank `rank` when given. It stops every
    process of the child's tree (`tree`: the child, its workers; torchrun and its ranks) or itself alone. The child
    runs in a session of its own (a terminal's Ctrl-C reaches its process group, not pytest).

    `start()` returns once it is stopped there (every process of its tree, with `tree`); the test then sends
    what it tests (SIGKILL, SIGINT, ...) and `resume()`s it. It fails the test, never skips, when the command ends
    or hangs before that point: `timeout` only guards against a hang."""

    def __init__(self, folder: Path, *, file: str | None = None, root=None, call: str | None = None, nth: int = 1,
                 rank: int | None = None, tree: bool = True, timeout: float = 300):  # fmt: skip
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tree, self.timeout = tree, timeout
        spec = {"file": file, "root": str(Path(root).absolute()) if root else None, "call": call, "nth": nth}
        spec |= {"rank": rank, "tree": tree, "test": os.getpid()}
        (self.folder / "stop.json").write_text(json.dumps(spec))
        (self.folder / "sitecustomize.py").write_text(_HOOK)
        self.proc: subprocess.Popen | None = None

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.folder), env.get("PYTHONPATH", "")) if p)
        return env

    def start(self, cmd: list[str], env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
        self.proc = subprocess.Popen(cmd, env=self.env(env), start_new_session=True, **popen)
        self.pid = self.wait_stopped()
        return self.proc

    def wait_stopped(self) -> int:
        """The PID that stopped, once it (and, for a tree stop, every process of the tree) is stopped."""
        assert self.proc is not None
        mark = self.folder / "stopped"
        deadline = time.monotonic() + self.timeout
        while True:
            pid = int(mark.read_text() or 0) if mark.exists() else 0
            if pid and all(state in "Tt" for state in self._states(pid)):
                return pid
            if self.proc.poll() is not None:
                pytest.fail(f"the command ended (exit {self.proc.returncode}) before its stop point: {self.proc.args}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the command did not reach its stop point in {self.timeout} s (hung): {self.proc.args}")
            time.sleep(0.01)

    def _states(self, pid: int) -> list[str]:
        """The states (R, S, T, Z, ...) of `pid`, or of every process of the child's tree for a tree stop."""
        members = process_tree(self.proc.pid) if self.tree else [pid]
        return [s for s in (process_state(p) for p in members) if s is not None and s not in "ZX"] or ["?"]

    def members(self) -> list[int]:
        """The processes of the child's tree other than the child itself (its workers) while it is stopped."""
        return [p for p in process_tree(self.proc.pid) if p != self.proc.pid]

    def signal(self, signum: int, group: bool = False) -> None:
        """`signum` to the child, or to its process group (as a terminal's Ctrl-C)."""
        os.killpg(self.proc.pid, signum) if group else os.kill(self.proc.pid, signum)

    def resume(self) -> None:
        """Let the stopped processes go on (signals sent meanwhile are delivered now)."""
        for pid in process_tree(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def kill(self) -> None:
        """End whatever is left of the child's tree (after a failure)."""
        if self.proc is not None and self.proc.poll() is None:
            for pid in process_tree(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait()


def process_state(pid: int) -> str | None:
    """/proc's one-letter state of `pid` (R, S, T, Z, ...); None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def process_tree(root: int) -> list[int]:
    """`root` and the PIDs of every process descending from it (from /proc). The hook above has its own copy
    (`_tree`): it runs in the child as sitecustomize, which must not import the tests."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def kill_when(cmd: list[str], out: Path, pattern: str, folder: Path) -> StopPoint:
    """Run `cmd`, SIGKILL it (the main process, as the OOM killer does) once it has written a file matching
    `pattern` under `out`: stopped there, it cannot finish first. Returns the stop point."""
    stop = StopPoint(folder, file=pattern, root=out)
    stop.start(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert not (out / "manifest.json").exists()
    stop.signal(signal.SIGKILL)
    stop.proc.wait()
    return stop


def wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until the file `log` holds `text` (what the command prints at the event); fails if the command ends
    first, or if nothing comes in `timeout` seconds (a hang guard only)."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None and text not in log.read_text(errors="replace"):
            pytest.fail(
                f"the command ended (exit {proc.returncode}) before printing {text!r}: {log.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"nothing printed {text!r} in {timeout} s (hung): {log.read_text()[-3000:]}")
        time.sleep(0.05)


class FakeClock:
    """A stand-in for the `time` module of each of `modules`: monotonic() and perf_counter() read a virtual clock
    that only sleep() moves, at once; what it slept is kept in `slept`. Anything else is the real module's."""

    def __init__(self, monkeypatch, *modules):
        self.now = 0.0
        self.slept: list[float] = []
        for module in modules:
            monkeypatch.setattr(module, "time", self)

    def monotonic(self) -> float:
        return self.now

    perf_counter = monotonic

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def __getattr__(self, name):
        return getattr(time, name)
