"""Random access to JPEG bytes inside the shards, through the split index."""

from __future__ import annotations

import os

import numpy as np

from crackio.shards import REPACK, ShardError, SplitIndex

JPEG_SOI = b"\xff\xd8"


class ByteReader:
    """Reads samples' JPEG bytes by (shard, offset, size); cheap to pickle into workers."""

    def __init__(self, index: SplitIndex):
        self.paths = [str(p) for p in index.shards]
        self.shard = index.rows["shard"]
        self.offset = index.rows["offset"]
        self.size = index.rows["size"]
        self.root = index.root
        self._fds: dict[int, int] = {}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_fds"} | {"_fds": {}}

    def __del__(self):
        for fd in self._fds.values():
            os.close(fd)

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return fd

    def read(self, ids: np.ndarray) -> list[bytes]:
        out = []
        for i in ids:
            shard, size = int(self.shard[i]), int(self.size[i])
            data = os.pread(self._fd(shard), size, int(self.offset[i]))
            if len(data) != size or not data.startswith(JPEG_SOI):
                raise ShardError(
                    f"sample {int(i)} in {self.paths[shard]} does not match the index "
                    f"(expected {size} JPEG bytes at offset {int(self.offset[i])}): " + REPACK.format(root=self.root)
                )
            out.append(data)
        return out

    def check(self) -> None:
        """Spot-check that the first and last sample of every shard are where the index says."""
        # One stable sort groups rows by shard (they already are, as packed), instead of a scan per shard:
        # 100 shards x 1M rows took 0.6 s that way.
        order = np.argsort(self.shard, kind="stable")
        grouped = self.shard[order]
        shards = np.arange(len(self.paths))
        first, stop = np.searchsorted(grouped, shards, "left"), np.searchsorted(grouped, shards, "right")
        for shard in np.flatnonzero(first == stop)[:1]:
            raise ShardError(f"{self.paths[shard]} has no sample in the index: " + REPACK.format(root=self.root))
        self.read(order[np.stack([first, stop - 1], axis=1).ravel()])
