"""`make_loader`: one epoch of `Batch`es per iteration, whichever backend decodes."""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import os
from collections.abc import Generator, Iterable, Iterator, Sequence
from typing import NamedTuple, Protocol

import numpy as np
import torch

from crackio.cli import closest
from crackio.errors import MOST_THREADS, ConfigError, given, integer, is_number
from crackio.format.index import SplitIndex
from crackio.loading.augment import AugmentParams, draw_params, take
from crackio.loading.mixture import (
    Share,
    by_pack,
    check_distinct,
    check_mix,
    mixed_sequence,
    pack_of,
    per_pack_sampler,
)
from crackio.loading.options import BACKENDS, DEVICES, ORDERS, OUTPUTS, choice, unknown_keyword
from crackio.loading.orders import BlockOrder, Order, RandomOrder, epoch_grid, eval_batches, eval_consumed
from crackio.loading.readers import AheadReader, BlockReader, ByteReader, MixedReader
from crackio.loading.samplers import (
    Shuffle,
    Weighted,
    epoch_draws,
    every_option,
    labels_for,
    make_sampler,
    own_options,
)
from crackio.loading.stages import StageStats
from crackio.storage.packs import LocalShards, Pack, RemoteShards, check_remote, open_pack
from crackio.storage.remote import check_location
from crackio.storage.settings import RemoteSettings


