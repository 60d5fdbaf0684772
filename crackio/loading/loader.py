"""`make_loader`: one epoch of `Batch`es per iteration, whichever backend decodes."""

from __future__ import annotations

import importlib.util
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple, Protocol

import numpy as np
import torch

from crackio.errors import ConfigError
from crackio.format.index import load_index
from crackio.loading.augment import AugmentParams, draw_params
from crackio.loading.options import BACKENDS, DEVICES, ORDERS, OUTPUTS, integer
from crackio.loading.orders import block_order, rank_batches
from crackio.loading.readers import BlockReader, ByteReader
from crackio.loading.samplers import Shuffle, Weighted, epoch_draws, labels_for, make_sampler


class Backend(Protocol):
    """What decodes the batches the loader planned; every backend has this one method.

    `batches`: this rank's row ids, batch by batch; `params`: each batch's augmentation
    parameters, or None for eval. Yields (images N x 3 x 224 x 224 on the loader's device:
    float32 ImageNet-normalized, or augmented uint8 0-255 with output="uint8"; row ids int64)
    per batch, in order, one epoch, then returns.
    """

    def run_epoch(
        self, batches: Sequence[np.ndarray], params: Iterable[AugmentParams | None]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class Batch(NamedTuple):
    images: torch.Tensor  # N x 3 x 224 x 224 on the loader's device: float32 normalized, or uint8 0-255
    labels: torch.Tensor  # float32 0/1: the names' labels, or IoU > iou_threshold when one is given
    ious: torch.Tensor  # float32
    names: list[str]  # original proposal file names


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda' asked for but torch sees no CUDA GPU; use device 'cpu' or 'auto' (--device cpu)"
        )
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be one of {DEVICES}, got {device}")
    return device


