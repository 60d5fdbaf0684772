"""Per-stage figures of one epoch of a loader: where its time goes, so a run that waits for data says why.

A batch goes through read (bytes from the shards, CRC-checked), decode (JPEG to pixels), augment (flip and
rotation; for uint8 output the brightness too) and normalize (float32 output: the brightness and the ImageNet
normalization, one lookup; eval: the normalization alone), in the backend's worker threads, then the hand-over to
the consumer. `StageStats` sums each stage's seconds over the threads as the consumer receives each batch (every
batch's own times travel with it: no counter is shared between threads, so nothing is locked), the seconds the
consumer was blocked waiting for a batch, and at each hand-over the batches in flight (queued or being made) and,
of them, the batches ready (made whole): a loader that starves its consumer hands over with none ready. It costs a
few `time.perf_counter` calls per image (~0.1 us each against ~0.2 ms to decode one), read or not.

DALI runs decode, augmentation and normalization in one pipeline of its own threads, which crackio cannot time
stage by stage: its stages are `read` (crackio's external source, thread time) and `pipeline`, which is not
thread time but the consumer's wait for DALI's output (it holds the rest); DALI's queue is its own, so neither
batches in flight nor ready are counted. On CUDA, the torch backend's decode, augment and normalize are the times
to launch them (CUDA runs them asynchronously).
"""

from __future__ import annotations

from dataclasses import dataclass, field

STAGES = ("read", "decode", "augment", "normalize", "pipeline")
SLOW_WAIT = 0.05  # a run that waits for data more than this share of its time names its slowest stage


WAITED = ("pipeline",)  # stages timed as the consumer's wait for them, not as thread time


@dataclass
class StageStats:
    """One epoch's figures: `busy` seconds per stage (summed over the worker threads), `images` and `batches`
    handed over, `waited` seconds the consumer was blocked on the next batch, `in_flight` batches queued or being
    made and `ready` of them made whole, each summed over the hand-overs (`counted` of them: a backend whose queue
    is not its own counts none), `workers` threads doing the stages."""

    workers: int = 1
    busy: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    images: int = 0
    batches: int = 0
    waited: float = 0.0
    in_flight: int = 0
    ready: int = 0
    counted: int = 0

    def add(
        self, times: dict[str, float], images: int, waited: float, in_flight: int | None = None, ready: int = 0
    ) -> None:
        """One batch handed over: its stages' seconds, its size, the consumer's wait for it, and the batches in
        flight and ready just before (None: not known to this backend)."""
        for stage, seconds in times.items():
            self.busy[stage] += seconds
        self.images += images
        self.batches += 1
        self.waited += waited
        if in_flight is not None:
            self.in_flight += in_flight
            self.ready += ready
            self.counted += 1

    def per_image_ms(self) -> dict[str, float]:
        """Milliseconds per image in each stage that ran (a stage no backend step used is left out): thread time,
        or for the WAITED stages the consumer's wait."""
        return {s: 1000 * t / max(self.images, 1) for s, t in self.busy.items() if t > 0}

    def slowest(self) -> str | None:
        """The stage with the most time per image (None before any batch)."""
        ran = self.per_image_ms()
        return max(ran, key=ran.__getitem__) if ran else None

    def row(self) -> dict:
        """The epoch's figures under metrics.jsonl's names: `stage_<name>_ms` per image, `handover_wait_ms` per
        batch, `batches_in_flight` and `batches_ready` (means at a hand-over, where counted), `slowest_stage`."""
        out: dict = {f"stage_{s}_ms": round(v, 4) for s, v in self.per_image_ms().items()}
        if self.batches:
            out["handover_wait_ms"] = round(1000 * self.waited / self.batches, 3)
        if self.counted:
            out["batches_in_flight"] = round(self.in_flight / self.counted, 2)
            out["batches_ready"] = round(self.ready / self.counted, 2)
        slowest = self.slowest()
        return out | ({"slowest_stage": slowest} if slowest else {})

    def describe(self) -> str:
        """In words, for the epoch line: the slowest stage, and each stage's time per image."""
        ran = self.per_image_ms()
        if not ran:
            return "no batch yet"
        slowest = max(ran, key=ran.__getitem__)
        threads = f"{self.workers} thread{'s' if self.workers != 1 else ''}"
        how = lambda s: "the consumer's wait" if s in WAITED else f"over {threads}"  # noqa: E731
        parts = ", ".join(f"{s} {v:.2f}" for s, v in ran.items())
        queue = (
            f"; {self.ready / self.counted:.1f} of {self.in_flight / self.counted:.1f} batches in flight ready at a "
            f"hand-over"
            if self.counted
            else ""
        )
        return (
            f"slowest stage {slowest} ({ran[slowest]:.2f} ms per image, {how(slowest)}; ms per image: {parts}{queue})"
        )
