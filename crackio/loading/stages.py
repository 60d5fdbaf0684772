"""Per-stage figures of one epoch of a loader: where its time goes, so a run that waits for data says why.

A batch goes through read (bytes from the shards, CRC-checked), decode (JPEG to pixels), augment (brightness,
flip, rotation) and normalize (to ImageNet-normalized float32, or nothing for uint8 output), in the backend's
worker threads, then the hand-over to the consumer. `StageStats` sums each stage's seconds over the threads as the
consumer receives each batch (every batch's own times travel with it: no counter is shared between threads, so
nothing is locked), the seconds the consumer was blocked waiting for a batch, and the batches in flight then. It
costs a few `time.perf_counter` calls per image (~0.1 us each against ~1 ms to decode one), read or not.

DALI runs decode, augmentation and normalization in one pipeline of its own threads, which crackio cannot time
stage by stage: its stages are `read` (crackio's external source, thread time) and `pipeline` (the consumer's
wait for DALI's output, which holds the rest). On CUDA, the torch backend's decode, augment and normalize are
the times to launch them (CUDA runs them asynchronously).
"""

from __future__ import annotations

from dataclasses import dataclass, field

STAGES = ("read", "decode", "augment", "normalize", "pipeline")
SLOW_WAIT = 0.05  # a run that waits for data more than this share of its time names its slowest stage


@dataclass
class StageStats:
    """One epoch's figures: `busy` seconds per stage (summed over the worker threads), `images` and `batches`
    handed over, `waited` seconds the consumer was blocked on the next batch, `in_flight` batches queued or being
    made summed over the hand-overs, `workers` threads doing the stages."""

    workers: int = 1
    busy: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    images: int = 0
    batches: int = 0
    waited: float = 0.0
    in_flight: int = 0

    def add(self, times: dict[str, float], images: int, waited: float, in_flight: int) -> None:
        """One batch handed over: its stages' seconds, its size, the consumer's wait for it, batches in flight."""
        for stage, seconds in times.items():
            self.busy[stage] += seconds
        self.images += images
        self.batches += 1
        self.waited += waited
        self.in_flight += in_flight

    def per_image_ms(self) -> dict[str, float]:
        """Milliseconds of thread time per image in each stage that ran (a stage no backend step used is left out)."""
        return {s: 1000 * t / max(self.images, 1) for s, t in self.busy.items() if t > 0}

    def slowest(self) -> str | None:
        """The stage with the most thread time (None before any batch)."""
        ran = self.per_image_ms()
        return max(ran, key=ran.__getitem__) if ran else None

    def row(self) -> dict:
        """The epoch's figures under metrics.jsonl's names: `stage_<name>_ms` per image, `batches_in_flight` (the
        mean at a hand-over), `handover_wait_ms` per batch, `slowest_stage`."""
        out: dict = {f"stage_{s}_ms": round(v, 4) for s, v in self.per_image_ms().items()}
        if self.batches:
            out["batches_in_flight"] = round(self.in_flight / self.batches, 2)
            out["handover_wait_ms"] = round(1000 * self.waited / self.batches, 3)
        slowest = self.slowest()
        return out | ({"slowest_stage": slowest} if slowest else {})

    def describe(self) -> str:
        """In words, for the epoch line: the slowest stage, and each stage's share of the threads' time."""
        ran = self.per_image_ms()
        if not ran:
            return "no batch yet"
        total = sum(ran.values())
        slowest = max(ran, key=ran.__getitem__)
        parts = ", ".join(f"{s} {100 * v / total:.0f}%" for s, v in ran.items())
        return (
            f"slowest stage {slowest} ({ran[slowest]:.2f} ms per image over {self.workers} thread"
            f"{'s' if self.workers != 1 else ''}; {parts}; {self.in_flight / max(self.batches, 1):.1f} batches "
            f"in flight)"
        )
