"""The one error policy of every command line (tools/pack.py, tools/propose.py, `python -m train` and its
subcommands): bad input as one line, Ctrl-C and SIGTERM as a clean stop, a bug as a traceback.

- A `CrackioError` (bad input or settings, a file that cannot be written: the message names the file
  and the fix) is printed as `error: ...`, exit 2.
- SIGINT and SIGTERM raise `Interrupted` in the main thread, so every `finally` runs (workers stopped,
  temporaries removed, loader threads joined); printed as one line, exit 128 + the signal number.
- Anything else is a bug (a DALI, CUDA or shape error): it keeps its traceback.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from crackio.errors import CrackioError


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread so that every `finally` runs (temporaries removed, loader
    threads joined); `note` says what was kept and how to continue."""

    def __init__(self, signum: int = signal.SIGINT, note: str = ""):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.note = int(signum), note


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted in the main thread while inside; a second signal acts as it
    would by default (Ctrl-C: KeyboardInterrupt; SIGTERM: the process ends at once). Nothing is installed
    outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


class StopRequest:
    """A signal recorded by `deferred_signals`: `signum` is 0 until SIGINT or SIGTERM arrives."""

    signum: int = 0


@contextlib.contextmanager
def deferred_signals() -> Iterator[StopRequest]:
    """Inside, the first SIGINT or SIGTERM is recorded (`request.signum`) instead of raised, so a loop can stop
    between two whole steps (the trainer saves a checkpoint there); a second one raises Interrupted at once, as
    `stop_on_signals` would. The handlers in place before are put back on leaving, and a signal recorded but
    not acted on is raised then (Interrupted). Outside the main thread nothing is installed and the request
    never fires."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def record(signum, _frame):
        if request.signum:
            raise Interrupted(signum)
        request.signum = signum

    previous = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    if request.signum:  # the body ended without acting on it
        raise Interrupted(request.signum)


def run_command(body: Callable[[], int | None], interrupted: Callable[[], str | None] = lambda: None) -> int:
    """Run a command's body under the error policy above; returns its exit code (None counts as 0).

    `interrupted()` gives the line printed after a signal when the interruption carries no note of its own
    (what is left and how to go on); it returns None to print nothing (e.g. on every rank but 0).
    """
    try:
        with stop_on_signals():
            return body() or 0
    except CrackioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        line = interrupted()
        if line is not None:
            note = e.note if isinstance(e, Interrupted) and e.note else line
            print(f"interrupted by {signal.Signals(signum).name}" + (f": {note}" if note else ""), file=sys.stderr)
        return 128 + signum


def incomplete(out: object) -> Callable[[], str]:
    """The line after an interrupted pack or proposal run into `out`."""
    return lambda: (
        f"{out} holds no complete output (workers stopped, temporaries removed); run the same command again to finish"
    )
