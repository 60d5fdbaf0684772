"""What a run reports while it trains: the console (a progress bar on a terminal, a line every N steps when output
goes to a file, the epoch lines only with --quiet) and the logs `--log tensorboard,csv` asks for.

Every log uses metrics.jsonl's names: per step `train_loss`, `lr`, `images_per_sec`, `data_wait_share` (under
`step/` in TensorBoard, RUN/steps.csv), per epoch the history row (under `epoch/`, RUN/epochs.csv), at the global
step of the epoch's last training step so both share one axis. TensorBoard's step axis starts at 0; steps.csv's
`step` counts from 1 as the console does (its last row is the number of steps taken). A resumed run drops what was
logged after its checkpoint (TensorBoard's purge_step; steps.csv is cut), so its logs read as an uninterrupted run's.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from crackio.errors import ConfigError
from crackio.fsio import write_text
from train.evaluation.mistakes import Mistakes, worst_figure

STEP_FIELDS = ("step", "epoch", "train_loss", "lr", "images_per_sec", "data_wait_share")


LINE_SECONDS = 25.0  # `lines` mode: a line after this long, however slow the steps (checked per step: <= ~30 s)


class Console:
    """The training pass's progress on rank 0: `bar` (tqdm on a terminal), `lines` (one line every `every` steps,
    and at least every LINE_SECONDS: what a file or a job log wants, not redraws) or `off` (--quiet, and every
    other rank)."""

    def __init__(self, mode: str, every: int):
        self.mode, self.every = mode, every
        self.desc, self.total, self.first = "", 0, 0
        self.last = time.monotonic()  # when the last line was shown

    @classmethod
    def for_run(cls, quiet: bool, every: int, rank: int) -> Console:
        if quiet or rank != 0:
            return cls("off", every)
        return cls("bar" if sys.stderr.isatty() else "lines", every)  # tqdm draws on stderr

    def wrap(self, batches: Iterable, total: int, first: int, desc: str) -> Iterable:
        self.desc, self.total, self.first = desc, total, first
        if self.mode != "bar":
            return batches
        from tqdm import tqdm

        self.bar = tqdm(batches, total=total, initial=first, desc=desc, unit="batch", leave=False)
        return self.bar

    def due(self, step: int) -> bool:
        """Whether step `step` (0-based in the epoch) shows a line: the pass's first (it started), then every
        `every` steps, and any step LINE_SECONDS or more after the last line."""
        if self.mode != "lines":
            return False
        return step == self.first or (step + 1) % self.every == 0 or time.monotonic() - self.last >= LINE_SECONDS

    def show(self, step: int, figures: dict[str, str]) -> None:
        if self.mode == "bar":
            self.bar.set_postfix(figures)
        elif self.due(step):
            said = " ".join(f"{k} {v}" for k, v in figures.items())
            print(f"{self.desc} step {step + 1}/{self.total}: {said}", file=sys.stderr, flush=True)
            self.last = time.monotonic()

    def beat(self, what: str, done: int, total: int) -> None:
        """A pass without steps of its own (validation): in `lines` mode, a line when LINE_SECONDS have gone by
        since the last one."""
        if self.mode == "lines" and time.monotonic() - self.last >= LINE_SECONDS:
            print(f"{what}: {done}/{total} batches", file=sys.stderr, flush=True)
            self.last = time.monotonic()

    def close(self) -> None:
        if self.mode == "bar":
            self.bar.close()


def tensorboard_writer():
    """torch's SummaryWriter class.

    Raises:
        ConfigError: the tensorboard package is not installed (crackio's `tensorboard` extra).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(
            f"--log tensorboard needs the tensorboard package ({e}): pip install 'crackio[tensorboard]', or drop it"
        ) from None
    return SummaryWriter


class TensorBoardLog:
    """RUN/tensorboard/: scalars, the validation PR curve and the epoch's worst mistakes (torch's SummaryWriter;
    the tensorboard package is imported only here, when --log asks for it)."""

    def __init__(self, out: Path, resume_step: int):
        self.writer = tensorboard_writer()(str(out / "tensorboard"), purge_step=resume_step or None)

    def steps(self, rows: list[dict]) -> None:
        for row in rows:
            for key in STEP_FIELDS[2:]:
                self.writer.add_scalar(f"step/{key}", row[key], row["step"])

    def epoch(self, step: int, history: list[dict], labels: np.ndarray, probs: np.ndarray, worst: dict | None) -> None:
        row = history[-1]
        for key, value in row.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(f"epoch/{key}", value, step)
        if row.get("slowest_stage"):  # a word, not a scalar: TensorBoard's text tab
            self.writer.add_text("epoch/slowest_stage", str(row["slowest_stage"]), step)
        self.writer.add_pr_curve("epoch/val_crack_pr", labels, probs, step)
        if worst:
            self.writer.add_figure("epoch/worst_mistakes", worst_figure(worst, row["epoch"]), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class CsvLog:
    """RUN/steps.csv (one row per training step, appended) and RUN/epochs.csv (the history, rewritten atomically
    after each epoch, as metrics.jsonl)."""

    def __init__(self, out: Path, resume_step: int):
        self.out, self.path = out, out / "steps.csv"
        kept: list[dict] = []
        if self.path.is_file():  # a resumed run: keep the `resume_step` steps its checkpoint holds, drop the rest
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit()]
            # A steps.csv of an older crackio counts from 0: renumbered, so that the file counts one way.
            first = 0 if rows and rows[0]["step"] == "0" else 1
            kept = [r | {"step": int(r["step"]) - first + 1} for r in rows if int(r["step"]) - first < resume_step]
        self._write_steps(kept)

    def _write_steps(self, rows: list[dict]) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=STEP_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.path, text.getvalue())

    def steps(self, rows: list[dict]) -> None:
        """The rows of `rows` (whose step counts from 0) with the step counted from 1, as the console counts."""
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=STEP_FIELDS)
            writer.writerows({k: row[k] for k in STEP_FIELDS} | {"step": row["step"] + 1} for row in rows)

    def epoch(self, step: int, history: list[dict], labels: np.ndarray, probs: np.ndarray, worst: dict | None) -> None:
        """epochs.csv from the whole history (its columns may grow, e.g. gpu_busy_share)."""
        fields = list(dict.fromkeys(k for row in history for k in row))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)
        write_text(self.out / "epochs.csv", text.getvalue())

    def close(self) -> None:
        pass


class RunLogs:
    """The logs of one run (rank 0; none elsewhere): per-step rows, per-epoch rows and validation results."""

    def __init__(self, names: tuple[str, ...], out: Path, resume_step: int, rank: int):
        self.logs: list[TensorBoardLog | CsvLog] = []
        if rank == 0:
            kinds: dict[str, type[TensorBoardLog] | type[CsvLog]] = {"tensorboard": TensorBoardLog, "csv": CsvLog}
            self.logs = [kinds[name](out, resume_step) for name in names]

    @property
    def wants_mistakes(self) -> bool:
        return any(isinstance(log, TensorBoardLog) for log in self.logs)

    def steps(self, rows: list[dict]) -> None:
        for log in self.logs:
            log.steps(rows)

    def epoch(self, step: int, history: list[dict], labels, probs, mistakes: Mistakes | None) -> None:
        worst = mistakes.found if mistakes else None
        for log in self.logs:
            log.epoch(step, history, labels, probs, worst)

    def close(self) -> None:
        for log in self.logs:
            log.close()
