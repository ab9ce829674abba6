"""Append-only files of fixed-size float16 rows, read through memory maps: where vectors and maps live.

Why not SQLite blobs: a 1280x7x7 map is ~98% of a record's bytes, and a million
records of blobs make a database of 130+ GB that every query opens. SQLite keeps
the records and, for each one, the (shard, row) its vector sits at; the rows
themselves are plain arrays on disk that many processes can map at no cost.

Crash safety is shared with the store: rows are written and flushed to disk
*before* the SQLite transaction that points at them commits, so a killed writer
leaves only rows nobody points at. The store records each shard's committed row
count in the same transaction; `write` truncates a shard back to that count
before appending, and the store deletes shard files it has no count for. Only
never-committed tails are ever truncated, so a reader that mapped a shard earlier
can never touch a page that vanished (which would be a SIGBUS, not an error).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

SHARD_BYTES = 256 * 2**20  # a shard is rolled over at about this size: small enough to copy, few enough files
ROW_DTYPE = np.dtype(np.float16)  # cosine top-10 lists are unchanged at fp16 (tests/test_shards.py measures it)


class ShardFiles:
    """The shards of one kind ("vec" or "map") in an index's shard folder."""

    def __init__(self, folder: Path, kind: str, row_shape: tuple[int, ...]):
        self.folder = Path(folder)
        self.kind = kind
        self.row_shape = tuple(int(s) for s in row_shape)
        self.row_bytes = int(np.prod(self.row_shape)) * ROW_DTYPE.itemsize
        self.rows_per_shard = max(1, SHARD_BYTES // self.row_bytes)
        self._pattern = re.compile(rf"^{re.escape(kind)}-(\d{{6}})\.f16$")
        self._maps: dict[int, np.memmap] = {}

    def path(self, shard: int) -> Path:
        return self.folder / f"{self.kind}-{shard:06d}.f16"

    def on_disk(self) -> list[int]:
        """Shard numbers that have a file, committed or not."""
        if not self.folder.is_dir():
            return []
        found = (self._pattern.match(name) for name in os.listdir(self.folder))
        return sorted(int(m.group(1)) for m in found if m)

    def write(self, shard: int, start: int, rows: np.ndarray) -> None:
        """Put `rows` at row `start` of `shard`, dropping any uncommitted tail first; durable on return."""
        data = np.ascontiguousarray(rows, dtype=ROW_DTYPE).reshape(len(rows), *self.row_shape)
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path(shard), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, start * self.row_bytes)  # rows past the committed count were never pointed at
            view = memoryview(data.tobytes())
            offset = start * self.row_bytes
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
            os.fdatasync(fd)  # on disk before SQLite can point at it
        finally:
            os.close(fd)
        self._maps.pop(shard, None)  # a map made before this write may be too short

    def read(self, shard: int, rows: np.ndarray, dtype=np.float32) -> np.ndarray:
        """The rows at these positions of one shard, in the order given."""
        mapped = self._mapped(shard, int(rows.max()) + 1 if len(rows) else 0)
        return np.asarray(mapped[rows], dtype=dtype)

    def _mapped(self, shard: int, needed: int) -> np.memmap:
        mapped = self._maps.get(shard)
        if mapped is None or len(mapped) < needed:
            path = self.path(shard)
            n = path.stat().st_size // self.row_bytes
            if n < needed:
                raise FileNotFoundError(f"{path} holds {n} rows, but the index points at row {needed - 1}")
            mapped = np.memmap(path, dtype=ROW_DTYPE, mode="r", shape=(n, *self.row_shape))
            self._maps[shard] = mapped
        return mapped

    def remove(self, shards: list[int]) -> None:
        """Unlink shard files; a reader that mapped one keeps its pages (unlink never truncates)."""
        for shard in shards:
            self._maps.pop(shard, None)
            try:
                self.path(shard).unlink()
            except FileNotFoundError:
                pass

    def disk_bytes(self) -> int:
        return sum(self.path(s).stat().st_size for s in self.on_disk())
