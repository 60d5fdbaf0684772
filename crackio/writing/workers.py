"""Worker processes for the writing stages (pack, propose): ordered results, progress, a prompt clean stop.

Why processes: a thread pool tops out near one core, because Python's per-sample work
(tar headers, metadata, bookkeeping) holds the GIL between the decodes that release it.
Each worker writes whole shards, so nothing per sample crosses a process boundary.

Why `fork`: `spawn` and `forkserver` start each worker by re-running the user's main
module, and users call `pack` from scripts without a `__main__` guard, from `python -c`
and from notebooks; a forked worker starts from the caller's memory and re-runs nothing.

Stopping: workers ignore SIGINT (a terminal's Ctrl-C reaches the whole process group);
the parent sets a shared event on Ctrl-C, SIGTERM (see `crackio.cli.stop_on_signals`) or any
error, each worker stops at its next sample (`check_stop`), removes its temporary and
returns, and the parent re-raises. A worker whose parent died stops the same way.

A parent killed outright (`kill -9`, the OOM killer) runs none of that: its workers would
sleep on, an idle one forever, holding the inherited lock on OUT (crackio.writing.outdir),
so the re-run is refused. Each worker therefore dies with its parent (`_die_with_parent`).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Runner(Protocol):
    """What runs a writing stage's tasks: `run(fn, tasks, progress)` yields `fn(task)` in task order. Worker
    processes on this machine (`processes`) or a Ray cluster (crackio.writing.cluster.RayCluster.run)."""

    def __call__(
        self, fn: Callable[[Any], Any], tasks: Sequence[Any], progress: Callable[[int], None] | None = None
    ) -> Iterator[Any]: ...


def processes(workers: int) -> Runner:
    """A Runner of `workers` forked processes on this machine (`run_ordered`)."""

    def run(fn, tasks, progress=None):
        return run_ordered(fn, tasks, workers, progress)

    return run


class Stopped(Exception):
    """Raised inside a worker when the run is stopping; the parent raises the original cause."""


class _Local:
    """Stand-ins for the shared event and counter when tasks run in the calling process."""

    def __init__(self) -> None:
        self.value = 0

    def is_set(self) -> bool:
        return False

    def get_lock(self):
        return contextlib.nullcontext()


_stop = _Local()
_done = _Local()
_parent = 0


def _init(stop, done, parent: int) -> None:
    global _stop, _done, _parent
    # What the worker inherited is never collected in it (only what it makes itself): the parent's objects belong
    # to the parent's threads, and untouched pages stay shared (the use gc.freeze's documentation gives).
    gc.freeze()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _stop, _done, _parent = stop, done, parent
    _die_with_parent(parent)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    """End this worker at once when `parent` dies, busy or idle (blocked waiting for a task).

    A parent killed by SIGKILL (the OOM killer) cannot stop its workers, and they hold the
    lock on OUT through the file descriptor they inherited; dead, they release it. Linux:
    the kernel sends SIGKILL when the thread that forked this worker ends, i.e. the thread
    iterating `run_ordered` (pack and propose iterate it to the end in one thread). Elsewhere
    a thread polls the parent's PID.
    """
    armed = False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="crackio-parent").start()
    if os.getppid() != parent:  # died before prctl: no signal will come
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)


def check_stop() -> None:
    """Call once per sample inside a task: raises `Stopped` when the run is stopping or the parent is gone."""
    if _stop.is_set() or (_parent and os.getppid() != _parent):
        raise Stopped


def tick(n: int = 1) -> None:
    """Count `n` finished samples for the parent's progress bar."""
    with _done.get_lock():
        _done.value += n


def run_ordered(
    fn: Callable[[T], R], tasks: Sequence[T], workers: int, progress: Callable[[int], None] | None = None
) -> Iterator[R]:
    """`fn(task)` for every task, yielded in task order; at most 2 x workers tasks in flight.

    `workers` <= 1 (or a single task) runs in this process. `progress(n)` is called with the
    number of samples finished so far (`tick`). `fn` and the tasks must be picklable results-wise:
    a task's return value travels back through a pipe.

    Raises:
        whatever a task raised (the first, in task order), after every worker has stopped;
        KeyboardInterrupt and SystemExit likewise, once the workers are gone.
    """
    global _done
    if workers <= 1 or len(tasks) <= 1:
        _done = _Local()
        for task in tasks:
            result = fn(task)
            if progress:
                progress(_done.value)
            yield result
        return
    # Garbage that is a reference cycle is freed here, in the process whose libraries' threads it may wait on (an
    # ONNX Runtime session's pool, say): a forked worker collecting it would wait for threads fork did not copy.
    gc.collect()
    context = multiprocessing.get_context("fork")
    stop, done = context.Event(), context.Value("q", 0)
    with ProcessPoolExecutor(
        min(workers, len(tasks)), mp_context=context, initializer=_init, initargs=(stop, done, os.getpid())
    ) as pool:
        pending: deque = deque()
        queued = iter(tasks)
        try:
            for task in queued:
                pending.append(pool.submit(fn, task))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                while not pending[0].done():
                    wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                    if progress:
                        progress(done.value)
                yield pending.popleft().result()
                for task in queued:
                    pending.append(pool.submit(fn, task))
                    break
        except BaseException:
            stop.set()  # every worker stops at its next sample and removes its temporary
            for future in pending:
                future.cancel()
            raise
        finally:
            if progress:
                progress(done.value)
