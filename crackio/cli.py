"""The one error policy of every command line (tools/pack.py, tools/propose.py, `python -m train` and its
subcommands): bad input as one line, Ctrl-C and SIGTERM as a clean stop, a bug as a traceback.

- A `CrackioError` (bad input or settings, a file that cannot be written: the message names the file
  and the fix) is printed as `error: ...`, exit 2.
- SIGINT and SIGTERM raise `Interrupted` in the main thread, so every `finally` runs (workers stopped,
  temporaries removed, loader threads joined); printed as one line, exit 128 + the signal number.
- Anything else is a bug (a DALI, CUDA or shape error): it keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
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
        global _received
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _received = signum  # a library that turns the exception into its own (Ray's ray.get) cannot lose it
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
    global _received
    _received = 0
    try:
        with stop_on_signals():
            return body() or 0
    except CrackioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit:
        if not _received:  # a real exit, not a signal another library turned into one
            raise
        return _interrupted(Interrupted(_received), interrupted)
    except KeyboardInterrupt as e:
        return _interrupted(e, interrupted)


_received = 0  # the signal stop_on_signals last received (0: none)


def _interrupted(e: KeyboardInterrupt, interrupted: Callable[[], str | None]) -> int:
    """run_command's line and exit code after an interruption."""
    signum = e.signum if isinstance(e, Interrupted) else (_received or signal.SIGINT)
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


def closest(word: str, choices) -> str:
    """ "; did you mean 'x'?" for the valid choice closest to a mistyped `word` (difflib's ratio >= 0.6), else ""."""
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


def typed(value: object) -> str:
    """A default as a user would read it on the command line: none (None), not given (an empty string: the help
    says what that means), true/false."""
    if value == "":
        return "not given"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return " ".join(typed(v) for v in value) or "none"
    return str(value)


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default as typed (`typed`; a flag's is off), or says it is required."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.required and action.option_strings:
            return f"{text} (required)".strip()
        shown = "(default" in text or not action.option_strings
        if shown or action.default is argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            return text
        default = ("on" if action.default else "off") if action.nargs == 0 else typed(action.default)
        return f"{text} (default: {default})".strip().replace("%", "%%")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with every command's conventions: defaults in --help (HelpFormatter), the closest valid name for a
    mistyped choice or option, and no abbreviated options (a prefix is a typo, not a choice)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # --checkpoint must not become --checkpoint-every, nor --lr-s a flag
        super().__init__(*args, **kwargs)

    def _check_value(self, action: argparse.Action, value) -> None:
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(str, action.choices))
            hint = closest(value, action.choices)
            raise argparse.ArgumentError(action, f"invalid choice: {value!r}{hint} (choose from {choices})")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            flags = [flag for action in self._actions for flag in action.option_strings]
            hints = "".join(closest(e.split("=", 1)[0], flags) for e in extras if e.startswith("-"))
            self.error(f"unrecognized arguments: {' '.join(extras)}{hints}")
        return parsed


class _Lines:
    """A file for tqdm that turns its redraws ("\\r" + the bar) into whole lines, each at most once: what a log file
    or a job's output should hold instead of thousands of carriage returns."""

    def __init__(self, stream) -> None:
        self.stream, self.last = stream, ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line and line != self.last:
            self.stream.write(line + "\n")
            self.last = line

    def flush(self) -> None:
        self.stream.flush()


def optional_module(name: str, needed_by: str, extra: str):
    """The optional dependency `name`, imported for `needed_by` (an option, e.g. "--ray").

    Raises:
        ConfigError: it is not installed, with the one command that installs it (`pip install 'crackio[extra]'`).
    """
    import importlib

    from crackio.errors import ConfigError

    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(
            f"{needed_by} needs {name}, which is not installed here: pip install 'crackio[{extra}]'"
        ) from None


def progress_bar(*args, **kwargs):
    """tqdm, as every long command shows progress: a bar on a terminal; into a file or a pipe, instead of redraws,
    a line at the first update 25 s (`mininterval`) after the last one: none more often, and within ~30 s while
    the work advances (a job log never looks hung)."""
    from tqdm import tqdm

    if not sys.stderr.isatty():
        kwargs = {**kwargs, "file": _Lines(sys.stderr), "mininterval": 25.0, "dynamic_ncols": False, "ncols": 100}
    return tqdm(*args, **kwargs)


# OpenMP's waiting threads spin 300,000 times (libgomp's default) before they sleep. Where other jobs keep the cores
# busy, torch's intra-op threads then burn the cores they wait for: 7-8 img/s where one thread trains at 21; 10,000
# spins keep 96% of the idle speed and 92% of the best under load (docs/performance.md, "CPU threads").
OPENMP_SPIN = "10000"


def openmp_for_shared_cores() -> None:
    """Let OpenMP's idle threads sleep soon (GOMP_SPINCOUNT), unless the user chose a policy (OMP_WAIT_POLICY,
    GOMP_SPINCOUNT). Call before torch is imported: libgomp reads the variables when it loads."""
    import os

    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN
