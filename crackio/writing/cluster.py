"""The heavy stages on a Ray cluster (`--ray ADDRESS`): the proposal stage's photo chunks and shards as Ray tasks,
detection's photos on model actors (train.detection).

Ray is the engine the field runs preprocessing and batch inference on; crackio schedules nothing of its own.
What crackio asks of the cluster:
- every node has crackio and its dependencies installed (the same version as the driver's), as for any Ray job;
- every node reads the photos and writes OUT at the same path: a shared folder (NFS, a mounted bucket), or one
  machine's cluster. The driver resolves OUT and the photos to absolute paths before handing them to tasks;
- a task is pure: it writes whole files atomically (crackio.fsio.atomic_write), so Ray's retry of a task whose
  node was lost (`max_retries`) writes the same bytes, and a finished task's files are recorded for resume
  (crackio.writing.spool, crackio.writing.splits).

ADDRESS: `auto` (the cluster RAY_ADDRESS names, or one already running on this machine), `local` (start one
on this machine for this run, stopped at the end), or `HOST:PORT` of a head node (`ray start --head` prints it).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from crackio.cli import optional_module
from crackio.errors import ConfigError

ADDRESS = re.compile(r"auto|local|(?:ray://)?[A-Za-z0-9_.\[\]:-]+:[0-9]{1,5}")


def check_address(address: str) -> str:
    """`address` as given, when it is one --ray takes.

    Raises:
        ConfigError: naming the three forms.
    """
    port = address.rpartition(":")[2]
    if not ADDRESS.fullmatch(address) or (port.isdigit() and not 0 < int(port) < 65536):
        raise ConfigError(
            f"--ray {address!r}: give auto (the cluster RAY_ADDRESS names, or one running on this machine), local "
            "(start one here for this run) or HOST:PORT of the head node (`ray start --head` prints it)"
        )
    return address


def ray_module():
    """Ray, imported.

    Raises:
        ConfigError: it is not installed, saying how to install it.
    """
    return optional_module("ray", "--ray", "ray")


class RayCluster:
    """A connection to a Ray cluster for one run: `with RayCluster("local") as cluster: cluster.run(fn, tasks)`.

    Raises (on entry):
        ConfigError: Ray is not installed, or no cluster answers at the address (naming it and what to start).
    """

    def __init__(self, address: str):
        self.address = check_address(address)
        self.ray = ray_module()
        self._remote: dict[Callable, Any] = {}

    def __enter__(self) -> RayCluster:
        ray = self.ray
        options: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
        if self.address == "local":
            options["include_dashboard"] = False
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no report sent home from a machine that has no net
        self._check_reachable()
        # Ray's driver installs its own SIGTERM handler (a stack dump, exit 1): crackio's (crackio.cli.stop_on_signals:
        # one line, exit 143, a re-run resumes) stays the one in force.
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            ray.init(address=self.address, **options)
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"--ray {self.address}: no Ray cluster could be reached ({first}): start one with `ray start --head` "
                "(and `ray start --address HEAD:PORT` on each worker node), or give --ray local to start one on this "
                "machine for this run"
            ) from None
        finally:
            if threading.current_thread() is threading.main_thread():
                for sig, handler in handlers.items():
                    if handler is not None:
                        signal.signal(sig, handler)
        return self

    def largest_node_cpus(self) -> int:
        """The most CPUs one live node of the cluster has (an actor needing more is never scheduled)."""
        return max((int(n.get("Resources", {}).get("CPU", 0)) for n in self.ray.nodes() if n.get("Alive")), default=0)

    def _check_reachable(self, timeout: float = 5.0) -> None:
        """Fail in seconds, not after Ray's minutes of retries, when nothing listens at HOST:PORT.

        Raises:
            ConfigError: naming the address and what to start.
        """
        address = os.environ.get("RAY_ADDRESS", "") if self.address == "auto" else self.address
        if not ADDRESS.fullmatch(address) or address in ("auto", "local") or address.startswith("ray://"):
            return  # auto without RAY_ADDRESS: Ray looks for a cluster on this machine, and says at once if none
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        except (OSError, ValueError) as e:
            named = self.address if address == self.address else f"{self.address} (RAY_ADDRESS {address})"
            raise ConfigError(
                f"--ray {named}: nothing answers there ({getattr(e, 'strerror', None) or e}): start the head node with "
                f"`ray start --head --port {port}` (it prints the address), or give --ray local to start one on this "
                "machine for this run"
            ) from None

    def __exit__(self, *exc) -> None:
        # A local cluster's processes, stopped here, can deliver SIGINT to this process group: the interruption in
        # flight (SIGTERM, say) stays the one reported.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            self.ray.shutdown()
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)

    def cpus(self) -> int:
        """The cluster's CPUs (what a stage's tasks spread over, one CPU each)."""
        return int(self.ray.cluster_resources().get("CPU", 1))

    def nodes(self) -> int:
        return sum(1 for n in self.ray.nodes() if n.get("Alive"))

    def run(
        self,
        fn: Callable[..., Any],
        tasks: Sequence[Any],
        progress: Callable[[int], Any] | None = None,
        weights: Sequence[int] | None = None,
    ) -> Iterator[Any]:
        """`fn(task)` for every task as a Ray task of one CPU, yielded in task order (a crackio.writing.workers.Runner,
        as `processes` runs them). `progress(w)` is called as each task finishes, with its weight
        (`weights`, e.g. its photos; 1 when none), in the order they finish. A task whose node is lost is retried
        by Ray (up to 3 times).

        Raises:
            the task's own exception (a crackio error stays one line); KeyboardInterrupt after cancelling the rest.
        """
        ray = self.ray
        if fn not in self._remote:
            inner: Any = getattr(fn, "func", fn)  # a function, or a partial of one
            name = getattr(fn, "__name__", None) or inner.__name__
            self._remote[fn] = ray.remote(num_cpus=1, max_retries=3)(_call).options(name=name)
        remote = self._remote[fn]
        refs = [remote.remote(fn, task) for task in tasks]
        weight = dict(zip(refs, weights or [1] * len(refs)))
        waiting = list(refs)
        try:
            for ref in refs:
                while waiting and ref in waiting:
                    done, waiting = ray.wait(waiting, num_returns=1, timeout=1.0)
                    for d in done:
                        if progress:
                            progress(weight[d])
                yield _get(ray, ref)
        except BaseException:
            for ref in waiting:
                ray.cancel(ref, force=True)
            raise


def _call(fn: Callable, task: Any) -> Any:
    return fn(task)


def _get(ray, ref) -> Any:
    """A task's result; its own exception raised as itself (not wrapped in Ray's with a remote traceback)."""
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise
