"""ArrayRecord shards of token ids: one document per record, as little-endian uint16 (vocab <= 65536) or uint32.

A chat (or preference) dataset's record is a conversation: its n token ids as above, then its n per-token loss
weights as uint8 (0 or 1; see chat.py), in the same blob, so one read gets both.

Shards are written with `group_size:1`, so that any record can be read alone: the loader's global shuffle reads
documents in random order, and larger groups would decompress a whole group for each one. The loader reads many
records per call (`DocumentReader.read`): one ArrayRecord call costs ~50 us however little it reads, and ~3 us per
record when it reads dozens, which decides whether short documents can be loaded at millions of tokens per second.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from dsjax.errors import DataError

WRITER_OPTIONS = "group_size:1"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def decode_record(record: bytes, dtype: np.dtype) -> np.ndarray:
    """A record's token ids as int32 (what the model's embedding lookup takes)."""
    return np.frombuffer(record, dtype=dtype).astype(np.int32)


def decode_weighted_record(record: bytes, dtype: np.dtype) -> np.ndarray:
    """A conversation record as a (2, n) int32 array: row 0 the token ids, row 1 the loss weights (0/1)."""
    n = len(record) // (dtype.itemsize + 1)
    out = np.empty((2, n), np.int32)
    out[0] = np.frombuffer(record, dtype=dtype, count=n)
    out[1] = np.frombuffer(record, dtype=np.uint8, offset=n * dtype.itemsize)
    return out


class ShardWriter:
    """Writes documents to `<dir>/NNNNN.array_record` files of about `shard_bytes` each; keeps every length."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_bytes: int):
        self.directory, self.dtype, self.shard_bytes = directory, dtype, shard_bytes
        self.shards: list[Path] = []
        self.lengths: list[int] = []
        self._writer = None
        self._written = 0

    def write(self, ids: np.ndarray, weights: np.ndarray | None = None) -> None:
        """One record: the ids, and after them the per-token weights if given (a conversation)."""
        if self._writer is None or self._written >= self.shard_bytes:
            self._roll()
        data = np.asarray(ids, dtype=self.dtype).tobytes()
        if weights is not None:
            assert len(weights) == len(ids)
            data += np.asarray(weights, dtype=np.uint8).tobytes()
        self._writer.write(data)
        self._written += len(data)
        self.lengths.append(len(ids))

    def _roll(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{len(self.shards):05d}.array_record"
        self._writer = ArrayRecordWriter(str(path), WRITER_OPTIONS)
        self.shards.append(path)
        self._written = 0

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.lengths:
            np.save(self.directory / "lengths.npy", np.asarray(self.lengths, dtype=np.int64))


class DocumentReader:
    """Reads documents by (dataset, record) from the shards of several datasets, a batch at a time.

    Readers stay open for the loader's life and are shared by its reader threads (ArrayRecord readers are
    thread-safe).
    """

    def __init__(self, shards: Sequence[Sequence[Path]], dtype: np.dtype, weighted: bool = False):
        self.dtype = dtype
        self._decode = decode_weighted_record if weighted else decode_record
        for path in (p for s in shards for p in s):
            if not path.exists():
                raise DataError(f"shard {path} is missing; prepare its dataset again.")
        self._readers = [[ArrayRecordReader(str(p), options="readahead_buffer_size:0") for p in s] for s in shards]
        # First record number of every shard, per dataset, to map a record number to (shard, position).
        self._starts = [np.cumsum([0] + [r.num_records() for r in readers]) for readers in self._readers]

    def num_records(self, dataset: int) -> int:
        return int(self._starts[dataset][-1])

    def read(self, keys: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """The documents for (dataset, record) keys, in order, as int32 arrays ((2, n) [ids; weights] if weighted)."""
        wanted: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i, (dataset, record) in enumerate(keys):
            shard = int(np.searchsorted(self._starts[dataset], record, side="right")) - 1
            wanted.setdefault((dataset, shard), []).append((i, record - int(self._starts[dataset][shard])))
        docs: list = [None] * len(keys)
        for (dataset, shard), items in wanted.items():
            blobs = self._readers[dataset][shard].read([position for _, position in items])
            for (i, _), blob in zip(items, blobs):
                docs[i] = self._decode(blob, self.dtype)
        return docs

    def close(self) -> None:
        for readers in self._readers:
            for reader in readers:
                reader.close()
