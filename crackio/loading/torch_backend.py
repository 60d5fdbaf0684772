"""Torch backend: threads read bytes through the index, decode with libjpeg-turbo (or nvJPEG) and augment.

Threads, not DataLoader worker processes: torchvision's `decode_jpeg`, OpenCV and `os.pread`
release the GIL, so threads work in parallel, and the loader then works in a script
without an `if __name__ == "__main__":` guard, in a notebook and under `python -c`,
where spawned or fork-server workers re-import the caller's script (a bootstrapping
error, or a hang), and nothing is forked from a process that runs DALI or CUDA
threads. It also removes the 4-10 s worker start-up before the first batch.

On the CPU each worker thread decodes, augments (crackio.loading.augment.warp and brighten_into, OpenCV) and
normalizes its batch, with OpenCV's own thread pool off (`cv2.setNumThreads(1)`: the loader's threads are its
parallelism; OpenCV's pool added ~0.7 of a core of waiting to one worker thread, docs/performance.md). On CUDA
the threads only read bytes, and decoding (nvJPEG) and the batched augmentation
(crackio.loading.augment.augment) run on the GPU in the caller's thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from time import perf_counter

import numpy as np
import simplejpeg
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from crackio.errors import CrackioError
from crackio.loading.augment import AugmentParams, augment, augment_into, brighten_into, normalize, warp
from crackio.loading.readers import Reader
from crackio.loading.stages import StageStats

Loaded = tuple["torch.Tensor | list[torch.Tensor]", torch.Tensor, dict[str, float]]


class TorchBackend:
    def __init__(self, reader: Reader, device: torch.device, num_workers: int, output: str = "float32"):
        self.reader = reader
        self.device = device
        self.gpu = device.type == "cuda"
        self.uint8 = output == "uint8"
        self.workers = max(1, num_workers)
        self.ahead = 2 * self.workers  # batches read (and decoded) ahead of the consumer
        self.stages = StageStats(self.workers)  # the current (or last) epoch's per-stage figures
        if not self.gpu:
            import cv2

            # Process-wide: OpenCV runs each call in the calling thread. With its pool on, one worker thread's
            # warps used 1.66 cores for 0.58 ms of CPU per image; off, 1.01 cores for 0.34 ms at the same rate.
            cv2.setNumThreads(1)

    def _load(self, ids: np.ndarray, params: AugmentParams | None) -> Loaded:
        """One batch in a worker thread: (images, ids, each stage's seconds for this batch)."""
        t0 = perf_counter()
        data = self.reader.read(ids)
        ids_t = torch.from_numpy(ids.astype(np.int64))
        times = {"read": perf_counter() - t0}
        if self.gpu:
            return [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data], ids_t, times
        # libjpeg-turbo through simplejpeg decodes straight to H x W x 3 (the same library and settings as
        # torchvision's decode_jpeg: bit-identical pixels, tested), what OpenCV warps; each image is then written
        # straight into the batch's N x H x W x 3 buffer, viewed as N x 3 x H x W (channels_last): no stack, no
        # transposing copy. Train, uint8: warped into the buffer, brightened in place (the augment stage). Train,
        # float32: the brightness and the normalization are one lookup into the buffer (`brighten_into`, the
        # normalize stage). Eval: uint8 decoded into the buffer; float32 normalized into it by the same lookup.
        out: np.ndarray | None = None
        spent = np.zeros(3)  # decode, augment, normalize
        for i, d in enumerate(data):
            a = perf_counter()
            if out is None:
                height, width, _, _ = simplejpeg.decode_jpeg_header(d)
                out = np.empty((len(data), height, width, 3), np.uint8 if self.uint8 else np.float32)
            into_buffer = params is None and self.uint8
            pixels = simplejpeg.decode_jpeg(d, colorspace="RGB", buffer=out[i] if into_buffer else None)
            if pixels.shape != out.shape[1:]:  # a pack's images share one size (crackio.writing.images)
                raise CrackioError(
                    f"sample {int(ids[i])} of this split decodes to {pixels.shape[:2]} pixels, the batch's first to "
                    f"{out.shape[1:3]}: every image of a pack is one size; pack the folder again with tools/pack.py"
                )
            b = c = perf_counter()
            if params is None:
                if self.uint8:  # decoded into the buffer: nothing more to do
                    spent[0] += b - a
                    continue
                brighten_into(pixels, 1.0, out[i])  # brightness 1: the normalization alone
            elif self.uint8:  # no normalize stage
                augment_into(pixels, params.brightness[i], params.flip[i], params.angle[i], out[i])
                spent[:2] += (b - a, perf_counter() - b)
                continue
            else:
                warped = warp(pixels, params.flip[i], params.angle[i])
                c = perf_counter()
                brighten_into(warped, params.brightness[i], out[i])
            spent += (b - a, c - b, perf_counter() - c)
        assert out is not None  # a batch holds at least one sample
        times |= dict(zip(("decode", "augment", "normalize"), spent.tolist()))
        return torch.from_numpy(out).permute(0, 3, 1, 2), ids_t, times

    def run_epoch(
        self, batches: Sequence[np.ndarray], params: Iterable[AugmentParams | None]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images on the device: normalized float32 NCHW, or uint8 NCHW when asked, ids int64) for each
        batch, in order (crackio.loading.loader.Backend)."""
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="crackio-torch")
        pending: deque[tuple[Future[Loaded], AugmentParams | None]] = deque()
        stats = self.stages = StageStats(self.workers)
        todo = zip(batches, params)
        try:
            for ids, p in todo:
                pending.append((pool.submit(self._load, ids, p), p))
                if len(pending) >= self.ahead:
                    break
            while pending:
                in_flight, ready = len(pending), sum(f.done() for f, _ in pending)
                future, p = pending.popleft()
                t0 = perf_counter()
                loaded, rows, times = future.result()
                waited = perf_counter() - t0
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((pool.submit(self._load, *nxt), nxt[1]))
                if isinstance(loaded, torch.Tensor):  # the CPU path: made whole in the thread
                    images = loaded
                else:  # decode and augment on the GPU, batched (launch times: CUDA runs them asynchronously)
                    t1 = perf_counter()
                    images = torch.stack(decode_jpeg(loaded, mode=ImageReadMode.RGB, device=self.device))
                    t2 = perf_counter()
                    images = images if p is None else augment(images, p)
                    t3 = perf_counter()
                    images = images if self.uint8 else normalize(images)
                    times |= {"decode": t2 - t1, "augment": t3 - t2, "normalize": perf_counter() - t3}
                stats.add(times, len(rows), waited, in_flight, ready)
                yield images, rows
        finally:  # an abandoned epoch: drop what was read ahead
            pool.shutdown(wait=True, cancel_futures=True)
