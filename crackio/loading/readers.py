"""Random access to JPEG bytes inside the shards, through the split index; the tars are local files or remote
objects (`crackio.storage.packs`: `LocalShards`, `RemoteShards`)."""

from __future__ import annotations

import threading
import zlib
from collections import deque
from concurrent.futures import Future
from typing import Protocol

import numpy as np

from crackio.format.index import SplitIndex
from crackio.format.layout import ShardError
from crackio.format.manifest import repack
from crackio.format.tar import BLOCK as HEADER  # a ustar header's size
from crackio.loading.mixture import by_pack
from crackio.storage.packs import LocalShards, RemoteShards


class Reader(Protocol):
    """What the backends read samples through: a pack's `ByteReader` (or read-ahead), or a mixture's
    `MixedReader`."""

    def read(self, ids: np.ndarray) -> list[bytes]: ...


class ByteReader:
    """Reads samples' JPEG bytes by (shard, offset, size) from `files` (the split's tars, local or remote; default:
    the local tars `index` names); cheap to pickle into workers."""

    def __init__(self, index: SplitIndex, files: LocalShards | RemoteShards | None = None):
        files = files if files is not None else LocalShards(index.shards, str(index.root))  # a local index's tars
        self.files = files
        self.paths = files.names
        self.shard = index.rows["shard"]
        self.offset = index.rows["offset"]
        self.size = index.rows["size"]
        self.crc32 = index.rows["crc32"]
        self.key = index.rows["key"]
        self.filename = index.rows["filename"]
        self.root = files.location

    def read(self, ids: np.ndarray) -> list[bytes]:
        """The JPEG bytes of rows `ids`, each checked against its CRC32 before any decoder sees it.

        Raises:
            ShardError: a short read or a checksum mismatch, naming the tar, the row and the original file.
        """
        out = []
        rows = [int(i) for i in ids]
        for i, raw in zip(rows, self._raw(rows)):
            shard, size = int(self.shard[i]), int(self.size[i])
            # The member's tar header comes along (512 bytes more in the same read): its name must be this row's
            # key, which catches rows pointing at another sample (the checksum travels with the bytes).
            problem = self._problem(i, raw, size)
            if problem:  # a remote pack's cached chunk may be damaged: read once more, downloaded anew
                again = self.files.reread(shard, int(self.offset[i]) - HEADER, size + HEADER)
                if again is None:
                    raise self._damaged(i, shard, problem)
                if self._problem(i, again, size):
                    raise ShardError(
                        f"sample {i} ({self._name(i)}) in {self.paths[shard]} {problem}, also when downloaded again: "
                        "the object is not the one its manifest describes (replaced in place, or a pack uploaded "
                        f"again there mid-run): check it with `python tools/pack.py --verify {self.root}`, and "
                        "upload the pack again if it is damaged"
                    )
                raw = again
            out.append(raw[HEADER:])
        return out

    def _problem(self, i: int, raw: bytes, size: int) -> str:
        """What is wrong with the bytes read for row `i` ("" when they are its sample's)."""
        data = raw[HEADER:]
        # zlib.crc32: ~2 us for a 10 KB crop, against ~100 us to decode it.
        if len(data) != size or zlib.crc32(data) != int(self.crc32[i]):
            return "does not match its checksum" if len(data) == size else "is cut short"
        if raw[:15] != b"%010d.jpg\0" % int(self.key[i]):
            return f"is not stored as its key {int(self.key[i]):010d} says"
        return ""

    def _raw(self, ids: list[int]) -> list[bytes]:
        """Each row's tar header and JPEG bytes (a batch's requests in flight together on a remote pack)."""
        return self.files.read_many(self._requests(ids))

    def _requests(self, ids: list[int]) -> list[tuple[int, int, int]]:
        return [(int(self.shard[i]), int(self.offset[i]) - HEADER, int(self.size[i]) + HEADER) for i in ids]

    def prefetch(self, batches: list[np.ndarray]) -> None:
        """An epoch's plan, in the order its batches will be read: nothing to prepare for local random reads."""

    def close(self) -> None:
        """The epoch ended or was abandoned."""

    def _name(self, row: int) -> str:
        return bytes(self.filename[row]).decode(errors="replace")

    def _damaged(self, row: int, shard: int, what: str) -> ShardError:
        return ShardError(
            f"sample {row} ({self._name(row)}) in {self.paths[shard]} {what} (damaged on disk or in transfer, or index "
            f"and tars of different packs): "
            + repack(self.root)
            + f", or check the whole folder with `python tools/pack.py --verify {self.root}`"
        )

    def check(self) -> None:
        """Spot-check that the first and last sample of every shard are where the index says."""
        # One stable sort groups rows by shard (they already are, as packed), instead of a scan per shard:
        # 100 shards x 1M rows took 0.6 s that way.
        order = np.argsort(self.shard, kind="stable")
        grouped = self.shard[order]
        shards = np.arange(len(self.paths))
        first, stop = np.searchsorted(grouped, shards, "left"), np.searchsorted(grouped, shards, "right")
        for shard in np.flatnonzero(first == stop)[:1]:
            raise ShardError(f"{self.paths[shard]} has no sample in the index: " + repack(self.root))
        self.read(order[np.stack([first, stop - 1], axis=1).ravel()])


