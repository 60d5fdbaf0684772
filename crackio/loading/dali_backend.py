"""DALI backend: sampler-driven external source -> decode -> augment -> normalize.

One pipeline definition serves GPU (nvJPEG `mixed` decode, augmentation on the GPU)
and CPU (`device_id=None`, libjpeg-turbo), train and eval (a flag). The source hands
DALI each batch's JPEG bytes (read by offset through the index), the row ids and the
augmentation parameters; labels, IoUs and names are looked up in bulk from the index
by those ids, so nothing is parsed per sample.

Why an external source rather than `fn.readers.webdataset`: the reader shuffles
inside a buffer, has no notion of our samplers (hard negatives, strata, weights) and
its epoch order cannot be recomputed for a resume; the index gives every sampler,
exact epochs and (seed, epoch, rank)-pure orders through one path, and reading
bytes by offset costs ~10 us per image against ~1-3 ms to decode it on a CPU core.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from time import perf_counter
from typing import Any

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray

from crackio.loading.augment import MEAN, STD, AugmentParams
from crackio.loading.readers import Reader
from crackio.loading.stages import StageStats


@pipeline_def(enable_conditionals=False)
def proposal_pipeline(source, train: bool, gpu: bool, uint8: bool = False):
    dtypes = [types.UINT8, types.INT64] + ([types.FLOAT, types.INT32, types.FLOAT] if train else [])
    jpegs, ids, *aug = fn.external_source(source=source, num_outputs=len(dtypes), batch=True, dtype=dtypes)
    images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
    if train:
        brightness, flip, angle = aug
        images = fn.brightness(images, brightness=brightness)
        images = fn.flip(images, horizontal=flip)
        images = fn.rotate(images, angle=angle, keep_size=True, fill_value=0, interp_type=types.INTERP_NN)
    if uint8:  # normalization left to the consumer's device (crackio.loading.augment.normalize)
        return fn.transpose(images, perm=[2, 0, 1]), ids
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", mean=[m * 255 for m in MEAN], std=[s * 255 for s in STD]
    )
    return images, ids


class _EpochSource:
    """Batch-mode source: the current epoch's batches, then StopIteration."""

    def __init__(self, reader: Reader):
        self.reader = reader
        self.batches: Iterator = iter(())
        self.read_seconds: list[float] = []  # each batch's read, in order (DALI calls the source in batch order)

    def __call__(self):
        ids, params = next(self.batches)  # StopIteration ends DALI's epoch
        t0 = perf_counter()
        jpegs = [np.frombuffer(b, dtype=np.uint8) for b in self.reader.read(ids)]
        self.read_seconds.append(perf_counter() - t0)
        aug = () if params is None else (params.brightness, params.flip, params.angle)
        return jpegs, ids.astype(np.int64).reshape(-1, 1), *aug


class DaliBackend:
    def __init__(
        self,
        reader: Reader,
        batch_size: int,
        train: bool,
        device: torch.device,
        num_threads: int,
        seed: int,
        output: str = "float32",
    ):
        self.device = device
        self.dtype = torch.uint8 if output == "uint8" else torch.float32
        self.source = _EpochSource(reader)
        gpu = device.type == "cuda"
        self._make = lambda: proposal_pipeline(
            source=self.source,
            train=train,
            gpu=gpu,
            uint8=output == "uint8",
            batch_size=batch_size,
            num_threads=num_threads,
            device_id=(device.index or 0) if gpu else None,
            seed=seed,
            prefetch_queue_depth=2,
        )
        self.pipe: Any = None  # built on the first epoch (DALI is untyped: see pyproject's mypy section)
        self.stages = StageStats(num_threads)  # the current (or last) epoch's per-stage figures
        self._clean = False  # True once the last epoch ran to its end

    def run_epoch(
        self, batches: Sequence[np.ndarray], params: Iterable[AugmentParams | None]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images NCHW on the device, ids int64) for each batch, in order (crackio.loading.loader.Backend)."""
        self.source.batches = zip(batches, params)
        self.source.read_seconds = []
        stats = self.stages = StageStats(self.stages.workers)
        if self._clean:
            self.pipe.reset()  # after StopIteration, DALI starts the next epoch on reset
        else:  # first epoch, or the last one was abandoned with batches still prefetched
            self.pipe = self._make()
            self.pipe.build()
        self._clean = False
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        while True:
            t0 = perf_counter()
            try:
                images, ids = self.pipe.run()
            except StopIteration:
                self._clean = True
                return
            waited = perf_counter() - t0
            # DALI's source runs in the pipeline's prefetch: batch k's read is the k-th recorded.
            read = self.source.read_seconds[stats.batches] if stats.batches < len(self.source.read_seconds) else 0.0
            rows = torch.from_numpy(np.array(ids.as_tensor()).reshape(-1))
            stats.add({"read": read, "pipeline": waited}, len(rows), waited)  # DALI's queue is its own: not counted
            images = images.as_tensor()
            out = torch.empty(images.shape(), dtype=self.dtype, device=self.device)
            feed_ndarray(images, out, cuda_stream=stream)
            yield out, rows