class Loader:
    """Iterate for one epoch of `Batch`es; each new iteration is the next epoch (`epoch` may be set to resume).

    Args:
        shards: folder written by tools/pack.py or tools/propose.py.
        split: e.g. "train", "valid", "test".
        batch_size: samples per batch (eval batches may be smaller, never padded).
        train: augment and drop the last partial batch; eval: normalize only, every sample once.
        sampler: shuffle | hard-negatives | iou-strata | weighted | balanced with its options as keywords, or a
            sampler itself (crackio.loading.samplers: Shuffle(), HardNegatives(negatives=800),
            Weighted(class_weights={0: 1, 1: 2}, selection=HardNegatives(800)), ...) without keywords.
        iou_threshold: None (default): the label in each file name; a number t: label = IoU > t,
            recomputed from the stored IoU (the original's 0.35 experiment needs no repack).
        seed: seeds selection, order and augmentation; order = f(seed, epoch, rank, world_size).
        device: "cuda", "cpu" or "auto".
        backend: "dali", "torch" or "auto" (DALI where installed).
        rank, world_size: this process's part of every epoch.
        workers: decode threads (default: the cores this process may use).
        output: "float32" (default): ImageNet-normalized images; "uint8": augmented 0-255 images, 4x fewer
            bytes, for a consumer that normalizes on its own device (crackio.loading.augment.normalize; the trainer's
            model does it on CUDA).
        order: "random" (default): every batch drawn from the whole split, one random read per sample;
            "block": training batches drawn from a shuffle window of `window` blocks of `block_size`
            consecutive rows, read ahead a block at a time (crackio.loading.orders.block_order): sequential reads
            for shards on a network file system, a spinning disk or a split larger than memory. The same
            samples per epoch, the same number of steps; eval order is sequential either way.
        block_size, window: rows per block (default 128, ~1 MB of 224x224 crops) and blocks per shuffle window
            (default 8).
        **options: the sampler's, e.g. negatives=800, per_bin=10, class_weights={0: 1, 1: 2},
            replacement=True, num_samples=None.

    Raises:
        ShardError: missing, incomplete or inconsistent shards (the message names the file and the fix).
        ConfigError: a setting that cannot work (unknown sampler or option, nothing to draw, no CUDA, ...).
    """

    def __init__(
        self,
        shards: str | os.PathLike,
        split: str,
        *,
        batch_size: int,
        train: bool,
        sampler: str | Shuffle | Weighted = "shuffle",
        iou_threshold: float | None = None,
        seed: int = 0,
        device: str | torch.device = "auto",
        backend: str = "auto",
        rank: int = 0,
        world_size: int = 1,
        workers: int | None = None,
        output: str = "float32",
        order: str = "random",
        block_size: int = 128,
        window: int = 8,
        **options,
    ):
        batch_size, rank, world_size, seed = (
            integer(name, value, least)
            for name, value, least in (
                ("batch_size", batch_size, 1),
                ("rank", rank, 0),
                ("world_size", world_size, 1),
                ("seed", seed, 0),
            )
        )
        if workers is not None:
            workers = integer("workers", workers, 0)
        if output not in OUTPUTS:
            raise ConfigError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.output = output
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "dali" and not dali_available():
            raise ConfigError(
                "backend 'dali' asked for but NVIDIA DALI is not installed "
                "(pip install nvidia-dali-cuda120, Linux only); use backend='torch'"
            )
        if order not in ORDERS:
            raise ConfigError(f"order must be one of {ORDERS}, got {order!r}")
        self.order = order
        self.block_size, self.window = integer("block_size", block_size, 1), integer("window", window, 1)
        self.index = load_index(shards, split)
        blocks = order == "block" and train
        self.reader = BlockReader(self.index, self.block_size) if blocks else ByteReader(self.index)
        self.reader.check()
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        if isinstance(sampler, str):
            self.sampler = make_sampler(sampler, **options)
        elif isinstance(sampler, Shuffle | Weighted) and not options:
            self.sampler = sampler
        else:
            raise ConfigError(
                f"sampler must be a name (shuffle, weighted, ...) with its options as keywords, or a sampler such "
                f"as crackio.loading.samplers.Weighted(...) without keywords, got {sampler!r} and {options}"
            )
        self.iou_threshold = iou_threshold
        self.labels = labels_for(self.index.rows["label"], self.index.ious, iou_threshold)
        self.selection = self.sampler.select(self.labels, self.index.ious, seed)
        self.sampler.check(self.selection, self.labels, iou_threshold)
        self.device = resolve_device(device)
        self.backend_name = ("dali" if dali_available() else "torch") if backend == "auto" else backend
        workers = workers if workers is not None else len(os.sched_getaffinity(0))
        self.backend: Backend
        if self.backend_name == "dali":
            from crackio.loading.dali_backend import DaliBackend

            self.backend = DaliBackend(self.reader, batch_size, train, self.device, max(1, workers), seed, output)
        else:
            from crackio.loading.torch_backend import TorchBackend

            self.backend = TorchBackend(self.reader, self.device, workers, output)  # batches come per epoch
        self.epoch = 0
        self._iterating = False  # an epoch's iteration is under way (DALI runs one at a time)
        self._planned: tuple[int, list[np.ndarray]] = (-1, [])

    def batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's row ids for `epoch`, batch by batch: a pure function of the arguments, computed once
        per epoch (`len(loader)` and the iteration share it)."""
        if self._planned[0] != epoch:
            order = epoch_draws(self.sampler, self.selection, self.labels, self.seed, epoch, self.train)
            if isinstance(self.reader, BlockReader):  # train in block order: this rank's part, batch by batch
                mine = block_order(
                    order, len(self.index), self.block_size, self.window, self.seed, epoch, self.rank, self.world_size
                )
                if len(mine) < self.batch_size:
                    raise ConfigError(
                        f"{len(order)} samples cannot fill one batch of {self.batch_size} on {self.world_size} "
                        f"rank(s); lower the batch size"
                    )
                # Equal parts per rank: the same cut into batches as rank_batches on world_size 1.
                self._planned = (epoch, rank_batches(mine, self.batch_size, 0, 1, True))
            else:
                self._planned = (epoch, rank_batches(order, self.batch_size, self.rank, self.world_size, self.train))
        return self._planned[1]

    def __len__(self) -> int:
        return len(self.batches(self.epoch))

    def plan(self, epoch: int) -> tuple[list[np.ndarray], Iterator[AugmentParams | None]]:
        """Row ids of every batch of `epoch` on this rank, and their augmentation parameters batch by batch
        (drawn lazily, one seeded generator per batch: ~20 us each, and no per-sample array for the epoch)."""
        batches = self.batches(epoch)
        if not self.train:
            return batches, itertools.repeat(None, len(batches))
        bs, seed, rank = self.batch_size, self.seed, self.rank
        return batches, (draw_params(bs, seed, epoch, rank, i) for i in range(len(batches)))

    def __iter__(self) -> Iterator[Batch]:
        if self._iterating and self.backend_name == "dali":
            raise ConfigError(
                "this loader is already iterating an epoch, and its DALI pipeline runs one epoch at a time: finish "
                "the previous iteration or close it (iterator.close()) first, or use backend='torch'"
            )
        epoch = self.epoch
        self.epoch += 1  # advanced up front: nobody can forget set_epoch, an abandoned epoch counts
        self._iterating = True
        batches, params = self.plan(epoch)
        if isinstance(self.reader, BlockReader):
            self.reader.prefetch(batches)
        try:
            for images, ids in self.backend.run_epoch(batches, params):
                rows = ids.numpy()  # labels and IoUs looked up per batch: no per-sample copy held for the run
                yield Batch(
                    images,
                    torch.from_numpy(self.labels[rows].astype(np.float32)).to(self.device),
                    torch.from_numpy(np.asarray(self.index.ious[rows], dtype=np.float32)).to(self.device),
                    self.index.filenames(rows),
                )
        finally:
            self._iterating = False
            if isinstance(self.reader, BlockReader):
                self.reader.close()


# The public entry point is the class itself: one signature, checked by mypy at every call.
make_loader = Loader