class _ReadAhead(ByteReader):
    """What both read-aheads share: one thread per epoch, started by `prefetch` through `_restart` and stopped by
    bumping `_epoch` (an older thread sees it and returns); `_drop` forgets what the read-ahead holds. Picklable:
    a copy starts with nothing read ahead."""

    DROPPED = ("_futures", "_skip", "_buffers", "_left")  # what `_drop` makes: left out of a pickled copy

    def __init__(self, index: SplitIndex, files: LocalShards | RemoteShards | None):
        super().__init__(index, files)
        self._cond = threading.Condition()
        self._epoch = 0  # bumped by every prefetch and close: an older read-ahead thread stops
        self._drop()

    def _drop(self) -> None:
        raise NotImplementedError

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_cond", *self.DROPPED)}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._cond = threading.Condition()
        self._drop()

    def _restart(self, name: str, target, *args, **state) -> None:
        """A new epoch: the previous read-ahead stopped and dropped, `state` set, `target(epoch, *args)` started."""
        with self._cond:
            self._epoch += 1
            self._drop()
            self.__dict__.update(state)
            self._cond.notify_all()
        threading.Thread(target=target, args=(self._epoch, *args), name=name, daemon=True).start()

    def close(self) -> None:
        """Stop the read-ahead and drop what it holds (the epoch ended or was abandoned)."""
        with self._cond:
            self._epoch += 1
            self._drop()
            self._cond.notify_all()


class AheadReader(_ReadAhead):
    """A `ByteReader` for a remote pack in random order: the samples of the epoch's next batches are requested
    ahead of the backends (`ahead` samples in flight at most), so a backend that reads one batch at a time (DALI's
    external source) still keeps the pool's requests busy. As in `BlockReader`, a batch that was not requested
    ahead is read directly, never waited for; checksums are checked as in `ByteReader`. Thread-safe.
    """

    def __init__(self, index: SplitIndex, files: RemoteShards, ahead: int = 256):
        self.remote_files, self.ahead = files, ahead
        super().__init__(index, files)

    def _drop(self) -> None:
        for queued in self.__dict__.get("_futures", {}).values():
            for futures in queued:
                for f in futures:
                    f.cancel()
        self._futures: dict[bytes, deque[list[Future[bytes]]]] = {}  # a batch's ids -> its requests, in order
        self._skip: dict[bytes, int] = {}  # batches read directly before the read-ahead reached them
        self._held = 0  # samples requested ahead and not yet read

    def prefetch(self, batches: list[np.ndarray]) -> None:
        self._restart("crackio-ahead-reader", self._read_ahead, batches)

    def _read_ahead(self, epoch: int, batches: list[np.ndarray]) -> None:
        for ids in batches:
            key = np.asarray(ids, np.int64).tobytes()
            with self._cond:
                while self._epoch == epoch and self._held > 0 and self._held + len(ids) > self.ahead:
                    self._cond.wait()
                if self._epoch != epoch:
                    return
                if self._skip.get(key):
                    self._skip[key] -= 1
                    continue
                futures = self.remote_files.submit(self._requests([int(i) for i in ids]))
                self._futures.setdefault(key, deque()).append(futures)
                self._held += len(ids)

    def _raw(self, ids: list[int]) -> list[bytes]:
        key = np.asarray(ids, np.int64).tobytes()
        with self._cond:
            queued = self._futures.get(key)
            futures = queued.popleft() if queued else None
            if queued is not None and not queued:
                del self._futures[key]
            if futures is None:
                self._skip[key] = self._skip.get(key, 0) + 1
            else:
                self._held -= len(futures)
                self._cond.notify_all()
        if futures is None:
            return self.files.read_many(self._requests(ids))
        return [f.result() for f in futures]  # a request's error (RemoteError, ...) is raised here


