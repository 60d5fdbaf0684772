"""Torch backend: threads read bytes through the index and decode with libjpeg-turbo (or nvJPEG).

Threads, not DataLoader worker processes: torchvision's `decode_jpeg` and `os.pread`
release the GIL, so threads decode in parallel, and the loader then works in a script
without an `if __name__ == "__main__":` guard, in a notebook and under `python -c`,
where spawned or fork-server workers re-import the caller's script (a bootstrapping
error, or a hang), and nothing is forked from a process that runs DALI or CUDA
threads. It also removes the 4-10 s worker start-up before the first batch.
Augmentation runs batched on the loader's device (crackio.augment) in the caller's thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from crackio.augment import AugmentParams, augment_normalize
from crackio.reader import ByteReader


class TorchBackend:
    name = "torch"

    def __init__(self, reader: ByteReader, device: torch.device, num_workers: int):
        self.reader = reader
        self.device = device
        self.gpu_decode = device.type == "cuda"
        self.workers = max(1, num_workers)
        self.ahead = 2 * self.workers  # batches read (and decoded) ahead of the consumer

    def _load(self, ids: np.ndarray) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
        raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in self.reader.read(ids)]
        images = raw if self.gpu_decode else torch.stack(decode_jpeg(raw, mode=ImageReadMode.RGB))
        return images, torch.from_numpy(ids.astype(np.int64))

    def run_epoch(
        self, batches: Sequence[np.ndarray], params: Iterable[AugmentParams | None]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images float32 NCHW on the device, ids int64) for each batch, in order (crackio.loader.Backend)."""
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="crackio-torch")
        pending: deque[Future] = deque()
        todo = iter(batches)
        try:
            for ids in todo:
                pending.append(pool.submit(self._load, ids))
                if len(pending) >= self.ahead:
                    break
            for p in params:
                images, ids = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(self._load, nxt))
                if self.gpu_decode:
                    images = torch.stack(decode_jpeg(images, mode=ImageReadMode.RGB, device=self.device))
                yield augment_normalize(images.to(self.device, non_blocking=True), p), ids
        finally:  # an abandoned epoch: drop what was read ahead
            pool.shutdown(wait=True, cancel_futures=True)