class Backend(Protocol):
    """What decodes the batches the loader planned; every backend has this one method.

    `batches`: this rank's row ids, batch by batch; `params`: each batch's augmentation
    parameters, or None for eval. Yields (images N x 3 x 224 x 224 on the loader's device:
    float32 ImageNet-normalized, or augmented uint8 0-255 with output="uint8"; row ids int64)
    per batch, in order, one epoch, then returns.
    """

    stages: StageStats  # the current (or last) epoch's per-stage figures, replaced at each run_epoch

    def run_epoch(
        self, batches: Sequence[np.ndarray], params: Iterable[AugmentParams | None]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class Batch(NamedTuple):
    images: torch.Tensor  # N x 3 x 224 x 224 on the loader's device: float32 normalized, or uint8 0-255
    labels: torch.Tensor  # float32 0/1: the names' labels, or IoU > iou_threshold when one is given
    ious: torch.Tensor  # float32
    names: list[str]  # original proposal file names


def dali_available() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no `nvidia` package at all (find_spec imports the parent)
        return False


def resolve_device(device: str | torch.device, name: str = "device") -> torch.device:
    """The torch device of `device` ("auto": CUDA where torch sees a GPU); `name` is the argument (or a command
    line's flag, "--device") the messages name.

    Raises:
        ConfigError: no CUDA GPU for "cuda", or a device that is not a CPU or CUDA one.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"{given(name, device)} is not a device: give one of {DEVICES}{closest(str(device), DEVICES)}"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{given(name, str(device))} asked for but torch sees no CUDA GPU: use {given(name, 'cpu')} or "
            f"{given(name, 'auto')}"
        )
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{name} must be one of {DEVICES}, got {device}")
    return device


def _backend_name(backend: str) -> str:
    """The backend that decodes: `backend`, or for "auto" DALI where installed, else torch."""
    choice("backend", backend, BACKENDS)
    if backend == "dali" and not dali_available():
        raise ConfigError(
            "backend 'dali' asked for but NVIDIA DALI is not installed "
            "(pip install nvidia-dali-cuda120, Linux only); use backend='torch'"
        )
    return ("dali" if dali_available() else "torch") if backend == "auto" else backend


def _sampler(sampler: str | Shuffle | Weighted, options: dict) -> Shuffle | Weighted:
    """The loader's sampler from its `sampler` argument and the keywords left over, each of which must be some
    sampler's option (a mistyped argument or a torch DataLoader habit is named with what to write instead)."""
    takes = every_option()
    for key, value in options.items():
        if key not in takes:
            arguments = [p for p in inspect.signature(Loader.__init__).parameters if p not in ("self", "options")]
            raise unknown_keyword(key, value, arguments, takes)
    if isinstance(sampler, str):
        return make_sampler(sampler, **options)
    if isinstance(sampler, Shuffle | Weighted) and not options:
        return sampler
    raise ConfigError(
        f"sampler must be a name (shuffle, weighted, ...) with its options as keywords, or a sampler such "
        f"as crackio.Weighted(...) without keywords, got {sampler!r} and {options}"
    )


def _source(shards: str | os.PathLike | Pack, remote: RemoteSettings | None) -> Pack:
    """The pack to read: `shards` itself when already opened, else opened with `remote`."""
    check_remote(remote)  # the same refusal for a folder, a URL and a Pack
    if isinstance(shards, Pack):
        if remote is not None:
            raise ConfigError(
                "remote= applies when shards is a location; this Pack was opened with its own settings: give "
                "open_pack(location, remote) those settings, or pass the location and remote= here"
            )
        return shards
    check_location(shards, "shards")
    return open_pack(shards, remote, "shards")


def _packs(shards: object) -> list[str | os.PathLike | Pack]:
    """The packs `shards` names: one location or Pack, or a list (tuple) of them (a mixture)."""
    packs = list(shards) if isinstance(shards, list | tuple) else [shards]
    if not packs or not all(isinstance(s, str | os.PathLike | Pack) for s in packs):
        raise ConfigError(
            f"shards must be a pack's folder (a str or path), its URL (s3://..., http(s)://...), a Pack opened by "
            f"crackio.open_pack, or a non-empty list of them (a mixture), got {shards!r}"
        )
    return packs  # type: ignore[return-value]


def _argument_types(train: object, iou_threshold: object, remote: object) -> None:
    """Refuse arguments of the wrong type before anything is read, each naming the argument and what to give."""
    if not isinstance(train, bool | np.bool_):
        raise ConfigError(
            f"train must be True (training: augmented, in the sampler's order) or False (evaluation: each selected "
            f"sample once, in index order), got {train!r}"
        )
    if iou_threshold is not None and not is_number(iou_threshold, 0, 1, under=True):
        raise ConfigError(
            f"iou_threshold must be None (the labels in the file names) or a number in [0, 1) (label = IoU > it), "
            f"got {iou_threshold!r}"
        )
    check_remote(remote)


def _unused_options(order: str, blocks: BlockOrder, sampler: Shuffle | Weighted, train: bool) -> None:
    """Refuse options this loader would ignore, saying when they apply. Block options are refused only when they
    differ from the defaults, which callers may pass whatever the order (one set of keywords for every order)."""
    default = BlockOrder()
    given_blocks = [
        f"{n}={getattr(blocks, n)}" for n in ("block_size", "window") if getattr(blocks, n) != getattr(default, n)
    ]
    if order != "block" and given_blocks:
        verb = "applies" if len(given_blocks) == 1 else "apply"
        raise ConfigError(
            f"{' and '.join(given_blocks)} {verb} with order='block' only (runs of consecutive rows, read a block at "
            f"a time); order={order!r} reads each sample on its own: give order='block', or leave "
            f"{'it' if len(given_blocks) == 1 else 'them'} out"
        )
    if isinstance(sampler, Weighted) and not train:
        weighting = ", ".join(o for o in own_options(sampler.name) if o != "selection")
        raise ConfigError(
            f"sampler {sampler.name!r} ({weighting}) weights training draws: evaluation (train=False) reads the "
            f"selection once in index order, so the weighting would be ignored; what applies there is the selection: "
            f"give sampler={sampler.selection!r} (or 'hard-negatives' / 'iou-strata' with its options), or train=True "
            f"for weighted draws"
        )


def _reader(index: SplitIndex, files: LocalShards | RemoteShards, sequential: bool, block_size: int) -> ByteReader:
    """What reads the samples' bytes: a block at a time (block order's training), ahead of the backends (a remote
    pack: latency, not bandwidth, is the limit), or a batch at a time."""
    if sequential:
        return BlockReader(index, files, block_size)
    if isinstance(files, RemoteShards):
        return AheadReader(index, files)
    return ByteReader(index, files)


class Loader:
    """Iterate for one epoch of `Batch`es; each new iteration is the next epoch (`epoch` may be set to resume).

    Training steps are global: step s of an epoch is the same global batch of batch_size x world_size samples,
    with the same augmentation per sample, at every world size (crackio.loading.orders); `state_dict` /
    `load_state_dict` stop and resume anywhere, at this or another world size (the same global batch).

    Args:
        shards: folder written by tools/pack.py or tools/propose.py, or its URL on S3-compatible storage
            (`s3://bucket/prefix`, credentials and endpoint from the AWS_* variables) or an HTTP(S) server, read
            through the node's cache (`remote`); or a `Pack` already opened (`crackio.open_pack`); or a list of
            them: a mixture (crackio.loading.mixture), each pack read with its own rows, the sampler acting within
            each.
        split: e.g. "train", "valid", "test".
        batch_size: samples per batch (eval batches may be smaller, never padded).
        train: augment and drop the last partial batch; eval: normalize only, every sample once.
        sampler: shuffle | hard-negatives | iou-strata | weighted | balanced with its options as keywords, or a
            sampler itself (crackio.loading.samplers: Shuffle(), HardNegatives(negatives=800),
            Weighted(class_weights={0: 1, 1: 2}, selection=HardNegatives(800)), ...) without keywords. A weighting
            (weighted, balanced) draws training epochs: evaluation takes a selection (shuffle, hard-negatives,
            iou-strata) and reads it once in index order.
        iou_threshold: None (default): the label in each file name; a number t: label = IoU > t,
            recomputed from the stored IoU (the original's 0.35 experiment needs no repack).
        seed: seeds selection, order and augmentation: global batches = f(pack, seed, epoch, global batch size).
        device: "cuda", "cpu" or "auto".
        backend: "dali", "torch" or "auto" (DALI where installed).
        rank, world_size: this process's part of every global batch (train) or of the split (eval); rank <
            world_size.
        workers: decode threads, at most 4096 (default: the cores this process may use).
        output: "float32" (default): ImageNet-normalized images; "uint8": augmented 0-255 images, 4x fewer
            bytes, for a consumer that normalizes on its own device (crackio.loading.augment.normalize; the trainer's
            model does it on CUDA).
        order: "random" (default): every batch drawn from the whole split, one random read per sample;
            "block": training batches drawn from a shuffle window of `window` blocks of `block_size`
            consecutive rows, read ahead a block at a time (crackio.loading.orders.BlockOrder): sequential reads
            for shards on a network file system, a spinning disk or a split larger than memory. The same
            samples per epoch, the same number of steps; eval order is sequential either way.
        block_size, window: rows per block (default 128, ~1 MB of 224x224 crops) and blocks per shuffle window
            (default 8); with order="block" only (other values are refused with another order).
        mix: a mixture's proportions, one per pack (e.g. [0.3, 0.7]; only ratios matter): each training epoch
            draws exactly its share from each pack (crackio.loading.mixture gives the rule); None: the packs
            concatenated, each giving its own epoch. Evaluation reads every selected sample of every pack once.
        remote: a remote pack's cache folder, cache limit and timeout (crackio.RemoteSettings; None:
            RemoteSettings.from_env(), i.e. $CRACKIO_CACHE_DIR, $CRACKIO_CACHE_LIMIT, $CRACKIO_REMOTE_TIMEOUT).
            Loaders with different settings keep different caches.
        **options: the sampler's, e.g. negatives=800, per_bin=10, class_weights={0: 1, 1: 2},
            replacement=True, num_samples=None. Any other keyword is refused, naming the closest argument.

    Raises:
        ShardError: missing, incomplete or inconsistent shards (the message names the file and the fix).
        ConfigError: a setting that cannot work or would be ignored (an argument of the wrong type, an unknown
            argument, sampler or option, nothing to draw, no CUDA, ...), naming the argument and the closest
            valid one or when it applies.
    """

    def __new__(cls, *args, **kwargs):
        # Python refuses a missing argument before __init__ runs; a torch habit or mistyped keyword given with it
        # (make_loader(shards, "train", shuffle=True)) is said first, with what to write instead, then what is missing.
        signature = inspect.signature(cls.__init__)
        try:
            bound = signature.bind_partial(None, *args, **kwargs).arguments
        except TypeError:  # too many positional arguments: Python's own message
            return super().__new__(cls)
        parameters = [p for p in signature.parameters if p not in ("self", "options")]
        missing = [p for p in parameters if signature.parameters[p].default is inspect.Parameter.empty]
        missing = [p for p in missing if p not in bound]
        unknown = [k for k in kwargs if k not in parameters and k not in every_option()]
        if missing and unknown:
            hint = unknown_keyword(unknown[0], kwargs[unknown[0]], parameters, every_option())
            raise ConfigError(f"{hint}; and give the required {' and '.join(f'{p}=' for p in missing)}")
        return super().__new__(cls)

    def __init__(
        self,
        shards: str | os.PathLike | Pack | Sequence[str | os.PathLike | Pack],
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
        remote: RemoteSettings | None = None,
        mix: Sequence[float] | None = None,
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
        if rank >= world_size:
            raise ConfigError(f"rank={rank} must be below world_size={world_size} (ranks count from 0)")
        if workers is not None:
            workers = integer("workers", workers, 0, MOST_THREADS)  # threads: more than any machine's cores
        packs = _packs(shards)
        _argument_types(train, iou_threshold, remote)
        self.mix = check_mix(mix, len(packs)) if len(packs) > 1 else (check_mix(mix, 1) and None)
        train = bool(train)
        self.output = choice("output", output, OUTPUTS)
        self.backend_name = _backend_name(backend)
        self.order = choice("order", order, ORDERS)
        blocks = BlockOrder(block_size, window)  # checked whichever the order
        self.traversal: Order = blocks if order == "block" else RandomOrder()
        self.sampler = _sampler(sampler, options)  # before any read: a mistyped argument is said at once
        _unused_options(order, blocks, self.sampler, train)
        self.sources = [_source(s, remote) for s in packs]
        check_distinct(self.sources, "shards", " (and a larger proportion in mix to draw more of it)" if train else "")
        self.indexes = [source.index(split) for source in self.sources]
        # Block order's sequential reads are for training; evaluation reads its split in index order anyway.
        readers = [
            _reader(index, source.files(index), order == "block" and train, blocks.block_size)
            for source, index in zip(self.sources, self.indexes)
        ]
        self.offsets = np.cumsum([0] + [len(index) for index in self.indexes])[:-1]
        self.reader: ByteReader | MixedReader = readers[0] if len(readers) == 1 else MixedReader(readers, self.offsets)
        self.reader.check()
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.iou_threshold = iou_threshold
        self._selections = []  # each pack's selection, its own row ids
        for p, index in enumerate(self.indexes):
            labels = labels_for(index.rows["label"], index.ious, iou_threshold)
            selection = self.sampler.select(labels, index.ious, seed)
            try:
                self.sampler.check(selection, labels, iou_threshold)
            except ConfigError as e:
                if len(self.indexes) == 1:
                    raise
                raise ConfigError(f"pack {p + 1} of the mixture ({self.sources[p].location}): {e}") from None
            self._selections.append((labels, selection))
        one = len(self.indexes) == 1
        self.labels = self._selections[0][0] if one else np.concatenate([lab for lab, _ in self._selections])
        self.ious = self.indexes[0].ious if one else np.concatenate([index.ious for index in self.indexes])
        self.selection = (
            self._selections[0][1]
            if one
            else np.concatenate([sel + off for (_, sel), off in zip(self._selections, self.offsets)])
        )
        self.device = resolve_device(device)
        workers = workers if workers is not None else len(os.sched_getaffinity(0))
        self.backend: Backend
        if self.backend_name == "dali":
            from crackio.loading.dali_backend import DaliBackend

            self.backend = DaliBackend(self.reader, batch_size, train, self.device, max(1, workers), seed, output)
        else:
            from crackio.loading.torch_backend import TorchBackend

            self.backend = TorchBackend(self.reader, self.device, workers, output)  # batches come per epoch
        self._iterating = False  # an epoch's iteration is under way (DALI runs one at a time)
        self._next = (0, 0)  # (epoch, step) the next iteration starts at
        self._live: tuple[int, int] | None = None  # (epoch, step) after the last batch handed out
        self._planned: tuple[int, list[np.ndarray], np.ndarray | None] = (-1, [], None)
        self._shares: tuple[int, list[Share]] = (-1, [])
        self._drawn: tuple[int, np.ndarray] = (-1, np.zeros((1, len(self.sources)), np.int64))

    @property
    def source(self) -> Pack:
        """The pack read (a mixture has several: `sources`)."""
        return self._one(self.sources)

    @property
    def index(self) -> SplitIndex:
        """The split's index (a mixture has one per pack: `indexes`, rows from `offsets`)."""
        return self._one(self.indexes)

    def _one(self, items: list):
        if len(items) > 1:
            raise ConfigError("this loader reads a mixture of packs: use .sources and .indexes (one per pack)")
        return items[0]

    @property
    def pack(self) -> str | list[str]:
        """The pack's identity in states (its manifest's SHA-256: the same for a local copy of a remote pack); a
        mixture's: its packs' in order."""
        shas = [source.sha256 for source in self.sources]
        return shas[0] if len(shas) == 1 else shas

    @property
    def split(self) -> str:
        return self.indexes[0].split

    def filenames(self, rows: np.ndarray) -> list[str]:
        """The original proposal file names of rows `rows` (a mixture's rows count from each pack's offset)."""
        if len(self.indexes) == 1:
            return self.indexes[0].filenames(rows)
        names = [""] * len(rows)
        for p, where, own in by_pack(self.offsets, rows):
            for at, name in zip(where, self.indexes[p].filenames(own)):
                names[at] = name
        return names

    def pack_of(self, rows: np.ndarray) -> np.ndarray:
        """Which pack (0-based, in `shards`' order) each row id comes from; int64."""
        return pack_of(self.offsets, rows)

    def shares(self, epoch: int) -> list[Share]:
        """A training mixture's shares of `epoch` per pack, against each pack's own epoch (empty for one pack)."""
        self._plan(epoch)
        return self._shares[1] if self._shares[0] == epoch else []

    def drawn(self, epoch: int, steps: int | None = None) -> list[int]:
        """Samples of each pack (in `shards`' order) in the first `steps` global batches of training epoch `epoch`
        (None: all of them), over all ranks: what a mixture's epoch trained on, per pack (counted when the epoch
        is planned)."""
        self._plan(epoch)
        counts = self._drawn[1]
        return counts[len(counts) - 1 if steps is None else min(steps, len(counts) - 1)].tolist()

    def _draws(self, epoch: int) -> np.ndarray:
        """The epoch's whole sequence of row ids before the order and the ranks cut it."""
        if len(self.indexes) == 1:
            return epoch_draws(self.sampler, self.selection, self.labels, self.seed, epoch, self.train)
        if not self.train:
            return self.selection  # every selected sample of every pack, packs in order
        sampler = per_pack_sampler(self.sampler)

        def draw(p: int, round: int) -> np.ndarray:
            labels, selection = self._selections[p]
            return epoch_draws(sampler, selection, labels, self.seed, epoch, True, (p, round))

        firsts = [draw(p, 0) for p in range(len(self.indexes))]
        num = self.sampler.num_samples if isinstance(self.sampler, Weighted) else None
        sequence, plan = mixed_sequence(
            lambda p, r: firsts[p] if r == 0 else draw(p, r),
            self.mix,
            [len(f) for f in firsts],
            [len(selection) for _, selection in self._selections],
            num,
            self.offsets,
            self.seed,
            epoch,
            self.global_batch_size,
            [source.location for source in self.sources],
        )
        self._shares = (epoch, plan)
        return sequence

    @property
    def global_batch_size(self) -> int:
        """Samples per training step over all ranks: batch_size x world_size (what a resume must keep)."""
        return self.batch_size * self.world_size

    @property
    def epoch(self) -> int:
        """The epoch the next iteration runs (set it to start there, at its first batch; setting the epoch a loaded
        state stands in keeps its position, as a `set_epoch` at the top of every epoch would expect)."""
        return self._next[0]

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        epoch = integer("epoch", epoch, 0)
        if epoch != self._next[0] or self._live is not None:  # the epoch it is at already: its position is kept
            self._next, self._live = (epoch, 0), None

    @property
    def step(self) -> int:
        """The batch the next iteration starts at (0 unless `load_state_dict` put it mid-epoch)."""
        return self._next[1]

    def _plan(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray | None]:
        """This rank's row ids for `epoch` batch by batch, and (train) each row's position in its global batch:
        pure functions of the arguments, computed once per epoch (`len`, the state and the iteration share them)."""
        if self._planned[0] != epoch:
            try:
                draws = self._draws(epoch)
            except MemoryError:  # numpy's refusal of an array larger than memory, before anything is filled
                raise ConfigError(
                    f"the sampler {self.sampler!r} draws more samples per epoch than this machine's memory holds "
                    f"(~24 bytes of plan per sample): lower num_samples (--num-samples)"
                ) from None
            if self.train:
                grid = epoch_grid(
                    draws, len(self.labels), self.seed, epoch, self.traversal, self.global_batch_size, self.rank,
                    self.world_size,
                )  # fmt: skip
                rows, within = self.traversal.deal(grid, self.rank, self.world_size)
                self._planned = (epoch, list(rows), within)
                # Each pack's samples after each global step, over all ranks (0 first): what `drawn` reports.
                if len(self.sources) == 1:
                    per_step = np.full((len(grid), 1), grid.shape[1], np.int64)
                else:
                    packs = self.pack_of(grid)
                    per_step = np.stack([(packs == p).sum(axis=1) for p in range(len(self.sources))], axis=1)
                self._drawn = (epoch, np.concatenate([np.zeros((1, len(self.sources)), np.int64), per_step.cumsum(0)]))
            else:
                self._planned = (epoch, eval_batches(draws, self.batch_size, self.rank, self.world_size), None)
        return self._planned[1], self._planned[2]

    def batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's row ids for `epoch`, batch by batch (a pure function of the arguments)."""
        return self._plan(epoch)[0]

    def __len__(self) -> int:
        """Batches of the epoch the next iteration runs, on this rank (all of them, even when it starts mid-way)."""
        return len(self.batches(self.epoch))

    def plan(self, epoch: int, start: int = 0) -> tuple[list[np.ndarray], Iterator[AugmentParams | None]]:
        """Row ids of the batches of `epoch` from batch `start` on, on this rank, and their augmentation parameters
        batch by batch (drawn lazily per global batch, keyed by position: crackio.loading.augment.draw_params)."""
        batches, within = self._plan(epoch)
        if within is None:
            return batches[start:], itertools.repeat(None, len(batches) - start)
        g, seed = self.global_batch_size, self.seed
        return batches[start:], (
            take(draw_params(g, seed, epoch, step), within[step]) for step in range(start, len(batches))
        )

    def _consumed(self, epoch: int) -> np.ndarray:
        """Samples all ranks have consumed after each step of `epoch` (0 first)."""
        steps = len(self.batches(epoch))
        if self.train:
            return np.arange(steps + 1, dtype=np.int64) * self.global_batch_size
        return eval_consumed(len(self.selection), self.batch_size, self.world_size)

    def state_dict(self) -> dict:
        """Where this loader is, as plain JSON-serializable data (torch's `state_dict` convention): the epoch and
        the samples of it consumed by all ranks together, plus what `load_state_dict` checks (pack, split, sampler,
        labels, seed, global batch, order). Any rank's state is the same; save rank 0's.

        It counts every batch handed out by the last iteration, also after the consumer broke out of it (a new
        iteration still starts the next epoch, as always: load the state to go back); before any iteration, or
        after `load_state_dict` or setting `epoch`, it is where the next iteration starts. An epoch consumed to
        its end reads as the next epoch at 0. No sample is read.
        """
        epoch, step = self._live or self._next
        if step and step == len(self.batches(epoch)):
            epoch, step = epoch + 1, 0
        return {
            "epoch": epoch,
            "samples": int(self._consumed(epoch)[step]) if step else 0,
            "pack": self.pack,
            **({"mix": list(self.mix) if self.mix else None} if len(self.sources) > 1 else {}),
            "split": self.split,
            "train": self.train,
            "sampler": repr(self.sampler),
            "iou_threshold": self.iou_threshold,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size if self.train else self.batch_size,
            "order": repr(self.traversal) if self.train else "index",
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (another loader's `state_dict`, at this or another world size): the next
        iteration starts with the batch an uninterrupted run would have produced next. Nothing skipped is read or
        decoded; the cost is planning the epoch (crackio/docs/loader.md gives the figures).

        Training states load at any world size that divides the global batch, with batch_size = global / world
        size. An evaluation pass resumes mid-way at its own world size and batch size only.

        Raises:
            ConfigError: a state that is not a loader's, or is of another pack, split, sampler, labelling, seed,
                global batch size or (mid-epoch) order; one line saying what differs and what to do.
        """
        mine = self.state_dict()
        missing = sorted(set(mine) - set(state) - {"mix"}) if isinstance(state, dict) else ["everything"]
        if missing:
            raise ConfigError(f"not a loader state (no {', '.join(missing)}): {str(state)[:200]}")
        epoch = integer("a loader state's epoch", state["epoch"], 0)
        samples = integer("a loader state's samples", state["samples"], 0, 2**62)
        if state["pack"] != mine["pack"] and (isinstance(state["pack"], list) or len(self.sources) > 1):
            raise ConfigError(self._packs_refusal(state["pack"]))
        for key, what in (
            ("pack", "another pack (its manifest.json differs): resume on the shards it was saved on"),
            ("mix", "another mix"),
            ("split", "another split"),
            ("train", "a loader of another kind (train or eval)"),
            ("sampler", "another sampler or sampler options"),
            ("iou_threshold", "other labels (iou_threshold)"),
            ("seed", "another seed"),
        ):
            if state.get(key) != mine.get(key):
                raise ConfigError(f"the loader state is for {what}: {key} {state.get(key)!r} then, {mine[key]!r} now")
        g, now = state.get("global_batch_size"), mine["global_batch_size"]
        if g != now:
            raise ConfigError(self._batch_refusal(g, state.get("world_size")))
        if samples and state.get("order") != mine["order"]:
            raise ConfigError(
                f"the loader state stops within epoch {epoch} in order {state.get('order')} and this loader reads "
                f"{mine['order']}: keep the order until the epoch ends (it may change between epochs)"
            )
        consumed = self._consumed(epoch)
        step = int(np.searchsorted(consumed, samples))
        if step == len(consumed) or consumed[step] != samples:
            raise ConfigError(
                f"the loader state stops after {samples} samples of epoch {epoch}, which is not the end of a step "
                f"of this loader ({len(consumed) - 1} steps of up to {now} samples): "
                + ("it is not a state of this split" if self.train else "resume evaluation at its own world size")
            )
        self._next = (epoch + 1, 0) if step == len(consumed) - 1 else (epoch, step)
        self._live = None

    def _packs_refusal(self, saved: object) -> str:
        """What differs between the packs a state was saved on and this loader's, in one line."""
        then = saved if isinstance(saved, list) else [saved]
        now = self.pack if isinstance(self.pack, list) else [self.pack]
        if sorted(map(str, then)) == sorted(now) and len(then) == len(now):
            return "the loader state is for the same packs in another order: give the packs in the order it was saved"
        gone = [i + 1 for i, s in enumerate(then) if s not in now]
        new = [self.sources[i].location for i, s in enumerate(now) if s not in then]
        return (
            f"the loader state is for another set of packs ({len(then)} then, {len(now)} now"
            + (f"; pack(s) {', '.join(map(str, gone))} of then not given or changed" if gone else "")
            + (f"; not in it: {', '.join(new)}" if new else "")
            + "): resume on the packs it was saved on, in their order"
        )

    def _batch_refusal(self, saved, saved_world) -> str:
        if not self.train:
            return (
                f"the loader state is of an evaluation pass with batch size {saved}, this loader's is "
                f"{self.batch_size}: evaluation resumes with its own batch size and world size only"
            )
        w = self.world_size
        line = (
            f"the loader state was saved with a global batch of {saved!r} ({saved_world!r} rank(s)); this loader's is "
            f"{self.global_batch_size} ({self.batch_size} x {w} rank(s)): "
        )
        if isinstance(saved, int) and saved % w == 0:
            return line + f"make the per-rank batch {saved // w} (the global batch / the number of ranks)"
        return line + f"resume on a number of ranks that divides {saved}, with batch_size = {saved} / ranks"

    @property
    def stage_stats(self) -> StageStats:
        """The current (or last) epoch's per-stage figures (crackio.loading.stages): each stage's thread time, the
        waits for a batch and the batches in flight."""
        return self.backend.stages

    def __iter__(self) -> Generator[Batch, None, None]:
        if self._iterating and self.backend_name == "dali":
            raise ConfigError(
                "this loader is already iterating an epoch, and its DALI pipeline runs one epoch at a time: finish "
                "the previous iteration or close it (iterator.close()) first, or use backend='torch'"
            )
        epoch, start = self._next
        self._next = (epoch + 1, 0)  # advanced up front: nobody can forget set_epoch, an abandoned epoch counts
        self._live = (epoch, start)
        self._iterating = True
        batches, params = self.plan(epoch, start)
        self.reader.prefetch(batches)
        try:
            for step, (images, ids) in enumerate(self.backend.run_epoch(batches, params), start + 1):
                rows = ids.numpy()  # labels and IoUs looked up per batch: no per-sample copy held for the run
                self._live = (epoch, step)  # this batch counts as consumed once handed out
                yield Batch(
                    images,
                    torch.from_numpy(self.labels[rows].astype(np.float32)).to(self.device),
                    torch.from_numpy(np.asarray(self.ious[rows], dtype=np.float32)).to(self.device),
                    self.filenames(rows),
                )
        finally:
            self._iterating = False
            self.reader.close()


# The public entry point is the class itself: one signature, checked by mypy at every call (and shown by help()
# and inspect, which would otherwise show __new__'s *args, **kwargs).
Loader.__signature__ = inspect.Signature(list(inspect.signature(Loader.__init__).parameters.values())[1:])  # type: ignore[attr-defined]
make_loader = Loader