class BlockReader(_ReadAhead):
    """A `ByteReader` for block order: whole blocks read ahead, one sequential `pread` per block and tar.

    `prefetch(batches)` at the start of an epoch hands over the epoch's plan; a thread then reads
    the blocks (`block_size` consecutive index rows) in the order the plan first needs them, the
    byte span from the first to the last needed sample of the block in each tar, keeping at most
    `budget` bytes that are not yet consumed. `read` serves samples from those buffers and frees a
    block once its last planned sample has been read. A sample whose block is not buffered yet is
    read directly (never a wait on the read-ahead, so no ordering of the backends' threads can
    deadlock it). Thread-safe; checksums are checked as in `ByteReader`.
    """

    def __init__(
        self,
        index: SplitIndex,
        files: LocalShards | RemoteShards | None = None,
        block_size: int = 128,
        budget: int = 64 << 20,
    ):
        self.block_size, self.budget = block_size, budget
        super().__init__(index, files)

    def _drop(self) -> None:
        self._buffers: dict[tuple[int, int], tuple[int, bytes]] = {}  # (block, shard) -> (first offset, bytes)
        self._left: dict[int, int] = {}  # block -> planned reads not yet served
        self._held = 0  # bytes buffered

    def prefetch(self, batches: list[np.ndarray]) -> None:
        """Start reading ahead for an epoch whose batches (row ids) will be read in this order."""
        ids = np.concatenate(batches) if batches else np.zeros(0, np.int64)
        blocks = ids // self.block_size
        uses = np.bincount(blocks, minlength=1)
        _, first = np.unique(blocks, return_index=True)
        order = blocks[np.sort(first)]  # blocks by first use
        needed = np.zeros(len(self.shard), bool)
        needed[ids] = True
        left = {int(b): int(uses[b]) for b in order}
        self._restart("crackio-block-reader", self._read_ahead, order, needed, _left=left)

    def _spans(self, block: int, needed: np.ndarray) -> list[tuple[int, int, int]]:
        rows = np.arange(block * self.block_size, min((block + 1) * self.block_size, len(self.shard)))
        rows = rows[needed[rows]]
        spans = []
        for shard in np.unique(self.shard[rows]):
            mine = rows[self.shard[rows] == shard]
            start = int(self.offset[mine].min()) - HEADER
            spans.append((int(shard), start, int((self.offset[mine] + self.size[mine]).max()) - start))
        return spans

    def _read_ahead(self, epoch: int, order: np.ndarray, needed: np.ndarray) -> None:
        for block in order:
            block = int(block)
            for shard, start, length in self._spans(block, needed):
                with self._cond:
                    while self._epoch == epoch and self._held > 0 and self._held + length > self.budget:
                        self._cond.wait()
                    if self._epoch != epoch:
                        return
                    if self._left.get(block, 0) == 0:
                        break  # already consumed by direct reads
                try:
                    data = self.files.read(shard, start, length)
                except Exception:  # OSError, or a remote pack's RemoteError
                    return  # a reader thread never fails the epoch: `read` reads directly and reports the error
                with self._cond:
                    if self._epoch != epoch:
                        return
                    if self._left.get(block, 0) > 0:
                        self._buffers[(block, shard)] = (start, data)
                        self._held += len(data)

    def _raw(self, ids: list[int]) -> list[bytes]:
        return [self._bytes(i, int(self.shard[i]), int(self.size[i])) for i in ids]

    def _bytes(self, row: int, shard: int, size: int) -> bytes:
        """The sample's tar header and JPEG bytes: from the read-ahead's buffer, or read directly."""
        block = row // self.block_size
        offset, size = int(self.offset[row]) - HEADER, size + HEADER
        with self._cond:
            buffered = self._buffers.get((block, shard))
            left = self._left.get(block, 0) - 1
            if left <= 0:
                self._left.pop(block, None)
                for key in [k for k in self._buffers if k[0] == block]:
                    self._held -= len(self._buffers.pop(key)[1])
                self._cond.notify_all()
            else:
                self._left[block] = left
        if buffered is not None:
            start, data = buffered
            if start <= offset and offset + size <= start + len(data):
                return data[offset - start : offset - start + size]
        return self.files.read(shard, offset, size)


class MixedReader:
    """The readers of several packs as one (a mixture: crackio.loading.mixture): row `i` is row `i - offsets[p]` of
    pack p, the last pack whose offset is at most `i`. Each pack keeps its own reader (a local pack's random reads,
    a remote pack's read-ahead, block order's blocks), handed its part of every batch in the batch's order."""

    def __init__(self, readers: list[ByteReader], offsets: np.ndarray):
        self.readers, self.offsets = readers, np.asarray(offsets, np.int64)

    def read(self, ids: np.ndarray) -> list[bytes]:
        """As `ByteReader.read`, each pack's rows read by its own reader (its errors name its files)."""
        out: list[bytes] = [b""] * len(ids)
        for p, where, rows in by_pack(self.offsets, ids):
            for at, data in zip(where, self.readers[p].read(rows)):
                out[at] = data
        return out

    def prefetch(self, batches: list[np.ndarray]) -> None:
        parts: list[list[np.ndarray]] = [[] for _ in self.readers]
        for ids in batches:
            for p, _, rows in by_pack(self.offsets, ids):
                parts[p].append(rows)
        for reader, mine in zip(self.readers, parts):
            reader.prefetch(mine)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()

    def check(self) -> None:
        for reader in self.readers:
            reader.check()
